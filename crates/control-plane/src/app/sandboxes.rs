//! Sandbox lifecycle: validation, quotas, scheduling and the worker calls
//! behind create, list, get, destroy, timeout, pause/resume and logs. Exec
//! is in `exec.rs`, files in `files.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use stacyvm_core::{
    now, validate_sandbox_path, Error, Network, Result, SandboxId, SandboxState, SpawnSpec,
};
use stacyvm_provider::images::{validate_image_name, ImageInfo};
use stacyvm_provider::{AgentClient, LogLine};
use stacyvm_store::{CreateOutcome, Failure, Page, PageRequest, SandboxFilter, SandboxRecord};
use stacyvm_worker::{DynWorker, Lease};
use std::sync::Arc;

use super::{page_limit, App, Principal};
use crate::scheduler::Pin;

/// The lease the row `rec` gives its worker: its fencing token, on its
/// provider.
pub fn lease_for(rec: &SandboxRecord) -> Lease {
    Lease::new(&rec.id, rec.fencing_token, &rec.provider)
}

/// A connection to the agent of the sandbox `lease` names. A runtime that
/// is gone while its row still says it runs (killed outside StacyVM, not
/// yet reconciled) is a conflict with the sandbox's state, not a missing
/// object: the sandbox exists.
pub(super) async fn agent(worker: &DynWorker, lease: &Lease) -> Result<Arc<AgentClient>> {
    worker.agent(lease).await.map_err(|e| match e {
        Error::NotFound(m) => Error::Conflict(format!(
            "sandbox {}'s runtime is gone ({m}); it will be marked lost",
            lease.sandbox_id
        )),
        e => e,
    })
}

/// Whether a tenant with `quota` may create sandboxes on `provider`: the
/// providers its quota lists; by default, every configured provider for the
/// operator's own tenant (`operator`), and every provider that is a
/// security boundary (not `restricted`) for any other tenant.
pub fn provider_allowed(
    quota: &stacyvm_store::Quota,
    operator: bool,
    provider: &str,
    restricted: bool,
) -> bool {
    match &quota.allowed_providers {
        Some(list) => list.iter().any(|p| p == provider),
        None => operator || !restricted,
    }
}

/// `POST /v1/sandboxes`, as the app sees it.
#[derive(Clone, Debug, Default)]
pub struct CreateSandbox {
    pub image: Option<String>,
    pub template: Option<String>,
    pub provider: Option<String>,
    pub cpu: Option<f64>,
    pub memory_mb: Option<i64>,
    pub timeout_s: Option<i64>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Only workers carrying every one of these labels may run it.
    pub worker_labels: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub network: Option<Network>,
    pub idempotency_key: Option<String>,
    /// Only these destinations are reachable (implies egress).
    pub egress_allow: Vec<stacyvm_core::EgressRule>,
    /// Volumes of the caller's tenant to mount.
    pub volumes: Vec<stacyvm_core::VolumeMount>,
}

/// Whether a create made a new sandbox or returned an earlier one.
pub struct Created {
    pub sandbox: SandboxRecord,
    pub existing: bool,
    /// A template's warm-pool member: its `start` runs and its `ready`
    /// passed before it was claimed.
    pub warm: bool,
}

pub(super) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidRequest(msg.into())
}

fn check_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_control()) {
        return Err(invalid(format!(
            "{what} must be 1 to 256 printable characters"
        )));
    }
    Ok(())
}

/// Environment variables: names non-empty without `=` or NUL, values without NUL.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<()> {
    if env.len() > 1024 {
        return Err(invalid("env may hold at most 1024 variables"));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || k.len() > 1024 {
            return Err(invalid(format!(
                "env name {k:?} is invalid (empty, or contains '=' or NUL)"
            )));
        }
        if v.contains('\0') || v.len() > 128 * 1024 {
            return Err(invalid(format!(
                "env value of {k:?} contains a NUL byte or is over 128 KiB"
            )));
        }
    }
    Ok(())
}

