//! App services: everything the API does, independent of HTTP. Handlers
//! parse and authorize; these functions validate, check quotas, talk to the
//! store, the scheduler and workers, and record audit events.

pub mod audit;
pub mod auth;
pub mod exec;
pub mod exec_slots;
pub mod files;
pub mod images;
pub mod ratelimit;
pub mod sandboxes;
pub mod status;
pub mod tenants;

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

/// The control plane's shared state.
pub struct App {
    pub config: ServerConfig,
    pub store: DynStore,
    pub scheduler: Scheduler,
    pub catalog: Arc<ImageCatalog>,
    pub exec_limiter: ratelimit::ExecLimiter,
    /// Commands running now, per sandbox and per tenant.
    pub exec_slots: exec_slots::ExecSlots,
    pub auth_failures: ratelimit::AuthFailureLimiter,
    pub pools: crate::pools::Pools,
    /// Quotas read on the exec path, reused for a moment (see `exec_quota`).
    pub quota_cache:
        std::sync::Mutex<std::collections::HashMap<TenantId, (Instant, stacyvm_store::Quota)>>,
    /// Wakes the pool refill loop after a claim.
    pub pool_wake: tokio::sync::Notify,
    pub started: Instant,
    /// The tenant that owns the bootstrap admin key.
    pub system_tenant: TenantId,
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
