//! Background reconcilers: idempotent loops that compare what the store
//! says with what the workers run, and fix the difference.
//!
//! - expiry: sandboxes past `expires_at` are destroyed;
//! - runtimes: a runtime with no live row (an orphan, e.g. after a crash
//!   between spawn and commit) is destroyed; a running row whose runtime
//!   vanished is marked `lost`, one whose runtime stopped is marked `failed`;
//! - adoption (at start): rows left `pending` or `starting` by a crash are
//!   finished one way or the other;
//! - heartbeat: the local worker's leases are renewed;
//! - templates: builds whose server stopped are failed and their sandbox
//!   and image removed; deleted versions' images go once unused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stacyvm_core::{now, Error, Result, SandboxState};
use stacyvm_store::{Failure, WorkerState};
use stacyvm_worker::{DynWorker, Lease, WorkerRuntime};
use tokio::sync::watch;

use crate::app::App;

/// Destroys every live sandbox whose time is up.
pub async fn expire(app: &App) -> Result<usize> {
    let due = app.store.sandbox_list_expired(now()).await?;
    let mut done = 0;
    for rec in due {
        let id = rec.id.clone();
        let tenant = rec.tenant_id.clone();
        match app.destroy_record(rec).await {
            Ok(()) => {
                done += 1;
                let _ = crate::app::audit::record(
                    &app.store,
                    crate::app::audit::EventDraft {
                        tenant_id: Some(tenant),
                        actor: stacyvm_store::Actor {
                            key_id: None,
                            role: None,
                        },
                        action: "sandbox.expire".into(),
                        target: Some(id.to_string()),
                        sandbox_id: Some(id.to_string()),
                        status: 204,
                        request_id: String::new(),
                        source_ip: None,
                        detail: serde_json::json!({"reason": "timeout reached"}),
                    },
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "could not destroy an expired sandbox")
            }
        }
    }
    Ok(done)
}

