//! The `stacyvm` binary: `serve` runs a single-node StacyVM (API, scheduler,
//! local worker, providers and an embedded SQLite store in one process);
//! `worker` runs a worker node that a control plane drives over the network;
//! the client commands (`sandbox`, `cp`, `files`, `image`, …) talk to a
//! running server through the Rust SDK; `mcp` serves the Model Context
//! Protocol on stdio for AI agents; `certify` proves providers work on this
//! host and records it; `provider-test` runs the provider conformance suite
//! against a plugin.

mod certify;
mod client;
mod mcp;
mod provider_test;
mod serve;
mod worker;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stacyvm",
    version,
    about = "Run untrusted code in isolated sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (single-node by default).
    Serve(serve::ServeArgs),
    /// Run a worker node of multi-worker mode: its providers, driven by a
    /// control plane over the worker RPC (token in STACYVM_WORKER_TOKEN).
    Worker(worker::WorkerArgs),
    /// Certify providers on this host: run each one's checks for real,
    /// print pass or fail with the reason and the fix, and record the
    /// outcome in the data dir (`serve` enables firecracker, and qemu in
    /// KVM mode, only with a passing record). Exits 0 only when every asked
    /// provider passes.
    Certify(certify::CertifyArgs),
    /// Run the provider conformance suite against a plugin
    /// (docs/PLUGIN-PROTOCOL.md); exits 0 only when every case passes.
    ProviderTest(provider_test::ProviderTestArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Serve the Model Context Protocol on stdin/stdout, so AI agents
    /// (Claude Desktop, Claude Code, Cursor, …) can use sandboxes
    /// (STACYVM_URL, STACYVM_API_KEY).
    Mcp(mcp::McpArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        client::default_sigpipe();
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "stacyvm",
            &mut std::io::stdout(),
        );
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stacyvm: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Worker(args) => worker::run(args).await,
            Command::Certify(args) => certify::run(args).await,
            Command::ProviderTest(args) => provider_test::run(args).await,
            Command::Client(cmd) => Ok(client::run(cmd).await),
            Command::Mcp(args) => mcp::run(args).await,
            Command::Completions { .. } => Ok(std::process::ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stacyvm: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
