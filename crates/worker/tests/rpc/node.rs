//! The worker's registration and heartbeat loop against a small control
//! plane that records the calls and answers as each test says, with real
//! providers underneath: leases applied from answers, runtimes it no longer
//! holds destroyed (and nothing else), re-registration, a refused token,
//! a control plane that is away, and images fetched for a spawn.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use stacyvm_api::workers::{
    LeaseGrant, WorkerCapacity, WorkerHeartbeat, WorkerHeartbeatReply, WorkerRegister,
    WorkerRegistered,
};
use stacyvm_core::{Error, SandboxId, WorkerId};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_worker::{
    ControlPlane, Lease, Node as WorkerNode, NodeConfig, RemoteWorker, RemoteWorkerConfig, Worker,
};
use tokio_util::sync::CancellationToken;

use crate::support::{open_tar, sh, spec, Node, Opts, IMAGE};

const TOKEN: &str = "svmw_test-token";
const NODE_SECRET: &str = "svmws_from-registration";

/// What the fake control plane answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Serve,
    /// 503 to everything.
    Away,
    /// 404 to heartbeats (it forgot the worker).
    Forgot,
    /// 401 to everything (the token was revoked).
    Revoked,
}

struct Fake {
    mode: Mode,
    leases: Vec<LeaseGrant>,
    registrations: Vec<WorkerRegister>,
    heartbeats: Vec<WorkerHeartbeat>,
    /// Answers that were not 200 (while away).
    refused_calls: usize,
    image_tar: std::path::PathBuf,
    image_fetches: Vec<String>,
    /// Names of images this control plane lacks (another replica has them).
    images_elsewhere: Vec<String>,
}

type Shared = Arc<Mutex<Fake>>;

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

fn refusal(f: &mut Fake, h: &HeaderMap) -> Option<Response> {
    if !authorized(h) || f.mode == Mode::Revoked {
        return Some((StatusCode::UNAUTHORIZED, "revoked").into_response());
    }
    if f.mode == Mode::Away {
        f.refused_calls += 1;
        return Some((StatusCode::SERVICE_UNAVAILABLE, "away").into_response());
    }
    None
}

