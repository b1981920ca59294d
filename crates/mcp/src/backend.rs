//! What the tools need from StacyVM: sandboxes, commands and files for the
//! caller's key. One implementation speaks the HTTP API (the CLI), another
//! calls the control plane's app services directly (`/mcp`).

use async_trait::async_trait;
use stacyvm_api as api;

/// A failed call, as the API reports it: its error code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolError {
    /// The API's error code (`not_found`, `invalid_request`, …).
    pub code: String,
    pub message: String,
    /// The HTTP status the API answers this error with, when there is one.
    pub status: Option<u16>,
    pub request_id: Option<String>,
}

impl ToolError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ToolError {
        ToolError {
            code: code.into(),
            message: message.into(),
            status: None,
            request_id: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ToolError {
        ToolError {
            status: Some(400),
            ..ToolError::new("invalid_request", message)
        }
    }
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// A command run to its end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration_ms: u64,
    pub timed_out: bool,
    /// The server cut the stream at its own (much larger) cap.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// Part of a file: at most the asked number of bytes from an offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileChunk {
    pub data: Vec<u8>,
    /// The file goes on past the returned bytes.
    pub more: bool,
}

/// StacyVM as the tools see it, acting with one key's rights.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn sandbox_create(&self, spec: api::CreateSandbox) -> Result<api::Sandbox, ToolError>;
    /// Sandboxes the key can see carrying every label, optionally in one state.
    async fn sandbox_list(
        &self,
        labels: Vec<(String, String)>,
        state: Option<String>,
    ) -> Result<Vec<api::Sandbox>, ToolError>;
    async fn sandbox_destroy(&self, id: &str) -> Result<(), ToolError>;
    async fn exec(&self, id: &str, req: api::ExecRequest) -> Result<ExecResult, ToolError>;
    async fn file_write(
        &self,
        id: &str,
        path: &str,
        mode: Option<String>,
        data: Vec<u8>,
    ) -> Result<api::FileEntry, ToolError>;
    /// Up to `limit` bytes from `offset`, without reading the rest of the file.
    async fn file_read(
        &self,
        id: &str,
        path: &str,
        offset: u64,
        limit: usize,
    ) -> Result<FileChunk, ToolError>;
    async fn file_list(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<api::FileEntry>, ToolError>;

    /// Whether this backend may touch the files of the machine it runs on.
    /// Only the stdio server, running as the user on the user's machine,
    /// says yes; a server reached over the network never does.
    fn host_transfers(&self) -> bool {
        false
    }

    /// Copies a host file into the sandbox.
    async fn upload(
        &self,
        _id: &str,
        _host_path: &str,
        _path: &str,
        _mode: Option<String>,
    ) -> Result<api::FileEntry, ToolError> {
        Err(no_host_files())
    }

    /// Copies a sandbox file to the host; returns the bytes written.
    async fn download(&self, _id: &str, _path: &str, _host_path: &str) -> Result<u64, ToolError> {
        Err(no_host_files())
    }
}

pub(crate) fn no_host_files() -> ToolError {
    ToolError {
        status: Some(403),
        ..ToolError::new(
            "forbidden",
            "host file transfer is only available from the local stdio server (`stacyvm mcp`)",
        )
    }
}

/// Reads `limit` bytes from `offset` of a byte stream, and whether the
/// stream goes on, without keeping what comes before or after.
pub async fn read_window<S, B, E>(mut stream: S, offset: u64, limit: usize) -> Result<FileChunk, E>
where
    S: futures_util::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
{
    use futures_util::StreamExt;
    let mut skip = offset;
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let mut bytes = chunk.as_ref();
        if skip > 0 {
            let n = (bytes.len() as u64).min(skip) as usize;
            skip -= n as u64;
            bytes = &bytes[n..];
        }
        let room = limit - data.len();
        if bytes.len() > room {
            data.extend_from_slice(&bytes[..room]);
            return Ok(FileChunk { data, more: true });
        }
        data.extend_from_slice(bytes);
        if data.len() == limit {
            // The file may end exactly here: look for one more byte.
            while let Some(next) = stream.next().await {
                if !next?.as_ref().is_empty() {
                    return Ok(FileChunk { data, more: true });
                }
            }
            return Ok(FileChunk { data, more: false });
        }
    }
    Ok(FileChunk { data, more: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn windows_of_a_stream() {
        let chunks = || {
            futures_util::stream::iter(
                ["abc", "", "defg", "h"].map(|c| Ok::<_, std::io::Error>(c.as_bytes().to_vec())),
            )
        };
        for (offset, limit, want, more) in [
            (0, 100, "abcdefgh", false),
            (0, 8, "abcdefgh", false),
            (0, 7, "abcdefg", true),
            (2, 3, "cde", true),
            (3, 5, "defgh", false),
            (7, 5, "h", false),
            (20, 5, "", false),
        ] {
            let got = read_window(chunks(), offset, limit).await.unwrap();
            assert_eq!(
                (String::from_utf8(got.data).unwrap().as_str(), got.more),
                (want, more),
                "offset {offset} limit {limit}"
            );
        }
    }
}
