-- A quota field for templates: how many named templates a tenant may keep
-- (every version of one name is one template; their images count against
-- max_volume_mb). Null is unlimited, so tenants that exist keep working.
ALTER TABLE quotas ADD COLUMN max_templates BIGINT;
