//! The pieces the SQL store is built from: the time and JSON representation,
//! what the store asks of a sqlx database ([`SqlDb`]), row decoding, paging,
//! the quota rule, migrations bookkeeping and the mapping of database errors
//! onto `stacyvm_core::Error`.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::query::Query;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;
use sqlx::{Database, Encode, Executor, IntoArguments, Pool, Postgres, Row, Sqlite, Type};
use stacyvm_core::{
    Error, EventId, KeyId, Network, Result, SandboxId, SandboxState, TemplateVersionId, TenantId,
    VolumeId, WorkerId, WorkerTokenId,
};
use time::OffsetDateTime;

use crate::model::{
    Actor, ApiKey, AuditEvent, Failure, Outcome, Page, PageRequest, Quota, Role, SandboxRecord,
    TemplateState, TemplateVersion, Tenant, VolumeRecord, WorkerRecord, WorkerState, WorkerToken,
};
use crate::sql::Backend;

/// The SQL condition for "not in a terminal state" (see
/// `SandboxState::is_terminal`; a unit test keeps the two in step).
macro_rules! live_state {
    () => {
        "state NOT IN ('destroyed', 'failed', 'lost')"
    };
}
pub(crate) use live_state;

/// The sandbox columns, in the order [`SandboxParams`] lists them.
macro_rules! sandbox_columns {
    () => {
        "id, tenant_id, state, provider, worker_id, image, template, cpu, memory_mb, network, \
         labels, env, workdir, timeout_s, created_at, started_at, expires_at, destroyed_at, \
         failure_code, failure_message, lease_expires_at, fencing_token, idempotency_key, \
         egress_allow"
    };
}
pub(crate) use sandbox_columns;

macro_rules! audit_columns {
    () => {
        "seq, id, ts, tenant_id, actor_key_id, actor_role, action, target, sandbox_id, outcome, \
         status, request_id, source_ip, detail"
    };
}
pub(crate) use audit_columns;

macro_rules! worker_columns {
    () => {
        "id, address, providers, labels, capacity, state, registered_at, last_heartbeat, name, \
         token_id, secret, provider_health, capacity_cpu, capacity_memory_mb"
    };
}
pub(crate) use worker_columns;

macro_rules! template_columns {
    () => {
        "id, tenant_id, name, version, state, image, spec, failure, log, created_at, built_at, \
         heartbeat_at, deleted_at"
    };
}
pub(crate) use template_columns;

macro_rules! key_columns {
    () => {
        "id, tenant_id, role, name, key_hash, created_at, revoked_at"
    };
}
pub(crate) use key_columns;

/// A tenant's quota: one row when the tenant exists (all limits NULL until
/// set), none when it does not.
macro_rules! quota_of_tenant {
    () => {
        "SELECT q.max_sandboxes, q.max_cpu, q.max_memory_mb, q.max_timeout_s, \
         q.max_exec_per_minute, q.allowed_providers, q.max_concurrent_execs, \
         q.max_volumes, q.max_volume_mb, q.max_templates \
         FROM tenants t LEFT JOIN quotas q ON q.tenant_id = t.id WHERE t.id = $1"
    };
}
pub(crate) use quota_of_tenant;

// --- time -----------------------------------------------------------------

/// Times are stored as microseconds since the Unix epoch (UTC) on both
/// backends: exact, totally ordered and cheap to compare. Sub-microsecond
/// digits are dropped (`stacyvm_core::now()` never has any).
pub(crate) fn to_micros(t: OffsetDateTime) -> i64 {
    let micros = t.unix_timestamp_nanos().div_euclid(1_000);
    // OffsetDateTime spans ±9999 years, about ±3.2e17 µs: well inside i64.
    i64::try_from(micros).expect("every OffsetDateTime fits in i64 microseconds")
}

pub(crate) fn opt_micros(t: Option<OffsetDateTime>) -> Option<i64> {
    t.map(to_micros)
}

pub(crate) fn from_micros(col: &str, micros: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .map_err(|e| corrupt(col, format!("{micros} is not a time: {e}")))
}

fn from_opt_micros(col: &str, micros: Option<i64>) -> Result<Option<OffsetDateTime>> {
    micros.map(|m| from_micros(col, m)).transpose()
}

// --- errors ---------------------------------------------------------------

