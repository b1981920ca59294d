//! The PostgreSQL backend, for clusters: several control-plane replicas share
//! one database, which is also their coordination point.
//!
//! Races are settled by row locks: a sandbox create locks its tenant's row
//! (`SELECT … FOR UPDATE`) before checking the idempotency key and the quota,
//! so concurrent creates for one tenant take turns while other tenants' go
//! ahead. Migrations run under an advisory lock, so replicas starting
//! together apply each one exactly once.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Postgres};
use stacyvm_core::{Error, KeyId, Result, SandboxId, SandboxState, TenantId, WorkerId};
use time::OffsetDateTime;

use crate::common::{
    audit_columns, audit_conditions, audit_from_row, bind_sandbox, check_not_newer, check_quota,
    db_error, id_cursor, into_page, is_foreign_key_violation, is_unique_violation, key_columns,
    key_from_row, live_state, opt_micros, page_limit, quota_from_row, quota_providers_json,
    sandbox_columns, sandbox_from_row, stale_or_missing, tenant_exists, tenant_from_row,
    tenant_not_found, to_micros, worker_columns, worker_from_row, Arg, Conditions, Dialect,
    Migration, RowGet, SandboxParams, Usage,
};
use crate::model::{
    ApiKey, AuditEvent, AuditFilter, CreateOutcome, Page, PageRequest, Quota, SandboxFilter,
    SandboxRecord, Tenant, WorkerRecord, WorkerState,
};
use crate::{Store, UNAVAILABLE_PREFIX};

const D: Dialect = Dialect::Postgres;

/// How long opening the store waits for the server to answer at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call waits for a pooled connection (or a new one) before the
/// store is reported unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const MAX_CONNECTIONS: u32 = 16;

/// Serialises migrations across every process sharing the database
/// (`pg_advisory_xact_lock` key; any constant unique to StacyVM).
const MIGRATION_LOCK_KEY: i64 = 0x5374_6163_7956_4d01;

/// The schema, in version order. A change is a new file in
/// `migrations/postgres/` appended here (with its twin for the other backend);
/// applied files are never edited.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "owner role and quota fields",
        sql: include_str!("../migrations/postgres/0002_owner_role_and_quota_fields.sql"),
    },
];

const QUOTA_OF_TENANT: &str =
    "SELECT q.max_sandboxes, q.max_cpu, q.max_memory_mb, q.max_timeout_s, q.max_exec_per_minute,
                    q.allowed_providers, q.max_concurrent_execs
     FROM tenants t LEFT JOIN quotas q ON q.tenant_id = t.id WHERE t.id = $1";

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// The update behind `sandbox_update` and `sandbox_update_from`:
    /// guarded by the fencing token and, with `from`, by the stored state.
    async fn sandbox_write(&self, rec: &SandboxRecord, from: Option<SandboxState>) -> Result<bool> {
        let p = SandboxParams::new(rec);
        // One statement: the token check and the write are atomic; the
        // follow-up read only explains a refusal.
        let done = sqlx::query(
            "UPDATE sandboxes SET state = $1, worker_id = $2, started_at = $3, expires_at = $4,
                destroyed_at = $5, failure_code = $6, failure_message = $7, lease_expires_at = $8,
                labels = $9
             WHERE id = $10 AND fencing_token = $11 AND ($12::text IS NULL OR state = $12)",
        )
        .bind(p.state)
        .bind(p.worker_id)
        .bind(p.started_at)
        .bind(p.expires_at)
        .bind(p.destroyed_at)
        .bind(p.failure_code)
        .bind(p.failure_message)
        .bind(p.lease_expires_at)
        .bind(p.labels)
        .bind(p.id)
        .bind(p.fencing_token)
        .bind(from.map(SandboxState::as_str))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(D, "updating a sandbox", e))?;
        if done.rows_affected() == 0 {
            let current: Option<i64> =
                sqlx::query_scalar("SELECT fencing_token FROM sandboxes WHERE id = $1")
                    .bind(rec.id.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| db_error(D, "reading a fencing token", e))?;
            if from.is_some() && current == Some(rec.fencing_token) {
                // Same holder, but the state moved on: not an error.
                return Ok(false);
            }
            return Err(stale_or_missing(rec, current));
        }
        Ok(true)
    }

    /// Connects to the database at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`)
    /// and brings its schema up to date. A server that cannot be reached is
    /// reported within [`CONNECT_TIMEOUT`], as unavailable.
    pub async fn open(url: &str) -> Result<PostgresStore> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::InvalidRequest(format!("invalid PostgreSQL URL: {e}")))?;
        let server = format!("{}:{}", options.get_host(), options.get_port());
        // One bounded attempt first: the pool would keep retrying a refused
        // connection until its acquire timeout, and a wrong URL should say so
        // at once.
        let probe = tokio::time::timeout(CONNECT_TIMEOUT, options.connect())
            .await
            .map_err(|_| {
                Error::Internal(format!(
                    "{UNAVAILABLE_PREFIX}PostgreSQL at {server} did not answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| db_error(D, &format!("connecting to PostgreSQL at {server}"), e))?;
        if let Err(e) = probe.close().await {
            tracing::debug!(error = %e, "closing the PostgreSQL probe connection");
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db_error(D, "starting migrations", e))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(D, "taking the migration lock", e))?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version     BIGINT PRIMARY KEY,
                name        TEXT NOT NULL,
                applied_at  BIGINT NOT NULL
            )",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(D, "creating schema_migrations", e))?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error(D, "reading schema_migrations", e))?;
        check_not_newer(&applied, MIGRATIONS)?;
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(|e| {
                db_error(
                    D,
                    &format!("applying migration {} ({})", m.version, m.name),
                    e,
                )
            })?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(m.version)
            .bind(m.name)
            .bind(to_micros(stacyvm_core::now()))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(D, "recording a migration", e))?;
            tracing::info!(
                version = m.version,
                name = m.name,
                "applied store migration"
            );
        }
        tx.commit()
            .await
            .map_err(|e| db_error(D, "committing migrations", e))
    }

    async fn sandbox_query(&self, context: &str, sql: &'static str) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query(sql)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(D, context, e))?;
        rows.iter().map(sandbox_from_row).collect()
    }
}

