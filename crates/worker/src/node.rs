//! A worker node's side of the conversation with the control plane:
//! registering with its worker token, heartbeating at the interval the
//! control plane asks for, applying the leases each answer lists (and
//! destroying the runtimes it no longer holds), and fetching catalog images
//! for its spawns.
//!
//! The control plane being away is not the worker's end: its sandboxes keep
//! running (until their leases would have expired it stops acting on them),
//! it retries with backoff and registers again when the control plane is
//! back. Only a refused token ends it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stacyvm_api::workers::{
    RuntimeReport, WorkerCapacity, WorkerHeartbeat, WorkerHeartbeatReply, WorkerProvider,
    WorkerRegister, WorkerRegistered,
};
use stacyvm_core::{ByteStream, Error, Result};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cp_http::{read_body, stream_body, Http};
use crate::rpc::server::{ImageSource, WorkerRpc};
use hyper::{Method, StatusCode};

/// How long one call to the control plane may take (an image download is
/// bounded per read instead).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer to a registration or heartbeat read (it lists the
/// worker's leases).
const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// The first and the longest wait between attempts while the control plane
/// is away.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Who the worker is, as it registers.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The control plane's base URL (`http://10.0.0.1:7070`).
    pub control_plane: String,
    /// The worker token (`svmw_…`).
    pub token: String,
    pub name: String,
    /// The worker RPC's URL as control planes reach it.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: WorkerCapacity,
}

/// The control plane's worker API, called with the worker token.
pub struct ControlPlane {
    http: Http,
    base: String,
    token: String,
    worker_id: String,
}

/// Why a call to the control plane did not succeed.
#[derive(Debug)]
enum Refused {
    /// 404 on a heartbeat: the control plane does not know this worker.
    Unknown,
    /// 401/403: the token was revoked or never valid.
    Token(String),
    /// Unreachable, 5xx, or an answer that made no sense: try again later.
    Away(String),
}

/// Percent-encodes one path segment (image names hold `/` and `:`).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ControlPlane {
    /// The control plane at `base` (`http://…`, or `https://…` with
    /// `ca_pem`, the CA that signed its certificate).
    pub fn new(
        base: &str,
        ca_pem: Option<&[u8]>,
        token: &str,
        worker_id: &str,
    ) -> Result<ControlPlane> {
        let base = base.trim_end_matches('/');
        Ok(ControlPlane {
            http: Http::new(base, ca_pem)?,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            worker_id: worker_id.to_owned(),
        })
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> std::result::Result<T, Refused> {
        let url = format!("{}{path}", self.base);
        let json = serde_json::to_vec(body)
            .map_err(|e| Refused::Away(format!("encoding a call to {url}: {e}")))?;
        let call = async {
            let answer = self
                .http
                .send(Method::POST, path, &self.token, Some(json))
                .await?;
            let body = read_body(answer.body, MAX_ANSWER).await?;
            Ok::<_, String>((answer.status, body))
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| Refused::Away(format!("{url}: no answer in time")))?
            .map_err(|e| Refused::Away(format!("{url}: {e}")))?;
        if status.is_success() {
            return serde_json::from_slice::<T>(&body)
                .map_err(|e| Refused::Away(format!("{url} answered something unreadable: {e}")));
        }
        let text = String::from_utf8_lossy(&body);
        match status.as_u16() {
            401 | 403 => Err(Refused::Token(format!("{url} answered {status}: {text}"))),
            404 => Err(Refused::Unknown),
            _ => Err(Refused::Away(format!("{url} answered {status}: {text}"))),
        }
    }
}

#[async_trait]
impl ImageSource for ControlPlane {
    async fn fetch(&self, name: &str) -> Result<ByteStream> {
        let url = format!(
            "{}/v1/workers/{}/images/{}",
            self.base,
            segment(&self.worker_id),
            segment(name)
        );
        let path = &url[self.base.len()..];
        let unreachable =
            |e: String| Error::Unavailable(format!("fetching image {name} from {url}: {e}"));
        let answer = tokio::time::timeout(
            CALL_TIMEOUT,
            self.http.send(Method::GET, path, &self.token, None),
        )
        .await
        .map_err(|_| unreachable("no answer in time".into()))?
        .map_err(unreachable)?;
        if !answer.status.is_success() {
            let body = tokio::time::timeout(CALL_TIMEOUT, read_body(answer.body, MAX_ANSWER))
                .await
                .ok()
                .and_then(|b| b.ok())
                .unwrap_or_default();
            return Err(fetch_error(
                name,
                &url,
                answer.status,
                String::from_utf8_lossy(&body).into_owned(),
            ));
        }
        // Each wait for the next bytes is bounded, so a stalled control
        // plane fails the spawn instead of holding it.
        Ok(stream_body(answer.body, CALL_TIMEOUT))
    }
}

