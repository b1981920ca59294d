//! The SQL store, written once for both databases: every statement, the
//! quota check and the fencing rule, over a [`Backend`] that supplies what
//! truly differs between SQLite and PostgreSQL (how writers take turns, how a
//! sandbox create locks out concurrent creates, how audit events are
//! committed, which error codes mean "unreachable", the schema).
//!
//! Statements are one text for both: placeholders are `$1`, `$2`, … (sqlx
//! binds SQLite's `$N` to the N-th argument, as PostgreSQL does), and types
//! are named with `CAST(… AS …)`, which both parse.

use std::future::Future;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Executor, Pool, Transaction};
use stacyvm_core::{
    Error, KeyId, Result, SandboxId, SandboxState, TemplateVersionId, TenantId, VolumeId, WorkerId,
    WorkerTokenId,
};
use time::OffsetDateTime;
use tokio::sync::MutexGuard;

use crate::common::{
    audit_columns, audit_from_row, check_not_newer, check_quota, db_error, from_micros, id_cursor,
    into_page, is_foreign_key_violation, is_unique_violation, key_columns, key_from_row,
    live_state, opt_micros, page_limit, quota_from_row, quota_of_tenant, quota_providers_json,
    sandbox_columns, sandbox_from_row, seq_cursor, stale_or_missing, template_columns,
    template_from_row, tenant_exists, tenant_from_row, tenant_not_found, to_micros,
    volume_from_row, worker_columns, worker_from_row, worker_token_from_row, Arg, Conditions,
    RowGet, SandboxParams, Schema, SqlDb, Statement, Usage, Value,
};
use crate::model::{
    ApiKey, AuditEvent, AuditFilter, CreateOutcome, Page, PageRequest, ProviderState, Quota,
    SandboxFilter, SandboxRecord, TemplateFilter, TemplateVersion, Tenant, VolumeRecord,
    WorkerRecord, WorkerState, WorkerToken,
};
use crate::Store;

/// What differs between the databases the [`SqlStore`] runs on.
pub trait Backend: Send + Sync + 'static {
    type Db: SqlDb;

    /// [`Store::kind`]: `sqlite` or `postgres`.
    const KIND: &'static str;

    /// The schema (DDL is written per dialect).
    const SCHEMA: Schema;

    /// Run first in the migrations' transaction so that processes opening
    /// one new database together apply each migration once; `None` where
    /// [`Backend::BEGIN_WRITE`] already keeps other writers out.
    const MIGRATIONS_LOCK: Option<&'static str>;

    /// Starts a write transaction.
    const BEGIN_WRITE: &'static str;

    /// A query returning the database's clock as microseconds since the
    /// epoch in a column `now`; `None` where the store is this process
    /// (SQLite), whose clock is the store's.
    const NOW: Option<&'static str>;

    /// The tenant's quota as `sandbox_create` reads it ([`quota_of_tenant!`]
    /// with `$1` the tenant), in a way that makes that tenant's concurrent
    /// creates take turns, so each sees every sandbox committed before it.
    const QUOTA_FOR_CREATE: &'static str;

    /// The condition "the sandbox's labels map the key bound at placeholder
    /// `key` to the value at `value`", matching the key literally.
    fn label_matches(key: &str, value: &str) -> String;

    /// Whether a database error code says the database cannot be reached
    /// (so the caller answers 503) rather than that it refused a statement.
    fn is_unreachable_code(code: &str) -> bool;

    /// Waits for this process's turn to write, where the database has one
    /// writer at a time; held until the write is committed.
    fn write_turn(&self) -> impl Future<Output = Option<MutexGuard<'_, ()>>> + Send;

    /// Appends an audit event; it is durable when this returns.
    fn audit_append(
        &self,
        pool: &Pool<Self::Db>,
        event: &AuditEvent,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// A row of `B`'s database.
type Row<B> = <<B as Backend>::Db as sqlx::Database>::Row;

/// The store over one [`Backend`]. Cheap to share behind an `Arc`.
pub struct SqlStore<B: Backend> {
    pool: Pool<B::Db>,
    backend: B,
}

/// A write transaction and, where writers take turns, this process's turn.
/// The transaction is dropped (and so rolled back if not committed) before
/// the turn passes on.
pub(crate) struct WriteTx<'a, B: Backend> {
    tx: Transaction<'static, B::Db>,
    _turn: Option<MutexGuard<'a, ()>>,
}

impl<B: Backend> WriteTx<'_, B> {
    /// Statements inside the transaction.
    fn on(&mut self) -> impl Executor<'_, Database = B::Db> {
        B::Db::on(&mut self.tx)
    }

    async fn commit(self, context: &str) -> Result<()> {
        self.tx
            .commit()
            .await
            .map_err(|e| db_error::<B>(context, e))
    }
}

/// Appends `event` with `on`; a duplicate id is a `Conflict`.
pub(crate) async fn audit_insert<'c, B: Backend>(
    on: impl Executor<'c, Database = B::Db>,
    event: &AuditEvent,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (id, ts, tenant_id, actor_key_id, actor_role, action, target,
            sandbox_id, outcome, status, request_id, source_ip, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .arg(event.id.as_str())
    .arg(to_micros(event.ts))
    .arg(event.tenant_id.as_ref().map(|t| t.as_str()))
    .arg(event.actor.key_id.as_ref().map(|k| k.as_str()))
    .arg(event.actor.role.map(|r| r.as_str()))
    .arg(event.action.as_str())
    .arg(event.target.as_deref())
    .arg(event.sandbox_id.as_deref())
    .arg(event.outcome.as_str())
    .arg(event.status)
    .arg(event.request_id.as_str())
    .arg(event.source_ip.as_deref())
    .arg(sqlx::types::Json(&event.detail))
    .execute(on)
    .await
    .map(|_| ())
    .map_err(|e| match e {
        e if is_unique_violation(&e) => {
            Error::Conflict(format!("audit event {} exists already", event.id))
        }
        e => db_error::<B>("appending an audit event", e),
    })
}

impl<B: Backend> SqlStore<B> {
    /// The store on `pool`, its schema brought up to date.
    pub(crate) async fn start(pool: Pool<B::Db>, backend: B) -> Result<Self> {
        let store = SqlStore { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    /// Statements on the pool.
    fn pool(&self) -> impl Executor<'_, Database = B::Db> {
        B::Db::on_pool(&self.pool)
    }

    async fn begin_write(&self) -> Result<WriteTx<'_, B>> {
        let turn = self.backend.write_turn().await;
        let tx = self
            .pool
            .begin_with(B::BEGIN_WRITE)
            .await
            .map_err(|e| db_error::<B>("starting a write transaction", e))?;
        Ok(WriteTx { tx, _turn: turn })
    }

