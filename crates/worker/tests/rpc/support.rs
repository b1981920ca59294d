//! The world of one worker RPC test: a data dir and catalog with the
//! busybox image, the host's real providers, a worker RPC server on
//! loopback and a `RemoteWorker` reaching it, and a guard that destroys
//! every sandbox the test made (also on panic).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use stacyvm_core::{ByteStream, ExecRequest, Network, SandboxId, SpawnSpec, WorkerId};
use stacyvm_provider::docker::{DockerConfig, DockerProvider};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::namespaces::{NamespacesConfig, NamespacesProvider};
use stacyvm_provider::plugin::{PluginConfig, PluginProvider, PluginTiming};
use stacyvm_provider::proot::{ProotConfig, ProotProvider};
use stacyvm_provider::DynProvider;
use stacyvm_worker::{
    ClientTls, ImageSource, LeaseTable, RemoteWorker, RemoteWorkerConfig, RpcServer, ServerTls,
    WorkerRpc, WorkerRpcConfig,
};

pub const IMAGE: &str = "busybox";
pub const SECRET: &str = "svmws_test-secret";

fn env_path(var: &str, what: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::var_os(var).map(PathBuf::from).with_context(|| {
        format!("{var} is not set: run `. scripts/lib.sh && prepare_test_env` for {what}")
    })?;
    if !p.is_file() {
        bail!("{var}={} does not name a file", p.display());
    }
    Ok(p)
}

/// How to start a [`Node`].
#[derive(Default)]
pub struct Opts {
    /// Wrap the provider so a test can make its listing fail.
    pub failing_list: Option<Arc<std::sync::atomic::AtomicBool>>,
    pub tls: Option<ServerTls>,
    pub id: Option<WorkerId>,
    pub images: Option<Arc<dyn ImageSource>>,
    /// Leave the secret unset, as before a registration.
    pub unregistered: bool,
}

/// A worker RPC server over real providers and a client for it.
pub struct Node {
    pub guard: Guard,
    pub rpc: Arc<WorkerRpc>,
    pub server: Option<RpcServer>,
    pub catalog: Arc<ImageCatalog>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// A node running `provider` (`docker`, `namespaces` or `proot`),
    /// already holding the test's secret.
    pub async fn start(provider: &str, tls: Option<&ServerTls>) -> anyhow::Result<Node> {
        Node::start_with(
            provider,
            Opts {
                tls: tls.cloned(),
                ..Opts::default()
            },
        )
        .await
    }

