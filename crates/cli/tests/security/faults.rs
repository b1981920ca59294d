//! Crashes and faults: `kill -9` of the server in the middle of a burst of
//! concurrent creates, a private dockerd stopped and started under a running
//! server, a private PostgreSQL cluster stopped and started, and a full disk
//! under the data dir. Each test owns its fixtures (never the shared dockerd
//! or PostgreSQL) and removes them on drop, panics included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{
    agent_bin, eventually, random_hex, s, Api, Resp, Server, ServerOptions, StoreKind,
};

// ---------------------------------------------------------------------------
// Helpers

/// Every sandbox the server knows (admins see all tenants): id → state.
async fn all_sandboxes(admin: &Api) -> Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/sandboxes?limit=1000".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = admin.get(&path).await?.ok(200)?;
        for sb in page["sandboxes"].as_array().cloned().unwrap_or_default() {
            out.insert(s(&sb, "id")?.to_owned(), sb);
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(out),
        }
    }
}

/// The sandbox ids that have a runtime on the host: the provider's own
/// listing, the Docker containers of this instance, and every process that
/// carries a sandbox's environment or runs over its root.
async fn runtimes_on_host(server: &Server, provider: &str) -> Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    let instance = server
        .instance_id()
        .ok_or_else(|| anyhow!("the server wrote no instance.id"))?;
    match provider {
        "docker" => {
            let out = Command::new("docker")
                .args([
                    "ps",
                    "-a",
                    "--filter",
                    &format!("label=dev.stacyvm.instance={instance}"),
                    "--format",
                    "{{.Label \"dev.stacyvm.sandbox\"}}",
                ])
                .output()
                .context("docker ps")?;
            ensure!(
                out.status.success(),
                "docker ps: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_owned),
            );
        }
        "proot" => {
            use stacyvm_provider::Provider;
            let catalog = Arc::new(stacyvm_provider::images::ImageCatalog::open(
                &server.data_dir().join("images"),
            )?);
            let p = stacyvm_provider::proot::ProotProvider::new(
                stacyvm_provider::proot::ProotConfig {
                    data_dir: server.data_dir().to_path_buf(),
                    agent_bin: agent_bin()?,
                    catalog,
                    instance,
                },
            )?;
            for rt in p.list().await? {
                ids.insert(rt.sandbox_id.to_string());
            }
            ids.extend(sandbox_processes(server.data_dir(), "proot")?.into_values());
        }
        "namespaces" => {
            use stacyvm_provider::Provider;
            let catalog = Arc::new(stacyvm_provider::images::ImageCatalog::open(
                &server.data_dir().join("images"),
            )?);
            let p = stacyvm_provider::namespaces::NamespacesProvider::new(
                stacyvm_provider::namespaces::NamespacesConfig {
                    data_dir: server.data_dir().to_path_buf(),
                    agent_bin: agent_bin()?,
                    catalog,
                    instance,
                    egress_dns_upstreams: Vec::new(),
                },
            )?;
            for rt in p.list().await? {
                ids.insert(rt.sandbox_id.to_string());
            }
            ids.extend(sandbox_processes(server.data_dir(), "namespaces")?.into_values());
        }
        other => bail!("no runtime listing for {other}"),
    }
    Ok(ids)
}

/// Processes that belong to a sandbox (pid → sandbox id): by the
/// `STACYVM_SANDBOX` variable every sandbox process carries, or a command
/// line naming the sandbox's directory under `data_dir/provider`.
fn sandbox_processes(data_dir: &Path, provider: &str) -> Result<BTreeMap<u32, String>> {
    let mut out = BTreeMap::new();
    let prefix = data_dir.join(provider).display().to_string();
    for e in std::fs::read_dir("/proc")?.filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if let Some(rest) = cmdline.split(&format!("{prefix}/")).nth(1) {
            let id: String = rest
                .chars()
                .take_while(|c| *c != '/' && *c != ' ')
                .collect();
            if id.starts_with("sbx_") {
                out.insert(pid, id);
                continue;
            }
        }
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        for var in environ.split(|b| *b == 0) {
            if let Some(id) = var.strip_prefix(b"STACYVM_SANDBOX=") {
                let id = String::from_utf8_lossy(id).into_owned();
                // Only this server's sandboxes: its rows are what we compare against.
                if data_dir.join(provider).join(&id).exists() || cmdline.contains(&prefix) {
                    out.insert(pid, id);
                }
            }
        }
    }
    Ok(out)
}