fn bind_args(
    mut query: Query<'_, Postgres, PgArguments>,
    args: Vec<Arg>,
) -> Query<'_, Postgres, PgArguments> {
    for arg in args {
        query = match arg {
            Arg::Text(s) => query.bind(s),
            Arg::Int(i) => query.bind(i),
        };
    }
    query
}

fn usage_from_row(row: &PgRow) -> Result<Usage> {
    Ok(Usage {
        sandboxes: row.int("n")?,
        cpu: row.real("cpu")?,
        memory_mb: row.int("memory_mb")?,
    })
}

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| db_error(D, "pinging the store", e))
    }

    // --- tenants and quotas ---------------------------------------------

    async fn tenant_create(&self, tenant: &Tenant) -> Result<()> {
        let result = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(tenant.id.as_str())
            .bind(&tenant.name)
            .bind(to_micros(tenant.created_at))
            .execute(&self.pool)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(tenant_exists(tenant, &e)),
            Err(e) => Err(db_error(D, "creating a tenant", e)),
        }
    }

    async fn tenant_get(&self, id: &TenantId) -> Result<Option<Tenant>> {
        let row = sqlx::query("SELECT id, name, created_at FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(D, "reading a tenant", e))?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn tenant_list(&self, page: &PageRequest) -> Result<Page<Tenant>> {
        let limit = page_limit(page);
        let cursor = id_cursor(page, TenantId::parse)?;
        let rows = sqlx::query(
            "SELECT id, name, created_at FROM tenants
             WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2",
        )
        .bind(cursor)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(D, "listing tenants", e))?;
        let items = rows
            .iter()
            .map(|r| tenant_from_row(r).map(|t| (t.id.to_string(), t)))
            .collect::<Result<Vec<_>>>()?;
        Ok(into_page(items, limit))
    }

    async fn quota_get(&self, tenant: &TenantId) -> Result<Quota> {
        let row = sqlx::query(QUOTA_OF_TENANT)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(D, "reading a quota", e))?;
        match row {
            Some(row) => quota_from_row(&row),
            None => Err(tenant_not_found(tenant)),
        }
    }

    async fn quota_set(&self, tenant: &TenantId, quota: &Quota) -> Result<()> {
        let result = sqlx::query(
            "INSERT INTO quotas (tenant_id, max_sandboxes, max_cpu, max_memory_mb, max_timeout_s, max_exec_per_minute,
                                 allowed_providers, max_concurrent_execs)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (tenant_id) DO UPDATE SET
                max_sandboxes = excluded.max_sandboxes,
                max_cpu = excluded.max_cpu,
                max_memory_mb = excluded.max_memory_mb,
                max_timeout_s = excluded.max_timeout_s,
                max_exec_per_minute = excluded.max_exec_per_minute,
                allowed_providers = excluded.allowed_providers,
                max_concurrent_execs = excluded.max_concurrent_execs",
        )
        .bind(tenant.as_str())
        .bind(quota.max_sandboxes)
        .bind(quota.max_cpu)
        .bind(quota.max_memory_mb)
        .bind(quota.max_timeout_s)
        .bind(quota.max_exec_per_minute)
        .bind(quota_providers_json(quota)?)
        .bind(quota.max_concurrent_execs)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key_violation(&e) => Err(tenant_not_found(tenant)),
            Err(e) => Err(db_error(D, "setting a quota", e)),
        }
    }

    // --- API keys -------------------------------------------------------

    async fn key_create(&self, key: &ApiKey) -> Result<()> {
        let result = sqlx::query(concat!(
            "INSERT INTO api_keys (",
            key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(key.id.as_str())
        .bind(key.tenant_id.as_str())
        .bind(key.role.as_str())
        .bind(&key.name)
        .bind(&key.key_hash)
        .bind(to_micros(key.created_at))
        .bind(opt_micros(key.revoked_at))
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key_violation(&e) => Err(tenant_not_found(&key.tenant_id)),
            Err(e) if is_unique_violation(&e) => Err(Error::Conflict(format!(
                "API key {} or its hash exists already",
                key.id
            ))),
            Err(e) => Err(db_error(D, "creating an API key", e)),
        }
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE key_hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error(D, "looking up an API key", e))?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn key_get(&self, id: &KeyId) -> Result<Option<ApiKey>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error(D, "reading an API key", e))?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn key_list(
        &self,
        tenant: Option<&TenantId>,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>> {
        let limit = page_limit(page);
        let cursor = id_cursor(page, KeyId::parse)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR id > $2)
              ORDER BY id LIMIT $3"
        ))
        .bind(tenant.map(|t| t.as_str()))
        .bind(cursor)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(D, "listing API keys", e))?;
        let items = rows
            .iter()
            .map(|r| key_from_row(r).map(|k| (k.id.to_string(), k)))
            .collect::<Result<Vec<_>>>()?;
        Ok(into_page(items, limit))
    }

    async fn key_revoke(&self, id: &KeyId, at: OffsetDateTime) -> Result<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(to_micros(at))
                .bind(id.as_str())
                .execute(&self.pool)
                .await
                .map_err(|e| db_error(D, "revoking an API key", e))?;
        Ok(done.rows_affected() > 0)
    }

    // --- sandboxes ------------------------------------------------------

    async fn sandbox_create(&self, rec: &SandboxRecord) -> Result<CreateOutcome> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db_error(D, "starting a sandbox create", e))?;
        // The tenant's row lock makes this tenant's creates take turns; the
        // checks below then see every sandbox committed before them.
        let quota_row = sqlx::query(
            "SELECT q.max_sandboxes, q.max_cpu, q.max_memory_mb, q.max_timeout_s, q.max_exec_per_minute,
                    q.allowed_providers, q.max_concurrent_execs
             FROM tenants t LEFT JOIN quotas q ON q.tenant_id = t.id WHERE t.id = $1
             FOR UPDATE OF t",
        )
        .bind(rec.tenant_id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error(D, "locking the tenant", e))?;
        let Some(quota_row) = quota_row else {
            return Err(tenant_not_found(&rec.tenant_id));
        };
        if let Some(key) = &rec.idempotency_key {
            let existing = sqlx::query(concat!(
                "SELECT ",
                sandbox_columns!(),
                " FROM sandboxes WHERE tenant_id = $1 AND idempotency_key = $2"
            ))
            .bind(rec.tenant_id.as_str())
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error(D, "looking up the idempotency key", e))?;
            if let Some(row) = existing {
                return Ok(CreateOutcome::Existing(sandbox_from_row(&row)?));
            }
        }
        let quota = quota_from_row(&quota_row)?;
        let usage_row = sqlx::query(concat!(
            "SELECT COUNT(*) AS n, COALESCE(SUM(cpu), 0)::float8 AS cpu,
                COALESCE(SUM(memory_mb), 0)::int8 AS memory_mb
             FROM sandboxes WHERE tenant_id = $1 AND ",
            live_state!()
        ))
        .bind(rec.tenant_id.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_error(D, "counting the tenant's live sandboxes", e))?;
        let usage = usage_from_row(&usage_row)?;
        check_quota(&quota, &usage, rec)?;
        let inserted = bind_sandbox!(
            sqlx::query(concat!(
                "INSERT INTO sandboxes (",
                sandbox_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                    $17, $18, $19, $20, $21, $22, $23) RETURNING ",
                sandbox_columns!()
            )),
            SandboxParams::new(rec)
        )
        .fetch_one(&mut *tx)
        .await;
        let row = match inserted {
            Ok(row) => row,
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::Conflict(format!(
                    "sandbox {} exists already",
                    rec.id
                )))
            }
            Err(e) => return Err(db_error(D, "inserting a sandbox", e)),
        };
        let created = sandbox_from_row(&row)?;
        tx.commit()
            .await
            .map_err(|e| db_error(D, "committing a sandbox", e))?;
        Ok(CreateOutcome::Created(created))
    }

    async fn sandbox_get(&self, id: &SandboxId) -> Result<Option<SandboxRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            sandbox_columns!(),
            " FROM sandboxes WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error(D, "reading a sandbox", e))?;
        row.as_ref().map(sandbox_from_row).transpose()
    }

    async fn sandbox_list(&self, filter: &SandboxFilter) -> Result<Page<SandboxRecord>> {
        let limit = page_limit(&filter.page);
        let cursor = id_cursor(&filter.page, SandboxId::parse)?;
        let mut c = Conditions::new(D);
        if let Some(tenant) = &filter.tenant_id {
            let p = c.param(Arg::Text(tenant.to_string()));
            c.and(format!("tenant_id = {p}"));
        }
        if let Some(state) = filter.state {
            let p = c.param(Arg::Text(state.as_str().to_owned()));
            c.and(format!("state = {p}"));
        }
        for (key, value) in &filter.labels {
            let k = c.param(Arg::Text(key.clone()));
            let v = c.param(Arg::Text(value.clone()));
            c.and(format!("labels ->> {k}::text = {v}::text"));
        }
        if let Some(cursor) = cursor {
            let p = c.param(Arg::Text(cursor));
            c.and(format!("id > {p}"));
        }
        let where_sql = c.where_sql();
        let p = c.param(Arg::Int(limit + 1));
        let sql = format!(
            "SELECT {} FROM sandboxes{where_sql} ORDER BY id LIMIT {p}",
            sandbox_columns!()
        );
        let rows = bind_args(sqlx::query(AssertSqlSafe(sql)), c.args)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(D, "listing sandboxes", e))?;
        let items = rows
            .iter()
            .map(|r| sandbox_from_row(r).map(|s| (s.id.to_string(), s)))
            .collect::<Result<Vec<_>>>()?;
        Ok(into_page(items, limit))
    }

    async fn sandbox_update(&self, rec: &SandboxRecord) -> Result<()> {
        self.sandbox_write(rec, None).await.map(|_| ())
    }

    async fn sandbox_update_from(&self, rec: &SandboxRecord, from: SandboxState) -> Result<bool> {
        self.sandbox_write(rec, Some(from)).await
    }

    async fn sandbox_claim(
        &self,
        id: &SandboxId,
        worker: &WorkerId,
        lease_until: OffsetDateTime,
    ) -> Result<SandboxRecord> {
        let row = sqlx::query(concat!(
            "UPDATE sandboxes SET worker_id = $1, lease_expires_at = $2, fencing_token = fencing_token + 1
             WHERE id = $3 RETURNING ",
            sandbox_columns!()
        ))
        .bind(worker.as_str())
        .bind(to_micros(lease_until))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error(D, "claiming a sandbox", e))?;
        match row {
            Some(row) => sandbox_from_row(&row),
            None => Err(Error::NotFound(format!("sandbox {id} not found"))),
        }
    }

    async fn lease_renew(&self, worker: &WorkerId, lease_until: OffsetDateTime) -> Result<u64> {
        let done = sqlx::query(concat!(
            "UPDATE sandboxes SET lease_expires_at = $1 WHERE worker_id = $2 AND ",
            live_state!()
        ))
        .bind(to_micros(lease_until))
        .bind(worker.as_str())
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(D, "renewing leases", e))?;
        Ok(done.rows_affected())
    }

    async fn sandbox_list_live(&self) -> Result<Vec<SandboxRecord>> {
        self.sandbox_query(
            "listing live sandboxes",
            concat!(
                "SELECT ",
                sandbox_columns!(),
                " FROM sandboxes WHERE ",
                live_state!(),
                " ORDER BY id"
            ),
        )
        .await
    }

    async fn sandbox_list_expired(&self, now: OffsetDateTime) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            sandbox_columns!(),
            " FROM sandboxes WHERE expires_at IS NOT NULL AND expires_at <= $1 AND ",
            live_state!(),
            " ORDER BY id"
        ))
        .bind(to_micros(now))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(D, "listing expired sandboxes", e))?;
        rows.iter().map(sandbox_from_row).collect()
    }

    async fn sandbox_count_by_state(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT state, COUNT(*) FROM sandboxes GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(D, "counting sandboxes", e))
    }

    async fn sandbox_count_by_state_of(&self, tenant: &TenantId) -> Result<Vec<(String, i64)>> {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT state, COUNT(*) FROM sandboxes WHERE tenant_id = $1 GROUP BY state ORDER BY state",
        )
        .bind(tenant.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(D, "counting a tenant's sandboxes", e))
    }

    // --- audit (append-only) -------------------------------------------

    async fn audit_append(&self, event: &AuditEvent) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_events (id, ts, tenant_id, actor_key_id, actor_role, action, target,
                sandbox_id, outcome, status, request_id, source_ip, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(event.id.as_str())
        .bind(to_micros(event.ts))
        .bind(event.tenant_id.as_ref().map(|t| t.as_str()))
        .bind(event.actor.key_id.as_ref().map(|k| k.as_str()))
        .bind(event.actor.role.map(|r| r.as_str()))
        .bind(&event.action)
        .bind(event.target.as_deref())
        .bind(event.sandbox_id.as_deref())
        .bind(event.outcome.as_str())
        .bind(event.status)
        .bind(&event.request_id)
        .bind(event.source_ip.as_deref())
        .bind(sqlx::types::Json(&event.detail))
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            e if is_unique_violation(&e) => {
                Error::Conflict(format!("audit event {} exists already", event.id))
            }
            e => db_error(D, "appending an audit event", e),
        })
    }

    async fn audit_list(&self, filter: &AuditFilter) -> Result<Page<AuditEvent>> {
        let limit = page_limit(&filter.page);
        let mut c = audit_conditions(D, filter)?;
        let where_sql = c.where_sql();
        let p = c.param(Arg::Int(limit + 1));
        let sql = format!(
            "SELECT {} FROM audit_events{where_sql} ORDER BY seq LIMIT {p}",
            audit_columns!()
        );
        let rows = bind_args(sqlx::query(AssertSqlSafe(sql)), c.args)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(D, "listing audit events", e))?;
        let items = rows
            .iter()
            .map(|r| audit_from_row(r).map(|(seq, ev)| (seq.to_string(), ev)))
            .collect::<Result<Vec<_>>>()?;
        Ok(into_page(items, limit))
    }

    // --- workers --------------------------------------------------------

    async fn worker_upsert(&self, worker: &WorkerRecord) -> Result<()> {
        sqlx::query(concat!(
            "INSERT INTO workers (",
            worker_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET
                address = excluded.address,
                providers = excluded.providers,
                labels = excluded.labels,
                capacity = excluded.capacity,
                state = excluded.state,
                registered_at = excluded.registered_at,
                last_heartbeat = excluded.last_heartbeat"
        ))
        .bind(worker.id.as_str())
        .bind(&worker.address)
        .bind(sqlx::types::Json(&worker.providers))
        .bind(sqlx::types::Json(&worker.labels))
        .bind(worker.capacity)
        .bind(worker.state.as_str())
        .bind(to_micros(worker.registered_at))
        .bind(to_micros(worker.last_heartbeat))
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(|e| db_error(D, "registering a worker", e))
    }

    async fn worker_get(&self, id: &WorkerId) -> Result<Option<WorkerRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            worker_columns!(),
            " FROM workers WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error(D, "reading a worker", e))?;
        row.as_ref().map(worker_from_row).transpose()
    }

    async fn worker_list(&self) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            worker_columns!(),
            " FROM workers ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(D, "listing workers", e))?;
        rows.iter().map(worker_from_row).collect()
    }

    async fn worker_set_state(&self, id: &WorkerId, state: WorkerState) -> Result<()> {
        let done = sqlx::query("UPDATE workers SET state = $1 WHERE id = $2")
            .bind(state.as_str())
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(D, "setting a worker's state", e))?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(format!("worker {id} not found")));
        }
        Ok(())
    }
}
