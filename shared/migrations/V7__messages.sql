-- Messages a session sends (and, later, receives). The queue of a session is its `queued`
-- rows in id (ULID, creation) order: no broker queue per session, and it moves with the
-- session because it is keyed by session, not by gateway.
--
-- `attempted_at` is when the owning worker began sending (recorded before the send, so a
-- crash after it can never send twice: a `sending` row found by a new owner ends `failed`
-- with `unknown`). The rate windows are counted over it, so they hold across restarts and
-- moves.
CREATE TABLE messages (
    id               text PRIMARY KEY,
    organization_id  text NOT NULL,
    session_id       text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    direction        text NOT NULL DEFAULT 'out' CHECK (direction IN ('out', 'in')),
    peer             text NOT NULL,
    text             text NOT NULL,
    status           text NOT NULL CHECK (status IN
                       ('queued', 'sending', 'sent', 'delivered', 'read', 'failed', 'received')),
    error            text,
    idempotency_key  text,
    wa_message_id    text,
    created_at       bigint NOT NULL,
    attempted_at     bigint,
    sent_at          bigint,
    delivered_at     bigint,
    read_at          bigint,
    UNIQUE (session_id, idempotency_key)
);
CREATE INDEX messages_queue ON messages (session_id, id) WHERE status = 'queued';
CREATE INDEX messages_attempts ON messages (session_id, attempted_at)
    WHERE attempted_at IS NOT NULL;
CREATE INDEX messages_by_wa_id ON messages (session_id, wa_message_id)
    WHERE wa_message_id IS NOT NULL;
