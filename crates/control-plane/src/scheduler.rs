//! The scheduler: picks the worker a new sandbox goes to (ready, not
//! draining, has the wanted provider healthy, has capacity; least loaded
//! first) and finds the worker that holds an existing one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stacyvm_core::{Error, Result, WorkerId};
use stacyvm_store::{DynStore, WorkerState};
use stacyvm_worker::{DynWorker, ProviderHealth};

use crate::config::RESTRICTED_PROVIDERS;

/// How long a provider health answer is reused before asking again.
const HEALTH_TTL: Duration = Duration::from_secs(3);

pub struct Scheduler {
    store: DynStore,
    workers: Vec<DynWorker>,
    health: Mutex<HashMap<WorkerId, (Instant, Vec<ProviderHealth>)>>,
}

impl Scheduler {
    pub fn new(store: DynStore, workers: Vec<DynWorker>) -> Scheduler {
        Scheduler {
            store,
            workers,
            health: Mutex::new(HashMap::new()),
        }
    }

    pub fn workers(&self) -> &[DynWorker] {
        &self.workers
    }

    pub fn worker(&self, id: &WorkerId) -> Option<&DynWorker> {
        self.workers.iter().find(|w| w.id() == id)
    }

    /// Every provider name configured on some worker, in preference order.
    pub fn provider_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for w in &self.workers {
            for n in w.provider_names() {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names
    }

    /// A worker's provider health, cached for a few seconds so a burst of
    /// creates does not probe the runtime each time.
    pub async fn provider_health(&self, worker: &DynWorker) -> Vec<ProviderHealth> {
        {
            let cache = self.health.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, h)) = cache.get(worker.id()) {
                if at.elapsed() < HEALTH_TTL {
                    return h.clone();
                }
            }
        }
        let h = worker.provider_health().await;
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker.id().clone(), (Instant::now(), h.clone()));
        h
    }

    /// Resolves the provider for a create: the requested one (which must be
    /// configured and `allowed`), or the first configured provider that is
    /// allowed and healthy, among the security boundaries when the tenant
    /// may use any. A restricted provider (PRoot) is never chosen in place
    /// of an isolating one that is down.
    pub async fn choose_provider(
        &self,
        requested: Option<&str>,
        allowed: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let configured = self.provider_names();
        if configured.is_empty() {
            return Err(Error::NoCapacity(
                "no worker with a provider is available".into(),
            ));
        }
        if let Some(name) = requested {
            if !configured.iter().any(|c| c == name) {
                return Err(Error::InvalidRequest(format!(
                    "provider {name:?} is not configured; configured providers: {}",
                    configured.join(", ")
                )));
            }
            if !allowed(name) {
                return Err(Error::Forbidden(format!(
                    "provider {name} is not allowed for this tenant{}; the operator enables it \
                     per tenant with allowed_providers in the tenant's quota",
                    if RESTRICTED_PROVIDERS.contains(&name) {
                        " (it is not a security boundary)"
                    } else {
                        ""
                    }
                )));
            }
            return Ok(name.to_owned());
        }
        // A restricted provider is chosen only when the tenant may use no
        // other configured provider: never as a fallback for one that is
        // down.
        let usable: Vec<&String> = configured.iter().filter(|n| allowed(n)).collect();
        let isolating: Vec<&String> = usable
            .iter()
            .copied()
            .filter(|n| !RESTRICTED_PROVIDERS.contains(&n.as_str()))
            .collect();
        if usable.is_empty() {
            return Err(Error::Forbidden(format!(
                "this tenant may use none of the configured providers ({}); the operator \
                 enables them per tenant with allowed_providers in the tenant's quota",
                configured.join(", ")
            )));
        }
        let candidates = if isolating.is_empty() {
            &usable
        } else {
            &isolating
        };
        let mut reasons = Vec::new();
        for name in candidates {
            for w in &self.workers {
                for h in self.provider_health(w).await {
                    if &h.name == *name {
                        if h.health.healthy {
                            return Ok((*name).clone());
                        }
                        reasons.push(format!("{name}: {}", h.health.detail));
                    }
                }
            }
        }
        let skipped: Vec<&str> = usable
            .iter()
            .map(|n| n.as_str())
            .filter(|n| !isolating.is_empty() && RESTRICTED_PROVIDERS.contains(n))
            .collect();
        let hint = if skipped.is_empty() {
            String::new()
        } else {
            format!(
                "; {} is never chosen automatically in place of a provider that is down (it \
                 is not a security boundary): name it in the create to use it",
                skipped.join(", ")
            )
        };
        Err(Error::ProviderUnavailable(format!(
            "no configured provider is healthy ({}){hint}",
            reasons.join("; ")
        )))
    }

    /// Picks the worker for a new sandbox on `provider`.
    pub async fn place(&self, provider: &str) -> Result<DynWorker> {
        let records = self.store.worker_list().await?;
        let live = self.store.sandbox_list_live().await?;
        let mut best: Option<(i64, &DynWorker)> = None;
        let mut why = Vec::new();
        for w in &self.workers {
            let Some(rec) = records.iter().find(|r| &r.id == w.id()) else {
                why.push(format!("{} is not registered", w.id()));
                continue;
            };
            if rec.state != WorkerState::Ready {
                why.push(format!("{} is {}", w.id(), rec.state.as_str()));
                continue;
            }
            let health = self.provider_health(w).await;
            match health.iter().find(|h| h.name == provider) {
                None => continue,
                Some(h) if !h.health.healthy => {
                    why.push(format!("{provider} on {}: {}", w.id(), h.health.detail));
                    continue;
                }
                Some(_) => {}
            }
            let load = live
                .iter()
                .filter(|s| s.worker_id.as_ref() == Some(w.id()))
                .count() as i64;
            if load >= rec.capacity {
                why.push(format!("{} is full ({load}/{})", w.id(), rec.capacity));
                continue;
            }
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, w));
            }
        }
        match best {
            Some((_, w)) => Ok(w.clone()),
            None if why.iter().any(|w| w.starts_with(provider)) => Err(Error::ProviderUnavailable(
                format!("provider {provider} is unavailable: {}", why.join("; ")),
            )),
            None => Err(Error::NoCapacity(format!(
                "no worker can take a {provider} sandbox now{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {}", why.join("; "))
                }
            ))),
        }
    }
}
