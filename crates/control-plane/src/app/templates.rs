//! Templates: a build runs its steps in a real sandbox of the base, streams
//! the log into the store, snapshots the result into the image catalog
//! (through [`App::snapshot_image`], the snapshot path every sandbox has)
//! and records the create defaults; creates from a template take its newest
//! ready version (or a pinned one), apply its defaults, start its `start`
//! command and wait for `ready`.
//!
//! Nothing is left half-registered: a build that fails or is cut off
//! leaves its version `failed`, with no sandbox and no image. Catalog names
//! are global, so a version's image is `template/TENANT/NAME:VERSION`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use stacyvm_api as api;
use stacyvm_core::{
    now, validate_sandbox_path, Error, ExecEvent, ExecRequest, Network, Result, SandboxState,
    TemplateVersionId, TenantId,
};
use stacyvm_store::{SandboxFilter, TemplateFilter, TemplateState, TemplateVersion};

use super::sandboxes::{agent, check_env, invalid, CreateSandbox, Created};
use super::{App, Principal};

/// A version as the store keeps it (the HTTP layer names the store's
/// types only through the app).
pub type VersionRow = TemplateVersion;

/// The label that ties a build's sandbox to its template version, so that
/// a build cut off by a crash can find its sandbox again.
pub const BUILD_LABEL: &str = "stacyvm.template.build";

/// How long a build may run unless it asks otherwise.
const DEFAULT_BUILD_TIMEOUT_S: i64 = 1800;

/// A build that has not shown a sign of life for this long was cut off
/// with the process running it.
const BUILD_STALE: Duration = Duration::from_secs(60);

/// How often a running build shows it is alive.
const BUILD_HEARTBEAT: Duration = Duration::from_secs(10);

/// The most of a build's log kept; later output is dropped with a note.
const MAX_LOG: usize = 1024 * 1024;

/// The most of a failing step's output quoted in the build's failure.
const FAILURE_OUTPUT: usize = 4096;

/// What a template gives the sandboxes created from it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Defaults {
    pub cpu: Option<f64>,
    pub memory_mb: Option<i64>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub start: Option<Vec<String>>,
    pub ready: Option<Vec<String>>,
}

/// What a version's row keeps besides its state: the base and the steps
/// as asked (uploaded archives left out), and the create defaults.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Spec {
    from: String,
    steps: Vec<serde_json::Value>,
    defaults: Defaults,
}

fn spec_of(v: &TemplateVersion) -> Result<Spec> {
    serde_json::from_value(v.spec.clone())
        .map_err(|e| Error::internal("reading a template's stored spec", e))
}

/// A template version a create or a build starts from.
#[derive(Clone, Debug)]
pub struct ResolvedTemplate {
    pub version: TemplateVersion,
    pub defaults: Defaults,
}

impl ResolvedTemplate {
    /// `name:version`, as the sandbox records it.
    pub fn label(&self) -> String {
        format!("{}:{}", self.version.name, self.version.version)
    }
}

/// Checks a template name: it becomes one part of a catalog image name.
fn check_template_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "template name {name:?} must be 1 to 63 of a-z, 0-9, '.', '_', '-', starting with a \
             letter or a digit"
        )))
    }
}

/// Whether `name` can name a template (no version).
pub fn is_template_name(name: &str) -> bool {
    check_template_name(name).is_ok()
}

/// Splits `name` or `name:version`; `None` when it cannot name a template
/// (it may still name an image).
fn parse_ref(reference: &str) -> Option<(&str, Option<i64>)> {
    let (name, version) = match reference.rsplit_once(':') {
        Some((n, v)) => (n, Some(v.parse::<i64>().ok().filter(|v| *v > 0)?)),
        None => (reference, None),
    };
    check_template_name(name).ok()?;
    Some((name, version))
}

fn check_argv(what: &str, argv: &[String]) -> Result<()> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(invalid(format!(
            "{what} must hold at least the program to run"
        )));
    }
    if argv.len() > 4096 || argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid(format!(
            "{what} arguments must not contain NUL bytes (and at most 4096 of them)"
        )));
    }
    Ok(())
}

fn parse_mode(mode: &str) -> Result<u32> {
    u32::from_str_radix(mode, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            invalid(format!(
                "mode {mode:?} must be octal permissions like \"0644\""
            ))
        })
}

/// A step checked and ready to run.
enum Step {
    Run(Vec<String>),
    Write {
        path: String,
        content: Vec<u8>,
        mode: Option<u32>,
    },
    Upload {
        path: String,
        tar: Vec<u8>,
    },
    Env(BTreeMap<String, String>),
    Workdir(String),
}

