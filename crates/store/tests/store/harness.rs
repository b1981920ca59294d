//! Real databases for the suite: a SQLite file in a temporary directory, or
//! a PostgreSQL database of its own, dropped when the test ends (even by a
//! panic).

use std::process::Command;

use anyhow::{bail, Context};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use stacyvm_core::SandboxId;
use stacyvm_store::DynStore;
use tokio::sync::OnceCell;

/// One test's database and a store open on it.
pub struct TestDb {
    pub store: DynStore,
    /// What `stacyvm_store::open` takes to open this database again.
    pub url: String,
    /// Where a raw connection (bypassing the store) reaches the database.
    pub raw: Raw,
    // Dropped last: removes the database after the store is gone.
    _cleanup: Cleanup,
}

/// A database no store has opened yet; see [`TestDb::fresh_database`].
pub struct FreshDb {
    pub url: String,
    _db: Option<PgDatabase>,
}

pub enum Raw {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

/// Held only to be dropped.
enum Cleanup {
    Dir { _dir: tempfile::TempDir },
    Database { _db: PgDatabase },
}

impl TestDb {
    pub async fn sqlite() -> anyhow::Result<TestDb> {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        // A subdirectory that does not exist yet: opening must create it.
        let path = dir.path().join("data").join("stacyvm.db");
        let url = format!("sqlite://{}", path.display());
        let store = stacyvm_store::open(&url)
            .await
            .context("opening the SQLite store")?;
        Ok(TestDb {
            store,
            url,
            raw: Raw::Sqlite(path),
            _cleanup: Cleanup::Dir { _dir: dir },
        })
    }

    pub async fn postgres() -> anyhow::Result<TestDb> {
        let server = postgres_server().await?;
        let db = PgDatabase::create(server).await?;
        let url = db.url();
        let store = stacyvm_store::open(&url)
            .await
            .context("opening the PostgreSQL store")?;
        Ok(TestDb {
            store,
            url: url.clone(),
            raw: Raw::Postgres(url),
            _cleanup: Cleanup::Database { _db: db },
        })
    }

    /// The URL of a second, empty database of the same kind that no store has
    /// opened yet (removed with this one).
    pub async fn fresh_database(&self) -> anyhow::Result<FreshDb> {
        match &self.raw {
            Raw::Sqlite(path) => {
                let name = format!("fresh-{}.db", SandboxId::generate());
                let fresh = path.with_file_name(name);
                Ok(FreshDb {
                    url: format!("sqlite://{}", fresh.display()),
                    _db: None,
                })
            }
            Raw::Postgres(_) => {
                let db = PgDatabase::create(postgres_server().await?).await?;
                Ok(FreshDb {
                    url: db.url(),
                    _db: Some(db),
                })
            }
        }
    }

    /// A second, independent store on the same database.
    pub async fn open_again(&self) -> anyhow::Result<DynStore> {
        stacyvm_store::open(&self.url)
            .await
            .context("reopening the store")
    }

    /// Runs one statement outside the store (for checks the trait cannot make).
    pub async fn raw_execute(&self, sql: &str) -> anyhow::Result<u64> {
        self.raw.execute(sql).await
    }

    /// Runs a query returning one integer outside the store.
    pub async fn raw_i64(&self, sql: &str) -> anyhow::Result<i64> {
        self.raw.i64(sql).await
    }
}

impl Raw {
    /// Where a store URL's database is.
    pub fn from_url(url: &str) -> Raw {
        match url.strip_prefix("sqlite://") {
            Some(path) => Raw::Sqlite(path.into()),
            None => Raw::Postgres(url.to_owned()),
        }
    }

    pub async fn execute(&self, sql: &str) -> anyhow::Result<u64> {
        let sql = AssertSqlSafe(sql.to_owned());
        match self {
            Raw::Sqlite(path) => {
                let mut conn = sqlite_connection(path).await?;
                Ok(sqlx::query(sql).execute(&mut conn).await?.rows_affected())
            }
            Raw::Postgres(url) => {
                let mut conn = PgConnection::connect(url)
                    .await
                    .context("connecting to PostgreSQL")?;
                Ok(sqlx::query(sql).execute(&mut conn).await?.rows_affected())
            }
        }
    }

