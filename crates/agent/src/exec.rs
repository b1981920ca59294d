//! Running commands: argv (never a shell string), env overlay, cwd inside the
//! root, stdin, timeouts and cancellation that kill the whole process group,
//! output caps, and draining that never hangs on a grandchild holding the
//! pipes open.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stacyvm_core::{Error, ExitStatus, Result};

use crate::flow::{Out, Sent};
use crate::protocol::{ExecSpec, ExitFrame, Kind, CHUNK_SIZE};
use crate::root::Root;
use crate::upload::{Upload, UploadRx};

/// PATH for commands when neither the sandbox nor the request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output is still drained after the command exited, for
/// background processes that keep the pipes open.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Hard bound on draining after exit, even while output keeps flowing.
const DRAIN_MAX: Duration = Duration::from_secs(2);

pub(crate) static SPAWN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `spec` and streams its output to `out`. Returns the exit frame, or
/// an error when the command could not be set up (bad cwd, empty argv).
/// A program that cannot be started is not an error: it exits 127 or 126
/// with the reason on stderr, as a shell would.
pub fn run(root: &Root, spec: &ExecSpec, out: &Out, upload: Option<UploadRx>) -> Result<ExitFrame> {
    let mut cmd = build_command(root, spec)?;
    let master = match spec.pty {
        // A session of its own (so its process group too), with the
        // terminal as its controlling terminal.
        Some(size) => {
            if !spec.env.contains_key("TERM") {
                cmd.env("TERM", "xterm");
            }
            Some(crate::pty::attach(&mut cmd, size)?)
        }
        None => {
            cmd.stdin(if upload.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stdout(Stdio::piped());
            cmd.stderr(Stdio::piped());
            // Its own process group, so a timeout or cancel kills everything
            // it started (that did not leave the group).
            cmd.process_group(0);
            None
        }
    };
    let traced = traced();
    if traced {
        // Force a plain fork+exec instead of posix_spawn's shared-memory
        // vfork-style clone: under PRoot (ptrace) such children crash with
        // SIGSEGV when several commands start at once. Untraced, the
        // vfork-style spawn is kept: it is the faster one.
        // SAFETY: the closure does nothing, so it is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| Ok(()));
        }
    }

    let started = Instant::now();
    let spawned = if traced {
        // One spawn at a time: under PRoot (ptrace), children forked by
        // several threads at once can crash with SIGSEGV before they exec.
        // A spawn takes microseconds, so serialising costs nothing else.
        let _one_at_a_time = SPAWN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        cmd.spawn()
    } else {
        cmd.spawn()
    };
    // The parent's copies of the terminal's slave side must close, or the
    // master never sees the end of the output.
    drop(cmd);
    if spec.stream || spec.pty.is_some() {
        // Acknowledge the start, so the client can tell setup errors (sent
        // instead of this) from the command's own output.
        out.send(Kind::Ok, b"null");
    }
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return spawn_failed(spec, out, upload, e, started),
    };
    let pid = child.id() as i32;
    out.flow.set_group(pid);

    // How the exit is learnt of, without reaping (so the group id stays
    // ours, and killable, until it is reaped below): a pidfd, readable once
    // the child exited; where the kernel has none, or under ptrace (where a
    // child that has exited cannot be reaped until the tracer let it go, so
    // the pidfd would wake the reaper too early), a waiter thread that
    // writes one byte to a pipe once the exit can be collected.
    let pidfd = if traced { None } else { pidfd_open(pid) };
    let (notify, waiter_w) = match pidfd {
        Some(fd) => (ExitNotice::Pidfd(fd), None),
        None => match pipe() {
            Ok((r, w)) => (ExitNotice::Pipe(r), Some(w)),
            Err(e) => {
                // Never leave the command running and unreaped.
                out.flow.kill_group();
                let _ = out.flow.reap_with(|| child.wait());
                return Err(e);
            }
        },
    };
    let stdin = child.stdin.take();
    let (outputs, pty_writer): ([Option<Box<dyn ReadFd>>; 2], _) = match master {
        Some(m) => ([Some(Box::new(m.reader)), None], Some(m.writer)),
        None => (
            [
                child.stdout.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
                child.stderr.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
            ],
            None,
        ),
    };

    std::thread::scope(|s| {
        if let Some(notify_w) = waiter_w {
            let waiter = std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn_scoped(s, move || {
                    let ok = wait_exit_no_reap(pid);
                    let mut w = std::fs::File::from(notify_w);
                    let _ = w.write_all(&[u8::from(ok)]);
                });
            if waiter.is_err() {
                // Without the waiter the exit is found by polling below.
                eprintln!("stacyvm-agent: exec: cannot start the waiter thread; polling for exit");
            }
        }
        if let Some(up) = upload {
            // Detached: it may stay blocked on a pipe a background process
            // holds open without reading, and must not hold up the answer.
            let out = out.clone();
            let spawned = std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || match pty_writer {
                    Some(w) => crate::pty::pump_input(up, w, &out),
                    None => pump_stdin(up, stdin, &out),
                });
            if spawned.is_err() {
                eprintln!("stacyvm-agent: exec: cannot start the stdin thread");
            }
        }
        // A limit too far away to represent is no limit.
        let deadline = (spec.timeout_ms > 0)
            .then(|| started.checked_add(Duration::from_millis(spec.timeout_ms)))
            .flatten();
        let pump = OutputPump {
            out,
            stream: spec.stream || spec.pty.is_some(),
            cap: spec.output_cap,
            deadline,
            timed_out: false,
            stopped: false,
            sent: [0, 0],
            truncated: [false, false],
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            pump.run(outputs, notify, &mut child, started)
        }));
        result.unwrap_or_else(|_| {
            // The scope joins the waiter, which waits for the command: make
            // sure it ends, and never leave it unreaped.
            out.flow.kill_group();
            let _ = out.flow.reap_with(|| child.wait());
            Err(Error::Internal(
                "the agent failed while running the command".into(),
            ))
        })
    })
}

