//! `stacyvm worker`: a worker node of multi-worker mode. It owns the
//! providers of its host, registers with the control plane using its worker
//! token, heartbeats, and serves the worker RPC the control plane drives
//! its sandboxes through. Its sandboxes keep running while the control plane
//! is away and when the worker stops; a restarted worker (same data dir,
//! same id) registers again and destroys what it no longer holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use stacyvm_core::{Error, WorkerId};
use stacyvm_provider::host::{build_providers, persistent_id, prepare_data_dir, HostOptions};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_worker::node::{ControlPlane, Node, NodeConfig};
use stacyvm_worker::{LeaseTable, RpcServer, ServerTls, WorkerRpc, WorkerRpcConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::serve::{default_data_dir, init_logging};

#[derive(Args)]
pub struct WorkerArgs {
    /// The control plane's URL (`http://10.0.0.1:7070`).
    #[arg(long, env = "STACYVM_CONTROL_PLANE", value_name = "URL")]
    control_plane: String,
    /// The CA (PEM) that signed an `https://` control plane's certificate.
    #[arg(long, env = "STACYVM_CONTROL_PLANE_CA", value_name = "PEM")]
    control_plane_ca: Option<PathBuf>,
    /// Address the worker RPC listens on.
    #[arg(long, env = "STACYVM_WORKER_LISTEN", value_name = "ADDR")]
    listen: SocketAddr,
    /// The worker RPC's URL as control planes reach it; default: the
    /// listen address (`https://` with --tls-cert).
    #[arg(long, env = "STACYVM_WORKER_ADVERTISE", value_name = "URL")]
    advertise: Option<String>,
    /// Providers in preference order (comma-separated): docker,
    /// namespaces, proot, qemu, plugin:NAME.
    #[arg(
        long,
        env = "STACYVM_PROVIDERS",
        value_delimiter = ',',
        default_value = "docker,namespaces"
    )]
    providers: Vec<String>,
    /// A plugin provider's executable, `NAME=PATH` (repeatable, or
    /// comma-separated); enable it with `plugin:NAME` in --providers.
    /// Without it, `plugin:NAME` runs `DATA_DIR/plugins/NAME`.
    #[arg(
        long = "plugin",
        env = "STACYVM_PLUGINS",
        value_name = "NAME=PATH",
        value_delimiter = ','
    )]
    plugins: Vec<String>,
    /// Where the worker keeps its id, images and sandbox state.
    /// Default: /var/lib/stacyvm as root, ~/.local/share/stacyvm otherwise.
    #[arg(long, env = "STACYVM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A label placement can select on (`worker_labels`): `k=v`,
    /// repeatable.
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// Live sandboxes this worker takes (warm-pool members count).
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    max_sandboxes: i64,
    /// CPUs this worker offers sandboxes; unlimited when absent.
    #[arg(long, value_name = "CPUS")]
    max_cpu: Option<f64>,
    /// MiB of memory this worker offers sandboxes; unlimited when absent.
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(i64).range(1..))]
    max_memory_mb: Option<i64>,
    /// A name for people; default: the host name.
    #[arg(long)]
    name: Option<String>,
    /// The worker RPC's TLS certificate chain (PEM); with --tls-key.
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Let Docker sandboxes created with `network: egress` reach this
    /// host's own addresses.
    #[arg(long, env = "STACYVM_EGRESS_HOST_ACCESS")]
    egress_host_access: bool,
    /// The firecracker binary the `firecracker` provider runs. Default:
    /// `firecracker` on PATH.
    #[arg(long, env = "STACYVM_FIRECRACKER_BIN", value_name = "PATH")]
    firecracker_bin: Option<PathBuf>,
    /// The resolver (IP, or IP:PORT) the DNS filter of Docker and namespaces
    /// sandboxes with an allow list forwards the listed names to (and the
    /// nameserver of namespaces egress sandboxes); repeatable.
    /// Default: the host's nameservers from /etc/resolv.conf.
    #[arg(long = "egress-dns-upstream", env = "STACYVM_EGRESS_DNS_UPSTREAM", value_delimiter = ',', value_parser = crate::serve::parse_dns_upstream)]
    egress_dns_upstreams: Vec<std::net::SocketAddr>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "STACYVM_LOG_JSON")]
    log_json: bool,
}

