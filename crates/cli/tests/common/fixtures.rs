//! Fixtures every suite of this crate shares: the workspace, the static
//! agent and the busybox test image (built once under file locks, as test
//! processes run in parallel), the test PostgreSQL, the `sqlite3` CLI, and
//! unique names. Each test binary includes this file as its `fixtures`
//! module.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Context, Result};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs a workspace script under a file lock (concurrent test processes
/// share the outputs) and returns its stdout.
pub fn locked_script(lock_name: &str, script: &str, args: &[&str]) -> Result<String> {
    let lock = target_dir().join(lock_name);
    std::fs::create_dir_all(target_dir()).context("creating the target dir")?;
    let out = Command::new("flock")
        .arg(&lock)
        .arg(workspace_root().join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {script} under flock"))?;
    ensure!(out.status.success(), "{script} failed with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A random lowercase hex string (no `rand` in this crate's dependencies).
pub fn random_hex(len: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = String::new();
    while out.len() < len {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(len);
    out
}

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", random_hex(10))
}

/// The static agent: `STACYVM_AGENT_BIN`, or built by `scripts/build-agent.sh`.
pub fn agent_bin() -> Result<PathBuf> {
    static AGENT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            let path = match std::env::var_os("STACYVM_AGENT_BIN") {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from(
                    locked_script("stacyvm-agent-build.lock", "scripts/build-agent.sh", &[])
                        .map_err(|e| format!("{e:#}"))?,
                ),
            };
            // The server runs with another working directory in mind: absolute only.
            path.canonicalize()
                .map_err(|e| format!("the agent binary {} is not usable: {e}", path.display()))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The busybox root filesystem tar: `STACYVM_TEST_IMAGE_TAR`, or built by
/// `scripts/build-test-image.sh` when it does not exist yet.
pub fn test_image_tar() -> Result<PathBuf> {
    static TAR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    TAR.get_or_init(|| {
        if let Some(p) = std::env::var_os("STACYVM_TEST_IMAGE_TAR") {
            return Ok(PathBuf::from(p));
        }
        let path = target_dir().join("test-images/busybox.tar");
        if !path.is_file() {
            locked_script(
                "stacyvm-test-image.lock",
                "scripts/build-test-image.sh",
                &[],
            )
            .map_err(|e| format!("{e:#}"))?;
        }
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "scripts/build-test-image.sh did not write {}",
                path.display()
            ))
        }
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// The provided `python` template's root filesystem tar (Debian with python3
/// and pip): `STACYVM_TEST_PYTHON_IMAGE_TAR`, or built (and cached) by
/// `scripts/build-python-image.sh`.
pub fn python_image_tar() -> Result<PathBuf> {
    static TAR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    TAR.get_or_init(|| {
        if let Some(p) = std::env::var_os("STACYVM_TEST_PYTHON_IMAGE_TAR") {
            return Ok(PathBuf::from(p));
        }
        let out = locked_script(
            "stacyvm-python-image.lock",
            "scripts/build-python-image.sh",
            &[],
        )
        .map_err(|e| format!("{e:#}"))?;
        let path = PathBuf::from(out.lines().last().unwrap_or_default());
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "scripts/build-python-image.sh did not write {}",
                path.display()
            ))
        }
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// The PostgreSQL server URL (its `postgres` database): `STACYVM_TEST_POSTGRES_URL`,
/// or the cluster `scripts/start-postgres.sh` starts.
pub fn postgres_base_url() -> Result<String> {
    static URL: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("STACYVM_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Ok(u),
        _ => locked_script("stacyvm-postgres.lock", "scripts/start-postgres.sh", &[])
            .map_err(|e| format!("{e:#}")),
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// `base` with its database replaced by `db`.
pub fn with_database(base: &str, db: &str) -> Result<String> {
    let (without_query, query) = match base.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (base, None),
    };
    let scheme_end = without_query
        .find("://")
        .ok_or_else(|| anyhow!("{base} is not a URL"))?
        + 3;
    let host_part = &without_query[scheme_end..];
    let authority = host_part.split('/').next().unwrap_or(host_part);
    let mut url = format!("{}{}/{}", &without_query[..scheme_end], authority, db);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    Ok(url)
}

pub fn psql(url: &str, sql: &str) -> Result<()> {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .context("running psql")?;
    ensure!(
        out.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs `sql` through the `sqlite3` CLI on the database `db` and returns
/// its output. A host without the CLI fails the test that asked: CI
/// installs it (`prepare_test_env` in `scripts/lib.sh`).
pub fn sqlite3(db: &str, sql: &str) -> Result<String> {
    let out = match Command::new("sqlite3").args([db, sql]).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the sqlite3 CLI is not installed, and this test reads the store with it \
             (apt-get install sqlite3, or `. scripts/lib.sh && prepare_test_env .`)"
        ),
        Err(e) => return Err(e).context("running sqlite3"),
    };
    ensure!(
        out.status.success(),
        "sqlite3 {db} {sql:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
