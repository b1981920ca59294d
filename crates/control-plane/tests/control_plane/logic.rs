//! The control plane's own logic against the fake provider: quotas around
//! failed and concurrent spawns, placement around an unhealthy provider,
//! the runtime reconciler, destroy retries, and exec and files reaching the
//! agent. The app is built as `server.rs` builds it (SQLite in a temporary
//! data dir, the bootstrap admin key, one in-process worker) and reached
//! over real HTTP; only the providers are fakes, whose knobs make the
//! failures happen on demand. What the real runtimes do is tested by the
//! provider suites.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::{json, Value};
use stacyvm_control_plane::app::{auth, reconcilers, App};
use stacyvm_control_plane::http::{self, AppState};
use stacyvm_control_plane::scheduler::Scheduler;
use stacyvm_control_plane::ServerConfig;
use stacyvm_core::{now, Error, SandboxId, TenantId, WorkerId};
use stacyvm_provider::fake::FakeProvider;
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::{DynProvider, Provider};
use stacyvm_store::{WorkerRecord, WorkerState};
use stacyvm_worker::{DynWorker, LocalWorker};
use tokio::sync::watch;

use crate::support::ADMIN_KEY;

/// Bounds a wait for something the test set in motion, so a bug shows as a
/// failure naming the wait instead of a hung test.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .with_context(|| format!("{what} did not happen"))
}

/// A control plane over fake providers, served on a loopback port.
struct Cp {
    app: Arc<App>,
    url: String,
    http: reqwest::Client,
    system_tenant: TenantId,
    stop: watch::Sender<bool>,
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Cp {
    /// Builds the app as `server::start` does, with `providers` (in that
    /// preference order) on its one in-process worker.
    async fn start(providers: &[Arc<FakeProvider>]) -> Result<Cp> {
        Cp::start_with(providers, |_| {}).await
    }

    /// As `start`, with the configuration changed by `tweak` first.
    async fn start_with(
        providers: &[Arc<FakeProvider>],
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Result<Cp> {
        let dir = tempfile::Builder::new().prefix("svm-cp-fake-").tempdir()?;
        let mut config = ServerConfig::new(dir.path().to_path_buf());
        tweak(&mut config);
        config.listen = "127.0.0.1:0".parse()?;
        config.admin_key = Some(ADMIN_KEY.into());
        config.providers = providers.iter().map(|p| p.name().to_owned()).collect();
        let store = stacyvm_store::open(&config.store_url).await?;
        let boot = auth::bootstrap(&store, &config.data_dir, config.admin_key.as_deref()).await?;
        let catalog = Arc::new(ImageCatalog::open(&config.data_dir.join("images"))?);
        let worker_id = WorkerId::generate();
        let t = now();
        store
            .worker_upsert(&WorkerRecord {
                id: worker_id.clone(),
                name: "local".into(),
                address: "local".into(),
                providers: config.providers.clone(),
                provider_health: Vec::new(),
                labels: Default::default(),
                capacity: 256,
                capacity_cpu: None,
                capacity_memory_mb: None,
                state: WorkerState::Ready,
                registered_at: t,
                last_heartbeat: t,
                token_id: None,
                secret: None,
            })
            .await?;
        let providers: Vec<DynProvider> =
            providers.iter().map(|p| p.clone() as DynProvider).collect();
        let workers: Vec<DynWorker> = vec![Arc::new(LocalWorker::new(worker_id, providers))];
        let app = Arc::new(App::new(
            config.clone(),
            store.clone(),
            Scheduler::new(store, workers, None),
            catalog,
            boot.system_tenant.clone(),
        ));
        let router = http::router(AppState {
            app: app.clone(),
            metrics: PrometheusBuilder::new().build_recorder().handle(),
        });
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stop_rx) = watch::channel(false);
        let limits = http::serve::ConnLimits {
            header_timeout: config.http.header_timeout,
            idle_timeout: config.http.idle_timeout,
            max_connections: config.http.max_connections,
        };
        let serving = tokio::spawn(http::serve::serve(listener, router, limits, stop_rx));
        Ok(Cp {
            app,
            url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
            system_tenant: boot.system_tenant,
            stop,
            serving: Some(serving),
            _dir: dir,
        })
    }

    /// Stops serving and waits for the server to finish.
    async fn stop(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(s) = self.serving.take() {
            s.await??;
        }
        Ok(())
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn create(&self, body: Value) -> Result<(u16, Value)> {
        self.call(reqwest::Method::POST, "/v1/sandboxes", Some(body))
            .await
    }

    /// A create that must succeed; returns the sandbox's id.
    async fn create_running(&self, body: Value) -> Result<SandboxId> {
        let (status, s) = self.create(body).await?;
        ensure!(status == 201 && s["state"] == "running", "{status} {s}");
        SandboxId::parse(s["id"].as_str().unwrap_or_default()).context("no sandbox id")
    }

    async fn sandbox(&self, id: &str) -> Result<Value> {
        let (status, s) = self
            .call(reqwest::Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await?;
        ensure!(status == 200, "GET sandbox {id}: {status} {s}");
        Ok(s)
    }

    async fn destroy(&self, id: &str) -> Result<(u16, Value)> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            None,
        )
        .await
    }

    async fn exec(&self, id: &str, body: Value) -> Result<(u16, Value)> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(body),
        )
        .await
    }

    /// The ids of the operator's sandboxes in `state`.
    async fn in_state(&self, state: &str) -> Result<Vec<String>> {
        let (status, page) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/sandboxes?state={state}"),
                None,
            )
            .await?;
        ensure!(status == 200, "{status} {page}");
        Ok(page["sandboxes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_str().map(str::to_owned))
            .collect())
    }

    /// Limits the operator's own tenant to `max` live sandboxes.
    async fn limit_sandboxes(&self, max: i64) -> Result<()> {
        let (status, q) = self
            .call(
                reqwest::Method::PUT,
                &format!("/v1/tenants/{}/quota", self.system_tenant),
                Some(json!({"max_sandboxes": max})),
            )
            .await?;
        ensure!(status == 200 && q["max_sandboxes"] == max, "{status} {q}");
        Ok(())
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        // A test that failed before `stop`: the server task ends with the
        // runtime, the fakes remove their runtimes when dropped.
        let _ = self.stop.send(true);
    }
}

