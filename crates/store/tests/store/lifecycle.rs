//! Opening, reopening and migrating stores, and what happens when the
//! database is not there.

use std::time::Duration;

use anyhow::{ensure, Context};
use stacyvm_core::Error;
use stacyvm_store::{AuditFilter, Quota, SandboxFilter};

use crate::fixtures::{self, create, new_tenant};
use crate::harness::{Raw, TestDb};

pub async fn kind_and_ping(db: &TestDb) -> anyhow::Result<()> {
    let expected = match db.raw {
        Raw::Sqlite(_) => "sqlite",
        Raw::Postgres(_) => "postgres",
    };
    assert_eq!(db.store.kind(), expected);
    db.store.ping().await?;
    Ok(())
}

/// Everything written is there after the store is closed and opened again.
pub async fn reopen_keeps_everything(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let tenant = fixtures::tenant("persistent");
    store.tenant_create(&tenant).await?;
    let quota = Quota {
        max_sandboxes: Some(3),
        max_cpu: Some(2.5),
        ..Quota::default()
    };
    store.quota_set(&tenant.id, &quota).await?;
    let key = fixtures::key(&tenant.id, "persisted-hash");
    store.key_create(&key).await?;
    let mut rec = fixtures::with_labels(fixtures::sandbox(&tenant.id), &[("app", "web")]);
    rec.expires_at = Some(fixtures::at(3600));
    let rec = create(store, &rec).await?;
    let event = fixtures::event(Some(&tenant.id), "sandbox.create");
    store.audit_append(&event).await?;
    let worker = fixtures::worker("10.0.0.1:7000");
    store.worker_upsert(&worker).await?;

    let again = db.open_again().await?;
    assert_eq!(again.tenant_get(&tenant.id).await?, Some(tenant.clone()));
    assert_eq!(again.quota_get(&tenant.id).await?, quota);
    assert_eq!(again.key_get(&key.id).await?, Some(key));
    assert_eq!(again.sandbox_get(&rec.id).await?, Some(rec.clone()));
    let events = again.audit_list(&AuditFilter::default()).await?;
    assert_eq!(events.items, vec![event]);
    assert_eq!(again.worker_get(&worker.id).await?, Some(worker));
    let listed = again.sandbox_list(&SandboxFilter::default()).await?;
    assert_eq!(listed.items, vec![rec]);
    Ok(())
}

/// Reopening applies nothing twice: each migration is recorded once.
pub async fn migrations_are_recorded_once(db: &TestDb) -> anyhow::Result<()> {
    let before = db.raw_i64("SELECT COUNT(*) FROM schema_migrations").await?;
    ensure!(before >= 1, "no migration recorded");
    for _ in 0..3 {
        db.open_again().await?;
    }
    let after = db.raw_i64("SELECT COUNT(*) FROM schema_migrations").await?;
    assert_eq!(before, after);
    let distinct = db
        .raw_i64("SELECT COUNT(DISTINCT version) FROM schema_migrations")
        .await?;
    assert_eq!(distinct, after);
    Ok(())
}

/// A database migrated by a newer StacyVM is refused rather than misread.
pub async fn newer_schema_is_refused(db: &TestDb) -> anyhow::Result<()> {
    db.raw_execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (9999, 'future', 0)",
    )
    .await?;
    match db.open_again().await {
        Err(e) => assert!(format!("{e:#}").contains("newer"), "{e:#}"),
        Ok(_) => anyhow::bail!("opened a database with a newer schema"),
    }
    Ok(())
}

