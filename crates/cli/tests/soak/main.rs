//! Bounded load-and-soak test: many concurrent clients create, exec, move
//! files and destroy sandboxes against a real `stacyvm serve` (PRoot by
//! default), then the run must show zero 5xx, zero leaked runtimes or
//! processes, and a server RSS that did not grow without bound.
//!
//! Short by default (30 s) so it runs in CI. The full five minutes:
//! `STACYVM_SOAK_SECS=300 cargo test -p stacyvm --test soak -- --nocapture`
//! (not nextest, whose profile stops a test at five minutes; a killed test
//! cannot destroy its sandboxes). `STACYVM_SOAK_CLIENTS` (default 50) and
//! `STACYVM_SOAK_PROVIDERS` (default `proot`; e.g. `docker`) change the mix.
//! It prints requests served and latency percentiles per operation.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[allow(dead_code)]
#[path = "../common/fixtures.rs"]
mod fixtures;
use fixtures::{agent_bin, test_image_tar};

/// Longest a single call may take before it counts as a hang.
const CALL_LIMIT: Duration = Duration::from_secs(120);
/// Longest the server may take to print its address.
const START_LIMIT: Duration = Duration::from_secs(90);
/// Server RSS at the end may be at most this multiple of the RSS after
/// warm-up, plus `RSS_SLACK_KB`: generous, so only growth without bound
/// (a leak per request) fails, not allocator noise.
const RSS_FACTOR: u64 = 2;
const RSS_SLACK_KB: u64 = 64 * 1024;

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        _ => Ok(default),
    }
}

/// Resident set size of a process, in KiB.
fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Processes other than `except` whose command line mentions `needle`.
fn processes_mentioning(needle: &str, except: u32) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if pid == except || pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{pid}: {}", cmdline.trim()));
        }
    }
    found
}

/// A running `stacyvm serve`; dropping it destroys every sandbox it still
/// has (through the API), kills it, and removes its data dir.
struct Server {
    child: Option<Child>,
    url: String,
    admin_key: String,
    agent: PathBuf,
    log: Arc<std::sync::Mutex<Vec<String>>>,
    data_dir: tempfile::TempDir,
}

impl Server {
    fn start(providers: &str) -> Result<Server> {
        let data_dir = tempfile::Builder::new()
            .prefix("svm-soak-")
            .tempdir()
            .context("making a data dir")?;
        // Unique per run; the server wants at least 32 characters after `svm_`.
        let admin_key = format!(
            "svm_soak_{:010}_{:032x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let agent = agent_bin()?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir.path())
            .args(["--providers", providers])
            .env_remove("STACYVM_STORE")
            .env_remove("STACYVM_WARM_POOLS")
            .env("STACYVM_AGENT_BIN", &agent)
            .env("STACYVM_ADMIN_KEY", &admin_key)
            // Request lines name sandbox ids: kept to explain a leftover.
            .env("STACYVM_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning stacyvm serve")?;
        let stderr = child.stderr.take().expect("stderr was piped");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let log_w = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.split("StacyVM is up at ").nth(1) {
                        let url = rest.split_whitespace().next().unwrap_or_default();
                        sent = tx.send(url.to_owned()).is_ok();
                    }
                }
                let mut log = log_w.lock().unwrap_or_else(|p| p.into_inner());
                log.push(line);
            }
        });
        let mut server = Server {
            child: Some(child),
            url: String::new(),
            admin_key,
            agent,
            log,
            data_dir,
        };
        match rx.recv_timeout(START_LIMIT) {
            Ok(url) if url.starts_with("http://") => server.url = url,
            other => bail!(
                "stacyvm serve did not start ({other:?}):\n{}",
                server.log_tail(40)
            ),
        }
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let start = log.len().saturating_sub(n);
        log[start..].join("\n")
    }

    /// Every server log line mentioning `needle`.
    fn log_lines_with(&self, needle: &str) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn instance_id(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.path().join("instance.id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let url = self.url.clone();
        let key = self.admin_key.clone();
        // Drop may run inside the test's runtime: use a thread and a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let _ = rt.block_on(async {
                let client = Client::new(&url, &key)?;
                for s in client.live_sandboxes().await? {
                    let id = s["id"].as_str().unwrap_or_default();
                    let _ = client
                        .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
                        .await;
                }
                anyhow::Ok(())
            });
        })
        .join();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A JSON client with the admin key.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    url: String,
    key: String,
}

