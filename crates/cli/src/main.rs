//! The `stacyvm` binary: `serve` runs a single-node StacyVM (API, scheduler,
//! local worker, providers and an embedded SQLite store in one process).

mod serve;

use clap::{Parser, Subcommand};

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