fn corrupt(col: &str, why: impl std::fmt::Display) -> Error {
    Error::Internal(format!("unreadable stored value in column {col}: {why}"))
}

/// Whether the database could not be reached (rather than refusing a
/// statement): the caller should answer 503 and may retry.
fn is_unreachable<B: Backend>(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| B::is_unreachable_code(&c)),
        _ => false,
    }
}

/// Turns a database error into an error saying what was being done:
/// `Unavailable` when the database cannot be reached, `Internal` (with its
/// causes) otherwise.
pub(crate) fn db_error<B: Backend>(context: &str, err: sqlx::Error) -> Error {
    if is_unreachable::<B>(&err) {
        Error::Unavailable(format!(
            "the store is unavailable: {context}: {}",
            stacyvm_core::error::chain(&err)
        ))
    } else {
        Error::internal(context, err)
    }
}

pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

pub(crate) fn is_foreign_key_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

// --- rows -----------------------------------------------------------------

/// Typed column access shared by both databases' row types, with decoding
/// failures reported as `Internal` errors naming the column.
pub trait RowGet {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    fn int32(&self, col: &str) -> Result<i32>;
    fn real(&self, col: &str) -> Result<f64>;
    fn opt_real(&self, col: &str) -> Result<Option<f64>>;
    fn json<T: DeserializeOwned>(&self, col: &str) -> Result<T>;
}

// --- the sqlx databases ---------------------------------------------------

/// What the SQL store asks of a sqlx database: rows read through [`RowGet`],
/// every kind of value it binds, and statements run on a connection or on
/// the pool. These are supertraits so that code generic over an `SqlDb`
/// needs no bounds of its own (a trait's `where` clauses would have to be
/// repeated wherever it is used).
pub trait SqlDb:
    Database<Row: RowGet, Arguments: IntoArguments<Self>>
    + Binds<'static, i32>
    + Binds<'static, i64>
    + Binds<'static, Option<i64>>
    + Binds<'static, f64>
    + Binds<'static, Option<f64>>
    + Binds<'static, String>
    + Binds<'static, Option<String>>
    + for<'a> Binds<'a, &'a str>
    + for<'a> Binds<'a, Option<&'a str>>
    + for<'a> Binds<'a, Json<&'a BTreeMap<String, String>>>
    + for<'a> Binds<'a, Json<&'a Vec<String>>>
    + for<'a> Binds<'a, Json<&'a serde_json::Value>>
{
    /// Statements on one connection: a transaction's, or one from the pool.
    fn on(conn: &mut Self::Connection) -> impl Executor<'_, Database = Self>;
    /// Statements on the pool, each on whichever connection is free.
    fn on_pool(pool: &Pool<Self>) -> impl Executor<'_, Database = Self>;
    /// How many rows a statement changed.
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

/// A statement with its arguments, on database `DB`.
pub type Statement<'q, DB> = Query<'q, DB, <DB as Database>::Arguments>;

/// A `T` can be bound to this database's statements.
pub trait Binds<'e, T>: Database {
    fn bind_to(query: Statement<'_, Self>, value: T) -> Statement<'_, Self>;
}

impl<'e, DB: Database, T: Encode<'e, DB> + Type<DB>> Binds<'e, T> for DB {
    fn bind_to(query: Statement<'_, Self>, value: T) -> Statement<'_, Self> {
        query.bind(value)
    }
}

/// `query.arg(value)` is `query.bind(value)` for code generic over an
/// [`SqlDb`], where `bind`'s own bounds cannot be proven.
pub trait Arg<DB> {
    fn arg<'e, T>(self, value: T) -> Self
    where
        DB: Binds<'e, T>;
}

impl<DB: Database> Arg<DB> for Statement<'_, DB> {
    fn arg<'e, T>(self, value: T) -> Self
    where
        DB: Binds<'e, T>,
    {
        DB::bind_to(self, value)
    }
}