    async fn connection(&self) -> Result<PoolConnection<B::Db>> {
        self.pool
            .acquire()
            .await
            .map_err(|e| db_error::<B>("acquiring a connection", e))
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.begin_write().await?;
        if let Some(lock) = B::MIGRATIONS_LOCK {
            sqlx::raw_sql(lock)
                .execute(tx.on())
                .await
                .map_err(|e| db_error::<B>("taking the migration lock", e))?;
        }
        sqlx::raw_sql(B::SCHEMA.bookkeeping)
            .execute(tx.on())
            .await
            .map_err(|e| db_error::<B>("creating schema_migrations", e))?;
        let rows = sqlx::query("SELECT version FROM schema_migrations")
            .fetch_all(tx.on())
            .await
            .map_err(|e| db_error::<B>("reading schema_migrations", e))?;
        let applied = rows
            .iter()
            .map(|r| r.int("version"))
            .collect::<Result<Vec<i64>>>()?;
        check_not_newer(&applied, B::SCHEMA.migrations)?;
        for m in B::SCHEMA
            .migrations
            .iter()
            .filter(|m| !applied.contains(&m.version))
        {
            sqlx::raw_sql(m.sql).execute(tx.on()).await.map_err(|e| {
                db_error::<B>(&format!("applying migration {} ({})", m.version, m.name), e)
            })?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .arg(m.version)
            .arg(m.name)
            .arg(to_micros(stacyvm_core::now()))
            .execute(tx.on())
            .await
            .map_err(|e| db_error::<B>("recording a migration", e))?;
            tracing::info!(
                version = m.version,
                name = m.name,
                "applied store migration"
            );
        }
        tx.commit("committing migrations").await
    }

    /// The update behind `sandbox_update` and `sandbox_update_from`: guarded
    /// by the fencing token and, with `from`, by the stored state. The guard
    /// and the write are one statement, so they are atomic; the read after a
    /// refusal only explains it.
    async fn sandbox_write(&self, rec: &SandboxRecord, from: Option<SandboxState>) -> Result<bool> {
        let _turn = self.backend.write_turn().await;
        let mut conn = self.connection().await?;
        let p = SandboxParams::new(rec);
        let done = sqlx::query(
            "UPDATE sandboxes SET state = $1, worker_id = $2, started_at = $3, expires_at = $4,
                destroyed_at = $5, failure_code = $6, failure_message = $7, lease_expires_at = $8,
                labels = $9
             WHERE id = $10 AND fencing_token = $11 AND (CAST($12 AS TEXT) IS NULL OR state = $12)",
        )
        .arg(p.state)
        .arg(p.worker_id)
        .arg(p.started_at)
        .arg(p.expires_at)
        .arg(p.destroyed_at)
        .arg(p.failure_code)
        .arg(p.failure_message)
        .arg(p.lease_expires_at)
        .arg(p.labels)
        .arg(p.id)
        .arg(p.fencing_token)
        .arg(from.map(SandboxState::as_str))
        .execute(B::Db::on(&mut conn))
        .await
        .map_err(|e| db_error::<B>("updating a sandbox", e))?;
        if B::Db::rows_affected(&done) > 0 {
            return Ok(true);
        }
        let current = sqlx::query("SELECT fencing_token FROM sandboxes WHERE id = $1")
            .arg(rec.id.as_str())
            .fetch_optional(B::Db::on(&mut conn))
            .await
            .map_err(|e| db_error::<B>("reading a fencing token", e))?
            .map(|row| row.int("fencing_token"))
            .transpose()?;
        if from.is_some() && current == Some(rec.fencing_token) {
            // Same holder, but the state moved on: not an error.
            return Ok(false);
        }
        Err(stale_or_missing(rec, current))
    }

    /// The row `sql` finds for `key` (bound to `$1`), read by `read`.
    async fn find<T>(
        &self,
        context: &str,
        sql: &'static str,
        key: &str,
        read: impl Fn(&Row<B>) -> Result<T>,
    ) -> Result<Option<T>> {
        let row = sqlx::query(sql)
            .arg(key)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| db_error::<B>(context, e))?;
        row.as_ref().map(read).transpose()
    }

    /// A page of `select` under the conditions `c`, in `order_by` order,
    /// `read` giving each item and its cursor.
    async fn page_where<T>(
        &self,
        context: &str,
        select: &str,
        order_by: &str,
        mut c: Conditions,
        limit: i64,
        read: impl Fn(&Row<B>) -> Result<(String, T)>,
    ) -> Result<Page<T>> {
        let where_sql = c.where_sql();
        let p = c.param(Value::Int(limit + 1));
        let sql = format!("{select}{where_sql} ORDER BY {order_by} LIMIT {p}");
        let rows = bind_values(sqlx::query(AssertSqlSafe(sql)), c.args)
            .fetch_all(self.pool())
            .await
            .map_err(|e| db_error::<B>(context, e))?;
        let items = rows.iter().map(read).collect::<Result<Vec<_>>>()?;
        Ok(into_page(items, limit))
    }

    /// Every row of `query`, read by `read`.
    async fn all<T>(
        &self,
        context: &str,
        query: Statement<'_, B::Db>,
        read: impl Fn(&Row<B>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let rows = query
            .fetch_all(self.pool())
            .await
            .map_err(|e| db_error::<B>(context, e))?;
        rows.iter().map(read).collect()
    }
}

