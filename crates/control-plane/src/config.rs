//! Server configuration: what `stacyvm serve` was started with, and the
//! defaults a user gets without saying anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the control plane and its local worker need to start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://…`; `sqlite://DATA_DIR/stacyvm.db` by default.
    pub store_url: String,
    /// Providers in preference order (`docker`, `namespaces`, `proot`).
    pub providers: Vec<String>,
    /// The quota a tenant starts with when it is created (the operator's
    /// own tenant has none: it is unlimited).
    pub default_tenant_quota: stacyvm_store::Quota,
    /// Run the in-process worker (single-node mode).
    pub local_worker: bool,
    pub limits: Limits,
    /// The bootstrap admin key (`STACYVM_ADMIN_KEY`); generated into
    /// `DATA_DIR/admin.key` when absent.
    pub admin_key: Option<String>,
    /// How often reconcilers run.
    pub reconcile_interval: Duration,
    /// Warm pools to keep filled.
    pub pools: Vec<crate::pools::PoolSpec>,
    /// How HTTP connections are accepted, timed out and attributed.
    pub http: HttpConfig,
}

/// The HTTP front: connection limits and timeouts, which peers may speak
/// for a client, and what needs a key.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// A client must send a whole request head within this time: from the
    /// connection's start, or from the first byte of a later request.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after
    /// this long without a new one.
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog
    /// until one closes.
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-For` names the client (load balancers,
    /// reverse proxies). Everyone else's is ignored.
    pub trusted_proxies: Vec<crate::http::client_addr::Cidr>,
    /// Serve `/metrics` without a key (for scrapers on a trusted network).
    pub metrics_public: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            trusted_proxies: Vec::new(),
            metrics_public: false,
        }
    }
}

/// Request limits and defaults.
#[derive(Clone, Debug)]
pub struct Limits {
    pub json_body_bytes: usize,
    pub upload_bytes: u64,
    pub exec_output_cap: u64,
    pub default_exec_timeout: Duration,
    pub max_exec_timeout: Duration,
    pub default_sandbox_timeout_s: i64,
    pub max_sandbox_timeout_s: i64,
    pub default_cpu: f64,
    pub max_cpu: f64,
    pub default_memory_mb: i64,
    pub min_memory_mb: i64,
    pub max_memory_mb: i64,
    /// Limit for calls that are not streams or uploads.
    pub request_timeout: Duration,
    /// How long a worker's lease on a sandbox lasts without renewal.
    pub lease: Duration,
    /// Failed authentication attempts one address may make per minute
    /// before it is refused with 429.
    pub auth_failures_per_minute: i64,
    /// Execs (and streaming execs) one sandbox may run at once.
    pub max_execs_per_sandbox: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            json_body_bytes: 10 * 1024 * 1024,
            upload_bytes: 1024 * 1024 * 1024,
            exec_output_cap: stacyvm_core::exec::DEFAULT_OUTPUT_CAP,
            default_exec_timeout: Duration::from_secs(60),
            max_exec_timeout: Duration::from_secs(24 * 3600),
            default_sandbox_timeout_s: 300,
            max_sandbox_timeout_s: 7 * 24 * 3600,
            default_cpu: 1.0,
            max_cpu: 64.0,
            default_memory_mb: 512,
            min_memory_mb: 16,
            max_memory_mb: 256 * 1024,
            request_timeout: Duration::from_secs(120),
            lease: Duration::from_secs(60),
            auth_failures_per_minute: 120,
            max_execs_per_sandbox: 32,
        }
    }
}

/// Providers that are not a security boundary: never chosen for a create
/// that does not name them, and usable only by tenants whose quota lists
/// them in `allowed_providers`.
pub const RESTRICTED_PROVIDERS: [&str; 1] = ["proot"];

/// What a new tenant may use unless the operator says otherwise: 10 live
/// sandboxes, 8 CPUs, 16 GiB, a day per sandbox, 600 execs a minute and 100
/// at once.
pub fn default_tenant_quota() -> stacyvm_store::Quota {
    stacyvm_store::Quota {
        max_sandboxes: Some(10),
        max_cpu: Some(8.0),
        max_memory_mb: Some(16 * 1024),
        max_timeout_s: Some(24 * 3600),
        max_exec_per_minute: Some(600),
        allowed_providers: None,
        max_concurrent_execs: Some(100),
    }
}

impl ServerConfig {
    /// The defaults for a data dir: listen on 127.0.0.1:7070, SQLite in the
    /// data dir, the Docker and namespaces providers.
    pub fn new(data_dir: PathBuf) -> ServerConfig {
        let store_url = format!("sqlite://{}", data_dir.join("stacyvm.db").display());
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir,
            store_url,
            providers: vec!["docker".into(), "namespaces".into()],
            default_tenant_quota: default_tenant_quota(),
            local_worker: true,
            limits: Limits::default(),
            admin_key: None,
            reconcile_interval: Duration::from_secs(1),
            pools: Vec::new(),
            http: HttpConfig::default(),
        }
    }
}
