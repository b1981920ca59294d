//! Warm pools: per provider and image, keep N sandboxes spawned and idle so
//! a create can claim one instead of waiting for a cold spawn.
//!
//! A pool member is a runtime whose sandbox id has never been shown to
//! anyone and which has no store row while it waits. A claim gives that id
//! to the new sandbox: the store row is inserted (quota checked, in one
//! transaction, exactly as for a cold create) and the runtime is used as is.
//! The sandbox's env is applied to every exec, its workdir is created at
//! claim, its labels and timeout live in the row. Members are used once and
//! never returned to a pool, so no file, process or variable of one user
//! reaches another. A graceful stop destroys the idle members; members a
//! crash left have no row (and carry the `stacyvm.pool` label) and are
//! destroyed as orphans at the next start.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use stacyvm_core::{Network, Result, SandboxId, SpawnSpec};
use stacyvm_worker::{DynWorker, Lease};

use crate::app::sandboxes::ImageSource;
use crate::app::App;

pub use crate::config::PoolSpec;

/// A spawned, idle member.
#[derive(Clone)]
pub struct Member {
    pub sandbox_id: SandboxId,
    pub worker: DynWorker,
    /// Whether its image came from the catalog (`Catalog`) or may have
    /// come from the Docker daemon (`CatalogOrDaemon`): the image was not in
    /// the catalog when the member was spawned.
    pub source: ImageSource,
}

struct Pool {
    spec: PoolSpec,
    ready: VecDeque<Member>,
    /// Spawns in flight for this pool.
    filling: usize,
}

/// What `/v1/status` shows of a pool.
pub use stacyvm_api::PoolStatus;

#[derive(Default)]
pub struct Pools {
    pools: Mutex<Vec<Pool>>,
    /// Ids of members (ready or being spawned): reconcilers leave them be.
    owned: Mutex<HashSet<SandboxId>>,
    /// Set at shutdown: no member is spawned any more.
    closed: AtomicBool,
}

/// The label every pool member's runtime carries (`PROVIDER:IMAGE`), so an
/// operator looking at the host can tell them apart.
pub const POOL_LABEL: &str = "stacyvm.pool";

impl Pools {
    pub fn new(specs: &[PoolSpec]) -> Pools {
        Pools {
            pools: Mutex::new(
                specs
                    .iter()
                    .map(|s| Pool {
                        spec: s.clone(),
                        ready: VecDeque::new(),
                        filling: 0,
                    })
                    .collect(),
            ),
            owned: Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// Spawns no more members (the server is stopping).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Whether `id` is a pool member that no row accounts for yet.
    pub fn owns(&self, id: &SandboxId) -> bool {
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    pub fn status(&self) -> Vec<PoolStatus> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| PoolStatus {
                provider: p.spec.provider.clone(),
                image: p.spec.image.clone(),
                size: p.spec.size,
                ready: p.ready.len(),
                filling: p.filling,
            })
            .collect()
    }

    /// Takes a ready member for a sandbox of `image` on `provider`, if the
    /// pool has one whose image came from where the caller may take it:
    /// with `Catalog`, only a member spawned from the catalog.
    pub fn take(&self, provider: &str, image: &str, allowed: ImageSource) -> Option<Member> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools
            .iter_mut()
            .find(|p| p.spec.provider == provider && p.spec.image == image)?;
        let at = pool.ready.iter().position(|m| {
            allowed == ImageSource::CatalogOrDaemon || m.source == ImageSource::Catalog
        })?;
        let member = pool.ready.remove(at)?;
        metrics::gauge!("stacyvm_pool_ready", "provider" => provider.to_owned(), "image" => image.to_owned())
            .decrement(1.0);
        metrics::counter!("stacyvm_pool_claims_total", "provider" => provider.to_owned(), "image" => image.to_owned())
            .increment(1);
        Some(member)
    }

