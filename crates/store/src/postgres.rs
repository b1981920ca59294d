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

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Pool, Postgres};
use stacyvm_core::{Error, Result};
use tokio::sync::MutexGuard;

use crate::common::{db_error, quota_of_tenant, schema, Migration, Schema};
use crate::model::AuditEvent;
use crate::sql::{audit_insert, Backend, SqlStore};

/// How long opening the store waits for the server to answer at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call waits for a pooled connection (or a new one) before the
/// store is reported unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const MAX_CONNECTIONS: u32 = 16;

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub type PostgresStore = SqlStore<PostgresBackend>;

/// What is PostgreSQL's own in a [`PostgresStore`]: nothing to hold, only
/// statements and rules.
pub struct PostgresBackend;

impl Backend for PostgresBackend {
    type Db = Postgres;

    const KIND: &'static str = "postgres";

    const SCHEMA: Schema = schema!("postgres");

    /// Serialises migrations across every process sharing the database,
    /// until the transaction ends. The key is any constant unique to
    /// StacyVM ("StacyVM" and a 1, in ASCII).
    const MIGRATIONS_LOCK: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(x'5374616379564d01'::bigint)");

    const NOW: Option<&'static str> =
        Some("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) AS now");
    const BEGIN_WRITE: &'static str = "BEGIN";

    /// The tenant's row lock makes this tenant's creates take turns; the
    /// checks after it then see every sandbox committed before them.
    const QUOTA_FOR_CREATE: &'static str = concat!(quota_of_tenant!(), " FOR UPDATE OF t");

    fn label_matches(key: &str, value: &str) -> String {
        format!("labels ->> {key}::text = {value}::text")
    }

    fn is_unreachable_code(code: &str) -> bool {
        // Class 08 is "connection exception"; 57P01..57P03 are an
        // administrator shutdown, a crash shutdown and "cannot connect now"
        // (starting up); 53300 is "too many connections".
        code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
    }

    /// Writers need no turn: row locks and single statements settle races.
    async fn write_turn(&self) -> Option<MutexGuard<'_, ()>> {
        None
    }

    async fn audit_append(&self, pool: &Pool<Postgres>, event: &AuditEvent) -> Result<()> {
        audit_insert::<Self>(pool, event).await
    }
}

impl PostgresStore {
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
                Error::Unavailable(format!(
                    "the store is unavailable: PostgreSQL at {server} did not answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| {
                db_error::<PostgresBackend>(&format!("connecting to PostgreSQL at {server}"), e)
            })?;
        if let Err(e) = probe.close().await {
            tracing::debug!(error = %e, "closing the PostgreSQL probe connection");
        }
        let pool: PgPool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        SqlStore::start(pool, PostgresBackend).await
    }
}
