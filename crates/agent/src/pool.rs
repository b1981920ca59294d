//! Reusable request threads. A request runs on a thread of its own (it may
//! block for as long as its command runs), but starting a thread for every
//! request costs more than a short command: finished threads wait a while
//! for the next request instead of exiting, up to `MAX_IDLE` of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

/// Threads kept waiting for work; more than this exit when done.
const MAX_IDLE: usize = 8;

/// How long an idle thread waits for work before it exits, so an agent
/// that served a burst goes back to its small idle footprint.
const IDLE_FOR: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Idle {
    id: u64,
    tx: SyncSender<Job>,
}

/// A set of reusable threads; see the module docs.
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    next_id: AtomicU64,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

impl Pool {
    pub const fn new() -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `job` on an idle thread, or on a new one with `stack` bytes of
    /// stack.
    pub fn run(
        &'static self,
        stack: usize,
        job: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let mut job: Job = Box::new(job);
        // Most recently idle first: its stack is the warmest.
        loop {
            let Some(worker) = self.idle().pop() else {
                break;
            };
            // A thread is taken off the list before it may exit (see
            // `wait`), so a taken one always receives: the send fails only
            // if it died.
            match worker.tx.send(job) {
                Ok(()) => return Ok(()),
                Err(e) => job = e.0,
            }
        }
        std::thread::Builder::new()
            .stack_size(stack)
            .spawn(move || self.work(job))
            .map(|_| ())
    }

    fn work(&self, mut job: Job) {
        loop {
            job();
            match self.wait() {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    /// Offers this thread for the next job; `None` when it should exit.
    fn wait(&self) -> Option<Job> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        {
            let mut list = self.idle();
            if list.len() >= MAX_IDLE {
                return None;
            }
            list.push(Idle { id, tx });
        }
        match rx.recv_timeout(IDLE_FOR) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                let mut list = self.idle();
                if let Some(i) = list.iter().position(|w| w.id == id) {
                    list.swap_remove(i);
                    return None;
                }
                drop(list);
                // Taken off the list by a caller that is sending a job now.
                rx.recv().ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::thread::ThreadId;

    fn on_pool(pool: &'static Pool) -> ThreadId {
        let (tx, rx) = channel();
        pool.run(64 * 1024, move || {
            tx.send(std::thread::current().id()).unwrap()
        })
        .unwrap();
        rx.recv().unwrap()
    }

    #[test]
    fn a_finished_thread_runs_the_next_job() {
        static POOL: Pool = Pool::new();
        let first = on_pool(&POOL);
        // The thread offers itself once its job has returned.
        let mut offered = false;
        for _ in 0..500 {
            if !POOL.idle().is_empty() {
                offered = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(offered, "the thread never offered itself for more work");
        assert_eq!(on_pool(&POOL), first, "the idle thread was not reused");
    }

    #[test]
    fn jobs_issued_at_once_all_run() {
        static POOL: Pool = Pool::new();
        let (tx, rx) = channel();
        for i in 0..100 {
            let tx = tx.clone();
            POOL.run(64 * 1024, move || tx.send(i).unwrap()).unwrap();
        }
        drop(tx);
        let mut got: Vec<i32> = rx.iter().collect();
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }
}
