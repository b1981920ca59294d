//! The agent's wire protocol: the frame codec and the message types shared by
//! the agent and the host-side client.
//!
//! A connection carries many concurrent requests. Every frame is
//!
//! ```text
//! u32 BE length of the rest | u32 BE request id | u8 kind | payload
//! ```
//!
//! Requests and their answers are JSON; output and file contents travel as
//! raw bytes in `Stdout`/`Stderr`/`Data` frames. Every byte stream is flow
//! controlled by credits: a sender may have at most [`WINDOW`] chunk frames
//! unacknowledged, and the receiver returns credit as it consumes them, so a
//! slow consumer of one request never stalls the others on the connection.
//! See `docs/AGENT-PROTOCOL.md` for the conversation of every operation.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use stacyvm_core::error::WireError;
use stacyvm_core::{ExitStatus, FileEntry};

/// The protocol versions this build speaks, newest last. Version 2 adds
/// `Watch`, version 3 `FileArchive`, version 4 the `user` of commands and
/// new files; a client sends each only on a connection that chose a
/// version with it, since an older agent cannot read it.
pub const PROTOCOL_VERSIONS: &[u32] = &[1, 2, 3, 4];

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 4;

/// The first protocol version with `Watch`.
pub const WATCH_VERSION: u32 = 2;

/// The first protocol version with `FileArchive`.
pub const ARCHIVE_VERSION: u32 = 3;

/// The first protocol version with a `user` on `Exec`, `ProcStart`,
/// `FileWrite` and `FileMkdir`, `xattrs` on `FileWrite`, and entries that
/// carry their `user.*` extended attributes.
pub const USER_VERSION: u32 = 4;

/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// Request id and kind.
pub const HEADER_LEN: usize = 5;

/// Largest value of the length prefix.
pub const MAX_FRAME_LEN: usize = MAX_PAYLOAD + HEADER_LEN;

/// Size of the chunks files, stdin and output are cut into.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// How many chunk frames a sender may have in flight per request before it
/// waits for credit, unless the hello agreed on another window. A peer that
/// says nothing about the window uses this one.
pub const WINDOW: u32 = 16;

/// The largest window an agent agrees to. A wider window pays when the
/// connection has a long round trip (tunnelled through a worker), at the
/// price of that many chunks buffered per request on each side.
pub const MAX_WINDOW: u32 = 64;

/// Most entries a list or glob answers with.
pub const MAX_ENTRIES: usize = 100_000;

/// What a frame is. Directions: `c→a` client to agent, `a→c` agent to client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// c→a, JSON [`Hello`]; the first frame of every connection.
    Hello = 1,
    /// a→c, JSON [`AgentInfo`]: the chosen version.
    HelloOk = 2,
    /// c→a, JSON [`Request`]: starts request `id`.
    Request = 3,
    /// a→c, JSON answer of a request; ends it.
    Ok = 4,
    /// a→c, JSON [`WireError`]; ends the request (or, with a protocol
    /// error, the connection).
    Error = 5,
    /// a→c, raw bytes a command wrote to stdout.
    Stdout = 6,
    /// a→c, raw bytes a command wrote to stderr.
    Stderr = 7,
    /// a→c, JSON [`ExitFrame`]; ends an exec.
    Exit = 8,
    /// Both ways: a chunk of a byte stream (stdin, file contents, batches of
    /// list and glob results).
    Data = 9,
    /// Both ways, empty: the byte stream of this request is complete.
    End = 10,
    /// c→a, empty: stop the request (kills an exec's process group).
    Cancel = 11,
    /// Both ways, u32 BE: the receiver consumed that many chunk frames.
    Credit = 12,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloOk,
            3 => Kind::Request,
            4 => Kind::Ok,
            5 => Kind::Error,
            6 => Kind::Stdout,
            7 => Kind::Stderr,
            8 => Kind::Exit,
            9 => Kind::Data,
            10 => Kind::End,
            11 => Kind::Cancel,
            12 => Kind::Credit,
            _ => return None,
        })
    }

    /// Whether this frame spends a unit of the flow-control window.
    pub fn is_chunk(self) -> bool {
        matches!(self, Kind::Stdout | Kind::Stderr | Kind::Data)
    }
}

/// One decoded frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: u32,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("len", &self.payload.len())
            .finish()
    }
}

