-- Scale-up rebalancing: the region's reaper marks sessions of its fullest gateway to move to
-- its emptiest (`move_to`); their owner hands each over (closing its connection before the new
-- owner opens one) and records when (`moved_at`, on every move), so that no session is moved
-- by a rebalance twice within a window. Expand only: older workers ignore both.
ALTER TABLE sessions ADD COLUMN move_to text, ADD COLUMN moved_at bigint;
-- Both lookups touch only the marked rows: what is coming to a gateway (the plan's loads) and
-- what is leaving it (its owner's check on every heartbeat, which must not scan its sessions).
CREATE INDEX sessions_to_move ON sessions (move_to) WHERE move_to IS NOT NULL;
CREATE INDEX sessions_leaving ON sessions (gateway_id) WHERE move_to IS NOT NULL;
