//! Background processes: commands the agent starts and keeps, so they
//! outlive the connection (and the control plane) that started them.
//!
//! The table lives in the agent for its whole life. Each process keeps the
//! last [`RING_BYTES`] of each output stream in a ring (older output is
//! dropped and counted), so a client that connects later reads everything
//! that is still there, then follows live output until the exit.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stacyvm_core::{Error, ExitStatus, Result};

use crate::flow::{lock, Out, Sent};
use crate::protocol::{ExecSpec, Kind, CHUNK_SIZE};
use crate::root::Root;
use crate::upload::{Upload, UploadRx};

/// Output kept per process and stream; older bytes are dropped.
pub const RING_BYTES: usize = 1024 * 1024;

/// Most processes one sandbox keeps running at once.
pub const MAX_RUNNING: usize = 32;

/// Most processes the table keeps, exited ones included; beyond it the
/// oldest exited process is forgotten.
pub const MAX_KEPT: usize = 128;

/// How long output is still collected after the exit, for a grandchild that
/// keeps the pipes open.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// A background process as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub pid: u32,
    pub cmd: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// `running` or `exited`.
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Whether stdin is still open.
    pub stdin_open: bool,
    /// Output bytes dropped from the front of each ring.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

/// The end of an output stream: the payload of the `Exit` frame that ends
/// a `proc_output` of an exited process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcExit {
    #[serde(flatten)]
    pub status: ExitStatus,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

struct Chunk {
    seq: u64,
    stream: usize,
    data: Vec<u8>,
}

#[derive(Default)]
struct Ring {
    chunks: VecDeque<Chunk>,
    next_seq: u64,
    bytes: [usize; 2],
    dropped: [u64; 2],
}

impl Ring {
    fn push(&mut self, stream: usize, data: &[u8]) {
        // Only the tail of an oversize write can be kept.
        let data = if data.len() > RING_BYTES {
            self.dropped[stream] += (data.len() - RING_BYTES) as u64;
            &data[data.len() - RING_BYTES..]
        } else {
            data
        };
        self.chunks.push_back(Chunk {
            seq: self.next_seq,
            stream,
            data: data.to_vec(),
        });
        self.next_seq += 1;
        self.bytes[stream] += data.len();
        while self.bytes[stream] > RING_BYTES {
            let Some(i) = self.chunks.iter().position(|c| c.stream == stream) else {
                break;
            };
            let excess = self.bytes[stream] - RING_BYTES;
            // Only as much as is over: the ring keeps exactly its size.
            if self.chunks[i].data.len() > excess {
                self.chunks[i].data.drain(..excess);
                self.bytes[stream] -= excess;
                self.dropped[stream] += excess as u64;
            } else if let Some(c) = self.chunks.remove(i) {
                self.bytes[stream] -= c.data.len();
                self.dropped[stream] += c.data.len() as u64;
            }
        }
    }
}

struct State {
    ring: Ring,
    stdin: Option<ChildStdin>,
    exit: Option<ExitStatus>,
    exited_at: Option<Instant>,
    ended_at_ms: Option<u64>,
    /// Output pipes still open.
    open_pipes: u8,
}

struct Proc {
    pid: u32,
    cmd: Vec<String>,
    cwd: Option<String>,
    started_at_ms: u64,
    state: Mutex<State>,
    changed: Condvar,
}

impl Proc {
    fn info(&self) -> ProcInfo {
        let st = lock(&self.state);
        ProcInfo {
            pid: self.pid,
            cmd: self.cmd.clone(),
            cwd: self.cwd.clone(),
            state: if st.exit.is_some() {
                "exited".into()
            } else {
                "running".into()
            },
            exit_code: st.exit.as_ref().and_then(|e| e.exit_code),
            signal: st.exit.as_ref().and_then(|e| e.signal),
            started_at_ms: self.started_at_ms,
            ended_at_ms: st.ended_at_ms,
            stdin_open: st.stdin.is_some(),
            stdout_dropped: st.ring.dropped[0],
            stderr_dropped: st.ring.dropped[1],
        }
    }

    /// Whether no more output will come: exited, and the pipes closed or
    /// the drain time after the exit is over.
    fn finished(st: &State) -> bool {
        st.exit.is_some()
            && (st.open_pipes == 0 || st.exited_at.is_some_and(|t| t.elapsed() >= DRAIN_MAX))
    }
}

static TABLE: Mutex<BTreeMap<u32, Arc<Proc>>> = Mutex::new(BTreeMap::new());

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn find(pid: u32) -> Result<Arc<Proc>> {
    lock(&TABLE)
        .get(&pid)
        .cloned()
        .ok_or_else(|| Error::NotFound(format!("no background process {pid}")))
}

