//! What `/v1/status`, `/readyz` and `/v1/workers` report.

use std::collections::BTreeMap;

use stacyvm_core::{Result, SandboxState};

use super::App;

pub use stacyvm_api::{ProviderStatus, Status, StoreStatus, Worker as WorkerStatus};

impl App {
    pub async fn store_status(&self) -> StoreStatus {
        match self.store.ping().await {
            Ok(()) => StoreStatus {
                kind: self.store.kind().into(),
                ok: true,
                detail: None,
            },
            Err(e) => StoreStatus {
                kind: self.store.kind().into(),
                ok: false,
                detail: Some(e.message()),
            },
        }
    }

    /// Each provider's health across the workers: healthy when it is on
    /// one of them at least, certified when it is certified on one.
    pub async fn provider_status(&self) -> Vec<ProviderStatus> {
        let health = match self.scheduler.health_by_worker().await {
            Ok(b) => b.into_iter().map(|(_, h)| h).collect(),
            // Without the store, the in-process workers still answer.
            Err(_) => {
                let mut b = Vec::new();
                for w in self.scheduler.local_workers() {
                    b.push(self.scheduler.provider_health(w).await);
                }
                b
            }
        };
        let mut out: Vec<ProviderStatus> = Vec::new();
        for h in health.into_iter().flatten() {
            match out.iter_mut().find(|p| p.name == h.name) {
                // The detail of a healthy instance wins.
                Some(p) if !p.healthy && h.health.healthy => {
                    p.healthy = true;
                    p.detail = h.health.detail;
                    p.mode = h.mode.as_ref().map(|m| m.mode.clone());
                    p.not_enforced = h.mode.map(|m| m.not_enforced);
                    p.certified = h.certification.as_ref().map(|c| c.certified);
                    p.certified_at = h.certification.map(|c| c.certified_at);
                }
                // Certified where any worker's record says so.
                Some(p)
                    if p.certified != Some(true)
                        && h.certification.as_ref().is_some_and(|c| c.certified) =>
                {
                    p.certified = Some(true);
                    p.certified_at = h.certification.map(|c| c.certified_at);
                }
                Some(_) => {}
                None => out.push(ProviderStatus {
                    name: h.name,
                    healthy: h.health.healthy,
                    detail: h.health.detail,
                    mode: h.mode.as_ref().map(|m| m.mode.clone()),
                    not_enforced: h.mode.map(|m| m.not_enforced),
                    certified: h.certification.as_ref().map(|c| c.certified),
                    certified_at: h.certification.map(|c| c.certified_at),
                }),
            }
        }
        out
    }

    pub async fn worker_status(&self) -> Result<Vec<WorkerStatus>> {
        let live = self.store.sandbox_list_live().await?;
        Ok(self
            .store
            .worker_list()
            .await?
            .into_iter()
            .map(|w| {
                let n = live
                    .iter()
                    .filter(|s| s.worker_id.as_ref() == Some(&w.id))
                    .count() as i64;
                super::views::worker(w, n)
            })
            .collect())
    }

    /// The status as `who` may see it. Operators (admin keys) get the
    /// whole deployment; any other key gets its own tenant's sandbox counts
    /// and the provider health list, without workers or warm pools, so a
    /// tenant learns nothing of the others' activity.
    pub async fn status(&self, who: &super::Principal) -> Result<Status> {
        let store = self.store_status().await;
        let global = who.is_admin();
        let mut sandboxes: BTreeMap<String, i64> = SandboxState::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        let mut workers = Vec::new();
        if store.ok {
            let counts = if global {
                self.store.sandbox_count_by_state().await?
            } else {
                self.store.sandbox_count_by_state_of(&who.tenant_id).await?
            };
            for (state, n) in counts {
                sandboxes.insert(state, n);
            }
            if global {
                workers = self.worker_status().await?;
            }
        }
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: if self.config.local_worker
                && !self.scheduler.has_remote_workers().await.unwrap_or(false)
            {
                "single-node".into()
            } else {
                "multi-worker".into()
            },
            uptime_s: self.started.elapsed().as_secs(),
            store,
            providers: self.provider_status().await,
            workers,
            sandboxes,
            pools: if global {
                self.pools.status()
            } else {
                Vec::new()
            },
        })
    }

    /// `Ok(())` when the store and at least one provider are usable, else the reason.
    pub async fn readiness(&self) -> std::result::Result<(), String> {
        let store = self.store_status().await;
        if !store.ok {
            return Err(format!(
                "store ({}) unavailable: {}",
                store.kind,
                store.detail.unwrap_or_default()
            ));
        }
        let providers = self.provider_status().await;
        if providers.iter().any(|p| p.healthy) {
            return Ok(());
        }
        Err(format!(
            "no healthy provider: {}",
            providers
                .iter()
                .map(|p| format!("{}: {}", p.name, p.detail))
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }

    /// Brings the gauges `/metrics` renders up to date: sandboxes by state,
    /// and each worker's heartbeat age, leases and whether it is up.
    /// A store that cannot answer leaves the last values.
    pub async fn update_gauges(&self) {
        let Ok(counts) = self.store.sandbox_count_by_state().await else {
            return;
        };
        for st in stacyvm_core::SandboxState::ALL {
            let n = counts
                .iter()
                .find(|(name, _)| name == st.as_str())
                .map(|(_, n)| *n)
                .unwrap_or(0);
            metrics::gauge!("stacyvm_sandboxes", "state" => st.as_str()).set(n as f64);
        }
        // Per worker: how long since it was last heard from, and how many
        // sandboxes it holds leases on.
        let (Ok(workers), Ok(live), Ok(t)) = (
            self.store.worker_list().await,
            self.store.sandbox_list_live().await,
            self.store.now().await,
        ) else {
            return;
        };
        for w in workers {
            let held = live
                .iter()
                .filter(|s| s.worker_id.as_ref() == Some(&w.id))
                .count();
            let age = (t - w.last_heartbeat).as_seconds_f64().max(0.0);
            metrics::gauge!("stacyvm_worker_heartbeat_age_seconds", "worker" => w.id.to_string())
                .set(age);
            metrics::gauge!("stacyvm_worker_leases", "worker" => w.id.to_string()).set(held as f64);
            metrics::gauge!("stacyvm_worker_up", "worker" => w.id.to_string()).set(
                if w.state == stacyvm_store::WorkerState::Down {
                    0.0
                } else {
                    1.0
                },
            );
        }
    }
}
