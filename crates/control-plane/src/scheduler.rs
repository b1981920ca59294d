//! The scheduler: picks the worker a new sandbox goes to and finds the
//! worker that holds an existing one.
//!
//! Workers are of two kinds. The in-process worker (single-node mode) is
//! handed in at start. Remote workers (multi-worker mode) are whatever the
//! store says registered: each is reached through a connection made on
//! first use by the `Connect` function the server supplies, and remade when
//! the worker registers again (a new address or secret). Their provider
//! health is what their last heartbeat reported; the in-process worker's is
//! asked for (and cached for a moment).
//!
//! Placement filters the workers that are `ready`, run the provider with it
//! healthy, carry every wanted label and have room, takes the least loaded
//! first (ties spread at random), and lets the store's one-transaction
//! placement settle races with other control planes: a worker that filled
//! up meanwhile is skipped for the next.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stacyvm_core::{Error, Result, SandboxId, WorkerId};
use stacyvm_provider::Health;
use stacyvm_store::{DynStore, SandboxRecord, WorkerRecord, WorkerState};
use stacyvm_worker::{DynWorker, ProviderHealth};
use time::OffsetDateTime;

use crate::config::RESTRICTED_PROVIDERS;

/// How long a provider health answer is reused before asking again.
const HEALTH_TTL: Duration = Duration::from_secs(3);

/// Makes the connection to a remote worker from its registration.
pub type Connect = Arc<dyn Fn(&WorkerRecord) -> Result<DynWorker> + Send + Sync>;

/// A connection to a remote worker, and the registration it was made from.
struct Remote {
    address: String,
    secret: Option<String>,
    worker: DynWorker,
}

/// What a create asks of its worker.
pub struct Wants<'a> {
    pub provider: &'a str,
    /// Labels the worker must carry, every one.
    pub labels: &'a BTreeMap<String, String>,
    pub cpu: f64,
    pub memory_mb: i64,
}

/// Which workers a sandbox may be placed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pin {
    /// Any that can take it.
    Any,
    /// An in-process worker (its volumes are kept on this host).
    Local,
    /// That worker (it keeps the sandbox's volumes).
    Worker(WorkerId),
}

impl Pin {
    fn allows(&self, worker: &WorkerId, local: bool) -> bool {
        match self {
            Pin::Any => true,
            Pin::Local => local,
            Pin::Worker(w) => w == worker,
        }
    }
}

pub struct Scheduler {
    store: DynStore,
    local: Vec<DynWorker>,
    connect: Option<Connect>,
    remote: Mutex<HashMap<WorkerId, Remote>>,
    health: Mutex<HashMap<WorkerId, (Instant, Vec<ProviderHealth>)>>,
}

/// A worker as placement sees it.
struct Candidate {
    rec: WorkerRecord,
    load: i64,
    cpu: f64,
    memory_mb: i64,
}

impl Scheduler {
    /// `local`: the in-process workers; `connect`: how to reach remote
    /// ones (`None`: this control plane uses none).
    pub fn new(store: DynStore, local: Vec<DynWorker>, connect: Option<Connect>) -> Scheduler {
        Scheduler {
            store,
            local,
            connect,
            remote: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
        }
    }

    /// The in-process workers.
    pub fn local_workers(&self) -> &[DynWorker] {
        &self.local
    }

    /// Whether `id` is an in-process worker.
    pub fn is_local(&self, id: &WorkerId) -> bool {
        self.local.iter().any(|w| w.id() == id)
    }

    /// The worker `id`: the in-process one, or a connection to the remote
    /// one as it last registered. `Unavailable` when it is not registered
    /// or cannot be reached from here.
    pub async fn worker(&self, id: &WorkerId) -> Result<DynWorker> {
        if let Some(w) = self.local.iter().find(|w| w.id() == id) {
            return Ok(w.clone());
        }
        let rec = self
            .store
            .worker_get(id)
            .await?
            .ok_or_else(|| Error::Unavailable(format!("worker {id} is not registered")))?;
        self.remote_of(&rec)
    }

    fn remote_of(&self, rec: &WorkerRecord) -> Result<DynWorker> {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = remote.get(&rec.id) {
            if r.address == rec.address && r.secret == rec.secret {
                return Ok(r.worker.clone());
            }
        }
        let connect = self.connect.as_ref().ok_or_else(|| {
            Error::Unavailable(format!(
                "worker {} is remote and this control plane reaches no remote workers",
                rec.name_or_id()
            ))
        })?;
        let worker = connect(rec)?;
        remote.insert(
            rec.id.clone(),
            Remote {
                address: rec.address.clone(),
                secret: rec.secret.clone(),
                worker: worker.clone(),
            },
        );
        Ok(worker)
    }