impl Step {
    fn describe(&self) -> String {
        match self {
            Step::Run(argv) => format!("run {}", serde_json::json!(argv)),
            Step::Write { path, content, .. } => {
                format!("write {path} ({} bytes)", content.len())
            }
            Step::Upload { path, tar } => {
                format!("upload into {path} ({} bytes of tar)", tar.len())
            }
            Step::Env(env) => format!("env {}", env.keys().cloned().collect::<Vec<_>>().join(", ")),
            Step::Workdir(dir) => format!("workdir {dir}"),
        }
    }
}

fn check_steps(steps: Vec<api::TemplateStep>) -> Result<(Vec<Step>, Vec<serde_json::Value>)> {
    if steps.len() > 256 {
        return Err(invalid("a template may have at most 256 steps"));
    }
    let mut checked = Vec::with_capacity(steps.len());
    let mut recorded = Vec::with_capacity(steps.len());
    for (i, step) in steps.into_iter().enumerate() {
        let n = i + 1;
        let at = |e: Error| invalid(format!("step {n}: {}", e.message()));
        recorded.push(match &step {
            api::TemplateStep::Upload(u) => serde_json::json!({"upload": {"path": u.path}}),
            other => serde_json::to_value(other).unwrap_or_default(),
        });
        checked.push(match step {
            api::TemplateStep::Run(argv) => {
                check_argv("run", &argv).map_err(at)?;
                Step::Run(argv)
            }
            api::TemplateStep::Write(w) => Step::Write {
                path: validate_sandbox_path(&w.path).map_err(at)?,
                mode: w.mode.as_deref().map(parse_mode).transpose().map_err(at)?,
                content: w.content.into_bytes(),
            },
            api::TemplateStep::Upload(u) => Step::Upload {
                path: validate_sandbox_path(&u.path).map_err(at)?,
                tar: base64::engine::general_purpose::STANDARD
                    .decode(u.tar.as_bytes())
                    .map_err(|e| invalid(format!("step {n}: tar is not base64: {e}")))?,
            },
            api::TemplateStep::Env(env) => {
                check_env(&env).map_err(at)?;
                Step::Env(env)
            }
            api::TemplateStep::Workdir(dir) => {
                Step::Workdir(validate_sandbox_path(&dir).map_err(at)?)
            }
        });
    }
    Ok((checked, recorded))
}

/// The answer shape of a version.
pub fn view(v: &TemplateVersion) -> api::Template {
    let spec = spec_of(v).ok();
    let defaults = spec
        .as_ref()
        .map(|s| s.defaults.clone())
        .unwrap_or_default();
    api::Template {
        name: v.name.clone(),
        version: v.version,
        state: match v.state {
            TemplateState::Building => api::TemplateState::Building,
            TemplateState::Ready => api::TemplateState::Ready,
            TemplateState::Failed => api::TemplateState::Failed,
        },
        image: (v.state == TemplateState::Ready).then(|| v.image.clone()),
        failure: v.failure.clone(),
        created_at: v.created_at,
        built_at: v.built_at,
        tenant_id: v.tenant_id.to_string(),
        from: spec.map(|s| s.from).unwrap_or_default(),
        cpu: defaults.cpu,
        memory_mb: defaults.memory_mb,
        env: defaults.env,
        workdir: defaults.workdir,
        start: defaults.start,
        ready: defaults.ready,
    }
}

/// A build's log on its way into the store: written in batches, capped,
/// and each write doubles as the build's heartbeat.
struct BuildLog<'a> {
    app: &'a App,
    id: TemplateVersionId,
    pending: String,
    written: usize,
    last_flush: Instant,
    capped: bool,
}

impl BuildLog<'_> {
    async fn push(&mut self, text: &str) {
        if self.capped {
            return;
        }
        if self.written + self.pending.len() + text.len() > MAX_LOG {
            self.capped = true;
            self.pending
                .push_str("\n[the build log is over 1 MiB; later output is not kept]\n");
        } else {
            self.pending.push_str(text);
        }
        if self.last_flush.elapsed() >= Duration::from_millis(250) || self.pending.len() > 65536 {
            self.flush().await;
        }
    }

    async fn line(&mut self, text: &str) {
        self.push(&format!("{text}\n")).await;
        self.flush().await;
    }

    async fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.pending);
        self.written += text.len();
        if let Err(e) = self
            .app
            .store
            .template_log_append(&self.id, &text, now())
            .await
        {
            tracing::warn!(version = %self.id, error = %e, "could not store a build's log");
        }
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

