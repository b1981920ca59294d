//! One client connection: the version handshake, the reader loop that
//! routes frames to in-flight requests, and one thread per request in
//! flight (reused across requests, see `pool`).
//!
//! Bad input (a malformed frame, an unknown kind, bad JSON, an oversize
//! frame) is answered with an error frame and closes this connection only;
//! handlers run under `catch_unwind`, so nothing a client sends takes the
//! agent down.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use stacyvm_core::error::WireError;
use stacyvm_core::{Error, FileEntry};

use crate::flow::{lock, ConnWriter, Flow, Out, Sent};
use crate::protocol::{
    choose_version, choose_window, read_frame, AgentInfo, Frame, Hello, Kind, ProtocolError,
    ReadError, Request, CHUNK_SIZE, PROTOCOL_VERSIONS,
};
use crate::root::Root;
use crate::upload::{Upload, UploadRx};
use crate::{archive, exec, extract, files, procs, watch};

/// The agent's release version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Stack of request threads: handlers keep little on the stack, and many
/// may run at once.
const HANDLER_STACK: usize = 256 * 1024;

/// Most requests one connection may have running at once (each holds a
/// thread).
const MAX_IN_FLIGHT: usize = 1024;

/// Size JSON batches of list and glob answers are cut at.
const BATCH_BYTES: usize = 512 * 1024;

/// Request threads, shared by all connections.
static REQUEST_THREADS: crate::pool::Pool = crate::pool::Pool::new();

static CONN_COUNTER: AtomicU64 = AtomicU64::new(1);

/// A request in flight, as the reader sees it.
struct Slot {
    flow: Arc<Flow>,
    /// Where uploaded chunks go; `None` once `End` arrived or when the
    /// request takes no upload.
    upload: Option<SyncSender<Upload>>,
    /// Upload chunks the client may still send: the window plus the credit
    /// returned so far, minus what it sent.
    budget: Arc<AtomicU32>,
}

struct Shared {
    writer: Arc<ConnWriter>,
    slots: Mutex<HashMap<u32, Slot>>,
    root: Root,
    protocol: u32,
    /// The credit window agreed in the hello, in chunks.
    window: u32,
    conn: u64,
}

/// Serves one connection until the client closes it or breaks the protocol.
pub fn serve(mut reader: impl Read, writer: ConnWriter, root: Root) {
    let conn = CONN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let writer = Arc::new(writer);
    let (protocol, window) = match handshake(&mut reader, &writer) {
        Ok(v) => v,
        Err(reason) => {
            eprintln!("stacyvm-agent: conn {conn}: handshake failed: {reason}");
            writer.mark_dead();
            return;
        }
    };
    let shared = Arc::new(Shared {
        writer,
        slots: Mutex::new(HashMap::new()),
        root,
        protocol,
        window,
        conn,
    });
    let end = read_loop(&mut reader, &shared);
    match &end {
        ReadError::Closed => {}
        e => eprintln!("stacyvm-agent: conn {conn}: closing: {e}"),
    }
    if let ReadError::Protocol(e) = &end {
        shared
            .writer
            .send(&Frame::error(e.id().unwrap_or(0), &e.to_wire()));
    }
    shared.writer.mark_dead();
    // Every request still running is cancelled: nobody will read its answer.
    let slots: Vec<Slot> = lock(&shared.slots).drain().map(|(_, s)| s).collect();
    for s in slots {
        s.flow.cancel();
    }
}

/// Agrees on the protocol version and the credit window.
fn handshake(reader: &mut impl Read, writer: &ConnWriter) -> Result<(u32, u32), String> {
    let frame = match read_frame(reader) {
        Ok(f) => f,
        Err(ReadError::Protocol(e)) => {
            writer.send(&Frame::error(e.id().unwrap_or(0), &e.to_wire()));
            return Err(e.to_string());
        }
        Err(e) => return Err(e.to_string()),
    };
    let refuse = |err: WireError| {
        writer.send(&Frame::error(frame.id, &err));
        err.message
    };
    if frame.kind != Kind::Hello {
        return Err(refuse(WireError {
            code: "invalid_request".into(),
            message: format!("the first frame must be hello, not {:?}", frame.kind),
        }));
    }
    let hello: Hello = match frame.parse() {
        Ok(h) => h,
        Err(e) => return Err(refuse(e.to_wire())),
    };
    let Some(version) = choose_version(&hello.versions) else {
        return Err(refuse(WireError {
            code: "unsupported".into(),
            message: format!(
                "no common protocol version: the client speaks {:?}, the agent {:?}",
                hello.versions, PROTOCOL_VERSIONS
            ),
        }));
    };
    let window = choose_window(hello.window);
    let info = AgentInfo {
        version: AGENT_VERSION.into(),
        protocol: version,
        pid: std::process::id(),
        window: Some(window),
    };
    if !writer.send(&Frame::json(frame.id, Kind::HelloOk, &info)) {
        return Err("the client went away".into());
    }
    Ok((version, window))
}

