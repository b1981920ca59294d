//! Starting and stopping a StacyVM server: open the store, bootstrap the
//! admin key, build providers and the local worker, adopt what is already
//! running, then serve HTTP until asked to stop.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use stacyvm_core::{now, Error, Result, WorkerId};
use stacyvm_provider::host::{self, persistent_id, prepare_data_dir, HostOptions};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::DynProvider;
use stacyvm_store::WorkerRecord;
use stacyvm_worker::{ClientTls, DynWorker, LocalWorker, RemoteWorker, RemoteWorkerConfig};
use tokio::sync::watch;

use crate::app::reconcilers;
use crate::app::{auth, App};
use crate::config::ServerConfig;
use crate::http::{self, AppState};
use crate::scheduler::{Connect, Scheduler};

/// A server that is up: its address and what the operator should be told.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    /// The admin key, when this start generated it.
    pub generated_admin_key: Option<String>,
    pub admin_key_file: Option<std::path::PathBuf>,
    stop: watch::Sender<bool>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    loops: tokio::task::JoinHandle<()>,
    pool_loop: tokio::task::JoinHandle<()>,
    /// Reads the sandboxes whose resource use someone is following.
    sampler: tokio::task::JoinHandle<()>,
}

fn metrics_handle() -> Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let h = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| Error::internal("installing the metrics recorder", e))?;
    Ok(HANDLE.get_or_init(|| h).clone())
}

fn build_providers(
    config: &ServerConfig,
    catalog: &Arc<ImageCatalog>,
    instance: &str,
) -> Result<Vec<DynProvider>> {
    host::build_providers(
        &config.providers,
        &HostOptions {
            data_dir: config.data_dir.clone(),
            egress_host_access: config.egress_host_access,
            egress_dns_upstreams: config.egress_dns_upstreams.clone(),
            plugins: config.plugins.clone(),
            firecracker_bin: config.firecracker_bin.clone(),
        },
        catalog,
        instance,
    )
}

/// How this control plane reaches a remote worker from its registration:
/// over the worker RPC, with the secret of its latest registration, trusting
/// `--worker-ca` for workers that registered an `https://` address.
fn remote_workers(config: &ServerConfig, catalog: &Arc<ImageCatalog>) -> Result<Connect> {
    let ca = match &config.worker_ca {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            Error::InvalidRequest(format!("cannot read --worker-ca {}: {e}", path.display()))
        })?),
        None => None,
    };
    let catalog = catalog.clone();
    Ok(Arc::new(move |rec: &WorkerRecord| -> Result<DynWorker> {
        let secret = rec.secret.clone().ok_or_else(|| {
            Error::Unavailable(format!("worker {} has not registered", rec.name_or_id()))
        })?;
        let tls = match (rec.address.starts_with("https://"), &ca) {
            (false, _) => None,
            (true, Some(ca_pem)) => Some(ClientTls {
                ca_pem: ca_pem.clone(),
                domain: None,
            }),
            (true, None) => {
                return Err(Error::Unavailable(format!(
                    "worker {} serves TLS ({}) and this control plane trusts no worker CA: \
                     start it with --worker-ca",
                    rec.name_or_id(),
                    rec.address
                )))
            }
        };
        let remote: DynWorker = Arc::new(RemoteWorker::new(RemoteWorkerConfig {
            id: rec.id.clone(),
            address: rec.address.clone(),
            secret,
            providers: rec.providers.clone(),
            tls,
            catalog: catalog.clone(),
        })?);
        Ok(Arc::new(crate::metered::Metered::new(remote)))
    }))
}