/// Prepares the command: argv, env overlay with a default PATH, cwd.
pub(crate) fn build_command(root: &Root, spec: &ExecSpec) -> Result<Command> {
    let Some(program) = spec.cmd.first() else {
        return Err(Error::InvalidRequest("cmd must name a program".into()));
    };
    if program.is_empty() {
        return Err(Error::InvalidRequest("cmd[0] must not be empty".into()));
    }
    if spec.cmd.iter().any(|a| a.contains('\0')) {
        return Err(Error::InvalidRequest("cmd contains a NUL byte".into()));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Error::InvalidRequest(format!(
                "env name {k:?} is not valid (empty, or contains `=` or NUL)"
            )));
        }
    }
    let mut cmd = Command::new(program);
    cmd.args(&spec.cmd[1..]);
    if std::env::var_os("PATH").is_none() && !spec.env.contains_key("PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if let Some(user) = &spec.user {
        let a = crate::users::lookup(root, user)?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 && euid != a.uid {
            return Err(Error::Conflict(format!(
                "this sandbox cannot run commands as user {user:?}: its agent runs as uid \
                 {euid}, not root"
            )));
        }
        for (k, v) in [("HOME", &a.home), ("USER", &a.name), ("LOGNAME", &a.name)] {
            if !spec.env.contains_key(k) {
                cmd.env(k, v);
            }
        }
        // std drops the supplementary groups too (setgroups) when it
        // switches from root.
        cmd.uid(a.uid).gid(a.gid);
    }
    cmd.envs(&spec.env);
    match &spec.cwd {
        Some(cwd) => {
            let r = root.resolve(cwd, true)?;
            let is_dir = std::fs::metadata(&r.host)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if !r.exists || !is_dir {
                return Err(Error::InvalidRequest(format!(
                    "working directory {} does not exist or is not a directory",
                    r.logical
                )));
            }
            cmd.current_dir(&r.host);
        }
        None if root.dir() != std::path::Path::new("/") => {
            cmd.current_dir(root.dir());
        }
        None => {}
    }
    Ok(cmd)
}