/// Why an image fetch failed, as the spawn that needed it reports it: the
/// control plane's own error when it named one (an image it lacks is
/// `ImageNotFound`), and otherwise, or when the control plane refused the
/// worker itself, `Unavailable`.
fn fetch_error(name: &str, url: &str, status: StatusCode, body: String) -> Error {
    #[derive(serde::Deserialize)]
    struct Body {
        error: stacyvm_core::error::WireError,
    }
    let named = serde_json::from_str::<Body>(&body).ok().map(|b| b.error);
    match named {
        Some(w) if !status.is_server_error() && !matches!(status.as_u16(), 401 | 403) => {
            Error::from_code(
                &w.code,
                format!(
                    "fetching image {name} from the control plane: {}",
                    w.message
                ),
            )
        }
        _ if status == StatusCode::NOT_FOUND => {
            Error::ImageNotFound(format!("the control plane has no image {name}"))
        }
        _ => Error::Unavailable(format!(
            "fetching image {name} from {url}: the control plane answered {status}: {body}"
        )),
    }
}

/// The registration and heartbeat loop of one worker.
pub struct Node {
    config: NodeConfig,
    rpc: Arc<WorkerRpc>,
    control_plane: Arc<ControlPlane>,
}

impl Node {
    pub fn new(config: NodeConfig, rpc: Arc<WorkerRpc>, control_plane: Arc<ControlPlane>) -> Node {
        Node {
            config,
            rpc,
            control_plane,
        }
    }

    async fn providers(&self) -> Vec<WorkerProvider> {
        self.rpc
            .provider_health()
            .await
            .into_iter()
            .map(|p| WorkerProvider {
                name: p.name,
                healthy: p.health.healthy,
                detail: p.health.detail,
                mode: p.mode.as_ref().map(|m| m.mode.clone()),
                not_enforced: p.mode.map(|m| m.not_enforced),
                certified: p.certification.as_ref().map(|c| c.certified),
                certified_at: p.certification.map(|c| c.certified_at),
            })
            .collect()
    }

