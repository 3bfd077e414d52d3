-- Edits and deletes for everyone: when a message's sender last edited it (its `content` and
-- `text` are then the new ones) and when it deleted it for everyone. An edit or a delete the
-- session makes is itself a queued message (`content` of type `edit` or `revoke`) that sets
-- these on its target once WhatsApp took it; a contact's arrives as an event and sets them on
-- the message received. Expand only: older api and worker processes ignore both.
ALTER TABLE messages ADD COLUMN edited_at bigint, ADD COLUMN revoked_at bigint;
