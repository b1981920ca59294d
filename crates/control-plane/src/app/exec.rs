//! Exec: admitting a command (role, state, rate, the slots of commands
//! running at once) and running it, whole or streamed, through the
//! sandbox's agent.

use std::time::Duration;

use stacyvm_api as api;
use stacyvm_core::{validate_sandbox_path, ExecOutcome, ExecRequest, Result, SandboxId};
use stacyvm_provider::ExecStream;
use stacyvm_store::SandboxRecord;
use stacyvm_worker::{DynWorker, Lease};

use super::exec_slots::ExecSlot;
use super::sandboxes::{check_env, invalid};
use super::{App, Principal};

/// A command started with output streamed: the sandbox it runs in, its
/// events, and its place among the commands running at once (freed when
/// `slot` is dropped, so keep it as long as the stream).
pub struct RunningExec {
    pub sandbox: SandboxId,
    pub events: ExecStream,
    pub slot: ExecSlot,
}

impl App {
    /// `POST /v1/sandboxes/{id}/exec`: runs a command to its end.
    pub async fn sandbox_exec(
        &self,
        who: &Principal,
        id: &str,
        body: api::ExecRequest,
    ) -> Result<(SandboxId, ExecOutcome)> {
        let (rec, worker, lease, _slot) = self.exec_admit(who, id).await?;
        let req = self.exec_request(&rec, body)?;
        let out = self.exec(&worker, &lease, req).await?;
        Ok((rec.id, out))
    }

    /// `POST /v1/sandboxes/{id}/exec/stream`: starts a command whose output
    /// arrives while it runs. Dropping the events kills the command.
    pub async fn sandbox_exec_stream(
        &self,
        who: &Principal,
        id: &str,
        body: api::ExecRequest,
    ) -> Result<RunningExec> {
        let (rec, worker, lease, slot) = self.exec_admit(who, id).await?;
        let req = self.exec_request(&rec, body)?;
        let events = super::sandboxes::agent(&worker, &lease)
            .await?
            .exec_stream(req)
            .await?;
        Ok(RunningExec {
            sandbox: rec.id,
            events,
            slot,
        })
    }

    /// Checks and builds an exec request from API input.
    pub(super) fn exec_request(
        &self,
        rec: &SandboxRecord,
        body: api::ExecRequest,
    ) -> Result<ExecRequest> {
        let api::ExecRequest {
            cmd,
            env,
            cwd,
            stdin,
            timeout_s,
            user,
        } = body;
        check_user(user.as_deref())?;
        if cmd.is_empty() {
            return Err(invalid("cmd must hold at least the program to run"));
        }
        if cmd.len() > 65536 || cmd.iter().any(|a| a.contains('\0')) {
            return Err(invalid(
                "cmd arguments must not contain NUL bytes (and at most 65536 of them)",
            ));
        }
        if cmd[0].is_empty() {
            return Err(invalid("cmd[0] (the program) must not be empty"));
        }
        check_env(&env)?;
        // The sandbox's own env under the command's: a warm-pool member was
        // spawned before its env was known, so it is applied per exec.
        let mut merged = rec.env.clone();
        merged.extend(env);
        let env = merged;
        let cwd = match cwd {
            Some(c) => Some(validate_sandbox_path(&c)?),
            None => rec.workdir.clone(),
        };
        let limits = &self.config.limits;
        let timeout = match timeout_s {
            None => limits.default_exec_timeout,
            Some(t) if t.is_finite() && t > 0.0 && t <= limits.max_exec_timeout.as_secs_f64() => {
                Duration::from_secs_f64(t)
            }
            Some(_) => {
                return Err(invalid(format!(
                    "timeout_s must be more than 0 and at most {}",
                    limits.max_exec_timeout.as_secs()
                )))
            }
        };
        Ok(ExecRequest {
            cmd,
            env,
            cwd,
            stdin: stdin.map(String::into_bytes),
            timeout_ms: timeout.as_millis().max(1) as u64,
            output_cap: limits.exec_output_cap,
            user,
        })
    }

    /// Everything an exec needs before it runs: visibility, role, state,
    /// the tenant's exec rate and a slot among the commands running at once
    /// (held until the returned [`ExecSlot`] is dropped).
    pub(super) async fn exec_admit(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(SandboxRecord, DynWorker, Lease, ExecSlot)> {
        who.require_write()?;
        let (rec, worker, lease) = self.running(who, id).await?;
        let quota = self.exec_quota(&rec.tenant_id).await?;
        let slot = self.exec_slots.acquire(
            &rec.id,
            &rec.tenant_id,
            self.config.limits.max_execs_per_sandbox,
            quota.max_concurrent_execs,
        )?;
        self.exec_limiter
            .acquire(&rec.tenant_id, quota.max_exec_per_minute)?;
        Ok((rec, worker, lease, slot))
    }

    /// The tenant's quota for the exec rate check, read at most once a
    /// second per tenant: exec is the hottest path, and a quota change made
    /// through this control plane drops the cached copy at once.
    pub(super) async fn exec_quota(
        &self,
        tenant: &stacyvm_core::TenantId,
    ) -> Result<stacyvm_store::Quota> {
        const FRESH: Duration = Duration::from_secs(1);
        if let Some((at, q)) = self
            .quota_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            if at.elapsed() < FRESH {
                return Ok(q.clone());
            }
        }
        let q = self.store.quota_get(tenant).await?;
        self.quota_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), (std::time::Instant::now(), q.clone()));
        Ok(q)
    }

    async fn exec(
        &self,
        worker: &DynWorker,
        lease: &Lease,
        req: ExecRequest,
    ) -> Result<ExecOutcome> {
        let started = std::time::Instant::now();
        let out = async {
            super::sandboxes::agent(worker, lease)
                .await?
                .exec(req)
                .await
        }
        .await;
        metrics::histogram!("stacyvm_exec_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if out.is_err() {
            metrics::counter!("stacyvm_provider_errors_total", "provider" => lease.provider.clone(), "op" => "exec")
                .increment(1);
        }
        out
    }
}

/// Whether `user` can name an account of a sandbox: a POSIX-style name, or
/// a numeric uid.
pub(crate) fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 32
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !user.starts_with(['.', '-'])
}

/// Refuses a `user` that cannot name an account.
pub(crate) fn check_user(user: Option<&str>) -> Result<()> {
    match user {
        Some(u) if !valid_user(u) => Err(invalid(format!(
            "user {u:?} is not a user name (up to 32 of A-Z a-z 0-9 . _ -, not starting with . \
             or -) or a numeric uid"
        ))),
        _ => Ok(()),
    }
}
