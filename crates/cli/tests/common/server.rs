//! The harness of the API and security suites: a real `stacyvm serve`
//! process on a temporary (or given) data dir and store (SQLite or a fresh
//! PostgreSQL database), with extra flags and environment, a small JSON
//! client that checks the documented error shape, an SSE reader, and guards
//! that leave no sandbox, process, mount or database behind, even when a
//! test panics. Each suite includes this file as its `support` module.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::{Stream, StreamExt};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

/// How long any single call may take before the test calls it a hang.
const CALL_LIMIT: Duration = Duration::from_secs(120);
/// How long a server may take to print its address.
const START_LIMIT: Duration = Duration::from_secs(90);

// Fixtures (workspace, agent, test image, PostgreSQL) are shared with the
// other suites of this crate.
pub use crate::fixtures::*;

// ---------------------------------------------------------------------------
// The server process

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub store: StoreKind,
    /// `--providers`: `docker,proot` unless a test says otherwise; `None`
    /// leaves the flag out (the server's own default, `docker`).
    pub providers: Option<String>,
    pub env: Vec<(String, String)>,
    /// Extra `stacyvm serve` flags.
    pub args: Vec<String>,
    /// Run the server in a private mount namespace without any cgroup v2
    /// hierarchy, as on a host without usable cgroups.
    pub without_cgroups: bool,
    /// The data dir to use instead of a fresh temporary one (e.g. a small
    /// file system); the caller owns it.
    pub data_dir: Option<PathBuf>,
    /// A store URL to use as is (the caller owns the database).
    pub store_url: Option<String>,
    /// `--listen`; `127.0.0.1:0` by default.
    pub listen: Option<String>,
    /// The bootstrap admin key; a random one by default (a replica of
    /// another server must use that server's).
    pub admin_key: Option<String>,
    /// Run the server as this unprivileged uid and gid (through `setpriv`,
    /// no supplementary groups); the caller gives it a data dir it owns.
    pub run_as: Option<(u32, u32)>,
    /// The test needs the in-process worker (its host view).
    pub local_worker: bool,
    /// The test needs remote workers and no in-process worker, whatever
    /// the topology.
    pub remote_workers: bool,
}

impl ServerOptions {
    pub fn new(store: StoreKind) -> ServerOptions {
        ServerOptions {
            store,
            providers: Some("docker,proot".into()),
            env: Vec::new(),
            args: Vec::new(),
            without_cgroups: false,
            data_dir: None,
            store_url: None,
            listen: None,
            admin_key: None,
            run_as: None,
            local_worker: false,
            remote_workers: false,
        }
    }

    pub fn providers(mut self, p: &str) -> ServerOptions {
        self.providers = Some(p.to_owned());
        self
    }

