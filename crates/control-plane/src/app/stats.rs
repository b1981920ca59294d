//! Resource use of sandboxes over time. A reading comes from the sandbox's
//! provider through its worker (`Worker::stats`); CPU use is a counter, so
//! a percentage needs two readings, and this control plane keeps a short
//! series per sandbox: read when someone asks, and every few seconds
//! after that for as long as someone keeps asking. A sandbox nobody asked
//! about for a while, and every sandbox that ended, has no series.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stacyvm_core::{now, Error, Result, SandboxId, SandboxState};
use stacyvm_provider::RuntimeStats;
use stacyvm_store::SandboxRecord;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{App, Principal};

/// Readings kept per sandbox: ten minutes at the sampler's pace.
const RING: usize = 120;
/// How often the sampler reads a watched sandbox.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How long a sandbox stays watched after it was last asked about.
const WATCH_FOR: Duration = Duration::from_secs(600);
/// A reading this young answers a request without a new one.
const FRESH: Duration = Duration::from_secs(1);
/// Sandboxes watched at once; past it the one asked about longest ago goes.
const MAX_WATCHED: usize = 10_000;

/// One reading with the CPU percentage it implies.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsSample {
    pub at: OffsetDateTime,
    pub stats: RuntimeStats,
    /// Percent of the sandbox's CPUs used since the reading before (since
    /// the sandbox started, for its first reading); `None` when the
    /// provider does not count CPU time.
    pub cpu_used_pct: Option<f64>,
}

struct Series {
    samples: VecDeque<StatsSample>,
    asked: Instant,
    /// When the sandbox started, the baseline of its first reading.
    started: OffsetDateTime,
}

/// The series of the sandboxes being watched.
#[derive(Default)]
pub struct StatsBook {
    series: Mutex<HashMap<SandboxId, Series>>,
}