/// Reports a program that could not be started the way a shell does.
fn spawn_failed(
    spec: &ExecSpec,
    out: &Out,
    upload: Option<UploadRx>,
    e: std::io::Error,
    started: Instant,
) -> Result<ExitFrame> {
    let program = &spec.cmd[0];
    let (code, reason) = match e.raw_os_error() {
        Some(libc::ENOENT) => (127, "command not found".to_owned()),
        Some(libc::EACCES) | Some(libc::EPERM) => (126, "permission denied".to_owned()),
        Some(libc::ENOEXEC) => (126, "exec format error".to_owned()),
        Some(libc::EISDIR) => (126, "is a directory".to_owned()),
        Some(libc::ENOTDIR) => (127, "not a directory".to_owned()),
        _ => return Err(Error::from_spawn(format_args!("starting {program:?}"), &e)),
    };
    // Swallow any stdin the client sends, so its credit keeps flowing. A
    // terminal's input never ends on its own: it is dropped instead.
    if let (Some(mut up), None) = (upload, spec.pty) {
        while let Some(Upload::Data(_)) = up.next(out) {}
    }
    let msg = format!("stacyvm: {program}: {reason}\n").into_bytes();
    let mut truncated = false;
    let mut msg = msg;
    if !spec.stream && msg.len() as u64 > spec.output_cap {
        msg.truncate(spec.output_cap as usize);
        truncated = true;
    }
    if !msg.is_empty() {
        // A terminal has one output stream.
        let kind = if spec.pty.is_some() {
            Kind::Stdout
        } else {
            Kind::Stderr
        };
        let _ = out.chunk(kind, &msg, None);
    }
    Ok(ExitFrame {
        status: ExitStatus {
            exit_code: Some(code),
            signal: None,
            duration_ms: started.elapsed().as_millis() as u64,
            timed_out: false,
        },
        stdout_truncated: false,
        stderr_truncated: truncated,
    })
}

/// Copies the client's stdin frames into the child's stdin, then closes it.
/// Keeps consuming (and crediting) frames after the child stopped reading.
fn pump_stdin(mut up: UploadRx, mut stdin: Option<std::process::ChildStdin>, out: &Out) {
    while let Some(Upload::Data(d)) = up.next(out) {
        if let Some(w) = stdin.as_mut() {
            if w.write_all(&d).is_err() {
                stdin = None;
            }
        }
    }
    drop(stdin);
}

struct OutputPump<'a> {
    out: &'a Out,
    stream: bool,
    cap: u64,
    deadline: Option<Instant>,
    timed_out: bool,
    /// The client went away or cancelled: keep draining, send nothing.
    stopped: bool,
    sent: [u64; 2],
    truncated: [bool; 2],
}