    /// No `--providers` flag: what `stacyvm serve` runs by default.
    pub fn server_default_providers(mut self) -> ServerOptions {
        self.providers = None;
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> ServerOptions {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn without_cgroups(mut self) -> ServerOptions {
        self.without_cgroups = true;
        self
    }

    pub fn arg(mut self, a: &str) -> ServerOptions {
        self.args.push(a.to_owned());
        self
    }

    pub fn data_dir(mut self, dir: &Path) -> ServerOptions {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    pub fn listen(mut self, addr: &str) -> ServerOptions {
        self.listen = Some(addr.to_owned());
        self
    }

    pub fn run_as(mut self, uid: u32, gid: u32) -> ServerOptions {
        self.run_as = Some((uid, gid));
        self
    }

    /// Keeps the in-process worker in every topology: the test exercises
    /// its host view (volumes kept on the control plane's own host).
    pub fn local_worker(mut self) -> ServerOptions {
        self.local_worker = true;
        self
    }

    /// Serves the control plane by two remote workers and no in-process
    /// worker in every topology.
    pub fn remote_workers(mut self) -> ServerOptions {
        self.remote_workers = true;
        self
    }

    pub fn store_url(mut self, url: &str) -> ServerOptions {
        self.store_url = Some(url.to_owned());
        self
    }
}

/// Unmounts every cgroup hierarchy, v1 and v2 (in the private mount
/// namespace the server runs in), then runs the server.
const UNMOUNT_CGROUPS_THEN_EXEC: &str = r#"
for m in $(awk '{for (i = 7; i < NF; i++) if ($i == "-") { if ($(i+1) == "cgroup2" || $(i+1) == "cgroup") print $5; break }}' /proc/self/mountinfo); do
    umount -l "$m" || exit 97
done
exec "$@"
"#;

/// A running `stacyvm serve`. Dropping it destroys every sandbox it made
/// (through the API, then straight through the providers as a fallback),
/// kills the process and drops its database.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub admin_key: String,
    opts: ServerOptions,
    store_url: Option<String>,
    pg_db: Option<(String, String)>,
    log: Arc<Mutex<Vec<String>>>,
    data_path: PathBuf,
    /// Remote workers serving this control plane (the `workers` topology).
    pub workers: Vec<crate::cluster::Worker>,
    // Declared last: removed after everything above is torn down.
    _data_dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on SQLite with Docker and PRoot.
    pub fn start_default() -> Result<Server> {
        Server::start(ServerOptions::new(StoreKind::Sqlite))
    }

    pub fn start(opts: ServerOptions) -> Result<Server> {
        let (data_dir, data_path) = match &opts.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("svm-test-")
                    .tempdir()
                    .context("making a data dir")?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let (store_url, pg_db) = match opts.store {
            _ if opts.store_url.is_some() => (opts.store_url.clone(), None),
            StoreKind::Sqlite => (None, None),
            StoreKind::Postgres => {
                let base = postgres_base_url()?;
                let db = format!("stacyvm_test_{}", random_hex(12));
                psql(&base, &format!("CREATE DATABASE {db}"))?;
                (Some(with_database(&base, &db)?), Some((base, db)))
            }
        };
        let mut server = Server {
            child: None,
            url: String::new(),
            admin_key: opts
                .admin_key
                .clone()
                .unwrap_or_else(|| format!("svm_test_{}", random_hex(40))),
            opts,
            store_url,
            pg_db,
            log: Arc::new(Mutex::new(Vec::new())),
            data_path,
            workers: Vec::new(),
            _data_dir: data_dir,
        };
        server.spawn()?;
        if server.remote_workers() {
            server.start_workers(2)?;
        }
        Ok(server)
    }

    /// Whether this server runs without an in-process worker, served by
    /// remote workers: with `STACYVM_TEST_TOPOLOGY=workers`, every server
    /// whose test does not need the in-process worker's host view (its own
    /// data dir, a host without cgroups).
    pub fn remote_workers(&self) -> bool {
        if self.opts.remote_workers {
            return true;
        }
        std::env::var("STACYVM_TEST_TOPOLOGY").as_deref() == Ok("workers")
            && !self.opts.without_cgroups
            && self.opts.run_as.is_none()
            && self.opts.data_dir.is_none()
            && !self.opts.local_worker
    }

    /// Starts `n` workers with this server's providers and waits until
    /// they are ready.
    fn start_workers(&mut self, n: usize) -> Result<()> {
        let admin = self.admin();
        let providers = self
            .opts
            .providers
            .clone()
            .unwrap_or_else(|| "docker,namespaces".into());
        let mut workers = Vec::new();
        let token = run_async(async {
            crate::cluster::worker_token(&admin, "test-workers")
                .await
                .map(|(_, t)| t)
        })?;
        // What the server's providers were given goes to the workers' too:
        // plugin executables, egress to the host, the environment.
        let mut forwarded = Vec::new();
        let mut args = self.opts.args.iter();
        while let Some(a) = args.next() {
            if a == "--plugin" {
                forwarded.push(a.clone());
                forwarded.extend(args.next().cloned());
            } else if a.starts_with("--plugin=") || a == "--egress-host-access" {
                forwarded.push(a.clone());
            }
        }
        for _ in 0..n {
            let mut o = crate::cluster::WorkerOptions::new(self, &token, &providers);
            o.args = forwarded.clone();
            o.env = self.opts.env.clone();
            workers.push(crate::cluster::Worker::start(o)?);
        }
        run_async(async {
            for w in &mut workers {
                w.ready(&admin).await?;
            }
            Ok(())
        })?;
        self.workers = workers;
        Ok(())
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_path
    }

    /// The data dirs of every host process: the server's, then its remote
    /// workers'.
    pub fn host_data_dirs(&self) -> Vec<PathBuf> {
        std::iter::once(self.data_path.clone())
            .chain(self.workers.iter().map(|w| w.data_dir().to_path_buf()))
            .collect()
    }

    /// `rel` under whichever host data dir has it (the server's when none
    /// does).
    pub fn host_path(&self, rel: &str) -> PathBuf {
        self.host_data_dirs()
            .into_iter()
            .map(|d| d.join(rel))
            .find(|p| p.exists())
            .unwrap_or_else(|| self.data_path.join(rel))
    }

    /// Everything the server and its remote workers printed so far.
    pub fn host_log_all(&self) -> String {
        std::iter::once(self.log_all())
            .chain(self.workers.iter().map(|w| w.log_all()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Options for another control plane on this one's store and admin
    /// key (a replica), with its own data dir.
    pub fn replica_options(&self) -> Result<ServerOptions> {
        let mut o = self.opts.clone();
        o.store_url = Some(
            self.store_url
                .clone()
                .ok_or_else(|| anyhow!("replicas share a PostgreSQL store"))?,
        );
        o.admin_key = Some(self.admin_key.clone());
        o.data_dir = None;
        Ok(o)
    }

    /// Everything the server printed on stderr so far.
    pub fn log_all(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.join("\n")
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The instance id that names this server's runtimes (Docker label).
    pub fn instance_id(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir().join("instance.id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = if self.opts.without_cgroups {
            // unshare and sh both exec, so the child's pid stays the server's.
            let mut c = Command::new("unshare");
            c.args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                UNMOUNT_CGROUPS_THEN_EXEC,
                "serve-without-cgroups",
            ])
            .arg(env!("CARGO_BIN_EXE_stacyvm"));
            c
        } else if let Some((uid, gid)) = self.opts.run_as {
            // setpriv execs, so the child's pid stays the server's.
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .args(["--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_stacyvm"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.opts.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(&self.data_path);
        if let Some(url) = &self.store_url {
            cmd.arg("--store").arg(url);
        }
        if let Some(p) = &self.opts.providers {
            cmd.arg("--providers").arg(p);
        }
        cmd.args(&self.opts.args);
        if self.remote_workers() && !self.opts.args.iter().any(|a| a == "--no-local-worker") {
            cmd.arg("--no-local-worker");
        }
        for var in [
            "STACYVM_STORE",
            "STACYVM_PROVIDERS",
            "STACYVM_LISTEN",
            "STACYVM_DATA_DIR",
            "STACYVM_LOG_JSON",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("STACYVM_AGENT_BIN", agent_bin()?)
            .env("STACYVM_ADMIN_KEY", &self.admin_key)
            .env(
                "STACYVM_LOG",
                std::env::var("STACYVM_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1");
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning stacyvm serve")?;
        let stderr = child.stderr.take().expect("stderr was piped");
        let (tx, rx) = mpsc::channel::<String>();
        let log = self.log.clone();
        let pid = child.id();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.split("StacyVM is up at ").nth(1) {
                        let url = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        sent = tx.send(url).is_ok();
                    }
                }
                // Shown by the test runner only when the test fails.
                eprintln!("[server {pid}] {line}");
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                log.push(line);
            }
        });
        self.child = Some(child);
        let started = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(url) if url.starts_with("http://") => {
                    self.url = url;
                    return Ok(());
                }
                Ok(other) => bail!("could not read the server address from {other:?}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    bail!(
                        "stacyvm serve exited ({status:?}) before serving:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if started.elapsed() > START_LIMIT {
                bail!(
                    "stacyvm serve did not print its address in time:\n{}",
                    self.log_tail(40)
                );
            }
        }
    }

    /// The last lines the server printed.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter()
            .rev()
            .take(n)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn admin(&self) -> Api {
        Api::new(&self.url, Some(&self.admin_key))
    }

    pub fn client(&self, key: &str) -> Api {
        Api::new(&self.url, Some(key))
    }

    pub fn anonymous(&self) -> Api {
        Api::new(&self.url, None)
    }

    /// `kill -9`: no chance to flush or shut anything down.
    pub fn kill9(&mut self) -> Result<()> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("the server is not running"))?;
        child.kill().context("SIGKILL to the server")?;
        child.wait().context("reaping the server")?;
        Ok(())
    }

    /// SIGTERM, then the exit status once the process has shut down.
    pub fn sigterm(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("the server is not running"))?;
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: `pid` is our own child, not yet reaped, so it cannot name another process.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        ensure!(
            rc == 0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().context("waiting for the server")? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the server did not exit within 60 s of SIGTERM:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again on the same data dir and store (after
    /// `kill9` or `sigterm`); the address changes, except with remote
    /// workers, which keep calling the address they were given.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "the server is still running");
        if !self.workers.is_empty() {
            let addr = self
                .url
                .strip_prefix("http://")
                .unwrap_or(&self.url)
                .trim_end_matches('/')
                .to_owned();
            self.opts.listen = Some(addr);
        }
        self.spawn()
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Destroys every sandbox through the API.
    async fn destroy_all_via_api(url: String, key: String) -> Result<()> {
        let admin = Api::new(&url, Some(&key));
        let mut cursor: Option<String> = None;
        let mut ids = Vec::new();
        loop {
            let mut path = "/v1/sandboxes?limit=1000".to_owned();
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = admin.get(&path).await?.ok(200)?;
            for s in page["sandboxes"].as_array().cloned().unwrap_or_default() {
                if s["state"] != "destroyed" {
                    ids.push(s["id"].as_str().unwrap_or_default().to_owned());
                }
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        for id in ids {
            let r = admin.delete(&format!("/v1/sandboxes/{id}")).await?;
            if r.status != 204 {
                eprintln!("cleanup: DELETE {id} gave {}: {}", r.status, r.text());
            }
        }
        Ok(())
    }

    /// Whatever the API could not remove: asks the providers themselves
    /// (the same code the server runs) to list and destroy this instance's
    /// runtimes.
    pub async fn destroy_leftovers(
        data_dir: PathBuf,
        instance: String,
        agent: PathBuf,
    ) -> Result<()> {
        use stacyvm_provider::Provider;
        let catalog = Arc::new(stacyvm_provider::images::ImageCatalog::open(
            &data_dir.join("images"),
        )?);
        let mut providers: Vec<Box<dyn Provider>> = Vec::new();
        if data_dir.join("proot").exists() {
            providers.push(Box::new(stacyvm_provider::proot::ProotProvider::new(
                stacyvm_provider::proot::ProotConfig {
                    data_dir: data_dir.clone(),
                    agent_bin: agent.clone(),
                    catalog: catalog.clone(),
                    instance: instance.clone(),
                },
            )?));
        }
        if data_dir.join("namespaces").exists() {
            providers.push(Box::new(
                stacyvm_provider::namespaces::NamespacesProvider::new(
                    stacyvm_provider::namespaces::NamespacesConfig {
                        data_dir: data_dir.clone(),
                        agent_bin: agent.clone(),
                        catalog: catalog.clone(),
                        instance: instance.clone(),
                        egress_dns_upstreams: Vec::new(),
                    },
                )?,
            ));
        }
        if data_dir.join("qemu").exists() {
            providers.push(Box::new(stacyvm_provider::qemu::QemuProvider::new(
                stacyvm_provider::qemu::QemuConfig {
                    data_dir: data_dir.clone(),
                    agent_bin: agent.clone(),
                    catalog: catalog.clone(),
                    instance: instance.clone(),
                    guest_dir: stacyvm_provider::microvm::GuestAssets::default_dir(),
                    egress_dns_upstreams: Vec::new(),
                },
            )?));
        }
        providers.push(Box::new(stacyvm_provider::docker::DockerProvider::new(
            stacyvm_provider::docker::DockerConfig {
                data_dir: data_dir.clone(),
                agent_bin: agent,
                catalog,
                instance: instance.clone(),
                pids_limit: 512,
                egress_host_access: false,
                egress_dns_upstreams: Vec::new(),
            },
        )?));
        for p in providers {
            let Ok(runtimes) = p.list().await else {
                continue;
            };
            for rt in runtimes {
                eprintln!(
                    "cleanup: {} runtime of {} was left behind; destroying it",
                    p.name(),
                    rt.sandbox_id
                );
                if let Err(e) = p.destroy(&rt.sandbox_id).await {
                    eprintln!("cleanup: could not destroy {}: {e}", rt.sandbox_id);
                }
            }
        }
        // Belt and braces for Docker: anything still labelled with this instance.
        if let Ok(out) = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=dev.stacyvm.instance={instance}"),
            ])
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                eprintln!("cleanup: removing containers {ids:?}");
                let _ = Command::new("docker")
                    .arg("rm")
                    .arg("-f")
                    .args(&ids)
                    .output();
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        let alive = self.running();
        let url = self.url.clone();
        let key = self.admin_key.clone();
        let data_dir = self.data_path.clone();
        let instance = self.instance_id();
        let agent = agent_bin().ok();
        // Drop may run inside a runtime (or while unwinding from a panic):
        // do the async work on a thread with a runtime of its own.
        let api_done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            if alive {
                if let Err(e) = rt.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(120),
                        Server::destroy_all_via_api(url, key),
                    )
                    .await
                }) {
                    eprintln!("cleanup: destroying sandboxes through the API timed out: {e}");
                }
            }
            Some(rt)
        })
        .join()
        .ok()
        .flatten();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let (Some(rt), Some(instance), Some(agent)) = (api_done, instance, agent) {
            let _ = std::thread::spawn(move || {
                if let Err(e) = rt.block_on(Server::destroy_leftovers(data_dir, instance, agent)) {
                    eprintln!("cleanup: provider fallback failed: {e:#}");
                }
            })
            .join();
        }
        if let Some((base, db)) = self.pg_db.take() {
            if let Err(e) = psql(&base, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.cleanup();
    }
}

// ---------------------------------------------------------------------------
// The client

/// A JSON client for one key (or none).
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    pub base: String,
    key: Option<String>,
}

