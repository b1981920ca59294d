//! The StacyVM control plane: the HTTP API (`http`), the app services
//! behind it (`app`, with the reconcilers and warm pools), the scheduler
//! and the server that wires them to the store and the workers.

pub mod app;
pub mod config;
pub mod http;
pub mod metered;
pub mod scheduler;
pub mod server;

pub use config::{Limits, ServerConfig};
pub use server::{start, Running};
