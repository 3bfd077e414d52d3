-- The gateway fleet's schema. Timestamps are epoch milliseconds (bigint), as the API shows them.

-- Gateway workers register here and heartbeat; the api reads it to answer 503 at once when no
-- live worker owns a session's gateway, and SREs read it through `GET /gateways` and gatewayctl.
CREATE TABLE gateways (
    id            text PRIMARY KEY,
    region        text NOT NULL,
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'dead')),
    capacity      integer NOT NULL DEFAULT 1000 CHECK (capacity >= 0),
    version       text NOT NULL DEFAULT '',
    started_at    bigint NOT NULL,
    heartbeat_at  bigint NOT NULL
);

CREATE TABLE sessions (
    id                  text PRIMARY KEY,            -- ULID
    organization_id     text NOT NULL,
    label               text NOT NULL,
    gateway_id          text NOT NULL,
    phone_number        text,
    wa_jid              text,
    wa_lid              text,
    status              text NOT NULL DEFAULT 'stopped'
                        CHECK (status IN ('stopped', 'starting', 'scan_qr_code', 'working', 'failed', 'logged_out')),
    status_reason       text,
    auto_read           boolean NOT NULL DEFAULT false,
    presence_typing     boolean NOT NULL DEFAULT true,
    rate_per_min        integer NOT NULL DEFAULT 20 CHECK (rate_per_min > 0),
    rate_per_hour       integer NOT NULL DEFAULT 600 CHECK (rate_per_hour > 0),
    is_admin_session    boolean NOT NULL DEFAULT false,
    created_by_user_id  text NOT NULL,
    created_at          bigint NOT NULL,
    updated_at          bigint NOT NULL,
    last_connected_at   bigint,
    -- Fencing: only the worker holding the current epoch may connect the number or write its
    -- state. A worker bumps the epoch when it takes the session over.
    lease_epoch         bigint NOT NULL DEFAULT 0,
    -- The linked device's credentials, so any worker of the region can take the session over.
    device_credentials  jsonb
);
-- Every session query is scoped by organization; listing pages by id (ULIDs sort by time).
CREATE UNIQUE INDEX sessions_org_id ON sessions (organization_id, id);
CREATE INDEX sessions_gateway ON sessions (gateway_id);

CREATE TABLE api_keys (
    id               text PRIMARY KEY,               -- the public prefix, e.g. gwk_01J9...
    organization_id  text NOT NULL,
    name             text NOT NULL DEFAULT '',
    secret_sha256    bytea NOT NULL,                 -- only the hash of the secret is stored
    capabilities     text[] NOT NULL,
    created_at       bigint NOT NULL,
    last_used_at     bigint,
    revoked_at       bigint,
    expires_at       bigint
);
CREATE INDEX api_keys_org ON api_keys (organization_id);

-- Every command sent to a gateway: the reply's durable twin and the audit log.
CREATE TABLE commands (
    id               text PRIMARY KEY,               -- ULID, also the AMQP correlation id
    organization_id  text NOT NULL,
    session_id       text NOT NULL,
    gateway_id       text NOT NULL,
    kind             text NOT NULL,
    payload          jsonb NOT NULL,
    requested_by     text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'succeeded', 'failed', 'expired')),
    error_code       text,
    error_message    text,
    result           jsonb,                          -- the reply's outcome, replayed on redelivery
    created_at       bigint NOT NULL,
    deadline_at      bigint NOT NULL,
    completed_at     bigint
);
CREATE INDEX commands_session ON commands (organization_id, session_id, created_at);

-- Session events, for SSE resumption with Last-Event-ID. Ids are assigned under a per-org
-- advisory lock held to commit, so within an organization they commit in id order and a
-- resumed stream never skips one.
CREATE TABLE events (
    id               bigserial PRIMARY KEY,
    organization_id  text NOT NULL,
    session_id       text NOT NULL,
    type             text NOT NULL,
    payload          jsonb NOT NULL,
    created_at       bigint NOT NULL
);
CREATE INDEX events_org_id ON events (organization_id, id);