/// Brings store and runtimes into agreement. `at_start` also settles rows
/// that a crash left half-way (`pending`, `starting`).
pub async fn reconcile_runtimes(app: &App, at_start: bool) -> Result<()> {
    for worker in app.scheduler.local_workers() {
        // Runtimes are listed before the rows are read, so a runtime created
        // meanwhile always has its (live) row in `live`: nothing young is
        // mistaken for an orphan.
        let (runtimes, failed) = list_runtimes(worker, true).await;
        if !failed.is_empty() && failed.len() == worker.provider_names().len() {
            continue;
        }
        let live = app.store.sandbox_list_live().await?;
        let by_id: HashMap<_, _> = live.iter().map(|r| (r.id.clone(), r)).collect();
        // And listed again after, so a sandbox that became running meanwhile
        // is not mistaken for a vanished one.
        let (after, _) = list_runtimes(worker, false).await;
        let found: HashMap<_, _> = runtimes
            .iter()
            .chain(after.iter())
            .map(|r| (r.runtime.sandbox_id.clone(), r))
            .collect();

        // Orphans: runtimes no live row of this worker accounts for.
        for rt in &runtimes {
            let owned = by_id.get(&rt.runtime.sandbox_id).is_some_and(|r| {
                r.worker_id.as_ref() == Some(worker.id()) || r.worker_id.is_none()
            });
            if !owned && !app.pools.owns(&rt.runtime.sandbox_id) {
                tracing::info!(sandbox = %rt.runtime.sandbox_id, provider = %rt.provider, "destroying an orphaned runtime");
                let lease = Lease::overriding(&rt.runtime.sandbox_id, &rt.provider);
                if let Err(e) = worker.destroy(&lease).await {
                    tracing::warn!(sandbox = %rt.runtime.sandbox_id, error = %e, "could not destroy an orphan");
                }
            }
        }

        // Rows of this worker whose runtime is gone or stopped (a provider
        // that could not list its runtimes says nothing about its rows).
        for rec in live
            .iter()
            .filter(|r| r.worker_id.as_ref() == Some(worker.id()) && !failed.contains(&r.provider))
        {
            let mut rec = (*rec).clone();
            let rt = found.get(&rec.id);
            match rec.state {
                // What was read above may be stale by now (a destroy may have
                // begun, which also stops the runtime): each write is made
                // only from the state read, so a newer transition wins.
                SandboxState::Running | SandboxState::Paused => match rt {
                    None => {
                        let from = rec.state;
                        rec.state = SandboxState::Lost;
                        rec.failure = Some(Failure {
                            code: "lost".into(),
                            message: "the runtime vanished".into(),
                        });
                        rec.destroyed_at = Some(now());
                        if app.store.sandbox_update_from(&rec, from).await? {
                            tracing::warn!(sandbox = %rec.id, "runtime vanished; marked the sandbox lost");
                        }
                    }
                    Some(rt) if !rt.runtime.running && rec.state == SandboxState::Running => {
                        rec.state = SandboxState::Failed;
                        rec.failure = Some(Failure {
                            code: "runtime_stopped".into(),
                            message: "the sandbox's runtime stopped (its agent or init exited)"
                                .into(),
                        });
                        rec.destroyed_at = Some(now());
                        if app
                            .store
                            .sandbox_update_from(&rec, SandboxState::Running)
                            .await?
                        {
                            tracing::warn!(sandbox = %rec.id, "runtime stopped; marked the sandbox failed");
                            let lease = crate::app::sandboxes::lease_for(&rec);
                            let _ = worker.destroy(&lease).await;
                        }
                    }
                    Some(_) => {}
                },
                // Pending with a worker: claimed, and the server stopped
                // before the row said Starting (so nothing was spawned yet).
                SandboxState::Starting | SandboxState::Pending if at_start => {
                    let lease = crate::app::sandboxes::lease_for(&rec);
                    let usable = rt.is_some_and(|r| r.runtime.running)
                        && async { worker.agent(&lease).await?.exec(probe()).await }
                            .await
                            .is_ok();
                    if usable {
                        let t = now();
                        rec.state = SandboxState::Running;
                        rec.started_at = Some(t);
                        rec.expires_at = Some(t + Duration::from_secs(rec.timeout_s as u64));
                        tracing::info!(sandbox = %rec.id, "adopted a sandbox that was starting when the server stopped");
                    } else {
                        let _ = worker.destroy(&lease).await;
                        rec.state = SandboxState::Failed;
                        rec.failure = Some(Failure {
                            code: "interrupted".into(),
                            message: "the server stopped while the sandbox was starting".into(),
                        });
                        rec.destroyed_at = Some(now());
                    }
                    app.store.sandbox_update(&rec).await?;
                }
                SandboxState::Stopping if at_start => {
                    // A destroy was in flight: finish it.
                    if let Err(e) = app.destroy_record(rec.clone()).await {
                        tracing::warn!(sandbox = %rec.id, error = %e, "could not finish an interrupted destroy");
                    }
                }
                _ => {}
            }
        }
    }
    // Alone (no other worker is up, so no other control plane places
    // sandboxes), rows never placed on a worker are settled at once;
    // otherwise `fail_abandoned` settles them once they are old.
    let alone = app
        .store
        .worker_list()
        .await?
        .iter()
        .all(|w| app.scheduler.is_local(&w.id) || w.state == WorkerState::Down);
    if at_start && alone {
        let live = app.store.sandbox_list_live().await?;
        // Rows never placed on a worker: the create that made them is gone.
        for rec in live
            .iter()
            .filter(|r| r.state == SandboxState::Pending && r.worker_id.is_none())
        {
            let mut rec = (*rec).clone();
            rec.state = SandboxState::Failed;
            rec.failure = Some(Failure {
                code: "interrupted".into(),
                message: "the server stopped before the sandbox was placed".into(),
            });
            rec.destroyed_at = Some(now());
            app.store.sandbox_update(&rec).await?;
        }
    }
    Ok(())
}

/// A worker's runtimes, from every provider that could list them, and the
/// providers that could not (a plugin that is restarting, a daemon that is
/// down): their rows are left alone this round, the others' are not.
async fn list_runtimes(
    worker: &DynWorker,
    log_errors: bool,
) -> (Vec<WorkerRuntime>, HashSet<String>) {
    let mut runtimes = Vec::new();
    let mut failed = HashSet::new();
    for (provider, listed) in worker.runtimes_per_provider().await {
        match listed {
            Ok(found) => runtimes.extend(found.into_iter().map(|runtime| WorkerRuntime {
                provider: provider.clone(),
                runtime,
            })),
            Err(e) => {
                if log_errors {
                    tracing::warn!(worker = %worker.id(), %provider, error = %e, "could not list runtimes; leaving that provider's sandboxes as they are");
                }
                failed.insert(provider);
            }
        }
    }
    (runtimes, failed)
}

