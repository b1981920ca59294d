-- The initial StacyVM schema (PostgreSQL).
-- Times are BIGINT microseconds since the Unix epoch (UTC): exact, ordered,
-- and the same representation as the SQLite schema.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE quotas (
    tenant_id            TEXT PRIMARY KEY REFERENCES tenants(id),
    max_sandboxes        BIGINT,
    max_cpu              DOUBLE PRECISION,
    max_memory_mb        BIGINT,
    max_timeout_s        BIGINT,
    max_exec_per_minute  BIGINT
);

-- Only the hash of a key's secret is ever stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    role        TEXT NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, id);

CREATE TABLE sandboxes (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL REFERENCES tenants(id),
    state             TEXT NOT NULL,
    provider          TEXT NOT NULL,
    worker_id         TEXT,
    image             TEXT NOT NULL,
    template          TEXT,
    cpu               DOUBLE PRECISION NOT NULL,
    memory_mb         BIGINT NOT NULL,
    network           TEXT NOT NULL,
    labels            JSONB NOT NULL,
    env               JSONB NOT NULL,
    workdir           TEXT,
    timeout_s         BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    expires_at        BIGINT,
    destroyed_at      BIGINT,
    failure_code      TEXT,
    failure_message   TEXT,
    lease_expires_at  BIGINT,
    fencing_token     BIGINT NOT NULL,
    idempotency_key   TEXT
);
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
    seq            BIGSERIAL PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    ts             BIGINT NOT NULL,
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
    detail         JSONB NOT NULL
);
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, seq);
CREATE INDEX audit_events_sandbox ON audit_events (sandbox_id, seq) WHERE sandbox_id IS NOT NULL;
CREATE INDEX audit_events_action ON audit_events (action, seq);
CREATE INDEX audit_events_ts ON audit_events (ts);

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only';
END;
$$;
CREATE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();

CREATE TABLE workers (
    id              TEXT PRIMARY KEY,
    address         TEXT NOT NULL,
    providers       JSONB NOT NULL,
    labels          JSONB NOT NULL,
    capacity        BIGINT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('ready', 'draining', 'down')),
    registered_at   BIGINT NOT NULL,
    last_heartbeat  BIGINT NOT NULL
);
