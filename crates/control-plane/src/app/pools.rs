//! Warm pools: per provider and image, keep N sandboxes spawned and idle so
//! a create can claim one instead of waiting for a cold spawn.
//!
//! A template's pool (`template/NAME`: the operator's template, or
//! `template/TENANT/NAME`) holds sandboxes of the template's newest ready
//! version, spawned with its defaults, its `start` process running and its
//! `ready` check passed: what a cold create from it would be. A create
//! takes one only when its own resolution of the template (as its tenant
//! sees it) is that very version and it asks for nothing the member was
//! not spawned with; when a newer version becomes ready the old members
//! are destroyed and the pool refills with the new one.
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

use stacyvm_core::{Network, Result, SandboxId, SpawnSpec, TemplateVersionId};
use stacyvm_worker::{DynWorker, Lease};

use crate::app::sandboxes::ImageSource;
use crate::app::templates::ResolvedTemplate;
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
    /// The pool it belongs to (its index in the configured pools).
    pool: usize,
    /// For a template's pool: the version it runs.
    template: Option<TemplateVersionId>,
}

struct Pool {
    spec: PoolSpec,
    ready: VecDeque<Member>,
    /// Spawns in flight for this pool.
    filling: usize,
    /// For a template's pool: the version it fills with now (`None` while
    /// the template has no ready version).
    template: Option<ResolvedTemplate>,
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
                        template: None,
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
                template: p.template.as_ref().map(ResolvedTemplate::label),
            })
            .collect()
    }

    /// Takes a ready member for a sandbox of `image` on `provider`, if the
    /// pool has one whose image came from where the caller may take it:
    /// with `Catalog`, only a member spawned from the catalog.
    pub fn take(&self, provider: &str, image: &str, allowed: ImageSource) -> Option<Member> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools.iter_mut().find(|p| {
            p.spec.provider == provider && p.spec.image == image && p.spec.template().is_none()
        })?;
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

    /// Takes a ready member of template version `version` on `provider`
    /// (its shape is the version's defaults: the caller checked that the
    /// create asks for exactly those).
    pub fn take_template(&self, provider: &str, version: &TemplateVersionId) -> Option<Member> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools.iter_mut().find(|p| {
            p.spec.provider == provider
                && p.template
                    .as_ref()
                    .is_some_and(|t| t.version.id == *version)
        })?;
        let at = pool
            .ready
            .iter()
            .position(|m| m.template.as_ref() == Some(version))?;
        let member = pool.ready.remove(at)?;
        let image = pool.spec.image.clone();
        metrics::gauge!("stacyvm_pool_ready", "provider" => provider.to_owned(), "image" => image.clone())
            .decrement(1.0);
        metrics::counter!("stacyvm_pool_claims_total", "provider" => provider.to_owned(), "image" => image)
            .increment(1);
        Some(member)
    }

    /// Gives an unused member back (its claim was refused, e.g. by quota).
    pub fn put_back(&self, member: Member) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get_mut(member.pool) {
            let (provider, image) = (pool.spec.provider.clone(), pool.spec.image.clone());
            pool.ready.push_front(member);
            metrics::gauge!("stacyvm_pool_ready", "provider" => provider, "image" => image)
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

    /// The next pool that wants a member, marking one spawn in flight: its
    /// index, its spec and, for a template's pool, the version to spawn.
    fn next_to_fill(&self) -> Option<(usize, PoolSpec, Option<ResolvedTemplate>)> {
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let (index, pool) = pools.iter_mut().enumerate().find(|(_, p)| {
            p.ready.len() + p.filling < p.spec.size
                && (p.spec.template().is_none() || p.template.is_some())
        })?;
        pool.filling += 1;
        Some((index, pool.spec.clone(), pool.template.clone()))
    }

    /// Ends a spawn in flight; a member of a version the pool no longer
    /// holds is handed back to be destroyed.
    fn filled(&self, index: usize, member: Option<Member>) -> Option<Member> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pool) = pools.get_mut(index) else {
            return member;
        };
        pool.filling = pool.filling.saturating_sub(1);
        let m = member?;
        let current = pool.template.as_ref().map(|t| &t.version.id);
        if m.template.as_ref() != current {
            return Some(m);
        }
        metrics::gauge!("stacyvm_pool_ready", "provider" => pool.spec.provider.clone(), "image" => pool.spec.image.clone())
            .increment(1.0);
        pool.ready.push_back(m);
        None
    }

    /// Sets the version a template's pool holds; returns the members of
    /// any other version, to be destroyed.
    fn set_template(&self, index: usize, template: Option<ResolvedTemplate>) -> Vec<Member> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pool) = pools.get_mut(index) else {
            return Vec::new();
        };
        let id = template.as_ref().map(|t| t.version.id.clone());
        pool.template = template;
        let (keep, stale): (VecDeque<Member>, VecDeque<Member>) =
            pool.ready.drain(..).partition(|m| m.template == id);
        pool.ready = keep;
        if !stale.is_empty() {
            metrics::gauge!("stacyvm_pool_ready", "provider" => pool.spec.provider.clone(), "image" => pool.spec.image.clone())
                .decrement(stale.len() as f64);
        }
        stale.into()
    }

    /// Whether an idle member runs `image` (a template version's image
    /// must outlive its members, which have no store row).
    pub fn uses_image(&self, image: &str) -> bool {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|p| {
                p.template
                    .as_ref()
                    .is_some_and(|t| t.version.image == image)
                    && !p.ready.is_empty()
            })
    }

    /// The template pools: index, spec.
    fn template_pools(&self) -> Vec<(usize, PoolSpec)> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .filter(|(_, p)| p.spec.template().is_some())
            .map(|(i, p)| (i, p.spec.clone()))
            .collect()
    }
}