fn probe() -> stacyvm_core::ExecRequest {
    stacyvm_core::ExecRequest {
        cmd: vec!["true".into()],
        env: Default::default(),
        cwd: None,
        stdin: None,
        timeout_ms: 10_000,
        output_cap: 1024,
        user: None,
    }
}

/// Renews the leases of the in-process workers and their heartbeat.
pub async fn heartbeat(app: &App) -> Result<()> {
    let t = app.store.now().await?;
    let until = t + app.config.limits.lease;
    for w in app.scheduler.local_workers() {
        app.store.lease_renew(w.id(), until).await?;
        if let Some(mut rec) = app.store.worker_get(w.id()).await? {
            rec.last_heartbeat = t;
            rec.provider_health = app
                .scheduler
                .provider_health(w)
                .await
                .into_iter()
                .map(|h| stacyvm_store::ProviderState {
                    name: h.name,
                    healthy: h.health.healthy,
                    detail: h.health.detail,
                    mode: h.mode.as_ref().map(|m| m.mode.clone()),
                    not_enforced: h.mode.map(|m| m.not_enforced),
                    certified: h.certification.as_ref().map(|c| c.certified),
                    certified_at: h.certification.map(|c| c.certified_at),
                })
                .collect();
            app.store.worker_upsert(&rec).await?;
        } else {
            return Err(Error::Internal(format!(
                "worker {} is not registered",
                w.id()
            )));
        }
    }
    Ok(())
}

/// The job name of the reconcilers only one control plane runs at a time.
const LEADER_JOB: &str = "reconcilers";

/// Whether this control plane runs the shared reconcilers now: it holds
/// (or just took) their lease in the store, for one lease TTL.
pub async fn lead(app: &App) -> Result<bool> {
    let t = app.store.now().await?;
    app.store
        .leader_acquire(LEADER_JOB, &app.replica, t, t + app.config.limits.lease)
        .await
}

/// Workers that stopped heartbeating: each one silent for a lease TTL is
/// marked `down`, and every sandbox whose lease lapsed becomes `lost`
/// (quota freed, fencing token raised, audited as `sandbox.lost`). The
/// in-process workers' sandboxes are left to `reconcile_runtimes`.
pub async fn lose_lapsed(app: &App) -> Result<usize> {
    let t = app.store.now().await?;
    let ttl = app.config.limits.lease;
    for rec in app.store.worker_list().await? {
        if app.scheduler.is_local(&rec.id) || rec.state == WorkerState::Down {
            continue;
        }
        if rec.last_heartbeat + ttl < t && app.store.worker_down_if_silent(&rec.id, t - ttl).await?
        {
            tracing::warn!(worker = %rec.id, name = %rec.name, "worker missed its heartbeats past the lease TTL; marked down");
            metrics::counter!("stacyvm_workers_down_total").increment(1);
        }
    }
    let spare = app
        .scheduler
        .local_workers()
        .first()
        .map(|w| w.id().clone());
    let lost = app.store.sandbox_lose_lapsed(t, spare.as_ref()).await?;
    for rec in &lost {
        tracing::warn!(sandbox = %rec.id, worker = ?rec.worker_id, "lease lapsed; marked the sandbox lost");
        metrics::counter!("stacyvm_sandboxes_lost_total").increment(1);
        let _ = crate::app::audit::record(
            &app.store,
            crate::app::audit::EventDraft {
                tenant_id: Some(rec.tenant_id.clone()),
                actor: stacyvm_store::Actor {
                    key_id: None,
                    role: None,
                },
                action: "sandbox.lost".into(),
                target: Some(rec.id.to_string()),
                sandbox_id: Some(rec.id.to_string()),
                status: 200,
                request_id: String::new(),
                source_ip: None,
                detail: serde_json::json!({
                    "reason": "its worker stopped renewing the lease",
                    "worker": rec.worker_id.as_ref().map(|w| w.to_string()),
                }),
            },
        )
        .await;
    }
    Ok(lost.len())
}

/// How long a create may take from its row to a running sandbox before a
/// row still `pending` or `starting` on a remote worker counts as
/// abandoned (the control plane making it stopped half-way).
const ABANDONED_START: Duration = Duration::from_secs(15 * 60);

