-- Volumes: named, sized filesystems owned by a tenant that outlive the
-- sandboxes they are mounted into, and which sandbox mounts which.
CREATE TABLE volumes (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    size_mb     BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);

-- One row per volume a sandbox was created with; a volume whose sandbox is
-- still live may not be deleted.
CREATE TABLE sandbox_volumes (
    sandbox_id  TEXT NOT NULL,
    volume_id   TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    path        TEXT NOT NULL,
    read_only   BIGINT NOT NULL,
    PRIMARY KEY (sandbox_id, volume_id)
);
CREATE INDEX sandbox_volumes_volume ON sandbox_volumes (volume_id);

-- Quota fields for volumes: how many, and their total size in MiB.
ALTER TABLE quotas ADD COLUMN max_volumes BIGINT;
ALTER TABLE quotas ADD COLUMN max_volume_mb BIGINT;