fn unexpected(id: u32, reason: impl Into<String>) -> ReadError {
    ReadError::Protocol(ProtocolError::Unexpected {
        id,
        reason: reason.into(),
    })
}

/// Reads and routes frames until the connection ends; returns why.
fn read_loop(reader: &mut impl Read, shared: &Arc<Shared>) -> ReadError {
    loop {
        let frame = match read_frame(reader) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let id = frame.id;
        match frame.kind {
            Kind::Request => {
                let req: Request = match frame.parse() {
                    Ok(r) => r,
                    Err(e) => return ReadError::Protocol(e),
                };
                let mut slots = lock(&shared.slots);
                if slots.contains_key(&id) {
                    return unexpected(id, "request id already in use");
                }
                if slots.len() >= MAX_IN_FLIGHT {
                    drop(slots);
                    let err = Error::InvalidRequest(format!(
                        "more than {MAX_IN_FLIGHT} requests in flight on one connection"
                    ));
                    shared.writer.send(&Frame::error(id, &err.to_wire()));
                    continue;
                }
                let window = shared.window;
                let flow = Arc::new(Flow::new(window));
                let budget = Arc::new(AtomicU32::new(window));
                let (upload_tx, upload_rx) = if req.has_upload() {
                    // One spare place for the `End` behind a full window.
                    let (tx, rx) = sync_channel(window as usize + 1);
                    (Some(tx), Some(UploadRx::new(rx, budget.clone(), window)))
                } else {
                    (None, None)
                };
                slots.insert(
                    id,
                    Slot {
                        flow: flow.clone(),
                        upload: upload_tx,
                        budget,
                    },
                );
                drop(slots);
                let out = Out {
                    writer: shared.writer.clone(),
                    flow,
                    id,
                };
                let task_shared = shared.clone();
                let spawned = REQUEST_THREADS.run(HANDLER_STACK, move || {
                    run_request(&task_shared, req, out, upload_rx)
                });
                if let Err(e) = spawned {
                    lock(&shared.slots).remove(&id);
                    let err = Error::from_spawn("starting a request thread", &e);
                    shared.writer.send(&Frame::error(id, &err.to_wire()));
                }
            }
            Kind::Data | Kind::End => {
                let mut slots = lock(&shared.slots);
                // Requests that already ended (e.g. failed early) drop
                // whatever the client still had in flight.
                let Some(slot) = slots.get_mut(&id) else {
                    continue;
                };
                // Stray data (for a request that takes none, or after its
                // handler stopped reading) is dropped.
                let Some(tx) = slot.upload.as_ref() else {
                    continue;
                };
                if frame.kind == Kind::End {
                    // The spare place in the queue is for this: it cannot be full.
                    let _ = tx.try_send(Upload::End);
                    slot.upload = None;
                    continue;
                }
                if frame.payload.len() > CHUNK_SIZE * 4 {
                    return unexpected(id, "data chunk larger than 256 KiB");
                }
                let within = slot
                    .budget
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                    .is_ok();
                if !within {
                    return unexpected(id, "data frames sent beyond the credit window");
                }
                match tx.try_send(Upload::Data(frame.payload)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        return unexpected(id, "data frames sent beyond the credit window");
                    }
                    // The handler stopped reading (it failed or finished).
                    Err(TrySendError::Disconnected(_)) => slot.upload = None,
                }
            }
            Kind::Cancel => {
                if let Some(slot) = lock(&shared.slots).get_mut(&id) {
                    slot.upload = None;
                    slot.flow.cancel();
                }
            }
            Kind::Credit => {
                let n = match frame.credit_count() {
                    Ok(n) => n,
                    Err(e) => return ReadError::Protocol(e),
                };
                if let Some(slot) = lock(&shared.slots).get(&id) {
                    slot.flow.add_credit(n);
                }
            }
            other => return unexpected(id, format!("a client may not send {other:?} frames")),
        }
    }
}

/// What a request ends with.
enum Answer {
    Ok(Vec<u8>),
    Frame(Kind, Vec<u8>),
    Err(Error),
    /// Cancelled or the connection is gone: nothing more to say.
    Nothing,
}