/// Why bytes are not a valid frame or message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The length prefix is below the header size or above [`MAX_FRAME_LEN`].
    BadLength(u64),
    /// The kind byte names no kind. Carries the request id.
    UnknownKind { id: u32, kind: u8 },
    /// A JSON payload did not parse. Carries the request id.
    BadJson { id: u32, reason: String },
    /// A frame that is not allowed here (wrong direction, before hello, …).
    Unexpected { id: u32, reason: String },
}

impl ProtocolError {
    /// The request id the error belongs to, when it could be read.
    pub fn id(&self) -> Option<u32> {
        match self {
            ProtocolError::BadLength(_) => None,
            ProtocolError::UnknownKind { id, .. }
            | ProtocolError::BadJson { id, .. }
            | ProtocolError::Unexpected { id, .. } => Some(*id),
        }
    }

    pub fn to_wire(&self) -> WireError {
        WireError {
            code: "invalid_request".into(),
            message: format!("protocol error: {self}"),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadLength(n) => write!(
                f,
                "frame length {n} is outside {HEADER_LEN}..={MAX_FRAME_LEN} bytes"
            ),
            ProtocolError::UnknownKind { id, kind } => {
                write!(f, "request {id}: unknown frame kind {kind}")
            }
            ProtocolError::BadJson { id, reason } => {
                write!(f, "request {id}: malformed JSON payload: {reason}")
            }
            ProtocolError::Unexpected { id, reason } => write!(f, "request {id}: {reason}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Checks a length prefix and returns how many bytes follow it.
pub fn parse_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if !(HEADER_LEN..=MAX_FRAME_LEN).contains(&n) {
        return Err(ProtocolError::BadLength(n as u64));
    }
    Ok(n)
}

impl Frame {
    pub fn new(id: u32, kind: Kind, payload: Vec<u8>) -> Frame {
        Frame { id, kind, payload }
    }

    pub fn empty(id: u32, kind: Kind) -> Frame {
        Frame {
            id,
            kind,
            payload: Vec::new(),
        }
    }

    /// A frame carrying `value` as JSON.
    pub fn json<T: Serialize>(id: u32, kind: Kind, value: &T) -> Frame {
        // Serialising our own message types cannot fail: they hold only
        // strings, numbers, maps with string keys and options.
        let payload = serde_json::to_vec(value).unwrap_or_else(|e| {
            format!("{{\"code\":\"internal\",\"message\":\"encoding failed: {e}\"}}").into_bytes()
        });
        Frame { id, kind, payload }
    }

    pub fn error(id: u32, err: &WireError) -> Frame {
        Frame::json(id, Kind::Error, err)
    }

    pub fn credit(id: u32, n: u32) -> Frame {
        Frame {
            id,
            kind: Kind::Credit,
            payload: n.to_be_bytes().to_vec(),
        }
    }

    /// Decodes what follows the length prefix (id, kind, payload).
    pub fn decode_body(mut body: Vec<u8>) -> Result<Frame, ProtocolError> {
        if body.len() < HEADER_LEN || body.len() > MAX_FRAME_LEN {
            return Err(ProtocolError::BadLength(body.len() as u64));
        }
        let id = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let kind =
            Kind::from_u8(body[4]).ok_or(ProtocolError::UnknownKind { id, kind: body[4] })?;
        body.drain(..HEADER_LEN);
        Ok(Frame {
            id,
            kind,
            payload: body,
        })
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes
    /// are needed, otherwise the frame and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let n = parse_len([buf[0], buf[1], buf[2], buf[3]])?;
        if buf.len() < 4 + n {
            return Ok(None);
        }
        let frame = Frame::decode_body(buf[4..4 + n].to_vec())?;
        Ok(Some((frame, 4 + n)))
    }

    /// The frame's bytes on the wire, length prefix included.
    ///
    /// Payloads are at most [`MAX_PAYLOAD`] by construction in this crate and
    /// the client; a larger one would be refused by the peer.
    pub fn encode(&self) -> Vec<u8> {
        encode_parts(self.id, self.kind, &self.payload)
    }

    /// Parses the JSON payload.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtocolError::BadJson {
            id: self.id,
            reason: e.to_string(),
        })
    }

    /// Reads the credit count of a `Credit` frame.
    pub fn credit_count(&self) -> Result<u32, ProtocolError> {
        match <[u8; 4]>::try_from(self.payload.as_slice()) {
            Ok(b) => Ok(u32::from_be_bytes(b)),
            Err(_) => Err(ProtocolError::Unexpected {
                id: self.id,
                reason: format!("credit payload is {} bytes, not 4", self.payload.len()),
            }),
        }
    }
}

