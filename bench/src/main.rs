//! `stacyvm-bench`: StacyVM's benchmark suite. Measures the providers and
//! the HTTP API side by side with the docker CLI, Docker's Engine API and
//! plain proot in the same run, prints Markdown tables and writes JSON to
//! `bench/results/`.

mod api_suite;
mod api_templates;
mod baseline;
mod engine;
mod interactive;
mod multi_suite;
mod provider_suite;
mod qemu;
mod report;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use crate::report::{Commit, Machine, Report};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// The providers through the Provider trait, no HTTP.
    Provider,
    /// A real `stacyvm serve` through its HTTP API.
    Api,
    /// `provider`, `api` and `multi`.
    All,
    /// Multi-worker mode (a control plane and workers on loopback) against
    /// single-node, side by side.
    Multi,
}

/// Benchmarks StacyVM against docker, unshare and proot on this host. Loopback only;
/// everything it starts is removed at the end, on error and on Ctrl-C.
#[derive(Parser, Debug)]
#[command(name = "stacyvm-bench")]
pub struct Args {
    #[arg(value_enum)]
    suite: Suite,
    /// Providers to measure (add `qemu` for the microVM section; it needs
    /// the guest of scripts/build-guest.sh).
    #[arg(long, value_delimiter = ',', default_value = "docker,namespaces,proot")]
    providers: Vec<String>,
    /// API sections to leave out: create, pool, template, exec, stream, files, pty, ports,
    /// snapshot, throughput, burst, density, idle, qemu (measured only when --providers names
    /// qemu).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Cold creates per provider (and as many baseline starts).
    #[arg(long, default_value_t = 10)]
    cold_iters: usize,
    /// Template builds timed per recipe in the template section.
    #[arg(long, default_value_t = 3)]
    template_builds: usize,
    /// Template recipes whose build is timed (see `api_templates::recipe`): busybox, python
    /// (the provided template; needs scripts/build-python-image.sh's tar).
    #[arg(long, value_delimiter = ',', default_value = "busybox")]
    template_recipes: Vec<String>,
    /// StacyVM exec round trips per provider.
    #[arg(long, default_value_t = 500)]
    exec_iters: usize,
    /// `docker exec` / Engine API / plain proot runs for the exec and stream
    /// baselines, and `stacyvm sandbox exec` runs per provider.
    #[arg(long, default_value_t = 50)]
    baseline_exec_iters: usize,
    /// Streamed execs per provider.
    #[arg(long, default_value_t = 200)]
    stream_iters: usize,
    /// Number of 1 KiB files in the small-file transfer.
    #[arg(long, default_value_t = 1000)]
    small_files: usize,
    /// Size of the big file, MiB.
    #[arg(long, default_value_t = 100)]
    big_file_mib: u64,
    /// Rounds of each file transfer (and of docker cp).
    #[arg(long, default_value_t = 3)]
    file_iters: usize,
    /// Small-file requests in flight at once.
    #[arg(long, default_value_t = 8)]
    file_concurrency: usize,
    /// Keystrokes whose echo is timed per terminal (and per baseline).
    #[arg(long, default_value_t = 200)]
    pty_iters: usize,
    /// Sequential GETs through the port proxy per provider (and direct).
    #[arg(long, default_value_t = 200)]
    port_requests: usize,
    /// Concurrent clients for the port-proxy throughput test.
    #[arg(long, default_value_t = 16)]
    port_clients: usize,
    /// Cold creates per side in the qemu section.
    #[arg(long, default_value_t = 5)]
    qemu_iters: usize,
    /// Exec round trips per side in the qemu section.
    #[arg(long, default_value_t = 100)]
    qemu_exec_iters: usize,
    /// Concurrent clients for the API throughput test.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Seconds per throughput test.
    #[arg(long, default_value_t = 5)]
    throughput_secs: u64,
    /// Creates issued at once in the burst test.
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Sandboxes added per density step.
    #[arg(long, default_value_t = 20)]
    density_step: usize,
    /// Most idle sandboxes per provider in the density test.
    #[arg(long, default_value_t = 200)]
    density_max: usize,
    /// Time budget per provider for the density test, seconds.
    #[arg(long, default_value_t = 120)]
    density_secs: u64,
    /// Idle namespaces sandboxes held at once in the idle section (on a
    /// worker of its own, whose capacity is raised to fit them).
    #[arg(long, default_value_t = 1000)]
    idle_count: usize,
    /// Workers of the multi-worker side of the `multi` suite.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Docker image for the Docker provider and the docker CLI baselines.
    #[arg(long, default_value = "stacyvm-test/busybox:latest")]
    docker_image: String,
    /// Root filesystem tar for PRoot (default: target/test-images/busybox.tar, built when missing).
    #[arg(long)]
    image_tar: Option<PathBuf>,
    /// The `stacyvm` binary to serve (default: built with cargo build --release -p stacyvm).
    #[arg(long, env = "STACYVM_BIN")]
    stacyvm_bin: Option<PathBuf>,
    /// Where results are written.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

impl Args {
    pub fn wants(&self, provider: &str) -> bool {
        self.providers.iter().any(|p| p == provider)
    }

