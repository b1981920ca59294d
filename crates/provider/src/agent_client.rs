//! The async, multiplexed client for the in-sandbox agent.
//!
//! SKELETON: the public surface below is the contract providers build
//! against; the implementation lands with the agent protocol.

use std::path::Path;

use stacyvm_core::{ByteStream, Error, ExecOutcome, ExecRequest, FileEntry, Result};

use crate::ExecStream;

/// What the agent reports about itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
}

/// One connection to one agent, shared by many concurrent requests.
pub struct AgentClient {
    _private: (),
}

fn pending() -> Error {
    Error::Internal("agent client not built yet".into())
}

impl AgentClient {
    /// Connects to an agent listening on a Unix socket and negotiates the protocol version.
    pub async fn connect_unix(_path: &Path) -> Result<AgentClient> {
        Err(pending())
    }

    /// Runs the protocol over any byte stream (e.g. a child's stdin/stdout pair joined).
    pub async fn over<R, W>(_reader: R, _writer: W) -> Result<AgentClient>
    where
        R: tokio::io::AsyncRead + Send + Unpin + 'static,
        W: tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        Err(pending())
    }

    /// Whether the connection is still usable (false once the agent went away).
    pub fn is_alive(&self) -> bool {
        false
    }

    pub async fn health(&self) -> Result<AgentInfo> {
        Err(pending())
    }
    pub async fn exec(&self, _req: ExecRequest) -> Result<ExecOutcome> {
        Err(pending())
    }
    pub async fn exec_stream(&self, _req: ExecRequest) -> Result<ExecStream> {
        Err(pending())
    }
    pub async fn file_write(&self, _path: &str, _mode: Option<u32>, _body: ByteStream) -> Result<FileEntry> {
        Err(pending())
    }
    pub async fn file_read(&self, _path: &str) -> Result<ByteStream> {
        Err(pending())
    }
    pub async fn file_stat(&self, _path: &str) -> Result<FileEntry> {
        Err(pending())
    }
    pub async fn file_list(&self, _path: &str, _recursive: bool) -> Result<Vec<FileEntry>> {
        Err(pending())
    }
    pub async fn file_move(&self, _from: &str, _to: &str, _overwrite: bool) -> Result<FileEntry> {
        Err(pending())
    }
    pub async fn file_chmod(&self, _path: &str, _mode: u32) -> Result<FileEntry> {
        Err(pending())
    }
    pub async fn file_mkdir(&self, _path: &str, _parents: bool) -> Result<FileEntry> {
        Err(pending())
    }
    pub async fn file_delete(&self, _path: &str, _recursive: bool) -> Result<()> {
        Err(pending())
    }
    pub async fn file_glob(&self, _pattern: &str) -> Result<Vec<String>> {
        Err(pending())
    }
}
