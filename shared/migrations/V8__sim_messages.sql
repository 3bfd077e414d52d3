-- The simulated WhatsApp's record of every message it accepted from a device (the `sim`
-- driver only): what the recipients' phones received, so tests can show no message went out
-- twice, whatever happened to the worker sending it.
CREATE TABLE sim_messages (
    id         text PRIMARY KEY,
    device     text NOT NULL,
    recipient  text NOT NULL,
    text       text NOT NULL,
    at         bigint NOT NULL
);
CREATE INDEX sim_messages_device ON sim_messages (device);
