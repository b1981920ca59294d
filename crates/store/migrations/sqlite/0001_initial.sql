-- The initial StacyVM schema (SQLite).
-- Times are INTEGER microseconds since the Unix epoch (UTC): exact, ordered,
-- and the same representation as the PostgreSQL schema.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE quotas (
    tenant_id            TEXT PRIMARY KEY REFERENCES tenants(id),
    max_sandboxes        INTEGER,
    max_cpu              REAL,
    max_memory_mb        INTEGER,
    max_timeout_s        INTEGER,
    max_exec_per_minute  INTEGER
) STRICT;

-- Only the hash of a key's secret is ever stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    role        TEXT NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, id);

CREATE TABLE sandboxes (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL REFERENCES tenants(id),
    state             TEXT NOT NULL,
    provider          TEXT NOT NULL,
    worker_id         TEXT,
    image             TEXT NOT NULL,
    template          TEXT,
    cpu               REAL NOT NULL,
    memory_mb         INTEGER NOT NULL,
    network           TEXT NOT NULL,
    labels            TEXT NOT NULL,  -- JSON object of strings
    env               TEXT NOT NULL,  -- JSON object of strings
    workdir           TEXT,
    timeout_s         INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    expires_at        INTEGER,
    destroyed_at      INTEGER,
    failure_code      TEXT,
    failure_message   TEXT,
    lease_expires_at  INTEGER,
    fencing_token     INTEGER NOT NULL,
    idempotency_key   TEXT
) STRICT;
CREATE INDEX sandboxes_tenant ON sandboxes (tenant_id, id);
CREATE INDEX sandboxes_state ON sandboxes (state);
CREATE INDEX sandboxes_expires_at ON sandboxes (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX sandboxes_worker ON sandboxes (worker_id) WHERE worker_id IS NOT NULL;
CREATE UNIQUE INDEX sandboxes_idempotency ON sandboxes (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Append-only: StacyVM has no code path that updates or deletes a row here.
-- `seq` is the append order; tenant_id has no foreign key because refusals
-- may name no tenant, and the log must never refuse an event.
CREATE TABLE audit_events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    ts             INTEGER NOT NULL,
    tenant_id      TEXT,
    actor_key_id   TEXT,
    actor_role     TEXT,
    action         TEXT NOT NULL,
    target         TEXT,
    sandbox_id     TEXT,
    outcome        TEXT NOT NULL,
    status         INTEGER NOT NULL,
    request_id     TEXT NOT NULL,
    source_ip      TEXT,
    detail         TEXT NOT NULL  -- JSON
) STRICT;
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, seq);
CREATE INDEX audit_events_sandbox ON audit_events (sandbox_id, seq) WHERE sandbox_id IS NOT NULL;
CREATE INDEX audit_events_action ON audit_events (action, seq);
CREATE INDEX audit_events_ts ON audit_events (ts);

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;

CREATE TABLE workers (
    id              TEXT PRIMARY KEY,
    address         TEXT NOT NULL,
    providers       TEXT NOT NULL,  -- JSON array of strings
    labels          TEXT NOT NULL,  -- JSON object of strings
    capacity        INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('ready', 'draining', 'down')),
    registered_at   INTEGER NOT NULL,
    last_heartbeat  INTEGER NOT NULL
) STRICT;
