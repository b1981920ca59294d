//! `stacyvm serve`: flags, logging, the admin-key notice, and graceful
//! shutdown on SIGTERM/SIGINT (sandboxes keep running and are adopted on
//! the next start).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use stacyvm_control_plane::http::client_addr::Cidr;
use stacyvm_control_plane::ServerConfig;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "STACYVM_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where StacyVM keeps its database, images, keys and sandbox state.
    /// Default: /var/lib/stacyvm as root, ~/.local/share/stacyvm otherwise.
    #[arg(long, env = "STACYVM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// sqlite://PATH or postgres://USER@HOST/DB. Default: SQLite in the data dir.
    #[arg(long, env = "STACYVM_STORE")]
    store: Option<String>,
    /// Providers in preference order (comma-separated): docker,
    /// namespaces, proot, qemu, firecracker, plugin:NAME. `firecracker`, and
    /// `qemu` in KVM mode, serve only where `stacyvm certify` passed on this
    /// host. `proot` is not a security boundary,
    /// nor is a plugin that does not declare itself one: such a provider is
    /// never chosen for a create that does not name it, and only tenants
    /// whose quota lists it in `allowed_providers` may use it.
    #[arg(
        long,
        env = "STACYVM_PROVIDERS",
        value_delimiter = ',',
        default_value = "docker,namespaces"
    )]
    providers: Vec<String>,
    /// A plugin provider's executable, `NAME=PATH` (repeatable, or
    /// comma-separated); enable it with `plugin:NAME` in --providers.
    /// Without it, `plugin:NAME` runs `DATA_DIR/plugins/NAME`. See
    /// docs/PLUGIN-PROTOCOL.md.
    #[arg(
        long = "plugin",
        env = "STACYVM_PLUGINS",
        value_name = "NAME=PATH",
        value_delimiter = ','
    )]
    plugins: Vec<String>,
    /// Run the control plane only, without the in-process worker.
    #[arg(long)]
    no_local_worker: bool,
    /// Seconds a worker's lease on its sandboxes lasts without a heartbeat:
    /// a worker silent this long is marked down and its sandboxes lost.
    /// Workers heartbeat every third of it.
    #[arg(
        long,
        env = "STACYVM_LEASE_TTL",
        value_name = "SECONDS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(2..=3600)
    )]
    lease_ttl: u64,
    /// Seconds an API call other than a stream or a transfer may take
    /// before it is answered `504`; a create from a template waits for the
    /// template's `ready` command within it.
    #[arg(
        long,
        env = "STACYVM_REQUEST_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 120,
        value_parser = clap::value_parser!(u64).range(5..=3600)
    )]
    request_timeout: u64,
    /// The CA certificate (PEM) that signed the remote workers' TLS
    /// certificates (`stacyvm worker --tls-cert`); workers that registered
    /// an https:// address are reached with it.
    #[arg(long, env = "STACYVM_WORKER_CA", value_name = "PEM")]
    worker_ca: Option<PathBuf>,
    /// Failed authentication attempts one client address may make per
    /// minute; past it, that address's bad keys get 429 (valid keys keep
    /// working).
    #[arg(long, env = "STACYVM_AUTH_FAILURES_PER_MINUTE", default_value_t = 120)]
    auth_failures_per_minute: i64,
    /// Commands (execs and streaming execs) one sandbox may run at once;
    /// more are refused with 429 until one finishes.
    #[arg(
        long,
        env = "STACYVM_MAX_EXECS_PER_SANDBOX",
        value_name = "N",
        default_value_t = 32,
        value_parser = clap::value_parser!(u64).range(1..=100_000)
    )]
    max_execs_per_sandbox: u64,
    /// Seconds a client has to send a request's head (from connecting, or
    /// from the first byte of a later request on the same connection);
    /// slower clients are disconnected.
    #[arg(
        long,
        env = "STACYVM_HEADER_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    header_timeout: u64,
    /// Seconds a kept-alive connection may wait for its next request
    /// before it is closed. Responses in progress (streams, downloads,
    /// long execs) are never cut by it.
    #[arg(
        long,
        env = "STACYVM_IDLE_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86400)
    )]
    idle_timeout: u64,
    /// Connections served at once; more wait until one closes.
    #[arg(
        long,
        env = "STACYVM_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u64).range(1..=1_000_000)
    )]
    max_connections: u64,
    /// Address block (CIDR, or a single address) of a reverse proxy or load
    /// balancer whose X-Forwarded-For names the client: rate limits and
    /// audit events then use that client address. Repeatable, or
    /// comma-separated. Other peers' X-Forwarded-For is ignored.
    #[arg(
        long = "trusted-proxy",
        env = "STACYVM_TRUSTED_PROXIES",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<Cidr>,
    /// Serve /metrics without an API key (by default it needs an admin
    /// key). Only for a port that scrapers alone can reach.
    #[arg(long, env = "STACYVM_METRICS_PUBLIC")]
    metrics_public: bool,
    /// Serve exposed sandbox ports at `{port}-{id}.DOMAIN` too (point a
    /// wildcard DNS record at this server).
    #[arg(long, value_name = "DOMAIN")]
    proxy_domain: Option<String>,
    /// Keep N idle sandboxes of IMAGE on PROVIDER ready to claim:
    /// `--warm-pool docker:busybox=4` (repeatable, or comma-separated).
    /// `docker:template/NAME=4` keeps sandboxes of the operator's template
    /// NAME (newest ready version, started and ready), and
    /// `docker:template/TENANT/NAME=4` of a tenant's own template.
    #[arg(long = "warm-pool", env = "STACYVM_WARM_POOLS", value_delimiter = ',')]
    warm_pools: Vec<String>,
    /// Let Docker sandboxes created with `network: egress` open connections
    /// to this host itself, on any of its addresses. Off by default: they
    /// reach other machines, never the host's own services nor each other.
    #[arg(long, env = "STACYVM_EGRESS_HOST_ACCESS")]
    egress_host_access: bool,
    /// The firecracker binary the `firecracker` provider runs. Default:
    /// `firecracker` on PATH.
    #[arg(long, env = "STACYVM_FIRECRACKER_BIN", value_name = "PATH")]
    firecracker_bin: Option<PathBuf>,
    /// The resolver (IP, or IP:PORT) the DNS filter of Docker and namespaces
    /// sandboxes with an allow list forwards the listed names to (and the
    /// nameserver of namespaces egress sandboxes); repeatable, tried in
    /// order. Default: the host's nameservers from /etc/resolv.conf.
    #[arg(long = "egress-dns-upstream", env = "STACYVM_EGRESS_DNS_UPSTREAM", value_delimiter = ',', value_parser = parse_dns_upstream)]
    egress_dns_upstreams: Vec<std::net::SocketAddr>,
    /// Images of the Docker daemon that every tenant may run, as glob
    /// patterns (`python:3.12*`, `team/*`, `*` for any); repeatable, or
    /// comma-separated. Without a match, tenants run images of StacyVM's
    /// catalog only; the operator's own tenant may run any daemon image.
    #[arg(
        long = "docker-images",
        env = "STACYVM_DOCKER_IMAGES",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    docker_images: Vec<String>,
    /// The image E2B's `base` template runs for clients of the
    /// E2B-compatible API (`scripts/build-e2b-image.sh` builds one with
    /// bash and a home directory). Other E2B template ids name images of
    /// the catalog.
    #[arg(long, env = "STACYVM_E2B_DEFAULT_TEMPLATE", value_name = "IMAGE")]
    e2b_default_template: Option<String>,
    /// The domain under which the E2B-compatible API names sandbox hosts
    /// (`49983-<id>.<domain>`, for clients that reach sandboxes by host
    /// name through a wildcard DNS entry pointing here).
    #[arg(long, env = "STACYVM_E2B_DOMAIN", value_name = "DOMAIN")]
    e2b_domain: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "STACYVM_LOG_JSON")]
    log_json: bool,
}

