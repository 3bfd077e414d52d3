-- Which store holds a file's bytes (issue 21): `postgres` (its chunks in `media_chunks`) or
-- `s3` (one object in the S3-compatible bucket, MEDIA_STORE=s3). The row stays in Postgres
-- either way, so a fleet that changes its store still reads, and prunes, what it stored before.
ALTER TABLE media ADD COLUMN store text NOT NULL DEFAULT 'postgres'
    CHECK (store IN ('postgres', 's3'));
