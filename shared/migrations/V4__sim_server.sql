-- The simulated WhatsApp's server side (the `sim` driver only), shared by every worker
-- process through Postgres, so it can see what WhatsApp sees: which connection each linked
-- device has, and a second connection of the same device replacing the first (`conflict`).
-- No real deployment's driver writes here.

-- A worker process running the simulator. Its connections are alive while it holds the
-- advisory lock `lock_key` (its database connection closes when it dies, as a socket would)
-- and heartbeats (a frozen process's streams lapse after the keepalive, as WhatsApp's do).
CREATE TABLE sim_processes (
    id            text PRIMARY KEY,
    lock_key      bigint NOT NULL,
    heartbeat_at  bigint NOT NULL
);

-- The connection each linked device (session) has now.
CREATE TABLE sim_connections (
    device      text PRIMARY KEY,
    process     text NOT NULL,
    connection  bigint NOT NULL,
    since       bigint NOT NULL
);

-- Every time a device connected while another live connection of it existed: the older
-- stream is replaced, as WhatsApp does. The fleet must never cause one.
CREATE TABLE sim_conflicts (
    id                   bigserial PRIMARY KEY,
    device               text NOT NULL,
    replaced_process     text NOT NULL,
    replaced_connection  bigint NOT NULL,
    by_process           text NOT NULL,
    by_connection        bigint NOT NULL,
    at                   bigint NOT NULL
);
CREATE INDEX sim_conflicts_replaced ON sim_conflicts (replaced_process, id);
