//! `stacyvm worker` as an OS process against a small control plane that
//! records its calls: registration, readiness, spawns driven through the
//! worker RPC (the image fetched from the control plane), a `kill -9` that
//! leaves the control plane with `Unavailable` rather than a hang, a
//! restart that destroys what the worker no longer holds, a revoked token
//! that ends the worker, and a missing token that is a usage error.
//!
//! Needs: proot, `STACYVM_AGENT_BIN` and `STACYVM_TEST_IMAGE_TAR`
//! (`. scripts/lib.sh && prepare_test_env`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use stacyvm_api::workers::{
    LeaseGrant, WorkerHeartbeat, WorkerHeartbeatReply, WorkerRegister, WorkerRegistered,
};
use stacyvm_core::{Error, ExecRequest, Network, SandboxId, SpawnSpec, WorkerId};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::proot::{ProotConfig, ProotProvider};
use stacyvm_provider::Provider;
use stacyvm_worker::{Lease, RemoteWorker, RemoteWorkerConfig, Worker};

const TOKEN: &str = "svmw_process-test";
const SECRET: &str = "svmws_process-test";

fn env_path(var: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .with_context(|| format!("{var} is not set: run `. scripts/lib.sh && prepare_test_env`"))?;
    if !p.is_file() {
        bail!("{var}={} does not name a file", p.display());
    }
    Ok(p)
}

#[derive(Default)]
struct Fake {
    revoked: bool,
    leases: Vec<LeaseGrant>,
    registrations: Vec<WorkerRegister>,
    heartbeats: Vec<WorkerHeartbeat>,
    image_tar: PathBuf,
    image_fetches: usize,
}

type Shared = Arc<Mutex<Fake>>;

fn refused(f: &Fake, h: &HeaderMap) -> bool {
    f.revoked
        || h.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}"))
}

async fn register(
    State(s): State<Shared>,
    h: HeaderMap,
    Json(b): Json<WorkerRegister>,
) -> Response {
    let mut f = s.lock().unwrap();
    if refused(&f, &h) {
        return (StatusCode::UNAUTHORIZED, "token revoked").into_response();
    }
    f.registrations.push(b.clone());
    Json(WorkerRegistered {
        id: b.id,
        secret: SECRET.into(),
        lease_ttl_ms: 3000,
        heartbeat_interval_ms: 100,
        state: "down".into(),
        leases: f.leases.clone(),
    })
    .into_response()
}

async fn heartbeat(
    State(s): State<Shared>,
    h: HeaderMap,
    UrlPath(_id): UrlPath<String>,
    Json(b): Json<WorkerHeartbeat>,
) -> Response {
    let mut f = s.lock().unwrap();
    if refused(&f, &h) {
        return (StatusCode::UNAUTHORIZED, "token revoked").into_response();
    }
    f.heartbeats.push(b);
    Json(WorkerHeartbeatReply {
        state: "ready".into(),
        lease_ttl_ms: 3000,
        heartbeat_interval_ms: 100,
        leases: f.leases.clone(),
        refused: Vec::new(),
    })
    .into_response()
}