fn http_client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("a client with a connect timeout only cannot fail to build")
        })
        .clone()
}

/// An answer: status, headers and the whole body.
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// The documented error body, checked.
#[derive(Debug)]
pub struct ApiErr {
    pub message: String,
    pub request_id: String,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("status {}, body is not JSON: {}", self.status, self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Expects `status` and returns the JSON body (`null` when empty).
    pub fn ok(&self, status: u16) -> Result<Value> {
        ensure!(
            self.status == status,
            "expected status {status}, got {}: {}",
            self.status,
            self.text()
        );
        ensure!(
            self.header("x-request-id").is_some(),
            "the response has no x-request-id header"
        );
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        self.json()
    }

    /// Expects an error with `status` and `code`, and checks the documented
    /// shape: `{"error": {"code", "message", "request_id"}}` with the
    /// request id equal to the `x-request-id` header.
    pub fn err(&self, status: u16, code: &str) -> Result<ApiErr> {
        ensure!(
            self.status == status,
            "expected {status} {code}, got status {}: {}",
            self.status,
            self.text()
        );
        let v = self.json()?;
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("error body is not an object: {v}"))?;
        ensure!(
            obj.len() == 1 && obj.contains_key("error"),
            "error body must hold only `error`: {v}"
        );
        let e = &v["error"];
        let got_code = e["code"]
            .as_str()
            .ok_or_else(|| anyhow!("error.code is not a string: {v}"))?;
        ensure!(
            got_code == code,
            "expected code {code}, got {got_code}: {v}"
        );
        let message = e["message"]
            .as_str()
            .ok_or_else(|| anyhow!("error.message is not a string: {v}"))?;
        ensure!(!message.trim().is_empty(), "error.message is empty: {v}");
        let request_id = e["request_id"]
            .as_str()
            .ok_or_else(|| anyhow!("error.request_id is not a string: {v}"))?;
        ensure!(!request_id.is_empty(), "error.request_id is empty: {v}");
        let header = self
            .header("x-request-id")
            .ok_or_else(|| anyhow!("no x-request-id header on a {status}"))?;
        ensure!(
            header == request_id,
            "x-request-id header {header:?} differs from the body's {request_id:?}"
        );
        Ok(ApiErr {
            message: message.to_owned(),
            request_id: request_id.to_owned(),
        })
    }
}

