//! A `stacyvm serve` started for one run: its own temp data dir, its own
//! admin key, a loopback port; and its teardown, which destroys every
//! sandbox it made (through the API, then directly through the providers
//! for anything left) before stopping it.

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
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--providers",
                "docker,proot,namespaces",
                "--data-dir",
            ])
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

    pub async fn destroy(&self, id: &str) -> Result<()> {
        let resp = self
            .http
            .delete(self.u(&format!("/v1/sandboxes/{id}")))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("destroy {id}: HTTP {}", resp.status());
        }
        Ok(())
    }

    /// Destroys many sandboxes, a few at a time.
    pub async fn destroy_many(&self, ids: &[String]) -> usize {
        futures_util::stream::iter(ids.iter().map(|id| self.destroy(id)))
            .buffer_unordered(8)
            .filter(|r| futures_util::future::ready(r.is_err()))
            .count()
            .await
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
    }
}

/// Destroys every runtime of `instance` found through the providers.
async fn sweep(
    data_dir: &std::path::Path,
    agent_bin: &std::path::Path,
    instance: &str,
) -> Result<()> {
    let catalog = Arc::new(ImageCatalog::open(&data_dir.join("images"))?);
    let providers: Vec<DynProvider> = vec![
        Arc::new(DockerProvider::new(DockerConfig::new(
            data_dir.to_owned(),
            agent_bin.to_owned(),
            catalog.clone(),
            instance,
        ))?),
        Arc::new(ProotProvider::new(ProotConfig {
            data_dir: data_dir.to_owned(),
            agent_bin: agent_bin.to_owned(),
            catalog: catalog.clone(),
            instance: instance.to_owned(),
        })?),
        Arc::new(NamespacesProvider::new(NamespacesConfig {
            data_dir: data_dir.to_owned(),
            agent_bin: agent_bin.to_owned(),
            catalog,
            instance: instance.to_owned(),
        })?),
    ];
    for p in providers {
        for rt in p.list().await? {
            eprintln!(
                "bench: removing leftover {} sandbox {}",
                p.name(),
                rt.sandbox_id
            );
            p.destroy(&rt.sandbox_id).await?;
        }
    }
    Ok(())
}
