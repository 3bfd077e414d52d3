-- The WhatsApp driver's key store: what `whatsapp-rust` keeps of a linked device (its own
-- keys, the Signal state it shares with every contact, app-state sync), one table per
-- concern as whatsmeow's sqlstore has, so each is read and written by its natural key and
-- swept by its own index. Every row belongs to one session (at most one linked device each)
-- and goes with it (`ON DELETE CASCADE`).
--
-- Secrets are sealed (AES-256-GCM, `shared::sealed`): `key_id` names the key of
-- CREDENTIALS_KEYS that sealed `sealed`, whose associated data is `<table>/<session id>`, so
-- a value moved to another session's row does not open. What is public or only bookkeeping
-- (contacts' public identity keys, MACs, versions, LID mappings, device lists, timestamps)
-- stays plain. `gatewayctl credentials rotate` re-seals every value not under the first key;
-- `shared::store::wa_keys::SEALED` lists the sealed tables.
--
-- Ids the library types as u32 are bigint; its u64 app-state versions are stored bit for bit
-- in bigint. Addresses that are matched by prefix are `COLLATE "C"`, so a prefix is a range
-- of the primary key.

-- Orders writes where the library's answer depends on which came last (the latest sync key,
-- the oldest sent message).
CREATE SEQUENCE wa_write_seq;

-- The linked device: its identity, noise and signed pre-key pairs, ADV secret and account
-- signature (sealed: the serialized `wacore::store::Device`, authoritative), with a readable
-- copy of who it is for operators.
CREATE TABLE wa_devices (
    session_id       text PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    pn               text,
    lid              text,
    registration_id  bigint NOT NULL,
    push_name        text NOT NULL,
    key_id           text NOT NULL,
    sealed           bytea NOT NULL
);

-- Contacts' public identity keys (32 bytes), by Signal address (`user[:device]@server`).
CREATE TABLE wa_identities (
    session_id    text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    address       text COLLATE "C" NOT NULL,
    identity_key  bytea NOT NULL,
    PRIMARY KEY (session_id, address)
);

-- Signal sessions (the ratchets), by address.
CREATE TABLE wa_signal_sessions (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    address     text COLLATE "C" NOT NULL,
    key_id      text NOT NULL,
    sealed      bytea NOT NULL,
    PRIMARY KEY (session_id, address)
);

-- One-time pre-keys; `uploaded` once the server has them.
CREATE TABLE wa_prekeys (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    id          bigint NOT NULL,
    uploaded    boolean NOT NULL,
    key_id      text NOT NULL,
    sealed      bytea NOT NULL,
    PRIMARY KEY (session_id, id)
);

CREATE TABLE wa_signed_prekeys (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    id          bigint NOT NULL,
    key_id      text NOT NULL,
    sealed      bytea NOT NULL,
    PRIMARY KEY (session_id, id)
);

-- Group sender keys, by sender-key address (group and sender).
CREATE TABLE wa_sender_keys (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    address     text NOT NULL,
    key_id      text NOT NULL,
    sealed      bytea NOT NULL,
    PRIMARY KEY (session_id, address)
);

-- App-state sync keys, by their key id; `sealed` is the key data. `seq`: the latest one set
-- is the one `get_latest_sync_key_id` answers.
CREATE TABLE wa_app_state_sync_keys (
    session_id     text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    id             bytea NOT NULL,
    fingerprint    bytea NOT NULL,
    key_timestamp  bigint NOT NULL,
    seq            bigint NOT NULL,
    key_id         text NOT NULL,
    sealed         bytea NOT NULL,
    PRIMARY KEY (session_id, id)
);
CREATE INDEX wa_app_state_sync_keys_latest ON wa_app_state_sync_keys (session_id, seq);

-- Each app-state collection's version and ltHash, with its index → value MAC map.
CREATE TABLE wa_app_state_versions (
    session_id          text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    collection          text NOT NULL,
    version             bigint NOT NULL,
    hash                bytea NOT NULL,
    index_keys          text[] NOT NULL,
    index_values        bytea[] NOT NULL,
    mac_mismatch_fatal  boolean NOT NULL,
    PRIMARY KEY (session_id, collection)
);

-- The value MAC of every mutation of a collection, by its index MAC.
CREATE TABLE wa_app_state_mutation_macs (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    collection  text NOT NULL,
    index_mac   bytea NOT NULL,
    version     bigint NOT NULL,
    value_mac   bytea NOT NULL,
    PRIMARY KEY (session_id, collection, index_mac)
);

