//! Background reconcilers: idempotent loops that compare what the store
//! says with what the workers run, and fix the difference.
//!
//! - expiry: sandboxes past `expires_at` are destroyed;
//! - runtimes: a runtime with no live row (an orphan, e.g. after a crash
//!   between spawn and commit) is destroyed; a running row whose runtime
//!   vanished is marked `lost`, one whose runtime stopped is marked `failed`;
//! - adoption (at start): rows left `pending` or `starting` by a crash are
//!   finished one way or the other;
//! - heartbeat: the local worker's leases are renewed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use stacyvm_core::{now, Error, Result, SandboxState};
use stacyvm_store::{Failure, WorkerState};
use stacyvm_worker::Lease;
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
    for worker in app.scheduler.workers() {
        // Runtimes are listed before the rows are read, so a runtime created
        // meanwhile always has its (live) row in `live`: nothing young is
        // mistaken for an orphan.
        let runtimes = match worker.runtimes().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(worker = %worker.id(), error = %e, "could not list runtimes");
                continue;
            }
        };
        let live = app.store.sandbox_list_live().await?;
        let by_id: HashMap<_, _> = live.iter().map(|r| (r.id.clone(), r)).collect();
        // And listed again after, so a sandbox that became running meanwhile
        // is not mistaken for a vanished one.
        let after = worker.runtimes().await.unwrap_or_default();
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

        // Rows of this worker whose runtime is gone or stopped.
        for rec in live
            .iter()
            .filter(|r| r.worker_id.as_ref() == Some(worker.id()))
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
    if at_start {
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

fn probe() -> stacyvm_core::ExecRequest {
    stacyvm_core::ExecRequest {
        cmd: vec!["true".into()],
        env: Default::default(),
        cwd: None,
        stdin: None,
        timeout_ms: 10_000,
        output_cap: 1024,
    }
}

/// Renews the leases of the in-process workers and their heartbeat.
pub async fn heartbeat(app: &App) -> Result<()> {
    let until = now() + app.config.limits.lease;
    for w in app.scheduler.workers() {
        app.store.lease_renew(w.id(), until).await?;
        if let Some(mut rec) = app.store.worker_get(w.id()).await? {
            rec.last_heartbeat = now();
            rec.provider_health = app
                .scheduler
                .provider_health(w)
                .await
                .into_iter()
                .map(|h| stacyvm_store::ProviderState {
                    name: h.name,
                    healthy: h.health.healthy,
                    detail: h.health.detail,
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

/// Runs the loops until `stop` flips to true.
pub fn spawn_loops(app: Arc<App>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tick = app.config.reconcile_interval;
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            n += 1;
            if let Err(e) = expire(&app).await {
                tracing::warn!(error = %e, "expiry pass failed");
            }
            // Heavier passes run less often.
            if n.is_multiple_of(10) {
                if let Err(e) = heartbeat(&app).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                if let Err(e) = reconcile_runtimes(&app, false).await {
                    tracing::warn!(error = %e, "runtime reconciliation failed");
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
