//! A `stacyvm serve` started for one run: its own temp data dir, its own
//! admin key, a loopback port; and its teardown, which destroys every
//! sandbox it made (through the API, then directly through the providers
//! for anything left) before stopping it. Also `stacyvm worker` processes
//! registered with such a server, for the multi-worker measurements.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use stacyvm_provider::docker::{DockerConfig, DockerProvider};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::namespaces::{NamespacesConfig, NamespacesProvider};
use stacyvm_provider::proot::{ProotConfig, ProotProvider};
use stacyvm_provider::DynProvider;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

pub struct Server {
    pub url: String,
    /// The admin key, for clients other than `http` (the `stacyvm` CLI).
    pub key: String,
    pub pid: u32,
    pub http: reqwest::Client,
    pub data_dir: PathBuf,
    pub agent_bin: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start(
        bin: &std::path::Path,
        agent_bin: &std::path::Path,
        tag: &str,
        extra_args: &[String],
    ) -> Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("svm-bench-api-")
            .tempdir()?;
        let data_dir = dir.path().join("data");
        // Unique per run; the server wants at least 32 characters after `svm_`.
        let key = format!(
            "svm_bench{tag}bench_{:032x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let log_path = dir.path().join("server.log");
        // The providers every suite measures, unless the caller names its own.
        let providers: &[&str] = if extra_args.iter().any(|a| a == "--providers") {
            &[]
        } else {
            &["--providers", "docker,proot,namespaces"]
        };
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(providers)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra_args)
            .env("STACYVM_ADMIN_KEY", &key)
            .env("STACYVM_AGENT_BIN", agent_bin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches only
            // the bench, which then destroys the sandboxes before stopping it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Drain stderr for the whole run (a full pipe would stall the
        // server), keeping it in a log file and picking out the URL.
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            let mut log = tokio::fs::File::create(&log_path).await.ok();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("StacyVM is up at ").nth(1) {
                    if let (Some(tx), Some(url)) = (tx.take(), rest.split_whitespace().next()) {
                        let _ = tx.send(url.to_owned());
                    }
                }
                if let Some(f) = log.as_mut() {
                    let _ = f.write_all(line.as_bytes()).await;
                    let _ = f.write_all(b"\n").await;
                }
            }
        });
        let url = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .context("the server did not come up within 60 s")?
            .context("the server exited before listening (see its log)")?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}").parse()?,
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .no_proxy()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(600))
            .build()?;
        Ok(Server {
            url,
            key,
            pid,
            http,
            data_dir,
            agent_bin: agent_bin.to_owned(),
            child,
            _dir: dir,
        })
    }

    pub fn u(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Sends a request and decodes a JSON answer; non-2xx is an error.
    pub async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&body)?)
    }

    pub async fn create(&self, image: &str, provider: &str) -> Result<String> {
        let v = self
            .json(
                self.http
                    .post(self.u("/v1/sandboxes"))
                    .json(&json!({"image": image, "provider": provider, "timeout_s": 3600})),
            )
            .await?;
        v["id"]
            .as_str()
            .map(str::to_owned)
            .context("create answered without an id")
    }

    pub async fn exec_true(&self, id: &str) -> Result<()> {
        let v = self
            .json(
                self.http
                    .post(self.u(&format!("/v1/sandboxes/{id}/exec")))
                    .json(&json!({"cmd": ["true"]})),
            )
            .await?;
        anyhow::ensure!(v["exit_code"] == json!(0), "`true` answered {v}");
        Ok(())
    }

    /// `POST /v1/sandboxes/{id}/{op}` (`pause`, `resume`).
    pub async fn lifecycle(&self, id: &str, op: &str) -> Result<()> {
        self.json(self.http.post(self.u(&format!("/v1/sandboxes/{id}/{op}"))))
            .await
            .with_context(|| format!("{op} {id}"))?;
        Ok(())
    }

    pub async fn destroy(&self, id: &str) -> Result<()> {
        let resp = self
            .http
            .delete(self.u(&format!("/v1/sandboxes/{id}")))
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!("destroy {id}: HTTP {status}: {body}");
        }
        Ok(())
    }

    /// Destroys many sandboxes, a few at a time; how many failed (the
    /// first failure is printed).
    pub async fn destroy_many(&self, ids: &[String]) -> usize {
        let errors: Vec<String> = futures_util::stream::iter(ids.iter().map(|id| self.destroy(id)))
            .buffer_unordered(8)
            .filter_map(|r| futures_util::future::ready(r.err().map(|e| format!("{e:#}"))))
            .collect()
            .await;
        if let Some(first) = errors.first() {
            eprintln!(
                "bench: {} destroys failed, the first: {first}",
                errors.len()
            );
        }
        errors.len()
    }

    /// Every sandbox of the server that is not destroyed yet.
    pub async fn live_ids(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = self.u("/v1/sandboxes?limit=1000");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let v = self.json(self.http.get(url)).await?;
            for s in v["sandboxes"].as_array().into_iter().flatten() {
                if !matches!(s["state"].as_str(), Some("destroyed") | Some("failed")) {
                    if let Some(id) = s["id"].as_str() {
                        out.push(id.to_owned());
                    }
                }
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
    }

    pub fn rss_kib(&self) -> Option<u64> {
        crate::report::rss_kib(self.pid)
    }

    /// The instance id the server labels its runtimes with.
    pub fn instance(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join("instance.id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Destroys every sandbox, stops the server, then removes through the
    /// providers anything the server left (e.g. it crashed).
    pub async fn shutdown(mut self) {
        match self.live_ids().await {
            Ok(ids) if !ids.is_empty() => {
                eprintln!("bench: destroying {} sandboxes through the API", ids.len());
                let failed = self.destroy_many(&ids).await;
                if failed > 0 {
                    eprintln!(
                        "bench: {failed} destroys failed; the providers will be asked directly"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!(
                "bench: listing sandboxes failed ({e}); the providers will be asked directly"
            ),
        }
        // SAFETY: kill has no memory preconditions; the pid is our own
        // child, not yet reaped (we hold its Child).
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        if let Some(instance) = self.instance() {
            if let Err(e) = sweep(&self.data_dir, &self.agent_bin, &instance).await {
                eprintln!("bench: sweeping leftovers: {e:#}");
            }
        }
        unmount_under(&self.data_dir);
    }
}

/// Detaches whatever is still mounted under the run's data dir (sandbox
/// tmpfs and overlays a provider could not destroy, say because dockerd
/// died mid-run), so that removing the temporary directory neither fails
/// nor walks into a mount.
fn unmount_under(dir: &std::path::Path) {
    let mounts = match stacyvm_provider::host::mounts_under(dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("bench: reading the mount table: {e}");
            return;
        }
    };
    for m in mounts {
        eprintln!("bench: unmounting leftover {}", m.display());
        match std::process::Command::new("umount")
            .arg("-l")
            .arg(&m)
            .status()
        {
            Ok(st) if st.success() => {}
            Ok(st) => eprintln!("bench: umount -l {} failed ({st})", m.display()),
            Err(e) => eprintln!("bench: running umount: {e}"),
        }
    }
}

/// Destroys every runtime of `instance` found through the providers. One
/// provider that cannot be reached (dockerd gone) does not keep the others'
/// leftovers; the first error is returned once all were tried.
pub async fn sweep(
    data_dir: &std::path::Path,
    agent_bin: &std::path::Path,
    instance: &str,
) -> Result<()> {
    let catalog = Arc::new(ImageCatalog::open(&data_dir.join("images"))?);
    let providers: Vec<Result<DynProvider, stacyvm_core::Error>> = vec![
        DockerProvider::new(DockerConfig::new(
            data_dir.to_owned(),
            agent_bin.to_owned(),
            catalog.clone(),
            instance,
        ))
        .map(|p| Arc::new(p) as DynProvider),
        ProotProvider::new(ProotConfig {
            data_dir: data_dir.to_owned(),
            agent_bin: agent_bin.to_owned(),
            catalog: catalog.clone(),
            instance: instance.to_owned(),
        })
        .map(|p| Arc::new(p) as DynProvider),
        NamespacesProvider::new(NamespacesConfig {
            data_dir: data_dir.to_owned(),
            agent_bin: agent_bin.to_owned(),
            catalog,
            instance: instance.to_owned(),
            egress_dns_upstreams: Vec::new(),
        })
        .map(|p| Arc::new(p) as DynProvider),
    ];
    let mut first_error: Option<anyhow::Error> = None;
    for p in providers {
        let result = async {
            let p = p?;
            for rt in p.list().await? {
                eprintln!(
                    "bench: removing leftover {} sandbox {}",
                    p.name(),
                    rt.sandbox_id
                );
                p.destroy(&rt.sandbox_id).await?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            eprintln!("bench: sweeping instance {instance}: {e:#}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// A free loopback port (bound, read and released: the worker binds it a
/// moment later; nothing else on a bench host races for it).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Drains a child's stderr into a log file for the whole run: a full pipe
/// would stall the process.
fn drain_to(stderr: tokio::process::ChildStderr, log_path: PathBuf) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut log = tokio::fs::File::create(&log_path).await.ok();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(f) = log.as_mut() {
                let _ = f.write_all(line.as_bytes()).await;
                let _ = f.write_all(b"\n").await;
            }
        }
    });
}

/// A `stacyvm worker` on loopback, registered with a control plane started
/// with `--no-local-worker`. Its teardown stops it (SIGTERM) and then
/// destroys, through the providers, whatever runtimes of its instance are
/// left: sandboxes are destroyed through the control plane's API first.
pub struct Worker {
    pub name: String,
    pub pid: u32,
    pub data_dir: PathBuf,
    agent_bin: PathBuf,
    child: Child,
    /// Holds the data dir and the log; removed on drop.
    dir: tempfile::TempDir,
}

impl Worker {
    pub async fn start(
        bin: &std::path::Path,
        agent_bin: &std::path::Path,
        control_plane: &str,
        token: &str,
        name: &str,
        providers: &str,
        extra_args: &[String],
    ) -> Result<Worker> {
        let dir = tempfile::Builder::new()
            .prefix("svm-bench-worker-")
            .tempdir()?;
        let data_dir = dir.path().join("data");
        let listen = format!("127.0.0.1:{}", free_port()?);
        let mut child = Command::new(bin)
            .args([
                "worker",
                "--control-plane",
                control_plane,
                "--listen",
                &listen,
                "--name",
                name,
                "--providers",
                providers,
                "--data-dir",
            ])
            .arg(&data_dir)
            .args(extra_args)
            .env("STACYVM_WORKER_TOKEN", token)
            .env("STACYVM_AGENT_BIN", agent_bin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // As for the server: a Ctrl-C reaches the bench alone, which
            // tears the cluster down in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} worker", bin.display()))?;
        let pid = child.id().context("the worker exited at once")?;
        let stderr = child.stderr.take().context("no stderr")?;
        drain_to(stderr, dir.path().join("worker.log"));
        Ok(Worker {
            name: name.to_owned(),
            pid,
            data_dir,
            agent_bin: agent_bin.to_owned(),
            child,
            dir,
        })
    }

    pub fn rss_kib(&self) -> Option<u64> {
        crate::report::rss_kib(self.pid)
    }

    /// Whether the process has exited (its status, if so).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of its log, for an error message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops the worker (SIGTERM, then SIGKILL after 30 s) and removes what
    /// its instance left behind.
    pub async fn shutdown(mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our own
        // child, not yet reaped (we hold its Child).
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        let instance = std::fs::read_to_string(self.data_dir.join("instance.id"))
            .ok()
            .map(|s| s.trim().to_owned());
        if let Some(instance) = instance {
            if let Err(e) = sweep(&self.data_dir, &self.agent_bin, &instance).await {
                eprintln!("bench: sweeping worker {}'s leftovers: {e:#}", self.name);
            }
        }
    }
}

/// A control plane (`stacyvm serve --no-local-worker`) and `n` workers on
/// loopback, each with a worker token of its own, waited on until the
/// control plane lists every one `ready`.
pub async fn start_cluster(
    ctx: &crate::Ctx,
    bin: &std::path::Path,
    label: &str,
    n: usize,
    providers: &str,
    worker_args: &[String],
) -> Result<Arc<Server>> {
    let cp = Arc::new(
        Server::start(
            bin,
            &ctx.agent_bin,
            &format!("{}{label}", ctx.tag),
            &["--no-local-worker".into()],
        )
        .await?,
    );
    ctx.keep_server(cp.clone());
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("bench-{label}-{}-w{i}", ctx.tag);
        let t = cp
            .json(
                cp.http
                    .post(cp.u("/v1/workers/tokens"))
                    .json(&json!({ "name": name })),
            )
            .await
            .context("making a worker token")?;
        let token = t["token"]
            .as_str()
            .context("the token answer has no token")?
            .to_owned();
        let w = Worker::start(
            bin,
            &ctx.agent_bin,
            &cp.url,
            &token,
            &name,
            providers,
            worker_args,
        )
        .await?;
        ctx.keep_worker(w);
        names.push(name);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let v = cp.json(cp.http.get(cp.u("/v1/workers"))).await?;
        let ready = ready_workers(&v, &names);
        if ready == n {
            return Ok(cp);
        }
        if let Some(why) = ctx.dead_worker() {
            bail!("{why}");
        }
        if std::time::Instant::now() > deadline {
            bail!("{ready} of {n} workers ready after 90 s: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many of `names` a `GET /v1/workers` answer lists as `ready`.
pub fn ready_workers(list: &Value, names: &[String]) -> usize {
    list["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| {
            w["state"] == "ready"
                && w["name"]
                    .as_str()
                    .is_some_and(|n| names.iter().any(|m| m == n))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn only_named_ready_workers_count() {
        let list = json!({"workers": [
            {"name": "a", "state": "ready"},
            {"name": "b", "state": "down"},
            {"name": "c", "state": "ready"},
            {"name": "x", "state": "ready"},
            {"state": "ready"},
        ]});
        let names = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        assert_eq!(super::ready_workers(&list, &names), 2);
        assert_eq!(super::ready_workers(&json!({}), &names), 0);
    }
}
