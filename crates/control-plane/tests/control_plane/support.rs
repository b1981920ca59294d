//! Test support: an in-process StacyVM server with real providers on a
//! temporary data dir, reached over real HTTP, cleaned up on drop.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use stacyvm_control_plane::{Running, ServerConfig};

pub const ADMIN_KEY: &str = "svm_control_plane_test_admin_key_0123456789";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn locked_script(lock: &str, script: &str, args: &[&str]) -> Result<String> {
    let dir = workspace_root().join("target");
    std::fs::create_dir_all(&dir)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(lock))?;
    // SAFETY: flock on a descriptor we own; released when `f` closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("flock: {}", std::io::Error::last_os_error());
    }
    let out = std::process::Command::new(workspace_root().join("scripts").join(script))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("running scripts/{script}"))?;
    if !out.status.success() {
        bail!("scripts/{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Makes sure `STACYVM_AGENT_BIN` names the static agent, building it if needed.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("STACYVM_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let p = PathBuf::from(locked_script(
        "stacyvm-agent-build.lock",
        "build-agent.sh",
        &[],
    )?);
    // SAFETY (of intent): each nextest test runs in its own process, and this
    // runs before the server's threads look at the variable.
    std::env::set_var("STACYVM_AGENT_BIN", &p);
    Ok(p)
}

pub fn test_image_tar() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("STACYVM_TEST_IMAGE_TAR") {
        return Ok(PathBuf::from(p));
    }
    let path = workspace_root().join("target/test-images/busybox.tar");
    if !path.is_file() {
        locked_script("stacyvm-test-image.lock", "build-test-image.sh", &[])?;
    }
    Ok(path)
}

/// A running server and an HTTP client for it.
pub struct Server {
    pub running: Option<Running>,
    pub url: String,
    pub http: reqwest::Client,
    pub data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start(configure: impl FnOnce(&mut ServerConfig)) -> Result<Server> {
        agent_bin()?;
        let dir = tempfile::Builder::new().prefix("svm-cp-").tempdir()?;
        let mut config = ServerConfig::new(dir.path().to_path_buf());
        config.listen = "127.0.0.1:0".parse()?;
        config.admin_key = Some(ADMIN_KEY.into());
        configure(&mut config);
        let running = stacyvm_control_plane::start(config)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let url = format!("http://{}", running.addr);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let data_dir = dir.path().to_path_buf();
        let s = Server {
            running: Some(running),
            url,
            http,
            data_dir,
            _dir: dir,
        };
        let tar = tokio::fs::read(test_image_tar()?).await?;
        let r = s
            .req(reqwest::Method::POST, "/v1/images?name=busybox")
            .body(tar)
            .send()
            .await?;
        if r.status() != 201 {
            bail!(
                "importing the test image: {} {}",
                r.status(),
                r.text().await?
            );
        }
        Ok(s)
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_KEY)
    }

    pub async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        let r = self.req(method, path).json(&body).send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        ))
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value> {
        let r = self.req(reqwest::Method::GET, path).send().await?;
        if !r.status().is_success() {
            bail!("GET {path}: {}", r.status());
        }
        Ok(r.json().await?)
    }

    /// Destroys every sandbox, empties the pools and stops the server.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(running) = self.running.take() {
            running.app.pools_drain().await;
            // Through the API, like an operator would: every page of every
            // tenant's sandboxes (an admin key sees them all).
            let mut cursor: Option<String> = None;
            loop {
                let mut path = "/v1/sandboxes?limit=1000".to_owned();
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let page = self.get(&path).await?;
                for s in page["sandboxes"].as_array().into_iter().flatten() {
                    if s["state"] != "destroyed" {
                        let id = s["id"].as_str().unwrap_or_default();
                        self.req(reqwest::Method::DELETE, &format!("/v1/sandboxes/{id}"))
                            .send()
                            .await?;
                    }
                }
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => break,
                }
            }
            running
                .shutdown()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A test that panicked before `stop`: remove what the instance left.
        if self.running.is_some() {
            if let Ok(instance) = std::fs::read_to_string(self.data_dir.join("instance.id")) {
                let instance = instance.trim();
                let _ = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "docker rm -f $(docker ps -aq --filter label=dev.stacyvm.instance={instance}) >/dev/null 2>&1; \
                         pkill -9 -f 'proot.*{}' >/dev/null 2>&1; true",
                        self.data_dir.display()
                    ))
                    .status();
            }
        }
    }
}