/// The wire bytes of a frame, built straight from borrowed parts (one copy
/// of the payload).
pub fn encode_parts(id: u32, kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + HEADER_LEN + payload.len());
    let len = (HEADER_LEN + payload.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    out
}

/// Why reading a frame from a blocking reader stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection cleanly between frames.
    Closed,
    Io(io::Error),
    /// The bytes are not a frame; `id` is the request id when it was read.
    Protocol(ProtocolError),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Closed => f.write_str("connection closed"),
            ReadError::Io(e) => write!(f, "read failed: {e}"),
            ReadError::Protocol(e) => e.fmt(f),
        }
    }
}

/// Reads one frame from a blocking reader.
///
/// An oversize length prefix is answered by reading the request id behind
/// it (so the error can name the request) and returning a protocol error.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, ReadError> {
    let mut prefix = [0u8; 4];
    match read_full(r, &mut prefix) {
        Ok(0) => return Err(ReadError::Closed),
        Ok(4) => {}
        Ok(_) => {
            return Err(ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a frame header",
            )))
        }
        Err(e) => return Err(ReadError::Io(e)),
    }
    let n = match parse_len(prefix) {
        Ok(n) => n,
        Err(e) => {
            // Read the request id behind the length when the sender claims
            // it is there, so the error can name the request.
            let len = u32::from_be_bytes(prefix) as usize;
            let mut id = [0u8; 4];
            if len >= 4 && read_full(r, &mut id).ok() == Some(4) {
                let id = u32::from_be_bytes(id);
                return Err(ReadError::Protocol(ProtocolError::Unexpected {
                    id,
                    reason: format!(
                        "frame length {len} is outside {HEADER_LEN}..={MAX_FRAME_LEN} bytes"
                    ),
                }));
            }
            return Err(ReadError::Protocol(e));
        }
    };
    let mut body = vec![0u8; n];
    match read_full(r, &mut body) {
        Ok(m) if m == n => {}
        Ok(_) => {
            return Err(ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a frame",
            )))
        }
        Err(e) => return Err(ReadError::Io(e)),
    }
    Frame::decode_body(body).map_err(ReadError::Protocol)
}

/// Fills `buf` unless the reader ends first; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The client's opening message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the client speaks.
    pub versions: Vec<u32>,
    /// The credit window, in chunks, the client would like; absent means
    /// [`WINDOW`]. The agent answers with the window both sides then use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
}

/// What the agent reports about itself (the `HelloOk` and `health` answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's release version.
    pub version: String,
    /// The protocol version chosen for this connection.
    pub protocol: u32,
    pub pid: u32,
    /// The credit window of this connection, in chunks; absent (an agent
    /// that predates the choice) means [`WINDOW`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
}

impl AgentInfo {
    /// The credit window both sides use on this connection.
    pub fn window(&self) -> u32 {
        self.window.unwrap_or(WINDOW)
    }
}

/// The window an agent agrees to for a client asking for `asked`: never
/// below [`WINDOW`] (every peer can hold that much), never above
/// [`MAX_WINDOW`].
pub fn choose_window(asked: Option<u32>) -> u32 {
    asked.unwrap_or(WINDOW).clamp(WINDOW, MAX_WINDOW)
}

/// Picks the newest version both sides speak.
pub fn choose_version(offered: &[u32]) -> Option<u32> {
    offered
        .iter()
        .copied()
        .filter(|v| PROTOCOL_VERSIONS.contains(v))
        .max()
}