fn is_live(state: &str) -> bool {
    matches!(state, "running" | "paused")
}

fn is_transitional(state: &str) -> bool {
    matches!(state, "pending" | "starting" | "stopping")
}

/// Waits until no row is mid-transition and the runtimes on the host are
/// exactly the live rows; returns the rows.
async fn settle(server: &Server, admin: &Api, provider: &str) -> Result<BTreeMap<String, Value>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = all_sandboxes(admin).await?;
        let live: BTreeSet<String> = rows
            .iter()
            .filter(|(_, v)| is_live(v["state"].as_str().unwrap_or_default()))
            .map(|(k, _)| k.clone())
            .collect();
        let moving: Vec<&String> = rows
            .iter()
            .filter(|(_, v)| is_transitional(v["state"].as_str().unwrap_or_default()))
            .map(|(k, _)| k)
            .collect();
        let host = runtimes_on_host(server, provider).await?;
        let leaked: Vec<&String> = host.difference(&live).collect();
        let missing: Vec<&String> = live.difference(&host).collect();
        if moving.is_empty() && leaked.is_empty() && missing.is_empty() {
            return Ok(rows);
        }
        if Instant::now() > deadline {
            bail!(
                "the {provider} sandboxes never settled after the restart: mid-transition rows {moving:?}; \
                 runtimes without a live row (leaked) {leaked:?}; live rows without a runtime {missing:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A 5xx or 4xx answer with the documented error body; returns the code.
fn documented_error(r: &Resp, what: &str) -> Result<String> {
    ensure!(
        r.status >= 400,
        "{what}: expected an error, got {}: {}",
        r.status,
        r.text()
    );
    let v = r.json().with_context(|| what.to_owned())?;
    let code = v["error"]["code"]
        .as_str()
        .ok_or_else(|| anyhow!("{what}: no error.code in {v}"))?
        .to_owned();
    r.err(r.status, &code).with_context(|| what.to_owned())?;
    Ok(code)
}

// ---------------------------------------------------------------------------
// kill -9 during a burst of creates

async fn kill9_during_create_burst(provider: &str, n: usize) -> Result<()> {
    let mut server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers(provider))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    // Warm the image (Docker imports the catalog image on first use).
    let first = admin.sandbox(provider).await?;

    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let api = admin.clone();
        let done = done.clone();
        let provider = provider.to_owned();
        tasks.push(tokio::spawn(async move {
            let rid = format!("burst-{i}-{}", random_hex(12));
            let rb = api
                .request(Method::POST, "/v1/sandboxes")
                .header("x-request-id", &rid)
                .json(&json!({"image": "busybox", "provider": provider, "labels": {"burst": "1"}}));
            let r = api.send(rb).await;
            done.fetch_add(1, Ordering::SeqCst);
            (rid, r)
        }));
    }
    // Kill while the burst is in flight: once a fifth of it was answered,
    // or once four fifths of its runtimes exist, whichever comes first.
    // (Answers can all come at once at the end: the creates' store writes
    // take turns, so each create's last write queues behind the others'
    // first ones, and the audit events of creates that finish together
    // share one commit.)
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::SeqCst) < n / 5 && Instant::now() < deadline {
        let spawned = runtimes_on_host(&server, provider).await?.len();
        if spawned >= n * 4 / 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9()?;
    let mut acknowledged: Vec<(String, u16, Value)> = Vec::new();
    let mut cut = 0usize;
    for t in tasks {
        let (rid, r) = t.await.context("a create task")?;
        match r {
            Ok(r) if r.status < 500 => {
                acknowledged.push((rid, r.status, r.json().unwrap_or(Value::Null)))
            }
            Ok(r) => eprintln!(
                "a create answered {} before the kill: {}",
                r.status,
                r.text()
            ),
            Err(_) => cut += 1,
        }
    }
    eprintln!(
        "{provider}: {} of {n} creates acknowledged before kill -9, {cut} cut off",
        acknowledged.len()
    );
    ensure!(
        cut > 0,
        "the kill came after the whole burst; nothing was in flight"
    );

    server.restart()?;
    let admin = server.admin();
    let rows = settle(&server, &admin, provider).await?;
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for v in rows.values() {
        *states
            .entry(v["state"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    eprintln!("{provider}: after the restart: {states:?}");
    // Every row is usable or cleanly ended.
    for (id, v) in &rows {
        let state = s(v, "state")?;
        match state {
            "running" => {
                let out = admin
                    .sh(id, "echo alive")
                    .await
                    .with_context(|| format!("exec in {id} after the restart"))?;
                ensure!(out.trim() == "alive");
            }
            "failed" | "lost" | "destroyed" => {
                ensure!(
                    state == "destroyed" || v["failure"].is_object(),
                    "{id} says why it failed: {v}"
                );
            }
            other => bail!("{id} is {other} after the restart settled"),
        }
    }
    // What the clients were told holds: every 201 is a running sandbox.
    for (_, status, body) in &acknowledged {
        if *status == 201 {
            let id = s(body, "id")?;
            let row = rows
                .get(id)
                .ok_or_else(|| anyhow!("acknowledged sandbox {id} is missing"))?;
            ensure!(
                row["state"] == "running",
                "acknowledged sandbox {id} is {}",
                row["state"]
            );
        }
    }
    ensure!(rows.contains_key(&first));
    // Every acknowledged call has its audit event.
    let events = admin.audit("action=sandbox.create").await?;
    let audited: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["request_id"].as_str())
        .collect();
    for (rid, status, _) in &acknowledged {
        ensure!(
            audited.contains(rid.as_str()),
            "the acknowledged create {rid} ({status}) has no audit event"
        );
    }

    // Everything can still be destroyed, and then nothing is left.
    for (id, v) in &rows {
        if v["state"] != "destroyed" {
            admin.destroy(id).await?;
        }
    }
    let left = runtimes_on_host(&server, provider).await?;
    ensure!(
        left.is_empty(),
        "{provider}: runtimes left after destroying everything: {left:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_kill9_during_50_proot_creates_loses_and_leaks_nothing() -> Result<()> {
    kill9_during_create_burst("proot", 50).await
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_kill9_during_50_docker_creates_loses_and_leaks_nothing() -> Result<()> {
    kill9_during_create_burst("docker", 50).await
}

/// Namespaces sandboxes are children of the server: they outlive its
/// `kill -9` (their init is reparented) and the restarted server adopts
/// them from their directories, or ends the half-made ones.
#[tokio::test(flavor = "multi_thread")]
async fn crash_kill9_during_50_namespaces_creates_loses_and_leaks_nothing() -> Result<()> {
    kill9_during_create_burst("namespaces", 50).await
}

// ---------------------------------------------------------------------------
// A private dockerd, stopped and started under a running server

struct PrivateDockerd {
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateDockerd {
    fn start() -> Result<PrivateDockerd> {
        // Short: the socket path must fit in 108 bytes.
        let dir = PathBuf::from(format!("/tmp/svm-dk-{}", random_hex(8)));
        std::fs::create_dir_all(dir.join("root"))?;
        std::fs::create_dir_all(dir.join("exec"))?;
        let mut d = PrivateDockerd { dir, child: None };
        d.up()?;
        Ok(d)
    }

    fn host(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.display())
    }

    fn up(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        // In its own network namespace: a dockerd started with `--bridge none`
        // deletes the host's `docker0`, which the shared dockerd (and every
        // other test's egress sandbox) needs. `unshare` execs dockerd, so the
        // child is dockerd itself.
        let child = Command::new("unshare")
            .args(["--net", "dockerd"])
            .arg("--host")
            .arg(self.host())
            .arg("--data-root")
            .arg(self.dir.join("root"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a private dockerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("docker")
                .args(["-H", &self.host(), "version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the private dockerd did not answer: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM, as a host's service manager would; SIGKILL after 60 s.
    fn down(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: `pid` is our own child, not yet reaped, so it names no other process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Ok(out) = Command::new("docker")
                .args(["-H", &self.host(), "ps", "-aq"])
                .output()
            {
                let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                if !ids.is_empty() {
                    let _ = Command::new("docker")
                        .args(["-H", &self.host(), "rm", "-f"])
                        .args(&ids)
                        .output();
                }
            }
        }
        let _ = self.down();
        // Whatever the daemon left mounted under its roots.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let prefix = self.dir.display().to_string();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", p]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn docker_health(api: &Api) -> Result<(bool, String)> {
    let st = api.get("/v1/status").await?.ok(200)?;
    let p = st["providers"]
        .as_array()
        .and_then(|l| l.iter().find(|p| p["name"] == "docker"))
        .cloned()
        .ok_or_else(|| anyhow!("no docker provider in {st}"))?;
    Ok((
        p["healthy"] == true,
        p["detail"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn dockerd_restart_under_a_running_server_is_reported_and_recovered() -> Result<()> {
    let mut dockerd = PrivateDockerd::start()?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .env("DOCKER_HOST", &dockerd.host()),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let before = admin.sandbox("docker").await?;
    ensure!(docker_health(&admin).await?.0, "docker is healthy at first");
    server.anonymous().get("/readyz").await?.ok(200)?;

    dockerd.down()?;
    let detail = eventually(Duration::from_secs(60), "docker reported unhealthy", || {
        let admin = &admin;
        async move {
            let (healthy, detail) = docker_health(admin).await?;
            Ok((!healthy).then_some(detail))
        }
    })
    .await?;
    ensure!(!detail.is_empty(), "an unhealthy provider says why");
    eprintln!("docker while dockerd is down: {detail}");
    let ready = server.anonymous().get("/readyz").await?;
    let e = ready.err(503, "provider_unavailable")?;
    ensure!(
        e.message.contains("docker"),
        "/readyz names the provider: {}",
        e.message
    );
    let create = admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "docker"}),
        )
        .await?;
    ensure!(
        create.status == 503,
        "a create without dockerd: {} {}",
        create.status,
        create.text()
    );
    let code = documented_error(&create, "create without dockerd")?;
    ensure!(
        code == "provider_unavailable" || code == "no_capacity",
        "{code}"
    );
    // The server itself keeps serving.
    server.anonymous().get("/healthz").await?.ok(200)?;

    dockerd.up()?;
    eventually(Duration::from_secs(60), "docker healthy again", || {
        let admin = &admin;
        async move { Ok(docker_health(admin).await?.0.then_some(())) }
    })
    .await?;
    server.anonymous().get("/readyz").await?.ok(200)?;
    let after = admin.sandbox("docker").await?;
    ensure!(admin.sh(&after, "echo alive").await?.trim() == "alive");
    // The sandbox that lived through the outage is usable or reported, and destroyable.
    let st = eventually(Duration::from_secs(60), "the old sandbox to settle", || {
        let admin = &admin;
        let before = &before;
        async move {
            let v = admin
                .get(&format!("/v1/sandboxes/{before}"))
                .await?
                .ok(200)?;
            let state = s(&v, "state")?.to_owned();
            if state == "running" {
                let r = admin.exec(before, json!({"cmd": ["true"]})).await;
                return Ok(r.is_ok().then_some(state));
            }
            Ok(matches!(state.as_str(), "failed" | "lost").then_some(state))
        }
    })
    .await?;
    eprintln!("the sandbox that lived through the dockerd restart is {st}");
    admin.destroy(&before).await?;
    admin.destroy(&after).await?;
    let left = run_cmd(Command::new("docker").args(["-H", &dockerd.host(), "ps", "-aq"]))?;
    ensure!(
        left.trim().is_empty(),
        "containers left in the private dockerd: {left}"
    );
    drop(server);
    Ok(())
}

// ---------------------------------------------------------------------------
// A private PostgreSQL cluster, stopped and started under a running server

struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(args: &[&str]) -> Result<String> {
    run_cmd(
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args),
    )
}

impl PrivatePostgres {
    fn start() -> Result<PrivatePostgres> {
        ensure!(
            Path::new(PG_BIN).join("postgres").exists(),
            "PostgreSQL 15 is not installed in {PG_BIN} (scripts/start-postgres.sh installs it)"
        );
        // initdb refuses to run as root: the cluster belongs to `postgres`.
        if !Command::new("id")
            .arg("postgres")
            .output()?
            .status
            .success()
        {
            run_cmd(Command::new("useradd").args([
                "--system",
                "--home-dir",
                "/var/lib/postgresql",
                "--shell",
                "/bin/bash",
                "postgres",
            ]))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = PathBuf::from(format!("/tmp/svm-pg-{}", random_hex(8)));
        std::fs::create_dir_all(&dir)?;
        let pg = PrivatePostgres { dir, port };
        run_cmd(Command::new("chown").arg("postgres").arg(&pg.dir))?;
        let data = pg.data();
        as_postgres(&[
            &format!("{PG_BIN}/initdb"),
            "-D",
            &data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ])?;
        pg.up()?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn up(&self) -> Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("pg.log").display().to_string();
        as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            &self.data(),
            "-o",
            &opts,
            "-l",
            &log,
            "-w",
            "start",
        ])?;
        Ok(())
    }

    /// An immediate stop: the database vanishes as in a crash.
    fn down(&self) -> Result<()> {
        as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            &self.data(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ])?;
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_stopped_under_a_running_server_gives_503_then_recovers() -> Result<()> {
    let pg = PrivatePostgres::start()?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Postgres)
            .store_url(&pg.url())
            .providers("proot"),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let id = admin.sandbox("proot").await?;
    server.anonymous().get("/readyz").await?.ok(200)?;

    pg.down()?;
    let mut refused = 0;
    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/sandboxes".into(), None),
        (Method::GET, format!("/v1/sandboxes/{id}"), None),
        (
            Method::POST,
            "/v1/sandboxes".into(),
            Some(json!({"image": "busybox", "provider": "proot"})),
        ),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["true"]})),
        ),
        (Method::GET, "/v1/status".into(), None),
        (Method::GET, "/v1/audit".into(), None),
    ];
    // Concurrently: each waits for the pool's acquire timeout before it answers.
    let answers = futures_util::future::join_all(calls.iter().map(|(m, path, body)| {
        let mut rb = admin.request(m.clone(), path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let started = Instant::now();
        let admin = &admin;
        async move { (admin.send(rb).await, started.elapsed()) }
    }))
    .await;
    for ((m, path, _), (r, took)) in calls.iter().zip(answers) {
        let r = r?;
        let what = format!("{m} {path} with PostgreSQL down");
        ensure!(r.status == 503, "{what}: {} {}", r.status, r.text());
        let code = documented_error(&r, &what)?;
        let msg = r.json()?["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        ensure!(
            msg.contains("store"),
            "{what}: the message says the store is unavailable: {msg} ({code})"
        );
        eprintln!("{what}: {} {code} after {took:?}", r.status);
        refused += 1;
    }
    let ready = server.anonymous().get("/readyz").await?;
    let e = ready.err(503, "provider_unavailable")?;
    ensure!(
        e.message.contains("store"),
        "/readyz says the store is down: {}",
        e.message
    );
    server.anonymous().get("/healthz").await?.ok(200)?;
    eprintln!("{refused} calls refused with 503 while PostgreSQL was down");

    pg.up()?;
    eventually(Duration::from_secs(60), "ready again", || {
        let server = &server;
        async move { Ok((server.anonymous().get("/readyz").await?.status == 200).then_some(())) }
    })
    .await?;
    let v = admin.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    ensure!(v["state"] == "running", "{v}");
    ensure!(admin.sh(&id, "echo alive").await?.trim() == "alive");
    let again = admin.sandbox("proot").await?;
    admin.destroy(&again).await?;
    let creates = admin.audit("action=sandbox.create").await?;
    ensure!(
        creates
            .iter()
            .any(|e| e["target"] == id.as_str() && e["outcome"] == "ok"),
        "the create from before the outage is still audited"
    );
    drop(server);
    Ok(())
}

// ---------------------------------------------------------------------------
// A full disk under the data dir

struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("svm-full-")
            .tempdir_in("/tmp")?;
        run_cmd(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0755"),
                    "tmpfs",
                ])
                .arg(dir.path()),
        )?;
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Overlays of sandboxes a failed test left, then the file system.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let prefix = self.dir.path().display().to_string();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", p]).output();
        }
    }
}

