-- Every kind of message, not only texts (shared/src/message.rs, `Content`): its type and
-- content as JSON, and the message it quotes. Expand only: `text` stays, written with a
-- text's text ("" for the other types), so a process of the version before reads every row.
ALTER TABLE messages ADD COLUMN content jsonb, ADD COLUMN reply_to text;
-- What the simulated WhatsApp accepted, by type (NULL: a text, written before this).
ALTER TABLE sim_messages ADD COLUMN content jsonb;