fn error_of(body: &Value) -> (&str, &str) {
    (
        body["error"]["code"].as_str().unwrap_or_default(),
        body["error"]["message"].as_str().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_spawn_frees_the_quota_and_records_why() -> Result<()> {
    let fake = Arc::new(FakeProvider::new("fake"));
    let cp = Cp::start(std::slice::from_ref(&fake)).await?;
    cp.limit_sandboxes(1).await?;

    fake.fail_spawns(Some(Error::ProviderUnavailable(
        "the runtime is out of disk space".into(),
    )));
    let (status, body) = cp.create(json!({"image": "busybox"})).await?;
    ensure!(status == 503, "{status} {body}");
    let (code, message) = error_of(&body);
    ensure!(
        code == "provider_unavailable" && message.contains("out of disk space"),
        "{body}"
    );
    let failed = cp.in_state("failed").await?;
    ensure!(failed.len() == 1, "{failed:?}");
    let s = cp.sandbox(&failed[0]).await?;
    ensure!(
        s["failure"]["code"] == "provider_unavailable"
            && s["failure"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("out of disk space"))
            && s["destroyed_at"].is_string(),
        "{s}"
    );
    ensure!(
        fake.runtime_ids().is_empty(),
        "the failed spawn left a runtime"
    );

    // The failed sandbox holds no quota: the one place is free again.
    fake.fail_spawns(None);
    let id = cp.create_running(json!({"image": "busybox"})).await?;
    let (status, body) = cp.create(json!({"image": "busybox"})).await?;
    ensure!(
        status == 429 && error_of(&body).0 == "quota_exceeded",
        "{status} {body}"
    );
    ensure!(fake.runtime_ids() == vec![id]);
    cp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_provider_is_skipped_and_named_when_asked_for() -> Result<()> {
    let down = Arc::new(FakeProvider::new("fake-down"));
    let up = Arc::new(FakeProvider::new("fake-up"));
    down.set_health(false, "its daemon is restarting");
    let cp = Cp::start(&[down.clone(), up.clone()]).await?;

    // Automatic placement passes over the first, unhealthy provider.
    let id = cp.create_running(json!({"image": "busybox"})).await?;
    let s = cp.sandbox(id.as_str()).await?;
    ensure!(s["provider"] == "fake-up", "{s}");

    // Asked for by name, it is refused with the reason.
    let (status, body) = cp
        .create(json!({"image": "busybox", "provider": "fake-down"}))
        .await?;
    ensure!(status == 503, "{status} {body}");
    let (code, message) = error_of(&body);
    ensure!(
        code == "provider_unavailable"
            && message.contains("fake-down")
            && message.contains("its daemon is restarting"),
        "{body}"
    );
    ensure!(
        down.calls().spawn == 0,
        "the unhealthy provider was asked to spawn"
    );
    ensure!(up.runtime_ids() == vec![id]);
    cp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_settles_vanished_stopped_and_orphaned_runtimes() -> Result<()> {
    let fake = Arc::new(FakeProvider::new("fake"));
    let cp = Cp::start(std::slice::from_ref(&fake)).await?;
    cp.limit_sandboxes(2).await?;
    let vanished = cp.create_running(json!({"image": "busybox"})).await?;
    let stopped = cp.create_running(json!({"image": "busybox"})).await?;
    // A runtime no row accounts for, as after a crash between spawn and
    // commit.
    let orphan = SandboxId::generate();
    fake.spawn(&stacyvm_core::SpawnSpec {
        sandbox_id: orphan.clone(),
        image: "busybox".into(),
        cpu: 1.0,
        memory_mb: 256,
        env: Default::default(),
        workdir: None,
        network: Default::default(),
        labels: Default::default(),
        egress_allow: Vec::new(),
        mounts: Vec::new(),
    })
    .await?;
    ensure!(fake.runtime_ids().len() == 3);

    ensure!(fake.vanish(&vanished));
    ensure!(fake.stop_runtime(&stopped));
    // Before the reconciler has run, the row still says running: a call
    // is a conflict with that state, not a 404 for a sandbox that exists.
    let (status, body) = cp.exec(vanished.as_str(), json!({"cmd": ["true"]})).await?;
    ensure!(
        status == 409 && error_of(&body).0 == "conflict",
        "exec on a vanished runtime: {status} {body}"
    );
    reconcilers::reconcile_runtimes(&cp.app, false).await?;

    let s = cp.sandbox(vanished.as_str()).await?;
    ensure!(
        s["state"] == "lost" && s["failure"]["code"] == "lost" && s["destroyed_at"].is_string(),
        "{s}"
    );
    let s = cp.sandbox(stopped.as_str()).await?;
    ensure!(
        s["state"] == "failed" && s["failure"]["code"] == "runtime_stopped",
        "{s}"
    );
    // The stopped runtime is removed with its sandbox, the orphan alone.
    ensure!(
        fake.runtime_ids().is_empty(),
        "runtimes left: {:?} (orphan {orphan})",
        fake.runtime_ids()
    );
    // Neither holds quota any more, and neither can be used.
    let (status, body) = cp.exec(vanished.as_str(), json!({"cmd": ["true"]})).await?;
    ensure!(
        status == 409 && error_of(&body).0 == "conflict",
        "{status} {body}"
    );
    cp.create_running(json!({"image": "busybox"})).await?;
    cp.create_running(json!({"image": "busybox"})).await?;
    cp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_against_a_slow_spawn_keep_to_the_quota() -> Result<()> {
    const CREATES: usize = 6;
    const QUOTA: usize = 2;
    let fake = Arc::new(FakeProvider::new("fake"));
    let cp = Arc::new(Cp::start(std::slice::from_ref(&fake)).await?);
    cp.limit_sandboxes(QUOTA as i64).await?;
    fake.hold_spawns();
    let creates: Vec<_> = (0..CREATES)
        .map(|_| {
            let cp = cp.clone();
            tokio::spawn(async move { cp.create(json!({"image": "busybox"})).await })
        })
        .collect();
    // Every create either answered already or waits in its spawn.
    bounded("every create answering or spawning", async {
        loop {
            let answered = creates.iter().filter(|c| c.is_finished()).count();
            if answered + fake.spawns_waiting_now() >= CREATES {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    ensure!(
        fake.spawns_waiting_now() == QUOTA,
        "{} spawns run at once under a quota of {QUOTA}",
        fake.spawns_waiting_now()
    );
    fake.release_spawns();
    let mut created = 0;
    for c in creates {
        let (status, body) = bounded("a create's answer", c).await???;
        match status {
            201 => created += 1,
            429 if error_of(&body).0 == "quota_exceeded" => {}
            _ => bail!("{status} {body}"),
        }
    }
    ensure!(created == QUOTA, "{created} creates succeeded");
    ensure!(fake.runtime_ids().len() == QUOTA && fake.calls().spawn == QUOTA as u64);
    ensure!(cp.in_state("running").await?.len() == QUOTA);
    Arc::into_inner(cp)
        .context("the creates still hold the server")?
        .stop()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cut_off_by_the_request_timeout_is_audited_and_still_finishes() -> Result<()> {
    let fake = Arc::new(FakeProvider::new("fake"));
    let cp = Cp::start_with(std::slice::from_ref(&fake), |c| {
        c.limits.request_timeout = Duration::from_secs(1);
    })
    .await?;
    fake.hold_spawns();
    let (status, body) = cp.create(json!({"image": "busybox"})).await?;
    ensure!(
        status == 504 && error_of(&body).0 == "timeout",
        "{status} {body}"
    );
    // The refusal the client saw is in the audit log.
    let (_, audit) = cp
        .call(
            reqwest::Method::GET,
            "/v1/audit?action=sandbox.create",
            None,
        )
        .await?;
    ensure!(
        audit["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["status"] == 504)),
        "no audit event of the timed-out create: {audit}"
    );
    // The create itself was not dropped half-way: released, it finishes
    // and the sandbox runs (nothing is left `starting`).
    fake.release_spawns();
    bounded("the cut-off create to finish", async {
        loop {
            if cp.in_state("running").await.is_ok_and(|r| r.len() == 1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    ensure!(cp.in_state("starting").await?.is_empty());
    cp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_is_idempotent_and_a_failed_one_is_finished_later() -> Result<()> {
    let fake = Arc::new(FakeProvider::new("fake"));
    let cp = Cp::start(std::slice::from_ref(&fake)).await?;
    cp.limit_sandboxes(2).await?;

    // Destroying twice is 204 twice; the provider is asked once.
    let id = cp.create_running(json!({"image": "busybox"})).await?;
    for _ in 0..2 {
        let (status, body) = cp.destroy(id.as_str()).await?;
        ensure!(status == 204, "{status} {body}");
    }
    ensure!(cp.sandbox(id.as_str()).await?["state"] == "destroyed");
    ensure!(fake.runtime_ids().is_empty() && fake.calls().destroy == 1);

    // A destroy the provider fails is reported with its reason; the sandbox
    // stays `stopping`, holding its quota, until a later destroy works.
    let retried = cp.create_running(json!({"image": "busybox"})).await?;
    fake.fail_next_destroy(Error::ProviderUnavailable(
        "the runtime did not answer".into(),
    ));
    let (status, body) = cp.destroy(retried.as_str()).await?;
    ensure!(
        status == 503 && error_of(&body).1.contains("did not answer"),
        "{status} {body}"
    );
    ensure!(cp.sandbox(retried.as_str()).await?["state"] == "stopping");
    ensure!(fake.runtime_ids() == vec![retried.clone()]);
    let resumed = cp.create_running(json!({"image": "busybox"})).await?;
    let (status, body) = cp.create(json!({"image": "busybox"})).await?;
    ensure!(
        status == 429,
        "a stopping sandbox gave up its quota: {status} {body}"
    );
    let (status, body) = cp.destroy(retried.as_str()).await?;
    ensure!(status == 204, "{status} {body}");
    ensure!(cp.sandbox(retried.as_str()).await?["state"] == "destroyed");
    ensure!(fake.runtime_ids() == vec![resumed.clone()]);

    // One left `stopping` is finished by the start-up reconciliation.
    fake.fail_next_destroy(Error::ProviderUnavailable(
        "the runtime did not answer".into(),
    ));
    let (status, _) = cp.destroy(resumed.as_str()).await?;
    ensure!(status == 503);
    ensure!(cp.sandbox(resumed.as_str()).await?["state"] == "stopping");
    reconcilers::reconcile_runtimes(&cp.app, true).await?;
    ensure!(cp.sandbox(resumed.as_str()).await?["state"] == "destroyed");
    ensure!(fake.runtime_ids().is_empty());
    cp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_that_meets_a_lapsed_lease_still_destroys() -> Result<()> {
    let fake = Arc::new(FakeProvider::new("fake"));
    let cp = Cp::start(std::slice::from_ref(&fake)).await?;
    let id = cp.create_running(json!({"image": "busybox"})).await?;
    // Another handle on the same store, as a second control plane's
    // reconciler has: while the destroy waits in the provider, the lease
    // lapses and the sandbox is marked lost under a new fencing token.
    let store = stacyvm_store::open(&cp.app.config().store_url).await?;
    fake.hold_destroys();
    let lapse = async {
        bounded("the destroy", fake.destroys_waiting(1)).await?;
        let far = now() + Duration::from_secs(86_400);
        let lost = store.sandbox_lose_lapsed(far, None).await?;
        ensure!(
            lost.iter().map(|s| &s.id).collect::<Vec<_>>() == vec![&id],
            "{lost:?}"
        );
        fake.release_destroys();
        Ok(())
    };
    let ((status, body), ()) = tokio::try_join!(cp.destroy(id.as_str()), lapse)?;
    ensure!(
        status == 204,
        "the destroy lost to the new fencing token: {status} {body}"
    );
    ensure!(cp.sandbox(id.as_str()).await?["state"] == "destroyed");
    ensure!(fake.runtime_ids().is_empty());
    cp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_files_reach_the_agent_through_the_provider() -> Result<()> {
    let fake = Arc::new(FakeProvider::new("fake"));
    let cp = Cp::start(std::slice::from_ref(&fake)).await?;
    let id = cp
        .create_running(
            json!({"image": "busybox", "env": {"FROM_CREATE": "yes"}, "workdir": "/work"}),
        )
        .await?;
    let root = fake.root_of(&id).context("no root")?;

    let r = cp
        .http
        .put(format!(
            "{}/v1/sandboxes/{id}/files?path=/work/in.txt",
            cp.url
        ))
        .bearer_auth(ADMIN_KEY)
        .body("from the client")
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.text().await?);
    ensure!(std::fs::read(root.join("work/in.txt"))? == b"from the client");

    // The command runs in the sandbox's workdir with its env, and sees the
    // file the upload wrote.
    let (status, out) = cp
        .exec(
            id.as_str(),
            json!({"cmd": ["sh", "-c", "echo \"$FROM_CREATE $FROM_EXEC\"; cat in.txt; echo made > out.txt"],
                   "env": {"FROM_EXEC": "too"}}),
        )
        .await?;
    ensure!(status == 200 && out["exit_code"] == 0, "{status} {out}");
    ensure!(out["stdout"] == "yes too\nfrom the client", "{out}");
    let r = cp
        .http
        .get(format!(
            "{}/v1/sandboxes/{id}/files?path=/work/out.txt",
            cp.url
        ))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?;
    ensure!(r.status() == 200);
    ensure!(r.text().await? == "made\n");
    let (status, list) = cp
        .call(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{id}/files/list?path=/work"),
            None,
        )
        .await?;
    let names: Vec<&str> = list["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    ensure!(
        status == 200 && names == ["in.txt", "out.txt"],
        "{status} {list}"
    );
    ensure!(fake.calls().agent > 0);

    // After the destroy neither reaches anything.
    let (status, _) = cp.destroy(id.as_str()).await?;
    ensure!(status == 204);
    ensure!(!root.exists(), "{} is left", root.display());
    let (status, body) = cp.exec(id.as_str(), json!({"cmd": ["true"]})).await?;
    ensure!(status == 409, "{status} {body}");
    cp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_during_a_slow_spawn_wins() -> Result<()> {
    let fake = Arc::new(FakeProvider::new("fake"));
    let cp = Arc::new(Cp::start(std::slice::from_ref(&fake)).await?);
    cp.limit_sandboxes(1).await?;
    fake.hold_spawns();
    let create = {
        let cp = cp.clone();
        tokio::spawn(async move { cp.create(json!({"image": "busybox"})).await })
    };
    bounded("the spawn", fake.spawns_waiting(1)).await?;
    let starting = cp.in_state("starting").await?;
    ensure!(starting.len() == 1, "{starting:?}");
    let (status, body) = cp.destroy(&starting[0]).await?;
    ensure!(status == 204, "{status} {body}");
    ensure!(cp.sandbox(&starting[0]).await?["state"] == "destroyed");

    // The spawn finishes after the destroy: the create reports the
    // conflict and its runtime is removed.
    fake.release_spawns();
    let (status, body) = bounded("the create's answer", create).await???;
    ensure!(
        status == 409 && error_of(&body).0 == "conflict",
        "{status} {body}"
    );
    ensure!(cp.sandbox(&starting[0]).await?["state"] == "destroyed");
    ensure!(
        fake.runtime_ids().is_empty(),
        "the runtime outlived its destroyed sandbox"
    );
    cp.create_running(json!({"image": "busybox"})).await?;
    Arc::into_inner(cp)
        .context("the create still holds the server")?
        .stop()
        .await
}