/// A body to send.
enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

impl Client {
    fn new(url: &str, key: &str) -> Result<Client> {
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(CALL_LIMIT)
                .build()
                .context("building the HTTP client")?,
            url: url.to_owned(),
            key: key.to_owned(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Body>,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        req = match body {
            Some(Body::Json(v)) => req.json(&v),
            Some(Body::Bytes(b)) => req
                .header("content-type", "application/octet-stream")
                .body(b),
            None => req,
        };
        let resp = req
            .send()
            .await
            .with_context(|| format!("{path}: no answer"))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("{path}: reading the body"))?;
        Ok((status, bytes.to_vec()))
    }

    /// The sandboxes not destroyed yet.
    async fn live_sandboxes(&self) -> Result<Vec<Value>> {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = "/v1/sandboxes?limit=1000".to_owned();
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, body) = self.call(Method::GET, &path, None).await?;
            ensure!(status == StatusCode::OK, "listing sandboxes: {status}");
            let page: Value = serde_json::from_slice(&body).context("sandbox list JSON")?;
            for s in page["sandboxes"].as_array().cloned().unwrap_or_default() {
                if s["state"] != "destroyed" {
                    ids.push(s);
                }
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(ids),
            }
        }
    }
}

/// What one client saw.
#[derive(Default)]
struct Stats {
    latencies: HashMap<&'static str, Vec<Duration>>,
    server_errors: u64,
    failures: Vec<String>,
    cycles: u64,
    /// Ids of the sandboxes this client was answered `201` for.
    created: Vec<String>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        for (op, mut l) in other.latencies {
            self.latencies.entry(op).or_default().append(&mut l);
        }
        self.server_errors += other.server_errors;
        self.failures.extend(other.failures);
        self.cycles += other.cycles;
        self.created.extend(other.created);
    }

    fn requests(&self) -> usize {
        self.latencies.values().map(Vec::len).sum()
    }
}