pub(super) fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > 64 {
        return Err(invalid("a sandbox may carry at most 64 labels"));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 128
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !key_ok {
            return Err(invalid(format!(
                "label key {k:?} must be 1 to 128 of [A-Za-z0-9._/-]"
            )));
        }
        if v.len() > 256 || v.chars().any(|c| c.is_control()) {
            return Err(invalid(format!(
                "label value of {k:?} must be at most 256 printable characters"
            )));
        }
    }
    Ok(())
}

/// The refusal of an image a tenant may not run: the same for an image the
/// Docker daemon holds and for one it does not.
fn image_not_allowed(image: &str) -> Error {
    Error::ImageNotFound(format!(
        "image {image:?} is not in the image catalog (an admin imports images with \
         `stacyvm image import`; the operator can also let tenants run images of the Docker \
         daemon with `stacyvm serve --docker-images PATTERN`)"
    ))
}

/// Where the image of a sandbox may come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// StacyVM's image catalog only.
    Catalog,
    /// The catalog, or the Docker daemon's own images.
    CatalogOrDaemon,
}

impl App {
    /// The catalog's current version of `image`, if it has one (providers
    /// look there first).
    pub async fn catalog_image(&self, image: &str) -> Result<Option<ImageInfo>> {
        if validate_image_name(image).is_err() {
            return Ok(None);
        }
        match self.catalog.get(image).await {
            Ok(info) => Ok(Some(info)),
            Err(Error::NotFound(_) | Error::ImageNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Where `who` may take `image` from: the catalog always; the Docker
    /// daemon for the operator's own tenant, and for other tenants only the
    /// images the operator allows (`--docker-images`). An image none of
    /// that allows is `ImageNotFound` with one message whatever the daemon
    /// holds, so tenants cannot probe it.
    pub(super) async fn image_source_allowed(
        &self,
        who: &Principal,
        image: &str,
    ) -> Result<ImageSource> {
        if !self.image_visible(who, image).await? {
            return Err(image_not_allowed(image));
        }
        if who.tenant_id == self.system_tenant
            || self.config.docker_images.iter().any(|p| p.allows(image))
        {
            return Ok(ImageSource::CatalogOrDaemon);
        }
        if self.catalog_image(image).await?.is_some() {
            return Ok(ImageSource::Catalog);
        }
        Err(image_not_allowed(image))
    }

    /// Fetches a sandbox the caller may see; another tenant's is `NotFound`.
    pub async fn sandbox_visible(&self, who: &Principal, id: &str) -> Result<SandboxRecord> {
        let not_found = || Error::NotFound(format!("sandbox {id} not found"));
        let id = SandboxId::parse(id).ok_or_else(not_found)?;
        let rec = self.store.sandbox_get(&id).await?.ok_or_else(not_found)?;
        if !who.can_see(&rec.tenant_id) {
            return Err(not_found());
        }
        Ok(rec)
    }

    pub(super) async fn lease_of(&self, rec: &SandboxRecord) -> Result<(DynWorker, Lease)> {
        let worker_id = rec.worker_id.as_ref().ok_or_else(|| {
            Error::Conflict(format!(
                "sandbox {} has no worker (state {})",
                rec.id, rec.state
            ))
        })?;
        let worker = self.scheduler.worker(worker_id).await?;
        Ok((worker, lease_for(rec)))
    }

    /// The agent of a running sandbox the caller may see.
    pub(super) async fn agent_of(&self, who: &Principal, id: &str) -> Result<Arc<AgentClient>> {
        let (_, worker, lease) = self.running(who, id).await?;
        agent(&worker, &lease).await
    }

    /// The sandbox's worker and lease, when it is running.
    pub(super) async fn running(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(SandboxRecord, DynWorker, Lease)> {
        let rec = self.sandbox_visible(who, id).await?;
        if rec.state != SandboxState::Running {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}, not running",
                rec.id, rec.state
            )));
        }
        let (w, l) = self.lease_of(&rec).await?;
        Ok((rec, w, l))
    }