/// Fills the file system under `dir` with one file until it is full.
fn fill(dir: &Path) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0xa5u8; 1 << 20];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e).context("filling the disk"),
        }
    }
    // Small writes too, so not even a page is left.
    while let Ok(n) = f.write(&[0u8; 512]) {
        if n == 0 {
            break;
        }
    }
    Ok(path)
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_on_the_data_dir_gives_clear_errors_and_no_corruption() -> Result<()> {
    let fs = Tmpfs::mount("96m")?;
    let data = fs.path().join("data");
    std::fs::create_dir_all(&data)?;
    let mut server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("proot")
            .data_dir(&data),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let id = admin.sandbox("proot").await?;
    admin
        .put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/work/before"),
            b"before".to_vec(),
        )
        .await?
        .ok(201)?;

    let filler = fill(fs.path())?;
    let mut outcomes = Vec::new();
    // A 4 MiB upload cannot fit.
    let r = admin
        .put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/work/big"),
            vec![7u8; 4 << 20],
        )
        .await?;
    let code = documented_error(&r, "an upload on a full disk")?;
    ensure!(
        r.status != 500,
        "a full disk is not an internal error: {}",
        r.text()
    );
    outcomes.push(format!("upload: {} {code}", r.status));
    // The sandbox's own writes fail with ENOSPC, the sandbox lives on.
    let out = admin
        .exec(
            &id,
            json!({"cmd": ["sh", "-c", "dd if=/dev/zero of=/work/fill bs=1M count=8"]}),
        )
        .await;
    match out {
        Ok(v) => {
            ensure!(v["exit_code"] != 0, "dd on a full disk: {v}");
            outcomes.push(format!("dd in the sandbox: exit {}", v["exit_code"]));
        }
        Err(e) => outcomes.push(format!("dd in the sandbox: {e:#}")),
    }
    let imports = admin
        .send(
            admin
                .request(Method::POST, "/v1/images?name=busybox2")
                .header("content-type", "application/x-tar")
                .body(std::fs::read(crate::support::test_image_tar()?)?),
        )
        .await?;
    let code = documented_error(&imports, "an image import on a full disk")?;
    outcomes.push(format!("image import: {} {code}", imports.status));
    // A create: it must answer (success if it fit, else a clear error).
    let create = admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot"}),
        )
        .await?;
    if create.status == 201 {
        outcomes.push("create: 201 (fit in what was left)".into());
    } else {
        let code = documented_error(&create, "a create on a full disk")?;
        ensure!(
            create.status != 500,
            "a full disk is not an internal error: {}",
            create.text()
        );
        outcomes.push(format!("create: {} {code}", create.status));
    }
    server.anonymous().get("/healthz").await?.ok(200)?;
    eprintln!("on a full disk: {outcomes:?}");

    std::fs::remove_file(&filler)?;
    // Service resumes.
    admin
        .put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/work/after"),
            vec![7u8; 4 << 20],
        )
        .await?
        .ok(201)?;
    let raw = admin
        .get(&format!("/v1/sandboxes/{id}/files?path=/work/before"))
        .await?;
    ensure!(
        raw.status == 200 && raw.body == b"before",
        "a file written before the disk filled survives"
    );
    ensure!(admin.sh(&id, "echo alive").await?.trim() == "alive");
    let fresh = admin.sandbox("proot").await?;
    ensure!(admin.sh(&fresh, "echo alive").await?.trim() == "alive");
    admin.audit("").await?;

    // The store is intact, also across a restart.
    server.sigterm()?;
    let db = data.join("stacyvm.db");
    let db = db.to_str().context("a UTF-8 data dir")?;
    let check = crate::fixtures::sqlite3(db, "PRAGMA integrity_check")?;
    ensure!(check.trim() == "ok", "integrity_check: {check}");
    server.restart()?;
    let admin = server.admin();
    let v = admin.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    ensure!(v["state"] == "running", "{v}");
    ensure!(admin.sh(&id, "cat /work/before").await?.trim() == "before");
    drop(server);
    drop(fs);
    Ok(())
}