    /// Runs several statements in one go (a schema file).
    pub async fn script(&self, sql: &str) -> anyhow::Result<()> {
        let sql = AssertSqlSafe(sql.to_owned());
        match self {
            Raw::Sqlite(path) => {
                let mut conn = sqlx::SqliteConnection::connect(&format!(
                    "sqlite://{}?mode=rwc",
                    path.display()
                ))
                .await
                .context("creating the SQLite file")?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
            }
            Raw::Postgres(url) => {
                let mut conn = PgConnection::connect(url)
                    .await
                    .context("connecting to PostgreSQL")?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
            }
        }
        Ok(())
    }

    pub async fn i64(&self, sql: &str) -> anyhow::Result<i64> {
        let sql = AssertSqlSafe(sql.to_owned());
        match self {
            Raw::Sqlite(path) => {
                let mut conn = sqlite_connection(path).await?;
                Ok(sqlx::query_scalar(sql).fetch_one(&mut conn).await?)
            }
            Raw::Postgres(url) => {
                let mut conn = PgConnection::connect(url)
                    .await
                    .context("connecting to PostgreSQL")?;
                Ok(sqlx::query_scalar(sql).fetch_one(&mut conn).await?)
            }
        }
    }
}

async fn sqlite_connection(path: &std::path::Path) -> anyhow::Result<sqlx::SqliteConnection> {
    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .context("connecting to SQLite")
}

/// The PostgreSQL server the tests create their databases on.
async fn postgres_server() -> anyhow::Result<&'static str> {
    static SERVER: OnceCell<String> = OnceCell::const_new();
    SERVER
        .get_or_try_init(|| async {
            if let Ok(url) = std::env::var("STACYVM_TEST_POSTGRES_URL") {
                if !url.trim().is_empty() {
                    return Ok(url.trim().to_owned());
                }
            }
            // The script serialises its callers with a file lock, so test
            // processes starting together share one server.
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../scripts/start-postgres.sh"
            );
            let out = tokio::task::spawn_blocking(move || Command::new(script).output())
                .await
                .context("running start-postgres.sh")?
                .with_context(|| format!("running {script}"))?;
            if !out.status.success() {
                bail!(
                    "PostgreSQL is needed for these tests and {script} failed ({}); set \
                     STACYVM_TEST_POSTGRES_URL to a server instead:\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let url =
                String::from_utf8(out.stdout).context("start-postgres.sh printed non-UTF-8")?;
            let url = url.trim().to_owned();
            if url.is_empty() {
                bail!("start-postgres.sh printed no URL");
            }
            Ok(url)
        })
        .await
        .map(|s| s.as_str())
}

/// A database created for one test and dropped (with its connections) when
/// this guard goes.
struct PgDatabase {
    server: String,
    name: String,
}

impl PgDatabase {
    async fn create(server: &str) -> anyhow::Result<PgDatabase> {
        let id = SandboxId::generate();
        let suffix = id.as_str().trim_start_matches(SandboxId::PREFIX);
        let name = format!("stacyvm_test_{suffix}");
        let mut conn = PgConnection::connect(server)
            .await
            .with_context(|| format!("connecting to the test PostgreSQL at {server}"))?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok(PgDatabase {
            server: server.to_owned(),
            name,
        })
    }

    /// The server URL with this database in place of the server's.
    fn url(&self) -> String {
        let (base, query) = match self.server.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (self.server.as_str(), String::new()),
        };
        let (prefix, _) = base.rsplit_once('/').unwrap_or((base, ""));
        // A URL without a path ("postgres://h:5432") has its authority as the
        // part after "//"; rsplit_once('/') would then cut inside "//".
        if prefix.ends_with('/') || prefix.ends_with(':') {
            format!("{base}/{}{query}", self.name)
        } else {
            format!("{prefix}/{}{query}", self.name)
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop cannot await, and may run inside the test's runtime: drop the
        // database from a thread with its own runtime.
        let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&server).await?;
                sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                anyhow::Ok(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e:#}", self.name),
            Err(_) => eprintln!(
                "could not drop test database {}: the dropping thread panicked",
                self.name
            ),
        }
    }
}
