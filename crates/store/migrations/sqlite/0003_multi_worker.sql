-- Multi-worker mode: the tokens remote workers register with, what a
-- worker reports of itself, and leases on jobs that one control-plane
-- replica at a time runs (the reconcilers).
CREATE TABLE worker_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    -- Only the hash of a token's secret is ever stored.
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;

ALTER TABLE workers ADD COLUMN name TEXT NOT NULL DEFAULT '';
-- The token the worker registered with (NULL for the in-process worker).
ALTER TABLE workers ADD COLUMN token_id TEXT;
-- What a control plane sends to prove itself to the worker.
ALTER TABLE workers ADD COLUMN secret TEXT;
-- JSON array of {name, healthy, detail}, as the worker last reported.
ALTER TABLE workers ADD COLUMN provider_health TEXT NOT NULL DEFAULT '[]';
ALTER TABLE workers ADD COLUMN capacity_cpu REAL;
ALTER TABLE workers ADD COLUMN capacity_memory_mb INTEGER;

CREATE TABLE leader_leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT;