async fn pool_ready(admin: &Api, provider: &str) -> Result<u64> {
    let st = admin.get("/v1/status").await?.ok(200)?;
    Ok(st["pools"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["provider"] == provider))
        .and_then(|p| p["ready"].as_u64())
        .unwrap_or(0))
}

async fn pools_full(admin: &Api) -> Result<()> {
    eventually(
        Duration::from_secs(120),
        "the warm pools to fill",
        || async move {
            Ok(
                (pool_ready(admin, "docker").await? == 3 && pool_ready(admin, "proot").await? == 2)
                    .then_some(()),
            )
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_pool_members_never_outlive_the_server() -> Result<()> {
    let mut server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,proot")
            .arg("--warm-pool")
            .arg("docker:busybox=3,proot:busybox=2"),
    )?;
    server.admin().import_busybox().await?;
    pools_full(&server.admin()).await?;
    assert_eq!(runtimes_on_host(&server, "docker").await?.len(), 3);
    assert_eq!(runtimes_on_host(&server, "proot").await?.len(), 2);

    // A crash leaves the members behind; the next start destroys them and
    // fills the pools anew, so there are never more than the pools hold.
    server.kill9()?;
    assert_eq!(runtimes_on_host(&server, "docker").await?.len(), 3);
    server.restart()?;
    pools_full(&server.admin()).await?;
    eventually(Duration::from_secs(60), "the crash's members to go", || {
        let server = &server;
        async move {
            let (d, p) = (
                runtimes_on_host(server, "docker").await?.len(),
                runtimes_on_host(server, "proot").await?.len(),
            );
            Ok((d == 3 && p == 2).then_some(()))
        }
    })
    .await?;

    // A graceful stop destroys the idle members: nothing is left running
    // for a server that may never start again.
    let status = server.sigterm()?;
    ensure!(status.success(), "the server exited with {status}");
    let (d, p) = (
        runtimes_on_host(&server, "docker").await?,
        runtimes_on_host(&server, "proot").await?,
    );
    ensure!(
        d.is_empty() && p.is_empty(),
        "members left after SIGTERM: docker {d:?}, proot {p:?}"
    );
    Ok(())
}
