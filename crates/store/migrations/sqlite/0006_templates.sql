-- Templates: one row per build of a tenant's named template. Every build is
-- a new version; creates take the newest ready one unless pinned. A deleted
-- template keeps its rows (deleted_at set) until no live sandbox runs on its
-- image, so running sandboxes keep their files and version numbers are
-- never reused for a name.
CREATE TABLE template_versions (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    name          TEXT NOT NULL,
    version       INTEGER NOT NULL,
    state         TEXT NOT NULL,
    image         TEXT NOT NULL,
    spec          TEXT NOT NULL,
    failure       TEXT,
    log           TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    built_at      INTEGER,
    heartbeat_at  INTEGER NOT NULL,
    deleted_at    INTEGER,
    UNIQUE (tenant_id, name, version)
) STRICT;
CREATE INDEX template_versions_state ON template_versions (state);

-- The last version number each tenant's template name was given: rows of
-- deleted versions go once their image is unused, the numbers stay taken.
CREATE TABLE template_names (
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    name          TEXT NOT NULL,
    last_version  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, name)
) STRICT;