async fn register(
    State(s): State<Shared>,
    h: HeaderMap,
    Json(b): Json<WorkerRegister>,
) -> Response {
    let mut f = s.lock().unwrap();
    if let Some(r) = refusal(&mut f, &h) {
        return r;
    }
    f.registrations.push(b.clone());
    if f.mode == Mode::Forgot {
        f.mode = Mode::Serve;
    }
    Json(WorkerRegistered {
        id: b.id,
        secret: NODE_SECRET.into(),
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
    Path(_id): Path<String>,
    Json(b): Json<WorkerHeartbeat>,
) -> Response {
    let mut f = s.lock().unwrap();
    if let Some(r) = refusal(&mut f, &h) {
        return r;
    }
    if f.mode == Mode::Forgot {
        return (StatusCode::NOT_FOUND, "unknown worker").into_response();
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
    Path((_id, name)): Path<(String, String)>,
) -> Response {
    let tar = {
        let mut f = s.lock().unwrap();
        if let Some(r) = refusal(&mut f, &h) {
            return r;
        }
        f.image_fetches.push(name.clone());
        if f.images_elsewhere.contains(&name) {
            let body = serde_json::json!({"error": {"code": "image_not_found", "message": "no such image"}});
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
        }
        f.image_tar.clone()
    };
    let file = tokio::fs::File::open(tar).await.unwrap();
    axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response()
}

/// The fake control plane, serving on loopback.
struct FakeControlPlane {
    state: Shared,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeControlPlane {
    async fn start() -> anyhow::Result<FakeControlPlane> {
        let state = Arc::new(Mutex::new(Fake {
            mode: Mode::Serve,
            leases: Vec::new(),
            registrations: Vec::new(),
            heartbeats: Vec::new(),
            refused_calls: 0,
            image_tar: std::env::var_os("STACYVM_TEST_IMAGE_TAR")
                .map(Into::into)
                .unwrap_or_default(),
            image_fetches: Vec::new(),
            images_elsewhere: Vec::new(),
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

    /// The same control plane behind TLS, with `cert` for `localhost`.
    async fn start_tls(
        cert: &rcgen::CertifiedKey<rcgen::KeyPair>,
    ) -> anyhow::Result<FakeControlPlane> {
        use tokio_rustls::rustls;
        let plain = FakeControlPlane::start().await?;
        plain.task.abort();
        let app = Router::new()
            .route("/v1/workers/register", post(register))
            .route("/v1/workers/{id}/heartbeat", post(heartbeat))
            .route("/v1/workers/{id}/images/{name}", get(image))
            .with_state(plain.state.clone());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://localhost:{}", listener.local_addr()?.port());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(tls),
                            hyper_util::service::TowerToHyperService::new(app),
                        )
                        .await;
                });
            }
        });
        Ok(FakeControlPlane {
            state: plain.state.clone(),
            url,
            task,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Fake) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Waits (bounded by the test's own timeout) for `cond`.
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

/// A worker node (RPC server, unregistered) and its loop against `cp`.
async fn node_for(cp: &FakeControlPlane) -> anyhow::Result<(Node, Arc<WorkerNode>)> {
    node_with(cp, None, None).await
}

async fn node_with(
    cp: &FakeControlPlane,
    failing_list: Option<Arc<std::sync::atomic::AtomicBool>>,
    ca_pem: Option<&[u8]>,
) -> anyhow::Result<(Node, Arc<WorkerNode>)> {
    let id = WorkerId::generate();
    let control_plane = Arc::new(ControlPlane::new(&cp.url, ca_pem, TOKEN, id.as_str())?);
    let node = Node::start_with(
        "proot",
        Opts {
            id: Some(id),
            images: Some(control_plane.clone()),
            unregistered: true,
            failing_list,
            ..Opts::default()
        },
    )
    .await?;
    let looping = Arc::new(WorkerNode::new(
        NodeConfig {
            control_plane: cp.url.clone(),
            token: TOKEN.into(),
            name: "test-node".into(),
            address: format!("http://{}", node.addr()),
            labels: BTreeMap::from([("pool".to_owned(), "test".to_owned())]),
            capacity: WorkerCapacity {
                sandboxes: 8,
                cpu: None,
                memory_mb: None,
            },
        },
        node.rpc.clone(),
        control_plane,
    ));
    Ok((node, looping))
}

fn grant(id: &SandboxId, token: i64) -> LeaseGrant {
    LeaseGrant {
        sandbox_id: id.to_string(),
        provider: "proot".into(),
        fencing_token: token,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_worker_destroys_what_it_no_longer_holds_then_is_ready() -> anyhow::Result<()> {
    let cp = FakeControlPlane::start().await?;
    let (node, looping) = node_for(&cp).await?;
    // Two runtimes left from before: the control plane still grants one.
    let (kept, lost) = (spec(), spec());
    for s in [&kept, &lost] {
        node.guard.register(&s.sandbox_id);
        node.provider().spawn(s).await?;
    }
    cp.with(|f| f.leases = vec![grant(&kept.sandbox_id, 7)]);
    // Before registering the RPC takes nobody.
    let remote = node.remote_with(NODE_SECRET, None);
    assert!(matches!(
        remote.runtimes().await,
        Err(Error::Unavailable(_))
    ));

    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (looping, stop) = (looping.clone(), stop.clone());
        async move { looping.run(stop).await }
    });
    cp.until("a ready heartbeat", |f| {
        f.heartbeats.iter().any(|h| h.ready)
    })
    .await;
    let reg = cp.with(|f| f.registrations[0].clone());
    assert_eq!(reg.id, node.rpc.id().to_string());
    assert_eq!(reg.labels["pool"], "test");
    assert_eq!(reg.providers[0].name, "proot");
    // The unleased runtime was gone before the worker said it was ready.
    let ready = cp.with(|f| f.heartbeats.iter().find(|h| h.ready).cloned().unwrap());
    let ids: Vec<&str> = ready
        .runtimes
        .iter()
        .map(|r| r.sandbox_id.as_str())
        .collect();
    assert_eq!(ids, [kept.sandbox_id.as_str()], "{ready:?}");
    assert_eq!(ready.runtimes[0].fencing_token, 7);
    assert_eq!(ready.runtimes[0].state, "running");
    // The control plane now reaches the RPC with the registration's secret,
    // and the granted lease is usable.
    let out = remote
        .agent(&Lease::new(&kept.sandbox_id, 7, "proot"))
        .await?
        .exec(sh("echo kept"))
        .await?;
    assert_eq!(out.stdout, b"kept\n");

    // A reply that no longer lists the sandbox: the worker destroys it.
    cp.with(|f| f.leases.clear());
    cp.until("an empty report", |f| {
        f.heartbeats.last().is_some_and(|h| h.runtimes.is_empty())
    })
    .await;
    assert!(node.provider().list().await?.is_empty());
    stop.cancel();
    run.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_registers_again_when_forgotten_and_rides_out_an_absence() -> anyhow::Result<()>
{
    let cp = FakeControlPlane::start().await?;
    let (node, looping) = node_for(&cp).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (looping, stop) = (looping.clone(), stop.clone());
        async move { looping.run(stop).await }
    });
    cp.until("a ready heartbeat", |f| {
        f.heartbeats.iter().any(|h| h.ready)
    })
    .await;
    // A sandbox spawned through the RPC is leased and reported.
    let remote = node.remote_with(NODE_SECRET, None);
    let s = spec();
    node.guard.register(&s.sandbox_id);
    let lease = Lease::new(&s.sandbox_id, 3, "proot");
    // The store grants the lease before it asks the worker to spawn.
    cp.with(|f| f.leases = vec![grant(&s.sandbox_id, 3)]);
    remote.spawn(&lease, &s).await?;

    // The control plane goes away: the worker keeps retrying, and the
    // sandbox keeps running; once its lease would have expired the worker
    // stops acting on it (the fake's TTL is 3 s).
    let tunnel = remote.agent(&lease).await?;
    cp.with(|f| f.mode = Mode::Away);
    cp.until("retries while away", |f| f.refused_calls >= 3)
        .await;
    assert!(!run.is_finished());
    let expired = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match remote.logs(&lease).await {
                Err(Error::Conflict(m)) if m.contains("expired") => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
    })
    .await;
    assert!(expired.is_ok(), "the lease never lapsed");
    // The tunnel opened before went with the lease.
    assert!(tunnel.exec(sh("true")).await.is_err());
    assert_eq!(
        node.provider().list().await?.len(),
        1,
        "the sandbox keeps running"
    );

    // It comes back: the first call on the lapsed lease has the worker
    // heartbeat at once, and goes ahead on the renewal it answers.
    cp.with(|f| f.mode = Mode::Serve);
    let out = remote.agent(&lease).await?.exec(sh("echo renewed")).await?;
    assert_eq!(out.stdout, b"renewed\n");

    // Later it comes back having forgotten the worker: 404, then a
    // registration.
    cp.with(|f| f.mode = Mode::Forgot);
    cp.until("a second registration", |f| f.registrations.len() >= 2)
        .await;
    let before = cp.with(|f| f.heartbeats.len());
    cp.until("heartbeats after it", |f| f.heartbeats.len() > before + 1)
        .await;
    let last = cp.with(|f| f.heartbeats.last().cloned().unwrap());
    assert!(last.ready);
    assert_eq!(last.runtimes.len(), 1, "{last:?}");
    assert_eq!(last.runtimes[0].fencing_token, 3);
    // Renewed by the answers: the worker acts on the sandbox again.
    let out = remote
        .agent(&lease)
        .await?
        .exec(sh("echo still here"))
        .await?;
    assert_eq!(out.stdout, b"still here\n");

    // A revoked token ends the loop with an error and leaves the sandbox.
    cp.with(|f| f.mode = Mode::Revoked);
    let ended = tokio::time::timeout(Duration::from_secs(60), run).await??;
    let e = ended.unwrap_err();
    assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");
    assert_eq!(node.provider().list().await?.len(), 1);
    remote.destroy(&lease).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawn_gets_the_image_the_worker_lacks_fetched_or_pushed() -> anyhow::Result<()> {
    let cp = FakeControlPlane::start().await?;
    let (node, looping) = node_for(&cp).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (looping, stop) = (looping.clone(), stop.clone());
        async move { looping.run(stop).await }
    });
    cp.until("a ready heartbeat", |f| {
        f.heartbeats.iter().any(|h| h.ready)
    })
    .await;
    // The control plane's catalog has an image the worker's does not.
    let cp_dir = tempfile::tempdir()?;
    let cp_catalog = Arc::new(ImageCatalog::open(&cp_dir.path().join("images"))?);
    let tar = cp.with(|f| f.image_tar.clone());
    let info = cp_catalog
        .import("team/fetched:1", open_tar(&tar).await?)
        .await?;
    assert!(node.catalog.get("team/fetched:1").await.is_err());
    let remote = RemoteWorker::new(RemoteWorkerConfig {
        id: node.rpc.id().clone(),
        address: format!("http://{}", node.addr()),
        secret: NODE_SECRET.into(),
        providers: vec!["proot".into()],
        tls: None,
        catalog: cp_catalog.clone(),
    })?;
    let mut s = spec();
    s.image = "team/fetched:1".into();
    node.guard.register(&s.sandbox_id);
    let lease = Lease::new(&s.sandbox_id, 1, "proot");
    cp.with(|f| f.leases = vec![grant(&s.sandbox_id, 1)]);
    remote.spawn(&lease, &s).await?;
    assert_eq!(
        node.catalog.get("team/fetched:1").await?.digest,
        info.digest
    );
    assert_eq!(cp.with(|f| f.image_fetches.clone()), ["team/fetched:1"]);
    let out = remote.agent(&lease).await?.exec(sh("echo fetched")).await?;
    assert_eq!(out.stdout, b"fetched\n");
    // A second spawn of the same image does not fetch it again.
    let mut again = spec();
    again.image = "team/fetched:1".into();
    node.guard.register(&again.sandbox_id);
    let lease2 = Lease::new(&again.sandbox_id, 1, "proot");
    cp.with(|f| f.leases.push(grant(&again.sandbox_id, 1)));
    remote.spawn(&lease2, &again).await?;
    assert_eq!(cp.with(|f| f.image_fetches.len()), 1);
    // An image this control plane lacks (another replica's catalog has
    // it): the replica making the spawn pushes it over the RPC.
    let pushed = cp_catalog
        .import("team/pushed:1", open_tar(&tar).await?)
        .await?;
    cp.with(|f| f.images_elsewhere.push("team/pushed:1".into()));
    let mut third = spec();
    third.image = "team/pushed:1".into();
    node.guard.register(&third.sandbox_id);
    let lease3 = Lease::new(&third.sandbox_id, 1, "proot");
    cp.with(|f| f.leases.push(grant(&third.sandbox_id, 1)));
    remote.spawn(&lease3, &third).await?;
    assert_eq!(
        cp.with(|f| f.image_fetches.clone()),
        ["team/fetched:1", "team/pushed:1"]
    );
    assert_eq!(
        node.catalog.get("team/pushed:1").await?.digest,
        pushed.digest
    );
    let out = remote.agent(&lease3).await?.exec(sh("echo pushed")).await?;
    assert_eq!(out.stdout, b"pushed\n");
    // An image nobody has fails the spawn as image_not_found.
    let mut nowhere = spec();
    nowhere.image = "team/nowhere:1".into();
    let lease4 = Lease::new(&nowhere.sandbox_id, 1, "proot");
    let e = remote.spawn(&lease4, &nowhere).await.unwrap_err();
    assert!(matches!(e, Error::ImageNotFound(_)), "{e:?}");
    remote.destroy(&lease).await?;
    remote.destroy(&lease2).await?;
    remote.destroy(&lease3).await?;
    // The image the worker had all along is never fetched.
    assert!(node.catalog.get(IMAGE).await.is_ok());
    stop.cancel();
    run.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_cannot_list_is_reported_unhealthy_not_empty() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cp = FakeControlPlane::start().await?;
    let fail = Arc::new(AtomicBool::new(false));
    let (node, looping) = node_with(&cp, Some(fail.clone()), None).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (looping, stop) = (looping.clone(), stop.clone());
        async move { looping.run(stop).await }
    });
    cp.until("a ready heartbeat", |f| {
        f.heartbeats.iter().any(|h| h.ready)
    })
    .await;
    let remote = node.remote_with(NODE_SECRET, None);
    let s = spec();
    node.guard.register(&s.sandbox_id);
    cp.with(|f| f.leases = vec![grant(&s.sandbox_id, 2)]);
    remote
        .spawn(&Lease::new(&s.sandbox_id, 2, "proot"), &s)
        .await?;
    cp.until("the runtime reported", |f| {
        f.heartbeats.last().is_some_and(|h| h.runtimes.len() == 1)
    })
    .await;
    // Listing breaks: the heartbeat says the provider is unhealthy rather
    // than report no runtimes for a healthy one (which reads as "they
    // vanished"), and the worker destroys nothing.
    fail.store(true, Ordering::SeqCst);
    cp.with(|f| f.leases.clear());
    cp.until("an unhealthy report", |f| {
        f.heartbeats.last().is_some_and(|h| !h.providers[0].healthy)
    })
    .await;
    let h = cp.with(|f| f.heartbeats.last().cloned().unwrap());
    assert!(h.runtimes.is_empty(), "{h:?}");
    assert!(
        h.providers[0]
            .detail
            .contains("listing its runtimes failed"),
        "{h:?}"
    );
    fail.store(false, Ordering::SeqCst);
    // Listing again, the unleased runtime goes.
    cp.until("the runtime gone", |f| {
        f.heartbeats
            .last()
            .is_some_and(|h| h.providers[0].healthy && h.runtimes.is_empty())
    })
    .await;
    assert!(node.provider().list().await?.is_empty());
    stop.cancel();
    run.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reaches_a_control_plane_behind_tls() -> anyhow::Result<()> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let cp = FakeControlPlane::start_tls(&cert).await?;
    let ca = cert.cert.pem();
    // Without the CA there is no control plane to talk to.
    assert!(ControlPlane::new(&cp.url, None, TOKEN, "wrk_x").is_err());
    let (node, looping) = node_with(&cp, None, Some(ca.as_bytes())).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (looping, stop) = (looping.clone(), stop.clone());
        async move { looping.run(stop).await }
    });
    cp.until("a ready heartbeat over TLS", |f| {
        f.heartbeats.iter().any(|h| h.ready)
    })
    .await;
    // An image comes over TLS too.
    let client = ControlPlane::new(&cp.url, Some(ca.as_bytes()), TOKEN, node.rpc.id().as_str())?;
    let source: &dyn stacyvm_worker::ImageSource = &client;
    let mut body = source.fetch("busybox").await?;
    let mut n = 0;
    while let Some(b) = futures_util::StreamExt::next(&mut body).await {
        n += b?.len();
    }
    assert_eq!(
        n as u64,
        std::fs::metadata(cp.with(|f| f.image_tar.clone()))?.len()
    );
    stop.cancel();
    run.await??;

    // A worker trusting another CA does not get through.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let client = ControlPlane::new(
        &cp.url,
        Some(other.cert.pem().as_bytes()),
        TOKEN,
        node.rpc.id().as_str(),
    )?;
    let source: &dyn stacyvm_worker::ImageSource = &client;
    let e = source.fetch("busybox").await.err().expect("refused");
    assert!(
        matches!(e, Error::Unavailable(ref m) if m.contains("TLS")),
        "{e:?}"
    );
    Ok(())
}
