-- Media the fleet shares (issue 21): files uploaded through `POST /api/v1/media`, kept in
-- Postgres by default so every api replica and worker reads the same bytes with no other
-- service. An upload is one transaction (the row and all its chunks, or nothing): a body cut
-- short or refused leaves no half-stored object. `mime_type` is what the bytes are (sniffed),
-- not what the caller said. Rows past `expires_at` are pruned by the region's reaper.
CREATE TABLE media (
    id               text PRIMARY KEY,
    organization_id  text NOT NULL,
    mime_type        text NOT NULL,
    size             bigint NOT NULL CHECK (size > 0),
    sha256           text NOT NULL,
    created_at       bigint NOT NULL,
    expires_at       bigint NOT NULL
);
CREATE INDEX media_expiry ON media (expires_at);

-- The bytes, in order, 1 MiB a chunk: read back a chunk at a time (`Range` reads only the
-- chunks it needs), never a whole file in one value. The key is checked at commit: an upload
-- writes its chunks as they arrive and its row, once the bytes are known, last.
CREATE TABLE media_chunks (
    media_id  text NOT NULL REFERENCES media(id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    seq       integer NOT NULL,
    data      bytea NOT NULL,
    PRIMARY KEY (media_id, seq)
);