/// A request, the payload of a `Request` frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answer: `Ok` with [`AgentInfo`].
    Health,
    /// Runs a command. With `stdin`, the client sends the input as `Data`
    /// frames and an `End`. Answer: `Stdout`/`Stderr` chunks, then `Exit`
    /// (or `Error` when the command could not be set up).
    Exec(ExecSpec),
    /// Writes a file from the `Data` frames and `End` the client sends;
    /// with `user` (protocol 4), the file and the parents it creates belong
    /// to that account of the sandbox's `/etc/passwd`. Answer: `Ok` with
    /// the [`FileEntry`].
    FileWrite {
        path: String,
        mode: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// `user.*` extended attributes set on the file (protocol 4).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        xattrs: BTreeMap<String, String>,
    },
    /// Answer: `Data` chunks of the contents, then `End`.
    FileRead { path: String },
    /// Answer: `Ok` with the [`FileEntry`] (symlinks not followed).
    FileStat { path: String },
    /// Answer: `Data` frames each holding a JSON array of [`FileEntry`],
    /// then `End`. Sorted by path.
    FileList {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Answer: `Ok` with the moved [`FileEntry`].
    FileMove {
        from: String,
        to: String,
        #[serde(default)]
        overwrite: bool,
    },
    /// Answer: `Ok` with the [`FileEntry`].
    FileChmod { path: String, mode: u32 },
    /// Answer: `Ok` with the [`FileEntry`].
    FileMkdir {
        path: String,
        #[serde(default)]
        parents: bool,
        /// Who the directories it creates belong to (protocol 4).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Answer: `Ok` with `null`.
    FileDelete {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Answer: `Data` frames each holding a JSON array of paths, then `End`.
    /// Sorted.
    FileGlob { pattern: String },
    /// Unpacks the tar archive the client sends as `Data` frames and an
    /// `End` into the directory `path` (created with its parents). Regular
    /// files, directories and symlinks; an entry that is absolute, climbs
    /// out with `..`, or is of another type stops the unpacking with an
    /// error (what was written before it stays). Answer: `Ok` with the
    /// [`ArchiveSummary`](stacyvm_core::ArchiveSummary).
    FileExtract { path: String },
    /// Sends `path` as a tar archive (protocol 3): a directory's entries
    /// relative to it, a regular file under its own name; files,
    /// directories and symlinks (never followed). Answer: `Data` chunks of
    /// the tar, then `End`.
    FileArchive { path: String },
    /// Starts a background process the agent keeps in its table. Answer:
    /// `Ok` with [`ProcInfo`](crate::procs::ProcInfo).
    ProcStart {
        cmd: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        cwd: Option<String>,
        /// The account it runs as (protocol 4); the agent's own otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Answer: `Ok` with the array of [`ProcInfo`](crate::procs::ProcInfo).
    ProcList,
    /// Answer: `Ok` with the [`ProcInfo`](crate::procs::ProcInfo).
    ProcGet { pid: u32 },
    /// Answer: `Stdout`/`Stderr` chunks of what is still in the rings, then
    /// (with `follow`) live output; then `Exit` with a
    /// [`ProcExit`](crate::procs::ProcExit) once the process finished, or
    /// `End` when not following and it still runs.
    ProcOutput {
        pid: u32,
        #[serde(default)]
        follow: bool,
    },
    /// Writes the `Data` frames the client sends, then `End`, to the
    /// process's stdin; with `close`, closes it afterwards. Answer: `Ok`
    /// with the number of bytes written.
    ProcStdin {
        pid: u32,
        #[serde(default)]
        close: bool,
    },
    /// Sends a signal (TERM, KILL, INT, HUP, USR1, USR2, STOP, CONT) to the
    /// process's group. Answer: `Ok` with the
    /// [`ProcInfo`](crate::procs::ProcInfo).
    ProcSignal { pid: u32, signal: String },
    /// Watches a directory (protocol 2). Answer: `Data` frames each holding
    /// a JSON array of [`WatchEvent`](crate::watch::WatchEvent); an empty
    /// one says the watch is in place (the first) or answers a sync (each
    /// `Data` frame the client sends: every event of a change made before
    /// the sync arrived comes before its answer). `End` when the directory
    /// is removed or moved away. It runs until the client cancels.
    Watch {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Connects to `127.0.0.1:port` inside the sandbox and splices bytes:
    /// `Ok` once connected, then the server's bytes as `Data` chunks and
    /// `End` when it closes; the client's `Data` frames go to the server and
    /// its `End` half-closes the socket. There is no host: only the
    /// sandbox's own loopback is reachable.
    PortConnect { port: u16 },
}

impl Request {
    /// Whether the client follows the request with `Data` frames and `End`.
    pub fn has_upload(&self) -> bool {
        match self {
            Request::FileWrite { .. }
            | Request::FileExtract { .. }
            | Request::ProcStdin { .. }
            | Request::PortConnect { .. }
            | Request::Watch { .. } => true,
            Request::Exec(spec) => spec.stdin,
            _ => false,
        }
    }
}

/// A command to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether stdin follows as `Data` frames; otherwise stdin is empty.
    #[serde(default)]
    pub stdin: bool,
    /// 0 means no limit.
    pub timeout_ms: u64,
    /// Per-stream cap on the bytes sent; applies to buffered execs only.
    pub output_cap: u64,
    /// Streaming: output is sent as produced and never capped.
    #[serde(default)]
    pub stream: bool,
    /// Runs the command on a pseudo-terminal of this size (implies
    /// `stream`; see `pty`): stdin frames are then tagged input and resize
    /// messages, and all output arrives as `Stdout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// Runs the command as this account of the sandbox's `/etc/passwd` (a
    /// name, or a numeric uid), with its uid, primary gid and, unless `env`
    /// names them, its `HOME`, `USER` and `LOGNAME` (protocol 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A terminal's window size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// The payload of an `Exit` frame.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitFrame {
    #[serde(flatten)]
    pub status: ExitStatus,
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// Batch type of `FileList` answers.
pub type EntryBatch = Vec<FileEntry>;

/// Batch type of `FileGlob` answers.
pub type PathBatch = Vec<String>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_frame_round_trips() {
        let f = Frame::new(7, Kind::Data, b"hello".to_vec());
        let bytes = f.encode();
        assert_eq!(&bytes[..4], &10u32.to_be_bytes());
        let (g, used) = Frame::decode(&bytes).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
        assert_eq!(g, f);
    }

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::FileStat { path: "/a".into() };
        let f = Frame::json(1, Kind::Request, &r);
        assert_eq!(f.payload, br#"{"op":"file_stat","path":"/a"}"#);
        assert_eq!(f.parse::<Request>().expect("parses"), r);
    }

    fn any_kind() -> impl Strategy<Value = Kind> {
        (1u8..=12).prop_map(|b| Kind::from_u8(b).expect("1..=12 are kinds"))
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_the_identity(
            id in any::<u32>(),
            kind in any_kind(),
            payload in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let f = Frame::new(id, kind, payload);
            let bytes = f.encode();
            let (g, used) = Frame::decode(&bytes).expect("valid").expect("complete");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&g, &f);
            let mut r = bytes.as_slice();
            let h = read_frame(&mut r).map_err(|e| e.to_string());
            prop_assert_eq!(h, Ok(f));
        }

        #[test]
        fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode(&bytes);
            let mut r = bytes.as_slice();
            // Reads frames until the bytes run out or stop being frames.
            for _ in 0..64 {
                if read_frame(&mut r).is_err() {
                    break;
                }
            }
            if let Ok(Some((f, _))) = Frame::decode(&bytes) {
                let _ = f.parse::<Request>();
                let _ = f.parse::<Hello>();
                let _ = f.credit_count();
            }
        }

        #[test]
        fn truncated_frames_ask_for_more_or_fail_cleanly(
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = Frame::new(3, Kind::Data, payload).encode();
            let cut = cut.index(bytes.len());
            prop_assert_eq!(Frame::decode(&bytes[..cut]), Ok(None));
            let mut r = &bytes[..cut];
            prop_assert!(read_frame(&mut r).is_err());
        }

        #[test]
        fn oversize_and_undersize_lengths_are_refused(
            len in prop_oneof![0u32..(HEADER_LEN as u32), (MAX_FRAME_LEN as u32 + 1)..=u32::MAX],
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(&rest);
            prop_assert_eq!(Frame::decode(&bytes), Err(ProtocolError::BadLength(len as u64)));
            let mut r = bytes.as_slice();
            prop_assert!(matches!(read_frame(&mut r), Err(ReadError::Protocol(_))));
        }

        #[test]
        fn bad_json_is_an_error_naming_the_request(
            id in any::<u32>(),
            junk in "[^{}]{0,64}|\\{[a-z\":,]{0,32}",
        ) {
            let f = Frame::new(id, Kind::Request, junk.into_bytes());
            match f.parse::<Request>() {
                Ok(_) => {}
                Err(e) => prop_assert_eq!(e.id(), Some(id)),
            }
        }
    }

    #[test]
    fn unknown_kinds_name_their_request() {
        let mut bytes = Frame::new(77, Kind::Data, vec![1]).encode();
        bytes[8] = 99;
        assert_eq!(
            Frame::decode(&bytes),
            Err(ProtocolError::UnknownKind { id: 77, kind: 99 })
        );
    }

    #[test]
    fn the_newest_common_version_is_chosen() {
        assert_eq!(choose_version(&[1, 2, 3, 4, 5]), Some(4));
        assert_eq!(choose_version(&[1, 2]), Some(2));
        // A client of protocol 1 still gets it.
        assert_eq!(choose_version(&[1]), Some(1));
        assert_eq!(choose_version(&[9]), None);
    }
}
