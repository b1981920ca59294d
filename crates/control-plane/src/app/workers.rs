//! Workers as the control plane manages them: worker tokens, the calls a
//! remote worker makes (register, heartbeat, fetch an image) and the
//! operator's view (list, get, drain, undrain).
//!
//! A remote worker proves itself with a worker token (`svmw_…`, stored as
//! a hash like API keys). Registration hands it a fresh secret that control
//! planes present on every RPC to it, and the leases it holds. Each
//! heartbeat renews those leases in one store transaction; the runtimes it
//! reports are checked against the store's fencing tokens, and whatever it
//! may no longer hold is named in the reply so it destroys it.

use std::collections::BTreeMap;

use base64::Engine;
use stacyvm_api as api;
use stacyvm_core::{Error, Result, SandboxState, WorkerId, WorkerTokenId};
use stacyvm_provider::images::ImageInfo;
use stacyvm_store::{
    Failure, ProviderState, SandboxRecord, WorkerRecord, WorkerState, WorkerToken,
};
use subtle::ConstantTimeEq;

use super::auth::hash_key;
use super::{App, Principal};

/// What every worker token starts with.
pub const WORKER_TOKEN_PREFIX: &str = "svmw_";

/// Longest worker name, address and provider detail accepted.
const MAX_NAME: usize = 128;
const MAX_ADDRESS: usize = 512;
const MAX_DETAIL: usize = 2048;
const MAX_PROVIDERS: usize = 32;
const MAX_RUNTIMES: usize = 100_000;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidRequest(msg.into())
}

fn random_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn check_text(what: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_control()) {
        return Err(invalid(format!(
            "{what} must be 1 to {max} printable characters"
        )));
    }
    Ok(())
}

/// A worker's provider reports, checked; details are cut to a sane length.
fn check_providers(providers: &[api::WorkerProvider]) -> Result<Vec<ProviderState>> {
    if providers.len() > MAX_PROVIDERS {
        return Err(invalid(format!(
            "a worker may report at most {MAX_PROVIDERS} providers"
        )));
    }
    let mut out: Vec<ProviderState> = Vec::new();
    for p in providers {
        check_text("a provider name", &p.name, 64)?;
        if out.iter().any(|o| o.name == p.name) {
            return Err(invalid(format!("provider {:?} is reported twice", p.name)));
        }
        let mut detail: String = p.detail.chars().filter(|c| !c.is_control()).collect();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        if let Some(mode) = &p.mode {
            check_text("a provider mode", mode, 32)?;
        } else if p.not_enforced.is_some() {
            return Err(invalid(format!(
                "provider {:?} reports unenforced limits without a mode",
                p.name
            )));
        }
        let not_enforced = p.not_enforced.clone().unwrap_or_default();
        if not_enforced.len() > 16 {
            return Err(invalid("a provider reports at most 16 unenforced limits"));
        }
        for limit in &not_enforced {
            check_text("an unenforced limit", limit, 32)?;
        }
        out.push(ProviderState {
            name: p.name.clone(),
            healthy: p.healthy,
            detail,
            mode: p.mode.clone(),
            not_enforced: p.mode.as_ref().map(|_| not_enforced),
            certified: p.certified,
            certified_at: p.certified.and(p.certified_at),
        });
    }
    Ok(out)
}

fn check_address(address: &str) -> Result<()> {
    check_text("address", address, MAX_ADDRESS)?;
    let ok = address
        .parse::<axum::http::Uri>()
        .ok()
        .filter(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
        })
        .is_some();
    if !ok {
        return Err(invalid(format!(
            "address {address:?} must be an http:// or https:// URL with a host"
        )));
    }
    Ok(())
}

fn grants(held: &[SandboxRecord]) -> Vec<api::LeaseGrant> {
    held.iter()
        .filter(|r| !r.state.is_terminal())
        .map(|r| api::LeaseGrant {
            sandbox_id: r.id.to_string(),
            provider: r.provider.clone(),
            fencing_token: r.fencing_token,
        })
        .collect()
}

fn worker_not_found(id: &str) -> Error {
    Error::NotFound(format!("worker {id} not found"))
}

impl App {
    fn heartbeat_interval(&self) -> std::time::Duration {
        self.config.limits.lease / 3
    }

