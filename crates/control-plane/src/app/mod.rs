//! App services: everything the API does, independent of HTTP. Handlers
//! parse and authorize; these functions validate, check quotas, talk to the
//! store, the scheduler and workers, and record audit events.

pub mod audit;
pub mod auth;
pub mod e2b;
pub mod e2b_watch;
pub mod exec;
pub mod exec_slots;
pub mod files;
pub mod images;
pub mod pools;
pub mod ports;
pub mod procs;
pub mod pty;
pub mod ratelimit;
pub mod reconcilers;
pub mod sandboxes;
pub mod snapshots;
pub mod stats;
pub mod status;
pub mod templates;
pub mod tenants;
pub mod views;
pub mod volumes;
pub mod workers;

use std::sync::Arc;
use std::time::Instant;

use stacyvm_core::{Error, Result, TenantId};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_store::{DynStore, Role};

use crate::config::ServerConfig;
use crate::scheduler::Scheduler;

/// Who is calling: the key, its tenant and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub key_id: stacyvm_core::KeyId,
    pub tenant_id: TenantId,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether the caller may see objects of `tenant`.
    pub fn can_see(&self, tenant: &TenantId) -> bool {
        self.is_admin() || &self.tenant_id == tenant
    }

    /// Refuses viewers: they may only read.
    pub fn require_write(&self) -> Result<()> {
        match self.role {
            Role::Admin | Role::Owner | Role::Member => Ok(()),
            Role::Viewer => Err(Error::Forbidden("viewer keys are read-only".into())),
        }
    }

    /// Keys are managed by admins (every tenant) and owners (their own).
    pub fn require_key_manager(&self) -> Result<()> {
        match self.role {
            Role::Admin | Role::Owner => Ok(()),
            Role::Member | Role::Viewer => Err(Error::Forbidden(
                "managing API keys needs an admin key or the tenant's owner key".into(),
            )),
        }
    }

    pub fn require_admin(&self) -> Result<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::Forbidden("this call needs an admin key".into()))
        }
    }
}

/// The control plane's shared state. Its parts are the app's own: the
/// HTTP layer and the server reach them only through `App`'s methods.
pub struct App {
    config: ServerConfig,
    store: DynStore,
    scheduler: Scheduler,
    catalog: Arc<ImageCatalog>,
    exec_limiter: ratelimit::ExecLimiter,
    /// Commands running now, per sandbox and per tenant.
    exec_slots: exec_slots::ExecSlots,
    auth_failures: ratelimit::AuthFailureLimiter,
    pools: pools::Pools,
    /// Quotas read on the exec path, reused for a moment (see `exec_quota`).
    quota_cache:
        std::sync::Mutex<std::collections::HashMap<TenantId, (Instant, stacyvm_store::Quota)>>,
    /// Wakes the pool refill loop after a claim.
    pool_wake: tokio::sync::Notify,
    started: Instant,
    /// This control plane among its replicas (the holder name of the
    /// reconcilers' lease in the store).
    replica: String,
    /// The tenant that owns the bootstrap admin key.
    system_tenant: TenantId,
    /// Processes started through the E2B-compatible envd API.
    e2b_processes: Arc<e2b::EnvdProcesses>,
    /// Directory watches of the E2B-compatible envd API.
    e2b_watches: Arc<e2b_watch::EnvdWatches>,
    /// Exposed ports and the secret of their URL tokens.
    ports: ports::Exposures,
    /// Recent resource readings of the sandboxes someone asks about.
    stats_book: stats::StatsBook,
}

impl App {
    pub fn new(
        config: ServerConfig,
        store: DynStore,
        scheduler: Scheduler,
        catalog: Arc<ImageCatalog>,
        system_tenant: TenantId,
    ) -> App {
        App {
            pools: pools::Pools::new(&config.pools),
            config,
            store,
            scheduler,
            catalog,
            exec_limiter: Default::default(),
            exec_slots: Default::default(),
            auth_failures: Default::default(),
            quota_cache: Default::default(),
            pool_wake: tokio::sync::Notify::new(),
            started: Instant::now(),
            replica: {
                let mut b = [0u8; 8];
                rand::fill(&mut b);
                format!("cp-{}", hex::encode(b))
            },
            system_tenant,
            e2b_processes: Default::default(),
            e2b_watches: Default::default(),
            ports: Default::default(),
            stats_book: Default::default(),
        }
    }

    /// The configuration the server was started with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Which store the control plane runs on (`sqlite` or `postgres`).
    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }
}

/// Clamps a list `limit` to 1..=1000 (default 100), as `API.md` says.
pub fn page_limit(limit: Option<u32>) -> Result<u32> {
    match limit {
        None => Ok(100),
        Some(0) => Err(Error::InvalidRequest(
            "limit must be between 1 and 1000".into(),
        )),
        Some(n) if n > 1000 => Err(Error::InvalidRequest(
            "limit must be between 1 and 1000".into(),
        )),
        Some(n) => Ok(n),
    }
}