    /// Every worker that is not `down`: the in-process ones and a
    /// connection to each registered remote one.
    pub async fn workers(&self) -> Result<Vec<DynWorker>> {
        let mut out = self.local.clone();
        for rec in self.store.worker_list().await? {
            if self.is_local(&rec.id) || rec.state == WorkerState::Down || rec.address == "local" {
                continue;
            }
            match self.remote_of(&rec) {
                Ok(w) => out.push(w),
                Err(e) => tracing::warn!(worker = %rec.id, error = %e, "cannot reach a worker"),
            }
        }
        Ok(out)
    }

    /// Whether any worker that is not `down` is remote.
    pub async fn has_remote_workers(&self) -> Result<bool> {
        Ok(self
            .store
            .worker_list()
            .await?
            .iter()
            .any(|r| !self.is_local(&r.id) && r.address != "local" && r.state != WorkerState::Down))
    }

    /// Provider health per worker that is not `down`: asked of the
    /// in-process workers, as last reported by the remote ones.
    pub async fn health_by_worker(&self) -> Result<Vec<(WorkerRecord, Vec<ProviderHealth>)>> {
        let mut out = Vec::new();
        for rec in self.store.worker_list().await? {
            if let Some(w) = self.local.iter().find(|w| w.id() == &rec.id) {
                let h = self.provider_health(w).await;
                out.push((rec, h));
            } else if rec.state != WorkerState::Down && rec.address != "local" {
                let h = reported_health(&rec);
                out.push((rec, h));
            }
        }
        Ok(out)
    }

