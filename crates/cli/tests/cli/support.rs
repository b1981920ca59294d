//! The CLI suite's harness: a real `stacyvm serve` child process on
//! 127.0.0.1:0 with a temporary data dir, helpers that run the `stacyvm`
//! binary against it, and a guard that destroys every sandbox and stops the
//! server on drop, also when a test panics.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use stacyvm_sdk::{Client, SandboxFilter};

/// How long a server may take to print its address.
const START_LIMIT: Duration = Duration::from_secs(90);

pub const IMAGE: &str = "busybox";

pub use crate::fixtures::{agent_bin, random_hex, test_image_tar, unique};

/// A running `stacyvm serve`. Dropping it destroys every sandbox through
/// the API, then whatever runtime is still left through the providers
/// themselves, kills the process and removes the data dir.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub admin_key: String,
    log: Arc<Mutex<Vec<String>>>,
    data_dir: PathBuf,
}

impl Server {
    /// A server with `providers` (e.g. `proot`, `proot,docker`).
    pub fn start(providers: &str) -> Result<Server> {
        let data_dir = std::env::temp_dir().join(unique("svm-cli"));
        std::fs::create_dir_all(&data_dir).context("making the data dir")?;
        let mut server = Server {
            child: None,
            url: String::new(),
            admin_key: format!("svm_clitest_{}", random_hex(32)),
            log: Arc::new(Mutex::new(Vec::new())),
            data_dir,
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacyvm"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--providers", providers])
            .arg("--data-dir")
            .arg(&server.data_dir);
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
            .env("STACYVM_ADMIN_KEY", &server.admin_key)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning stacyvm serve")?;
        let stderr = child
            .stderr
            .take()
            .context("the server's stderr was piped")?;
        server.child = Some(child);
        let (tx, rx) = mpsc::channel::<String>();
        let log = server.log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.split("StacyVM is up at ").nth(1) {
                        sent = tx
                            .send(
                                rest.split_whitespace()
                                    .next()
                                    .unwrap_or_default()
                                    .to_owned(),
                            )
                            .is_ok();
                    }
                }
                log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        match rx.recv_timeout(START_LIMIT) {
            Ok(url) if url.starts_with("http://") => server.url = url,
            other => bail!(
                "stacyvm serve did not print its address ({other:?}):\n{}",
                server.log_tail(40)
            ),
        }
        Ok(server)
    }

    /// A server on PRoot with the test image imported (through the SDK).
    pub async fn with_image() -> Result<Server> {
        let server = Server::start("proot")?;
        server
            .admin()
            .image_import_path(IMAGE, test_image_tar()?)
            .await?;
        Ok(server)
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let start = log.len().saturating_sub(n);
        log[start..].join("\n")
    }

    pub fn admin(&self) -> Client {
        Client::new(&self.url, &self.admin_key).expect("the server URL is valid")
    }

    /// The `stacyvm` binary, pointed at this server with the admin key.
    pub fn cli(&self) -> Command {
        self.cli_as(&self.admin_key)
    }

    pub fn cli_as(&self, key: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacyvm"));
        cmd.env("STACYVM_URL", &self.url)
            .env("STACYVM_API_KEY", key)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the CLI with `args`; fails unless it exits 0. Returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = run(self.cli().args(args))?;
        ensure!(
            out.status.success(),
            "stacyvm {args:?} exited {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the CLI with `args` and `-o json`, and parses what it prints.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ok(&all)?;
        serde_json::from_str(&out)
            .with_context(|| format!("stacyvm {args:?} -o json printed {out:?}"))
    }

    async fn destroy_all(&self) -> Result<()> {
        let admin = self.admin();
        for s in admin.sandbox_list_all(&SandboxFilter::default()).await? {
            if !s.state.is_terminal() {
                if let Err(e) = admin.sandbox_destroy(&s.id).await {
                    eprintln!("cleanup: could not destroy {}: {e}", s.id);
                }
            }
        }
        Ok(())
    }

    /// What the API could not remove: the providers list and destroy this
    /// instance's runtimes themselves.
    async fn destroy_leftovers(data_dir: PathBuf, agent: PathBuf) -> Result<()> {
        use stacyvm_provider::Provider;
        let instance = std::fs::read_to_string(data_dir.join("instance.id"))?
            .trim()
            .to_owned();
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
        if let Ok(d) =
            stacyvm_provider::docker::DockerProvider::new(stacyvm_provider::docker::DockerConfig {
                data_dir: data_dir.clone(),
                agent_bin: agent,
                catalog,
                instance,
                pids_limit: 512,
                egress_host_access: false,
                egress_dns_upstreams: Vec::new(),
            })
        {
            providers.push(Box::new(d));
        }
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
                let _ = p.destroy(&rt.sandbox_id).await;
            }
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Drop may run inside a test's runtime: clean up on a thread of its own.
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    if let Err(e) = self.destroy_all().await {
                        eprintln!("cleanup through the API failed: {e:#}");
                    }
                    if let Some(mut child) = self.child.take() {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    if let Ok(agent) = agent_bin() {
                        if let Err(e) =
                            Server::destroy_leftovers(self.data_dir.clone(), agent).await
                        {
                            eprintln!("cleanup through the providers failed: {e:#}");
                        }
                    }
                });
                anyhow::Ok(())
            })
            .join()
        });
        if !matches!(result, Ok(Ok(()))) {
            eprintln!("cleanup did not finish");
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
        if std::thread::panicking() {
            eprintln!("server log (last lines):\n{}", self.log_tail(60));
        }
    }
}

/// Runs a command to completion and returns its output.
pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().context("running stacyvm")
}

/// Removes a host path on drop.
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(prefix: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(unique(prefix)))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `sha256sum` of a host file (coreutils).
pub fn sha256_host(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}