fn run_request(shared: &Arc<Shared>, req: Request, out: Out, upload: Option<UploadRx>) {
    let op = op_name(&req);
    let answer = catch_unwind(AssertUnwindSafe(|| handle(shared, req, &out, upload)))
        .unwrap_or_else(|_| {
            eprintln!(
                "stacyvm-agent: conn {}: request {}: {op} panicked",
                shared.conn, out.id
            );
            Answer::Err(Error::Internal(format!(
                "the agent failed while handling {op}"
            )))
        });
    // The id is free again before the client can see the answer.
    lock(&shared.slots).remove(&out.id);
    match answer {
        Answer::Ok(payload) => {
            out.send(Kind::Ok, &payload);
        }
        Answer::Frame(kind, payload) => {
            out.send(kind, &payload);
        }
        Answer::Err(e) => {
            out.writer.send(&Frame::error(out.id, &e.to_wire()));
        }
        Answer::Nothing => {}
    }
}

fn op_name(req: &Request) -> &'static str {
    match req {
        Request::Health => "health",
        Request::Exec(_) => "exec",
        Request::FileWrite { .. } => "file_write",
        Request::FileRead { .. } => "file_read",
        Request::FileStat { .. } => "file_stat",
        Request::FileList { .. } => "file_list",
        Request::FileMove { .. } => "file_move",
        Request::FileChmod { .. } => "file_chmod",
        Request::FileMkdir { .. } => "file_mkdir",
        Request::FileDelete { .. } => "file_delete",
        Request::FileGlob { .. } => "file_glob",
        Request::FileExtract { .. } => "file_extract",
        Request::FileArchive { .. } => "file_archive",
        Request::ProcStart { .. } => "proc_start",
        Request::ProcList => "proc_list",
        Request::ProcGet { .. } => "proc_get",
        Request::ProcOutput { .. } => "proc_output",
        Request::ProcStdin { .. } => "proc_stdin",
        Request::ProcSignal { .. } => "proc_signal",
        Request::Watch { .. } => "watch",
        Request::PortConnect { .. } => "port_connect",
    }
}

fn json<T: serde::Serialize>(v: &T) -> Answer {
    match serde_json::to_vec(v) {
        Ok(b) => Answer::Ok(b),
        Err(e) => Answer::Err(Error::internal("encoding the answer", e)),
    }
}

fn entry(r: stacyvm_core::Result<FileEntry>) -> Answer {
    match r {
        Ok(e) => json(&e),
        Err(e) => Answer::Err(e),
    }
}

fn handle(shared: &Shared, req: Request, out: &Out, upload: Option<UploadRx>) -> Answer {
    let root = &shared.root;
    match req {
        Request::Health => json(&AgentInfo {
            version: AGENT_VERSION.into(),
            protocol: shared.protocol,
            pid: std::process::id(),
            window: Some(shared.window),
        }),
        Request::Exec(spec) => match exec::run(root, &spec, out, upload) {
            Ok(exit) => match serde_json::to_vec(&exit) {
                Ok(b) => Answer::Frame(Kind::Exit, b),
                Err(e) => Answer::Err(Error::internal("encoding the exit", e)),
            },
            Err(e) => Answer::Err(e),
        },
        Request::FileWrite {
            path,
            mode,
            user,
            xattrs,
        } => file_write(root, &path, mode, user.as_deref(), &xattrs, out, upload),
        Request::FileExtract { path } => match upload {
            Some(upload) => {
                let mut body = crate::upload::UploadReader::new(upload, out);
                match extract::extract(root, &path, &mut body) {
                    Ok(summary) => json(&summary),
                    // Cancelled by the client: nobody is listening.
                    Err(_) if body.cancelled() => Answer::Nothing,
                    Err(e) => Answer::Err(e),
                }
            }
            None => Answer::Err(Error::Internal("file_extract without an upload".into())),
        },
        Request::FileRead { path } => file_read(root, &path, out),
        Request::FileArchive { path } => match archive::archive(root, &path, out) {
            Ok(archive::Ended::Done) => Answer::Frame(Kind::End, Vec::new()),
            Ok(archive::Ended::Cancelled) => Answer::Nothing,
            Err(e) => Answer::Err(e),
        },
        Request::FileStat { path } => entry(files::stat(root, &path)),
        Request::FileList { path, recursive } => match files::list(root, &path, recursive) {
            Ok(entries) => send_batches(out, &entries),
            Err(e) => Answer::Err(e),
        },
        Request::FileMove {
            from,
            to,
            overwrite,
        } => entry(files::move_path(root, &from, &to, overwrite)),
        Request::FileChmod { path, mode } => entry(files::chmod(root, &path, mode)),
        Request::FileMkdir {
            path,
            parents,
            user,
        } => entry(files::mkdir(root, &path, parents, user.as_deref())),
        Request::FileDelete { path, recursive } => match files::delete(root, &path, recursive) {
            Ok(()) => Answer::Ok(b"null".to_vec()),
            Err(e) => Answer::Err(e),
        },
        Request::FileGlob { pattern } => match files::glob(root, &pattern) {
            Ok(paths) => send_batches(out, &paths),
            Err(e) => Answer::Err(e),
        },
        Request::ProcStart {
            cmd,
            env,
            cwd,
            user,
        } => match procs::start(root, cmd, env, cwd, user) {
            Ok(info) => json(&info),
            Err(e) => Answer::Err(e),
        },
        Request::ProcList => json(&procs::list()),
        Request::ProcGet { pid } => match procs::get(pid) {
            Ok(info) => json(&info),
            Err(e) => Answer::Err(e),
        },
        Request::ProcOutput { pid, follow } => match procs::output(pid, follow, out) {
            Ok(Some(exit)) => match serde_json::to_vec(&exit) {
                Ok(b) => Answer::Frame(Kind::Exit, b),
                Err(e) => Answer::Err(Error::internal("encoding the exit", e)),
            },
            Ok(None) if out.flow.is_cancelled() => Answer::Nothing,
            Ok(None) => Answer::Frame(Kind::End, Vec::new()),
            Err(e) => Answer::Err(e),
        },
        Request::ProcStdin { pid, close } => match procs::stdin(pid, close, out, upload) {
            Ok(n) => json(&n),
            Err(e) => Answer::Err(e),
        },
        Request::ProcSignal { pid, signal } => match procs::signal(pid, &signal) {
            Ok(info) => json(&info),
            Err(e) => Answer::Err(e),
        },
        Request::Watch { path, recursive } => {
            match watch::watch(root, &path, recursive, out, upload) {
                Ok(watch::Ended::Gone) => Answer::Frame(Kind::End, Vec::new()),
                Ok(watch::Ended::Cancelled) => Answer::Nothing,
                Err(e) => Answer::Err(e),
            }
        }
        Request::PortConnect { port } => match upload {
            Some(upload) => match crate::ports::relay(port, out, upload) {
                Ok(crate::ports::Relayed::Closed) => Answer::Frame(Kind::End, Vec::new()),
                Ok(crate::ports::Relayed::Stopped) => Answer::Nothing,
                Err(e) => Answer::Err(e),
            },
            None => Answer::Err(Error::Internal("port_connect without an upload".into())),
        },
    }
}