pub(crate) fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/stacyvm");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/stacyvm"),
        None => PathBuf::from(".stacyvm"),
    }
}

pub(crate) fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STACYVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(args: ServeArgs) -> Result<ExitCode> {
    init_logging(args.log_json);
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let mut config = ServerConfig::new(data_dir.clone());
    config.listen = args.listen;
    if let Some(store) = args.store {
        config.store_url = store;
    }
    config.providers = args
        .providers
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    for p in args
        .plugins
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
    {
        let (name, path) = p
            .split_once('=')
            .with_context(|| format!("--plugin {p:?}: expected NAME=PATH"))?;
        stacyvm_provider::plugin::validate_name(name).with_context(|| format!("--plugin {p:?}"))?;
        if path.is_empty() {
            anyhow::bail!("--plugin {p:?}: the path is empty");
        }
        if config
            .plugins
            .insert(name.to_owned(), PathBuf::from(path))
            .is_some()
        {
            anyhow::bail!("--plugin {name} is given twice");
        }
    }
    config.local_worker = !args.no_local_worker;
    config.limits.lease = Duration::from_secs(args.lease_ttl);
    config.limits.request_timeout = Duration::from_secs(args.request_timeout);
    config.worker_ca = args.worker_ca;
    config.limits.auth_failures_per_minute = args.auth_failures_per_minute;
    config.limits.max_execs_per_sandbox = usize::try_from(args.max_execs_per_sandbox)
        .context("--max-execs-per-sandbox does not fit this platform")?;
    config.http.header_timeout = Duration::from_secs(args.header_timeout);
    config.http.idle_timeout = Duration::from_secs(args.idle_timeout);
    config.http.max_connections = usize::try_from(args.max_connections)
        .context("--max-connections does not fit this platform")?;
    config.http.trusted_proxies = args.trusted_proxies;
    config.http.metrics_public = args.metrics_public;
    config.http.proxy_domain = args
        .proxy_domain
        .map(|d| d.trim_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty());
    for p in args
        .warm_pools
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
    {
        config
            .pools
            .push(stacyvm_control_plane::config::PoolSpec::parse(p)?);
    }
    config.egress_host_access = args.egress_host_access;
    config.firecracker_bin = args.firecracker_bin.clone();
    config.egress_dns_upstreams = args.egress_dns_upstreams.clone();
    for p in args
        .docker_images
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
    {
        config
            .docker_images
            .push(stacyvm_control_plane::config::ImagePattern::parse(p)?);
    }
    config.e2b.default_template = args.e2b_default_template.filter(|t| !t.is_empty());
    config.e2b.domain = args.e2b_domain.filter(|d| !d.is_empty());
    config.admin_key = std::env::var("STACYVM_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty());

    let running = stacyvm_control_plane::start(config)
        .await
        .with_context(|| format!("starting StacyVM with data dir {}", data_dir.display()))?;
    let url = format!("http://{}", running.addr);
    match (&running.generated_admin_key, &running.admin_key_file) {
        (Some(key), Some(file)) => eprintln!(
            "\nStacyVM is up at {url}\nAdmin key (shown once; also saved to {}):\n  {key}\n\n  export STACYVM_URL={url}\n  export STACYVM_API_KEY=$(cat {})\n",
            file.display(),
            file.display()
        ),
        (None, Some(file)) => eprintln!(
            "\nStacyVM is up at {url}\nAdmin key: in {}\n\n  export STACYVM_URL={url}\n  export STACYVM_API_KEY=$(cat {})\n",
            file.display(),
            file.display()
        ),
        _ => eprintln!("\nStacyVM is up at {url} (admin key from STACYVM_ADMIN_KEY)\n"),
    }
    for p in running.app.provider_status().await {
        let mark = if p.healthy { "ok  " } else { "DOWN" };
        eprintln!("  provider {mark} {:<8} {}", p.name, p.detail);
    }

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down gracefully"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down gracefully"),
    }
    running.shutdown().await.context("shutting down")?;
    tracing::info!("stopped; sandboxes keep running and are adopted on the next start");
    Ok(ExitCode::SUCCESS)
}

/// `IP` or `IP:PORT` (`[v6]:PORT`), port 53 by default.
pub(crate) fn parse_dns_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    s.parse::<std::net::SocketAddr>().map_err(|_| {
        format!("{s:?} is not an IP address or IP:PORT (write an IPv6 address with a port as [addr]:port)")
    })
}