macro_rules! impl_sql_db {
    ($db:ty, $row:ty) => {
        impl SqlDb for $db {
            fn on(conn: &mut Self::Connection) -> impl Executor<'_, Database = Self> {
                conn
            }
            fn on_pool(pool: &Pool<Self>) -> impl Executor<'_, Database = Self> {
                pool
            }
            fn rows_affected(done: &Self::QueryResult) -> u64 {
                done.rows_affected()
            }
        }

        impl RowGet for $row {
            fn text(&self, col: &str) -> Result<String> {
                self.try_get(col).map_err(|e| corrupt(col, e))
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>> {
                self.try_get(col).map_err(|e| corrupt(col, e))
            }
            fn int(&self, col: &str) -> Result<i64> {
                self.try_get(col).map_err(|e| corrupt(col, e))
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>> {
                self.try_get(col).map_err(|e| corrupt(col, e))
            }
            fn int32(&self, col: &str) -> Result<i32> {
                self.try_get(col).map_err(|e| corrupt(col, e))
            }
            fn real(&self, col: &str) -> Result<f64> {
                self.try_get(col).map_err(|e| corrupt(col, e))
            }
            fn opt_real(&self, col: &str) -> Result<Option<f64>> {
                self.try_get(col).map_err(|e| corrupt(col, e))
            }
            fn json<T: DeserializeOwned>(&self, col: &str) -> Result<T> {
                self.try_get::<Json<T>, _>(col)
                    .map(|j| j.0)
                    .map_err(|e| corrupt(col, e))
            }
        }
    };
}
impl_sql_db!(Sqlite, SqliteRow);
impl_sql_db!(Postgres, PgRow);

fn time_col(row: &impl RowGet, col: &str) -> Result<OffsetDateTime> {
    from_micros(col, row.int(col)?)
}

fn opt_time_col(row: &impl RowGet, col: &str) -> Result<Option<OffsetDateTime>> {
    from_opt_micros(col, row.opt_int(col)?)
}

fn parsed<T>(col: &str, value: String, parse: impl FnOnce(&str) -> Option<T>) -> Result<T> {
    parse(&value).ok_or_else(|| corrupt(col, format!("unknown value {value:?}")))
}

pub(crate) fn tenant_from_row(row: &impl RowGet) -> Result<Tenant> {
    Ok(Tenant {
        id: TenantId::from_trusted(row.text("id")?),
        name: row.text("name")?,
        created_at: time_col(row, "created_at")?,
    })
}

/// Reads the quota columns of a `tenants LEFT JOIN quotas` row.
pub(crate) fn quota_from_row(row: &impl RowGet) -> Result<Quota> {
    Ok(Quota {
        max_sandboxes: row.opt_int("max_sandboxes")?,
        max_cpu: row.opt_real("max_cpu")?,
        max_memory_mb: row.opt_int("max_memory_mb")?,
        max_timeout_s: row.opt_int("max_timeout_s")?,
        max_exec_per_minute: row.opt_int("max_exec_per_minute")?,
        allowed_providers: row
            .opt_text("allowed_providers")?
            .map(|j| serde_json::from_str(&j).map_err(|e| corrupt("allowed_providers", e)))
            .transpose()?,
        max_concurrent_execs: row.opt_int("max_concurrent_execs")?,
        max_volumes: row.opt_int("max_volumes")?,
        max_volume_mb: row.opt_int("max_volume_mb")?,
        max_templates: row.opt_int("max_templates")?,
    })
}

/// The `allowed_providers` column of a quota: a JSON array, or NULL.
pub(crate) fn quota_providers_json(quota: &Quota) -> Result<Option<String>> {
    quota
        .allowed_providers
        .as_ref()
        .map(|p| {
            serde_json::to_string(p).map_err(|e| Error::internal("encoding allowed_providers", e))
        })
        .transpose()
}

pub(crate) fn key_from_row(row: &impl RowGet) -> Result<ApiKey> {
    Ok(ApiKey {
        id: KeyId::from_trusted(row.text("id")?),
        tenant_id: TenantId::from_trusted(row.text("tenant_id")?),
        role: parsed("role", row.text("role")?, Role::parse)?,
        name: row.text("name")?,
        key_hash: row.text("key_hash")?,
        created_at: time_col(row, "created_at")?,
        revoked_at: opt_time_col(row, "revoked_at")?,
    })
}