fn bind_values<DB: SqlDb>(mut query: Statement<'_, DB>, values: Vec<Value>) -> Statement<'_, DB> {
    for value in values {
        query = match value {
            Value::Text(s) => query.arg(s),
            Value::Int(i) => query.arg(i),
        };
    }
    query
}

fn state_count(row: &impl RowGet) -> Result<(String, i64)> {
    Ok((row.text("state")?, row.int("n")?))
}

#[async_trait]
impl<B: Backend> Store for SqlStore<B> {
    fn kind(&self) -> &'static str {
        B::KIND
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(self.pool())
            .await
            .map(|_| ())
            .map_err(|e| db_error::<B>("pinging the store", e))
    }

    // --- tenants and quotas ---------------------------------------------

    async fn tenant_create(&self, tenant: &Tenant) -> Result<()> {
        let _turn = self.backend.write_turn().await;
        let result = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .arg(tenant.id.as_str())
            .arg(tenant.name.as_str())
            .arg(to_micros(tenant.created_at))
            .execute(self.pool())
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(tenant_exists(tenant, &e)),
            Err(e) => Err(db_error::<B>("creating a tenant", e)),
        }
    }

    async fn tenant_get(&self, id: &TenantId) -> Result<Option<Tenant>> {
        self.find(
            "reading a tenant",
            "SELECT id, name, created_at FROM tenants WHERE id = $1",
            id.as_str(),
            tenant_from_row,
        )
        .await
    }

    async fn tenant_list(&self, page: &PageRequest) -> Result<Page<Tenant>> {
        let limit = page_limit(page);
        let mut c = Conditions::default();
        if let Some(cursor) = id_cursor(page, TenantId::parse)? {
            c.and_is("id >", Value::Text(cursor));
        }
        self.page_where(
            "listing tenants",
            "SELECT id, name, created_at FROM tenants",
            "id",
            c,
            limit,
            |r| tenant_from_row(r).map(|t| (t.id.to_string(), t)),
        )
        .await
    }

    async fn quota_get(&self, tenant: &TenantId) -> Result<Quota> {
        self.find(
            "reading a quota",
            quota_of_tenant!(),
            tenant.as_str(),
            quota_from_row,
        )
        .await?
        .ok_or_else(|| tenant_not_found(tenant))
    }

    async fn quota_set(&self, tenant: &TenantId, quota: &Quota) -> Result<()> {
        let _turn = self.backend.write_turn().await;
        let result = sqlx::query(
            "INSERT INTO quotas (tenant_id, max_sandboxes, max_cpu, max_memory_mb, max_timeout_s,
                                 max_exec_per_minute, allowed_providers, max_concurrent_execs,
                                 max_volumes, max_volume_mb, max_templates)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (tenant_id) DO UPDATE SET
                max_sandboxes = excluded.max_sandboxes,
                max_cpu = excluded.max_cpu,
                max_memory_mb = excluded.max_memory_mb,
                max_timeout_s = excluded.max_timeout_s,
                max_exec_per_minute = excluded.max_exec_per_minute,
                allowed_providers = excluded.allowed_providers,
                max_concurrent_execs = excluded.max_concurrent_execs,
                max_volumes = excluded.max_volumes,
                max_volume_mb = excluded.max_volume_mb,
                max_templates = excluded.max_templates",
        )
        .arg(tenant.as_str())
        .arg(quota.max_sandboxes)
        .arg(quota.max_cpu)
        .arg(quota.max_memory_mb)
        .arg(quota.max_timeout_s)
        .arg(quota.max_exec_per_minute)
        .arg(quota_providers_json(quota)?)
        .arg(quota.max_concurrent_execs)
        .arg(quota.max_volumes)
        .arg(quota.max_volume_mb)
        .arg(quota.max_templates)
        .execute(self.pool())
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key_violation(&e) => Err(tenant_not_found(tenant)),
            Err(e) => Err(db_error::<B>("setting a quota", e)),
        }
    }

    // --- API keys -------------------------------------------------------

    async fn key_create(&self, key: &ApiKey) -> Result<()> {
        let _turn = self.backend.write_turn().await;
        let result = sqlx::query(concat!(
            "INSERT INTO api_keys (",
            key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .arg(key.id.as_str())
        .arg(key.tenant_id.as_str())
        .arg(key.role.as_str())
        .arg(key.name.as_str())
        .arg(key.key_hash.as_str())
        .arg(to_micros(key.created_at))
        .arg(opt_micros(key.revoked_at))
        .execute(self.pool())
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key_violation(&e) => Err(tenant_not_found(&key.tenant_id)),
            Err(e) if is_unique_violation(&e) => Err(Error::Conflict(format!(
                "API key {} or its hash exists already",
                key.id
            ))),
            Err(e) => Err(db_error::<B>("creating an API key", e)),
        }
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>> {
        self.find(
            "looking up an API key",
            concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE key_hash = $1"
            ),
            hash,
            key_from_row,
        )
        .await
    }

    async fn key_get(&self, id: &KeyId) -> Result<Option<ApiKey>> {
        self.find(
            "reading an API key",
            concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1"),
            id.as_str(),
            key_from_row,
        )
        .await
    }

    async fn key_list(
        &self,
        tenant: Option<&TenantId>,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>> {
        let limit = page_limit(page);
        let mut c = Conditions::default();
        if let Some(tenant) = tenant {
            c.and_is("tenant_id =", Value::Text(tenant.to_string()));
        }
        if let Some(cursor) = id_cursor(page, KeyId::parse)? {
            c.and_is("id >", Value::Text(cursor));
        }
        self.page_where(
            "listing API keys",
            concat!("SELECT ", key_columns!(), " FROM api_keys"),
            "id",
            c,
            limit,
            |r| key_from_row(r).map(|k| (k.id.to_string(), k)),
        )
        .await
    }

    async fn key_revoke(&self, id: &KeyId, at: OffsetDateTime) -> Result<bool> {
        let _turn = self.backend.write_turn().await;
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .arg(to_micros(at))
                .arg(id.as_str())
                .execute(self.pool())
                .await
                .map_err(|e| db_error::<B>("revoking an API key", e))?;
        Ok(B::Db::rows_affected(&done) > 0)
    }

    // --- sandboxes ------------------------------------------------------

    async fn sandbox_create(&self, rec: &SandboxRecord) -> Result<CreateOutcome> {
        let mut tx = self.begin_write().await?;
        let quota_row = sqlx::query(B::QUOTA_FOR_CREATE)
            .arg(rec.tenant_id.as_str())
            .fetch_optional(tx.on())
            .await
            .map_err(|e| db_error::<B>("reading the tenant's quota", e))?;
        let Some(quota_row) = quota_row else {
            return Err(tenant_not_found(&rec.tenant_id));
        };
        if let Some(key) = &rec.idempotency_key {
            let existing = sqlx::query(concat!(
                "SELECT ",
                sandbox_columns!(),
                " FROM sandboxes WHERE tenant_id = $1 AND idempotency_key = $2"
            ))
            .arg(rec.tenant_id.as_str())
            .arg(key.as_str())
            .fetch_optional(tx.on())
            .await
            .map_err(|e| db_error::<B>("looking up the idempotency key", e))?;
            if let Some(row) = existing {
                return Ok(CreateOutcome::Existing(sandbox_from_row(&row)?));
            }
        }
        let quota = quota_from_row(&quota_row)?;
        let usage_row = sqlx::query(concat!(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(cpu), 0) AS DOUBLE PRECISION) AS cpu,
                CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) AS memory_mb
             FROM sandboxes WHERE tenant_id = $1 AND ",
            live_state!()
        ))
        .arg(rec.tenant_id.as_str())
        .fetch_one(tx.on())
        .await
        .map_err(|e| db_error::<B>("counting the tenant's live sandboxes", e))?;
        let usage = Usage {
            sandboxes: usage_row.int("n")?,
            cpu: usage_row.real("cpu")?,
            memory_mb: usage_row.int("memory_mb")?,
        };
        check_quota(&quota, &usage, rec)?;
        let p = SandboxParams::new(rec);
        let inserted = sqlx::query(concat!(
            "INSERT INTO sandboxes (",
            sandbox_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                $17, $18, $19, $20, $21, $22, $23, $24) RETURNING ",
            sandbox_columns!()
        ))
        .arg(p.id)
        .arg(p.tenant_id)
        .arg(p.state)
        .arg(p.provider)
        .arg(p.worker_id)
        .arg(p.image)
        .arg(p.template)
        .arg(p.cpu)
        .arg(p.memory_mb)
        .arg(p.network)
        .arg(p.labels)
        .arg(p.env)
        .arg(p.workdir)
        .arg(p.timeout_s)
        .arg(p.created_at)
        .arg(p.started_at)
        .arg(p.expires_at)
        .arg(p.destroyed_at)
        .arg(p.failure_code)
        .arg(p.failure_message)
        .arg(p.lease_expires_at)
        .arg(p.fencing_token)
        .arg(p.idempotency_key)
        .arg(sqlx::types::Json(&p.egress_allow))
        .fetch_one(tx.on())
        .await;
        let row = match inserted {
            Ok(row) => row,
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::Conflict(format!(
                    "sandbox {} exists already",
                    rec.id
                )))
            }
            Err(e) => return Err(db_error::<B>("inserting a sandbox", e)),
        };
        let created = sandbox_from_row(&row)?;
        tx.commit("committing a sandbox").await?;
        Ok(CreateOutcome::Created(created))
    }

    async fn sandbox_get(&self, id: &SandboxId) -> Result<Option<SandboxRecord>> {
        self.find(
            "reading a sandbox",
            concat!(
                "SELECT ",
                sandbox_columns!(),
                " FROM sandboxes WHERE id = $1"
            ),
            id.as_str(),
            sandbox_from_row,
        )
        .await
    }

    async fn sandbox_list(&self, filter: &SandboxFilter) -> Result<Page<SandboxRecord>> {
        let limit = page_limit(&filter.page);
        let cursor = id_cursor(&filter.page, SandboxId::parse)?;
        let mut c = Conditions::default();
        if let Some(tenant) = &filter.tenant_id {
            c.and_is("tenant_id =", Value::Text(tenant.to_string()));
        }
        if let Some(state) = filter.state {
            c.and_is("state =", Value::Text(state.as_str().to_owned()));
        }
        if !filter.any_state.is_empty() {
            let params: Vec<String> = filter
                .any_state
                .iter()
                .map(|s| c.param(Value::Text(s.as_str().to_owned())))
                .collect();
            c.and(format!("state IN ({})", params.join(", ")));
        }
        for (key, value) in &filter.labels {
            let k = c.param(Value::Text(key.clone()));
            let v = c.param(Value::Text(value.clone()));
            c.and(B::label_matches(&k, &v));
        }
        if let Some(cursor) = cursor {
            let after = if filter.newest_first { "id <" } else { "id >" };
            c.and_is(after, Value::Text(cursor));
        }
        self.page_where(
            "listing sandboxes",
            concat!("SELECT ", sandbox_columns!(), " FROM sandboxes"),
            if filter.newest_first { "id DESC" } else { "id" },
            c,
            limit,
            |r| sandbox_from_row(r).map(|s| (s.id.to_string(), s)),
        )
        .await
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
        let _turn = self.backend.write_turn().await;
        let row = sqlx::query(concat!(
            "UPDATE sandboxes SET worker_id = $1, lease_expires_at = $2,
                fencing_token = fencing_token + 1
             WHERE id = $3 RETURNING ",
            sandbox_columns!()
        ))
        .arg(worker.as_str())
        .arg(to_micros(lease_until))
        .arg(id.as_str())
        .fetch_optional(self.pool())
        .await
        .map_err(|e| db_error::<B>("claiming a sandbox", e))?;
        match row {
            Some(row) => sandbox_from_row(&row),
            None => Err(Error::NotFound(format!("sandbox {id} not found"))),
        }
    }

    async fn sandbox_place(
        &self,
        id: &SandboxId,
        worker: &WorkerId,
        lease_until: OffsetDateTime,
    ) -> Result<SandboxRecord> {
        let mut tx = self.begin_write().await?;
        // A no-op update takes the worker's row lock (PostgreSQL), so the
        // placements onto one worker take turns and each counts the others.
        let row = sqlx::query(concat!(
            "UPDATE workers SET capacity = capacity WHERE id = $1 RETURNING ",
            worker_columns!()
        ))
        .arg(worker.as_str())
        .fetch_optional(tx.on())
        .await
        .map_err(|e| db_error::<B>("locking a worker", e))?;
        let Some(row) = row else {
            return Err(Error::NoCapacity(format!(
                "worker {worker} is not registered"
            )));
        };
        let w = worker_from_row(&row)?;
        if w.state != WorkerState::Ready {
            return Err(Error::NoCapacity(format!(
                "worker {} is {}",
                w.name_or_id(),
                w.state.as_str()
            )));
        }
        let this = sqlx::query("SELECT cpu, memory_mb FROM sandboxes WHERE id = $1")
            .arg(id.as_str())
            .fetch_optional(tx.on())
            .await
            .map_err(|e| db_error::<B>("reading a sandbox", e))?
            .ok_or_else(|| Error::NotFound(format!("sandbox {id} not found")))?;
        let (cpu, memory_mb) = (this.real("cpu")?, this.int("memory_mb")?);
        let usage = sqlx::query(concat!(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(cpu), 0) AS DOUBLE PRECISION) AS cpu,
                CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) AS memory_mb
             FROM sandboxes WHERE worker_id = $1 AND id <> $2 AND ",
            live_state!()
        ))
        .arg(worker.as_str())
        .arg(id.as_str())
        .fetch_one(tx.on())
        .await
        .map_err(|e| db_error::<B>("counting a worker's sandboxes", e))?;
        let (n, used_cpu, used_mb) = (usage.int("n")?, usage.real("cpu")?, usage.int("memory_mb")?);
        let full = |what: String| {
            Err(Error::NoCapacity(format!(
                "worker {} is full: {what}",
                w.name_or_id()
            )))
        };
        if n + 1 > w.capacity {
            return full(format!("{n} of {} sandboxes", w.capacity));
        }
        if let Some(max) = w.capacity_cpu {
            if used_cpu + cpu > max + 1e-9 {
                return full(format!("{used_cpu} of {max} CPUs in use, {cpu} asked"));
            }
        }
        if let Some(max) = w.capacity_memory_mb {
            if used_mb + memory_mb > max {
                return full(format!("{used_mb} of {max} MiB in use, {memory_mb} asked"));
            }
        }
        // A pending sandbox becomes `starting` in the same commit: on a
        // single writer every commit of a create is a turn the others wait
        // for. One a destroy moved on meanwhile keeps its state.
        let row = sqlx::query(concat!(
            "UPDATE sandboxes SET worker_id = $1, lease_expires_at = $2,
                fencing_token = fencing_token + 1,
                state = CASE WHEN state = 'pending' THEN 'starting' ELSE state END
             WHERE id = $3 RETURNING ",
            sandbox_columns!()
        ))
        .arg(worker.as_str())
        .arg(to_micros(lease_until))
        .arg(id.as_str())
        .fetch_one(tx.on())
        .await
        .map_err(|e| db_error::<B>("placing a sandbox", e))?;
        let placed = sandbox_from_row(&row)?;
        tx.commit("committing a placement").await?;
        Ok(placed)
    }

    async fn sandbox_lose_lapsed(
        &self,
        now: OffsetDateTime,
        spare: Option<&WorkerId>,
    ) -> Result<Vec<SandboxRecord>> {
        let _turn = self.backend.write_turn().await;
        let rows = sqlx::query(concat!(
            "UPDATE sandboxes SET state = 'lost', fencing_token = fencing_token + 1,
                destroyed_at = $1, failure_code = 'lost',
                failure_message = 'the worker holding it stopped renewing its lease'
             WHERE ",
            live_state!(),
            " AND worker_id IS NOT NULL AND lease_expires_at < $1
               AND (CAST($2 AS TEXT) IS NULL OR worker_id <> $2)
             RETURNING ",
            sandbox_columns!()
        ))
        .arg(to_micros(now))
        .arg(spare.map(|w| w.as_str()))
        .fetch_all(self.pool())
        .await
        .map_err(|e| db_error::<B>("marking sandboxes lost", e))?;
        rows.iter().map(sandbox_from_row).collect()
    }

    async fn lease_renew(&self, worker: &WorkerId, lease_until: OffsetDateTime) -> Result<u64> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query(concat!(
            "UPDATE sandboxes SET lease_expires_at = $1 WHERE worker_id = $2 AND ",
            live_state!()
        ))
        .arg(to_micros(lease_until))
        .arg(worker.as_str())
        .execute(self.pool())
        .await
        .map_err(|e| db_error::<B>("renewing leases", e))?;
        Ok(B::Db::rows_affected(&done))
    }

    async fn sandbox_list_live(&self) -> Result<Vec<SandboxRecord>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            sandbox_columns!(),
            " FROM sandboxes WHERE ",
            live_state!(),
            " ORDER BY id"
        ));
        self.all("listing live sandboxes", query, sandbox_from_row)
            .await
    }

    async fn sandbox_list_expired(&self, now: OffsetDateTime) -> Result<Vec<SandboxRecord>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            sandbox_columns!(),
            " FROM sandboxes WHERE expires_at IS NOT NULL AND expires_at <= $1 AND ",
            live_state!(),
            " ORDER BY id"
        ))
        .arg(to_micros(now));
        self.all("listing expired sandboxes", query, sandbox_from_row)
            .await
    }

    async fn sandbox_count_by_state(&self) -> Result<Vec<(String, i64)>> {
        let query =
            sqlx::query("SELECT state, COUNT(*) AS n FROM sandboxes GROUP BY state ORDER BY state");
        self.all("counting sandboxes", query, state_count).await
    }

    async fn sandbox_count_by_state_of(&self, tenant: &TenantId) -> Result<Vec<(String, i64)>> {
        let query = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM sandboxes WHERE tenant_id = $1
             GROUP BY state ORDER BY state",
        )
        .arg(tenant.as_str());
        self.all("counting a tenant's sandboxes", query, state_count)
            .await
    }

    // --- audit (append-only) -------------------------------------------

    async fn audit_append(&self, event: &AuditEvent) -> Result<()> {
        self.backend.audit_append(&self.pool, event).await
    }

    async fn audit_list(&self, filter: &AuditFilter) -> Result<Page<AuditEvent>> {
        let limit = page_limit(&filter.page);
        let cursor = seq_cursor(&filter.page)?;
        let mut c = Conditions::default();
        if let Some(tenant) = &filter.tenant_id {
            c.and_is("tenant_id =", Value::Text(tenant.to_string()));
        }
        if let Some(sandbox) = &filter.sandbox_id {
            c.and_is("sandbox_id =", Value::Text(sandbox.clone()));
        }
        if let Some(action) = &filter.action {
            c.and_is("action =", Value::Text(action.clone()));
        }
        if let Some(outcome) = filter.outcome {
            c.and_is("outcome =", Value::Text(outcome.as_str().to_owned()));
        }
        if let Some(since) = filter.since {
            c.and_is("ts >=", Value::Int(to_micros(since)));
        }
        if let Some(seq) = cursor {
            c.and_is("seq >", Value::Int(seq));
        }
        self.page_where(
            "listing audit events",
            concat!("SELECT ", audit_columns!(), " FROM audit_events"),
            "seq",
            c,
            limit,
            |r| audit_from_row(r).map(|(seq, ev)| (seq.to_string(), ev)),
        )
        .await
    }

    // --- workers --------------------------------------------------------

    async fn worker_upsert(&self, worker: &WorkerRecord) -> Result<()> {
        let _turn = self.backend.write_turn().await;
        sqlx::query(concat!(
            "INSERT INTO workers (",
            worker_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (id) DO UPDATE SET
                address = excluded.address,
                providers = excluded.providers,
                labels = excluded.labels,
                capacity = excluded.capacity,
                state = excluded.state,
                registered_at = excluded.registered_at,
                last_heartbeat = excluded.last_heartbeat,
                name = excluded.name,
                token_id = excluded.token_id,
                secret = excluded.secret,
                provider_health = excluded.provider_health,
                capacity_cpu = excluded.capacity_cpu,
                capacity_memory_mb = excluded.capacity_memory_mb"
        ))
        .arg(worker.id.as_str())
        .arg(worker.address.as_str())
        .arg(sqlx::types::Json(&worker.providers))
        .arg(sqlx::types::Json(&worker.labels))
        .arg(worker.capacity)
        .arg(worker.state.as_str())
        .arg(to_micros(worker.registered_at))
        .arg(to_micros(worker.last_heartbeat))
        .arg(worker.name.as_str())
        .arg(worker.token_id.as_ref().map(|t| t.as_str().to_owned()))
        .arg(worker.secret.clone())
        .arg(
            serde_json::to_string(&worker.provider_health)
                .map_err(|e| Error::internal("encoding provider health", e))?,
        )
        .arg(worker.capacity_cpu)
        .arg(worker.capacity_memory_mb)
        .execute(self.pool())
        .await
        .map(|_| ())
        .map_err(|e| db_error::<B>("registering a worker", e))
    }

    async fn worker_get(&self, id: &WorkerId) -> Result<Option<WorkerRecord>> {
        self.find(
            "reading a worker",
            concat!("SELECT ", worker_columns!(), " FROM workers WHERE id = $1"),
            id.as_str(),
            worker_from_row,
        )
        .await
    }

    async fn worker_list(&self) -> Result<Vec<WorkerRecord>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            worker_columns!(),
            " FROM workers ORDER BY id"
        ));
        self.all("listing workers", query, worker_from_row).await
    }

    async fn worker_set_state(&self, id: &WorkerId, state: WorkerState) -> Result<()> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query("UPDATE workers SET state = $1 WHERE id = $2")
            .arg(state.as_str())
            .arg(id.as_str())
            .execute(self.pool())
            .await
            .map_err(|e| db_error::<B>("setting a worker's state", e))?;
        if B::Db::rows_affected(&done) == 0 {
            return Err(Error::NotFound(format!("worker {id} not found")));
        }
        Ok(())
    }

    async fn worker_heartbeat(
        &self,
        id: &WorkerId,
        health: &[ProviderState],
        ready: bool,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Option<(WorkerRecord, Vec<SandboxRecord>)>> {
        let health = serde_json::to_string(health)
            .map_err(|e| Error::internal("encoding provider health", e))?;
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(concat!(
            "UPDATE workers SET last_heartbeat = $1, provider_health = $2,
                state = CASE WHEN state = 'down' AND $3 = 1 THEN 'ready' ELSE state END
             WHERE id = $4 RETURNING ",
            worker_columns!()
        ))
        .arg(to_micros(now))
        .arg(health)
        .arg(i64::from(ready))
        .arg(id.as_str())
        .fetch_optional(tx.on())
        .await
        .map_err(|e| db_error::<B>("recording a heartbeat", e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let worker = worker_from_row(&row)?;
        let rows = sqlx::query(concat!(
            "UPDATE sandboxes SET lease_expires_at = $1 WHERE worker_id = $2 AND ",
            live_state!(),
            " RETURNING ",
            sandbox_columns!()
        ))
        .arg(to_micros(lease_until))
        .arg(id.as_str())
        .fetch_all(tx.on())
        .await
        .map_err(|e| db_error::<B>("renewing leases", e))?;
        let held = rows
            .iter()
            .map(sandbox_from_row)
            .collect::<Result<Vec<_>>>()?;
        tx.commit("committing a heartbeat").await?;
        Ok(Some((worker, held)))
    }

    async fn worker_down_if_silent(&self, id: &WorkerId, before: OffsetDateTime) -> Result<bool> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query(
            "UPDATE workers SET state = 'down'
             WHERE id = $1 AND state <> 'down' AND last_heartbeat < $2",
        )
        .arg(id.as_str())
        .arg(to_micros(before))
        .execute(self.pool())
        .await
        .map_err(|e| db_error::<B>("marking a worker down", e))?;
        Ok(B::Db::rows_affected(&done) > 0)
    }

    async fn worker_down_by_token(&self, token: &WorkerTokenId) -> Result<u64> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query("UPDATE workers SET state = 'down' WHERE token_id = $1")
            .arg(token.as_str())
            .execute(self.pool())
            .await
            .map_err(|e| db_error::<B>("marking a token's workers down", e))?;
        Ok(B::Db::rows_affected(&done))
    }

    // --- worker tokens --------------------------------------------------

    async fn worker_token_create(&self, token: &WorkerToken) -> Result<()> {
        let _turn = self.backend.write_turn().await;
        let result = sqlx::query(
            "INSERT INTO worker_tokens (id, name, token_hash, created_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .arg(token.id.as_str())
        .arg(token.name.as_str())
        .arg(token.token_hash.as_str())
        .arg(to_micros(token.created_at))
        .arg(opt_micros(token.revoked_at))
        .execute(self.pool())
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(Error::Conflict(format!(
                "worker token {} or its hash exists already",
                token.id
            ))),
            Err(e) => Err(db_error::<B>("creating a worker token", e)),
        }
    }

    async fn worker_token_by_hash(&self, hash: &str) -> Result<Option<WorkerToken>> {
        self.find(
            "looking up a worker token",
            "SELECT id, name, token_hash, created_at, revoked_at FROM worker_tokens
             WHERE token_hash = $1",
            hash,
            worker_token_from_row,
        )
        .await
    }

    async fn worker_token_get(&self, id: &WorkerTokenId) -> Result<Option<WorkerToken>> {
        self.find(
            "reading a worker token",
            "SELECT id, name, token_hash, created_at, revoked_at FROM worker_tokens WHERE id = $1",
            id.as_str(),
            worker_token_from_row,
        )
        .await
    }

    async fn worker_token_list(&self) -> Result<Vec<WorkerToken>> {
        let query = sqlx::query(
            "SELECT id, name, token_hash, created_at, revoked_at FROM worker_tokens ORDER BY id",
        );
        self.all("listing worker tokens", query, worker_token_from_row)
            .await
    }

    async fn worker_token_revoke(&self, id: &WorkerTokenId, at: OffsetDateTime) -> Result<bool> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query(
            "UPDATE worker_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2",
        )
        .arg(to_micros(at))
        .arg(id.as_str())
        .execute(self.pool())
        .await
        .map_err(|e| db_error::<B>("revoking a worker token", e))?;
        Ok(B::Db::rows_affected(&done) > 0)
    }

    // --- volumes --------------------------------------------------------

    async fn volume_create(&self, volume: &VolumeRecord) -> Result<()> {
        let mut tx = self.begin_write().await?;
        // Read as sandbox creates read it, so that one tenant's concurrent
        // creates take turns and each sees the volumes committed before it.
        let quota_row = sqlx::query(B::QUOTA_FOR_CREATE)
            .arg(volume.tenant_id.as_str())
            .fetch_optional(tx.on())
            .await
            .map_err(|e| db_error::<B>("reading the tenant's quota", e))?;
        let Some(quota_row) = quota_row else {
            return Err(tenant_not_found(&volume.tenant_id));
        };
        let quota = quota_from_row(&quota_row)?;
        let usage = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(size_mb), 0) AS BIGINT) AS mb
             FROM volumes WHERE tenant_id = $1",
        )
        .arg(volume.tenant_id.as_str())
        .fetch_one(tx.on())
        .await
        .map_err(|e| db_error::<B>("counting the tenant's volumes", e))?;
        let (count, mb) = (usage.int("n")?, usage.int("mb")?);
        if let Some(max) = quota.max_volumes {
            if count + 1 > max {
                return Err(Error::QuotaExceeded(format!(
                    "quota exceeded: max_volumes is {max} and the tenant has {count} volumes"
                )));
            }
        }
        if let Some(max) = quota.max_volume_mb {
            if mb + volume.size_mb > max {
                return Err(Error::QuotaExceeded(format!(
                    "quota exceeded: max_volume_mb is {max}, the tenant's volumes hold {mb} \
                     and {} was asked",
                    volume.size_mb
                )));
            }
        }
        let result = sqlx::query(
            "INSERT INTO volumes (id, tenant_id, name, size_mb, created_at, worker_id)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .arg(volume.id.as_str())
        .arg(volume.tenant_id.as_str())
        .arg(volume.name.as_str())
        .arg(volume.size_mb)
        .arg(to_micros(volume.created_at))
        .arg(volume.worker_id.as_ref().map(|w| w.as_str().to_owned()))
        .execute(tx.on())
        .await;
        match result {
            Ok(_) => tx.commit("creating a volume").await,
            Err(e) if is_unique_violation(&e) => Err(Error::Conflict(format!(
                "a volume named {:?} exists already",
                volume.name
            ))),
            Err(e) => Err(db_error::<B>("creating a volume", e)),
        }
    }

    async fn volume_get(&self, tenant: &TenantId, name: &str) -> Result<Option<VolumeRecord>> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, size_mb, created_at, worker_id FROM volumes
             WHERE tenant_id = $1 AND name = $2",
        )
        .arg(tenant.as_str())
        .arg(name)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| db_error::<B>("reading a volume", e))?;
        row.map(|r| volume_from_row(&r)).transpose()
    }

    async fn volume_list(&self, tenant: Option<&TenantId>) -> Result<Vec<VolumeRecord>> {
        let query = match tenant {
            Some(t) => sqlx::query(
                "SELECT id, tenant_id, name, size_mb, created_at, worker_id FROM volumes
                 WHERE tenant_id = $1 ORDER BY id",
            )
            .arg(t.as_str()),
            None => sqlx::query(
                "SELECT id, tenant_id, name, size_mb, created_at, worker_id FROM volumes ORDER BY id",
            ),
        };
        self.all("listing volumes", query, volume_from_row).await
    }

    async fn volume_attach(
        &self,
        sandbox: &SandboxId,
        volume_id: &VolumeId,
        path: &str,
        read_only: bool,
    ) -> Result<()> {
        let _turn = self.backend.write_turn().await;
        let result = sqlx::query(
            "INSERT INTO sandbox_volumes (sandbox_id, volume_id, path, read_only)
             VALUES ($1, $2, $3, $4)",
        )
        .arg(sandbox.as_str())
        .arg(volume_id.as_str())
        .arg(path)
        .arg(i64::from(read_only))
        .execute(self.pool())
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key_violation(&e) => {
                Err(Error::NotFound(format!("volume {volume_id} was deleted")))
            }
            Err(e) if is_unique_violation(&e) => Err(Error::InvalidRequest(format!(
                "volume {volume_id} is mounted twice in one sandbox"
            ))),
            Err(e) => Err(db_error::<B>("attaching a volume", e)),
        }
    }

    async fn volume_users(&self, volume_id: &VolumeId) -> Result<Vec<SandboxId>> {
        let query = sqlx::query(concat!(
            "SELECT sv.sandbox_id AS id FROM sandbox_volumes sv
             JOIN sandboxes ON sandboxes.id = sv.sandbox_id
             WHERE sv.volume_id = $1 AND sandboxes.",
            live_state!(),
            " ORDER BY sv.sandbox_id"
        ))
        .arg(volume_id.as_str());
        self.all("listing a volume's sandboxes", query, |r| {
            Ok(SandboxId::from_trusted(r.text("id")?))
        })
        .await
    }

    async fn volume_delete(&self, volume_id: &VolumeId) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let user = sqlx::query(concat!(
            "SELECT sv.sandbox_id AS id FROM sandbox_volumes sv
             JOIN sandboxes ON sandboxes.id = sv.sandbox_id
             WHERE sv.volume_id = $1 AND sandboxes.",
            live_state!(),
            " ORDER BY sv.sandbox_id LIMIT 1"
        ))
        .arg(volume_id.as_str())
        .fetch_optional(tx.on())
        .await
        .map_err(|e| db_error::<B>("checking a volume's sandboxes", e))?;
        if let Some(row) = user {
            return Err(Error::Conflict(format!(
                "the volume is attached to sandbox {}, which is not destroyed",
                row.text("id")?
            )));
        }
        sqlx::query("DELETE FROM sandbox_volumes WHERE volume_id = $1")
            .arg(volume_id.as_str())
            .execute(tx.on())
            .await
            .map_err(|e| db_error::<B>("deleting a volume's attachments", e))?;
        let done = sqlx::query("DELETE FROM volumes WHERE id = $1")
            .arg(volume_id.as_str())
            .execute(tx.on())
            .await
            .map_err(|e| db_error::<B>("deleting a volume", e))?;
        let deleted = B::Db::rows_affected(&done) > 0;
        tx.commit("deleting a volume").await?;
        Ok(deleted)
    }

    // --- templates ------------------------------------------------------

    async fn template_version_create(&self, v: &TemplateVersion) -> Result<TemplateVersion> {
        let mut tx = self.begin_write().await?;
        // Read as sandbox creates read it: one tenant's concurrent builds
        // take turns, so two never get the same number and two new names
        // cannot both take the last free template.
        let quota_row = sqlx::query(B::QUOTA_FOR_CREATE)
            .arg(v.tenant_id.as_str())
            .fetch_optional(tx.on())
            .await
            .map_err(|e| db_error::<B>("reading the tenant", e))?;
        let Some(quota_row) = quota_row else {
            return Err(tenant_not_found(&v.tenant_id));
        };
        if let Some(max) = quota_from_row(&quota_row)?.max_templates {
            // A new version of a template the tenant keeps is no new
            // template; a deleted one no longer counts.
            let usage = sqlx::query(
                "SELECT COUNT(DISTINCT CASE WHEN name <> $2 THEN name END) AS others,
                        COUNT(CASE WHEN name = $2 THEN 1 END) AS kept
                 FROM template_versions WHERE tenant_id = $1 AND deleted_at IS NULL",
            )
            .arg(v.tenant_id.as_str())
            .arg(v.name.as_str())
            .fetch_one(tx.on())
            .await
            .map_err(|e| db_error::<B>("counting the tenant's templates", e))?;
            let (names, kept) = (usage.int("others")?, usage.int("kept")?);
            if kept == 0 && names + 1 > max {
                return Err(Error::QuotaExceeded(format!(
                    "quota exceeded: max_templates is {max} and the tenant has {names} \
                     templates; delete one or build a new version of an existing one"
                )));
            }
        }
        let version = sqlx::query(
            "INSERT INTO template_names (tenant_id, name, last_version) VALUES ($1, $2, 1)
             ON CONFLICT (tenant_id, name)
             DO UPDATE SET last_version = template_names.last_version + 1
             RETURNING last_version",
        )
        .arg(v.tenant_id.as_str())
        .arg(v.name.as_str())
        .fetch_one(tx.on())
        .await
        .map_err(|e| db_error::<B>("numbering a template version", e))?
        .int("last_version")?;
        let mut v = v.clone();
        v.version = version;
        v.image = format!("{}{}", v.image, v.version);
        let spec = serde_json::to_string(&v.spec)
            .map_err(|e| Error::internal("encoding a template spec", e))?;
        let result = sqlx::query(concat!(
            "INSERT INTO template_versions (",
            template_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .arg(v.id.as_str())
        .arg(v.tenant_id.as_str())
        .arg(v.name.as_str())
        .arg(v.version)
        .arg(v.state.as_str())
        .arg(v.image.as_str())
        .arg(spec)
        .arg(v.failure.as_deref())
        .arg(v.log.as_str())
        .arg(to_micros(v.created_at))
        .arg(opt_micros(v.built_at))
        .arg(to_micros(v.heartbeat_at))
        .arg(opt_micros(v.deleted_at))
        .execute(tx.on())
        .await;
        match result {
            Ok(_) => {
                tx.commit("creating a template version").await?;
                Ok(v)
            }
            Err(e) if is_unique_violation(&e) => Err(Error::Conflict(format!(
                "template {:?} version {} exists already",
                v.name, v.version
            ))),
            Err(e) => Err(db_error::<B>("creating a template version", e)),
        }
    }

    async fn template_version_get(
        &self,
        id: &TemplateVersionId,
    ) -> Result<Option<TemplateVersion>> {
        self.find(
            "reading a template version",
            concat!(
                "SELECT ",
                template_columns!(),
                " FROM template_versions WHERE id = $1"
            ),
            id.as_str(),
            template_from_row,
        )
        .await
    }

    async fn template_version_list(&self, f: &TemplateFilter) -> Result<Vec<TemplateVersion>> {
        let mut c = Conditions::default();
        if !f.tenants.is_empty() {
            let params = f
                .tenants
                .iter()
                .map(|t| c.param(Value::Text(t.to_string())))
                .collect::<Vec<_>>();
            c.and(format!("tenant_id IN ({})", params.join(", ")));
        }
        if let Some(name) = &f.name {
            c.and_is("name =", Value::Text(name.clone()));
        }
        if let Some(state) = f.state {
            c.and_is("state =", Value::Text(state.as_str().to_owned()));
        }
        if !f.deleted {
            c.and("deleted_at IS NULL".to_owned());
        }
        let sql = format!(
            concat!(
                "SELECT ",
                template_columns!(),
                " FROM template_versions{} ORDER BY created_at, id"
            ),
            c.where_sql()
        );
        let query = bind_values(sqlx::query(AssertSqlSafe(sql)), c.args);
        self.all("listing template versions", query, template_from_row)
            .await
    }

    async fn template_log_append(
        &self,
        id: &TemplateVersionId,
        text: &str,
        at: OffsetDateTime,
    ) -> Result<bool> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query(
            "UPDATE template_versions SET log = log || $1, heartbeat_at = $2
             WHERE id = $3 AND state = 'building' AND deleted_at IS NULL",
        )
        .arg(text)
        .arg(to_micros(at))
        .arg(id.as_str())
        .execute(self.pool())
        .await
        .map_err(|e| db_error::<B>("appending to a build log", e))?;
        Ok(B::Db::rows_affected(&done) > 0)
    }

    async fn template_build_finish(&self, v: &TemplateVersion) -> Result<bool> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query(
            "UPDATE template_versions SET state = $1, failure = $2, built_at = $3,
                heartbeat_at = $4
             WHERE id = $5 AND state = 'building' AND deleted_at IS NULL",
        )
        .arg(v.state.as_str())
        .arg(v.failure.as_deref())
        .arg(opt_micros(v.built_at))
        .arg(to_micros(v.heartbeat_at))
        .arg(v.id.as_str())
        .execute(self.pool())
        .await
        .map_err(|e| db_error::<B>("finishing a template build", e))?;
        Ok(B::Db::rows_affected(&done) > 0)
    }

    async fn template_delete(
        &self,
        tenant: &TenantId,
        name: &str,
        at: OffsetDateTime,
    ) -> Result<Vec<TemplateVersion>> {
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            template_columns!(),
            " FROM template_versions
             WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL ORDER BY version"
        ))
        .arg(tenant.as_str())
        .arg(name)
        .fetch_all(tx.on())
        .await
        .map_err(|e| db_error::<B>("reading a template's versions", e))?;
        let mut versions = rows
            .iter()
            .map(template_from_row)
            .collect::<Result<Vec<_>>>()?;
        sqlx::query(
            "UPDATE template_versions SET deleted_at = $1
             WHERE tenant_id = $2 AND name = $3 AND deleted_at IS NULL",
        )
        .arg(to_micros(at))
        .arg(tenant.as_str())
        .arg(name)
        .execute(tx.on())
        .await
        .map_err(|e| db_error::<B>("deleting a template", e))?;
        tx.commit("deleting a template").await?;
        for v in &mut versions {
            v.deleted_at = Some(at);
        }
        Ok(versions)
    }

    async fn template_version_purge(&self, id: &TemplateVersionId) -> Result<bool> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query("DELETE FROM template_versions WHERE id = $1")
            .arg(id.as_str())
            .execute(self.pool())
            .await
            .map_err(|e| db_error::<B>("removing a template version", e))?;
        Ok(B::Db::rows_affected(&done) > 0)
    }

    // --- time and leadership -------------------------------------------

    async fn now(&self) -> Result<OffsetDateTime> {
        let Some(sql) = B::NOW else {
            return Ok(stacyvm_core::now());
        };
        let micros: i64 = sqlx::query(sql)
            .fetch_one(self.pool())
            .await
            .map_err(|e| db_error::<B>("reading the store's clock", e))
            .and_then(|row| row.int("now"))?;
        from_micros("now", micros)
    }

    async fn leader_acquire(
        &self,
        name: &str,
        holder: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool> {
        let _turn = self.backend.write_turn().await;
        let done = sqlx::query(
            "INSERT INTO leader_leases (name, holder, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                expires_at = excluded.expires_at
             WHERE leader_leases.holder = excluded.holder OR leader_leases.expires_at < $4",
        )
        .arg(name)
        .arg(holder)
        .arg(to_micros(until))
        .arg(to_micros(now))
        .execute(self.pool())
        .await
        .map_err(|e| db_error::<B>("taking a leader lease", e))?;
        Ok(B::Db::rows_affected(&done) > 0)
    }
}