impl OutputPump<'_> {
    fn run(
        mut self,
        mut pipes: [Option<Box<dyn ReadFd>>; 2],
        notify: ExitNotice,
        child: &mut Child,
        started: Instant,
    ) -> Result<ExitFrame> {
        let mut notify = Some(notify);
        let mut exited_at: Option<Instant> = None;
        // Set when the waiter could not wait; the exit is then polled for.
        let mut poll_exit = false;
        let mut status: Option<std::process::ExitStatus> = None;
        let mut buf = vec![0u8; CHUNK_SIZE];

        loop {
            let now = Instant::now();
            if exited_at.is_none() {
                if let Some(d) = self.deadline {
                    if now >= d && !self.timed_out {
                        self.timed_out = true;
                        self.out.flow.kill_group();
                    }
                }
            }
            if let Some(at) = exited_at {
                let open = pipes.iter().any(Option::is_some);
                if !open || now >= at + DRAIN_MAX {
                    break;
                }
            }
            if poll_exit && exited_at.is_none() {
                if let Ok(Some(st)) = self.out.flow.reap_with(|| child.try_wait()) {
                    status = Some(st);
                    exited_at = Some(Instant::now());
                    continue;
                }
            }

            // How long to sleep in poll.
            let mut wait: Option<Duration> = None;
            if let Some(at) = exited_at {
                wait = Some((at + DRAIN_GRACE).saturating_duration_since(now));
            } else if let (Some(d), false) = (self.deadline, self.timed_out) {
                wait = Some(d.saturating_duration_since(now));
            }
            if poll_exit {
                let tick = Duration::from_millis(20);
                wait = Some(wait.map_or(tick, |w| w.min(tick)));
            }

            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
            for p in pipes.iter().flatten() {
                fds.push(libc::pollfd {
                    fd: p.raw(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if let Some(n) = &notify {
                fds.push(libc::pollfd {
                    fd: n.fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let timeout_ms: libc::c_int = match wait {
                None => -1,
                // Rounded up, so the deadline has passed when poll returns.
                Some(w) => (w.as_millis() + u128::from(w.subsec_nanos() % 1_000_000 != 0))
                    .min(i32::MAX as u128) as libc::c_int,
            };
            // SAFETY: `fds` is a valid, initialised array of `fds.len()`
            // pollfd structs that outlives the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.out.flow.kill_group();
                return Err(Error::Internal(format!("poll failed: {e}")));
            }
            if n == 0 {
                if let Some(at) = exited_at {
                    if Instant::now() >= at + DRAIN_GRACE {
                        break;
                    }
                }
                continue;
            }
            for fd in fds.iter().filter(|f| f.revents != 0) {
                if notify.as_ref().map(|n| n.fd().as_raw_fd()) == Some(fd.fd) {
                    let ok = notify.take().is_some_and(ExitNotice::exited);
                    if ok {
                        let st = self.out.flow.reap_with(|| child.wait());
                        status = st.ok();
                        exited_at = Some(Instant::now());
                    } else {
                        poll_exit = true;
                    }
                    continue;
                }
                for (i, slot) in pipes.iter_mut().enumerate() {
                    let Some(p) = slot else { continue };
                    if p.raw() != fd.fd {
                        continue;
                    }
                    match p.read_some(&mut buf) {
                        Ok(0) | Err(_) => *slot = None,
                        Ok(k) => self.deliver(i, &buf[..k]),
                    }
                }
            }
        }
        drop(pipes);
        let elapsed = exited_at
            .unwrap_or_else(Instant::now)
            .duration_since(started);
        let status = match status {
            Some(s) => s,
            None => {
                // Unreachable in practice (the loop ends after the exit),
                // but never leave the child unreaped.
                self.out.flow.kill_group();
                self.out
                    .flow
                    .reap_with(|| child.wait())
                    .map_err(|e| Error::internal("waiting for the command", e))?
            }
        };
        let (exit_code, signal) = if self.timed_out && status.code().is_none() {
            (None, Some(libc::SIGKILL))
        } else {
            (status.code(), status.signal())
        };
        Ok(ExitFrame {
            status: ExitStatus {
                exit_code,
                signal,
                duration_ms: elapsed.as_millis() as u64,
                timed_out: self.timed_out,
            },
            stdout_truncated: self.truncated[0],
            stderr_truncated: self.truncated[1],
        })
    }

    /// Sends (or, past the cap, counts and drops) one piece of output.
    fn deliver(&mut self, stream: usize, data: &[u8]) {
        if self.stopped {
            return;
        }
        let mut data = data;
        if !self.stream {
            let room = self.cap.saturating_sub(self.sent[stream]);
            if (data.len() as u64) > room {
                self.truncated[stream] = true;
                data = &data[..room as usize];
            }
            if data.is_empty() {
                return;
            }
        }
        self.sent[stream] += data.len() as u64;
        let kind = if stream == 0 {
            Kind::Stdout
        } else {
            Kind::Stderr
        };
        loop {
            let deadline = if self.timed_out { None } else { self.deadline };
            match self.out.chunk(kind, data, deadline) {
                Sent::Sent => return,
                Sent::Stopped => {
                    self.stopped = true;
                    self.out.flow.kill_group();
                    return;
                }
                Sent::Deadline => {
                    self.timed_out = true;
                    self.out.flow.kill_group();
                }
            }
        }
    }
}

/// A child's output pipe.
trait ReadFd: Send {
    fn raw(&self) -> RawFd;
    fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl<T: Read + AsRawFd + Send> ReadFd for T {
    fn raw(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// Waits until `pid` exited, leaving it unreaped (`WNOWAIT`). False if the
/// wait failed.
fn wait_exit_no_reap(pid: i32) -> bool {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value for the kernel to
        // fill in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t; waitid does not
        // keep the pointer.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return true;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// How `run` learns that the child exited (see there).
enum ExitNotice {
    /// Readable once the child exited.
    Pidfd(OwnedFd),
    /// The waiter thread writes 1 when the child exited, 0 when it could
    /// not wait.
    Pipe(OwnedFd),
}

impl ExitNotice {
    fn fd(&self) -> &OwnedFd {
        match self {
            ExitNotice::Pidfd(fd) | ExitNotice::Pipe(fd) => fd,
        }
    }

    /// Called once the fd is readable: whether the child exited (else the
    /// exit is to be polled for).
    fn exited(self) -> bool {
        match self {
            ExitNotice::Pidfd(_) => true,
            ExitNotice::Pipe(fd) => {
                let mut b = [0u8; 1];
                std::fs::File::from(fd)
                    .read(&mut b)
                    .is_ok_and(|k| k == 1 && b[0] == 1)
            }
        }
    }
}

/// A pidfd for `pid` (Linux 5.3 and newer), or `None` where the kernel or
/// a seccomp filter refuses it.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: on success the fd is new, open and owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the agent runs under ptrace (PRoot), read once from
/// `/proc/self/status`.
pub(crate) fn traced() -> bool {
    static TRACED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACED.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("TracerPid:"))
                    .is_some_and(|v| v.trim() != "0")
            })
            // Unknown: assume the careful way.
            .unwrap_or(true)
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(Error::internal(
            "creating a pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