pub(crate) fn sandbox_from_row(row: &impl RowGet) -> Result<SandboxRecord> {
    let failure = match (
        row.opt_text("failure_code")?,
        row.opt_text("failure_message")?,
    ) {
        (Some(code), message) => Some(Failure {
            code,
            message: message.unwrap_or_default(),
        }),
        (None, _) => None,
    };
    Ok(SandboxRecord {
        id: SandboxId::from_trusted(row.text("id")?),
        tenant_id: TenantId::from_trusted(row.text("tenant_id")?),
        state: parsed("state", row.text("state")?, SandboxState::parse)?,
        provider: row.text("provider")?,
        worker_id: row.opt_text("worker_id")?.map(WorkerId::from_trusted),
        image: row.text("image")?,
        template: row.opt_text("template")?,
        cpu: row.real("cpu")?,
        memory_mb: row.int("memory_mb")?,
        network: parsed("network", row.text("network")?, Network::parse)?,
        labels: row.json("labels")?,
        env: row.json("env")?,
        workdir: row.opt_text("workdir")?,
        timeout_s: row.int("timeout_s")?,
        created_at: time_col(row, "created_at")?,
        started_at: opt_time_col(row, "started_at")?,
        expires_at: opt_time_col(row, "expires_at")?,
        destroyed_at: opt_time_col(row, "destroyed_at")?,
        failure,
        lease_expires_at: opt_time_col(row, "lease_expires_at")?,
        fencing_token: row.int("fencing_token")?,
        idempotency_key: row.opt_text("idempotency_key")?,
        egress_allow: row.json("egress_allow")?,
    })
}

/// An audit event and its append sequence number (the paging cursor).
pub(crate) fn audit_from_row(row: &impl RowGet) -> Result<(i64, AuditEvent)> {
    let event = AuditEvent {
        id: EventId::from_trusted(row.text("id")?),
        ts: time_col(row, "ts")?,
        tenant_id: row.opt_text("tenant_id")?.map(TenantId::from_trusted),
        actor: Actor {
            key_id: row.opt_text("actor_key_id")?.map(KeyId::from_trusted),
            role: row
                .opt_text("actor_role")?
                .map(|r| parsed("actor_role", r, Role::parse))
                .transpose()?,
        },
        action: row.text("action")?,
        target: row.opt_text("target")?,
        sandbox_id: row.opt_text("sandbox_id")?,
        outcome: parsed("outcome", row.text("outcome")?, Outcome::parse)?,
        status: row.int32("status")?,
        request_id: row.text("request_id")?,
        source_ip: row.opt_text("source_ip")?,
        detail: row.json("detail")?,
    };
    Ok((row.int("seq")?, event))
}

pub(crate) fn worker_from_row(row: &impl RowGet) -> Result<WorkerRecord> {
    Ok(WorkerRecord {
        id: WorkerId::from_trusted(row.text("id")?),
        address: row.text("address")?,
        providers: row.json("providers")?,
        labels: row.json("labels")?,
        capacity: row.int("capacity")?,
        state: parsed("state", row.text("state")?, WorkerState::parse)?,
        registered_at: time_col(row, "registered_at")?,
        last_heartbeat: time_col(row, "last_heartbeat")?,
        name: row.text("name")?,
        token_id: row.opt_text("token_id")?.map(WorkerTokenId::from_trusted),
        secret: row.opt_text("secret")?,
        provider_health: serde_json::from_str(&row.text("provider_health")?)
            .map_err(|e| corrupt("provider_health", e))?,
        capacity_cpu: row.opt_real("capacity_cpu")?,
        capacity_memory_mb: row.opt_int("capacity_memory_mb")?,
    })
}

pub(crate) fn worker_token_from_row(row: &impl RowGet) -> Result<WorkerToken> {
    Ok(WorkerToken {
        id: WorkerTokenId::from_trusted(row.text("id")?),
        name: row.text("name")?,
        token_hash: row.text("token_hash")?,
        created_at: time_col(row, "created_at")?,
        revoked_at: opt_time_col(row, "revoked_at")?,
    })
}

pub(crate) fn volume_from_row(row: &impl RowGet) -> Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: VolumeId::from_trusted(row.text("id")?),
        tenant_id: TenantId::from_trusted(row.text("tenant_id")?),
        name: row.text("name")?,
        size_mb: row.int("size_mb")?,
        created_at: time_col(row, "created_at")?,
        worker_id: row.opt_text("worker_id")?.map(WorkerId::from_trusted),
    })
}

