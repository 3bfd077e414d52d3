-- Every kind of message, not only texts (shared/src/message.rs, `Content`): its type and
-- content as JSON, and the message it quotes. Expand only: `text` stays, written with a
-- text's text ("" for the other types), so a process of the version before reads every row.
ALTER TABLE messages ADD COLUMN content jsonb, ADD COLUMN reply_to text;
-- What the simulated WhatsApp accepted, by type (NULL: a text, written before this).
ALTER TABLE sim_messages ADD COLUMN content jsonb;
-- What WhatsApp said of the numbers a session checked (`contacts:check`): reused for a while,
-- and, by `checked_at`, the session's window of checks against WhatsApp.
CREATE TABLE contact_checks (
    session_id   text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    number       text NOT NULL,
    on_whatsapp  boolean NOT NULL,
    jid          text,
    lid          text,
    checked_at   bigint NOT NULL,
    PRIMARY KEY (session_id, number)
);
CREATE INDEX contact_checks_window ON contact_checks (session_id, checked_at);
