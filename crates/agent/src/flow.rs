//! Per-connection writer and per-request flow control and cancellation.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::protocol::{encode_parts, Frame, Kind};

/// The writing half of a connection, shared by every request on it. Frames
/// are written whole under the lock, so they never interleave.
pub struct ConnWriter {
    out: Mutex<Box<dyn Write + Send>>,
    dead: AtomicBool,
}

impl ConnWriter {
    pub fn new(out: Box<dyn Write + Send>) -> ConnWriter {
        ConnWriter {
            out: Mutex::new(out),
            dead: AtomicBool::new(false),
        }
    }

    /// Writes one frame; false once the connection is gone.
    pub fn send(&self, frame: &Frame) -> bool {
        self.send_parts(frame.id, frame.kind, &frame.payload)
    }

    /// Writes one frame from borrowed parts.
    pub fn send_parts(&self, id: u32, kind: Kind, payload: &[u8]) -> bool {
        if self.dead.load(Ordering::Relaxed) {
            return false;
        }
        let bytes = encode_parts(id, kind, payload);
        let mut out = lock(&self.out);
        let ok = out.write_all(&bytes).and_then(|()| out.flush()).is_ok();
        if !ok {
            self.dead.store(true, Ordering::Relaxed);
        }
        ok
    }

    pub fn mark_dead(&self) {
        self.dead.store(true, Ordering::Relaxed);
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }
}

/// Locks a mutex, recovering from a poisoned one: the state behind our
/// locks stays consistent even when a handler panicked while holding one.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The state one request shares with the connection's reader: the credit
/// for sending chunks, whether it was cancelled, and the process group to
/// kill when it is.
#[derive(Default)]
pub struct Flow {
    state: Mutex<FlowState>,
    cv: Condvar,
}

#[derive(Default)]
pub struct FlowState {
    credit: u32,
    cancelled: bool,
    /// The process group of the request's command, while it may be killed.
    pgid: Option<i32>,
    /// Set once the group leader was reaped: its id may then be reused, so
    /// the group must not be signalled any more.
    reaped: bool,
}

/// How waiting for credit ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    Got,
    Cancelled,
    Deadline,
}

impl Flow {
    pub fn new(initial_credit: u32) -> Flow {
        Flow {
            state: Mutex::new(FlowState {
                credit: initial_credit,
                ..FlowState::default()
            }),
            cv: Condvar::new(),
        }
    }

    pub fn add_credit(&self, n: u32) {
        let mut st = lock(&self.state);
        st.credit = st.credit.saturating_add(n);
        self.cv.notify_all();
    }

    /// Stops the request: wakes every wait and kills its process group.
    pub fn cancel(&self) {
        let mut st = lock(&self.state);
        st.cancelled = true;
        kill_group_locked(&st);
        self.cv.notify_all();
    }

    pub fn is_cancelled(&self) -> bool {
        lock(&self.state).cancelled
    }

    /// Takes one unit of credit, waiting for it until `deadline`.
    pub fn take_credit(&self, deadline: Option<Instant>) -> Wait {
        let mut st = lock(&self.state);
        loop {
            if st.cancelled {
                return Wait::Cancelled;
            }
            if st.credit > 0 {
                st.credit -= 1;
                return Wait::Got;
            }
            st = match deadline {
                None => self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Wait::Deadline;
                    }
                    self.cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Registers the process group of the request's command. Returns false
    /// (and kills the group) when the request was already cancelled.
    pub fn set_group(&self, pgid: i32) -> bool {
        let mut st = lock(&self.state);
        st.pgid = Some(pgid);
        st.reaped = false;
        if st.cancelled {
            kill_group_locked(&st);
            return false;
        }
        true
    }

    /// Kills the request's process group with SIGKILL (if not reaped yet).
    pub fn kill_group(&self) {
        kill_group_locked(&lock(&self.state));
    }

    /// Runs `reap` (which reaps the group leader) with no kill in between,
    /// then forgets the group.
    pub fn reap_with<T>(&self, reap: impl FnOnce() -> T) -> T {
        let mut st = lock(&self.state);
        let out = reap();
        st.reaped = true;
        st.pgid = None;
        out
    }
}

fn kill_group_locked(st: &FlowState) {
    if let (Some(pgid), false) = (st.pgid, st.reaped) {
        if pgid > 1 {
            // SAFETY: kill(2) has no memory-safety preconditions; the group
            // leader is not reaped yet, so `pgid` still names our group.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// One request's way of answering: frames go to the connection, chunks
/// wait for credit.
#[derive(Clone)]
pub struct Out {
    pub writer: Arc<ConnWriter>,
    pub flow: Arc<Flow>,
    pub id: u32,
}

/// How sending a chunk ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Sent,
    /// Cancelled or the connection is gone: stop producing.
    Stopped,
    /// The deadline passed while waiting for credit; nothing was sent.
    Deadline,
}

impl Out {
    pub fn send(&self, kind: Kind, payload: &[u8]) -> bool {
        self.writer.send_parts(self.id, kind, payload)
    }

    pub fn chunk(&self, kind: Kind, payload: &[u8], deadline: Option<Instant>) -> Sent {
        match self.flow.take_credit(deadline) {
            Wait::Got => {
                if self.send(kind, payload) {
                    Sent::Sent
                } else {
                    Sent::Stopped
                }
            }
            Wait::Cancelled => Sent::Stopped,
            Wait::Deadline => Sent::Deadline,
        }
    }

    /// Returns credit for `n` chunks the client sent us.
    pub fn credit(&self, n: u32) -> bool {
        self.writer.send(&Frame::credit(self.id, n))
    }
}