pub(crate) fn template_from_row(row: &impl RowGet) -> Result<TemplateVersion> {
    let state = row.text("state")?;
    Ok(TemplateVersion {
        id: TemplateVersionId::from_trusted(row.text("id")?),
        tenant_id: TenantId::from_trusted(row.text("tenant_id")?),
        name: row.text("name")?,
        version: row.int("version")?,
        state: TemplateState::parse(&state)
            .ok_or_else(|| corrupt("state", format!("{state:?} is not a template state")))?,
        image: row.text("image")?,
        spec: serde_json::from_str(&row.text("spec")?).map_err(|e| corrupt("spec", e))?,
        failure: row.opt_text("failure")?,
        log: row.text("log")?,
        created_at: time_col(row, "created_at")?,
        built_at: opt_time_col(row, "built_at")?,
        heartbeat_at: time_col(row, "heartbeat_at")?,
        deleted_at: opt_time_col(row, "deleted_at")?,
    })
}

// --- parameters -----------------------------------------------------------

/// A sandbox record as column values, in [`sandbox_columns!`] order.
pub(crate) struct SandboxParams<'a> {
    pub id: &'a str,
    pub tenant_id: &'a str,
    pub state: &'static str,
    pub provider: &'a str,
    pub worker_id: Option<&'a str>,
    pub image: &'a str,
    pub template: Option<&'a str>,
    pub cpu: f64,
    pub memory_mb: i64,
    pub network: &'static str,
    pub labels: Json<&'a BTreeMap<String, String>>,
    pub env: Json<&'a BTreeMap<String, String>>,
    pub workdir: Option<&'a str>,
    pub timeout_s: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub destroyed_at: Option<i64>,
    pub failure_code: Option<&'a str>,
    pub failure_message: Option<&'a str>,
    pub lease_expires_at: Option<i64>,
    pub fencing_token: i64,
    pub idempotency_key: Option<&'a str>,
    pub egress_allow: Vec<String>,
}

impl<'a> SandboxParams<'a> {
    pub(crate) fn new(rec: &'a SandboxRecord) -> Self {
        SandboxParams {
            id: rec.id.as_str(),
            tenant_id: rec.tenant_id.as_str(),
            state: rec.state.as_str(),
            provider: &rec.provider,
            worker_id: rec.worker_id.as_ref().map(|w| w.as_str()),
            image: &rec.image,
            template: rec.template.as_deref(),
            cpu: rec.cpu,
            memory_mb: rec.memory_mb,
            network: rec.network.as_str(),
            labels: Json(&rec.labels),
            env: Json(&rec.env),
            workdir: rec.workdir.as_deref(),
            timeout_s: rec.timeout_s,
            created_at: to_micros(rec.created_at),
            started_at: opt_micros(rec.started_at),
            expires_at: opt_micros(rec.expires_at),
            destroyed_at: opt_micros(rec.destroyed_at),
            failure_code: rec.failure.as_ref().map(|f| f.code.as_str()),
            failure_message: rec.failure.as_ref().map(|f| f.message.as_str()),
            lease_expires_at: opt_micros(rec.lease_expires_at),
            fencing_token: rec.fencing_token,
            idempotency_key: rec.idempotency_key.as_deref(),
            egress_allow: rec.egress_allow.iter().map(ToString::to_string).collect(),
        }
    }
}

// --- paging ---------------------------------------------------------------

/// The page size actually used: `limit` clamped to 1..=1000.
pub(crate) fn page_limit(page: &PageRequest) -> i64 {
    i64::from(page.limit.clamp(1, 1000))
}

/// Checks an ID cursor: it is the last ID of the previous page.
pub(crate) fn id_cursor<T>(
    page: &PageRequest,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<String>> {
    match &page.cursor {
        None => Ok(None),
        Some(c) => match parse(c) {
            Some(_) => Ok(Some(c.clone())),
            None => Err(Error::InvalidRequest(format!(
                "invalid cursor {c:?}: pass the next_cursor of the previous page"
            ))),
        },
    }
}

/// Checks an audit cursor: the append sequence number of the previous page's
/// last event.
pub(crate) fn seq_cursor(page: &PageRequest) -> Result<Option<i64>> {
    match &page.cursor {
        None => Ok(None),
        Some(c) => match c.parse::<i64>() {
            Ok(seq) if seq >= 0 => Ok(Some(seq)),
            _ => Err(Error::InvalidRequest(format!(
                "invalid cursor {c:?}: pass the next_cursor of the previous page"
            ))),
        },
    }
}

/// Cuts `items` (fetched with `limit + 1`) to a page; the cursor is taken
/// from the page's last item when more follow.
pub(crate) fn into_page<T>(mut items: Vec<(String, T)>, limit: i64) -> Page<T> {
    let limit = usize::try_from(limit).expect("a page limit is between 1 and 1000");
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|(cursor, _)| cursor.clone())
    } else {
        None
    };
    Page {
        items: items.into_iter().map(|(_, item)| item).collect(),
        next_cursor,
    }
}

