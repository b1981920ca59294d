//! `stacyvm sandbox …`: create (optionally run one command and remove the
//! sandbox), ls, get, rm, exec (streamed, exiting with the command's code),
//! logs, timeout, pause, resume, expose; shell and background processes in
//! `interactive`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use stacyvm_sdk::{
    Client, CreateSandbox, ExecEvent, ExecRequest, Network, Sandbox, SandboxFilter, SandboxState,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::output::{self, Format};
use super::{exit_code, key_values, usage, Conn};

#[derive(Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: SandboxCmd,
}

#[derive(Subcommand)]
enum SandboxCmd {
    /// Create a sandbox; with `-- CMD…`, run CMD in it and stream its output.
    Create(Box<CreateArgs>),
    /// List sandboxes.
    Ls(LsArgs),
    /// Show a sandbox.
    Get { id: String },
    /// Destroy sandboxes.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Run a command in a sandbox, streaming its output; exits with its code.
    Exec(ExecArgs),
    /// Copy a file between the host and a sandbox (same as `stacyvm cp`).
    Cp(super::files::CpPaths),
    /// Show a sandbox's log.
    Logs {
        id: String,
        /// Keep printing new lines until the sandbox ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Set the sandbox to expire SECONDS from now.
    Timeout { id: String, seconds: i64 },
    /// Pause a sandbox (where its provider can).
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume { id: String },
    /// Open an interactive terminal in a sandbox (`-- CMD…`, default its
    /// shell); exits with the command's code.
    Shell(super::interactive::ShellArgs),
    /// List a sandbox's background processes.
    Ps { id: String },
    /// Start a background process (`-- CMD…`); prints its pid.
    Start(super::interactive::StartArgs),
    /// Print a background process's output from the start, then live, and
    /// forward stdin to it; Ctrl-C detaches and leaves it running.
    Attach(super::interactive::AttachArgs),
    /// Send a signal to a background process (default TERM).
    Kill(super::interactive::KillArgs),
    /// Save a sandbox's filesystem as a new catalog image of its tenant.
    Snapshot {
        id: String,
        /// Name of the new image (must not exist yet).
        #[arg(long)]
        image: String,
    },
    /// Expose PORT inside the sandbox through the server; prints its URL.
    Expose {
        id: String,
        port: u16,
        /// Reachable without an API key.
        #[arg(long)]
        public: bool,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// Image to run (from the catalog, or Docker's for the docker provider).
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    template: Option<String>,
    /// Provider (docker, proot, …); default: the server's first healthy one.
    #[arg(long)]
    provider: Option<String>,
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory limit in MiB.
    #[arg(long = "memory", value_name = "MB")]
    memory_mb: Option<i64>,
    /// Seconds until the sandbox is destroyed automatically.
    #[arg(long = "timeout", value_name = "SECONDS")]
    timeout_s: Option<i64>,
    /// Environment for commands, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Labels, KEY=VALUE (repeatable).
    #[arg(short, long = "label", value_name = "KEY=VALUE")]
    label: Vec<String>,
    /// Run only on workers carrying this label, KEY=VALUE (repeatable).
    #[arg(long = "worker-label", value_name = "KEY=VALUE")]
    worker_label: Vec<String>,
    #[arg(long)]
    workdir: Option<String>,
    /// Network access: none (default), egress (or full).
    #[arg(long, value_parser = ["none", "egress", "full"], conflicts_with = "allow")]
    network: Option<String>,
    /// Outbound access to this CIDR network or host name only (repeatable);
    /// everything else is dropped and DNS answers only for listed names.
    #[arg(long, value_name = "CIDR|NAME")]
    allow: Vec<String>,
    /// Makes the create repeat-safe (and retried on transient failures).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Destroy the sandbox when CMD ends (also on Ctrl-C).
    #[arg(long)]
    rm: bool,
    /// Command timeout in seconds (with CMD).
    #[arg(long = "exec-timeout", value_name = "SECONDS")]
    exec_timeout: Option<f64>,
    /// The command to run, after `--`.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
    /// Mount a volume, NAME:/PATH or NAME:/PATH:ro (repeatable).
    #[arg(long = "volume", value_name = "NAME:/PATH[:ro]")]
    volume: Vec<String>,
}

#[derive(Args)]
struct LsArgs {
    /// Only sandboxes in this state.
    #[arg(long)]
    state: Option<String>,
    /// Only sandboxes with this label, KEY=VALUE (repeatable).
    #[arg(short, long = "label", value_name = "KEY=VALUE")]
    label: Vec<String>,
    /// Show only IDs.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
struct ExecArgs {
    /// The sandbox.
    id: String,
    /// Environment, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory.
    #[arg(short = 'w', long)]
    cwd: Option<String>,
    /// Command timeout in seconds (server default 60).
    #[arg(short, long = "timeout", value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Send this program's stdin to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Run as this user of the sandbox's /etc/passwd (a name or a uid).
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    cmd: Vec<String>,
}

pub async fn run(a: SandboxArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let fmt = a.conn.output;
    match a.cmd {
        SandboxCmd::Create(c) => create(&client, fmt, *c).await,
        SandboxCmd::Ls(l) => {
            let state = l.state.as_deref().map(parse_state).transpose()?;
            let labels = key_values(&l.label, "label").into_iter().collect();
            let list = client
                .sandbox_list_all(&SandboxFilter {
                    state,
                    labels,
                    ..Default::default()
                })
                .await?;
            if fmt == Format::Json {
                output::json(&list)?;
            } else if l.quiet {
                for s in &list {
                    println!("{}", s.id);
                }
            } else {
                let rows = list
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.clone(),
                            s.state.to_string(),
                            s.provider.clone(),
                            s.image.clone(),
                            output::time(s.created_at),
                            output::time_opt(s.expires_at),
                        ]
                    })
                    .collect();
                output::table(
                    &["ID", "STATE", "PROVIDER", "IMAGE", "CREATED", "EXPIRES"],
                    rows,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCmd::Get { id } => show(fmt, &client.sandbox_get(&id).await?),
        SandboxCmd::Rm { ids } => {
            let mut failed = false;
            for id in ids {
                match client.sandbox_destroy(&id).await {
                    Ok(()) => println!("{id}"),
                    Err(e) => {
                        eprintln!("stacyvm: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        SandboxCmd::Exec(e) => exec(&client, fmt, e).await,
        SandboxCmd::Cp(paths) => super::files::cp_paths(&a.conn, paths).await,
        SandboxCmd::Logs { id, follow } => {
            if follow {
                let mut lines = client.sandbox_logs_follow(&id).await?;
                while let Some(l) = lines.next().await {
                    let l = l?;
                    if fmt == Format::Json {
                        println!("{}", serde_json::to_string(&l)?);
                    } else {
                        println!("{} {:<9} {}", output::time(l.ts), l.source, l.message);
                    }
                }
            } else {
                let lines = client.sandbox_logs(&id).await?;
                if fmt == Format::Json {
                    output::json(&serde_json::json!({ "lines": lines }))?;
                } else {
                    for l in lines {
                        println!("{} {:<9} {}", output::time(l.ts), l.source, l.message);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCmd::Timeout { id, seconds } => {
            show(fmt, &client.sandbox_set_timeout(&id, seconds).await?)
        }
        SandboxCmd::Pause { id } => show(fmt, &client.sandbox_pause(&id).await?),
        SandboxCmd::Resume { id } => show(fmt, &client.sandbox_resume(&id).await?),
        SandboxCmd::Shell(a) => super::interactive::shell(&client, a).await,
        SandboxCmd::Ps { id } => super::interactive::ps(&client, fmt, &id).await,
        SandboxCmd::Start(a) => super::interactive::start(&client, fmt, a).await,
        SandboxCmd::Attach(a) => super::interactive::attach(&client, fmt, a).await,
        SandboxCmd::Kill(a) => super::interactive::kill(&client, fmt, a).await,
        SandboxCmd::Snapshot { id, image } => {
            super::admin::images(fmt, &[client.sandbox_snapshot(&id, &image).await?])?;
            Ok(ExitCode::SUCCESS)
        }
        SandboxCmd::Expose { id, port, public } => {
            let p = client.sandbox_expose(&id, port, public).await?;
            if fmt == Format::Json {
                output::json(&p)?;
            } else {
                println!("{}", p.url);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_state(s: &str) -> Result<SandboxState> {
    match serde_json::from_value::<SandboxState>(serde_json::Value::String(s.to_owned())) {
        Ok(SandboxState::Unknown) | Err(_) => usage(format!(
            "unknown state {s:?}: use pending, starting, running, paused, stopping, destroyed, failed or lost"
        )),
        Ok(st) => Ok(st),
    }
}

fn show(fmt: Format, s: &Sandbox) -> Result<ExitCode> {
    if fmt == Format::Json {
        output::json(s)?;
        return Ok(ExitCode::SUCCESS);
    }
    let labels = s
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut rows = vec![
        ("id", s.id.clone()),
        ("state", s.state.to_string()),
        ("tenant", s.tenant_id.clone()),
        ("provider", s.provider.clone()),
        ("worker", output::opt(s.worker_id.as_ref())),
        ("image", s.image.clone()),
        ("cpu", s.cpu.to_string()),
        ("memory_mb", s.memory_mb.to_string()),
        ("network", s.network.clone()),
        (
            "labels",
            if labels.is_empty() {
                "-".into()
            } else {
                labels
            },
        ),
        ("created", output::time(s.created_at)),
        ("started", output::time_opt(s.started_at)),
        ("expires", output::time_opt(s.expires_at)),
        ("destroyed", output::time_opt(s.destroyed_at)),
    ];
    if let Some(f) = &s.failure {
        rows.push(("failure", format!("{} ({})", f.message, f.code)));
    }
    output::fields(rows);
    Ok(ExitCode::SUCCESS)
}

async fn create(client: &Client, fmt: Format, c: CreateArgs) -> Result<ExitCode> {
    if c.image.is_none() && c.template.is_none() {
        usage("sandbox create needs --image or --template");
    }
    if c.rm && c.cmd.is_empty() {
        usage("--rm needs a command to run: stacyvm sandbox create --image IMAGE --rm -- CMD…");
    }
    let spec = CreateSandbox {
        image: c.image,
        template: c.template,
        provider: c.provider,
        cpu: c.cpu,
        memory_mb: c.memory_mb,
        timeout_s: c.timeout_s,
        env: key_values(&c.env, "env"),
        labels: key_values(&c.label, "label"),
        worker_labels: key_values(&c.worker_label, "worker-label"),
        workdir: c.workdir,
        network: if c.allow.is_empty() {
            c.network.as_deref().map(|n| match n {
                "egress" => Network::Egress,
                "full" => Network::Full,
                _ => Network::None,
            })
        } else {
            Some(Network::Allow(c.allow))
        },
        idempotency_key: c.idempotency_key,
        volumes: super::volume::parse_mounts(&c.volume),
    };
    if c.cmd.is_empty() {
        let sbx = client.sandbox_create(&spec).await?;
        if fmt == Format::Json {
            output::json(&sbx)?;
        } else {
            println!("{}", sbx.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let req = ExecRequest {
        cmd: c.cmd,
        timeout_s: c.exec_timeout,
        ..Default::default()
    };
    // Ctrl-C must not leave a sandbox behind: an interrupted create is
    // still awaited so the sandbox it makes can be removed.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let creating = client.sandbox_create(&spec);
    tokio::pin!(creating);
    let (sbx, interrupted) = tokio::select! {
        r = &mut creating => (r?, false),
        _ = &mut ctrl_c => {
            eprintln!("stacyvm: interrupted; removing the sandbox");
            (creating.await?, true)
        }
    };
    if !c.rm {
        eprintln!("{}", sbx.id);
    }
    let code = if interrupted {
        Ok(ExitCode::from(130))
    } else {
        tokio::select! {
            r = stream_command(client, &sbx.id, &req) => r,
            _ = &mut ctrl_c => Ok(ExitCode::from(130)),
        }
    };
    if c.rm || interrupted {
        if let Err(e) = client.sandbox_destroy(&sbx.id).await {
            eprintln!("stacyvm: could not remove sandbox {}: {e}", sbx.id);
        }
    }
    code
}

async fn exec(client: &Client, fmt: Format, e: ExecArgs) -> Result<ExitCode> {
    let stdin = if e.interactive {
        let mut buf = Vec::new();
        tokio::io::stdin().read_to_end(&mut buf).await?;
        Some(
            String::from_utf8(buf)
                .map_err(|_| anyhow::anyhow!("stdin must be UTF-8 text for exec"))?,
        )
    } else {
        None
    };
    let req = ExecRequest {
        cmd: e.cmd,
        env: key_values(&e.env, "env"),
        cwd: e.cwd,
        stdin,
        timeout_s: e.timeout,
        user: e.user,
    };
    if fmt == Format::Json {
        // Scripts get the whole outcome in one document.
        let out = client.exec(&e.id, &req).await?;
        output::json(&serde_json::json!({
            "exit_code": out.status.exit_code,
            "signal": out.status.signal,
            "duration_ms": out.status.duration_ms,
            "timed_out": out.status.timed_out,
            "stdout": out.stdout_text(),
            "stderr": out.stderr_text(),
            "stdout_truncated": out.stdout_truncated,
            "stderr_truncated": out.stderr_truncated,
        }))?;
        return Ok(exit_code(out.status.shell_code()));
    }
    stream_command(client, &e.id, &req).await
}

/// Streams a command's output (stdout to stdout, stderr to stderr, raw
/// bytes, as it arrives) and returns its shell exit code.
async fn stream_command(client: &Client, id: &str, req: &ExecRequest) -> Result<ExitCode> {
    let mut events = client.exec_stream(id, req).await?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(ev) = events.next().await {
        match ev? {
            ExecEvent::Stdout(b) => {
                stdout.write_all(&b).await?;
                stdout.flush().await?;
            }
            ExecEvent::Stderr(b) => {
                stderr.write_all(&b).await?;
                stderr.flush().await?;
            }
            ExecEvent::Exit(st) => {
                if st.timed_out {
                    eprintln!("stacyvm: the command timed out");
                }
                return Ok(exit_code(st.shell_code()));
            }
        }
    }
    anyhow::bail!("the output stream ended before the command's exit")
}
