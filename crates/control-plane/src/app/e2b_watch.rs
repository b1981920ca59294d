//! Directory watches of the E2B-compatible envd API, through the sandbox's
//! agent (protocol 2).
//!
//! A streaming watch (`WatchDir`) lives as long as its request. A watcher
//! (`CreateWatcher`) outlives its request: a task of this control plane
//! keeps its events until `GetWatcherEvents` takes them, and `RemoveWatcher`
//! stops it. Both are bounded: a sandbox has at most
//! [`MAX_WATCHES_PER_SANDBOX`] at once, a watcher keeps at most
//! [`MAX_PENDING_EVENTS`] events (past that it fails instead of dropping
//! some), and one nobody asked for events for [`WATCHER_IDLE`] is removed
//! when the sandbox next makes a watch. Everything goes with the sandbox: a
//! destroy forgets its watches, and a lost agent connection ends them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use stacyvm_core::{Error, Result, SandboxId};
use stacyvm_provider::agent_client::{WatchStream, WatchSync, WatchUpdate};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use stacyvm_provider::agent_client::{WatchEvent, WatchKind};

use super::{App, Principal};

/// Watches (streaming or not) one sandbox may have at once. Each is an
/// inotify instance in the sandbox, and the kernel counts those per user
/// (128 by default), across every container running as that user.
pub const MAX_WATCHES_PER_SANDBOX: usize = 32;
/// Events a watcher keeps for `GetWatcherEvents`.
pub const MAX_PENDING_EVENTS: usize = 10_000;
/// Bytes of event names a watcher keeps for `GetWatcherEvents`.
const MAX_PENDING_BYTES: usize = 8 << 20;
/// How long a watcher nobody reads lives on.
pub const WATCHER_IDLE: Duration = Duration::from_secs(600);
/// How long `GetWatcherEvents` waits for the agent to answer its sync
/// before it answers with what has come.
const SYNC_WAIT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a watcher's watch ended.
enum End {
    /// The watched directory was removed or moved away: nothing more comes.
    Gone,
    /// The watch failed (the sandbox went, too many events waited).
    Failed(Error),
}

struct Pending {
    events: VecDeque<WatchEvent>,
    bytes: usize,
    /// Syncs the agent answered.
    synced: u64,
    end: Option<End>,
    last_read: Instant,
}

struct Watcher {
    pending: Mutex<Pending>,
    changed: Notify,
    sync: WatchSync,
    /// Syncs sent; held while sending, so the numbers follow the order the
    /// agent sees them in.
    sent: tokio::sync::Mutex<u64>,
    stop: CancellationToken,
    /// The watched directory, when its events carry their entries.
    entries_under: Option<String>,
    _slot: Slot,
}

#[derive(Default)]
struct SandboxWatches {
    /// Watches holding a place, streaming or not (and those being made).
    active: usize,
    watchers: HashMap<String, Arc<Watcher>>,
    /// Cancelled when the sandbox is forgotten: streaming watches end.
    gone: CancellationToken,
}

/// The watches this control plane holds for envd, per sandbox.
#[derive(Default)]
pub struct EnvdWatches {
    table: Mutex<HashMap<SandboxId, SandboxWatches>>,
}

/// A sandbox's place for one watch, given back when dropped. Dropping one
/// takes the table's lock, so nothing that holds a slot (a [`Watcher`]) may
/// be dropped while that lock is held: the lock is not reentrant, and the
/// thread would wait on itself with every later watch call queued behind.
struct Slot {
    table: Arc<EnvdWatches>,
    sandbox: SandboxId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = lock(&self.table.table);
        if let Some(s) = table.get_mut(&self.sandbox) {
            s.active = s.active.saturating_sub(1);
            if s.active == 0 && s.watchers.is_empty() {
                table.remove(&self.sandbox);
            }
        }
    }
}