-- Which devices of a group have our sender key (false: they need a fresh SKDM).
CREATE TABLE wa_sender_key_devices (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    group_jid   text NOT NULL,
    device_jid  text NOT NULL,
    has_key     boolean NOT NULL,
    PRIMARY KEY (session_id, group_jid, device_jid)
);
-- A device forgotten in every group at once.
CREATE INDEX wa_sender_key_devices_device ON wa_sender_key_devices (session_id, device_jid);

-- LID ↔ phone number. `pn_current` marks the LID a phone number resolves to: the last one
-- stored for it, until that LID or a LID leaving the number moves elsewhere (the library's
-- reverse index behaves so).
CREATE TABLE wa_lid_mappings (
    session_id       text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    lid              text NOT NULL,
    phone_number     text NOT NULL,
    created_at       bigint NOT NULL,
    updated_at       bigint NOT NULL,
    learning_source  text NOT NULL,
    pn_current       boolean NOT NULL,
    PRIMARY KEY (session_id, lid)
);
CREATE INDEX wa_lid_mappings_phone ON wa_lid_mappings (session_id, phone_number) WHERE pn_current;

-- Base keys saved for retry-receipt collision detection.
CREATE TABLE wa_base_keys (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    address     text NOT NULL,
    message_id  text NOT NULL,
    base_key    bytea NOT NULL,
    PRIMARY KEY (session_id, address, message_id)
);

-- Known devices of each user (usync), as `DeviceInfo` JSON.
CREATE TABLE wa_device_lists (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    user_id     text NOT NULL,
    devices     jsonb NOT NULL,
    updated_at  bigint NOT NULL,
    phash       text,
    raw_id      bigint,
    PRIMARY KEY (session_id, user_id)
);

-- Cached group metadata (the library's opaque blob), for the participant-hash re-query skip.
CREATE TABLE wa_group_metadata (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    group_jid   text NOT NULL,
    blob        bytea NOT NULL,
    PRIMARY KEY (session_id, group_jid)
);

-- Trusted-contact privacy tokens: `sealed` is the token received; `token_empty` marks the
-- byte-less placeholder the issuing side writes. Timestamps are unix seconds. The sweep drops
-- a row only when both its token and its sender bucket are stale, which no one column
-- orders: it reads the session's rows by primary key.
CREATE TABLE wa_tc_tokens (
    session_id        text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    jid               text NOT NULL,
    token_empty       boolean NOT NULL,
    token_timestamp   bigint NOT NULL,
    sender_timestamp  bigint,
    key_id            text NOT NULL,
    sealed            bytea NOT NULL,
    PRIMARY KEY (session_id, jid)
);

-- Sent messages kept for retry receipts (the message's protobuf), oldest swept first.
CREATE TABLE wa_sent_messages (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    chat_jid    text NOT NULL,
    message_id  text NOT NULL,
    created_at  bigint NOT NULL,
    seq         bigint NOT NULL,
    key_id      text NOT NULL,
    sealed      bytea NOT NULL,
    PRIMARY KEY (session_id, chat_jid, message_id)
);
CREATE INDEX wa_sent_messages_age ON wa_sent_messages (session_id, created_at, seq);

-- Decrypted inbound messages awaiting the durability hook's commit.
CREATE TABLE wa_pending_inbound (
    session_id   text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    chat         text NOT NULL,
    sender       text NOT NULL,
    id           text NOT NULL,
    inserted_at  bigint NOT NULL,
    key_id       text NOT NULL,
    sealed       bytea NOT NULL,
    PRIMARY KEY (session_id, chat, sender, id)
);
CREATE INDEX wa_pending_inbound_age ON wa_pending_inbound (session_id, inserted_at);

-- Message secrets (of polls, reactions, edits…); `expires_at` 0 is never.
CREATE TABLE wa_msg_secrets (
    session_id  text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    chat        text NOT NULL,
    sender      text NOT NULL,
    msg_id      text NOT NULL,
    expires_at  bigint NOT NULL,
    message_ts  bigint NOT NULL,
    key_id      text NOT NULL,
    sealed      bytea NOT NULL,
    PRIMARY KEY (session_id, chat, sender, msg_id)
);
CREATE INDEX wa_msg_secrets_expiry ON wa_msg_secrets (session_id, expires_at) WHERE expires_at <> 0;