    /// Resolves a worker token; `Unauthenticated` for a missing, unknown or
    /// revoked one. Failures count against the caller's address like bad
    /// API keys do.
    pub async fn authenticate_worker(
        &self,
        bearer: Option<&str>,
        addr: Option<std::net::IpAddr>,
    ) -> Result<WorkerToken> {
        let err = match self.worker_token_of(bearer).await {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        if let (Error::Unauthenticated(_), Some(addr)) = (&err, addr) {
            self.auth_failures
                .failed(addr, self.config.limits.auth_failures_per_minute)?;
        }
        Err(err)
    }

    async fn worker_token_of(&self, bearer: Option<&str>) -> Result<WorkerToken> {
        let token = bearer.ok_or_else(|| {
            Error::Unauthenticated(
                "missing worker token: send `Authorization: Bearer svmw_…`".into(),
            )
        })?;
        if !token.starts_with(WORKER_TOKEN_PREFIX) || token.len() > 256 {
            return Err(Error::Unauthenticated("invalid worker token".into()));
        }
        let hash = hash_key(token);
        let found = self
            .store
            .worker_token_by_hash(&hash)
            .await?
            .filter(|t| bool::from(t.token_hash.as_bytes().ct_eq(hash.as_bytes())))
            .ok_or_else(|| Error::Unauthenticated("invalid worker token".into()))?;
        if found.revoked_at.is_some() {
            return Err(Error::Unauthenticated(
                "this worker token has been revoked".into(),
            ));
        }
        Ok(found)
    }

    /// `POST /v1/workers/tokens`: a new worker token, shown this once.
    pub async fn worker_token_create(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<api::WorkerToken> {
        who.require_admin()?;
        check_text("name", name, MAX_NAME)?;
        let secret = random_secret(WORKER_TOKEN_PREFIX);
        let token = WorkerToken {
            id: WorkerTokenId::generate(),
            name: name.to_owned(),
            token_hash: hash_key(&secret),
            created_at: stacyvm_core::now(),
            revoked_at: None,
        };
        self.store.worker_token_create(&token).await?;
        let mut view = super::views::worker_token(&token);
        view.token = Some(secret);
        Ok(view)
    }

    pub async fn worker_token_list(&self, who: &Principal) -> Result<api::WorkerTokenList> {
        who.require_admin()?;
        Ok(api::WorkerTokenList {
            tokens: self
                .store
                .worker_token_list()
                .await?
                .iter()
                .map(super::views::worker_token)
                .collect(),
        })
    }

    /// `DELETE /v1/workers/tokens/{id}`: workers using it are refused from
    /// their next call and marked `down` now.
    pub async fn worker_token_revoke(&self, who: &Principal, id: &str) -> Result<()> {
        who.require_admin()?;
        let not_found = || Error::NotFound(format!("worker token {id} not found"));
        let tid = WorkerTokenId::parse(id).ok_or_else(not_found)?;
        if !self
            .store
            .worker_token_revoke(&tid, stacyvm_core::now())
            .await?
        {
            return Err(not_found());
        }
        let down = self.store.worker_down_by_token(&tid).await?;
        if down > 0 {
            tracing::warn!(token = %tid, workers = down, "worker token revoked; its workers are down");
        }
        Ok(())
    }

    /// `POST /v1/workers/register`, from a worker holding `token`.
    pub async fn worker_register(
        &self,
        token: &WorkerToken,
        req: api::WorkerRegister,
    ) -> Result<api::WorkerRegistered> {
        let id = WorkerId::parse(&req.id)
            .ok_or_else(|| invalid(format!("worker id {:?} is not a wrk_… id", req.id)))?;
        check_text("name", &req.name, MAX_NAME)?;
        check_address(&req.address)?;
        let health = check_providers(&req.providers)?;
        super::sandboxes::check_labels(&req.labels)
            .map_err(|e| invalid(format!("labels: {}", e.message())))?;
        let cap = &req.capacity;
        if !(1..=1_000_000).contains(&cap.sandboxes) {
            return Err(invalid("capacity.sandboxes must be between 1 and 1000000"));
        }
        if cap.cpu.is_some_and(|c| !c.is_finite() || c <= 0.0) {
            return Err(invalid("capacity.cpu must be a positive number"));
        }
        if cap.memory_mb.is_some_and(|m| m <= 0) {
            return Err(invalid("capacity.memory_mb must be positive"));
        }
        let existing = self.store.worker_get(&id).await?;
        if let Some(e) = &existing {
            if e.address == "local" || self.scheduler.is_local(&id) {
                return Err(Error::Conflict(format!(
                    "worker id {id} belongs to a control plane's in-process worker"
                )));
            }
            // Another worker token may take over the id only once the one
            // it registered with is revoked (a re-issued token).
            if let Some(other) = e.token_id.as_ref().filter(|t| *t != &token.id) {
                let revoked = self
                    .store
                    .worker_token_get(other)
                    .await?
                    .is_none_or(|t| t.revoked_at.is_some());
                if !revoked {
                    return Err(Error::Conflict(format!(
                        "worker {id} is registered with another worker token ({other}); \
                         revoke that token first, or give this worker its own data dir"
                    )));
                }
            }
        }
        let t = self.store.now().await?;
        let secret = random_secret("svmws_");
        // Ready once a heartbeat says its providers are up; a drain set by
        // the operator outlives re-registration.
        let state = match existing.as_ref().map(|e| e.state) {
            Some(WorkerState::Draining) => WorkerState::Draining,
            _ => WorkerState::Down,
        };
        let rec = WorkerRecord {
            id: id.clone(),
            name: req.name.clone(),
            address: req.address.clone(),
            providers: health.iter().map(|h| h.name.clone()).collect(),
            provider_health: health,
            labels: req.labels.clone(),
            capacity: cap.sandboxes,
            capacity_cpu: cap.cpu,
            capacity_memory_mb: cap.memory_mb,
            state,
            registered_at: existing.as_ref().map(|e| e.registered_at).unwrap_or(t),
            last_heartbeat: t,
            token_id: Some(token.id.clone()),
            secret: Some(secret.clone()),
        };
        self.store.worker_upsert(&rec).await?;
        self.store
            .lease_renew(&id, t + self.config.limits.lease)
            .await?;
        let held: Vec<SandboxRecord> = self
            .store
            .sandbox_list_live()
            .await?
            .into_iter()
            .filter(|s| s.worker_id.as_ref() == Some(&id))
            .collect();
        tracing::info!(worker = %id, name = %req.name, address = %req.address, leases = held.len(), "worker registered");
        Ok(api::WorkerRegistered {
            id: id.to_string(),
            secret,
            lease_ttl_ms: self.config.limits.lease.as_millis() as u64,
            heartbeat_interval_ms: self.heartbeat_interval().as_millis() as u64,
            state: state.as_str().into(),
            leases: grants(&held),
        })
    }

    /// The registered worker `id`, if `token` is the one it registered with.
    async fn worker_of_token(&self, token: &WorkerToken, id: &str) -> Result<WorkerRecord> {
        let wid = WorkerId::parse(id).ok_or_else(|| worker_not_found(id))?;
        let rec = self
            .store
            .worker_get(&wid)
            .await?
            .ok_or_else(|| worker_not_found(id))?;
        if rec.token_id.as_ref() != Some(&token.id) {
            return Err(Error::Forbidden(format!(
                "worker {id} is registered with another worker token"
            )));
        }
        Ok(rec)
    }

    /// `POST /v1/workers/{id}/heartbeat`. Returns the reply and how many
    /// reports were refused (the handler audits those).
    pub async fn worker_heartbeat(
        &self,
        token: &WorkerToken,
        id: &str,
        req: api::WorkerHeartbeat,
    ) -> Result<api::WorkerHeartbeatReply> {
        let rec = self.worker_of_token(token, id).await?;
        let health = check_providers(&req.providers)?;
        if req.runtimes.len() > MAX_RUNTIMES {
            return Err(invalid(format!(
                "a heartbeat may report at most {MAX_RUNTIMES} runtimes"
            )));
        }
        let t = self.store.now().await?;
        let until = t + self.config.limits.lease;
        let (w, held) = self
            .store
            .worker_heartbeat(&rec.id, &health, req.ready, t, until)
            .await?
            .ok_or_else(|| worker_not_found(id))?;
        let by_id: BTreeMap<&str, &SandboxRecord> =
            held.iter().map(|r| (r.id.as_str(), r)).collect();

        let mut refused = Vec::new();
        let mut reported = std::collections::HashSet::new();
        for rt in &req.runtimes {
            reported.insert(rt.sandbox_id.as_str());
            let reason = match by_id.get(rt.sandbox_id.as_str()) {
                Some(r) if r.fencing_token == rt.fencing_token => continue,
                Some(r) if r.fencing_token > rt.fencing_token => format!(
                    "stale fencing token {} (the sandbox's is {})",
                    rt.fencing_token, r.fencing_token
                ),
                Some(r) => format!(
                    "fencing token {} was never granted (the sandbox's is {})",
                    rt.fencing_token, r.fencing_token
                ),
                None => "this worker holds no lease on it".to_owned(),
            };
            refused.push(api::RefusedReport {
                sandbox_id: rt.sandbox_id.clone(),
                reason,
            });
        }
        if !refused.is_empty() {
            metrics::counter!("stacyvm_worker_reports_refused_total", "worker" => rec.id.to_string())
                .increment(refused.len() as u64);
            tracing::warn!(worker = %rec.id, refused = refused.len(), "a worker reported runtimes it holds no lease on");
        }

        // A running sandbox whose runtime the worker no longer has (killed
        // outside StacyVM) is lost. Only for providers the worker lists
        // healthy (it could list their runtimes), and only for sandboxes
        // running for a while (one that just started may have come up
        // after the worker listed its runtimes).
        let settled = t - 2 * self.heartbeat_interval();
        let mut still_held = Vec::new();
        for r in held {
            let listed = health.iter().any(|h| h.name == r.provider && h.healthy);
            let vanished = matches!(r.state, SandboxState::Running | SandboxState::Paused)
                && listed
                && r.started_at.is_some_and(|s| s < settled)
                && !reported.contains(r.id.as_str());
            if !vanished {
                still_held.push(r);
                continue;
            }
            let from = r.state;
            let mut lost = r;
            lost.state = SandboxState::Lost;
            lost.failure = Some(Failure {
                code: "lost".into(),
                message: "the runtime vanished from its worker".into(),
            });
            lost.destroyed_at = Some(stacyvm_core::now());
            if self.store.sandbox_update_from(&lost, from).await? {
                tracing::warn!(sandbox = %lost.id, worker = %rec.id, "runtime vanished from its worker; marked the sandbox lost");
                metrics::counter!("stacyvm_sandboxes_lost_total").increment(1);
            }
        }
        Ok(api::WorkerHeartbeatReply {
            state: w.state.as_str().into(),
            lease_ttl_ms: self.config.limits.lease.as_millis() as u64,
            heartbeat_interval_ms: self.heartbeat_interval().as_millis() as u64,
            leases: grants(&still_held),
            refused,
        })
    }

    /// `GET /v1/workers/{id}/images/{name}`: the catalog's image for a
    /// worker that is about to run it.
    pub async fn worker_image(
        &self,
        token: &WorkerToken,
        id: &str,
        name: &str,
    ) -> Result<(ImageInfo, tokio::fs::File)> {
        self.worker_of_token(token, id).await?;
        self.catalog.open_tar(name).await
    }

    /// `GET /v1/workers`.
    pub async fn worker_list(&self, who: &Principal) -> Result<api::WorkerList> {
        who.require_admin()?;
        Ok(api::WorkerList {
            workers: self.worker_status().await?,
        })
    }

    /// `GET /v1/workers/{id}`.
    pub async fn worker_get(&self, who: &Principal, id: &str) -> Result<api::Worker> {
        who.require_admin()?;
        self.worker_status()
            .await?
            .into_iter()
            .find(|w| w.id == id)
            .ok_or_else(|| worker_not_found(id))
    }

    /// Marks a worker draining (it keeps its sandboxes and takes no new
    /// ones), or ready again (`undrain`).
    pub async fn worker_drain(
        &self,
        who: &Principal,
        id: &str,
        drain: bool,
    ) -> Result<api::Worker> {
        who.require_admin()?;
        let wid = WorkerId::parse(id).ok_or_else(|| worker_not_found(id))?;
        let rec = self
            .store
            .worker_get(&wid)
            .await?
            .ok_or_else(|| worker_not_found(id))?;
        let to = match (drain, rec.state) {
            (true, WorkerState::Down) => {
                return Err(Error::Conflict(format!(
                    "worker {id} is down; drain it once it is back"
                )))
            }
            (true, _) => WorkerState::Draining,
            (false, WorkerState::Down) => {
                return Err(Error::Conflict(format!(
                    "worker {id} is down; it becomes ready when it heartbeats again"
                )))
            }
            (false, _) => WorkerState::Ready,
        };
        self.store.worker_set_state(&wid, to).await?;
        self.worker_get(who, id).await
    }
}