    pub async fn start_with(provider: &str, opts: Opts) -> anyhow::Result<Node> {
        let agent_bin = env_path("STACYVM_AGENT_BIN", "the static agent")?;
        let tar = env_path("STACYVM_TEST_IMAGE_TAR", "the busybox image")?;
        let dir = tempfile::Builder::new().prefix("svm-wrk-").tempdir()?;
        let data_dir = dir.path().canonicalize()?;
        let catalog = Arc::new(ImageCatalog::open(&data_dir.join("images"))?);
        catalog.import(IMAGE, open_tar(&tar).await?).await?;
        let instance = format!(
            "wtest-{}-{}",
            std::process::id(),
            &SandboxId::generate().as_str()[4..12]
        );
        let p: DynProvider = match provider {
            "docker" => Arc::new(DockerProvider::new(DockerConfig::new(
                data_dir.clone(),
                agent_bin,
                catalog.clone(),
                instance,
            ))?),
            "namespaces" => Arc::new(NamespacesProvider::new(NamespacesConfig {
                data_dir: data_dir.clone(),
                agent_bin,
                catalog: catalog.clone(),
                instance,
                egress_dns_upstreams: Vec::new(),
            })?),
            "proot" => Arc::new(ProotProvider::new(ProotConfig {
                data_dir: data_dir.clone(),
                agent_bin,
                catalog: catalog.clone(),
                instance,
            })?),
            // The provider crate's test plugin, whose sandboxes are host
            // directories: with no flag it serves exec itself (a bridge),
            // with `--agent unix` it runs a real agent on a Unix socket.
            "plugin-bridge" | "plugin-unix" => {
                let args: &[&str] = if provider == "plugin-unix" {
                    &["--agent", "unix"]
                } else {
                    &[]
                };
                Arc::new(PluginProvider::new(PluginConfig {
                    name: "hostexec".into(),
                    executable: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../provider/tests/provider/plugins/hostexec.py"),
                    args: args.iter().map(|a| a.to_string()).collect(),
                    env: Vec::new(),
                    data_dir: data_dir.clone(),
                    agent_bin,
                    catalog: catalog.clone(),
                    instance,
                    timing: PluginTiming::default(),
                })?)
            }
            other => bail!("no provider {other}"),
        };
        let p: DynProvider = match &opts.failing_list {
            Some(fail) => Arc::new(FailingList {
                inner: p,
                fail: fail.clone(),
            }),
            None => p,
        };
        let health = p.health().await;
        if !health.healthy {
            bail!(
                "the {provider} provider is not usable on this host: {}",
                health.detail
            );
        }
        let rpc = WorkerRpc::new(WorkerRpcConfig {
            id: opts.id.unwrap_or_else(WorkerId::generate),
            providers: vec![p.clone()],
            catalog: catalog.clone(),
            leases: Arc::new(LeaseTable::new(Duration::from_secs(600))),
            images: opts.images,
            certification_records: None,
            volumes: None,
        });
        if !opts.unregistered {
            rpc.set_secret(SECRET);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = RpcServer::start(rpc.clone(), listener, opts.tls.as_ref()).await?;
        Ok(Node {
            guard: Guard::new(p),
            rpc,
            server: Some(server),
            catalog,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().expect("the server runs").addr
    }

    /// A remote worker for this node, presenting `secret`.
    pub fn remote_with(&self, secret: &str, tls: Option<ClientTls>) -> RemoteWorker {
        let scheme = if tls.is_some() { "https" } else { "http" };
        RemoteWorker::new(RemoteWorkerConfig {
            id: self.rpc.id().clone(),
            address: format!("{scheme}://{}", self.addr()),
            secret: secret.into(),
            providers: self.rpc.provider_names(),
            tls,
            catalog: self.catalog.clone(),
        })
        .expect("a valid address")
    }

    pub fn remote(&self) -> RemoteWorker {
        self.remote_with(SECRET, None)
    }

    pub fn provider(&self) -> DynProvider {
        self.guard.provider.clone()
    }

    pub fn provider_name(&self) -> String {
        self.rpc.provider_names()[0].clone()
    }
}

pub async fn open_tar(tar: &std::path::Path) -> anyhow::Result<ByteStream> {
    let file = tokio::fs::File::open(tar)
        .await
        .with_context(|| format!("opening {}", tar.display()))?;
    Ok(Box::pin(tokio_util::io::ReaderStream::new(file)))
}

/// Destroys every sandbox registered with it when dropped, panics included.
pub struct Guard {
    provider: DynProvider,
    ids: Mutex<Vec<SandboxId>>,
}

impl Guard {
    fn new(provider: DynProvider) -> Guard {
        Guard {
            provider,
            ids: Mutex::new(Vec::new()),
        }
    }

    pub fn register(&self, id: &SandboxId) {
        self.ids.lock().expect("guard lock").push(id.clone());
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        if ids.is_empty() {
            return;
        }
        let provider = self.provider.clone();
        // Drop may run inside the test's runtime: clean up on a thread of
        // our own with a runtime of its own.
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a cleanup runtime can always be built");
            rt.block_on(async {
                for id in ids {
                    if let Err(e) = provider.destroy(&id).await {
                        eprintln!("cleanup: destroying {id} failed: {e}");
                    }
                }
            });
        })
        .join();
        if joined.is_err() {
            eprintln!("cleanup: the cleanup thread panicked");
        }
    }
}

pub fn spec() -> SpawnSpec {
    SpawnSpec {
        sandbox_id: SandboxId::generate(),
        image: IMAGE.into(),
        cpu: 1.0,
        memory_mb: 256,
        env: BTreeMap::new(),
        workdir: None,
        network: Network::None,
        labels: BTreeMap::new(),
        egress_allow: Vec::new(),
        mounts: Vec::new(),
    }
}

pub fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout_ms: 120_000,
        output_cap: stacyvm_core::exec::DEFAULT_OUTPUT_CAP,
        user: None,
    }
}

/// A real provider whose `list` fails while `fail` is set (a daemon that
/// stopped answering, say); everything else goes to the provider.
pub struct FailingList {
    inner: DynProvider,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl stacyvm_provider::Provider for FailingList {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn health(&self) -> stacyvm_provider::Health {
        self.inner.health().await
    }
    async fn spawn(&self, spec: &SpawnSpec) -> stacyvm_core::Result<()> {
        self.inner.spawn(spec).await
    }
    async fn destroy(&self, id: &SandboxId) -> stacyvm_core::Result<()> {
        self.inner.destroy(id).await
    }
    async fn list(&self) -> stacyvm_core::Result<Vec<stacyvm_provider::RuntimeInfo>> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(stacyvm_core::Error::ProviderUnavailable(
                "listing is broken for this test".into(),
            ));
        }
        self.inner.list().await
    }
    async fn logs(&self, id: &SandboxId) -> stacyvm_core::Result<Vec<stacyvm_provider::LogLine>> {
        self.inner.logs(id).await
    }
    async fn agent(
        &self,
        id: &SandboxId,
    ) -> stacyvm_core::Result<Arc<stacyvm_provider::AgentClient>> {
        self.inner.agent(id).await
    }
    async fn agent_stream(
        &self,
        id: &SandboxId,
    ) -> stacyvm_core::Result<stacyvm_provider::AgentStream> {
        self.inner.agent_stream(id).await
    }
}