/// Several processes starting at once on one new database all open it, and
/// the schema is created once.
pub async fn concurrent_opens_migrate_once(db: &TestDb) -> anyhow::Result<()> {
    let fresh = db.fresh_database().await?;
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let url = fresh.url.clone();
            tokio::spawn(async move { stacyvm_store::open(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.context("open task")??);
    }
    // Every store works on the one schema: what one writes, all see.
    let tenant = new_tenant(&stores[0], "seen-by-all").await?;
    for store in &stores {
        assert!(store.tenant_get(&tenant).await?.is_some());
    }
    let known = db.raw_i64("SELECT COUNT(*) FROM schema_migrations").await?;
    let again = stacyvm_store::open(&fresh.url).await?;
    again.ping().await?;
    drop((stores, again));
    // The fresh database records each migration once, like the first one.
    let raw = Raw::from_url(&fresh.url);
    assert_eq!(
        raw.i64("SELECT COUNT(*) FROM schema_migrations").await?,
        known
    );
    Ok(())
}

#[tokio::test]
async fn unreachable_postgres_is_unavailable_without_hanging() -> anyhow::Result<()> {
    // Nothing listens on port 1. The timeout only guards against a hang; the
    // store bounds its own connect time.
    let opened = tokio::time::timeout(
        Duration::from_secs(120),
        stacyvm_store::open("postgres://postgres@127.0.0.1:1/postgres"),
    )
    .await
    .context("opening an unreachable PostgreSQL hung")?;
    let err = match opened {
        Ok(_) => anyhow::bail!("opened a store on a closed port"),
        Err(e) => e,
    };
    assert!(
        stacyvm_store::is_unavailable(&err),
        "not an unavailable error: {err:?}"
    );
    assert_eq!(err.code(), "store_unavailable");
    Ok(())
}

#[tokio::test]
async fn unknown_store_urls_are_invalid_requests() {
    for url in ["mysql://x/y", "sqlite:relative.db", "", "postgres:/nope"] {
        match stacyvm_store::open(url).await {
            Err(Error::InvalidRequest(msg)) => assert!(msg.contains("sqlite://"), "{msg}"),
            other => panic!(
                "{url:?}: expected invalid_request, got {:?}",
                other.map(|s| s.kind())
            ),
        }
    }
}

#[tokio::test]
async fn malformed_postgres_url_is_an_invalid_request() {
    match stacyvm_store::open("postgres://user@host:notaport/db").await {
        Err(Error::InvalidRequest(msg)) => assert!(msg.contains("PostgreSQL URL"), "{msg}"),
        other => panic!(
            "expected invalid_request, got {:?}",
            other.map(|s| s.kind())
        ),
    }
}

#[tokio::test]
async fn sqlite_in_an_impossible_place_is_an_error_not_a_panic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory")?;
    let url = format!("sqlite://{}/store.db", file.display());
    match stacyvm_store::open(&url).await {
        Err(Error::Internal(msg)) => assert!(msg.contains("a-file"), "{msg}"),
        other => panic!("expected internal, got {:?}", other.map(|s| s.kind())),
    }
    let empty = stacyvm_store::open("sqlite://").await;
    assert!(matches!(empty, Err(Error::InvalidRequest(_))));
    Ok(())
}

#[tokio::test]
async fn sqlite_file_that_is_not_a_database_is_an_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, vec![0x5a_u8; 8192])?;
    let opened = stacyvm_store::open(&format!("sqlite://{}", path.display())).await;
    assert!(
        matches!(opened, Err(Error::Internal(_))),
        "{:?}",
        opened.map(|s| s.kind())
    );
    Ok(())
}

/// Kills the process writing when dropped, so a failing test leaks nothing.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const WRITER_DB_ENV: &str = "STACYVM_STORE_TEST_WRITER_DB";

/// An audit event the store acknowledged is on disk: a writer killed with
/// SIGKILL mid-stream loses none of the events it was told were appended.
///
/// The test runs itself twice: as the parent (no environment variable) it
/// starts a copy of this test binary as the writer, lets it acknowledge some
/// events, kills it and checks the file; as the writer it appends events
/// forever, printing each id once `audit_append` has returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_acknowledged_audit_events_survive_kill_9() -> anyhow::Result<()> {
    use std::io::BufRead;

    if let Ok(path) = std::env::var(WRITER_DB_ENV) {
        let store = stacyvm_store::open(&format!("sqlite://{path}")).await?;
        loop {
            let e = fixtures::event(None, "sandbox.exec");
            store.audit_append(&e).await?;
            println!("acked {}", e.id);
        }
    }

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("audit.db");
    let exe = std::env::current_exe().context("locating the test binary")?;
    let child = std::process::Command::new(exe)
        .args([
            "--exact",
            "lifecycle::sqlite_acknowledged_audit_events_survive_kill_9",
            "--nocapture",
        ])
        .env(WRITER_DB_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the writer")?;
    let mut writer = KillOnDrop(child);
    let stdout = writer.0.stdout.take().context("writer stdout")?;
    let acked = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let mut acked = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            if let Some(id) = line?.strip_prefix("acked ") {
                acked.push(id.to_owned());
                if acked.len() == 200 {
                    break;
                }
            }
        }
        Ok(acked)
    })
    .await??;
    // SIGKILL while the writer is still appending.
    drop(writer);
    anyhow::ensure!(
        acked.len() == 200,
        "the writer stopped after {} events",
        acked.len()
    );

    let store = stacyvm_store::open(&format!("sqlite://{}", path.display())).await?;
    let mut stored = std::collections::BTreeSet::new();
    let mut filter = AuditFilter {
        page: stacyvm_store::PageRequest {
            cursor: None,
            limit: 1000,
        },
        ..Default::default()
    };
    loop {
        let page = store.audit_list(&filter).await?;
        stored.extend(page.items.into_iter().map(|e| e.id.to_string()));
        match page.next_cursor {
            Some(c) => filter.page.cursor = Some(c),
            None => break,
        }
    }
    for id in &acked {
        assert!(stored.contains(id), "acknowledged event {id} was lost");
    }
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        path.display()
    ))
    .await?;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(mode, "wal");
    Ok(())
}