/// Starts `cmd` in the background and adds it to the table.
pub fn start(
    root: &Root,
    cmd: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
) -> Result<ProcInfo> {
    let spec = ExecSpec {
        cmd: cmd.clone(),
        env,
        cwd: cwd.clone(),
        stdin: true,
        timeout_ms: 0,
        output_cap: 0,
        stream: true,
        pty: None,
        user,
    };
    let mut command = crate::exec::build_command(root, &spec)?;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // Holding the table lock across the spawn keeps the running count
    // honest when several starts race.
    let mut table = lock(&TABLE);
    let running = table
        .values()
        .filter(|p| lock(&p.state).exit.is_none())
        .count();
    if running >= MAX_RUNNING {
        return Err(Error::Conflict(format!(
            "this sandbox already runs {running} background processes (the most it may run \
             at once); wait for one to exit or kill one"
        )));
    }
    let traced = crate::exec::traced();
    if traced {
        // See exec: under PRoot a plain fork+exec, one at a time.
        // SAFETY: the closure does nothing, so it is async-signal-safe.
        unsafe {
            command.pre_exec(|| Ok(()));
        }
    }
    let spawned = if traced {
        let _one = crate::exec::SPAWN_LOCK
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        command.spawn()
    } else {
        command.spawn()
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let program = &cmd[0];
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
                    Error::InvalidRequest(format!("{program}: command not found"))
                }
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    Error::InvalidRequest(format!("{program}: permission denied"))
                }
                _ => Error::from_spawn(format_args!("starting {program:?}"), &e),
            });
        }
    };
    let pid = child.id();
    let proc = Arc::new(Proc {
        pid,
        cmd,
        cwd,
        started_at_ms: unix_ms(),
        state: Mutex::new(State {
            ring: Ring::default(),
            stdin: child.stdin.take(),
            exit: None,
            exited_at: None,
            ended_at_ms: None,
            open_pipes: 2,
        }),
        changed: Condvar::new(),
    });
    let readers = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ];
    for (stream, reader) in readers.into_iter().enumerate() {
        let p = proc.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || collect(&p, stream, reader));
        if spawned.is_err() {
            eprintln!("stacyvm-agent: procs: cannot start an output thread for {pid}");
        }
    }
    let p = proc.clone();
    let started = Instant::now();
    let waiter = std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || {
            let status = child.wait();
            let mut st = lock(&p.state);
            st.exit = Some(match status {
                Ok(s) => ExitStatus {
                    exit_code: s.code(),
                    signal: s.signal(),
                    duration_ms: started.elapsed().as_millis() as u64,
                    timed_out: false,
                },
                Err(_) => ExitStatus {
                    exit_code: None,
                    signal: None,
                    duration_ms: started.elapsed().as_millis() as u64,
                    timed_out: false,
                },
            });
            st.exited_at = Some(Instant::now());
            st.ended_at_ms = Some(unix_ms());
            st.stdin = None;
            p.changed.notify_all();
        });
    if let Err(e) = waiter {
        // SAFETY: kill takes a process group id and a signal number.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        return Err(Error::from_spawn("starting the waiter thread", &e));
    }
    let info = proc.info();
    table.insert(pid, proc);
    forget_old(&mut table);
    Ok(info)
}

/// Drops the oldest exited processes beyond [`MAX_KEPT`].
fn forget_old(table: &mut BTreeMap<u32, Arc<Proc>>) {
    while table.len() > MAX_KEPT {
        let oldest = table
            .values()
            .filter(|p| lock(&p.state).exit.is_some())
            .min_by_key(|p| p.started_at_ms)
            .map(|p| p.pid);
        match oldest {
            Some(pid) => {
                table.remove(&pid);
            }
            None => break,
        }
    }
}