/// Rows whose create is gone: left `pending` without a worker for a few
/// lease TTLs (a create places its row at once), or `pending`/`starting` on
/// a remote worker far longer than any spawn takes. Young ones belong to
/// creates in flight, possibly on another control plane. Rows on this
/// control plane's own worker are settled at its start
/// (`reconcile_runtimes`). The remote worker is asked to destroy whatever
/// it made.
pub async fn fail_abandoned(app: &App) -> Result<()> {
    let t = app.store.now().await?;
    let unplaced = t - 4 * app.config.limits.lease;
    let unstarted = t - ABANDONED_START;
    for rec in app.store.sandbox_list_live().await? {
        let from = rec.state;
        if !matches!(from, SandboxState::Pending | SandboxState::Starting) {
            continue;
        }
        let message = match &rec.worker_id {
            None if rec.created_at < unplaced => {
                "the control plane stopped before the sandbox was placed"
            }
            Some(w) if !app.scheduler.is_local(w) && rec.created_at < unstarted => {
                "the control plane stopped while the sandbox was starting"
            }
            _ => continue,
        };
        let mut rec = rec;
        rec.state = SandboxState::Failed;
        rec.failure = Some(Failure {
            code: "interrupted".into(),
            message: message.into(),
        });
        rec.destroyed_at = Some(now());
        if !app.store.sandbox_update_from(&rec, from).await? {
            continue;
        }
        tracing::warn!(sandbox = %rec.id, "{message}; marked the sandbox failed");
        if let Some(w) = &rec.worker_id {
            let lease = crate::app::sandboxes::lease_for(&rec);
            let destroyed = async { app.scheduler.worker(w).await?.destroy(&lease).await };
            if let Err(e) = destroyed.await {
                tracing::warn!(sandbox = %rec.id, error = %e, "could not destroy an abandoned sandbox's runtime; its worker drops it as unleased");
            }
        }
    }
    Ok(())
}

/// Runs the loops until `stop` flips to true.
///
/// Every control plane renews its in-process workers' leases (every third
/// of the lease TTL) and reconciles their runtimes. The shared passes
/// (expiry, lapsed leases, abandoned creates) run on one control plane at a
/// time, the holder of the reconcilers' lease in the store. Lapsed leases
/// are judged only once the store has been reachable here for a whole TTL:
/// after an outage (of the store, or of every control plane), workers get
/// that long to heartbeat again before their sandboxes count as lost.
pub fn spawn_loops(app: Arc<App>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tick = app.config.reconcile_interval;
        let ttl = app.config.limits.lease;
        let mut n: u64 = 0;
        let mut last_heartbeat = Instant::now();
        let mut reachable_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            n += 1;
            if last_heartbeat.elapsed() >= ttl / 3 {
                last_heartbeat = Instant::now();
                if let Err(e) = heartbeat(&app).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
            let leading = match lead(&app).await {
                Ok(l) => {
                    reachable_since.get_or_insert_with(Instant::now);
                    l
                }
                Err(e) => {
                    reachable_since = None;
                    tracing::warn!(error = %e, "the store is unreachable; shared reconcilers wait");
                    false
                }
            };
            if leading {
                if let Err(e) = expire(&app).await {
                    tracing::warn!(error = %e, "expiry pass failed");
                }
                if reachable_since.is_some_and(|t| t.elapsed() >= ttl) {
                    if let Err(e) = lose_lapsed(&app).await {
                        tracing::warn!(error = %e, "lapsed-lease pass failed");
                    }
                }
            }
            // Heavier passes run less often.
            if n.is_multiple_of(10) {
                if let Err(e) = reconcile_runtimes(&app, false).await {
                    tracing::warn!(error = %e, "runtime reconciliation failed");
                }
                if leading {
                    if let Err(e) = fail_abandoned(&app).await {
                        tracing::warn!(error = %e, "abandoned-create pass failed");
                    }
                    if let Err(e) = app.template_recover(false).await {
                        tracing::warn!(error = %e, "template build recovery failed");
                    }
                    if let Err(e) = app.template_sweep().await {
                        tracing::warn!(error = %e, "deleted-template sweep failed");
                    }
                }
            }
        }
    })
}

/// Keeps the warm pools filled: after every claim, and every few seconds
/// (a failed spawn is retried then).
pub fn spawn_pool_loop(
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if app.config.pools.is_empty() {
            return;
        }
        loop {
            super::pools::refill(&app).await;
            tokio::select! {
                _ = app.pool_wake.notified() => {
                    // Let the claimant's first commands run before a refill
                    // spawn competes with them for the host.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    })
}

/// The worker's registration state, preserving a drain set by an operator.
pub fn keep_state(existing: Option<WorkerState>) -> WorkerState {
    match existing {
        Some(WorkerState::Draining) => WorkerState::Draining,
        _ => WorkerState::Ready,
    }
}