// --- dynamic filters ------------------------------------------------------

/// A value bound to a dynamically built statement.
pub(crate) enum Value {
    Text(String),
    Int(i64),
}

/// Builds the `WHERE` clause of a filtered list: conditions joined with
/// `AND`, their values bound in order.
#[derive(Default)]
pub(crate) struct Conditions {
    clauses: Vec<String>,
    pub args: Vec<Value>,
}

impl Conditions {
    /// Adds a value and returns its placeholder.
    pub(crate) fn param(&mut self, value: Value) -> String {
        self.args.push(value);
        format!("${}", self.args.len())
    }

    pub(crate) fn and(&mut self, clause: String) {
        self.clauses.push(clause);
    }

    /// Adds the condition `lhs value`, e.g. `("ts >=", since)`.
    pub(crate) fn and_is(&mut self, lhs: &str, value: Value) {
        let p = self.param(value);
        self.and(format!("{lhs} {p}"));
    }

    /// ` WHERE a AND b`, or nothing.
    pub(crate) fn where_sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }
}

pub(crate) fn tenant_not_found(id: &TenantId) -> Error {
    Error::NotFound(format!("tenant {id} not found"))
}

/// The `Conflict` for a unique violation on `tenants`: the name, usually.
pub(crate) fn tenant_exists(tenant: &Tenant, err: &sqlx::Error) -> Error {
    let on_name = matches!(err, sqlx::Error::Database(db)
        if db.message().contains("name") || db.constraint().is_some_and(|c| c.contains("name")));
    if on_name {
        Error::Conflict(format!("a tenant named {:?} exists already", tenant.name))
    } else {
        Error::Conflict(format!("tenant {} exists already", tenant.id))
    }
}

/// Whether `e` is a write refused for a stale fencing token (the row
/// changed hands, or was declared lost, since it was read).
pub fn is_stale_fencing(e: &Error) -> bool {
    matches!(e, Error::Conflict(m) if m.starts_with(STALE_FENCING))
}

const STALE_FENCING: &str = "stale fencing token";

pub(crate) fn stale_or_missing(rec: &SandboxRecord, current: Option<i64>) -> Error {
    match current {
        None => Error::NotFound(format!("sandbox {} not found", rec.id)),
        Some(token) => Error::Conflict(format!(
            "{STALE_FENCING}: sandbox {} is at token {token}, the update carries {}",
            rec.id, rec.fencing_token
        )),
    }
}

// --- quotas ---------------------------------------------------------------

/// What the tenant's live sandboxes use right now.
pub(crate) struct Usage {
    pub sandboxes: i64,
    pub cpu: f64,
    pub memory_mb: i64,
}

/// Refuses `rec` if adding it to `usage` would exceed `quota`, naming the
/// limit and the numbers.
pub(crate) fn check_quota(quota: &Quota, usage: &Usage, rec: &SandboxRecord) -> Result<()> {
    if let Some(max) = quota.max_sandboxes {
        if usage.sandboxes + 1 > max {
            return Err(Error::QuotaExceeded(format!(
                "quota exceeded: max_sandboxes is {max} and the tenant has {} live sandboxes",
                usage.sandboxes
            )));
        }
    }
    if let Some(max) = quota.max_cpu {
        // Sums of fractional cpus carry float error (0.1 + 0.2 > 0.3), which
        // must not refuse a sandbox that fits exactly.
        if usage.cpu + rec.cpu > max + 1e-9 {
            return Err(Error::QuotaExceeded(format!(
                "quota exceeded: max_cpu is {max} and the tenant's live sandboxes use {} cpu; \
                 this sandbox asks for {} more",
                round_cpu(usage.cpu),
                rec.cpu
            )));
        }
    }
    if let Some(max) = quota.max_memory_mb {
        if usage.memory_mb.saturating_add(rec.memory_mb) > max {
            return Err(Error::QuotaExceeded(format!(
                "quota exceeded: max_memory_mb is {max} and the tenant's live sandboxes use {} MB; \
                 this sandbox asks for {} MB more",
                usage.memory_mb, rec.memory_mb
            )));
        }
    }
    Ok(())
}