    pub fn skipped(&self, section: &str) -> bool {
        self.skip.iter().any(|s| s == section)
    }
}

/// What every suite shares, including what must be cleaned up.
pub struct Ctx {
    pub tag: String,
    pub agent_bin: PathBuf,
    pub image_tar: PathBuf,
    pub docker: baseline::DockerCli,
    pub engine: engine::EngineApi,
    pub live: provider_suite::Live,
    /// Servers and control planes to stop at the end, in this order.
    servers: Mutex<Vec<Arc<server::Server>>>,
    /// Workers to stop after the servers.
    workers: Mutex<Vec<server::Worker>>,
    stacyvm_bin: Option<PathBuf>,
}

impl Ctx {
    pub async fn stacyvm_bin(&self) -> Result<PathBuf> {
        if let Some(b) = &self.stacyvm_bin {
            return Ok(b.clone());
        }
        let root = baseline::workspace_root();
        eprintln!("bench: cargo build --release -p stacyvm");
        let status = tokio::process::Command::new("cargo")
            .args(["build", "--release", "-p", "stacyvm"])
            .current_dir(&root)
            .status()
            .await
            .context("running cargo")?;
        anyhow::ensure!(status.success(), "building stacyvm failed");
        Ok(root.join("target/release/stacyvm"))
    }

    /// Registers a server for the clean-up.
    pub fn keep_server(&self, s: Arc<server::Server>) {
        if let Ok(mut v) = self.servers.lock() {
            v.push(s);
        }
    }

    /// Registers a worker for the clean-up.
    pub fn keep_worker(&self, w: server::Worker) {
        if let Ok(mut v) = self.workers.lock() {
            v.push(w);
        }
    }

    /// A registered worker that exited, with its log's tail.
    pub fn dead_worker(&self) -> Option<String> {
        let mut v = self.workers.lock().ok()?;
        v.iter_mut().find_map(|w| {
            w.exited()
                .map(|st| format!("worker {} exited ({st}):\n{}", w.name, w.log_tail()))
        })
    }

    /// Pids of the registered workers.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers
            .lock()
            .map(|v| v.iter().map(|w| w.pid).collect())
            .unwrap_or_default()
    }

    /// Stops one registered control plane (its sandboxes destroyed through
    /// its API first), then every registered worker.
    pub async fn stop_cluster(&self, cp: Arc<server::Server>) {
        let mine = self.servers.lock().ok().and_then(|mut v| {
            let i = v.iter().position(|s| Arc::ptr_eq(s, &cp))?;
            Some(v.remove(i))
        });
        drop(cp);
        if let Some(s) = mine {
            stop_server(s).await;
        }
        self.stop_workers().await;
    }

    async fn stop_workers(&self) {
        let workers: Vec<server::Worker> = self
            .workers
            .lock()
            .map(|mut v| v.drain(..).collect())
            .unwrap_or_default();
        for w in workers {
            w.shutdown().await;
        }
    }

    /// Destroys everything the run started: provider sandboxes, then every
    /// server's sandboxes through its API and the server itself, then the
    /// workers (control planes need them to destroy), then baseline
    /// containers.
    async fn cleanup(&self) {
        let n = self.live.destroy_all().await;
        if n > 0 {
            eprintln!("bench: destroyed {n} provider sandboxes");
        }
        let servers: Vec<Arc<server::Server>> = self
            .servers
            .lock()
            .map(|mut v| v.drain(..).collect())
            .unwrap_or_default();
        for s in servers {
            stop_server(s).await;
        }
        self.stop_workers().await;
        match self.docker.cleanup().await {
            Ok(0) => {}
            Ok(n) => eprintln!("bench: removed {n} baseline containers"),
            Err(e) => eprintln!("bench: removing baseline containers: {e:#}"),
        }
    }
}