impl Api {
    pub fn new(base: &str, key: Option<&str>) -> Api {
        Api {
            http: http_client(),
            base: base.trim_end_matches('/').to_owned(),
            key: key.map(str::to_owned),
        }
    }

    pub fn with_key(&self, key: &str) -> Api {
        Api {
            key: Some(key.to_owned()),
            ..self.clone()
        }
    }

    /// The same client on a connection pool of its own that drops a
    /// connection after `idle` unused: against a server with a short idle
    /// timeout, a kept-alive connection the server is closing at that very
    /// moment is never reused (the send would fail on the client's side).
    pub fn with_pool_idle(&self, idle: Duration) -> Api {
        Api {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .pool_idle_timeout(idle)
                .build()
                .expect("a client with timeouts only cannot fail to build"),
            ..self.clone()
        }
    }

    /// The key this client sends (empty for none).
    pub fn key_secret(&self) -> &str {
        self.key.as_deref().unwrap_or_default()
    }

    /// A request with this client's key; finish it with [`Api::send`].
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Resp> {
        let fut = async {
            let resp = rb.send().await.context("sending the request")?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .bytes()
                .await
                .context("reading the response body")?
                .to_vec();
            Ok::<_, anyhow::Error>(Resp {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(CALL_LIMIT, fut)
            .await
            .map_err(|_| anyhow!("the call did not answer within {CALL_LIMIT:?}"))?
    }

    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Resp> {
        self.send(self.request(Method::DELETE, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Resp> {
        self.send(self.request(Method::POST, path).json(&body))
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Result<Resp> {
        self.send(self.request(Method::PUT, path).json(&body)).await
    }

    /// POST with a raw body and content type (for malformed JSON).
    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<Resp> {
        self.send(
            self.request(Method::POST, path)
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    pub async fn put_bytes(&self, path: &str, body: Vec<u8>) -> Result<Resp> {
        self.send(
            self.request(Method::PUT, path)
                .header("content-type", "application/octet-stream")
                .body(body),
        )
        .await
    }

    // --- domain helpers --------------------------------------------------

    /// Creates a sandbox and checks it came back running.
    pub async fn create_sandbox(&self, body: Value) -> Result<Value> {
        let s = self
            .post("/v1/sandboxes", body.clone())
            .await?
            .ok(201)
            .with_context(|| format!("creating {body}"))?;
        ensure!(
            s["state"] == "running",
            "a created sandbox must be running: {s}"
        );
        ensure!(
            s["id"].as_str().is_some_and(|id| id.starts_with("sbx_")),
            "sandbox id: {s}"
        );
        Ok(s)
    }

    /// A running busybox sandbox on `provider`.
    pub async fn sandbox(&self, provider: &str) -> Result<String> {
        let s = self
            .create_sandbox(json!({"image": "busybox", "provider": provider}))
            .await?;
        Ok(s["id"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn exec(&self, id: &str, body: Value) -> Result<Value> {
        self.post(&format!("/v1/sandboxes/{id}/exec"), body)
            .await?
            .ok(200)
    }

    /// Runs `sh -c script`, expects exit 0, returns stdout.
    pub async fn sh(&self, id: &str, script: &str) -> Result<String> {
        let out = self.exec(id, json!({"cmd": ["sh", "-c", script]})).await?;
        ensure!(out["exit_code"] == 0, "`{script}` failed: {out}");
        Ok(out["stdout"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn destroy(&self, id: &str) -> Result<()> {
        self.delete(&format!("/v1/sandboxes/{id}")).await?.ok(204)?;
        Ok(())
    }

    /// Imports the busybox test image as `busybox` (admin only).
    pub async fn import_busybox(&self) -> Result<Value> {
        self.import_image("busybox").await
    }

    /// Imports the busybox test image under `name` (admin only).
    pub async fn import_image(&self, name: &str) -> Result<Value> {
        let tar = tokio::fs::read(test_image_tar()?)
            .await
            .context("reading the test image")?;
        let rb = self
            .request(Method::POST, &format!("/v1/images?name={name}"))
            .header("content-type", "application/x-tar")
            .body(tar);
        self.send(rb).await?.ok(201)
    }

    /// A new tenant with no limits that may use every provider the server
    /// runs (PRoot included); returns its id.
    pub async fn tenant(&self, name: &str) -> Result<String> {
        let t = self
            .post("/v1/tenants", json!({"name": unique(name)}))
            .await?
            .ok(201)?;
        let id = t["id"]
            .as_str()
            .ok_or_else(|| anyhow!("tenant without id: {t}"))?
            .to_owned();
        let status = self.get("/v1/status").await?.ok(200)?;
        let providers: Vec<Value> = status["providers"]
            .as_array()
            .map(|p| p.iter().map(|p| p["name"].clone()).collect())
            .unwrap_or_default();
        self.put(
            &format!("/v1/tenants/{id}/quota"),
            json!({"allowed_providers": providers}),
        )
        .await?
        .ok(200)?;
        Ok(id)
    }

    /// A new key of `role` on `tenant`; returns its id and a client using it.
    pub async fn key(&self, tenant: &str, role: &str) -> Result<(String, Api)> {
        let k = self
            .post(
                "/v1/keys",
                json!({"tenant_id": tenant, "role": role, "name": unique(role)}),
            )
            .await?
            .ok(201)?;
        let secret = k["key"]
            .as_str()
            .ok_or_else(|| anyhow!("key without secret: {k}"))?;
        ensure!(secret.starts_with("svm_"), "keys start with svm_: {k}");
        Ok((
            k["id"].as_str().unwrap_or_default().to_owned(),
            self.with_key(secret),
        ))
    }

    /// A new tenant with a key of `role`: (tenant id, client).
    pub async fn tenant_with(&self, role: &str) -> Result<(String, Api)> {
        let t = self.tenant("t").await?;
        let (_, api) = self.key(&t, role).await?;
        Ok((t, api))
    }

    /// Every audit event this key may see matching `query` (e.g. `outcome=denied`).
    pub async fn audit(&self, query: &str) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/audit?limit=1000&{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = self.get(&path).await?.ok(200)?;
            out.extend(page["events"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
    }

    /// Starts a streaming exec and returns its event reader (or the error answer).
    pub async fn exec_stream(
        &self,
        id: &str,
        body: Value,
    ) -> Result<std::result::Result<Sse, Resp>> {
        let resp = self
            .request(Method::POST, &format!("/v1/sandboxes/{id}/exec/stream"))
            .json(&body)
            .send()
            .await
            .context("starting a streaming exec")?;
        let status = resp.status().as_u16();
        if status != 200 {
            let headers = resp.headers().clone();
            let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            return Ok(Err(Resp {
                status,
                headers,
                body,
            }));
        }
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        ensure!(
            ct.starts_with("text/event-stream"),
            "a stream answers text/event-stream, not {ct:?}"
        );
        Ok(Ok(Sse::from_response(resp)))
    }
}

impl Sse {
    /// Reads the events of an answer already known to be `text/event-stream`.
    pub fn from_response(resp: reqwest::Response) -> Sse {
        Sse {
            stream: Box::pin(resp.bytes_stream().map(|r| r.map(|b| b.to_vec()))),
            buf: Vec::new(),
        }
    }
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub data: Value,
}

type ChunkStream = Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>;

/// Reads `text/event-stream` events as they arrive. Dropping it closes the
/// connection.
pub struct Sse {
    stream: ChunkStream,
    buf: Vec<u8>,
}

impl Sse {
    /// The next event, `None` at the end of the stream.
    pub async fn next_event(&mut self) -> Result<Option<SseEvent>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block).context("an SSE block is not UTF-8")?;
                let mut event = String::from("message");
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = data.join("\n");
                let data = serde_json::from_str(&data)
                    .with_context(|| format!("SSE data is not JSON: {data}"))?;
                return Ok(Some(SseEvent { event, data }));
            }
            let next = tokio::time::timeout(CALL_LIMIT, self.stream.next())
                .await
                .map_err(|_| anyhow!("no SSE event within {CALL_LIMIT:?}"))?;
            match next {
                Some(chunk) => self
                    .buf
                    .extend_from_slice(&chunk.context("reading the event stream")?),
                None => {
                    ensure!(
                        self.buf.iter().all(|b| b.is_ascii_whitespace()),
                        "the stream ended mid-event"
                    );
                    return Ok(None);
                }
            }
        }
    }

    /// All remaining events.
    pub async fn collect(mut self) -> Result<Vec<SseEvent>> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event().await? {
            out.push(e);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Waiting and runtime inspection

/// Runs a future to completion on a runtime of its own (from sync code that
/// may itself run inside a runtime).
pub fn run_async<T: Send>(f: impl std::future::Future<Output = Result<T>> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a runtime")?
                .block_on(f)
        })
        .join()
        .map_err(|_| anyhow!("a helper thread panicked"))?
    })
}

/// Polls `check` until it returns `Some`, or fails after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Docker containers (any state) of one sandbox.
pub fn docker_containers_of(sandbox: &str) -> Result<Vec<String>> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.stacyvm.sandbox={sandbox}"),
        ])
        .output()
        .context("running docker ps")?;
    ensure!(
        out.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// Whether the sandbox's runtime is still on the host (the server's own,
/// or one of its remote workers').
pub fn runtime_exists(server: &Server, provider: &str, sandbox: &str) -> Result<bool> {
    match provider {
        "docker" => Ok(!docker_containers_of(sandbox)?.is_empty()),
        "proot" | "namespaces" => Ok(std::iter::once(server.data_dir())
            .chain(server.workers.iter().map(|w| w.data_dir()))
            .any(|d| d.join(provider).join(sandbox).exists())),
        other => bail!("no runtime check for provider {other}"),
    }
}

/// The string at `v[key]`, or an error naming the object.
pub fn s<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v[key]
        .as_str()
        .ok_or_else(|| anyhow!("`{key}` is not a string in {v}"))
}