fn file_write(
    root: &Root,
    path: &str,
    mode: Option<u32>,
    user: Option<&str>,
    xattrs: &BTreeMap<String, String>,
    out: &Out,
    upload: Option<UploadRx>,
) -> Answer {
    let Some(mut upload) = upload else {
        return Answer::Err(Error::Internal("file_write without an upload".into()));
    };
    let mut pending = match files::write_begin(root, path, mode, user, xattrs) {
        Ok(p) => p,
        Err(e) => return Answer::Err(e),
    };
    loop {
        match upload.next(out) {
            Some(Upload::Data(d)) => {
                if let Err(e) = pending.write(&d) {
                    return Answer::Err(e);
                }
            }
            Some(Upload::End) => return entry(pending.commit()),
            // Cancelled: the temporary file goes away with `pending`.
            None => return Answer::Nothing,
        }
    }
}

fn file_read(root: &Root, path: &str, out: &Out) -> Answer {
    let mut file = match files::open_read(root, path) {
        Ok(f) => f,
        Err(e) => return Answer::Err(e),
    };
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Answer::Err(Error::internal(format!("reading {path}"), e)),
        };
        if n == 0 {
            return Answer::Frame(Kind::End, Vec::new());
        }
        if out.chunk(Kind::Data, &buf[..n], None) != Sent::Sent {
            return Answer::Nothing;
        }
    }
}

/// Sends items as `Data` frames holding JSON arrays, then `End`.
fn send_batches<T: serde::Serialize>(out: &Out, items: &[T]) -> Answer {
    let mut batch = Vec::with_capacity(4096);
    batch.push(b'[');
    for item in items {
        let encoded = match serde_json::to_vec(item) {
            Ok(b) => b,
            Err(e) => return Answer::Err(Error::internal("encoding an entry", e)),
        };
        if batch.len() > 1 && batch.len() + encoded.len() + 2 > BATCH_BYTES {
            batch.push(b']');
            if out.chunk(Kind::Data, &batch, None) != Sent::Sent {
                return Answer::Nothing;
            }
            batch.clear();
            batch.push(b'[');
        }
        if batch.len() > 1 {
            batch.push(b',');
        }
        batch.extend_from_slice(&encoded);
    }
    if batch.len() > 1 {
        batch.push(b']');
        if out.chunk(Kind::Data, &batch, None) != Sent::Sent {
            return Answer::Nothing;
        }
    }
    Answer::Frame(Kind::End, Vec::new())
}
