//! Sliding one-minute windows kept in memory by the control plane: the
//! per-tenant exec rate (`max_exec_per_minute`) and the per-address limit on
//! failed authentication attempts.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stacyvm_core::{Error, Result, TenantId};

const WINDOW: Duration = Duration::from_secs(60);

/// Events per key within the last minute.
pub struct SlidingWindow<K> {
    windows: Mutex<HashMap<K, VecDeque<Instant>>>,
}

impl<K> Default for SlidingWindow<K> {
    fn default() -> Self {
        SlidingWindow {
            windows: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> SlidingWindow<K> {
    /// `Err(seconds until the oldest event leaves the window)` when `key`
    /// already has `limit` events in the last minute; otherwise records one
    /// event when `record` is set.
    fn admit(&self, key: &K, limit: i64, record: bool) -> std::result::Result<(), u64> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        // Forget keys whose window emptied, so the map does not grow forever.
        if windows.len() > 10_000 {
            windows.retain(|_, w| w.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
        }
        let window = windows.entry(key.clone()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            window.pop_front();
        }
        if limit <= 0 || window.len() as i64 >= limit {
            let retry = window
                .front()
                .map(|t| {
                    WINDOW
                        .saturating_sub(now.duration_since(*t))
                        .as_secs()
                        .max(1)
                })
                .unwrap_or(60);
            return Err(retry);
        }
        if record {
            window.push_back(now);
        }
        Ok(())
    }

    /// Records one event for `key`.
    pub fn record(&self, key: &K) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows
            .entry(key.clone())
            .or_default()
            .push_back(Instant::now());
    }
}

/// The per-tenant exec budget.
#[derive(Default)]
pub struct ExecLimiter {
    window: SlidingWindow<TenantId>,
}

impl ExecLimiter {
    /// Takes one exec from the tenant's budget, or refuses with
    /// `RateLimited` saying when the next one will be allowed.
    pub fn acquire(&self, tenant: &TenantId, per_minute: Option<i64>) -> Result<()> {
        let Some(limit) = per_minute else {
            return Ok(());
        };
        self.window
            .admit(tenant, limit, true)
            .map_err(|retry| Error::RateLimited {
                message: format!(
                    "rate limited: max_exec_per_minute is {limit}; retry in {retry} s"
                ),
                retry_after_s: retry,
            })
    }
}

/// Failed authentication attempts per client address.
#[derive(Default)]
pub struct AuthFailureLimiter {
    window: SlidingWindow<std::net::IpAddr>,
}

impl AuthFailureLimiter {
    /// Refuses an address that failed authentication `limit` times in the
    /// last minute, before its key is even looked at.
    pub fn check(&self, addr: std::net::IpAddr, limit: i64) -> Result<()> {
        self.window
            .admit(&addr, limit, false)
            .map_err(|retry| Error::RateLimited {
                message: format!(
                    "too many failed authentication attempts from this address; retry in {retry} s"
                ),
                retry_after_s: retry,
            })
    }

    pub fn failed(&self, addr: std::net::IpAddr) {
        self.window.record(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exec_window_admits_up_to_the_limit() {
        let l = ExecLimiter::default();
        let t = TenantId::generate();
        for _ in 0..3 {
            l.acquire(&t, Some(3)).unwrap();
        }
        match l.acquire(&t, Some(3)) {
            Err(Error::RateLimited { retry_after_s, .. }) => {
                assert!((1..=60).contains(&retry_after_s))
            }
            other => panic!("expected rate limit, got {other:?}"),
        }
        // Another tenant has its own budget; no limit means no window.
        l.acquire(&TenantId::generate(), Some(1)).unwrap();
        l.acquire(&t, None).unwrap();
    }

    #[test]
    fn auth_failures_block_an_address_after_the_limit() {
        let l = AuthFailureLimiter::default();
        let a: std::net::IpAddr = "127.0.0.9".parse().unwrap();
        let b: std::net::IpAddr = "127.0.0.10".parse().unwrap();
        for _ in 0..2 {
            l.check(a, 2).unwrap();
            l.failed(a);
        }
        assert!(matches!(l.check(a, 2), Err(Error::RateLimited { .. })));
        l.check(b, 2).unwrap();
    }
}
