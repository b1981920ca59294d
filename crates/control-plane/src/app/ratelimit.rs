//! The per-tenant exec rate limit (`max_exec_per_minute`): a sliding
//! one-minute window kept in memory by the control plane.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stacyvm_core::{Error, Result, TenantId};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct ExecLimiter {
    windows: Mutex<HashMap<TenantId, VecDeque<Instant>>>,
}

impl ExecLimiter {
    /// Takes one exec from the tenant's budget, or refuses with
    /// `RateLimited` saying when the next one will be allowed.
    pub fn acquire(&self, tenant: &TenantId, per_minute: Option<i64>) -> Result<()> {
        let Some(limit) = per_minute else {
            return Ok(());
        };
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let window = windows.entry(tenant.clone()).or_default();
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
            return Err(Error::RateLimited {
                message: format!(
                    "rate limited: max_exec_per_minute is {limit}; retry in {retry} s"
                ),
                retry_after_s: retry,
            });
        }
        window.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_admits_up_to_the_limit() {
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
}