fn collect(p: &Proc, stream: usize, reader: Option<Box<dyn Read + Send>>) {
    if let Some(mut r) = reader {
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut st = lock(&p.state);
                    st.ring.push(stream, &buf[..n]);
                    p.changed.notify_all();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    let mut st = lock(&p.state);
    st.open_pipes = st.open_pipes.saturating_sub(1);
    p.changed.notify_all();
}

/// Every process in the table, by pid.
pub fn list() -> Vec<ProcInfo> {
    let procs: Vec<Arc<Proc>> = lock(&TABLE).values().cloned().collect();
    procs.iter().map(|p| p.info()).collect()
}

pub fn get(pid: u32) -> Result<ProcInfo> {
    Ok(find(pid)?.info())
}

/// Sends everything still in the rings, then (with `follow`) live output,
/// as `Stdout`/`Stderr` chunks. Returns the exit once the process finished,
/// or `None` when not following and it still runs (or the client left).
pub fn output(pid: u32, follow: bool, out: &Out) -> Result<Option<ProcExit>> {
    let p = find(pid)?;
    let mut cursor = 0u64;
    loop {
        let (batch, done) = {
            let mut st = lock(&p.state);
            loop {
                let has_new = st.ring.chunks.back().is_some_and(|c| c.seq >= cursor);
                let finished = Proc::finished(&st);
                if has_new || finished || !follow {
                    break;
                }
                if out.flow.is_cancelled() {
                    return Ok(None);
                }
                let (g, _) = p
                    .changed
                    .wait_timeout(st, Duration::from_millis(200))
                    .unwrap_or_else(|e| e.into_inner());
                st = g;
            }
            let batch: Vec<(usize, Vec<u8>)> = st
                .ring
                .chunks
                .iter()
                .filter(|c| c.seq >= cursor)
                .map(|c| (c.stream, c.data.clone()))
                .collect();
            cursor = st.ring.next_seq;
            let done = Proc::finished(&st).then(|| ProcExit {
                status: st.exit.clone().unwrap_or_default(),
                stdout_dropped: st.ring.dropped[0],
                stderr_dropped: st.ring.dropped[1],
            });
            (batch, done)
        };
        for (stream, data) in batch {
            let kind = if stream == 0 {
                Kind::Stdout
            } else {
                Kind::Stderr
            };
            if out.chunk(kind, &data, None) != Sent::Sent {
                return Ok(None);
            }
        }
        if done.is_some() || !follow {
            return Ok(done);
        }
    }
}

/// Writes the uploaded bytes to the process's stdin; with `close`, closes
/// stdin afterwards. Returns how many bytes were written.
pub fn stdin(pid: u32, close: bool, out: &Out, upload: Option<UploadRx>) -> Result<u64> {
    let p = find(pid)?;
    let mut written = 0u64;
    if let Some(mut up) = upload {
        while let Some(Upload::Data(d)) = up.next(out) {
            // The pipe write may block on a process that does not read:
            // the stdin handle is taken out of the lock while writing.
            let taken = lock(&p.state).stdin.take();
            let Some(mut w) = taken else {
                // Drain what the client still sends, so its credit flows.
                while let Some(Upload::Data(_)) = up.next(out) {}
                return Err(Error::Conflict(format!(
                    "the stdin of process {pid} is closed"
                )));
            };
            let r = w.write_all(&d);
            let mut st = lock(&p.state);
            if st.exit.is_none() {
                st.stdin = Some(w);
            }
            drop(st);
            if let Err(e) = r {
                return Err(Error::Conflict(format!(
                    "writing to the stdin of process {pid}: {e}"
                )));
            }
            written += d.len() as u64;
        }
    }
    if close {
        lock(&p.state).stdin = None;
        p.changed.notify_all();
    }
    Ok(written)
}

/// The signals a client may send, by name.
pub fn signal_number(name: &str) -> Option<i32> {
    let name = name.strip_prefix("SIG").unwrap_or(name);
    Some(match name {
        "TERM" => libc::SIGTERM,
        "KILL" => libc::SIGKILL,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        _ => return None,
    })
}

/// Sends `signal` to the process's group (so what it started gets it too).
pub fn signal(pid: u32, signal: &str) -> Result<ProcInfo> {
    let Some(sig) = signal_number(signal) else {
        return Err(Error::InvalidRequest(format!(
            "signal {signal:?} is not one of TERM, KILL, INT, HUP, USR1, USR2, STOP, CONT"
        )));
    };
    let p = find(pid)?;
    let st = lock(&p.state);
    if st.exit.is_some() {
        return Err(Error::Conflict(format!("process {pid} has already exited")));
    }
    // Checked and sent under the state lock, where the waiter records the
    // exit, so a process known to have exited is never signalled by id.
    // SAFETY: kill takes a process group id and a signal number.
    let rc = unsafe { libc::kill(-(pid as i32), sig) };
    if rc != 0 {
        // The leader may be gone while the group lives on; try the leader.
        // SAFETY: as above, with a process id.
        unsafe { libc::kill(pid as i32, sig) };
    }
    drop(st);
    Ok(p.info())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_bytes_of_each_stream() {
        let mut r = Ring::default();
        r.push(1, b"err");
        for _ in 0..(RING_BYTES / 1000 + 3) {
            r.push(0, &[b'x'; 1000]);
        }
        assert_eq!(r.bytes[0], RING_BYTES);
        assert_eq!(
            r.dropped[0],
            (RING_BYTES / 1000 + 3) as u64 * 1000 - RING_BYTES as u64
        );
        assert_eq!(r.dropped[1], 0);
        assert!(r.chunks.iter().any(|c| c.stream == 1));
        r.push(1, &vec![b'y'; RING_BYTES + 10]);
        assert_eq!(r.bytes[1], RING_BYTES);
        assert_eq!(r.dropped[1], 13);
    }

    #[test]
    fn only_the_listed_signals_are_accepted() {
        assert_eq!(signal_number("TERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("SIGKILL"), Some(libc::SIGKILL));
        assert_eq!(signal_number("SEGV"), None);
        assert_eq!(signal_number(""), None);
    }
}