impl EnvdWatches {
    /// Takes a place for a watch of `sandbox`, first removing its watchers
    /// nobody read for [`WATCHER_IDLE`]. Also answers the token that ends
    /// the sandbox's watches when it is forgotten.
    fn take_slot(self: &Arc<Self>, sandbox: &SandboxId) -> Result<(Slot, CancellationToken)> {
        // Declared before the guard, so dropped after it: the last handle
        // of a watcher gives its slot back, which takes the table's lock.
        let mut idle_watchers = Vec::new();
        let mut table = lock(&self.table);
        let s = table.entry(sandbox.clone()).or_default();
        s.watchers.retain(|_, w| {
            let idle = lock(&w.pending).last_read.elapsed() >= WATCHER_IDLE;
            if idle {
                w.stop.cancel();
                idle_watchers.push(w.clone());
            }
            !idle
        });
        // A removed watcher gives its place back once its task has seen
        // the stop, a moment later.
        if s.active >= MAX_WATCHES_PER_SANDBOX {
            return Err(Error::RateLimited {
                message: format!(
                    "sandbox {sandbox} already has {MAX_WATCHES_PER_SANDBOX} directory watches; \
                     stop one first"
                ),
                retry_after_s: 1,
            });
        }
        s.active += 1;
        Ok((
            Slot {
                table: self.clone(),
                sandbox: sandbox.clone(),
            },
            s.gone.clone(),
        ))
    }

    fn find(&self, sandbox: &SandboxId, id: &str) -> Result<Arc<Watcher>> {
        lock(&self.table)
            .get(sandbox)
            .and_then(|s| s.watchers.get(id).cloned())
            .ok_or_else(|| Error::NotFound(format!("watcher {id} not found")))
    }

    fn remove(&self, sandbox: &SandboxId, id: &str) -> Option<Arc<Watcher>> {
        let w = {
            let mut table = lock(&self.table);
            table.get_mut(sandbox).and_then(|s| s.watchers.remove(id))
        };
        if let Some(w) = &w {
            w.stop.cancel();
        }
        w
    }

    /// Ends every watch of `sandbox` (it is being destroyed).
    pub fn forget(&self, sandbox: &SandboxId) {
        // The entry leaves the table before its watchers are dropped: a
        // watcher whose task has already ended is held only here, and
        // dropping it gives its slot back, which takes the table's lock.
        let removed = lock(&self.table).remove(sandbox);
        if let Some(s) = removed {
            s.gone.cancel();
            for w in s.watchers.values() {
                w.stop.cancel();
            }
        }
    }

    /// How many watches `sandbox` holds (streaming or not).
    pub fn count(&self, sandbox: &SandboxId) -> usize {
        lock(&self.table).get(sandbox).map_or(0, |s| s.active)
    }
}

/// A streaming watch in place.
pub struct DirWatch {
    /// The watch's updates; dropping them stops it.
    pub events: WatchStream,
    /// Cancelled when the sandbox is destroyed.
    pub gone: CancellationToken,
    sync: WatchSync,
    slot: Slot,
}

impl App {
    /// Watches the directory `path` of `sandbox` (see `AgentClient::watch`).
    pub async fn e2b_watch_dir(
        &self,
        who: &Principal,
        sandbox: &str,
        path: &str,
        recursive: bool,
    ) -> Result<DirWatch> {
        let path = stacyvm_core::validate_sandbox_path(path)?;
        let (rec, worker, lease) = self.running(who, sandbox).await?;
        let (slot, gone) = self.e2b_watches.take_slot(&rec.id)?;
        let agent = super::sandboxes::agent(&worker, &lease).await?;
        let watch = agent.watch(&path, recursive).await?;
        Ok(DirWatch {
            events: watch.events,
            gone,
            sync: watch.sync,
            slot,
        })
    }

    /// Starts a watcher of the directory `path`; its events wait for
    /// [`App::e2b_watcher_events`]. Answers its id.
    pub async fn e2b_watcher_create(
        &self,
        who: &Principal,
        sandbox: &str,
        path: &str,
        recursive: bool,
        include_entry: bool,
    ) -> Result<String> {
        let dir = self.e2b_watch_dir(who, sandbox, path, recursive).await?;
        let sandbox_id = dir.slot.sandbox.clone();
        let DirWatch {
            events,
            gone,
            sync,
            slot,
        } = dir;
        let mut raw = [0u8; 16];
        rand::fill(&mut raw);
        let id = hex::encode(raw);
        let w = Arc::new(Watcher {
            pending: Mutex::new(Pending {
                events: VecDeque::new(),
                bytes: 0,
                synced: 0,
                end: None,
                last_read: Instant::now(),
            }),
            changed: Notify::new(),
            sync,
            sent: tokio::sync::Mutex::new(0),
            stop: gone.child_token(),
            entries_under: include_entry.then(|| path.to_owned()),
            _slot: slot,
        });
        let replaced = lock(&self.e2b_watches.table)
            .entry(sandbox_id)
            .or_default()
            .watchers
            .insert(id.clone(), w.clone());
        // Ids are random, so nothing is replaced; were one, it is dropped
        // here, with the table's lock released (see `forget`).
        drop(replaced);
        tokio::spawn(keep_events(w, events));
        Ok(id)
    }

