-- A drain a worker starts on its own SIGTERM belongs to that process: it ends with it. The
-- state to come back to is kept beside the gateway's, so the gateway's next process (or its
-- clean exit) puts it back even when the draining process was killed before it could.
-- NULL when no such drain is under way: an SRE's drain (gatewayctl) persists.
ALTER TABLE gateways ADD COLUMN drain_restore text
    CHECK (drain_restore IN ('active', 'cordoned'));