/// Opens everything and starts serving on `config.listen`.
pub async fn start(config: ServerConfig) -> Result<Running> {
    prepare_data_dir(&config.data_dir)?;
    let store = stacyvm_store::open(&config.store_url).await?;
    let boot = auth::bootstrap(&store, &config.data_dir, config.admin_key.as_deref()).await?;
    let catalog = Arc::new(ImageCatalog::open(&config.data_dir.join("images"))?);
    let instance = persistent_id(&config.data_dir, "instance.id", || {
        let mut b = [0u8; 6];
        rand::fill(&mut b);
        hex::encode(b)
    })?;

    let mut workers: Vec<DynWorker> = Vec::new();
    if config.local_worker {
        let worker_id =
            WorkerId::from_trusted(persistent_id(&config.data_dir, "worker.id", || {
                WorkerId::generate().to_string()
            })?);
        let providers = build_providers(&config, &catalog, &instance)?;
        let names: Vec<String> = providers.iter().map(|p| p.name().to_owned()).collect();
        let existing = store.worker_get(&worker_id).await?;
        let t = now();
        store
            .worker_upsert(&WorkerRecord {
                id: worker_id.clone(),
                address: "local".into(),
                providers: names,
                labels: Default::default(),
                capacity: existing.as_ref().map(|w| w.capacity).unwrap_or(256),
                state: reconcilers::keep_state(existing.as_ref().map(|w| w.state)),
                registered_at: existing.as_ref().map(|w| w.registered_at).unwrap_or(t),
                last_heartbeat: t,
                name: "local".into(),
                provider_health: Vec::new(),
                capacity_cpu: None,
                capacity_memory_mb: None,
                token_id: None,
                secret: None,
            })
            .await?;
        workers.push(Arc::new(
            LocalWorker::new(worker_id, providers)
                .with_certification_records(config.data_dir.clone()),
        ));
    }

    let app = Arc::new(App::new(
        config.clone(),
        store.clone(),
        Scheduler::new(store, workers, Some(remote_workers(&config, &catalog)?)),
        catalog,
        boot.system_tenant.clone(),
    ));

    // Adopt what survived the last run before taking requests.
    reconcilers::heartbeat(&app).await?;
    if let Err(e) = reconcilers::reconcile_runtimes(&app, true).await {
        tracing::warn!(error = %e, "start-up reconciliation failed; it is retried in the background");
    }
    // Builds the last run left half-way own a sandbox and maybe an image.
    if let Err(e) = app.template_recover(true).await {
        tracing::warn!(error = %e, "start-up template build recovery failed; it is retried in the background");
    }

    let state = AppState {
        app: app.clone(),
        metrics: metrics_handle()?,
    };
    let router = http::router(state);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::InvalidRequest(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal("reading the listen address", e))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = http::serve::ConnLimits {
        header_timeout: config.http.header_timeout,
        idle_timeout: config.http.idle_timeout,
        max_connections: config.http.max_connections,
    };
    let serving = tokio::spawn(http::serve::serve(
        listener,
        router,
        limits,
        stop_rx.clone(),
    ));
    let loops = reconcilers::spawn_loops(app.clone(), stop_rx.clone());
    let sampler = crate::app::stats::spawn_sampler(app.clone(), stop_rx.clone());
    let pool_loop = reconcilers::spawn_pool_loop(app.clone(), stop_rx);
    tracing::info!(%addr, store = app.store_kind(), "StacyVM is serving");
    Ok(Running {
        addr,
        app,
        generated_admin_key: boot.generated_key,
        admin_key_file: boot.key_file,
        stop: stop_tx,
        serving,
        loops,
        pool_loop,
        sampler,
    })
}

impl Running {
    /// Stops accepting, lets in-flight calls finish, stops the loops and
    /// destroys the idle warm-pool members (nobody owns them, and a server
    /// that is not started again would never remove them). The sandboxes
    /// keep running; the next start adopts them.
    pub async fn shutdown(self) -> Result<()> {
        self.app.pools_close();
        let _ = self.stop.send(true);
        let _ = self.loops.await;
        let _ = self.pool_loop.await;
        let _ = self.sampler.await;
        let served = match self.serving.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::internal("serving HTTP", e)),
            Err(e) => Err(Error::internal("the HTTP task", e)),
        };
        let drained = self.app.pools_drain().await;
        if drained > 0 {
            tracing::info!(members = drained, "destroyed the idle warm-pool members");
        }
        served
    }
}