    pub async fn sandbox_create(&self, who: &Principal, mut req: CreateSandbox) -> Result<Created> {
        who.require_write()?;
        let began = std::time::Instant::now();
        let template = self.template_for_create(who, &mut req).await?;
        let created = self
            .sandbox_create_from(who, req, template.as_ref())
            .await?;
        match template {
            Some(t) if !created.existing && !created.warm => {
                self.template_start(created, &t, began).await
            }
            _ => Ok(created),
        }
    }

    /// The create itself. With `template`, the sandbox runs that template
    /// version's image (visible to the caller through the template, not as
    /// an image of its own) and records it; its `start` and `ready` are
    /// the caller's business.
    pub(super) async fn sandbox_create_from(
        &self,
        who: &Principal,
        req: CreateSandbox,
        template: Option<&super::templates::ResolvedTemplate>,
    ) -> Result<Created> {
        who.require_write()?;
        let limits = &self.config.limits;
        let image = match (template, &req.image, &req.template) {
            (Some(t), _, _) => t.version.image.clone(),
            (None, Some(i), _) => i.clone(),
            (None, None, Some(t)) => t.clone(),
            (None, None, None) => return Err(invalid("image or template is required")),
        };
        check_name("image", &image)?;
        if let Some(t) = &req.template {
            check_name("template", t)?;
        }
        let cpu = req.cpu.unwrap_or(limits.default_cpu);
        if !cpu.is_finite() || cpu <= 0.0 || cpu > limits.max_cpu {
            return Err(invalid(format!(
                "cpu must be more than 0 and at most {}",
                limits.max_cpu
            )));
        }
        let memory_mb = req.memory_mb.unwrap_or(limits.default_memory_mb);
        if memory_mb < limits.min_memory_mb || memory_mb > limits.max_memory_mb {
            return Err(invalid(format!(
                "memory_mb must be between {} and {}",
                limits.min_memory_mb, limits.max_memory_mb
            )));
        }
        let timeout_s = req.timeout_s.unwrap_or(limits.default_sandbox_timeout_s);
        if timeout_s < 1 || timeout_s > limits.max_sandbox_timeout_s {
            return Err(invalid(format!(
                "timeout_s must be between 1 and {}",
                limits.max_sandbox_timeout_s
            )));
        }
        check_env(&req.env)?;
        check_labels(&req.labels)?;
        check_labels(&req.worker_labels)
            .map_err(|e| invalid(format!("worker_labels: {}", e.message())))?;
        let workdir = req
            .workdir
            .as_deref()
            .map(validate_sandbox_path)
            .transpose()?;
        if let Some(k) = &req.idempotency_key {
            if k.is_empty() || k.len() > 256 || k.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    "Idempotency-Key must be 1 to 256 printable characters",
                ));
            }
        }
        let quota = self.store.quota_get(&who.tenant_id).await?;
        if let Some(max) = quota.max_timeout_s {
            if timeout_s > max {
                return Err(Error::QuotaExceeded(format!(
                    "quota exceeded: max_timeout_s is {max} and {timeout_s} was asked"
                )));
            }
        }
        if let Some(provider) = &req.provider {
            check_name("provider", provider)?;
        }
        let provider = self
            .scheduler
            .choose_provider(req.provider.as_deref(), |p| {
                provider_allowed(
                    &quota,
                    who.tenant_id == self.system_tenant,
                    p,
                    self.scheduler.is_restricted(p),
                )
            })
            .await?;
        let source = match template {
            Some(_) => ImageSource::Catalog,
            None => self.image_source_allowed(who, &image).await?,
        };
        let volumes = self.volumes_resolve(who, &req.volumes).await?;

        let rec = SandboxRecord {
            id: SandboxId::generate(),
            tenant_id: who.tenant_id.clone(),
            state: SandboxState::Pending,
            provider,
            worker_id: None,
            image,
            template: template.map(|t| t.label()).or_else(|| req.template.clone()),
            cpu,
            memory_mb,
            network: req.network.unwrap_or_default(),
            labels: req.labels.clone(),
            env: req.env.clone(),
            workdir,
            timeout_s,
            created_at: now(),
            started_at: None,
            expires_at: None,
            destroyed_at: None,
            failure: None,
            lease_expires_at: None,
            fencing_token: 0,
            idempotency_key: req.idempotency_key.clone(),
            egress_allow: req.egress_allow.clone(),
        };
        let plain = req.worker_labels.is_empty()
            && rec.egress_allow.is_empty()
            && volumes.volumes.is_empty();
        let pooled = match template {
            None if plain
                && super::pools::matches_defaults(self, rec.cpu, rec.memory_mb, rec.network) =>
            {
                self.pools.take(&rec.provider, &rec.image, source)
            }
            // A template's member was spawned, started and made ready with
            // the template's defaults: only a create that asks for exactly
            // those may take it, or its `start` would have run differently.
            Some(t) if plain => {
                let shape = super::pools::template_shape(self, t);
                let same = rec.cpu == shape.cpu
                    && rec.memory_mb == shape.memory_mb
                    && rec.env == shape.env
                    && rec.workdir == shape.workdir
                    && rec.network == Network::None;
                if same {
                    self.pools.take_template(&rec.provider, &t.version.id)
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(member) = pooled {
            let mut rec = rec;
            rec.id = member.sandbox_id.clone();
            // The runtime already runs, so the row is born running on its
            // worker with the first lease (fencing token 1): one
            // quota-checked insert is the whole claim.
            let started = now();
            rec.state = SandboxState::Running;
            rec.worker_id = Some(member.worker.id().clone());
            rec.lease_expires_at = Some(started + self.config.limits.lease);
            rec.fencing_token = 1;
            rec.started_at = Some(started);
            rec.expires_at = Some(started + Duration::from_secs(rec.timeout_s as u64));
            let rec = match self.store.sandbox_create(&rec).await {
                Ok(CreateOutcome::Created(rec)) => rec,
                Ok(CreateOutcome::Existing(existing)) => {
                    self.pools.put_back(member);
                    return Ok(Created {
                        sandbox: existing,
                        existing: true,
                        warm: false,
                    });
                }
                Err(e) => {
                    self.pools.put_back(member);
                    return Err(e);
                }
            };
            // The row exists now, so the member is an ordinary sandbox.
            self.pools.release(&rec.id);
            self.pool_wake.notify_one();
            let sandbox = self.sandbox_prepare_member(rec, member.worker).await?;
            return Ok(Created {
                sandbox,
                existing: false,
                warm: template.is_some(),
            });
        }
        let mut rec = match self.store.sandbox_create(&rec).await? {
            CreateOutcome::Existing(existing) => {
                return Ok(Created {
                    sandbox: existing,
                    existing: true,
                    warm: false,
                });
            }
            CreateOutcome::Created(rec) => rec,
        };
        // Checked again now that a live row holds the image (an image live
        // sandboxes use cannot be deleted): one deleted between the first
        // check and the insert would let the provider fall back to a Docker
        // image of the same name.
        if source == ImageSource::Catalog && self.catalog_image(&rec.image).await?.is_none() {
            let e = image_not_allowed(&rec.image);
            self.mark_failed(&mut rec, &e).await;
            return Err(e);
        }
        let mounts = match self.volumes_attach(&rec.id, &volumes).await {
            Ok(m) => m,
            Err(e) => {
                self.mark_failed(&mut rec, &e).await;
                return Err(e);
            }
        };
        // A sandbox runs where its volumes are kept.
        let pin = if volumes.volumes.is_empty() {
            Pin::Any
        } else {
            match &volumes.holder {
                Some(w) => Pin::Worker(w.clone()),
                None => Pin::Local,
            }
        };
        let sandbox = self
            .sandbox_start(rec, &req.worker_labels, mounts, pin)
            .await?;
        Ok(Created {
            sandbox,
            existing: false,
            warm: false,
        })
    }

    /// Gives a claimed warm-pool member what the create asked for beyond
    /// the row: its working directory.
    async fn sandbox_prepare_member(
        &self,
        mut rec: SandboxRecord,
        worker: DynWorker,
    ) -> Result<SandboxRecord> {
        let Some(dir) = rec.workdir.clone() else {
            return Ok(rec);
        };
        let lease = lease_for(&rec);
        let made = async { agent(&worker, &lease).await?.file_mkdir(&dir, true).await }.await;
        if let Err(e) = made {
            if !matches!(e, Error::Conflict(_)) {
                let _ = worker.destroy(&lease).await;
                self.mark_failed(&mut rec, &e).await;
                return Err(e);
            }
        }
        Ok(rec)
    }

    /// Places a pending sandbox on a worker and spawns it; on failure the
    /// sandbox is marked `failed` with the reason and nothing is left behind.
    async fn sandbox_start(
        &self,
        mut rec: SandboxRecord,
        worker_labels: &BTreeMap<String, String>,
        mounts: Vec<stacyvm_core::HostMount>,
        pin: Pin,
    ) -> Result<SandboxRecord> {
        let lease_until = self.store.now().await? + self.config.limits.lease;
        let placed = self
            .scheduler
            .place(&rec, worker_labels, lease_until, &pin)
            .await;
        let (worker, placed) = match placed {
            Ok(w) => w,
            Err(e) => {
                self.mark_failed(&mut rec, &e).await;
                return Err(e);
            }
        };
        rec = placed;
        // Placement made it `starting` unless a destroy came first.
        if rec.state != SandboxState::Starting {
            return Err(Error::Conflict(format!(
                "sandbox {} was {} before it started",
                rec.id, rec.state
            )));
        }
        let spec = SpawnSpec {
            sandbox_id: rec.id.clone(),
            image: rec.image.clone(),
            cpu: rec.cpu,
            memory_mb: rec.memory_mb as u64,
            env: rec.env.clone(),
            workdir: rec.workdir.clone(),
            network: rec.network,
            labels: rec.labels.clone(),
            egress_allow: rec.egress_allow.clone(),
            mounts,
        };
        let lease = lease_for(&rec);
        if let Err(e) = worker.spawn(&lease, &spec).await {
            metrics::counter!("stacyvm_provider_errors_total", "provider" => rec.provider.clone(), "op" => "spawn")
                .increment(1);
            // Spawn cleans up after itself; destroy again in case it could not.
            let _ = worker.destroy(&lease).await;
            self.mark_failed(&mut rec, &e).await;
            return Err(e);
        }
        // A destroy may have raced with the spawn; it wins.
        let current = self
            .store
            .sandbox_get(&rec.id)
            .await?
            .unwrap_or_else(|| rec.clone());
        if current.state != SandboxState::Starting {
            let _ = worker.destroy(&lease).await;
            return Err(Error::Conflict(format!(
                "sandbox {} was {} while it started",
                rec.id, current.state
            )));
        }
        let started = now();
        rec.state = SandboxState::Running;
        rec.started_at = Some(started);
        rec.expires_at = Some(started + Duration::from_secs(rec.timeout_s as u64));
        self.store.sandbox_update(&rec).await?;
        Ok(rec)
    }

    async fn mark_failed(&self, rec: &mut SandboxRecord, err: &Error) {
        rec.state = SandboxState::Failed;
        rec.failure = Some(Failure {
            code: err.code().to_owned(),
            message: err.message(),
        });
        rec.destroyed_at = Some(now());
        if let Err(e) = self.store.sandbox_update(rec).await {
            tracing::error!(sandbox = %rec.id, error = %e, "could not record a failed spawn");
        }
    }

    pub async fn sandbox_list(
        &self,
        who: &Principal,
        state: Option<SandboxState>,
        labels: Vec<(String, String)>,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<Page<SandboxRecord>> {
        let states = state.into_iter().collect();
        self.sandbox_list_in(who, states, labels, limit, cursor, false)
            .await
    }

    /// As [`App::sandbox_list`], with the state any of `states` (any state
    /// when empty), newest first when asked.
    pub async fn sandbox_list_in(
        &self,
        who: &Principal,
        states: Vec<SandboxState>,
        labels: Vec<(String, String)>,
        limit: Option<u32>,
        cursor: Option<String>,
        newest_first: bool,
    ) -> Result<Page<SandboxRecord>> {
        let filter = SandboxFilter {
            tenant_id: if who.is_admin() {
                None
            } else {
                Some(who.tenant_id.clone())
            },
            state: None,
            any_state: states,
            labels,
            page: PageRequest {
                cursor,
                limit: page_limit(limit)?,
            },
            newest_first,
        };
        self.store.sandbox_list(&filter).await
    }

    pub async fn sandbox_destroy(&self, who: &Principal, id: &str) -> Result<()> {
        who.require_write()?;
        let mut rec = self.sandbox_visible(who, id).await?;
        // The row may change under a destroy: a worker whose lease lapsed
        // meanwhile has its sandboxes marked lost, under a new fencing
        // token. The caller still wants the sandbox gone, so the destroy
        // goes again on the row as it is now.
        for _ in 0..3 {
            match self.destroy_record(rec).await {
                Err(e) if stacyvm_store::is_stale_fencing(&e) => {
                    rec = self.sandbox_visible(who, id).await?;
                }
                done => return done,
            }
        }
        self.destroy_record(rec).await
    }

    /// Tears down a sandbox's runtime and marks it destroyed. Idempotent.
    pub async fn destroy_record(&self, mut rec: SandboxRecord) -> Result<()> {
        if rec.state == SandboxState::Destroyed {
            return Ok(());
        }
        let was = rec.state;
        self.ports.forget(rec.id.as_ref());
        self.e2b_forget_watches(&rec.id);
        self.stats_book.forget(&rec.id);
        if rec.state != SandboxState::Stopping {
            rec.state = SandboxState::Stopping;
            self.store.sandbox_update(&rec).await?;
        }
        if let Some(worker_id) = rec.worker_id.clone() {
            let destroyed = async {
                let (worker, lease) = self.lease_of(&rec).await?;
                worker.destroy(&lease).await
            }
            .await;
            match destroyed {
                Ok(()) => {}
                // A remote worker that cannot be reached holds no lease on
                // the sandbox once this row is final: it destroys the
                // runtime itself when it is back (it never keeps a runtime
                // it holds no lease for).
                Err(Error::Unavailable(m)) if !self.scheduler.is_local(&worker_id) => {
                    tracing::warn!(sandbox = %rec.id, worker = %worker_id, reason = %m,
                        "destroyed a sandbox whose worker is unreachable; the worker removes the runtime when it returns");
                }
                Err(e) => {
                    metrics::counter!("stacyvm_provider_errors_total", "provider" => rec.provider.clone(), "op" => "destroy")
                        .increment(1);
                    return Err(e);
                }
            }
        }
        rec.state = SandboxState::Destroyed;
        if rec.destroyed_at.is_none() || was != SandboxState::Failed {
            rec.destroyed_at = Some(now());
        }
        self.store.sandbox_update(&rec).await
    }

    pub async fn sandbox_set_timeout(
        &self,
        who: &Principal,
        id: &str,
        timeout_s: i64,
    ) -> Result<SandboxRecord> {
        who.require_write()?;
        let max = self.config.limits.max_sandbox_timeout_s;
        if timeout_s < 1 || timeout_s > max {
            return Err(invalid(format!("timeout_s must be between 1 and {max}")));
        }
        let mut rec = self.sandbox_visible(who, id).await?;
        if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}",
                rec.id, rec.state
            )));
        }
        let quota = self.store.quota_get(&rec.tenant_id).await?;
        if let Some(max) = quota.max_timeout_s {
            if timeout_s > max {
                return Err(Error::QuotaExceeded(format!(
                    "quota exceeded: max_timeout_s is {max} and {timeout_s} was asked"
                )));
            }
        }
        rec.expires_at = Some(now() + Duration::from_secs(timeout_s as u64));
        self.store.sandbox_update(&rec).await?;
        Ok(rec)
    }

    pub async fn sandbox_pause(
        &self,
        who: &Principal,
        id: &str,
        pause: bool,
    ) -> Result<SandboxRecord> {
        who.require_write()?;
        let mut rec = self.sandbox_visible(who, id).await?;
        let (from, to) = if pause {
            (SandboxState::Running, SandboxState::Paused)
        } else {
            (SandboxState::Paused, SandboxState::Running)
        };
        if rec.state == to {
            return Ok(rec);
        }
        if rec.state != from {
            return Err(Error::Conflict(format!(
                "sandbox {} is {}",
                rec.id, rec.state
            )));
        }
        let (worker, lease) = self.lease_of(&rec).await?;
        if pause {
            worker.pause(&lease).await?;
        } else {
            worker.resume(&lease).await?;
        }
        rec.state = to;
        self.store.sandbox_update(&rec).await?;
        Ok(rec)
    }

    /// Lifecycle lines from the record, then the provider's and runtime's.
    pub async fn sandbox_logs(&self, who: &Principal, id: &str) -> Result<Vec<LogLine>> {
        Ok(self.sandbox_logs_and_state(who, id).await?.1)
    }

    /// The logs and the state they were read in, from one read of the
    /// record (a log follower polls this).
    pub async fn sandbox_logs_and_state(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(SandboxState, Vec<LogLine>)> {
        let rec = self.sandbox_visible(who, id).await?;
        let mut lines = lifecycle_lines(&rec);
        if !rec.state.is_terminal() && rec.worker_id.is_some() {
            let (worker, lease) = self.lease_of(&rec).await?;
            match worker.logs(&lease).await {
                Ok(l) => lines.extend(l),
                Err(e) => lines.push(LogLine {
                    ts: now(),
                    source: "provider".into(),
                    message: format!("logs unavailable: {e}"),
                }),
            }
        }
        lines.sort_by_key(|l| l.ts);
        Ok((rec.state, lines))
    }
}

fn lifecycle_lines(rec: &SandboxRecord) -> Vec<LogLine> {
    let line = |ts, message: String| LogLine {
        ts,
        source: "lifecycle".into(),
        message,
    };
    let mut out = vec![line(
        rec.created_at,
        format!(
            "created: image {} on provider {} (cpu {}, memory {} MiB)",
            rec.image, rec.provider, rec.cpu, rec.memory_mb
        ),
    )];
    if let Some(t) = rec.started_at {
        out.push(line(t, "running".into()));
    }
    if let Some(f) = &rec.failure {
        out.push(line(
            rec.destroyed_at.unwrap_or(rec.created_at),
            format!("failed ({}): {}", f.code, f.message),
        ));
    }
    if rec.state == SandboxState::Destroyed {
        if let Some(t) = rec.destroyed_at {
            out.push(line(t, "destroyed".into()));
        }
    }
    if rec.state == SandboxState::Lost {
        out.push(line(
            rec.destroyed_at.unwrap_or(rec.created_at),
            "lost: its worker or runtime went away".into(),
        ));
    }
    out
}
