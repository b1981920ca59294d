//! The Store: every piece of StacyVM state that must survive a restart —
//! tenants, API keys (hashes only), quotas, sandboxes (state, spec, worker,
//! lease, fencing token), audit events and workers — behind one trait with
//! two backends, SQLite (embedded default) and PostgreSQL (clusters).
//!
//! Only this crate speaks SQL, and it writes each statement once: `sql` is
//! the store over either database, `sqlite` and `postgres` hold only what
//! differs. Both backends pass the same conformance suite (`tests/store`),
//! run against real databases.

mod common;
pub mod model;
pub mod postgres;
mod sql;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_core::{
    Error, KeyId, Result, SandboxId, SandboxState, TemplateVersionId, TenantId, VolumeId, WorkerId,
    WorkerTokenId,
};
use time::OffsetDateTime;

pub use common::is_stale_fencing;
pub use model::*;

/// The persistence boundary of the control plane.
///
/// Every method is one transaction. Errors use `stacyvm_core::Error`:
/// `NotFound`, `Conflict` or `QuotaExceeded` where the data says so, and
/// `Internal` for database failures. A database that cannot be reached is
/// `Unavailable`, which the HTTP edge answers with 503.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;

    /// A cheap round trip proving the database answers.
    async fn ping(&self) -> Result<()>;

    // --- tenants and quotas ---------------------------------------------

    /// `Conflict` when a tenant with that name exists.
    async fn tenant_create(&self, tenant: &Tenant) -> Result<()>;
    async fn tenant_get(&self, id: &TenantId) -> Result<Option<Tenant>>;
    async fn tenant_list(&self, page: &PageRequest) -> Result<Page<Tenant>>;
    /// The tenant's quota (all limits `None` until set); `NotFound` when the
    /// tenant does not exist.
    async fn quota_get(&self, tenant: &TenantId) -> Result<Quota>;
    /// Replaces the tenant's quota; `NotFound` when the tenant does not exist.
    async fn quota_set(&self, tenant: &TenantId, quota: &Quota) -> Result<()>;

    // --- API keys -------------------------------------------------------

    async fn key_create(&self, key: &ApiKey) -> Result<()>;
    /// The key with this hash, revoked or not (the caller checks).
    async fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>>;
    async fn key_get(&self, id: &KeyId) -> Result<Option<ApiKey>>;
    /// Keys, oldest first; only `tenant`'s when given.
    async fn key_list(&self, tenant: Option<&TenantId>, page: &PageRequest)
        -> Result<Page<ApiKey>>;
    /// Marks the key revoked at `at`; `false` when no such key. Revoking a
    /// revoked key keeps the first revocation time and returns `true`.
    async fn key_revoke(&self, id: &KeyId, at: OffsetDateTime) -> Result<bool>;

    // --- sandboxes ------------------------------------------------------

    /// Inserts a sandbox in one transaction with the quota check, so
    /// concurrent creates can never overshoot the tenant's quota:
    /// - if `rec.idempotency_key` is set and the tenant already has a
    ///   sandbox with that key, returns `Existing` with it (no quota check);
    /// - otherwise counts the tenant's live sandboxes (state not terminal)
    ///   and their cpu and memory, and refuses with `QuotaExceeded` naming
    ///   the limit (`max_sandboxes`, `max_cpu`, `max_memory_mb`) if adding
    ///   `rec` would exceed the quota;
    /// - otherwise inserts and returns `Created`.
    async fn sandbox_create(&self, rec: &SandboxRecord) -> Result<CreateOutcome>;
    async fn sandbox_get(&self, id: &SandboxId) -> Result<Option<SandboxRecord>>;
    /// Sandboxes in creation order, filtered; `next_cursor` is set when more follow.
    async fn sandbox_list(&self, filter: &SandboxFilter) -> Result<Page<SandboxRecord>>;
    /// Writes every mutable field of `rec` (state, worker, times, failure,
    /// lease, labels), only if the stored fencing token equals
    /// `rec.fencing_token`; otherwise `Conflict` ("stale fencing token").
    /// `NotFound` when no such sandbox.
    async fn sandbox_update(&self, rec: &SandboxRecord) -> Result<()>;
    /// `sandbox_update`, but only if the stored state is still `from`:
    /// `Ok(false)` (and nothing written) when another writer moved the
    /// sandbox on meanwhile. Reconcilers use it so a decision made on a
    /// stale read never overwrites a newer transition (e.g. a destroy).
    async fn sandbox_update_from(&self, rec: &SandboxRecord, from: SandboxState) -> Result<bool>;
    /// Gives the sandbox to `worker` with a lease until `lease_until`,
    /// incrementing the fencing token; returns the updated record.
    async fn sandbox_claim(
        &self,
        id: &SandboxId,
        worker: &WorkerId,
        lease_until: OffsetDateTime,
    ) -> Result<SandboxRecord>;
    /// Places a sandbox on `worker` (as [`Store::sandbox_claim`] does) in one
    /// transaction with the worker's checks, so that placements racing from
    /// several control planes never overfill a worker: the worker must be
    /// `ready`, and its live sandboxes with this one must fit its capacity
    /// (count, CPUs, memory). `NoCapacity` naming what is short otherwise.
    async fn sandbox_place(
        &self,
        id: &SandboxId,
        worker: &WorkerId,
        lease_until: OffsetDateTime,
    ) -> Result<SandboxRecord>;
    /// Every live sandbox whose lease ran out before `now` becomes `lost`
    /// (quota freed), its fencing token raised so its old holder's late
    /// writes are refused. The sandboxes of `spare` (this process's own
    /// in-process worker, whose leases it renews itself) are left alone.
    /// Returns the sandboxes it marked.
    async fn sandbox_lose_lapsed(
        &self,
        now: OffsetDateTime,
        spare: Option<&WorkerId>,
    ) -> Result<Vec<SandboxRecord>>;
    /// Extends the lease of every live sandbox held by `worker`; returns how many.
    async fn lease_renew(&self, worker: &WorkerId, lease_until: OffsetDateTime) -> Result<u64>;
    /// Every sandbox not in a terminal state (for reconcilers), any tenant.
    async fn sandbox_list_live(&self) -> Result<Vec<SandboxRecord>>;
    /// Live sandboxes whose `expires_at` is at or before `now`.
    async fn sandbox_list_expired(&self, now: OffsetDateTime) -> Result<Vec<SandboxRecord>>;
    /// Number of sandboxes per state name (all tenants), states with none omitted.
    async fn sandbox_count_by_state(&self) -> Result<Vec<(String, i64)>>;
    /// The same for one tenant's sandboxes.
    async fn sandbox_count_by_state_of(&self, tenant: &TenantId) -> Result<Vec<(String, i64)>>;

    // --- audit (append-only) -------------------------------------------

    /// Appends an event durably: it is committed when this returns.
    async fn audit_append(&self, event: &AuditEvent) -> Result<()>;
    /// Events in append order, filtered.
    async fn audit_list(&self, filter: &AuditFilter) -> Result<Page<AuditEvent>>;

    // --- workers --------------------------------------------------------

    async fn worker_upsert(&self, worker: &WorkerRecord) -> Result<()>;
    async fn worker_get(&self, id: &WorkerId) -> Result<Option<WorkerRecord>>;
    async fn worker_list(&self) -> Result<Vec<WorkerRecord>>;
    /// `NotFound` when no such worker.
    async fn worker_set_state(&self, id: &WorkerId, state: WorkerState) -> Result<()>;
    /// A remote worker's heartbeat, in one transaction: records when (`now`)
    /// and its providers' health, brings it back from `down` to `ready` when
    /// it says it is `ready` (a draining worker stays draining), renews the
    /// lease of every live sandbox it holds until `lease_until`, and
    /// returns the worker and those sandboxes. `None` when no such worker.
    async fn worker_heartbeat(
        &self,
        id: &WorkerId,
        health: &[ProviderState],
        ready: bool,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Option<(WorkerRecord, Vec<SandboxRecord>)>>;
    /// Marks the worker `down` if it has not heartbeaten since `before`;
    /// `true` when it did (a heartbeat that raced in keeps it up).
    async fn worker_down_if_silent(&self, id: &WorkerId, before: OffsetDateTime) -> Result<bool>;
    /// Marks `down` every worker registered with `token`; returns how many.
    async fn worker_down_by_token(&self, token: &WorkerTokenId) -> Result<u64>;

    // --- worker tokens --------------------------------------------------

    async fn worker_token_create(&self, token: &WorkerToken) -> Result<()>;
    /// The token with this hash, revoked or not (the caller checks).
    async fn worker_token_by_hash(&self, hash: &str) -> Result<Option<WorkerToken>>;
    async fn worker_token_get(&self, id: &WorkerTokenId) -> Result<Option<WorkerToken>>;
    /// Every token, oldest first.
    async fn worker_token_list(&self) -> Result<Vec<WorkerToken>>;
    /// Marks the token revoked at `at`; `false` when no such token. The
    /// first revocation time stays.
    async fn worker_token_revoke(&self, id: &WorkerTokenId, at: OffsetDateTime) -> Result<bool>;

    // --- volumes --------------------------------------------------------

    /// `Conflict` when the tenant has a volume with that name, `NotFound`
    /// when the tenant does not exist.
    async fn volume_create(&self, volume: &VolumeRecord) -> Result<()>;
    /// The tenant's volume named `name`.
    async fn volume_get(&self, tenant: &TenantId, name: &str) -> Result<Option<VolumeRecord>>;
    /// Volumes by creation, only `tenant`'s when given.
    async fn volume_list(&self, tenant: Option<&TenantId>) -> Result<Vec<VolumeRecord>>;
    /// Records that `sandbox` mounts the volume `volume_id` at `path`;
    /// `NotFound` when the volume was deleted meanwhile.
    async fn volume_attach(
        &self,
        sandbox: &SandboxId,
        volume_id: &VolumeId,
        path: &str,
        read_only: bool,
    ) -> Result<()>;
    /// The live sandboxes (not destroyed, failed or lost) mounting the volume.
    async fn volume_users(&self, volume_id: &VolumeId) -> Result<Vec<SandboxId>>;
    /// Deletes the volume in one transaction with the check that no live
    /// sandbox mounts it (`Conflict` naming one otherwise); `false` when no
    /// such volume.
    async fn volume_delete(&self, volume_id: &VolumeId) -> Result<bool>;

    // --- templates ------------------------------------------------------

    /// Inserts a new version of the tenant's template `version.name`,
    /// numbered one past the highest version that name ever had in that
    /// tenant (deleted ones included, so a number is never reused), and
    /// returns it. `image` is the catalog name without the version, which
    /// is appended to it. `NotFound` when the tenant does not exist.
    async fn template_version_create(&self, version: &TemplateVersion) -> Result<TemplateVersion>;
    async fn template_version_get(&self, id: &TemplateVersionId)
        -> Result<Option<TemplateVersion>>;
    async fn template_version_list(&self, filter: &TemplateFilter) -> Result<Vec<TemplateVersion>>;
    /// Appends `text` to a building version's log and records `at` as its
    /// heartbeat; `false` when the version is no longer building or was
    /// deleted (the build should stop).
    async fn template_log_append(
        &self,
        id: &TemplateVersionId,
        text: &str,
        at: OffsetDateTime,
    ) -> Result<bool>;
    /// Ends a build: writes `state`, `failure` and `built_at` only if the
    /// version is still building and not deleted; `false` (nothing
    /// written) otherwise.
    async fn template_build_finish(&self, version: &TemplateVersion) -> Result<bool>;
    /// Marks every live version of the tenant's template `name` deleted at
    /// `at`; returns them.
    async fn template_delete(
        &self,
        tenant: &TenantId,
        name: &str,
        at: OffsetDateTime,
    ) -> Result<Vec<TemplateVersion>>;
    /// Removes a deleted version's row for good; `false` when no such row.
    async fn template_version_purge(&self, id: &TemplateVersionId) -> Result<bool>;

    // --- time and leadership -------------------------------------------

    /// The store's clock. Lease and heartbeat decisions use it rather than
    /// any one process's, so replicas and workers on hosts whose clocks
    /// disagree still agree on who holds what.
    async fn now(&self) -> Result<OffsetDateTime>;

    /// Takes or renews the lease on the job `name` (a reconciler loop) for
    /// `holder` until `until` (by [`Store::now`]): `true` when `holder`
    /// holds it now. It is granted when nobody holds it, `holder` already
    /// does, or the holder's lease ran out before `now`.
    async fn leader_acquire(
        &self,
        name: &str,
        holder: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool>;
}

/// A shared handle to either backend.
pub type DynStore = Arc<dyn Store>;

/// Opens the store named by `url` — `sqlite://PATH` (created if missing,
/// WAL mode) or `postgres://…` — and runs the embedded migrations.
pub async fn open(url: &str) -> Result<DynStore> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(
            sqlite::SqliteStore::open(std::path::Path::new(path)).await?,
        ))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::open(url).await?))
    } else {
        Err(Error::InvalidRequest(format!(
            "unknown store {url:?}: use sqlite://PATH or postgres://USER@HOST/DB"
        )))
    }
}

/// Whether `err` says the database could not be reached (503 rather than 500).
pub fn is_unavailable(err: &Error) -> bool {
    matches!(err, Error::Unavailable(_))
}