async fn stop_server(s: Arc<server::Server>) {
    match Arc::try_unwrap(s) {
        Ok(s) => s.shutdown().await,
        Err(_) => eprintln!("bench: a server is still in use; it is killed on exit"),
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let args = Args::parse();
    let machine = Machine::probe();
    let commit = Commit::probe();
    eprintln!("bench: {}; {}", machine.line(), commit.line());
    let agent_bin = baseline::agent_bin().await?;
    let image_tar = baseline::test_image(args.image_tar.clone(), &args.docker_image).await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tag = format!("{}x{nanos:x}", std::process::id());
    let ctx = Ctx {
        docker: baseline::DockerCli::new(&args.docker_image, &tag),
        engine: engine::EngineApi::connect(&args.docker_image, &tag).await?,
        tag,
        agent_bin,
        image_tar,
        live: Default::default(),
        servers: Mutex::new(Vec::new()),
        workers: Mutex::new(Vec::new()),
        stacyvm_bin: args.stacyvm_bin.clone(),
    };
    let started = std::time::Instant::now();
    let suites: Vec<Suite> = match args.suite {
        // `multi` measures Docker sandboxes on both sides.
        Suite::All if args.wants("docker") => vec![Suite::Provider, Suite::Api, Suite::Multi],
        Suite::All => vec![Suite::Provider, Suite::Api],
        s => vec![s],
    };
    // SIGTERM (e.g. from `timeout`) cleans up like Ctrl-C does.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut reports = Vec::new();
    let mut failure = None;
    for suite in suites {
        let name = match suite {
            Suite::Provider => "provider",
            Suite::Multi => "multi",
            _ => "api",
        };
        let mut report = Report::new(name);
        if suite == Suite::Multi {
            report.columns = ["vs single-node".into(), String::new()];
        }
        report.detail("loadavg_start", serde_json::json!(report::loadavg()));
        let outcome = {
            let run = async {
                match suite {
                    Suite::Provider => provider_suite::run(&ctx, &args, &mut report).await,
                    Suite::Multi => multi_suite::run(&ctx, &args, &mut report).await,
                    _ => api_suite::run(&ctx, &args, &mut report).await,
                }
            };
            tokio::select! {
                r = run => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
                _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
            }
        };
        report.detail("loadavg_end", serde_json::json!(report::loadavg()));
        ctx.cleanup().await;
        if let Err(e) = &outcome {
            report.incomplete = Some(format!("{e:#}"));
        }
        report.finish();
        println!("{}", report.table());
        reports.push(report);
        if let Err(e) = outcome {
            failure = Some(e);
            break;
        }
    }

    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"));
    std::fs::create_dir_all(&out_dir)?;
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let suite_name = format!("{:?}", args.suite).to_lowercase();
    let doc = report::Document {
        suite: &suite_name,
        date: report::now_rfc3339(),
        duration_s: started.elapsed().as_secs_f64(),
        machine: &machine,
        commit: &commit,
        args: format!("{args:?}"),
        engine_inspect_retries: ctx.engine.inspect_retries(),
        reports: &reports,
    };
    let text = report::to_json_text(&doc)?;
    let path = out_dir.join(format!("{suite_name}-{stamp}.json"));
    std::fs::write(&path, &text)?;
    std::fs::write(out_dir.join("latest.json"), &text)?;
    println!(
        "machine: {}\n{}\ntook {:.0} s; results: {}",
        machine.line(),
        commit.line(),
        started.elapsed().as_secs_f64(),
        path.display()
    );
    match failure {
        Some(e) => {
            eprintln!("bench: {e:#}");
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Args::command().debug_assert();
        let a = <super::Args as clap::Parser>::try_parse_from([
            "stacyvm-bench",
            "all",
            "--skip",
            "density,burst",
        ])
        .expect("valid arguments parse");
        assert!(a.skipped("burst") && !a.skipped("exec"));
        assert_eq!((a.idle_count, a.workers), (1000, 3));
        let m = <super::Args as clap::Parser>::try_parse_from([
            "stacyvm-bench",
            "multi",
            "--workers",
            "2",
            "--idle-count",
            "50",
        ])
        .expect("valid arguments parse");
        assert_eq!(
            (m.suite, m.workers, m.idle_count),
            (super::Suite::Multi, 2, 50)
        );
        for bad in [["--workers", "0"], ["--idle-count", "x"]] {
            let r = <super::Args as clap::Parser>::try_parse_from(
                ["stacyvm-bench", "multi"].into_iter().chain(bad),
            );
            assert!(r.is_err(), "{bad:?} is refused");
        }
    }
}