    /// Gives an unused member back (its claim was refused, e.g. by quota).
    pub fn put_back(&self, provider: &str, image: &str, member: Member) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools
            .iter_mut()
            .find(|p| p.spec.provider == provider && p.spec.image == image)
        {
            pool.ready.push_front(member);
            metrics::gauge!("stacyvm_pool_ready", "provider" => provider.to_owned(), "image" => image.to_owned())
                .increment(1.0);
        }
    }

    /// The member has become a sandbox with a row: it is no longer the pool's.
    pub fn release(&self, id: &SandboxId) {
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The next pool that wants a member, marking one spawn in flight.
    fn next_to_fill(&self) -> Option<PoolSpec> {
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools
            .iter_mut()
            .find(|p| p.ready.len() + p.filling < p.spec.size)?;
        pool.filling += 1;
        Some(pool.spec.clone())
    }

    fn filled(&self, spec: &PoolSpec, member: Option<Member>) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.iter_mut().find(|p| p.spec == *spec) {
            pool.filling = pool.filling.saturating_sub(1);
            if let Some(m) = member {
                pool.ready.push_back(m);
            }
        }
    }
}

/// Spawns members until every pool is full (or a spawn fails, which is
/// retried on the next pass). One spawn at a time, so refilling never
/// starves user creates of the host.
pub async fn refill(app: &Arc<App>) {
    while let Some(spec) = app.pools.next_to_fill() {
        let id = SandboxId::generate();
        app.pools
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        match spawn_member(app, &spec, &id).await {
            Ok((worker, source)) => {
                app.pools.filled(
                    &spec,
                    Some(Member {
                        sandbox_id: id,
                        worker,
                        source,
                    }),
                );
                metrics::gauge!("stacyvm_pool_ready", "provider" => spec.provider.clone(), "image" => spec.image.clone())
                    .increment(1.0);
            }
            Err(e) => {
                app.pools.release(&id);
                app.pools.filled(&spec, None);
                tracing::warn!(provider = %spec.provider, image = %spec.image, error = %e, "could not fill a warm pool");
                return;
            }
        }
    }
}

async fn spawn_member(
    app: &Arc<App>,
    spec: &PoolSpec,
    id: &SandboxId,
) -> Result<(DynWorker, ImageSource)> {
    let worker = app.scheduler.place_local(&spec.provider).await?;
    let before = app.catalog_image(&spec.image).await?;
    let limits = &app.config.limits;
    let spawn = SpawnSpec {
        sandbox_id: id.clone(),
        image: spec.image.clone(),
        cpu: limits.default_cpu,
        memory_mb: limits.default_memory_mb as u64,
        env: Default::default(),
        workdir: None,
        network: Network::None,
        labels: BTreeMap::from([(
            POOL_LABEL.to_owned(),
            format!("{}:{}", spec.provider, spec.image),
        )]),
        egress_allow: Vec::new(),
        mounts: Vec::new(),
    };
    let lease = Lease::new(id, 0, &spec.provider);
    if let Err(e) = worker.spawn(&lease, &spawn).await {
        let _ = worker.destroy(&lease).await;
        return Err(e);
    }
    // From the catalog only if the same version was there before and after
    // the provider looked: one deleted meanwhile could have let it fall back
    // to a Docker image of the same name.
    let after = app.catalog_image(&spec.image).await.ok().flatten();
    let source = match (before, after) {
        (Some(b), Some(a)) if a == b => ImageSource::Catalog,
        _ => ImageSource::CatalogOrDaemon,
    };
    Ok((worker, source))
}

/// Destroys every idle member; returns how many there were.
pub async fn drain(app: &App) -> usize {
    let members: Vec<(String, Member)> = {
        let mut pools = app.pools.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .iter_mut()
            .flat_map(|p| {
                p.ready
                    .drain(..)
                    .map(|m| (p.spec.provider.clone(), m))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let n = members.len();
    for (provider, m) in members {
        let lease = Lease::overriding(&m.sandbox_id, &provider);
        if let Err(e) = m.worker.destroy(&lease).await {
            // Left for the next start's orphan reconciliation.
            tracing::warn!(sandbox = %m.sandbox_id, error = %e, "could not destroy a warm-pool member");
        }
        app.pools.release(&m.sandbox_id);
    }
    n
}

/// Whether a request can be served from a pool of `image` on `provider`:
/// the member was spawned with the defaults, so only requests that keep
/// them can take one.
pub fn matches_defaults(app: &App, cpu: f64, memory_mb: i64, network: Network) -> bool {
    let l = &app.config.limits;
    cpu == l.default_cpu && memory_mb == l.default_memory_mb && network == Network::None
}

impl App {
    /// Spawns no more warm-pool members (the server is stopping).
    pub fn pools_close(&self) {
        self.pools.close();
    }

    /// Destroys every idle warm-pool member; returns how many there were.
    pub async fn pools_drain(&self) -> usize {
        drain(self).await
    }
}
