-- A sent message's row changes four times (sending, sent, delivered, read). While the
-- queue's index named `status` in its predicate, every change was a new row version with a
-- new entry in every index of the table: PostgreSQL updates a row in place in its page
-- (HOT, no index work) only when no column any index refers to changes. The queue's index
-- now refers to `queued`, computed from the status, which changes once (when the message
-- leaves the queue); `delivered` and `read` change no indexed column and, with room left
-- in each page for their versions, are HOT. Queries of the queue say `queued` to use it.
--
-- Expand and contract at once: a process of the previous version still reads its queue
-- (`status = 'queued'`), through the (session_id, idempotency_key) index, until it is
-- replaced. Adding the column rewrites the table once.
ALTER TABLE messages ADD COLUMN queued boolean NOT NULL
    GENERATED ALWAYS AS (status = 'queued') STORED;
DROP INDEX messages_queue;
CREATE INDEX messages_queue ON messages (session_id, id) WHERE queued;
ALTER TABLE messages SET (fillfactor = 80);
