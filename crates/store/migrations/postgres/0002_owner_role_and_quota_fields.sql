-- Tenant-scoped `owner` keys; quota fields for the providers a tenant may
-- use (a JSON array of names; NULL = the server's default set) and for its
-- concurrent execs.
ALTER TABLE quotas ADD COLUMN allowed_providers TEXT;
ALTER TABLE quotas ADD COLUMN max_concurrent_execs BIGINT;

ALTER TABLE api_keys DROP CONSTRAINT api_keys_role_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check
    CHECK (role IN ('admin', 'owner', 'member', 'viewer'));
