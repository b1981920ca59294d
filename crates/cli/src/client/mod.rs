//! The client commands of `stacyvm` (sandbox, cp, files, image, tenant,
//! key, quota, audit, status, workers, health, volume, template), built on
//! the Rust SDK.

mod admin;
mod files;
mod interactive;
pub mod output;
mod sandbox;
pub mod template;
mod volume;

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use stacyvm_sdk::Client;

pub use output::Format;

/// Where the server is and how to talk to it; every client command takes these.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// The StacyVM server.
    #[arg(long, global = true, env = "STACYVM_URL", default_value = stacyvm_sdk::DEFAULT_URL)]
    pub url: String,
    /// The API key.
    #[arg(long, global = true, env = "STACYVM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Output: tables for people, JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Format,
}

impl Conn {
    fn client(&self) -> anyhow::Result<Client> {
        let mut b = Client::builder().url(&self.url);
        if let Some(k) = &self.api_key {
            b = b.api_key(k);
        }
        Ok(b.build()?)
    }
}

/// The client subcommands, flattened into the top-level command.
#[derive(Subcommand)]
pub enum ClientCommand {
    /// Create, list, inspect, run commands in and remove sandboxes.
    #[command(visible_alias = "sandboxes")]
    Sandbox(sandbox::SandboxArgs),
    /// Copy a file between the host and a sandbox (SANDBOX_ID:/path), streamed.
    Cp(files::CpArgs),
    /// Inspect and change files in a sandbox.
    Files(files::FilesArgs),
    /// Manage the image catalog.
    #[command(visible_alias = "images")]
    Image(admin::ImageArgs),
    /// Manage tenants.
    #[command(visible_alias = "tenants")]
    Tenant(admin::TenantArgs),
    /// Manage API keys.
    #[command(visible_alias = "keys")]
    Key(admin::KeyArgs),
    /// Show or set a tenant's quota.
    Quota(admin::QuotaArgs),
    /// Show the audit log.
    Audit(admin::AuditArgs),
    /// Show the server's status.
    Status(admin::StatusArgs),
    /// List or drain workers.
    Workers(admin::WorkersArgs),
    /// Check the server's liveness and readiness.
    Health(admin::HealthArgs),
    /// Manage volumes: filesystems that outlive sandboxes.
    #[command(visible_alias = "volumes")]
    Volume(volume::VolumeArgs),
    /// Build and manage templates: environments built once, started many times.
    #[command(visible_alias = "templates")]
    Template(template::TemplateArgs),
}

/// Lets a closed stdout (`stacyvm … | head`) end the process quietly, as
/// it does other Unix tools, instead of failing a write. Only a broken
/// stdout does: a SIGPIPE raised by a socket (a server that refuses an
/// upload and closes the connection while the body is still being sent)
/// leaves the write failing with EPIPE, so the server's answer is still
/// read and reported. Only for client commands: the server keeps
/// ignoring SIGPIPE.
pub fn default_sigpipe() {
    extern "C" fn on_sigpipe(_: libc::c_int) {
        // SAFETY: only async-signal-safe calls (poll, signal, raise), on
        // a stack pollfd; errno is restored for the interrupted code.
        unsafe {
            let errno = *libc::__errno_location();
            let mut out = libc::pollfd {
                fd: libc::STDOUT_FILENO,
                events: 0,
                revents: 0,
            };
            if libc::poll(&mut out, 1, 0) > 0 && out.revents & libc::POLLERR != 0 {
                // Delivered, with the default action, once this handler
                // returns and unblocks it.
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            *libc::__errno_location() = errno;
        }
    }
    // SAFETY: the handler above is async-signal-safe; no handler of ours
    // is replaced.
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            on_sigpipe as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// Runs a client command; errors print as `stacyvm: message (code, request id)`.
pub async fn run(cmd: ClientCommand) -> ExitCode {
    default_sigpipe();
    let result = match cmd {
        ClientCommand::Sandbox(a) => sandbox::run(a).await,
        ClientCommand::Cp(a) => files::cp(a).await,
        ClientCommand::Files(a) => files::run(a).await,
        ClientCommand::Image(a) => admin::image(a).await,
        ClientCommand::Tenant(a) => admin::tenant(a).await,
        ClientCommand::Key(a) => admin::key(a).await,
        ClientCommand::Quota(a) => admin::quota(a).await,
        ClientCommand::Audit(a) => admin::audit(a).await,
        ClientCommand::Status(a) => admin::status(a).await,
        ClientCommand::Workers(a) => admin::workers(a).await,
        ClientCommand::Health(a) => admin::health(a).await,
        ClientCommand::Volume(a) => volume::run(a).await,
        ClientCommand::Template(a) => template::run(a).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stacyvm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code from a number (clamped to what a process can return).
pub fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}

/// A usage mistake clap cannot see: prints it and exits 2.
pub fn usage(msg: impl std::fmt::Display) -> ! {
    clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{msg}\n")).exit()
}

/// `K=V` pairs from repeated flags.
pub fn key_values(pairs: &[String], what: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in pairs {
        match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_owned(), v.to_owned());
            }
            _ => usage(format!("{what} {p:?} must look like KEY=VALUE")),
        }
    }
    out
}
