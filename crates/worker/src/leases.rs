//! A remote worker's own record of the leases it holds: which sandboxes it
//! may act on, until when, and the highest fencing token seen for each.
//!
//! The control plane's store is the authority; this table is the worker's
//! copy, renewed by heartbeat replies. It lets the worker refuse a stale
//! holder on its own (a control plane that lost the sandbox to another
//! claim) and stop acting on its sandboxes once it has been cut off from the
//! control plane for longer than a lease lasts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use stacyvm_api::workers::LeaseGrant;
use stacyvm_core::{Error, Result, SandboxId};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Lease;

/// One lease the worker holds.
#[derive(Debug)]
struct Held {
    token: i64,
    provider: String,
    /// When the worker learnt of it: a heartbeat reply only speaks for the
    /// leases granted before its heartbeat was sent.
    granted_at: Instant,
    expires_at: Instant,
    paused: bool,
    /// Cancelled when the lease goes: closes the agent tunnels opened
    /// under it.
    revoked: CancellationToken,
}

#[derive(Debug)]
struct Tables {
    held: HashMap<SandboxId, Held>,
    /// The highest token seen per sandbox, kept after the lease goes, so a
    /// holder that lost the sandbox stays refused.
    fences: HashMap<SandboxId, i64>,
    ttl: Duration,
}

/// A lease the worker holds, as its heartbeat reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLease {
    pub sandbox_id: SandboxId,
    pub provider: String,
    pub fencing_token: i64,
    pub paused: bool,
}

/// The leases of one worker. Every method is safe to call concurrently.
#[derive(Debug)]
pub struct LeaseTable {
    tables: Mutex<Tables>,
    /// Wakes the heartbeat loop when an operation met a lapsed lease.
    renew_wanted: Notify,
    /// Counts the answers applied, for operations waiting on a renewal.
    renewed: watch::Sender<u64>,
}

/// How long an operation on a lapsed lease waits for the heartbeat it
/// asked for.
const RENEW_WAIT: Duration = Duration::from_secs(2);