impl StatsBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Series>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the sandbox asked about now; true when its newest reading is
    /// still fresh.
    fn ask(&self, rec: &SandboxRecord) -> bool {
        let mut book = self.lock();
        if !book.contains_key(&rec.id) && book.len() >= MAX_WATCHED {
            if let Some(oldest) = book
                .iter()
                .min_by_key(|(_, s)| s.asked)
                .map(|(id, _)| id.clone())
            {
                book.remove(&oldest);
            }
        }
        let s = book.entry(rec.id.clone()).or_insert_with(|| Series {
            samples: VecDeque::new(),
            asked: Instant::now(),
            started: rec.started_at.unwrap_or(rec.created_at),
        });
        s.asked = Instant::now();
        s.samples.back().is_some_and(|last| now() - last.at < FRESH)
    }

    fn record(&self, id: &SandboxId, at: OffsetDateTime, stats: RuntimeStats) {
        let mut book = self.lock();
        // Forgotten meanwhile (destroyed): nothing is kept for it.
        let Some(s) = book.get_mut(id) else { return };
        let (since, before) = match s.samples.back() {
            Some(prev) => (prev.at, prev.stats.cpu_time_ns),
            None => (s.started, Some(0)),
        };
        let cpu_used_pct = cpu_percent(before, since, &stats, at);
        if s.samples.len() >= RING {
            s.samples.pop_front();
        }
        s.samples.push_back(StatsSample {
            at,
            stats,
            cpu_used_pct,
        });
    }

    fn samples(
        &self,
        id: &SandboxId,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Vec<StatsSample> {
        let book = self.lock();
        book.get(id)
            .map(|s| {
                s.samples
                    .iter()
                    .filter(|x| from.is_none_or(|f| x.at >= f) && to.is_none_or(|t| x.at <= t))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops the sandbox's series.
    pub fn forget(&self, id: &SandboxId) {
        self.lock().remove(id);
    }

    /// The sandboxes asked about recently; the others are dropped.
    fn watched(&self) -> Vec<SandboxId> {
        let mut book = self.lock();
        book.retain(|_, s| s.asked.elapsed() < WATCH_FOR);
        book.keys().cloned().collect()
    }
}

/// Percent of the sandbox's CPUs its processes used between two readings.
fn cpu_percent(
    before_ns: Option<u64>,
    since: OffsetDateTime,
    now_stats: &RuntimeStats,
    at: OffsetDateTime,
) -> Option<f64> {
    let used = now_stats.cpu_time_ns?.checked_sub(before_ns?)? as f64;
    let cpus = now_stats.cpu_count.filter(|c| *c > 0.0)?;
    let wall = (at - since).whole_nanoseconds() as f64;
    if wall <= 0.0 {
        return None;
    }
    Some((used / (wall * cpus) * 100.0).clamp(0.0, 100.0))
}

/// What a stats request gets: the readings in its range, and why no new
/// one could be taken when none could.
pub struct StatsAnswer {
    pub samples: Vec<StatsSample>,
    pub unavailable: Option<Error>,
}

impl App {
    /// The readings of a sandbox the caller may see between `from` and `to`
    /// (inclusive), after taking a new one unless the newest is fresh. The
    /// sandbox must be running or paused. A reading that fails is reported
    /// beside the readings there are.
    pub async fn sandbox_stats(
        &self,
        who: &Principal,
        id: &str,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<StatsAnswer> {
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                return Err(Error::InvalidRequest(
                    "the start of the range is after its end".into(),
                ));
            }
        }
        let rec = self.sandbox_visible(who, id).await?;
        if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}: only a running or paused sandbox is measured",
                rec.id, rec.state
            )));
        }
        let fresh = self.stats_book.ask(&rec);
        let unavailable = if fresh {
            None
        } else {
            self.stats_read(&rec).await.err()
        };
        if matches!(unavailable, Some(Error::Unsupported(_))) {
            self.stats_book.forget(&rec.id);
        }
        Ok(StatsAnswer {
            samples: self.stats_book.samples(&rec.id, from, to),
            unavailable,
        })
    }

    async fn stats_read(&self, rec: &SandboxRecord) -> Result<()> {
        let (worker, lease) = self.lease_of(rec).await?;
        let stats = worker.stats(&lease).await?;
        self.stats_book.record(&rec.id, now(), stats);
        Ok(())
    }

    /// One pass of the sampler over the watched sandboxes.
    async fn stats_sample(&self) {
        for id in self.stats_book.watched() {
            let rec = match self.store.sandbox_get(&id).await {
                Ok(Some(rec)) => rec,
                Ok(None) => {
                    self.stats_book.forget(&id);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(sandbox = %id, error = %e, "stats sampler: store unreachable");
                    return;
                }
            };
            if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
                self.stats_book.forget(&id);
                continue;
            }
            match self.stats_read(&rec).await {
                Ok(()) => {}
                Err(Error::NotFound(_) | Error::Unsupported(_)) => self.stats_book.forget(&id),
                Err(e) => tracing::debug!(sandbox = %id, error = %e, "stats sampler: no reading"),
            }
        }
    }
}

/// Samples the watched sandboxes every [`SAMPLE_EVERY`] until `stop`.
pub fn spawn_sampler(
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            app.stats_sample().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_is_time_used_over_time_available() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let t1 = t0 + Duration::from_secs(2);
        let s = |ns, cpus| RuntimeStats {
            cpu_time_ns: Some(ns),
            cpu_count: Some(cpus),
            ..Default::default()
        };
        // One CPU busy for 1 s of 2 s on a 1-CPU sandbox: 50 %.
        assert_eq!(
            cpu_percent(Some(0), t0, &s(1_000_000_000, 1.0), t1),
            Some(50.0)
        );
        // The same on 2 CPUs: 25 %.
        assert_eq!(
            cpu_percent(Some(0), t0, &s(1_000_000_000, 2.0), t1),
            Some(25.0)
        );
        // A counter that went back (a restarted runtime) or no time passed.
        assert_eq!(cpu_percent(Some(5), t0, &s(1, 1.0), t1), None);
        assert_eq!(cpu_percent(Some(0), t1, &s(1, 1.0), t1), None);
        assert_eq!(cpu_percent(None, t0, &s(1, 1.0), t1), None);
        // Never above 100 % (clock skew between readings).
        assert_eq!(
            cpu_percent(Some(0), t0, &s(9_000_000_000, 1.0), t1),
            Some(100.0)
        );
    }
}
