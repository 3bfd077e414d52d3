-- Webhooks: endpoints an organization registers, and the deliveries of its events to them.
--
-- The `events` table is the outbox. `events::append` inserts one `webhook_deliveries` row per
-- matching enabled endpoint in the transaction that stores the event, under the
-- organization's advisory lock, so delivery ids commit in event order per organization and
-- an event is never stored without its deliveries. Dispatchers in the api replicas claim the
-- oldest pending delivery of each (endpoint, session) with `FOR UPDATE SKIP LOCKED` and a
-- lease (`claimed_until`): a crashed replica's claims lapse and another replica takes them.
--
-- Signing secrets are sealed with `CREDENTIALS_KEYS` (AES-256-GCM, `shared/src/sealed.rs`);
-- after a rotation the previous secret keeps signing beside the new one until
-- `previous_secret_until`.
CREATE TABLE webhooks (
    id                      text PRIMARY KEY,
    organization_id         text NOT NULL,
    url                     text NOT NULL,
    events                  text[] NOT NULL,
    session_id              text,
    description             text,
    enabled                 boolean NOT NULL DEFAULT true,
    disabled_reason         text,
    secret_key_id           text NOT NULL,
    secret_sealed           bytea NOT NULL,
    previous_secret_key_id  text,
    previous_secret_sealed  bytea,
    previous_secret_until   bigint,
    -- When the endpoint's current run of failures began: the queueing time of the first
    -- delivery it failed to take (null while it succeeds).
    failing_since           bigint,
    created_at              bigint NOT NULL,
    updated_at              bigint NOT NULL
);
CREATE INDEX webhooks_org ON webhooks (organization_id, id);

CREATE TABLE webhook_deliveries (
    id                bigserial PRIMARY KEY,
    webhook_id        text NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    organization_id   text NOT NULL,
    -- The ordering group within the endpoint ('' for events not about a session).
    session_id        text NOT NULL,
    -- The stored event; null for a `:test` delivery, whose body is `payload`.
    event_id          bigint,
    event_type        text NOT NULL,
    payload           jsonb,
    status            text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   bigint NOT NULL,
    claimed_until     bigint,
    claim_token       text,
    last_status_code  integer,
    last_error        text,
    last_response     text,
    created_at        bigint NOT NULL,
    completed_at      bigint
);
CREATE INDEX webhook_deliveries_queue ON webhook_deliveries (webhook_id, session_id, id)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (webhook_id, id);
CREATE INDEX webhook_deliveries_done ON webhook_deliveries (created_at)
    WHERE status <> 'pending';

-- Every attempt of a delivery, as the delivery log shows it.
CREATE TABLE webhook_attempts (
    id                bigserial PRIMARY KEY,
    delivery_id       bigint NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    started_at        bigint NOT NULL,
    duration_ms       integer NOT NULL,
    status_code       integer,
    error             text,
    response_snippet  text
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
