//! The StacyVM control plane: the HTTP API (`http`), the app services
//! behind it (`app`), the scheduler, the reconcilers and the server that
//! wires them to the store and the workers.

pub mod app;
pub mod config;
pub mod http;
pub mod pools;
pub mod reconcilers;
pub mod scheduler;
pub mod server;

pub use config::{Limits, ServerConfig};
pub use server::{start, Running};