    /// Every provider name some usable worker runs, in preference order
    /// (the in-process worker's first).
    pub async fn provider_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        for w in &self.local {
            for n in w.provider_names() {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for (rec, _) in self.health_by_worker().await? {
            for n in &rec.providers {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        Ok(names)
    }

    /// Whether provider `name` is not a security boundary: PRoot always,
    /// any provider an in-process worker reports as not one (a plugin that
    /// does not declare itself one), and a plugin no in-process worker
    /// runs: remote workers do not report what their plugins declared, so
    /// the safe guess is taken.
    pub fn is_restricted(&self, name: &str) -> bool {
        if RESTRICTED_PROVIDERS.contains(&name)
            || self
                .local
                .iter()
                .any(|w| w.restricted_providers().iter().any(|n| n == name))
        {
            return true;
        }
        name.starts_with(stacyvm_provider::plugin::PREFIX)
            && !self
                .local
                .iter()
                .any(|w| w.provider_names().iter().any(|n| n == name))
    }

    /// An in-process worker's provider health, cached for a few seconds so
    /// a burst of creates does not probe the runtime each time.
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
    /// configured on some worker and `allowed`), or the first configured
    /// provider that is allowed and healthy somewhere, among the security
    /// boundaries when the tenant may use any. A restricted provider
    /// (PRoot, a plugin that is not a security boundary) is never chosen in
    /// place of an isolating one that is down.
    pub async fn choose_provider(
        &self,
        requested: Option<&str>,
        allowed: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let configured = self.provider_names().await?;
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
                    if self.is_restricted(name) {
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
            .filter(|n| !self.is_restricted(n))
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
        let by_worker = self.health_by_worker().await?;
        let mut reasons = Vec::new();
        for name in candidates {
            for (_, health) in &by_worker {
                for h in health.iter().filter(|h| &h.name == *name) {
                    if h.health.healthy {
                        return Ok((*name).clone());
                    }
                    reasons.push(format!("{name}: {}", h.health.detail));
                }
            }
        }
        let skipped: Vec<&str> = usable
            .iter()
            .map(|n| n.as_str())
            .filter(|n| !isolating.is_empty() && self.is_restricted(n))
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

    /// The workers that could take a sandbox as `wants` describes, least
    /// loaded first, or why none can.
    async fn candidates(&self, wants: &Wants<'_>, sandbox: &SandboxId) -> Result<Vec<Candidate>> {
        let live = self.store.sandbox_list_live().await?;
        let by_worker = self.health_by_worker().await?;
        let mut out = Vec::new();
        let mut why: Vec<String> = Vec::new();
        let mut provider_down = false;
        for (rec, health) in by_worker {
            let name = rec.name_or_id();
            if rec.state != WorkerState::Ready {
                why.push(format!("{name} is {}", rec.state.as_str()));
                continue;
            }
            match health.iter().find(|h| h.name == wants.provider) {
                None => {
                    why.push(format!("{name} does not run {}", wants.provider));
                    continue;
                }
                Some(h) if !h.health.healthy => {
                    provider_down = true;
                    why.push(format!("{} on {name}: {}", wants.provider, h.health.detail));
                    continue;
                }
                Some(_) => {}
            }
            let missing: Vec<String> = wants
                .labels
                .iter()
                .filter(|(k, v)| rec.labels.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !missing.is_empty() {
                why.push(format!("{name} lacks the labels {}", missing.join(", ")));
                continue;
            }
            let mine = live
                .iter()
                .filter(|s| s.worker_id.as_ref() == Some(&rec.id) && &s.id != sandbox);
            let (mut load, mut cpu, mut memory_mb) = (0i64, 0f64, 0i64);
            for s in mine {
                load += 1;
                cpu += s.cpu;
                memory_mb += s.memory_mb;
            }
            if load + 1 > rec.capacity {
                why.push(format!(
                    "{name} is full ({load} of {} sandboxes)",
                    rec.capacity
                ));
                continue;
            }
            if rec
                .capacity_cpu
                .is_some_and(|max| cpu + wants.cpu > max + 1e-9)
            {
                why.push(format!(
                    "{name} has too few CPUs left ({cpu} of {} in use, {} asked)",
                    rec.capacity_cpu.unwrap_or_default(),
                    wants.cpu
                ));
                continue;
            }
            if rec
                .capacity_memory_mb
                .is_some_and(|max| memory_mb + wants.memory_mb > max)
            {
                why.push(format!(
                    "{name} has too little memory left ({memory_mb} of {} MiB in use, {} asked)",
                    rec.capacity_memory_mb.unwrap_or_default(),
                    wants.memory_mb
                ));
                continue;
            }
            out.push(Candidate {
                rec,
                load,
                cpu,
                memory_mb,
            });
        }
        if out.is_empty() {
            let why = if why.is_empty() {
                "no worker is registered".to_owned()
            } else {
                why.join("; ")
            };
            return Err(if provider_down && wants.labels.is_empty() {
                Error::ProviderUnavailable(format!(
                    "provider {} is unavailable: {why}",
                    wants.provider
                ))
            } else {
                Error::NoCapacity(format!(
                    "no worker can take a {} sandbox now: {why}",
                    wants.provider
                ))
            });
        }
        // Least loaded first, relative to each worker's size; equal loads
        // in random order, so replicas placing at once spread out.
        let mut keyed: Vec<(f64, u64, Candidate)> = out
            .into_iter()
            .map(|c| {
                let mut share = c.load as f64 / c.rec.capacity.max(1) as f64;
                if let Some(max) = c.rec.capacity_cpu.filter(|m| *m > 0.0) {
                    share = share.max(c.cpu / max);
                }
                if let Some(max) = c.rec.capacity_memory_mb.filter(|m| *m > 0) {
                    share = share.max(c.memory_mb as f64 / max as f64);
                }
                (share, rand::random::<u64>(), c)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        Ok(keyed.into_iter().map(|(_, _, c)| c).collect())
    }

    /// Places the pending sandbox `rec` on a worker: the first candidate
    /// whose one-transaction placement in the store succeeds. Returns the
    /// worker and the claimed row (worker set, lease until `lease_until`,
    /// fencing token raised).
    pub async fn place(
        &self,
        rec: &SandboxRecord,
        labels: &BTreeMap<String, String>,
        lease_until: OffsetDateTime,
        pin: &Pin,
    ) -> Result<(DynWorker, SandboxRecord)> {
        let wants = Wants {
            provider: &rec.provider,
            labels,
            cpu: rec.cpu,
            memory_mb: rec.memory_mb,
        };
        let mut why = Vec::new();
        let candidates = match self.candidates(&wants, &rec.id).await {
            Err(e) if *pin != Pin::Any => {
                return Err(Error::NoCapacity(format!(
                    "the sandbox's volumes are kept on {}, which cannot take it now: {}",
                    pin_name(pin),
                    e.message()
                )))
            }
            r => r?,
        };
        let pinned: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| pin.allows(&c.rec.id, self.is_local(&c.rec.id)))
            .collect();
        if pinned.is_empty() {
            return Err(Error::NoCapacity(format!(
                "the sandbox's volumes are kept on {}, which cannot take a {} sandbox now (it \
                 is down, drained, full, lacks the labels or does not run the provider)",
                pin_name(pin),
                rec.provider
            )));
        }
        for c in pinned {
            let worker = match self.worker_of(&c.rec) {
                Ok(w) => w,
                Err(e) => {
                    why.push(e.message());
                    continue;
                }
            };
            match self
                .store
                .sandbox_place(&rec.id, &c.rec.id, lease_until)
                .await
            {
                Ok(placed) => return Ok((worker, placed)),
                // Filled or drained by someone else since it was read.
                Err(Error::NoCapacity(m)) => why.push(m),
                Err(e) => return Err(e),
            }
        }
        Err(Error::NoCapacity(format!(
            "no worker can take a {} sandbox now: {}",
            rec.provider,
            why.join("; ")
        )))
    }

    /// The ready remote worker a new volume is kept on: the one with the
    /// fewest live sandboxes (volumes follow no provider, so any ready one
    /// will do; the sandboxes that mount it are placed there).
    pub async fn volume_worker(&self) -> Result<(WorkerId, DynWorker)> {
        let live = self.store.sandbox_list_live().await?;
        let mut ready: Vec<(usize, WorkerRecord)> = self
            .store
            .worker_list()
            .await?
            .into_iter()
            .filter(|w| w.state == WorkerState::Ready && !self.is_local(&w.id))
            .map(|w| {
                let load = live
                    .iter()
                    .filter(|s| s.worker_id.as_ref() == Some(&w.id))
                    .count();
                (load, w)
            })
            .collect();
        ready.sort_by_key(|(load, w)| (*load, w.id.clone()));
        let (_, rec) = ready.into_iter().next().ok_or_else(|| {
            Error::NoCapacity(
                "no remote worker is ready to keep a volume (this control plane has no \
                 in-process worker)"
                    .into(),
            )
        })?;
        Ok((rec.id.clone(), self.remote_of(&rec)?))
    }

    fn worker_of(&self, rec: &WorkerRecord) -> Result<DynWorker> {
        match self.local.iter().find(|w| w.id() == &rec.id) {
            Some(w) => Ok(w.clone()),
            None => self.remote_of(rec),
        }
    }

    /// Picks an in-process worker for a warm-pool member on `provider`
    /// (pool members run on the in-process worker only).
    pub async fn place_local(&self, provider: &str) -> Result<DynWorker> {
        let labels = BTreeMap::new();
        let wants = Wants {
            provider,
            labels: &labels,
            cpu: 0.0,
            memory_mb: 0,
        };
        let none = SandboxId::from_trusted("sbx_none".to_owned());
        self.candidates(&wants, &none)
            .await?
            .into_iter()
            .find_map(|c| self.local.iter().find(|w| w.id() == &c.rec.id).cloned())
            .ok_or_else(|| {
                Error::NoCapacity(format!(
                    "warm pools run on the in-process worker, which cannot take a {provider} \
                     sandbox now"
                ))
            })
    }
}

/// A remote worker's provider health as its last heartbeat reported it.
fn reported_health(rec: &WorkerRecord) -> Vec<ProviderHealth> {
    rec.providers
        .iter()
        .map(|name| {
            let reported = rec.provider_health.iter().find(|h| &h.name == name);
            ProviderHealth {
                name: name.clone(),
                health: Health {
                    healthy: reported.is_some_and(|h| h.healthy),
                    detail: reported
                        .map(|h| h.detail.clone())
                        .unwrap_or_else(|| "not reported yet".into()),
                },
                mode: reported.and_then(|h| {
                    Some(stacyvm_provider::ProviderMode {
                        mode: h.mode.clone()?,
                        not_enforced: h.not_enforced.clone().unwrap_or_default(),
                    })
                }),
                certification: reported.and_then(|h| {
                    Some(stacyvm_provider::certify::Standing {
                        certified: h.certified?,
                        certified_at: h.certified_at?,
                    })
                }),
            }
        })
        .collect()
}

fn pin_name(pin: &Pin) -> String {
    match pin {
        Pin::Any => "any worker".into(),
        Pin::Local => "this control plane's in-process worker".into(),
        Pin::Worker(w) => format!("worker {w}"),
    }
}