/// A TCP relay to the test PostgreSQL server that the test can cut, to see
/// the store lose its database and get it back.
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(port: u16, target: std::net::SocketAddr) -> anyhow::Result<Relay> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            // Aborting this task drops the listener and, with the set, every
            // relayed connection.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Relay { port, task })
    }

    fn cut(self) -> u16 {
        self.task.abort();
        self.port
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `url` with its host and port replaced by 127.0.0.1:`port`.
fn via_port(url: &str, port: u16) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("URL without scheme")?;
    let (userinfo, hostpath) = match rest.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpath.find('/').map(|i| &hostpath[i..]).unwrap_or("");
    Ok(format!("{scheme}://{userinfo}127.0.0.1:{port}{path}"))
}

/// A PostgreSQL that goes away after the store opened is reported as
/// unavailable (503), and the store recovers when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_after_open_is_unavailable_then_recovers() -> anyhow::Result<()> {
    use std::str::FromStr;

    let db = TestDb::postgres().await?;
    let options = sqlx::postgres::PgConnectOptions::from_str(&db.url)?;
    let target = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await?
        .next()
        .context("resolving the test PostgreSQL")?;
    let relay = Relay::start(0, target).await?;
    let store = stacyvm_store::open(&via_port(&db.url, relay.port)?).await?;
    let tenant = new_tenant(&store, "before-the-cut").await?;

    let port = relay.cut();
    let lost = tokio::time::timeout(Duration::from_secs(120), store.tenant_get(&tenant))
        .await
        .context("a call on a lost database hung")?;
    match lost {
        Err(e) => assert!(
            stacyvm_store::is_unavailable(&e),
            "not an unavailable error: {e:?}"
        ),
        Ok(t) => anyhow::bail!("read {t:?} from a database that is gone"),
    }
    let create = store.sandbox_create(&fixtures::sandbox(&tenant)).await;
    assert!(
        matches!(&create, Err(e) if stacyvm_store::is_unavailable(e)),
        "{create:?}"
    );

    let _relay = Relay::start(port, target).await?;
    store.ping().await?;
    assert!(store.tenant_get(&tenant).await?.is_some());
    Ok(())
}

/// A database made by the first schema keeps its keys and quotas when a
/// newer StacyVM migrates it, and takes what the new schema adds.
pub async fn a_first_schema_database_keeps_its_data_on_upgrade(db: &TestDb) -> anyhow::Result<()> {
    use crate::harness::Raw;
    use stacyvm_store::{Quota, Role};
    let fresh = db.fresh_database().await?;
    let raw = Raw::from_url(&fresh.url);
    let (schema, migrations) = match &raw {
        Raw::Sqlite(_) => (
            include_str!("../../migrations/sqlite/0001_initial.sql"),
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
             applied_at INTEGER NOT NULL) STRICT",
        ),
        Raw::Postgres(_) => (
            include_str!("../../migrations/postgres/0001_initial.sql"),
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, \
             applied_at BIGINT NOT NULL)",
        ),
    };
    raw.script(schema).await?;
    raw.script(&format!(
        "{migrations};
         INSERT INTO schema_migrations (version, name, applied_at) VALUES (1, 'initial', 0);
         INSERT INTO tenants (id, name, created_at) VALUES ('tnt_old', 'old', 0);
         INSERT INTO quotas (tenant_id, max_sandboxes) VALUES ('tnt_old', 3);
         INSERT INTO api_keys (id, tenant_id, role, name, key_hash, created_at)
             VALUES ('key_old', 'tnt_old', 'admin', 'old key', 'old-hash', 0);"
    ))
    .await?;
    let store = stacyvm_store::open(&fresh.url).await?;
    let key = store
        .key_by_hash("old-hash")
        .await?
        .context("the old key survived the upgrade")?;
    assert_eq!(key.role, Role::Admin);
    let tenant = key.tenant_id.clone();
    assert_eq!(
        store.quota_get(&tenant).await?,
        Quota {
            max_sandboxes: Some(3),
            ..Quota::default()
        }
    );
    // What the new schema adds works on the upgraded database.
    let mut owner = crate::fixtures::key(&tenant, "owner-hash");
    owner.role = Role::Owner;
    store.key_create(&owner).await?;
    assert_eq!(store.key_by_hash("owner-hash").await?, Some(owner));
    Ok(())
}