/// One timed call, checked against the status it must answer.
async fn step(
    client: &Client,
    stats: &mut Stats,
    op: &'static str,
    method: Method,
    path: &str,
    body: Option<Body>,
    want: StatusCode,
) -> Option<Vec<u8>> {
    let started = Instant::now();
    let result = client.call(method, path, body).await;
    stats
        .latencies
        .entry(op)
        .or_default()
        .push(started.elapsed());
    match result {
        Ok((status, body)) if status == want => Some(body),
        Ok((status, body)) => {
            if status.is_server_error() {
                stats.server_errors += 1;
            }
            stats.failures.push(format!(
                "{op} {path}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ));
            None
        }
        Err(e) => {
            stats.failures.push(format!("{op} {path}: {e:#}"));
            None
        }
    }
}

/// One create → exec → write → read → list → exec → destroy cycle.
async fn cycle(client: &Client, stats: &mut Stats, n: usize, i: u64) {
    let create = json!({"image": "busybox", "timeout_s": 600, "labels": {"soak": "1"}});
    let Some(body) = step(
        client,
        stats,
        "create",
        Method::POST,
        "/v1/sandboxes",
        Some(Body::Json(create)),
        StatusCode::CREATED,
    )
    .await
    else {
        return;
    };
    let id = match serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_owned))
    {
        Some(id) => id,
        None => {
            stats.failures.push("create answered without an id".into());
            return;
        }
    };
    stats.created.push(id.clone());
    let sbx = format!("/v1/sandboxes/{id}");
    let marker = format!("client {n} cycle {i}");
    let exec = json!({"cmd": ["sh", "-c", "echo \"$0\"", marker]});
    if let Some(out) = step(
        client,
        stats,
        "exec",
        Method::POST,
        &format!("{sbx}/exec"),
        Some(Body::Json(exec)),
        StatusCode::OK,
    )
    .await
    {
        let v: Value = serde_json::from_slice(&out).unwrap_or_default();
        if v["exit_code"] != 0 || v["stdout"].as_str() != Some(&format!("{marker}\n")) {
            stats.failures.push(format!("exec in {id} answered {v}"));
        }
    }
    let content = format!("{marker}\n").repeat(64).into_bytes();
    let file = format!("{sbx}/files?path=/work/soak/data.txt");
    step(
        client,
        stats,
        "file_write",
        Method::PUT,
        &file,
        Some(Body::Bytes(content.clone())),
        StatusCode::CREATED,
    )
    .await;
    if let Some(back) = step(
        client,
        stats,
        "file_read",
        Method::GET,
        &file,
        None,
        StatusCode::OK,
    )
    .await
    {
        if back != content {
            stats.failures.push(format!(
                "{id}: read back {} bytes, not the {} written",
                back.len(),
                content.len()
            ));
        }
    }
    if let Some(list) = step(
        client,
        stats,
        "file_list",
        Method::GET,
        &format!("{sbx}/files/list?path=/work/soak"),
        None,
        StatusCode::OK,
    )
    .await
    {
        let v: Value = serde_json::from_slice(&list).unwrap_or_default();
        if v["entries"].as_array().map(Vec::len) != Some(1) {
            stats.failures.push(format!("{id}: list answered {v}"));
        }
    }
    let cat = json!({"cmd": ["wc", "-c", "/work/soak/data.txt"]});
    if let Some(out) = step(
        client,
        stats,
        "exec",
        Method::POST,
        &format!("{sbx}/exec"),
        Some(Body::Json(cat)),
        StatusCode::OK,
    )
    .await
    {
        let v: Value = serde_json::from_slice(&out).unwrap_or_default();
        let size = v["stdout"]
            .as_str()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse::<usize>().ok());
        if size != Some(content.len()) {
            stats.failures.push(format!("{id}: wc answered {v}"));
        }
    }
    step(
        client,
        stats,
        "destroy",
        Method::DELETE,
        &sbx,
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    stats.cycles += 1;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_leave_no_errors_no_leaks_and_flat_memory() -> Result<()> {
    let secs = env_u64("STACYVM_SOAK_SECS", 30)?;
    let clients = env_u64("STACYVM_SOAK_CLIENTS", 50)? as usize;
    let providers = std::env::var("STACYVM_SOAK_PROVIDERS").unwrap_or_else(|_| "proot".into());
    ensure!(
        secs > 0 && clients > 0,
        "STACYVM_SOAK_SECS and STACYVM_SOAK_CLIENTS must be positive"
    );

    let server = Server::start(&providers)?;
    let admin = Client::new(&server.url, &server.admin_key)?;
    let tar = std::fs::read(test_image_tar()?).context("reading the test image")?;
    let (status, body) = admin
        .call(
            Method::POST,
            "/v1/images?name=busybox",
            Some(Body::Bytes(tar)),
        )
        .await?;
    ensure!(
        status == StatusCode::CREATED,
        "importing the image: {status}: {}",
        String::from_utf8_lossy(&body)
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    // RSS is compared from the end of warm-up (a fifth of the run, at least
    // 5 s): by then pools, caches and the first sandboxes are all in place.
    let warmup = Duration::from_secs((secs / 5).max(5)).min(Duration::from_secs(secs));
    let pid = server.pid();
    let sampler = tokio::spawn(async move {
        let mut warm = None;
        let mut peak = 0u64;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Ok(rss) = rss_kb(pid) else { break };
            peak = peak.max(rss);
            if warm.is_none() && started.elapsed() >= warmup {
                warm = Some(rss);
            }
        }
        (warm, peak)
    });

    let mut tasks = Vec::new();
    for n in 0..clients {
        let client = admin.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            let mut i = 0u64;
            while Instant::now() < deadline {
                cycle(&client, &mut stats, n, i).await;
                i += 1;
            }
            stats
        }));
    }
    let mut stats = Stats::default();
    for t in tasks {
        stats.merge(t.await.context("a client task panicked")?);
    }
    let elapsed = started.elapsed();
    let (warm_rss, peak_rss) = sampler.await.context("the RSS sampler panicked")?;
    let end_rss = rss_kb(pid)?;

    // Report.
    println!(
        "soak: {clients} clients, {providers}, {:.0} s: {} requests, {} cycles (create..destroy), {:.1} requests/s",
        elapsed.as_secs_f64(),
        stats.requests(),
        stats.cycles,
        stats.requests() as f64 / elapsed.as_secs_f64()
    );
    let ordered: BTreeMap<_, _> = stats.latencies.iter_mut().collect();
    println!("soak: latency ms      count      p50      p90      p99      max");
    for (op, l) in ordered {
        l.sort();
        println!(
            "soak: {op:<12} {:>10} {:>8} {:>8} {:>8} {:>8}",
            l.len(),
            ms(percentile(l, 0.50)),
            ms(percentile(l, 0.90)),
            ms(percentile(l, 0.99)),
            ms(percentile(l, 1.0))
        );
    }
    println!(
        "soak: server RSS after warm-up {} KiB, peak {peak_rss} KiB, end {end_rss} KiB",
        warm_rss.map_or("-".into(), |w| w.to_string())
    );
    println!(
        "soak: 5xx answers {}, failed steps {}",
        stats.server_errors,
        stats.failures.len()
    );

    // Verdicts.
    let shown: Vec<&String> = stats.failures.iter().take(20).collect();
    ensure!(
        stats.server_errors == 0,
        "{} 5xx answers; first failures:\n{shown:#?}\nserver log:\n{}",
        stats.server_errors,
        server.log_tail(40)
    );
    ensure!(
        stats.failures.is_empty(),
        "{} failed steps:\n{shown:#?}\nserver log:\n{}",
        stats.failures.len(),
        server.log_tail(40)
    );
    ensure!(stats.cycles > 0, "no client finished a single cycle");

    // The remaining verdicts are independent: gather them all, so one run
    // tells every way it went wrong.
    let mut problems: Vec<String> = Vec::new();
    let live = admin.live_sandboxes().await?;
    if !live.is_empty() {
        let mut why = String::new();
        for s in &live {
            let id = s["id"].as_str().unwrap_or_default();
            let by_client = stats.created.iter().any(|c| c == id);
            why.push_str(&format!(
                "\n{s}\n  created by a client: {by_client}; server log:\n{}",
                server.log_lines_with(id)
            ));
        }
        problems.push(format!(
            "{} sandboxes not destroyed after every client destroyed its own:{why}",
            live.len()
        ));
    }
    if providers.split(',').any(|p| p.trim() == "proot") {
        use stacyvm_provider::Provider;
        let catalog = Arc::new(stacyvm_provider::images::ImageCatalog::open(
            &server.data_dir.path().join("images"),
        )?);
        let proot =
            stacyvm_provider::proot::ProotProvider::new(stacyvm_provider::proot::ProotConfig {
                data_dir: server.data_dir.path().to_path_buf(),
                agent_bin: server.agent.clone(),
                catalog,
                instance: server
                    .instance_id()
                    .context("the server wrote no instance.id")?,
            })?;
        let runtimes = proot.list().await?;
        if !runtimes.is_empty() {
            problems.push(format!(
                "PRoot runtimes leaked: {:?}",
                runtimes
                    .iter()
                    .map(|r| r.sandbox_id.to_string())
                    .collect::<Vec<_>>()
            ));
        }
    }
    if providers.split(',').any(|p| p.trim() == "docker") {
        let instance = server
            .instance_id()
            .context("the server wrote no instance.id")?;
        let out = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=dev.stacyvm.instance={instance}"),
            ])
            .output()
            .context("running docker ps")?;
        let left = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !left.is_empty() {
            problems.push(format!("Docker containers leaked: {left}"));
        }
    }
    let data_dir = server.data_dir.path().to_string_lossy().into_owned();
    let procs = processes_mentioning(&data_dir, pid);
    if !procs.is_empty() {
        problems.push(format!("processes outlived their sandboxes: {procs:#?}"));
    }
    match warm_rss {
        None => problems.push("the run ended before warm-up finished".into()),
        Some(warm) if end_rss > warm * RSS_FACTOR + RSS_SLACK_KB => problems.push(format!(
            "server RSS grew from {warm} KiB after warm-up to {end_rss} KiB at the end (limit {RSS_FACTOR}x + {RSS_SLACK_KB} KiB)"
        )),
        Some(_) => {}
    }
    println!(
        "soak: leak checks: {} undestroyed sandboxes, {} leftover processes",
        live.len(),
        procs.len()
    );
    ensure!(problems.is_empty(), "{}", problems.join("\n\n"));
    Ok(())
}