/// A usage error: printed, exit 2.
fn usage(msg: impl std::fmt::Display) -> Result<ExitCode> {
    eprintln!("stacyvm worker: {msg}");
    Ok(ExitCode::from(2))
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, which is what we
    // pass; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "worker".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

pub async fn run(args: WorkerArgs) -> Result<ExitCode> {
    let Some(token) = std::env::var("STACYVM_WORKER_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    else {
        return usage(
            "STACYVM_WORKER_TOKEN is not set: create a worker token on the control plane \
             (`POST /v1/workers/tokens`) and export it",
        );
    };
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        match l.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                labels.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            _ => return usage(format!("--label {l:?} is not k=v")),
        }
    }
    let mut plugins = BTreeMap::new();
    for p in args
        .plugins
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
    {
        let Some((name, path)) = p.split_once('=').filter(|(_, path)| !path.is_empty()) else {
            return usage(format!("--plugin {p:?}: expected NAME=PATH"));
        };
        if let Err(e) = stacyvm_provider::plugin::validate_name(name) {
            return usage(format!("--plugin {p:?}: {e}"));
        }
        if plugins
            .insert(name.to_owned(), PathBuf::from(path))
            .is_some()
        {
            return usage(format!("--plugin {name} is given twice"));
        }
    }
    if let Some(cpu) = args.max_cpu {
        if !(cpu.is_finite() && cpu > 0.0) {
            return usage(format!("--max-cpu {cpu} is not a positive number"));
        }
    }
    let url_ok = |u: &str| u.starts_with("http://") || u.starts_with("https://");
    if !url_ok(&args.control_plane) {
        return usage(format!(
            "--control-plane {:?} is not an http:// or https:// URL",
            args.control_plane
        ));
    }
    let ca = match &args.control_plane_ca {
        Some(p) => match std::fs::read(p) {
            Ok(pem) => Some(pem),
            Err(e) => return usage(format!("--control-plane-ca {}: {e}", p.display())),
        },
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(ServerTls::from_files(c, k)?),
        _ => None,
    };
    match &args.advertise {
        Some(a) if !url_ok(a) => {
            return usage(format!(
                "--advertise {a:?} is not an http:// or https:// URL"
            ))
        }
        None if args.listen.ip().is_unspecified() => {
            return usage(format!(
                "--listen {} is every address of this host: say which one control planes \
                 reach with --advertise URL",
                args.listen
            ))
        }
        _ => {}
    }

    // Before anything is set up: a control plane it cannot talk to is a
    // usage error, not something to retry.
    if let Err(e) = ControlPlane::new(&args.control_plane, ca.as_deref(), &token, "") {
        return usage(e);
    }
    init_logging(args.log_json);
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    prepare_data_dir(&data_dir)?;
    let catalog = Arc::new(ImageCatalog::open(&data_dir.join("images"))?);
    let instance = persistent_id(&data_dir, "instance.id", || {
        let mut b = [0u8; 6];
        rand::fill(&mut b);
        hex::encode(b)
    })?;
    let id = WorkerId::from_trusted(persistent_id(&data_dir, "worker.id", || {
        WorkerId::generate().to_string()
    })?);
    let names: Vec<String> = args
        .providers
        .iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let providers = build_providers(
        &names,
        &HostOptions {
            data_dir: data_dir.clone(),
            egress_host_access: args.egress_host_access,
            egress_dns_upstreams: args.egress_dns_upstreams.clone(),
            plugins,
            firecracker_bin: args.firecracker_bin.clone(),
        },
        &catalog,
        &instance,
    )
    .with_context(|| format!("setting up the providers in {}", data_dir.display()))?;
    let control_plane = Arc::new(ControlPlane::new(
        &args.control_plane,
        ca.as_deref(),
        &token,
        id.as_str(),
    )?);
    let rpc = WorkerRpc::new(WorkerRpcConfig {
        id: id.clone(),
        providers,
        catalog,
        // Replaced by the TTL the control plane answers the registration
        // with; nothing is leased before that.
        leases: Arc::new(LeaseTable::new(Duration::from_secs(15))),
        images: Some(control_plane.clone()),
        certification_records: Some(data_dir.clone()),
        volumes: Some(data_dir.clone()),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let server = RpcServer::start(rpc.clone(), listener, tls.as_ref()).await?;
    // The bound address, so `--listen 127.0.0.1:0` advertises the real port.
    let address = args.advertise.clone().unwrap_or_else(|| {
        let scheme = if tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", server.addr)
    });
    eprintln!(
        "\nStacyVM worker {id} serves the worker RPC on {} (advertised as {address}); control plane {}",
        server.addr, args.control_plane
    );
    for p in rpc.provider_health().await {
        let mark = if p.health.healthy { "ok  " } else { "DOWN" };
        eprintln!("  provider {mark} {:<10} {}", p.name, p.health.detail);
    }

    let node = Node::new(
        NodeConfig {
            control_plane: args.control_plane.clone(),
            token,
            name: args.name.unwrap_or_else(host_name),
            address,
            labels,
            capacity: stacyvm_api::workers::WorkerCapacity {
                sandboxes: args.max_sandboxes,
                cpu: args.max_cpu,
                memory_mb: args.max_memory_mb,
            },
        },
        rpc,
        control_plane,
    );
    let stop = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let looping = node.run(stop.clone());
    tokio::pin!(looping);
    let ended = tokio::select! {
        ended = &mut looping => ended,
        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: stopping"); Ok(()) }
    };
    stop.cancel();
    server.shutdown().await.context("stopping the worker RPC")?;
    match ended {
        Ok(()) => {
            tracing::info!(
                "stopped; sandboxes keep running and are kept on the next start if still leased"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(Error::Unauthenticated(why)) => {
            eprintln!("stacyvm worker: {why}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}
