-- Tenant-scoped `owner` keys; quota fields for the providers a tenant may
-- use (a JSON array of names; NULL = the server's default set) and for its
-- concurrent execs.
ALTER TABLE quotas ADD COLUMN allowed_providers TEXT;
ALTER TABLE quotas ADD COLUMN max_concurrent_execs INTEGER;

-- SQLite cannot change a CHECK constraint in place: the table is rebuilt.
CREATE TABLE api_keys_v2 (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    role        TEXT NOT NULL CHECK (role IN ('admin', 'owner', 'member', 'viewer')),
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;
INSERT INTO api_keys_v2 (id, tenant_id, role, name, key_hash, created_at, revoked_at)
    SELECT id, tenant_id, role, name, key_hash, created_at, revoked_at FROM api_keys;
DROP TABLE api_keys;
ALTER TABLE api_keys_v2 RENAME TO api_keys;
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, id);