    /// The providers' health and the runtimes on the host with the lease
    /// held on each. A provider that cannot list its runtimes is reported
    /// unhealthy: the control plane takes a runtime missing from the report
    /// of a healthy provider for one that vanished.
    async fn report(&self) -> (Vec<WorkerProvider>, Vec<RuntimeReport>) {
        let mut providers = self.providers().await;
        let leases = self.rpc.leases();
        let mut reports = Vec::new();
        for (p, listed) in self.rpc.runtimes_by_provider().await {
            let runtimes = match listed {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(provider = %p.name(), error = %e, "listing the runtimes for the heartbeat failed");
                    for h in providers.iter_mut().filter(|h| h.name == p.name()) {
                        h.healthy = false;
                        h.detail = format!("listing its runtimes failed: {e}");
                    }
                    continue;
                }
            };
            for r in runtimes {
                let held = leases.get(&r.sandbox_id);
                let state = match (&held, r.running) {
                    (Some(h), true) if h.paused => "paused",
                    (_, true) => "running",
                    (_, false) => "exited",
                };
                reports.push(RuntimeReport {
                    sandbox_id: r.sandbox_id.to_string(),
                    provider: p.name().to_owned(),
                    fencing_token: held.map_or(0, |h| h.fencing_token),
                    state: state.into(),
                });
            }
        }
        (providers, reports)
    }

    /// Destroys the runtimes the worker holds no lease on now; failures are
    /// logged and retried after the next answer.
    async fn destroy_unleased(&self) -> bool {
        match self.rpc.destroy_unleased().await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(
                        destroyed = n,
                        "destroyed runtimes this worker no longer holds"
                    );
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "destroying runtimes this worker no longer holds failed; retrying after the next heartbeat");
                false
            }
        }
    }

    async fn register(&self) -> std::result::Result<WorkerRegistered, Refused> {
        let body = WorkerRegister {
            id: self.rpc.id().to_string(),
            name: self.config.name.clone(),
            address: self.config.address.clone(),
            providers: self.providers().await,
            labels: self.config.labels.clone(),
            capacity: self.config.capacity.clone(),
        };
        self.control_plane.post("/v1/workers/register", &body).await
    }

    async fn heartbeat(&self, ready: bool) -> std::result::Result<WorkerHeartbeatReply, Refused> {
        // Ready once cleaned up, whatever its providers' health: that is
        // reported beside it, and placement goes by it per provider (a
        // create then hears which provider is unhealthy and why).
        let (providers, runtimes) = self.report().await;
        let body = WorkerHeartbeat {
            providers,
            runtimes,
            ready,
        };
        let path = format!("/v1/workers/{}/heartbeat", segment(self.rpc.id().as_str()));
        self.control_plane.post(&path, &body).await
    }

    /// Registers, then heartbeats until `stop` (`Ok`) or until the control
    /// plane refuses the token (`Unauthenticated`: the worker must stop
    /// serving; its sandboxes are left as they are).
    pub async fn run(&self, stop: CancellationToken) -> Result<()> {
        let mut backoff = BACKOFF_START;
        let mut registered = false;
        // Set once the runtimes left from before the registration are gone.
        let mut cleaned = false;
        let mut interval = Duration::from_secs(5);
        loop {
            let sent = Instant::now();
            let outcome = if registered {
                self.heartbeat(cleaned).await.map(|r| {
                    let ttl = Duration::from_millis(r.lease_ttl_ms);
                    self.rpc.leases().apply(sent, &r.leases, ttl);
                    for refused in &r.refused {
                        tracing::warn!(sandbox = %refused.sandbox_id, reason = %refused.reason, "the control plane refused a runtime report");
                    }
                    Duration::from_millis(r.heartbeat_interval_ms)
                })
            } else {
                self.register().await.map(|r| {
                    let ttl = Duration::from_millis(r.lease_ttl_ms);
                    self.rpc.leases().apply(sent, &r.leases, ttl);
                    self.rpc.set_secret(&r.secret);
                    tracing::info!(worker = %r.id, state = %r.state, leases = r.leases.len(), "registered with the control plane");
                    registered = true;
                    cleaned = false;
                    Duration::from_millis(r.heartbeat_interval_ms)
                })
            };
            let wait = match outcome {
                Ok(next) => {
                    backoff = BACKOFF_START;
                    interval = next.max(Duration::from_millis(50));
                    let was_cleaned = cleaned;
                    cleaned = self.destroy_unleased().await;
                    if cleaned && !was_cleaned {
                        // Tell the control plane at once that it may place.
                        Duration::ZERO
                    } else {
                        interval
                    }
                }
                Err(Refused::Unknown) => {
                    tracing::warn!(
                        "the control plane does not know this worker: registering again"
                    );
                    registered = false;
                    Duration::ZERO
                }
                Err(Refused::Token(why)) => {
                    return Err(Error::Unauthenticated(format!(
                        "the control plane refused this worker's token ({why}); the sandboxes \
                         on this host were left running"
                    )));
                }
                Err(Refused::Away(why)) => {
                    tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64, "the control plane is unreachable; sandboxes keep running");
                    let wait = backoff;
                    backoff = (backoff * 2)
                        .min(BACKOFF_MAX)
                        .min(interval.max(BACKOFF_START));
                    wait
                }
            };
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
                // An operation met a lease that lapsed while the control
                // plane was away: ask now rather than at the next beat.
                () = self.rpc.leases().renewal_wanted() => backoff = BACKOFF_START,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_image_fetch_keeps_the_control_planes_error() {
        use hyper::StatusCode;
        use stacyvm_core::Error;
        let body = r#"{"error":{"code":"image_not_found","message":"no image x"}}"#;
        let e = super::fetch_error("x", "u", StatusCode::UNPROCESSABLE_ENTITY, body.into());
        assert!(
            matches!(e, Error::ImageNotFound(ref m) if m.contains("no image x")),
            "{e:?}"
        );
        let e = super::fetch_error("x", "u", StatusCode::SERVICE_UNAVAILABLE, body.into());
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let refused = r#"{"error":{"code":"unauthenticated","message":"revoked"}}"#;
        let e = super::fetch_error("x", "u", StatusCode::UNAUTHORIZED, refused.into());
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let e = super::fetch_error("x", "u", StatusCode::NOT_FOUND, String::new());
        assert!(matches!(e, Error::ImageNotFound(_)), "{e:?}");
    }

    #[test]
    fn image_names_travel_as_one_path_segment() {
        assert_eq!(
            super::segment("library/busybox:1.36"),
            "library%2Fbusybox%3A1.36"
        );
        assert_eq!(super::segment("wrk_0a-b"), "wrk_0a-b");
    }
}