impl LeaseTable {
    /// An empty table whose new leases last `ttl` until a heartbeat reply
    /// renews them.
    pub fn new(ttl: Duration) -> LeaseTable {
        LeaseTable {
            tables: Mutex::new(Tables {
                held: HashMap::new(),
                fences: HashMap::new(),
                ttl,
            }),
            renew_wanted: Notify::new(),
            renewed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses a token below the highest seen for the sandbox and records a
    /// higher one. The overriding token (`i64::MAX`, for destroying what
    /// nobody owns) passes without becoming the fence.
    fn fence(tables: &mut Tables, lease: &Lease) -> Result<()> {
        let seen = tables.fences.get(&lease.sandbox_id).copied().unwrap_or(0);
        if lease.fencing_token < seen {
            return Err(Error::Conflict(format!(
                "stale lease on sandbox {}: fencing token {} is older than {seen}",
                lease.sandbox_id, lease.fencing_token
            )));
        }
        if lease.fencing_token != i64::MAX {
            tables
                .fences
                .insert(lease.sandbox_id.clone(), lease.fencing_token);
        }
        Ok(())
    }

    /// Admits an operation (pause, resume, logs, the agent) under `lease`:
    /// the token is current and the worker holds an unexpired lease on the
    /// sandbox. Returns what is cancelled when the lease goes.
    pub fn admit(&self, lease: &Lease) -> Result<CancellationToken> {
        self.admit_now(lease).map_err(|(e, _)| e)
    }

    /// Like [`LeaseTable::admit`], but a lease that lapsed while the
    /// control plane was away gets one chance: the worker heartbeats at
    /// once (a control plane calling is likely back) and, when the answer
    /// renews the lease within a moment, the operation goes ahead.
    pub async fn admit_renewing(&self, lease: &Lease) -> Result<CancellationToken> {
        let mut renewed = self.renewed.subscribe();
        match self.admit_now(lease) {
            Err((_, true)) => {
                self.renew_wanted.notify_one();
                let _ = tokio::time::timeout(RENEW_WAIT, renewed.changed()).await;
                self.admit(lease)
            }
            other => other.map_err(|(e, _)| e),
        }
    }

    /// Resolves when an operation wants the leases renewed now.
    pub async fn renewal_wanted(&self) {
        self.renew_wanted.notified().await;
    }

    /// The admission; a refusal says whether it was for a lapsed lease.
    fn admit_now(&self, lease: &Lease) -> std::result::Result<CancellationToken, (Error, bool)> {
        let mut t = self.lock();
        Self::fence(&mut t, lease).map_err(|e| (e, false))?;
        let now = Instant::now();
        match t.held.get_mut(&lease.sandbox_id) {
            Some(h) if h.expires_at > now => {
                if lease.fencing_token > h.token && lease.fencing_token != i64::MAX {
                    // A newer holder: what the older one opened closes.
                    h.revoked.cancel();
                    h.revoked = CancellationToken::new();
                    h.token = lease.fencing_token;
                }
                Ok(h.revoked.clone())
            }
            Some(_) => Err((
                Error::Conflict(format!(
                    "this worker's lease on sandbox {} has expired: it has not heard from the \
                     control plane in time, so it no longer acts on the sandbox",
                    lease.sandbox_id
                )),
                true,
            )),
            None => Err((
                Error::Conflict(format!(
                    "this worker holds no lease on sandbox {}",
                    lease.sandbox_id
                )),
                false,
            )),
        }
    }

    /// Admits a spawn and installs its lease (a spawn is how a worker
    /// learns of a new sandbox before the next heartbeat reply).
    pub fn admit_spawn(&self, lease: &Lease) -> Result<()> {
        let mut t = self.lock();
        Self::fence(&mut t, lease)?;
        let now = Instant::now();
        let held = Held {
            token: lease.fencing_token,
            provider: lease.provider.clone(),
            granted_at: now,
            expires_at: now + t.ttl,
            paused: false,
            revoked: CancellationToken::new(),
        };
        if let Some(old) = t.held.insert(lease.sandbox_id.clone(), held) {
            if old.token < lease.fencing_token {
                old.revoked.cancel();
            }
        }
        Ok(())
    }

    /// Admits a destroy: only the token is checked, because destroying is
    /// also how a sandbox whose lease lapsed is cleaned up.
    pub fn admit_destroy(&self, lease: &Lease) -> Result<()> {
        Self::fence(&mut self.lock(), lease)
    }

    /// The sandbox is gone (destroyed, or its spawn failed): forget its
    /// lease and close its tunnels.
    pub fn release(&self, lease: &Lease) {
        let mut t = self.lock();
        let ours = t
            .held
            .get(&lease.sandbox_id)
            .is_some_and(|h| h.token <= lease.fencing_token);
        if ours {
            if let Some(h) = t.held.remove(&lease.sandbox_id) {
                h.revoked.cancel();
            }
        }
    }

    /// Records that the sandbox was paused or resumed (for the heartbeat).
    pub fn set_paused(&self, id: &SandboxId, paused: bool) {
        if let Some(h) = self.lock().held.get_mut(id) {
            h.paused = paused;
        }
    }

    /// Applies the control plane's list of the leases this worker holds,
    /// from the answer to a registration or heartbeat sent at `sent_at`.
    /// Leases granted before `sent_at` are replaced by the list (renewed
    /// until `sent_at + ttl`, or dropped when absent); later ones (a spawn
    /// the reply could not know of) are kept.
    pub fn apply(&self, sent_at: Instant, grants: &[LeaseGrant], ttl: Duration) {
        self.apply_locked(sent_at, grants, ttl);
        self.renewed.send_modify(|n| *n += 1);
    }

    fn apply_locked(&self, sent_at: Instant, grants: &[LeaseGrant], ttl: Duration) {
        let mut t = self.lock();
        t.ttl = ttl;
        let mut listed: HashMap<SandboxId, &LeaseGrant> = HashMap::new();
        for g in grants {
            listed.insert(SandboxId::from_trusted(g.sandbox_id.clone()), g);
        }
        let dropped: Vec<SandboxId> = t
            .held
            .iter()
            .filter(|(id, h)| h.granted_at < sent_at && !listed.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in dropped {
            if let Some(h) = t.held.remove(&id) {
                h.revoked.cancel();
            }
        }
        for (id, g) in listed {
            let fence = t.fences.entry(id.clone()).or_insert(0);
            *fence = (*fence).max(g.fencing_token);
            match t.held.get_mut(&id) {
                Some(h) => {
                    if g.fencing_token > h.token {
                        // The sandbox changed hands and came back: whatever
                        // was opened under the old token is not ours.
                        h.revoked.cancel();
                        h.revoked = CancellationToken::new();
                        h.token = g.fencing_token;
                    }
                    if g.fencing_token >= h.token {
                        h.provider = g.provider.clone();
                        h.expires_at = h.expires_at.max(sent_at + ttl);
                    }
                }
                None => {
                    t.held.insert(
                        id,
                        Held {
                            token: g.fencing_token,
                            provider: g.provider.clone(),
                            granted_at: sent_at,
                            expires_at: sent_at + ttl,
                            paused: false,
                            revoked: CancellationToken::new(),
                        },
                    );
                }
            }
        }
    }

    /// When the lease on `id` under `token` lapses unless renewed; `None`
    /// when the worker no longer holds it under that token.
    pub fn expiry(&self, id: &SandboxId, token: i64) -> Option<Instant> {
        self.lock()
            .held
            .get(id)
            .filter(|h| h.token <= token)
            .map(|h| h.expires_at)
    }

    /// The lease held on `id`, expired or not.
    pub fn get(&self, id: &SandboxId) -> Option<HeldLease> {
        self.lock().held.get(id).map(|h| HeldLease {
            sandbox_id: id.clone(),
            provider: h.provider.clone(),
            fencing_token: h.token,
            paused: h.paused,
        })
    }

    /// Every lease held, expired or not.
    pub fn all(&self) -> Vec<HeldLease> {
        let t = self.lock();
        t.held
            .iter()
            .map(|(id, h)| HeldLease {
                sandbox_id: id.clone(),
                provider: h.provider.clone(),
                fencing_token: h.token,
                paused: h.paused,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, token: i64) -> Lease {
        Lease::new(&SandboxId::from_trusted(id), token, "docker")
    }

    fn grant(id: &str, token: i64) -> LeaseGrant {
        LeaseGrant {
            sandbox_id: id.into(),
            provider: "docker".into(),
            fencing_token: token,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stale_tokens_and_missing_or_expired_leases_are_refused() {
        let t = LeaseTable::new(Duration::from_secs(10));
        // Nothing held: refused, but a destroy with a token passes.
        assert!(matches!(
            t.admit(&lease("sb_a", 1)),
            Err(Error::Conflict(_))
        ));
        t.admit_destroy(&lease("sb_a", 1)).unwrap();
        t.admit_spawn(&lease("sb_a", 2)).unwrap();
        let tunnel = t.admit(&lease("sb_a", 2)).unwrap();
        // An older holder is refused for everything.
        assert!(matches!(
            t.admit(&lease("sb_a", 1)),
            Err(Error::Conflict(_))
        ));
        assert!(t.admit_destroy(&lease("sb_a", 1)).is_err());
        assert!(t.admit_spawn(&lease("sb_a", 1)).is_err());
        // A newer claim closes what the old one opened.
        t.admit_spawn(&lease("sb_a", 3)).unwrap();
        assert!(tunnel.is_cancelled());
        assert!(t.admit(&lease("sb_a", 2)).is_err());
        // Past the TTL without a renewal the worker stops acting.
        tokio::time::advance(Duration::from_secs(11)).await;
        let e = t.admit(&lease("sb_a", 3)).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        t.admit_destroy(&lease("sb_a", 3)).unwrap();
        // The overriding lease destroys without fencing out real holders.
        t.admit_destroy(&Lease::overriding(
            &SandboxId::from_trusted("sb_a"),
            "docker",
        ))
        .unwrap();
        t.admit_destroy(&lease("sb_a", 3)).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_replaces_older_leases_and_keeps_later_ones() {
        let t = LeaseTable::new(Duration::from_secs(10));
        t.admit_spawn(&lease("sb_old", 1)).unwrap();
        t.admit_spawn(&lease("sb_kept", 1)).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        // Granted after the heartbeat left: the reply cannot know of it.
        t.admit_spawn(&lease("sb_new", 5)).unwrap();
        t.apply(
            sent,
            &[grant("sb_kept", 4), grant("sb_adopted", 7)],
            Duration::from_secs(20),
        );
        assert!(t.get(&SandboxId::from_trusted("sb_old")).is_none());
        assert_eq!(
            t.get(&SandboxId::from_trusted("sb_kept"))
                .unwrap()
                .fencing_token,
            4
        );
        assert!(t.get(&SandboxId::from_trusted("sb_new")).is_some());
        assert!(t.get(&SandboxId::from_trusted("sb_adopted")).is_some());
        // The reply raised the fence.
        assert!(t.admit(&lease("sb_kept", 1)).is_err());
        t.admit(&lease("sb_kept", 4)).unwrap();
        // Renewed to sent + 20 s.
        tokio::time::advance(Duration::from_secs(15)).await;
        t.admit(&lease("sb_kept", 4)).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(t.admit(&lease("sb_kept", 4)).is_err());
    }
}