/// Spawns members until every pool is full (or a spawn fails, which is
/// retried on the next pass). One spawn at a time, so refilling never
/// starves user creates of the host. Template pools first learn which
/// version they hold now.
pub async fn refill(app: &Arc<App>) {
    refresh_templates(app).await;
    while let Some((index, spec, template)) = app.pools.next_to_fill() {
        let id = SandboxId::generate();
        app.pools
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        match spawn_member(app, &spec, template.as_ref(), &id).await {
            Ok((worker, source)) => {
                let member = Member {
                    sandbox_id: id,
                    worker,
                    source,
                    pool: index,
                    template: template.map(|t| t.version.id),
                };
                if let Some(stale) = app.pools.filled(index, Some(member)) {
                    destroy_member(app, &spec.provider, stale).await;
                }
            }
            Err(e) => {
                app.pools.release(&id);
                app.pools.filled(index, None);
                tracing::warn!(provider = %spec.provider, image = %spec.image, error = %e, "could not fill a warm pool");
                return;
            }
        }
    }
}

/// Points every template pool at its template's newest ready version,
/// destroying the members of the version it held before (or of a
/// template that was deleted).
pub(super) async fn refresh_templates(app: &App) {
    for (index, spec) in app.pools.template_pools() {
        let Some((tenant, name)) = spec.template() else {
            continue;
        };
        let tenant = tenant.unwrap_or_else(|| app.system_tenant.clone());
        let newest = match app.template_newest_ready(&tenant, name).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(image = %spec.image, error = %e, "could not look up a warm pool's template");
                continue;
            }
        };
        for stale in app.pools.set_template(index, newest) {
            destroy_member(app, &spec.provider, stale).await;
        }
    }
}

async fn destroy_member(app: &App, provider: &str, m: Member) {
    let lease = Lease::overriding(&m.sandbox_id, provider);
    if let Err(e) = m.worker.destroy(&lease).await {
        // Left for the next start's orphan reconciliation.
        tracing::warn!(sandbox = %m.sandbox_id, error = %e, "could not destroy a warm-pool member");
    }
    app.pools.release(&m.sandbox_id);
}

async fn spawn_member(
    app: &Arc<App>,
    spec: &PoolSpec,
    template: Option<&ResolvedTemplate>,
    id: &SandboxId,
) -> Result<(DynWorker, ImageSource)> {
    let worker = app.scheduler.place_local(&spec.provider).await?;
    let image = template.map_or(spec.image.as_str(), |t| t.version.image.as_str());
    let before = app.catalog_image(image).await?;
    let shape = template.map(|t| template_shape(app, t));
    let limits = &app.config.limits;
    let spawn = SpawnSpec {
        sandbox_id: id.clone(),
        image: image.to_owned(),
        cpu: shape.as_ref().map_or(limits.default_cpu, |s| s.cpu),
        memory_mb: shape
            .as_ref()
            .map_or(limits.default_memory_mb, |s| s.memory_mb) as u64,
        env: shape.as_ref().map(|s| s.env.clone()).unwrap_or_default(),
        workdir: shape.as_ref().and_then(|s| s.workdir.clone()),
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
    if let Some(t) = template {
        // Started and ready as a cold create from the template would be.
        let began = std::time::Instant::now();
        if let Err(e) = app
            .template_run_start(&worker, &lease, &spawn.env, &spawn.workdir, t, began)
            .await
        {
            let _ = worker.destroy(&lease).await;
            return Err(e);
        }
        return Ok((worker, ImageSource::Catalog));
    }
    // From the catalog only if the same version was there before and after
    // the provider looked: one deleted meanwhile could have let it fall back
    // to a Docker image of the same name.
    let after = app.catalog_image(image).await.ok().flatten();
    let source = match (before, after) {
        (Some(b), Some(a)) if a == b => ImageSource::Catalog,
        _ => ImageSource::CatalogOrDaemon,
    };
    Ok((worker, source))
}

/// What a cold create from template `t` that asks for nothing else gets:
/// the shape a template pool's members are spawned with.
pub struct TemplateShape {
    pub cpu: f64,
    pub memory_mb: i64,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
}

pub fn template_shape(app: &App, t: &ResolvedTemplate) -> TemplateShape {
    let l = &app.config.limits;
    TemplateShape {
        cpu: t.defaults.cpu.unwrap_or(l.default_cpu),
        memory_mb: t.defaults.memory_mb.unwrap_or(l.default_memory_mb),
        env: t.defaults.env.clone(),
        workdir: t.defaults.workdir.clone(),
    }
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
        destroy_member(app, &provider, m).await;
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