impl App {
    /// The tenants whose templates `who` sees, its own first: its own and
    /// the operator's (the public catalog).
    fn template_tenants(&self, who: &Principal) -> Vec<TenantId> {
        let mut tenants = vec![who.tenant_id.clone()];
        if who.tenant_id != self.system_tenant {
            tenants.push(self.system_tenant.clone());
        }
        tenants
    }

    /// The live versions of the template `name` that `who` sees, oldest
    /// first: its own tenant's if it has one by that name, else the
    /// operator's.
    async fn template_versions_visible(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<Vec<TemplateVersion>> {
        for tenant in self.template_tenants(who) {
            let versions = self
                .store
                .template_version_list(&TemplateFilter {
                    tenants: vec![tenant],
                    name: Some(name.to_owned()),
                    ..Default::default()
                })
                .await?;
            if !versions.is_empty() {
                return Ok(versions);
            }
        }
        Ok(Vec::new())
    }

    /// The version `reference` (`name` or `name:version`) names for a
    /// create: the pinned one, or the newest ready one. `None` when no
    /// template of that name is visible (the reference may name an image);
    /// `ImageNotFound` when the template exists but has no such ready
    /// version.
    pub async fn template_resolve(
        &self,
        who: &Principal,
        reference: &str,
    ) -> Result<Option<ResolvedTemplate>> {
        let Some((name, pinned)) = parse_ref(reference) else {
            return Ok(None);
        };
        let versions = self.template_versions_visible(who, name).await?;
        if versions.is_empty() {
            return Ok(None);
        }
        let chosen = match pinned {
            Some(n) => versions.into_iter().find(|v| v.version == n).ok_or_else(|| {
                Error::ImageNotFound(format!("template {name:?} has no version {n}"))
            })?,
            None => versions
                .into_iter()
                .rev()
                .find(|v| v.state == TemplateState::Ready)
                .ok_or_else(|| {
                    Error::ImageNotFound(format!(
                        "template {name:?} has no ready version yet (see `stacyvm template get {name}`)"
                    ))
                })?,
        };
        if chosen.state != TemplateState::Ready {
            return Err(Error::ImageNotFound(format!(
                "template {name:?} version {} is {}, not ready",
                chosen.version,
                chosen.state.as_str()
            )));
        }
        let defaults = spec_of(&chosen)?.defaults;
        Ok(Some(ResolvedTemplate {
            version: chosen,
            defaults,
        }))
    }

    /// Applies the template a create names to the create: its defaults
    /// where the create left a field out (env merged, the create's values
    /// winning). `None` when the create names an image.
    pub(super) async fn template_for_create(
        &self,
        who: &Principal,
        req: &mut CreateSandbox,
    ) -> Result<Option<ResolvedTemplate>> {
        let (None, Some(reference)) = (&req.image, &req.template) else {
            return Ok(None);
        };
        let Some(t) = self.template_resolve(who, reference).await? else {
            return Ok(None);
        };
        let d = &t.defaults;
        req.cpu = req.cpu.or(d.cpu);
        req.memory_mb = req.memory_mb.or(d.memory_mb);
        if req.workdir.is_none() {
            req.workdir.clone_from(&d.workdir);
        }
        let mut env = d.env.clone();
        env.extend(std::mem::take(&mut req.env));
        req.env = env;
        Ok(Some(t))
    }

    /// After a create from a template: starts its `start` command as a
    /// background process and waits until `ready` exits 0, within what is
    /// left of the create's time. A sandbox that does not get ready is
    /// destroyed and the create fails with `ready`'s last output.
    pub(super) async fn template_start(
        &self,
        created: Created,
        t: &ResolvedTemplate,
        began: Instant,
    ) -> Result<Created> {
        let rec = created.sandbox.clone();
        let result = async {
            let (worker, lease) = self.lease_of(&rec).await?;
            self.template_run_start(&worker, &lease, &rec.env, &rec.workdir, t, began)
                .await
        }
        .await;
        match result {
            Ok(()) => Ok(created),
            Err(e) => {
                if let Err(d) = self.destroy_record(rec).await {
                    tracing::warn!(error = %d, "could not destroy a sandbox that did not get ready");
                }
                Err(e)
            }
        }
    }

    /// Starts template `t`'s `start` command in the sandbox of `lease` and
    /// waits until its `ready` exits 0 (a cold create and a warm-pool
    /// member alike), within the request timeout counted from `began`.
    pub(super) async fn template_run_start(
        &self,
        worker: &stacyvm_worker::DynWorker,
        lease: &stacyvm_worker::Lease,
        env: &BTreeMap<String, String>,
        workdir: &Option<String>,
        t: &ResolvedTemplate,
        began: Instant,
    ) -> Result<()> {
        let agent = agent(worker, lease).await?;
        if let Some(start) = &t.defaults.start {
            agent
                .proc_start(start.clone(), env.clone(), workdir.clone(), None)
                .await?;
        }
        let Some(ready) = &t.defaults.ready else {
            return Ok(());
        };
        // The HTTP layer answers 504 at the request timeout; finishing
        // a little before it lets this create say why.
        let budget = self
            .config
            .limits
            .request_timeout
            .saturating_sub(Duration::from_secs(2))
            .max(Duration::from_secs(1));
        let deadline = began + budget;
        let mut pause = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let out = agent
                .exec(ExecRequest {
                    cmd: ready.clone(),
                    env: env.clone(),
                    cwd: workdir.clone(),
                    stdin: None,
                    timeout_ms: left.as_millis().clamp(100, 30_000) as u64,
                    output_cap: 64 * 1024,
                    user: None,
                })
                .await?;
            if out.status.exit_code == Some(0) {
                return Ok(());
            }
            if Instant::now() + pause >= deadline {
                let output = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                let ended = match (out.status.exit_code, out.status.signal) {
                    (_, _) if out.status.timed_out => "timed out".to_owned(),
                    (Some(c), _) => format!("exited with code {c}"),
                    (None, Some(s)) => format!("was killed by signal {s}"),
                    (None, None) => "ended".to_owned(),
                };
                return Err(Error::Timeout(format!(
                    "template {}'s ready command {} did not exit 0 within {} s; its last run \
                     {ended}: {}",
                    t.label(),
                    serde_json::json!(ready),
                    budget.as_secs(),
                    tail(&output, FAILURE_OUTPUT).trim_end()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// The newest ready version of `tenant`'s template `name`, if any (a
    /// template warm pool's target).
    pub(super) async fn template_newest_ready(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> Result<Option<ResolvedTemplate>> {
        let versions = self
            .store
            .template_version_list(&TemplateFilter {
                tenants: vec![tenant.clone()],
                name: Some(name.to_owned()),
                ..Default::default()
            })
            .await?;
        let Some(newest) = versions
            .into_iter()
            .rev()
            .find(|v| v.state == TemplateState::Ready)
        else {
            return Ok(None);
        };
        let defaults = spec_of(&newest)?.defaults;
        Ok(Some(ResolvedTemplate {
            version: newest,
            defaults,
        }))
    }

    /// `POST /v1/templates`: checks the request, resolves the base, records
    /// a new `building` version and runs the build in the background.
    pub async fn template_build(
        self: &Arc<Self>,
        who: &Principal,
        req: api::CreateTemplate,
    ) -> Result<TemplateVersion> {
        who.require_write()?;
        check_template_name(&req.name)?;
        if req.from.is_empty() || req.from.len() > 256 || req.from.chars().any(char::is_control) {
            return Err(invalid("from must be 1 to 256 printable characters"));
        }
        let (steps, recorded) = check_steps(req.steps)?;
        check_env(&req.env)?;
        let workdir = req
            .workdir
            .as_deref()
            .map(validate_sandbox_path)
            .transpose()?;
        if let Some(start) = &req.start {
            check_argv("start", start)?;
        }
        if let Some(ready) = &req.ready {
            check_argv("ready", ready)?;
        }
        let timeout_s = req.timeout_s.unwrap_or(DEFAULT_BUILD_TIMEOUT_S);
        let max = self.config.limits.max_sandbox_timeout_s;
        if timeout_s < 1 || timeout_s > max {
            return Err(invalid(format!("timeout_s must be between 1 and {max}")));
        }
        // Its image will take space the tenant may not have: a tenant at its
        // storage limit is refused before a sandbox starts (the snapshot
        // checks again once the image's size is known). `max_templates` is
        // checked where the version is numbered, in one transaction.
        self.storage_check(&who.tenant_id, 1).await?;
        // The base: a visible template first, then an image the caller may run.
        let parent = self.template_resolve(who, &req.from).await?;
        if parent.is_none() {
            self.image_source_allowed(who, &req.from).await?;
        }
        let inherited = parent
            .as_ref()
            .map(|p| p.defaults.clone())
            .unwrap_or_default();
        let mut defaults = Defaults {
            cpu: req.cpu.or(inherited.cpu),
            memory_mb: req.memory_mb.or(inherited.memory_mb),
            env: inherited.env,
            workdir: inherited.workdir,
            start: req.start.or(inherited.start),
            ready: req.ready.or(inherited.ready),
        };
        for step in &steps {
            match step {
                Step::Env(env) => defaults.env.extend(env.clone()),
                Step::Workdir(dir) => defaults.workdir = Some(dir.clone()),
                _ => {}
            }
        }
        defaults.env.extend(req.env);
        if workdir.is_some() {
            defaults.workdir = workdir;
        }
        let spec = Spec {
            from: req.from.clone(),
            steps: recorded,
            defaults,
        };
        let at = now();
        let version = self
            .store
            .template_version_create(&TemplateVersion {
                id: TemplateVersionId::generate(),
                tenant_id: who.tenant_id.clone(),
                name: req.name.clone(),
                version: 0,
                state: TemplateState::Building,
                image: format!("template/{}/{}:", who.tenant_id, req.name),
                spec: serde_json::to_value(&spec)
                    .map_err(|e| Error::internal("encoding a template spec", e))?,
                failure: None,
                log: String::new(),
                created_at: at,
                built_at: None,
                heartbeat_at: at,
                deleted_at: None,
            })
            .await?;
        let plan = BuildPlan {
            who: who.clone(),
            base: req.from,
            parent,
            steps,
            cpu: req.cpu,
            memory_mb: req.memory_mb,
            network: match req.network {
                Some(api::Network::Egress) => Network::Egress,
                _ => Network::None,
            },
            provider: req.provider,
            timeout: Duration::from_secs(timeout_s as u64),
        };
        let app = self.clone();
        let v = version.clone();
        tokio::spawn(async move { app.template_build_run(v, plan).await });
        Ok(version)
    }

    /// Runs one build to its end and records how it ended.
    async fn template_build_run(self: Arc<Self>, v: TemplateVersion, plan: BuildPlan) {
        // The heartbeat also learns when the template was deleted, and
        // then stops the build.
        let (deleted_tx, mut deleted) = tokio::sync::watch::channel(false);
        let beat = {
            let app = self.clone();
            let id = v.id.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(BUILD_HEARTBEAT).await;
                    match app.store.template_log_append(&id, "", now()).await {
                        Ok(false) => {
                            let _ = deleted_tx.send(true);
                            return;
                        }
                        Ok(true) => {}
                        Err(e) => {
                            tracing::warn!(version = %id, error = %e, "build heartbeat failed")
                        }
                    }
                }
            })
        };
        let mut log = BuildLog {
            app: &self,
            id: v.id.clone(),
            pending: String::new(),
            written: 0,
            last_flush: Instant::now(),
            capped: false,
        };
        let steps =
            tokio::time::timeout(plan.timeout, self.template_build_steps(&v, &plan, &mut log));
        // Dropping the steps ends a running command (the agent kills what
        // its client no longer waits for).
        let result = tokio::select! {
            r = steps => r.unwrap_or_else(|_| {
                Err(Error::Timeout(format!(
                    "the build did not finish within {} s",
                    plan.timeout.as_secs()
                )))
            }),
            _ = deleted.wait_for(|d| *d) => {
                Err(Error::Conflict("the template was deleted during its build".into()))
            }
        };
        beat.abort();
        if let Err(e) = self.template_build_sandboxes_destroy(&v).await {
            tracing::warn!(version = %v.id, error = %e, "could not destroy a build's sandbox; the reconcilers retry");
        }
        let mut done = v.clone();
        done.built_at = Some(now());
        done.heartbeat_at = now();
        match &result {
            Ok(()) => {
                log.line(&format!("built {}", v.image)).await;
                done.state = TemplateState::Ready;
            }
            Err(e) => {
                let message = e.message();
                log.line(&format!("build failed: {message}")).await;
                done.state = TemplateState::Failed;
                done.failure = Some(message);
            }
        }
        log.flush().await;
        let recorded = self.store.template_build_finish(&done).await;
        if !matches!(recorded, Ok(true)) || result.is_err() {
            // Deleted meanwhile, failed, or not recorded: no image may stay.
            self.template_image_remove(&v.image).await;
        }
        match recorded {
            Ok(true) => {
                tracing::info!(template = %v.name, version = v.version, state = done.state.as_str(), "template build ended");
                // A template's warm pool moves to the new version now.
                if done.state == TemplateState::Ready {
                    self.pool_wake.notify_one();
                }
            }
            Ok(false) => {
                tracing::info!(template = %v.name, version = v.version, "template deleted while it was building");
                if let Err(e) = self.store.template_version_purge(&v.id).await {
                    tracing::warn!(version = %v.id, error = %e, "could not remove a deleted build's row");
                }
            }
            Err(e) => {
                tracing::error!(version = %v.id, error = %e, "could not record a build's end; the reconcilers fail it")
            }
        }
    }

    /// The sandboxes of the build of `v`, found by their label (a build
    /// makes one; a retried or cut-off create may leave another).
    async fn template_build_sandboxes(
        &self,
        v: &TemplateVersion,
    ) -> Result<Vec<stacyvm_store::SandboxRecord>> {
        Ok(self
            .store
            .sandbox_list(&SandboxFilter {
                tenant_id: Some(v.tenant_id.clone()),
                state: None,
                any_state: Vec::new(),
                labels: vec![(BUILD_LABEL.to_owned(), v.id.to_string())],
                page: stacyvm_store::PageRequest {
                    cursor: None,
                    limit: 100,
                },
                newest_first: false,
            })
            .await?
            .items)
    }

    /// Destroys every live sandbox of the build of `v` (found by its
    /// label, so also one whose create was cut off half-way).
    async fn template_build_sandboxes_destroy(&self, v: &TemplateVersion) -> Result<()> {
        for s in self.template_build_sandboxes(v).await? {
            if s.state == SandboxState::Destroyed {
                continue;
            }
            let id = s.id.clone();
            if let Err(e) = self.destroy_record(s).await {
                tracing::warn!(sandbox = %id, error = %e, "could not destroy a build's sandbox");
            }
        }
        Ok(())
    }

    async fn template_build_steps(
        &self,
        v: &TemplateVersion,
        plan: &BuildPlan,
        log: &mut BuildLog<'_>,
    ) -> Result<()> {
        log.line(&format!(
            "building template {} version {} from {}",
            v.name, v.version, plan.base
        ))
        .await;
        let create = CreateSandbox {
            image: plan.parent.is_none().then(|| plan.base.clone()),
            template: plan.parent.as_ref().map(|p| p.label()),
            provider: plan.provider.clone(),
            cpu: plan.cpu,
            memory_mb: plan.memory_mb,
            // The sandbox outlives the build's own limit a little, so the
            // build ends it rather than the expiry.
            timeout_s: Some(
                (plan.timeout.as_secs() as i64 + 60).min(self.config.limits.max_sandbox_timeout_s),
            ),
            env: plan
                .parent
                .as_ref()
                .map(|p| p.defaults.env.clone())
                .unwrap_or_default(),
            labels: BTreeMap::from([(BUILD_LABEL.to_owned(), v.id.to_string())]),
            workdir: plan
                .parent
                .as_ref()
                .and_then(|p| p.defaults.workdir.clone()),
            network: Some(plan.network),
            ..Default::default()
        };
        let created = self
            .sandbox_create_from(&plan.who, create, plan.parent.as_ref())
            .await?;
        let rec = created.sandbox;
        log.line(&format!(
            "sandbox {} is running on {}",
            rec.id, rec.provider
        ))
        .await;
        let (worker, lease) = self.lease_of(&rec).await?;
        let agent = agent(&worker, &lease).await?;
        let mut env = rec.env.clone();
        let mut cwd = rec.workdir.clone();
        let total = plan.steps.len();
        for (i, step) in plan.steps.iter().enumerate() {
            let n = i + 1;
            let what = step.describe();
            log.line(&format!("step {n}/{total}: {what}")).await;
            let failed = |m: String| Error::Conflict(format!("step {n} ({what}) {m}"));
            match step {
                Step::Run(argv) => {
                    let mut events = agent
                        .exec_stream(ExecRequest {
                            cmd: argv.clone(),
                            env: env.clone(),
                            cwd: cwd.clone(),
                            stdin: None,
                            timeout_ms: plan.timeout.as_millis() as u64,
                            output_cap: stacyvm_core::exec::DEFAULT_OUTPUT_CAP,
                            user: None,
                        })
                        .await
                        .map_err(|e| failed(format!("could not start: {}", e.message())))?;
                    let mut output = String::new();
                    let mut status = None;
                    while let Some(event) = events.next().await {
                        match event.map_err(|e| failed(format!("failed: {}", e.message())))? {
                            ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => {
                                let text = String::from_utf8_lossy(&b);
                                output.push_str(&text);
                                if output.len() > 2 * FAILURE_OUTPUT {
                                    output = tail(&output, FAILURE_OUTPUT).to_owned();
                                }
                                log.push(&text).await;
                            }
                            ExecEvent::Exit(s) => status = Some(s),
                        }
                    }
                    log.flush().await;
                    let status =
                        status.ok_or_else(|| failed("ended without an exit status".into()))?;
                    if status.exit_code != Some(0) {
                        let how = match (status.exit_code, status.signal) {
                            (Some(c), _) => format!("exited with code {c}"),
                            (None, Some(s)) => format!("was killed by signal {s}"),
                            (None, None) => "ended abnormally".to_owned(),
                        };
                        let out = tail(&output, FAILURE_OUTPUT).trim_end();
                        return Err(failed(if out.is_empty() {
                            how
                        } else {
                            format!("{how}:\n{out}")
                        }));
                    }
                }
                Step::Write {
                    path,
                    content,
                    mode,
                } => {
                    let body = bytes::Bytes::from(content.clone());
                    agent
                        .file_write(path, *mode, byte_stream(body))
                        .await
                        .map_err(|e| failed(format!("failed: {}", e.message())))?;
                }
                Step::Upload { path, tar } => {
                    let body = bytes::Bytes::from(tar.clone());
                    let summary = agent
                        .file_extract(path, byte_stream(body))
                        .await
                        .map_err(|e| failed(format!("failed: {}", e.message())))?;
                    log.line(&format!(
                        "unpacked {} files, {} directories",
                        summary.files, summary.dirs
                    ))
                    .await;
                }
                Step::Env(vars) => env.extend(vars.clone()),
                Step::Workdir(dir) => {
                    match agent.file_mkdir(dir, true).await {
                        Ok(_) | Err(Error::Conflict(_)) => {}
                        Err(e) => return Err(failed(format!("failed: {}", e.message()))),
                    }
                    cwd = Some(dir.clone());
                }
            }
        }
        log.line("snapshotting the sandbox").await;
        let info = self
            .snapshot_image(&v.tenant_id, &worker, &lease, &v.image)
            .await?;
        log.line(&format!("image {} ({} bytes)", info.name, info.size))
            .await;
        Ok(())
    }

    /// Removes a template version's image from the catalog and the
    /// providers' copies; one that is not there is fine.
    async fn template_image_remove(&self, image: &str) {
        let info = match self.catalog.get(image).await {
            Ok(info) => info,
            Err(Error::NotFound(_) | Error::ImageNotFound(_)) => return,
            Err(e) => {
                tracing::warn!(image, error = %e, "could not read a template image");
                return;
            }
        };
        if let Err(e) = self.catalog.delete(image).await {
            tracing::warn!(image, error = %e, "could not remove a template image");
            return;
        }
        match self.scheduler.workers().await {
            Ok(workers) => {
                for worker in workers {
                    if let Err(e) = worker.image_removed(&info).await {
                        tracing::warn!(image, worker = %worker.id(), error = %e,
                            "could not remove a provider's copy of a template image");
                    }
                }
            }
            Err(e) => tracing::warn!(image, error = %e, "could not list workers"),
        }
    }

    /// `GET /v1/templates`: the newest version of every template `who`
    /// sees, its own tenant's before the operator's.
    pub async fn template_list(&self, who: &Principal) -> Result<Vec<TemplateVersion>> {
        let mut out: Vec<TemplateVersion> = Vec::new();
        for tenant in self.template_tenants(who) {
            let versions = self
                .store
                .template_version_list(&TemplateFilter {
                    tenants: vec![tenant],
                    ..Default::default()
                })
                .await?;
            let mut newest: BTreeMap<String, TemplateVersion> = BTreeMap::new();
            for v in versions {
                match newest.get(&v.name) {
                    Some(n) if n.version > v.version => {}
                    _ => {
                        newest.insert(v.name.clone(), v);
                    }
                }
            }
            for (name, v) in newest {
                if !out.iter().any(|o| o.name == name) {
                    out.push(v);
                }
            }
        }
        Ok(out)
    }

    /// Every live version of a visible template, oldest first; `NotFound`
    /// when there is none.
    pub async fn template_versions(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<Vec<TemplateVersion>> {
        let versions = self.template_versions_visible(who, name).await?;
        if versions.is_empty() {
            return Err(Error::NotFound(format!("template {name:?} not found")));
        }
        Ok(versions)
    }

    /// `GET /v1/templates/{name}`: the newest version, or the one asked for.
    pub async fn template_get(
        &self,
        who: &Principal,
        name: &str,
        version: Option<i64>,
    ) -> Result<TemplateVersion> {
        let versions = self.template_versions(who, name).await?;
        match version {
            None => versions
                .into_iter()
                .next_back()
                .ok_or_else(|| Error::NotFound(format!("template {name:?} not found"))),
            Some(n) => versions
                .into_iter()
                .find(|v| v.version == n)
                .ok_or_else(|| Error::NotFound(format!("template {name:?} has no version {n}"))),
        }
    }

    /// `DELETE /v1/templates/{name}`: every version of the caller's
    /// tenant's template. Sandboxes running from it keep running on their
    /// image; images no live sandbox uses are removed now, the others once
    /// their last sandbox is gone.
    pub async fn template_delete(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<Vec<TemplateVersion>> {
        who.require_write()?;
        let deleted = self
            .store
            .template_delete(&who.tenant_id, name, now())
            .await?;
        if deleted.is_empty() {
            if !self.template_versions_visible(who, name).await?.is_empty() {
                return Err(Error::Forbidden(format!(
                    "template {name:?} belongs to the operator; other tenants may use it but not \
                     delete it"
                )));
            }
            return Err(Error::NotFound(format!("template {name:?} not found")));
        }
        // A warm pool of the template lets its members go first, so that
        // the sweep can remove their image.
        super::pools::refresh_templates(self).await;
        if let Err(e) = self.template_sweep().await {
            tracing::warn!(error = %e, "template sweep after a delete failed; it runs again later");
        }
        Ok(deleted)
    }

    /// Removes the images and rows of deleted template versions that no
    /// live sandbox runs from (a version still building is left to its
    /// build, or to [`App::template_recover`] if that build is gone).
    pub async fn template_sweep(&self) -> Result<usize> {
        let deleted = self
            .store
            .template_version_list(&TemplateFilter {
                deleted: true,
                ..Default::default()
            })
            .await?
            .into_iter()
            .filter(|v| v.deleted_at.is_some() && v.state != TemplateState::Building)
            .collect::<Vec<_>>();
        if deleted.is_empty() {
            return Ok(0);
        }
        let live = self.store.sandbox_list_live().await?;
        let mut purged = 0;
        for v in deleted {
            // Idle warm-pool members have no row, but run on the image too.
            if live.iter().any(|s| s.image == v.image) || self.pools.uses_image(&v.image) {
                continue;
            }
            self.template_image_remove(&v.image).await;
            if self.store.template_version_purge(&v.id).await? {
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// Ends builds whose process is gone: at start-up every build whose
    /// sandbox ran on this process's own worker, and with a SQLite store
    /// (one server per database) every build at all; later, builds whose
    /// heartbeat stopped. Their sandbox and image are removed and the
    /// version is failed (or dropped, if the template was deleted).
    pub async fn template_recover(&self, at_start: bool) -> Result<usize> {
        let building = self
            .store
            .template_version_list(&TemplateFilter {
                state: Some(TemplateState::Building),
                deleted: true,
                ..Default::default()
            })
            .await?;
        let stale_before = self.store.now().await? - BUILD_STALE;
        let mut ended = 0;
        for v in building {
            let sandboxes = self.template_build_sandboxes(&v).await?;
            let on_own_worker = sandboxes.iter().any(|s| {
                !s.state.is_terminal()
                    && s.worker_id
                        .as_ref()
                        .is_some_and(|w| self.scheduler.is_local(w))
            });
            let dead = v.heartbeat_at < stale_before
                || (at_start && (on_own_worker || self.store.kind() == "sqlite"));
            if !dead {
                continue;
            }
            self.template_build_sandboxes_destroy(&v).await?;
            self.template_image_remove(&v.image).await;
            if v.deleted_at.is_some() {
                self.store.template_version_purge(&v.id).await?;
            } else {
                let mut failed = v.clone();
                failed.state = TemplateState::Failed;
                failed.failure =
                    Some("the build was interrupted: the server running it stopped".into());
                failed.built_at = Some(now());
                failed.heartbeat_at = now();
                self.store.template_build_finish(&failed).await?;
            }
            tracing::warn!(template = %v.name, version = v.version, "ended a build whose server stopped; its sandbox and image are removed");
            ended += 1;
        }
        Ok(ended)
    }
}

/// Everything a build needs beyond its version row.
struct BuildPlan {
    who: Principal,
    base: String,
    parent: Option<ResolvedTemplate>,
    steps: Vec<Step>,
    cpu: Option<f64>,
    memory_mb: Option<i64>,
    network: Network,
    provider: Option<String>,
    timeout: Duration,
}

fn byte_stream(body: bytes::Bytes) -> stacyvm_core::ByteStream {
    Box::pin(futures_util::stream::once(async move {
        Ok::<_, std::io::Error>(body)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_template_and_maybe_a_version() {
        assert_eq!(parse_ref("py"), Some(("py", None)));
        assert_eq!(parse_ref("py:3"), Some(("py", Some(3))));
        // Image-like references are not templates.
        assert_eq!(parse_ref("python:3.12"), None);
        assert_eq!(parse_ref("team/python"), None);
        assert_eq!(parse_ref("py:0"), None);
        assert_eq!(parse_ref("Py"), None);
    }

    #[test]
    fn tails_cut_at_character_boundaries() {
        assert_eq!(tail("abc", 5), "abc");
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("aé", 1), "");
    }
}
