//! The SQLite backend: one database file in WAL mode with `synchronous=FULL`
//! (a committed write survives `kill -9` and power loss), the embedded
//! default for single-node StacyVM.
//!
//! SQLite has one writer at a time. Write transactions start with
//! `BEGIN IMMEDIATE`, so they take the write lock before reading what they
//! check (the quota) and cannot race; within this process every write also
//! queues on an async lock first, so writers wait in order instead of
//! polling in SQLite's busy handler, which remains for other processes.
//!
//! Audit events are committed in groups by one writer task: events that
//! arrive while a commit is being made share the next one (and its fsync),
//! and each caller is answered once its own event is durable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Pool, Sqlite};
use stacyvm_core::{Error, Result};
use tokio::sync::{mpsc, oneshot, Mutex, MutexGuard};

use crate::common::{db_error, quota_of_tenant, schema, Migration, Schema};
use crate::model::AuditEvent;
use crate::sql::{audit_insert, Backend, SqlStore};

/// How long a statement waits for another process's write lock before
/// giving up (and reporting the store unavailable).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Readers run concurrently in WAL mode; writers take turns anyway.
const MAX_CONNECTIONS: u32 = 4;

/// The SQLite store. Cheap to share behind an `Arc`.
pub type SqliteStore = SqlStore<SqliteBackend>;

/// What is SQLite's own in a [`SqliteStore`].
pub struct SqliteBackend {
    /// Serialises this process's writes (see the module docs).
    write_lock: Arc<Mutex<()>>,
    /// Audit events on their way to the group-commit writer (see
    /// `audit_writer`).
    audit: mpsc::Sender<PendingEvent>,
}

/// An audit event waiting to be committed, and who waits for it.
type PendingEvent = (AuditEvent, oneshot::Sender<Result<()>>);

/// Most events one audit commit takes.
const AUDIT_BATCH: usize = 256;

impl Backend for SqliteBackend {
    type Db = Sqlite;

    const KIND: &'static str = "sqlite";

    const SCHEMA: Schema = schema!("sqlite");

    const MIGRATIONS_LOCK: Option<&'static str> = None;

    const NOW: Option<&'static str> = None;
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";

    /// `BEGIN IMMEDIATE` has already made this the only writer.
    const QUOTA_FOR_CREATE: &'static str = quota_of_tenant!();

    /// `json_each` compares the key as a string; a path expression (`->>`)
    /// would read `a.b` as a nested key.
    fn label_matches(key: &str, value: &str) -> String {
        format!(
            "EXISTS (SELECT 1 FROM json_each(sandboxes.labels) AS l \
             WHERE l.key = {key} AND l.value = {value})"
        )
    }

    fn is_unreachable_code(code: &str) -> bool {
        // The primary result code is the low byte of the extended one:
        // SQLITE_BUSY (after the busy timeout), SQLITE_LOCKED, SQLITE_IOERR,
        // SQLITE_FULL, SQLITE_CANTOPEN.
        code.parse::<i32>()
            .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14))
    }

    async fn write_turn(&self) -> Option<MutexGuard<'_, ()>> {
        Some(self.write_lock.lock().await)
    }

    async fn audit_append(&self, _pool: &Pool<Sqlite>, event: &AuditEvent) -> Result<()> {
        let (done, wait) = oneshot::channel();
        let gone =
            || Error::Unavailable("the store is unavailable: the audit writer has stopped".into());
        self.audit
            .send((event.clone(), done))
            .await
            .map_err(|_| gone())?;
        wait.await.map_err(|_| gone())?
    }
}

impl SqliteStore {
    /// Opens (creating it and its directory if missing) the database file at
    /// `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        if path.as_os_str().is_empty() {
            return Err(Error::InvalidRequest(
                "the SQLite store needs a file path: sqlite://PATH".into(),
            ));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                Error::Internal(format!(
                    "creating the store directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(BUSY_TIMEOUT)
            // No ping before each use: a connection to a local file does not
            // go stale, and the ping is a round trip to the connection's
            // thread on every query. The ping sqlx makes when a connection is
            // released still flushes any queued rollback.
            .test_before_acquire(false)
            // An idle connection is never inside a transaction. When a COMMIT
            // fails because the disk is full, SQLite rolls the transaction back
            // by itself, sqlx's own ROLLBACK then fails, and sqlx keeps counting
            // the transaction as open: every later BEGIN on that connection
            // would fail. Such a connection is closed instead of reused.
            .before_acquire(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
            .connect_with(options)
            .await
            .map_err(|e| {
                db_error::<SqliteBackend>(
                    &format!("opening the SQLite store {}", path.display()),
                    e,
                )
            })?;
        let write_lock = Arc::new(Mutex::new(()));
        let (audit, audit_rx) = mpsc::channel(4 * AUDIT_BATCH);
        tokio::spawn(audit_writer(pool.clone(), write_lock.clone(), audit_rx));
        SqlStore::start(pool, SqliteBackend { write_lock, audit }).await
    }
}

/// Commits audit events in groups: every event that arrived while the
/// previous commit was being made goes into the next one, so concurrent
/// mutating calls share one fsync instead of queueing for one each. Each
/// caller still returns only after its own event is committed. Runs until
/// the store is dropped; an event whose caller went away is still written.
async fn audit_writer(
    pool: SqlitePool,
    write_lock: Arc<Mutex<()>>,
    mut rx: mpsc::Receiver<PendingEvent>,
) {
    let mut batch: Vec<PendingEvent> = Vec::with_capacity(AUDIT_BATCH);
    while rx.recv_many(&mut batch, AUDIT_BATCH).await > 0 {
        let events: Vec<&AuditEvent> = batch.iter().map(|(e, _)| e).collect();
        match audit_commit(&pool, &write_lock, &events).await {
            Ok(()) => {
                for (_, done) in batch.drain(..) {
                    let _ = done.send(Ok(()));
                }
            }
            // One bad event (a duplicate id) must not fail the others:
            // commit them one by one, each with its own answer. Any other
            // failure (busy, disk full, I/O) is every event's.
            Err(Error::Conflict(_)) if batch.len() > 1 => {
                for (event, done) in batch.drain(..) {
                    let _ = done.send(audit_commit(&pool, &write_lock, &[&event]).await);
                }
            }
            Err(e) => {
                for (_, done) in batch.drain(..) {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Appends `events` in one transaction (a lone event as one autocommit
/// statement: one round trip to SQLite's thread instead of three).
async fn audit_commit(
    pool: &SqlitePool,
    write_lock: &Mutex<()>,
    events: &[&AuditEvent],
) -> Result<()> {
    let _lock = write_lock.lock().await;
    if let [event] = events {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| db_error::<SqliteBackend>("acquiring a connection", e))?;
        return audit_insert::<SqliteBackend>(&mut *conn, event).await;
    }
    let mut tx = pool
        .begin_with(SqliteBackend::BEGIN_WRITE)
        .await
        .map_err(|e| db_error::<SqliteBackend>("starting a write transaction", e))?;
    for event in events {
        audit_insert::<SqliteBackend>(&mut *tx, event).await?;
    }
    tx.commit()
        .await
        .map_err(|e| db_error::<SqliteBackend>("committing audit events", e))
}
