//! Rust client for the StacyVM HTTP API: create sandboxes, run commands
//! and stream their output, move files in and out, and administer images,
//! tenants, quotas, keys and the audit log.
//!
//! ```no_run
//! # async fn demo() -> stacyvm_sdk::Result<()> {
//! use futures_util::StreamExt;
//! use stacyvm_sdk::{Client, CreateSandbox, ExecEvent, ExecRequest};
//!
//! let client = Client::from_env()?; // STACYVM_URL, STACYVM_API_KEY
//! let sbx = client.sandbox_create(&CreateSandbox::image("busybox")).await?;
//! let out = client.exec(&sbx.id, &ExecRequest::shell("echo hi")).await?;
//! assert_eq!(out.stdout_text(), "hi\n");
//! let mut events = client.exec_stream(&sbx.id, &ExecRequest::shell("for i in 1 2 3; do echo $i; sleep 1; done")).await?;
//! while let Some(ev) = events.next().await {
//!     match ev? {
//!         ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => print!("{}", String::from_utf8_lossy(&b)),
//!         ExecEvent::Exit(st) => println!("exit {}", st.shell_code()),
//!     }
//! }
//! client.sandbox_destroy(&sbx.id).await?;
//! # Ok(()) }
//! ```
//!
//! Interactive terminals ([`Client::pty`]) speak a WebSocket (`wss://`
//! through rustls for an `https://` server, trusting the system's CA
//! bundle or `SSL_CERT_FILE`); background processes
//! ([`Client::processes`]) are plain HTTP with server-sent events.
//!
//! Idempotent calls (GET, DELETE, quota PUT, and a create that carries an
//! idempotency key) are retried with backoff on `429 rate_limited`, `503`
//! and connection failures, honouring `Retry-After`, a bounded number of
//! times ([`RetryPolicy`]). Other calls are sent once.

mod admin;
mod client;
mod error;
mod files;
pub mod models;
mod ports;
mod procs;
mod pty;
mod sandboxes;
mod snapshots;
mod sse;
mod templates;
mod volumes;

pub use admin::Page;
pub use client::{Client, ClientBuilder, RetryPolicy, DEFAULT_URL};
pub use error::{ApiError, Error, Result};
pub use files::ByteStream;
pub use models::*;
pub use ports::{ExposedPort, PortToken};
pub use procs::{ProcessEvent, ProcessExit, ProcessOutput, Processes};
pub use pty::{Pty, PtyEvent, PtyOptions, PtyReader, PtyWriter};
pub use sandboxes::{ExecStream, LogStream};
pub use templates::{TemplateLogEvent, TemplateLogStream};
