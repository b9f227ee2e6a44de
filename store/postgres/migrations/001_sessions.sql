-- 001: sessions, their token ids and KV entries, and the blobs those entries point to.
--
-- The record bytes (store/records.py: header, crc32, JSON) are the truth about a session, as in LMDB; the
-- other columns of `sessions` are copies of some of its fields, written in the same statement, for the
-- queries that list, page and expire sessions. Token blocks and blobs hold the block encoding of
-- store/blocks.py (zstd, header, two checksums) byte for byte, so an export is the same from either backend.
-- KV entries point at immutable blobs; forks share a blob copy-on-write, and blob_refs counts the entries
-- pointing at each (a blob goes in the transaction that drops its last reference).

CREATE SEQUENCE blob_ids AS bigint;  -- blob ids only grow: a stale pointer never finds a newer blob

CREATE TABLE sessions (
    id                text COLLATE "C" PRIMARY KEY,  -- bytewise order, as LMDB's keys
    data              bytea NOT NULL,                -- the SessionRecord bytes
    n_tokens          bigint NOT NULL,
    updated           double precision NOT NULL,     -- unix time
    ttl               double precision NOT NULL,     -- seconds; 0: the server's default
    labels            jsonb NOT NULL,
    model_fingerprint text NOT NULL,
    version           bigint NOT NULL DEFAULT 1      -- one more with every write of the record
);

CREATE TABLE tokens (
    session_id text COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    idx        bigint NOT NULL CHECK (idx >= 0),    -- token block 0, 1, ...
    data       bytea NOT NULL,                       -- a token block: little-endian int32 ids
    PRIMARY KEY (session_id, idx)
);

CREATE TABLE blobs (
    id   bigint PRIMARY KEY,                         -- from blob_ids
    data bytea NOT NULL                              -- a KV block, never changed once written
);
ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;  -- zstd already: no second compression

CREATE TABLE blob_refs (
    blob_id bigint PRIMARY KEY REFERENCES blobs (id) ON DELETE CASCADE,
    refs    integer NOT NULL,                        -- KV entries pointing at the blob
    size    integer NOT NULL                         -- the blob's bytes
);

CREATE TABLE kv (
    session_id text COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    layer      integer NOT NULL CHECK (layer BETWEEN 0 AND 65535),
    idx        bigint NOT NULL CHECK (idx BETWEEN 0 AND 4294967295),
    blob_id    bigint NOT NULL REFERENCES blobs (id),
    PRIMARY KEY (session_id, layer, idx)
);
CREATE INDEX kv_blob ON kv (blob_id);  -- a blob's pointers (gc, and the foreign key when a blob goes)
