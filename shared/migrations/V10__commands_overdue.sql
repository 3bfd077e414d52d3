-- The commands still pending, by deadline: what the api's sweeper reads to end those whose
-- outcome never came (a dead letter lost in a broker restart, a worker that died mid-run).
CREATE INDEX commands_pending_deadline ON commands (deadline_at) WHERE status = 'pending';
