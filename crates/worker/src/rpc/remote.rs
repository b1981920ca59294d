//! The control plane's end of the worker RPC: a [`Worker`] on another host.
//!
//! The connection is made on first use and kept (HTTP/2 keepalives notice a
//! worker that vanished); unary calls have deadlines; a worker that cannot
//! be reached is `Unavailable`, and the worker's own errors come back as the
//! same variants, so the HTTP answers are those of a local worker. The
//! agent connection is a tunnel: the agent protocol runs here, in
//! [`AgentClient::over`], on bytes the worker copies to and from the
//! sandbox's agent, so exec output and file transfers stream end to end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use stacyvm_core::{Error, Result, SandboxId, SpawnSpec, VolumeId, WorkerId};
use stacyvm_provider::images::{ImageCatalog, ImageInfo};
use stacyvm_provider::{AgentClient, Health, LogLine, ProviderMode, RuntimeInfo, RuntimeStats};
use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};
use tokio_util::sync::PollSender;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use super::pb::worker_client::WorkerClient;
use super::tls::ClientTls;
use super::{from_status, has_error_code, pb, put_lease, MAX_MESSAGE, PUSH_IMAGE};
use crate::{Lease, ProviderHealth, Worker, WorkerRuntime};

/// Deadline of a quick call (health, runtimes, destroy, pause, logs…).
const CALL_DEADLINE: Duration = Duration::from_secs(60);

/// Deadline of a stats reading: a sampler asks often, and a slow answer is
/// worth less than none.
const STATS_DEADLINE: Duration = Duration::from_secs(10);

/// How long a snapshot's stream may stall before the copy is abandoned.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(120);
/// Deadline of a volume call: making one allocates and formats its image.
const VOLUME_DEADLINE: Duration = Duration::from_secs(300);
/// Deadline of a spawn: it may fetch the image and wait for the agent.
const SPAWN_DEADLINE: Duration = Duration::from_secs(600);
/// How long connecting to a worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on an idle connection, and how long one may go unanswered
/// before the connection (and every tunnel on it) is declared dead.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of an image per pushed chunk.
const PUSH_CHUNK: usize = 256 * 1024;
/// Chunks queued towards a tunnel before the agent client waits.
const TUNNEL_QUEUE: usize = 16;

/// How to reach and trust one remote worker.
#[derive(Clone)]
pub struct RemoteWorkerConfig {
    pub id: WorkerId,
    /// The worker RPC's URL as the worker registered it
    /// (`http://10.0.0.2:7071`, `https://…` with TLS).
    pub address: String,
    /// The secret of the worker's latest registration.
    pub secret: String,
    /// The providers the worker registered, in preference order.
    pub providers: Vec<String>,
    /// `None`: plain HTTP/2 (loopback, tests).
    pub tls: Option<ClientTls>,
    /// The control plane's catalog: spawns carry the digest of the image
    /// they name, so the worker fetches it when its copy differs.
    pub catalog: Arc<ImageCatalog>,
}

/// A worker on another host, reached over the worker RPC.
pub struct RemoteWorker {
    id: WorkerId,
    address: String,
    providers: Vec<String>,
    tls: Option<ClientTls>,
    catalog: Arc<ImageCatalog>,
    secret: RwLock<String>,
    channel: OnceLock<Channel>,
    /// Open agent tunnels, per sandbox, with the token they were opened
    /// under.
    agents: Mutex<HashMap<SandboxId, (i64, Arc<AgentClient>)>>,
}

impl RemoteWorker {
    /// Validates the address; connects on first use.
    pub fn new(config: RemoteWorkerConfig) -> Result<RemoteWorker> {
        Endpoint::from_shared(config.address.clone()).map_err(|e| {
            Error::InvalidRequest(format!(
                "worker {} has an unusable address {:?}: {e}",
                config.id, config.address
            ))
        })?;
        Ok(RemoteWorker {
            id: config.id,
            address: config.address,
            providers: config.providers,
            tls: config.tls,
            catalog: config.catalog,
            secret: RwLock::new(config.secret),
            channel: OnceLock::new(),
            agents: Mutex::new(HashMap::new()),
        })
    }