async fn image(
    State(s): State<Shared>,
    h: HeaderMap,
    UrlPath((_id, _name)): UrlPath<(String, String)>,
) -> Response {
    let tar = {
        let mut f = s.lock().unwrap();
        if refused(&f, &h) {
            return (StatusCode::UNAUTHORIZED, "token revoked").into_response();
        }
        f.image_fetches += 1;
        f.image_tar.clone()
    };
    match tokio::fs::File::open(tar).await {
        Ok(file) => {
            axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response()
        }
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

struct FakeControlPlane {
    state: Shared,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeControlPlane {
    async fn start(image_tar: PathBuf) -> anyhow::Result<FakeControlPlane> {
        let state = Arc::new(Mutex::new(Fake {
            image_tar,
            ..Fake::default()
        }));
        let app = Router::new()
            .route("/v1/workers/register", post(register))
            .route("/v1/workers/{id}/heartbeat", post(heartbeat))
            .route("/v1/workers/{id}/images/{name}", get(image))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeControlPlane { state, url, task })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Fake) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    async fn until(&self, what: &str, cond: impl Fn(&Fake) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            while !self.with(|f| cond(f)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting for {what}");
    }
}

impl Drop for FakeControlPlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `stacyvm worker` child, killed when dropped.
struct WorkerProcess(tokio::process::Child);

impl WorkerProcess {
    fn start(cp: &FakeControlPlane, data_dir: &Path, token: Option<&str>) -> anyhow::Result<Self> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stacyvm"));
        cmd.args([
            "worker",
            "--control-plane",
            &cp.url,
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--providers",
            "proot",
            "--label",
            "pool=test",
            "--name",
            "proc-test",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("STACYVM_AGENT_BIN", env_path("STACYVM_AGENT_BIN")?)
        .env_remove("STACYVM_WORKER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        if let Some(t) = token {
            cmd.env("STACYVM_WORKER_TOKEN", t);
        }
        Ok(WorkerProcess(
            cmd.spawn().context("starting stacyvm worker")?,
        ))
    }

    fn kill9(&mut self) -> anyhow::Result<()> {
        let pid = self.0.id().context("the worker is running")?;
        // SAFETY: kill on a pid we spawned and have not reaped.
        if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    async fn wait_output(mut self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let mut stderr = self.0.stderr.take().context("stderr is piped")?;
        let status = tokio::time::timeout(Duration::from_secs(60), self.0.wait())
            .await
            .context("the worker did not exit")??;
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await?;
        Ok((status, text))
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        env: Default::default(),
        cwd: None,
        stdin: None,
        timeout_ms: 60_000,
        output_cap: stacyvm_core::exec::DEFAULT_OUTPUT_CAP,
        user: None,
    }
}

/// Destroys, through a provider on the worker's data dir, whatever the
/// worker process left (a failed test included).
struct Leftovers {
    data_dir: PathBuf,
    ids: Vec<SandboxId>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let (data_dir, ids) = (self.data_dir.clone(), std::mem::take(&mut self.ids));
        let _ = std::thread::spawn(move || {
            let Ok(instance) = std::fs::read_to_string(data_dir.join("instance.id")) else {
                return;
            };
            let Ok(agent_bin) = env_path("STACYVM_AGENT_BIN") else {
                return;
            };
            let Ok(catalog) = ImageCatalog::open(&data_dir.join("images")) else {
                return;
            };
            let Ok(p) = ProotProvider::new(ProotConfig {
                data_dir: data_dir.clone(),
                agent_bin,
                catalog: Arc::new(catalog),
                instance: instance.trim().to_owned(),
            }) else {
                return;
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a cleanup runtime");
            rt.block_on(async {
                for id in ids {
                    if let Err(e) = p.destroy(&id).await {
                        eprintln!("cleanup: destroying {id}: {e}");
                    }
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_serves_survives_a_kill_and_obeys_its_token() -> anyhow::Result<()> {
    let tar = env_path("STACYVM_TEST_IMAGE_TAR")?;
    let cp = FakeControlPlane::start(tar.clone()).await?;
    let dir = tempfile::Builder::new().prefix("svm-wproc-").tempdir()?;
    let data_dir = dir.path().join("data");
    let mut leftovers = Leftovers {
        data_dir: data_dir.clone(),
        ids: Vec::new(),
    };
    // The control plane's catalog: spawns carry its image digest.
    let cp_catalog = Arc::new(ImageCatalog::open(&dir.path().join("cp-images"))?);
    let file = tokio::fs::File::open(&tar).await?;
    cp_catalog
        .import("busybox", Box::pin(tokio_util::io::ReaderStream::new(file)))
        .await?;

    let mut worker = WorkerProcess::start(&cp, &data_dir, Some(TOKEN))?;
    cp.until("a ready heartbeat", |f| {
        f.heartbeats.iter().any(|h| h.ready)
    })
    .await;
    let reg = cp.with(|f| f.registrations[0].clone());
    assert_eq!(reg.name, "proc-test");
    assert_eq!(
        reg.labels,
        HashMap::from([("pool".to_owned(), "test".to_owned())])
            .into_iter()
            .collect()
    );
    assert!(
        reg.providers.iter().any(|p| p.name == "proot" && p.healthy),
        "{reg:?}"
    );
    let persisted = std::fs::read_to_string(data_dir.join("worker.id"))?;
    assert_eq!(reg.id, persisted.trim());

    let remote = |address: &str| -> anyhow::Result<RemoteWorker> {
        Ok(RemoteWorker::new(RemoteWorkerConfig {
            id: WorkerId::from_trusted(reg.id.clone()),
            address: address.to_owned(),
            secret: SECRET.into(),
            providers: vec!["proot".into()],
            tls: None,
            catalog: cp_catalog.clone(),
        })?)
    };
    let w = remote(&reg.address)?;
    let spec = SpawnSpec {
        sandbox_id: SandboxId::generate(),
        image: "busybox".into(),
        cpu: 1.0,
        memory_mb: 256,
        env: Default::default(),
        workdir: None,
        network: Network::None,
        labels: Default::default(),
        egress_allow: Vec::new(),
        mounts: Vec::new(),
    };
    leftovers.ids.push(spec.sandbox_id.clone());
    let lease = Lease::new(&spec.sandbox_id, 2, "proot");
    cp.with(|f| {
        f.leases = vec![LeaseGrant {
            sandbox_id: spec.sandbox_id.to_string(),
            provider: "proot".into(),
            fencing_token: 2,
        }]
    });
    w.spawn(&lease, &spec).await?;
    assert_eq!(
        cp.with(|f| f.image_fetches),
        1,
        "the worker fetched the image it lacked"
    );
    let agent = w.agent(&lease).await?;
    assert_eq!(agent.exec(sh("echo remote")).await?.stdout, b"remote\n");

    // kill -9: the control plane's calls fail as Unavailable, promptly.
    worker.kill9()?;
    let _ = worker.0.wait().await;
    let e = w.runtimes().await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let e = w.destroy(&lease).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(agent.exec(sh("true")).await.is_err());

    // Restarted on the same data dir while the control plane has given
    // the sandbox up: same id, and the runtime is gone before it is ready.
    cp.with(|f| {
        f.leases.clear();
        f.heartbeats.clear();
    });
    let worker = WorkerProcess::start(&cp, &data_dir, Some(TOKEN))?;
    cp.until("a ready heartbeat after the restart", |f| {
        f.heartbeats.iter().any(|h| h.ready)
    })
    .await;
    let regs = cp.with(|f| f.registrations.clone());
    assert_eq!(regs.len(), 2);
    assert_eq!(regs[1].id, reg.id);
    let ready = cp.with(|f| f.heartbeats.iter().find(|h| h.ready).cloned().unwrap());
    assert!(ready.runtimes.is_empty(), "{ready:?}");
    // It listens on a new port, which its registration advertised.
    let w = remote(&regs[1].address)?;
    assert!(w.runtimes().await?.is_empty());

    // The token revoked: the worker stops, non-zero, saying why.
    cp.with(|f| f.revoked = true);
    let (status, stderr) = worker.wait_output().await?;
    assert!(!status.success());
    assert!(stderr.contains("refused this worker's token"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn a_worker_without_a_token_or_with_bad_flags_is_a_usage_error() -> anyhow::Result<()> {
    let mut cp = FakeControlPlane::start(PathBuf::new()).await?;
    let dir = tempfile::tempdir()?;
    let worker = WorkerProcess::start(&cp, &dir.path().join("data"), None)?;
    let (status, stderr) = worker.wait_output().await?;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("STACYVM_WORKER_TOKEN"), "{stderr}");
    // An https:// control plane without the CA to check it by is refused
    // up front, not retried for ever.
    let plain = std::mem::replace(&mut cp.url, "https://127.0.0.1:1".into());
    let worker = WorkerProcess::start(&cp, &dir.path().join("data"), Some(TOKEN))?;
    let (status, stderr) = worker.wait_output().await?;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--control-plane-ca"), "{stderr}");
    cp.url = plain;
    assert!(cp.with(|f| f.registrations.is_empty()));
    Ok(())
}
