-- The fleet: sessions that move between the gateways of a region.

-- `cordoned`: keeps its sessions, takes no new ones. `dead` is what a lapsed heartbeat shows;
-- it is computed, not stored, but an old row may still say it.
ALTER TABLE gateways DROP CONSTRAINT gateways_state_check;
ALTER TABLE gateways ADD CONSTRAINT gateways_state_check
    CHECK (state IN ('active', 'draining', 'cordoned', 'dead'));
-- What a drain could not do, in words for the SRE (null when nothing is wrong).
ALTER TABLE gateways ADD COLUMN note text;

-- What the session's owner asked for, apart from what it is: the fleet brings `running`
-- sessions back after a move, and leaves `stopped` ones stopped.
ALTER TABLE sessions ADD COLUMN desired_state text NOT NULL DEFAULT 'stopped'
    CHECK (desired_state IN ('running', 'stopped'));
UPDATE sessions SET desired_state = 'running' WHERE status IN ('working', 'starting', 'scan_qr_code');

-- The lease: `gateway_id` is the owner, `lease_epoch` the fencing token, and this the time
-- (the database's clock, epoch ms) until which the owner's worker holds it; null when no
-- worker holds it (never claimed, released by a drain, or re-placed by failover).
ALTER TABLE sessions ADD COLUMN lease_expires_at bigint;
DROP INDEX sessions_gateway;
CREATE INDEX sessions_gateway_lease ON sessions (gateway_id, lease_expires_at);