    /// The events of watcher `id` since the last call: every event of a
    /// change made before this call (the agent is synced first). A watcher
    /// whose watch failed answers its events, then its error. With them,
    /// the watched directory when the watcher was asked for entries.
    pub async fn e2b_watcher_events(
        &self,
        who: &Principal,
        sandbox: &str,
        id: &str,
    ) -> Result<(Vec<WatchEvent>, Option<String>)> {
        let (rec, _, _) = self.running(who, sandbox).await?;
        let w = self.e2b_watches.find(&rec.id, id)?;
        lock(&w.pending).last_read = Instant::now();
        let ended = lock(&w.pending).end.is_some();
        if !ended {
            let ticket = {
                let mut sent = w.sent.lock().await;
                // A sync that cannot be sent means the watch is failing:
                // its task records why.
                if w.sync.sync().await.is_ok() {
                    *sent += 1;
                }
                *sent
            };
            let _ = tokio::time::timeout(SYNC_WAIT, async {
                loop {
                    let notified = w.changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    {
                        let p = lock(&w.pending);
                        if p.synced >= ticket || p.end.is_some() {
                            return;
                        }
                    }
                    notified.await;
                }
            })
            .await;
        }
        let mut p = lock(&w.pending);
        let events: Vec<WatchEvent> = p.events.drain(..).collect();
        p.bytes = 0;
        // Its error comes once the events before it are taken, and stays
        // until the watcher is removed: a retried poll reads the same.
        if let (true, Some(End::Failed(e))) = (events.is_empty(), &p.end) {
            return Err(e.clone());
        }
        Ok((events, w.entries_under.clone()))
    }

    /// Stops watcher `id` and forgets it.
    pub async fn e2b_watcher_remove(&self, who: &Principal, sandbox: &str, id: &str) -> Result<()> {
        let (rec, _, _) = self.running(who, sandbox).await?;
        self.e2b_watches
            .remove(&rec.id, id)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(format!("watcher {id} not found")))
    }

    /// Ends every envd watch of a sandbox that is going away.
    pub(super) fn e2b_forget_watches(&self, sandbox: &SandboxId) {
        self.e2b_watches.forget(sandbox);
    }
}

/// Keeps a watcher's events until they are taken, and counts the answered
/// syncs, until the watch ends or the watcher is stopped.
async fn keep_events(w: Arc<Watcher>, mut events: WatchStream) {
    let end = loop {
        let next = tokio::select! {
            _ = w.stop.cancelled() => break None,
            next = events.next() => next,
        };
        let mut p = lock(&w.pending);
        match next {
            Some(Ok(WatchUpdate::Events(batch))) => {
                for ev in batch {
                    p.bytes += ev.name.len();
                    p.events.push_back(ev);
                }
                if p.events.len() > MAX_PENDING_EVENTS || p.bytes > MAX_PENDING_BYTES {
                    p.events.clear();
                    p.bytes = 0;
                    break Some(End::Failed(Error::ResourceExhausted(format!(
                        "more than {MAX_PENDING_EVENTS} events waited for GetWatcherEvents, so \
                         the watcher stopped and its events were dropped: read events more \
                         often, or watch a smaller tree"
                    ))));
                }
            }
            Some(Ok(WatchUpdate::Synced)) => p.synced += 1,
            Some(Err(e)) => break Some(End::Failed(e)),
            None => break Some(End::Gone),
        }
        drop(p);
        w.changed.notify_waiters();
    };
    // The watch stops here (the stream is dropped) whatever ended it.
    drop(events);
    if let Some(end) = end {
        lock(&w.pending).end = Some(end);
    }
    w.changed.notify_waiters();
}