    /// The worker registered again and was handed a new secret.
    pub fn set_secret(&self, secret: &str) {
        *self.secret.write().unwrap_or_else(|p| p.into_inner()) = secret.to_owned();
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn client(&self) -> Result<WorkerClient<Channel>> {
        let channel = match self.channel.get() {
            Some(c) => c.clone(),
            None => {
                let mut endpoint = Endpoint::from_shared(self.address.clone())
                    .map_err(|e| Error::Unavailable(format!("worker {}: {e}", self.id)))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .initial_stream_window_size(Some(super::STREAM_WINDOW))
                    .initial_connection_window_size(Some(super::CONNECTION_WINDOW));
                if let Some(tls) = &self.tls {
                    endpoint = endpoint.tls_config(tls.config()).map_err(|e| {
                        Error::InvalidRequest(format!(
                            "the TLS settings for worker {}: {e}",
                            self.id
                        ))
                    })?;
                }
                self.channel.get_or_init(|| endpoint.connect_lazy()).clone()
            }
        };
        Ok(WorkerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    fn request<T>(&self, msg: T, deadline: Option<Duration>) -> Result<Request<T>> {
        let mut req = Request::new(msg);
        let secret = self
            .secret
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let value = format!("Bearer {secret}").parse().map_err(|_| {
            Error::Internal(format!(
                "the secret of worker {} cannot travel as a header",
                self.id
            ))
        })?;
        req.metadata_mut().insert("authorization", value);
        if let Some(d) = deadline {
            req.set_timeout(d);
        }
        Ok(req)
    }

    /// Runs a unary call under `deadline`, mapping its failure.
    async fn call<T>(
        &self,
        deadline: Duration,
        fut: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(deadline, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(from_status(self.id.as_str(), s)),
            Err(_) => Err(Error::Timeout(format!(
                "worker {} did not answer within {} s",
                self.id,
                deadline.as_secs()
            ))),
        }
    }

    async fn lease_call(&self, lease: &Lease, what: LeaseCall) -> Result<()> {
        let mut c = self.client()?;
        let req = self.request(
            pb::LeaseRequest {
                lease: Some(lease.into()),
            },
            Some(CALL_DEADLINE),
        )?;
        match what {
            LeaseCall::Destroy => self.call(CALL_DEADLINE, c.destroy(req)).await?,
            LeaseCall::Pause => self.call(CALL_DEADLINE, c.pause(req)).await?,
            LeaseCall::Resume => self.call(CALL_DEADLINE, c.resume(req)).await?,
        };
        Ok(())
    }

    /// Streams the catalog image `name` to the worker: a first chunk that
    /// names it, then the tar.
    async fn push_image(&self, name: &str) -> Result<()> {
        let (info, file) = self.catalog.open_tar(name).await?;
        let named = futures_util::stream::iter([pb::ImageChunk {
            name: info.name,
            digest: info.digest,
            data: Bytes::new(),
        }]);
        let tar = tokio_util::io::ReaderStream::with_capacity(file, PUSH_CHUNK)
            // A read error ends the stream short; the worker's import then
            // fails on the truncated tar rather than install it.
            .scan((), |(), r| std::future::ready(r.ok()))
            .map(|data| pb::ImageChunk {
                data,
                ..Default::default()
            });
        let mut c = self.client()?;
        let req = self.request(named.chain(tar), Some(SPAWN_DEADLINE))?;
        self.call(SPAWN_DEADLINE, c.push_image(req)).await?;
        Ok(())
    }

    fn volume_request(&self, id: &VolumeId, size_mb: i64) -> Result<Request<pb::VolumeRequest>> {
        self.request(
            pb::VolumeRequest {
                volume_id: id.to_string(),
                size_mb,
            },
            Some(VOLUME_DEADLINE),
        )
    }

    fn forget_agent(&self, id: &SandboxId) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

enum LeaseCall {
    Destroy,
    Pause,
    Resume,
}

fn parse_time(s: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[async_trait]
impl Worker for RemoteWorker {
    async fn volume_create(&self, id: &VolumeId, size_mb: i64) -> Result<()> {
        let mut c = self.client()?;
        let req = self.volume_request(id, size_mb)?;
        self.call(VOLUME_DEADLINE, c.volume_create(req)).await?;
        Ok(())
    }

    async fn volume_mount(&self, id: &VolumeId) -> Result<String> {
        let mut c = self.client()?;
        let req = self.volume_request(id, 0)?;
        Ok(self.call(VOLUME_DEADLINE, c.volume_mount(req)).await?.path)
    }

    async fn volume_remove(&self, id: &VolumeId) -> Result<()> {
        let mut c = self.client()?;
        let req = self.volume_request(id, 0)?;
        self.call(VOLUME_DEADLINE, c.volume_remove(req)).await?;
        Ok(())
    }

    fn id(&self) -> &WorkerId {
        &self.id
    }

    fn provider_names(&self) -> Vec<String> {
        self.providers.clone()
    }

    async fn provider_health(&self) -> Vec<ProviderHealth> {
        let answer = async {
            let mut c = self.client()?;
            let req = self.request(pb::Empty {}, Some(CALL_DEADLINE))?;
            self.call(CALL_DEADLINE, c.provider_health(req)).await
        }
        .await;
        match answer {
            Ok(list) => list
                .providers
                .into_iter()
                .map(|p| ProviderHealth {
                    name: p.name,
                    health: Health {
                        healthy: p.healthy,
                        detail: p.detail,
                    },
                    mode: p.mode.map(|m| ProviderMode {
                        mode: m.mode,
                        not_enforced: m.not_enforced,
                    }),
                    // A remote worker reports certification in its
                    // heartbeat, which is what status shows.
                    certification: None,
                })
                .collect(),
            // A worker that cannot be asked has no usable provider.
            Err(e) => self
                .providers
                .iter()
                .map(|name| ProviderHealth {
                    name: name.clone(),
                    health: Health {
                        healthy: false,
                        detail: e.message(),
                    },
                    mode: None,
                    certification: None,
                })
                .collect(),
        }
    }

    async fn runtimes(&self) -> Result<Vec<WorkerRuntime>> {
        let mut c = self.client()?;
        let req = self.request(pb::Empty {}, Some(CALL_DEADLINE))?;
        let list = self.call(CALL_DEADLINE, c.runtimes(req)).await?;
        list.runtimes
            .into_iter()
            .map(|r| {
                let id = SandboxId::parse(&r.sandbox_id).ok_or_else(|| {
                    Error::Internal(format!(
                        "worker {} listed a runtime with the malformed id {:?}",
                        self.id, r.sandbox_id
                    ))
                })?;
                Ok(WorkerRuntime {
                    provider: r.provider,
                    runtime: RuntimeInfo {
                        sandbox_id: id,
                        running: r.running,
                    },
                })
            })
            .collect()
    }

    async fn image_removed(&self, image: &ImageInfo) -> Result<()> {
        let mut c = self.client()?;
        let req = self.request(
            pb::ImageRemovedRequest {
                name: image.name.clone(),
                digest: image.digest.clone(),
                size: image.size,
                created_at: image
                    .created_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            },
            Some(CALL_DEADLINE),
        )?;
        self.call(CALL_DEADLINE, c.image_removed(req)).await?;
        Ok(())
    }

    async fn spawn(&self, lease: &Lease, spec: &SpawnSpec) -> Result<()> {
        if spec.sandbox_id != lease.sandbox_id {
            return Err(Error::Internal(format!(
                "spawn spec for {} under a lease on {}",
                spec.sandbox_id, lease.sandbox_id
            )));
        }
        // Mounts name this worker's own volumes: the control plane asked
        // it for their paths (`volume_mount`), which a worker from before
        // volumes cannot answer, so none is ever sent one.
        // A worker from before allow lists would drop the list and start
        // the sandbox with full egress: ask first whether it enforces one.
        if !spec.egress_allow.is_empty() {
            let mut c = self.client()?;
            let req = self.request(pb::Empty {}, Some(CALL_DEADLINE))?;
            let described = self.call(CALL_DEADLINE, c.describe(req)).await?;
            if !described.egress_allow_providers.contains(&lease.provider) {
                return Err(Error::Unsupported(format!(
                    "worker {} cannot enforce an egress allow list (network.allow) with the {} \
                     provider: the provider cannot filter, or the worker runs a StacyVM from \
                     before allow lists",
                    self.id, lease.provider
                )));
            }
        }
        // A name the catalog lacks is a Docker image the worker's daemon
        // may have: the worker is told nothing to fetch.
        let image_digest = match self.catalog.get(&spec.image).await {
            Ok(info) => info.digest,
            Err(_) => String::new(),
        };
        let spec_json =
            serde_json::to_string(spec).map_err(|e| Error::internal("encoding a spawn spec", e))?;
        let mut pushed = false;
        loop {
            let mut c = self.client()?;
            let req = self.request(
                pb::SpawnRequest {
                    lease: Some(lease.into()),
                    spec_json: spec_json.clone(),
                    image_digest: image_digest.clone(),
                    can_push_image: !pushed && !image_digest.is_empty(),
                },
                Some(SPAWN_DEADLINE),
            )?;
            let status = match tokio::time::timeout(SPAWN_DEADLINE, c.spawn(req)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(status)) => status,
                Err(_) => {
                    return Err(Error::Timeout(format!(
                        "worker {} did not finish a spawn within {} s",
                        self.id,
                        SPAWN_DEADLINE.as_secs()
                    )))
                }
            };
            if pushed || status.metadata().get(PUSH_IMAGE).is_none() {
                return Err(from_status(self.id.as_str(), status));
            }
            // The worker could not get the image from its own control
            // plane (another replica, with a catalog of its own): this one
            // sends it, then asks again.
            self.push_image(&spec.image).await?;
            pushed = true;
        }
    }

    async fn destroy(&self, lease: &Lease) -> Result<()> {
        self.forget_agent(&lease.sandbox_id);
        self.lease_call(lease, LeaseCall::Destroy).await
    }

    async fn pause(&self, lease: &Lease) -> Result<()> {
        // A frozen agent would leave the cached tunnel's calls hanging.
        self.forget_agent(&lease.sandbox_id);
        self.lease_call(lease, LeaseCall::Pause).await
    }

    async fn resume(&self, lease: &Lease) -> Result<()> {
        self.lease_call(lease, LeaseCall::Resume).await
    }

    async fn logs(&self, lease: &Lease) -> Result<Vec<LogLine>> {
        let mut c = self.client()?;
        let req = self.request(
            pb::LeaseRequest {
                lease: Some(lease.into()),
            },
            Some(CALL_DEADLINE),
        )?;
        let list = self.call(CALL_DEADLINE, c.logs(req)).await?;
        Ok(list
            .lines
            .into_iter()
            .map(|l| LogLine {
                ts: parse_time(&l.ts),
                source: l.source,
                message: l.message,
            })
            .collect())
    }

    /// A worker from before the `Stats` call answers gRPC's
    /// `unimplemented` with none of StacyVM's error codes: that is the
    /// worker's limit, not an outage.
    async fn stats(&self, lease: &Lease) -> Result<RuntimeStats> {
        let mut c = self.client()?;
        let req = self.request(
            pb::LeaseRequest {
                lease: Some(lease.into()),
            },
            Some(STATS_DEADLINE),
        )?;
        let reply = match tokio::time::timeout(STATS_DEADLINE, c.stats(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented && !has_error_code(&s) => {
                return Err(Error::Unsupported(format!(
                    "worker {} runs a StacyVM that cannot measure sandboxes",
                    self.id
                )))
            }
            Ok(Err(s)) => return Err(from_status(self.id.as_str(), s)),
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "worker {} did not measure sandbox {} within {} s",
                    self.id,
                    lease.sandbox_id,
                    STATS_DEADLINE.as_secs()
                )))
            }
        };
        serde_json::from_str(&reply.stats_json)
            .map_err(|e| Error::internal(format!("decoding worker {}'s stats", self.id), e))
    }

    /// The sandbox's filesystem as a tar, streamed from the worker. The
    /// stream has no overall deadline (a large filesystem takes as long as
    /// it takes) but fails when the worker sends nothing for
    /// [`SNAPSHOT_IDLE`].
    async fn snapshot(&self, lease: &Lease) -> Result<stacyvm_core::ByteStream> {
        let mut c = self.client()?;
        let req = self.request(
            pb::LeaseRequest {
                lease: Some(lease.into()),
            },
            None,
        )?;
        let stream = self.call(CALL_DEADLINE, c.snapshot(req)).await?;
        let worker = self.id.to_string();
        let bytes = futures_util::stream::unfold(
            (stream, worker, false),
            |(mut stream, worker, done)| async move {
                if done {
                    return None;
                }
                let item = match tokio::time::timeout(SNAPSHOT_IDLE, stream.next()).await {
                    Ok(None) => return None,
                    Ok(Some(Ok(chunk))) => Ok(chunk.data),
                    Ok(Some(Err(s))) => Err(std::io::Error::other(from_status(&worker, s))),
                    Err(_) => Err(std::io::Error::other(Error::Timeout(format!(
                        "worker {worker} sent nothing of the snapshot for {} s",
                        SNAPSHOT_IDLE.as_secs()
                    )))),
                };
                let failed = item.is_err();
                Some((item, (stream, worker, failed)))
            },
        );
        Ok(Box::pin(bytes))
    }

    async fn agent(&self, lease: &Lease) -> Result<Arc<AgentClient>> {
        {
            let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((token, client)) = agents.get(&lease.sandbox_id) {
                if *token == lease.fencing_token && client.is_alive() {
                    return Ok(client.clone());
                }
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(TUNNEL_QUEUE);
        let outbound =
            tokio_stream::wrappers::ReceiverStream::new(rx).map(|data| pb::Chunk { data });
        let mut req = self.request(outbound, None)?;
        put_lease(req.metadata_mut(), lease)?;
        let mut c = self.client()?;
        let inbound = self
            .call(CALL_DEADLINE, c.agent_tunnel(req))
            .await?
            .map(|r| r.map(|c| c.data).map_err(std::io::Error::other));
        let reader = StreamReader::new(inbound);
        let writer = SinkWriter::new(CopyToBytes::new(
            PollSender::new(tx)
                .sink_map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        ));
        let client = Arc::new(
            AgentClient::over(reader, writer)
                .await
                .map_err(|e| match e {
                    // The hello never came back: the tunnel, not the request, failed.
                    Error::Timeout(m) | Error::Internal(m) | Error::ProviderUnavailable(m) => {
                        Error::Unavailable(format!(
                    "the agent of sandbox {} on worker {} did not answer through the tunnel: {m}",
                    lease.sandbox_id, self.id
                ))
                    }
                    other => other,
                })?,
        );
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        match agents.get(&lease.sandbox_id) {
            Some((token, existing)) if *token == lease.fencing_token && existing.is_alive() => {
                Ok(existing.clone())
            }
            _ => {
                agents.insert(
                    lease.sandbox_id.clone(),
                    (lease.fencing_token, client.clone()),
                );
                Ok(client)
            }
        }
    }
}