/// Hides float noise (`0.30000000000000004`) in messages.
fn round_cpu(cpu: f64) -> f64 {
    (cpu * 1e6).round() / 1e6
}

// --- migrations -----------------------------------------------------------

/// One embedded schema migration, applied once, in version order.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// One dialect's schema, from `migrations/DIALECT/`.
pub struct Schema {
    /// Creates the table recording applied migrations, if missing.
    pub bookkeeping: &'static str,
    /// The migrations, in version order.
    pub migrations: &'static [Migration],
}

/// The schema of `$dialect`. Each version is a pair of twin files, one per
/// dialect, listed once here so that the backends cannot drift apart. A
/// change is a new pair of files appended here; applied files are never
/// edited.
macro_rules! schema {
    ($dialect:literal) => {
        Schema {
            bookkeeping: include_str!(concat!(
                "../migrations/",
                $dialect,
                "/schema_migrations.sql"
            )),
            migrations: &[
                Migration {
                    version: 1,
                    name: "initial",
                    sql: include_str!(concat!("../migrations/", $dialect, "/0001_initial.sql")),
                },
                Migration {
                    version: 2,
                    name: "owner role and quota fields",
                    sql: include_str!(concat!(
                        "../migrations/",
                        $dialect,
                        "/0002_owner_role_and_quota_fields.sql"
                    )),
                },
                Migration {
                    version: 3,
                    name: "multi-worker mode",
                    sql: include_str!(concat!(
                        "../migrations/",
                        $dialect,
                        "/0003_multi_worker.sql"
                    )),
                },
                Migration {
                    version: 4,
                    name: "volumes",
                    sql: include_str!(concat!("../migrations/", $dialect, "/0004_volumes.sql")),
                },
                Migration {
                    version: 5,
                    name: "egress allow lists",
                    sql: include_str!(concat!(
                        "../migrations/",
                        $dialect,
                        "/0005_egress_allow.sql"
                    )),
                },
                Migration {
                    version: 6,
                    name: "templates",
                    sql: include_str!(concat!("../migrations/", $dialect, "/0006_templates.sql")),
                },
                Migration {
                    version: 7,
                    name: "max_templates quota",
                    sql: include_str!(concat!(
                        "../migrations/",
                        $dialect,
                        "/0007_max_templates.sql"
                    )),
                },
                Migration {
                    version: 8,
                    name: "volume worker",
                    sql: include_str!(concat!(
                        "../migrations/",
                        $dialect,
                        "/0008_volume_worker.sql"
                    )),
                },
            ],
        }
    };
}
pub(crate) use schema;

/// Refuses a database migrated by a newer StacyVM: its schema may not be
/// what this code expects.
pub(crate) fn check_not_newer(applied: &[i64], known: &[Migration]) -> Result<()> {
    let newest_known = known.iter().map(|m| m.version).max().unwrap_or(0);
    match applied.iter().copied().max() {
        Some(v) if v > newest_known => Err(Error::Internal(format!(
            "the database schema is at version {v}, newer than this StacyVM knows \
             ({newest_known}); run a newer StacyVM"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_state_sql_names_exactly_the_terminal_states() {
        let sql = live_state!();
        for s in SandboxState::ALL {
            let quoted = format!("'{}'", s.as_str());
            assert_eq!(sql.contains(&quoted), s.is_terminal(), "{s}");
        }
    }

    #[test]
    fn times_round_trip_at_microsecond_precision() {
        let t = stacyvm_core::now();
        assert_eq!(from_micros("t", to_micros(t)).expect("in range"), t);
        let before_epoch = time::macros::datetime!(1969-12-31 23:59:59.999_999 UTC);
        assert_eq!(
            from_micros("t", to_micros(before_epoch)).expect("in range"),
            before_epoch
        );
    }

    #[test]
    fn page_limits_are_clamped() {
        let p = |limit| PageRequest {
            cursor: None,
            limit,
        };
        assert_eq!(page_limit(&p(0)), 1);
        assert_eq!(page_limit(&p(50)), 50);
        assert_eq!(page_limit(&p(5000)), 1000);
    }
}
