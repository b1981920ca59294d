//! Multi-worker fixtures: `stacyvm worker` processes (optionally in a
//! network namespace of their own, joined to the host by a veth pair, so a
//! partition is a link set down), worker tokens, and the guards that leave
//! no process, runtime, namespace or link behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{agent_bin, eventually, random_hex, s, Api, Server};

/// A network namespace joined to the host by a veth pair on a /30 of its
/// own: the host end is `host_ip`, the namespace end `ns_ip`.
pub struct Netns {
    pub name: String,
    host_link: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Netns {
    pub fn new() -> Result<Netns> {
        let tag = random_hex(6);
        let name = format!("svt-{tag}");
        let host_link = format!("svth{tag}");
        let ns_link = format!("svtn{tag}");
        // 10.213.X.Y/30, X and Y from the tag: one /30 per namespace.
        let n = u32::from_str_radix(&tag[..4], 16).context("tag")? & 0x3fff;
        let (a, b) = ((n >> 6) & 0xff, (n & 0x3f) * 4);
        let host_ip = format!("10.213.{a}.{}", b + 1);
        let ns_ip = format!("10.213.{a}.{}", b + 2);
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            name,
            host_link,
            host_ip,
            ns_ip,
        };
        ip(&[
            "link",
            "add",
            &ns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &ns_link,
        ])?;
        ip(&["link", "set", &ns_link, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_link,
        ])?;
        ip(&["link", "set", &ns.host_link, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_ns(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_link])?;
        in_ns(&["link", "set", &ns_link, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Cuts the link: nothing passes between the namespace and the host.
    pub fn cut(&self) -> Result<()> {
        ip(&["link", "set", &self.host_link, "down"])
    }

    pub fn heal(&self) -> Result<()> {
        ip(&["link", "set", &self.host_link, "up"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A worker token made through the API; its secret.
pub async fn worker_token(admin: &Api, name: &str) -> Result<(String, String)> {
    let t = admin
        .post("/v1/workers/tokens", json!({"name": name}))
        .await?
        .ok(201)?;
    Ok((s(&t, "id")?.to_owned(), s(&t, "token")?.to_owned()))
}

/// How to start a worker.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub name: String,
    pub control_plane: String,
    pub token: String,
    pub providers: String,
    pub labels: Vec<(String, String)>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run it in this network namespace, listening on `listen`.
    pub netns: Option<String>,
    pub listen: Option<String>,
}

impl WorkerOptions {
    pub fn new(server: &Server, token: &str, providers: &str) -> WorkerOptions {
        WorkerOptions {
            name: format!("w-{}", random_hex(6)),
            control_plane: server.url.clone(),
            token: token.to_owned(),
            providers: providers.to_owned(),
            labels: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            netns: None,
            listen: None,
        }
    }

    pub fn label(mut self, k: &str, v: &str) -> WorkerOptions {
        self.labels.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn arg(mut self, a: &str) -> WorkerOptions {
        self.args.push(a.to_owned());
        self
    }

    /// Runs the worker in `ns`, reaching the control plane at
    /// `control_plane` (an address of the host end).
    pub fn in_netns(mut self, ns: &Netns, control_plane: &str) -> WorkerOptions {
        self.netns = Some(ns.name.clone());
        self.listen = Some(format!("{}:7171", ns.ns_ip));
        self.control_plane = control_plane.to_owned();
        self
    }
}

/// A running `stacyvm worker`. Dropping it kills the process and destroys
/// whatever runtimes it left, straight through the providers.
pub struct Worker {
    pub opts: WorkerOptions,
    child: Option<Child>,
    data: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl Worker {
    pub fn start(mut opts: WorkerOptions) -> Result<Worker> {
        if opts.listen.is_none() {
            opts.listen = Some(format!("127.0.0.1:{}", free_port()?));
        }
        let data = tempfile::Builder::new()
            .prefix("svm-worker-")
            .tempdir()
            .context("making a worker data dir")?;
        let mut w = Worker {
            opts,
            child: None,
            data,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        w.spawn()?;
        Ok(w)
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The worker's id, once it has one.
    pub fn id(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir().join("worker.id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    fn spawn(&mut self) -> Result<()> {
        let o = &self.opts;
        let listen = o.listen.clone().unwrap_or_default();
        let mut cmd = match &o.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(env!("CARGO_BIN_EXE_stacyvm"))
                    // `ip netns exec` mounts a sysfs of the namespace's own,
                    // without the host's cgroup hierarchies: the worker's
                    // namespaces sandboxes run without limits there, which
                    // its operator (this test) accepts.
                    .env("STACYVM_NAMESPACES_UNENFORCED_LIMITS", "allow");
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_stacyvm")),
        };
        cmd.arg("worker")
            .arg("--control-plane")
            .arg(&o.control_plane)
            .arg("--listen")
            .arg(&listen)
            .arg("--name")
            .arg(&o.name)
            .arg("--providers")
            .arg(&o.providers)
            .arg("--data-dir")
            .arg(self.data.path());
        for (k, v) in &o.labels {
            cmd.arg("--label").arg(format!("{k}={v}"));
        }
        cmd.args(&o.args)
            .env("STACYVM_WORKER_TOKEN", &o.token)
            .env("STACYVM_AGENT_BIN", agent_bin()?)
            .env(
                "STACYVM_LOG",
                std::env::var("STACYVM_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(o.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning stacyvm worker")?;
        let stderr = child.stderr.take().context("stderr was piped")?;
        let log = self.log.clone();
        let name = o.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[worker {name}] {line}");
                log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        self.child = Some(child);
        Ok(())
    }

    pub fn log_all(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Waits until the control plane lists the worker `ready`; returns it.
    pub async fn ready(&mut self, admin: &Api) -> Result<Value> {
        let name = self.opts.name.clone();
        let r = eventually(
            Duration::from_secs(90),
            &format!("worker {name} to be ready"),
            || {
                let admin = admin.clone();
                let name = name.clone();
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                async move {
                    if let Some(st) = status {
                        bail!("the worker exited ({st})");
                    }
                    let list = admin.get("/v1/workers").await?.ok(200)?;
                    Ok(list["workers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|w| w["name"] == name.as_str() && w["state"] == "ready")
                        .cloned())
                }
            },
        )
        .await;
        r.map_err(|e| anyhow!("{e:#}\nworker log:\n{}", self.log_all()))
    }

    /// `kill -9`.
    pub fn kill9(&mut self) -> Result<()> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| anyhow!("the worker is not running"))?;
        c.kill().context("SIGKILL to the worker")?;
        c.wait().context("reaping the worker")?;
        Ok(())
    }

    /// Starts it again on the same data dir (after `kill9`).
    pub fn restart(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "the worker is still running");
        self.spawn()
    }

    /// Waits for the process to exit by itself; its status.
    pub async fn exited(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let c = self
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("the worker is not running"))?;
            if let Some(st) = c.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if std::time::Instant::now() > deadline {
                bail!("the worker is still running:\n{}", self.log_all());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn cleanup(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let data: PathBuf = self.data.path().to_path_buf();
        let instance = std::fs::read_to_string(data.join("instance.id"))
            .ok()
            .map(|s| s.trim().to_owned());
        let (Some(instance), Ok(agent)) = (instance, agent_bin()) else {
            return;
        };
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if let Err(e) = rt.block_on(Server::destroy_leftovers(data, instance, agent)) {
                eprintln!("cleanup: worker provider fallback failed: {e:#}");
            }
        })
        .join();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cleanup();
    }
}
