//! Sliding one-minute windows kept in memory by the control plane: the
//! per-tenant exec rate (`max_exec_per_minute`) and the per-address limit on
//! failed authentication attempts.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stacyvm_core::{Error, Result, TenantId};

const WINDOW: Duration = Duration::from_secs(60);
/// Keys with events in the last minute, at most. Past it a new key is
/// refused until old ones expire: memory stays bounded however many
/// addresses a flood comes from.
const MAX_KEYS: usize = 100_000;

/// Events per key within the last minute.
pub struct SlidingWindow<K> {
    inner: Mutex<Windows<K>>,
}

struct Windows<K> {
    by_key: HashMap<K, VecDeque<Instant>>,
    /// Size at which expired keys are swept next; it grows with the live
    /// keys, so sweeping stays amortised constant per event.
    sweep_at: usize,
}

impl<K> Default for SlidingWindow<K> {
    fn default() -> Self {
        SlidingWindow {
            inner: Mutex::new(Windows {
                by_key: HashMap::new(),
                sweep_at: 1024,
            }),
        }
    }
}

impl<K: Hash + Eq + Clone> SlidingWindow<K> {
    /// `Err(seconds until the oldest event leaves the window)` when `key`
    /// already has `limit` events in the last minute; otherwise records one
    /// event.
    fn admit(&self, key: &K, limit: i64) -> std::result::Result<(), u64> {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let w = &mut *inner;
        if w.by_key.len() >= w.sweep_at {
            w.by_key
                .retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
            w.sweep_at = (w.by_key.len() * 2).max(1024);
        }
        if !w.by_key.contains_key(key) && w.by_key.len() >= MAX_KEYS {
            return Err(WINDOW.as_secs());
        }
        let window = w.by_key.entry(key.clone()).or_default();
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
        window.push_back(now);
        Ok(())
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
            .admit(tenant, limit)
            .map_err(|retry| Error::RateLimited {
                message: format!(
                    "rate limited: max_exec_per_minute is {limit}; retry in {retry} s"
                ),
                retry_after_s: retry,
            })
    }
}

/// Failed authentication attempts per client address (the address
/// `http::client_addr` resolves, so clients behind a trusted proxy are told
/// apart).
#[derive(Default)]
pub struct AuthFailureLimiter {
    window: SlidingWindow<std::net::IpAddr>,
}

impl AuthFailureLimiter {
    /// Counts one failed authentication from `addr`. Past `limit` failures
    /// in the last minute the failure is refused with `RateLimited` (and not
    /// counted, so the window clears a minute after the failures that
    /// filled it). Only failures are ever refused: a valid key from the
    /// same address never comes here.
    pub fn failed(&self, addr: std::net::IpAddr, limit: i64) -> Result<()> {
        self.window
            .admit(&source_of(addr), limit)
            .map_err(|retry| Error::RateLimited {
                message: format!(
                    "too many failed authentication attempts from this address; retry in {retry} s"
                ),
                retry_after_s: retry,
            })
    }
}

/// The unit failures are counted by: an IPv4 address, or the /64 an IPv6
/// address is in (one host commonly holds a whole /64, so counting single
/// IPv6 addresses would let it guess without limit).
fn source_of(addr: std::net::IpAddr) -> std::net::IpAddr {
    match addr.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64)).into()
        }
        v4 => v4,
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
    fn auth_failures_are_refused_after_the_limit_per_address() {
        let l = AuthFailureLimiter::default();
        let a: std::net::IpAddr = "127.0.0.9".parse().unwrap();
        let b: std::net::IpAddr = "127.0.0.10".parse().unwrap();
        for _ in 0..2 {
            l.failed(a, 2).unwrap();
        }
        for _ in 0..3 {
            match l.failed(a, 2) {
                Err(Error::RateLimited { retry_after_s, .. }) => {
                    assert!((1..=60).contains(&retry_after_s))
                }
                other => panic!("expected rate limit, got {other:?}"),
            }
        }
        l.failed(b, 2).unwrap();
    }

    #[test]
    fn ipv6_failures_count_per_64() {
        let l = AuthFailureLimiter::default();
        let one: std::net::IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: std::net::IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.failed(one, 1).unwrap();
        assert!(l.failed(same_64, 1).is_err());
        l.failed(other_64, 1).unwrap();
    }

    #[test]
    fn the_window_forgets_expired_keys_and_stays_bounded() {
        let w: SlidingWindow<u32> = SlidingWindow::default();
        for k in 0..MAX_KEYS as u32 {
            w.admit(&k, 5).unwrap();
        }
        // Full of live keys: a new one is refused, a known one still counts.
        assert!(w.admit(&u32::MAX, 5).is_err());
        w.admit(&0, 5).unwrap();
    }
}
