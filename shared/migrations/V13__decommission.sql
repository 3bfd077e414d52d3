-- A gateway being removed for good: it drains like `draining`, then its worker (or gatewayctl,
-- when no worker runs it) deletes its row and its command queue once it owns no session.
-- Expand only: older processes never write the new state; one that reads it places nothing on
-- the gateway (it is not `active`) but does not drain it either, so decommission after a
-- rollout, not during one.
ALTER TABLE gateways DROP CONSTRAINT gateways_state_check;
ALTER TABLE gateways ADD CONSTRAINT gateways_state_check
    CHECK (state IN ('active', 'draining', 'decommissioning', 'cordoned', 'dead'));
