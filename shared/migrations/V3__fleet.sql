-- The fleet: sessions that move between the gateways of a region.

-- `cordoned`: keeps its sessions, takes no new ones. `dead` is what a lapsed heartbeat shows;
-- it is computed, not stored, but an old row may still say it.
ALTER TABLE gateways DROP CONSTRAINT gateways_state_check;
ALTER TABLE gateways ADD CONSTRAINT gateways_state_check
    CHECK (state IN ('active', 'draining', 'cordoned', 'dead'));
-- What a drain could not do, in words for the SRE (null when nothing is wrong).
ALTER TABLE gateways ADD COLUMN note text;
-- The lease of the gateway's worker process on every session it holds: the process
-- (`instance`) and until when (the database's clock, epoch ms). One row renewed per tick,
-- however many sessions the worker holds.
ALTER TABLE gateways ADD COLUMN instance text;
ALTER TABLE gateways ADD COLUMN lease_expires_at bigint;

-- What the session's owner asked for, apart from what it is: the fleet brings `running`
-- sessions back after a move, and leaves `stopped` ones stopped.
ALTER TABLE sessions ADD COLUMN desired_state text NOT NULL DEFAULT 'stopped'
    CHECK (desired_state IN ('running', 'stopped'));
UPDATE sessions SET desired_state = 'running' WHERE status IN ('working', 'starting', 'scan_qr_code');

-- Which worker process holds the session (its owner gateway's `instance`), null when none
-- does (never claimed, handed to a peer, re-placed by failover). With `lease_epoch`, the
-- fencing token, and the gateway's lease, this is the session's lease.
ALTER TABLE sessions ADD COLUMN lease_holder text;
