//! The worker's end of the worker RPC: the host's providers behind the
//! lease table, reachable only by a caller presenting the secret of the
//! worker's latest registration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use futures_util::StreamExt;
use stacyvm_core::{ByteStream, Error, Result, SandboxId, SpawnSpec, VolumeId, WorkerId};
use stacyvm_provider::images::{ImageCatalog, ImageInfo};
use stacyvm_provider::{DynProvider, RuntimeInfo};
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use super::pb::worker_server::{Worker as WorkerRpcService, WorkerServer};
use super::{lease_from, lease_from_metadata, pb, to_status, MAX_MESSAGE, PUSH_IMAGE};
use crate::leases::LeaseTable;
use crate::rpc::tls::ServerTls;
use crate::volumes::VolumeHost;
use crate::{Lease, ProviderHealth, WorkerRuntime};

/// How long a stopping server waits for the calls in flight.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Bytes read from an agent at once for the tunnel.
const TUNNEL_READ: usize = 256 * 1024;

/// The largest message of a snapshot's stream.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;

/// Where a worker gets the catalog images its spawns need: the control
/// plane (`GET /v1/workers/{id}/images/{name}`).
#[async_trait]
pub trait ImageSource: Send + Sync + 'static {
    async fn fetch(&self, name: &str) -> Result<ByteStream>;
}

/// What the worker RPC serves.
pub struct WorkerRpcConfig {
    pub id: WorkerId,
    pub providers: Vec<DynProvider>,
    /// The worker's own catalog (under its data dir), which its providers
    /// read their images from.
    pub catalog: Arc<ImageCatalog>,
    pub leases: Arc<LeaseTable>,
    /// `None`: images are never fetched (a spawn of an image the worker
    /// lacks fails with `ImageNotFound`).
    pub images: Option<Arc<dyn ImageSource>>,
    /// The data dir whose `stacyvm certify` records the provider health
    /// reports; `None`: certification is not reported.
    pub certification_records: Option<PathBuf>,
    /// The data dir under which this worker keeps volumes
    /// (`volumes/`, see [`VolumeHost`]); `None`: it keeps none.
    pub volumes: Option<PathBuf>,
}

/// The worker's state behind the RPC, shared with its registration loop.
pub struct WorkerRpc {
    id: WorkerId,
    providers: Vec<DynProvider>,
    catalog: Arc<ImageCatalog>,
    leases: Arc<LeaseTable>,
    images: Option<Arc<dyn ImageSource>>,
    certification_records: Option<PathBuf>,
    volumes: Option<VolumeHost>,
    /// The secret control planes present; `None` until the worker has
    /// registered, when every call is refused.
    secret: RwLock<Option<String>>,
    /// One image fetch at a time per name.
    fetching: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Cancelled when the server stops: ends every open agent tunnel.
    closing: CancellationToken,
}

impl WorkerRpc {
    pub fn new(config: WorkerRpcConfig) -> Arc<WorkerRpc> {
        Arc::new(WorkerRpc {
            id: config.id,
            providers: config.providers,
            catalog: config.catalog,
            leases: config.leases,
            images: config.images,
            certification_records: config.certification_records,
            volumes: config.volumes.as_deref().map(VolumeHost::new),
            secret: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(HashMap::new()),
            closing: CancellationToken::new(),
        })
    }

    pub fn id(&self) -> &WorkerId {
        &self.id
    }

    pub fn leases(&self) -> &Arc<LeaseTable> {
        &self.leases
    }

    /// From now on only callers presenting `secret` are served.
    pub fn set_secret(&self, secret: &str) {
        *self.secret.write().unwrap_or_else(|p| p.into_inner()) = Some(secret.to_owned());
    }

    fn authorize(&self, md: &MetadataMap) -> std::result::Result<(), Status> {
        let guard = self.secret.read().unwrap_or_else(|p| p.into_inner());
        let Some(secret) = guard.as_deref() else {
            return Err(Status::unauthenticated(
                "this worker has not registered with a control plane yet",
            ));
        };
        let presented = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(presented.as_bytes().ct_eq(secret.as_bytes())) && !presented.is_empty() {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "the worker RPC needs the secret of this worker's registration",
            ))
        }
    }

    fn provider(&self, name: &str) -> Result<&DynProvider> {
        self.providers
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::ProviderUnavailable(format!(
                    "provider {name:?} is not configured on worker {}",
                    self.id
                ))
            })
    }

    pub fn provider_names(&self) -> Vec<String> {
        self.providers.iter().map(|p| p.name().to_owned()).collect()
    }

    /// The providers that enforce egress allow lists.
    pub fn egress_allow_providers(&self) -> Vec<String> {
        self.providers
            .iter()
            .filter(|p| p.egress_allow_support().is_ok())
            .map(|p| p.name().to_owned())
            .collect()
    }

    pub async fn provider_health(&self) -> Vec<ProviderHealth> {
        let mut out = Vec::with_capacity(self.providers.len());
        for p in &self.providers {
            out.push(ProviderHealth {
                name: p.name().to_owned(),
                health: p.health().await,
                mode: p.mode(),
                certification: self
                    .certification_records
                    .as_deref()
                    .and_then(|d| stacyvm_provider::certify::standing(d, p.name())),
            });
        }
        out
    }

    pub async fn runtimes(&self) -> Result<Vec<WorkerRuntime>> {
        let mut out = Vec::new();
        for p in &self.providers {
            for runtime in p.list().await? {
                out.push(WorkerRuntime {
                    provider: p.name().to_owned(),
                    runtime,
                });
            }
        }
        Ok(out)
    }

    /// Destroys every runtime of this worker's providers that it holds no
    /// lease on (the control plane gave the sandbox to another worker, or
    /// declared it lost). Returns how many it destroyed.
    ///
    /// A provider that cannot list its runtimes is passed over (the
    /// heartbeat reports it unhealthy, so nothing is placed on it) and
    /// cleaned up after a later answer, once it lists again.
    pub async fn destroy_unleased(&self) -> Result<usize> {
        let mut destroyed = 0;
        for (p, listed) in self.runtimes_by_provider().await {
            let Ok(runtimes) = listed else {
                continue;
            };
            for r in runtimes {
                let id = &r.sandbox_id;
                if self.leases.get(id).is_some() {
                    continue;
                }
                tracing::info!(sandbox = %id, provider = %p.name(), "destroying a runtime this worker no longer holds a lease for");
                p.destroy(id).await?;
                destroyed += 1;
            }
        }
        Ok(destroyed)
    }

    /// Each provider with the runtimes it lists, or why it could not.
    pub async fn runtimes_by_provider(&self) -> Vec<(DynProvider, Result<Vec<RuntimeInfo>>)> {
        let mut out = Vec::with_capacity(self.providers.len());
        for p in &self.providers {
            out.push((p.clone(), p.list().await));
        }
        out
    }

    /// Makes the worker's catalog hold `name` at `digest`, fetching it from
    /// the control plane when it lacks it or holds another version.
    async fn ensure_image(&self, name: &str, digest: &str) -> Result<()> {
        if digest.is_empty() {
            return Ok(());
        }
        let lock = self
            .fetching
            .lock()
            .await
            .entry(name.to_owned())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        match self.catalog.get(name).await {
            Ok(info) if info.digest == digest => return Ok(()),
            Ok(_) | Err(Error::ImageNotFound(_)) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let Some(source) = &self.images else {
            return Err(Error::ImageNotFound(format!(
                "worker {} does not hold image {name} ({digest}) and has no control plane to \
                 fetch it from",
                self.id
            )));
        };
        let body = source.fetch(name).await?;
        self.import(name, digest, body).await
    }

    /// Imports `name` into the worker's catalog from `body`.
    async fn import(&self, name: &str, digest: &str, body: ByteStream) -> Result<()> {
        let info = self.catalog.import(name, body).await?;
        if info.digest != digest {
            // The control plane replaced the image meanwhile; the spawn
            // takes the newer one, as a local create would.
            tracing::info!(image = name, want = digest, got = %info.digest, "the fetched image is newer than the spawn asked for");
        }
        Ok(())
    }

    /// A spawn; on failure, also whether it failed for want of the image.
    async fn spawn(
        &self,
        lease: Lease,
        spec: SpawnSpec,
        digest: &str,
    ) -> std::result::Result<(), (Error, bool)> {
        let plain = |e: Error| (e, false);
        if spec.sandbox_id != lease.sandbox_id {
            return Err(plain(Error::InvalidRequest(format!(
                "spawn spec for {} under a lease on {}",
                spec.sandbox_id, lease.sandbox_id
            ))));
        }
        let provider = self.provider(&lease.provider).map_err(plain)?.clone();
        if !spec.mounts.is_empty() {
            if !provider.supports_mounts() {
                return Err(plain(Error::Unsupported(format!(
                    "volumes are not supported by the {} provider",
                    provider.name()
                ))));
            }
            // Only this worker's own volume mounts are bound in: a path
            // anywhere else on the host is never handed to a sandbox.
            for m in &spec.mounts {
                if !self
                    .volumes
                    .as_ref()
                    .is_some_and(|v| v.is_mount_point_path(Path::new(&m.source)))
                {
                    return Err(plain(Error::InvalidRequest(format!(
                        "{} is not a volume of worker {}",
                        m.source, self.id
                    ))));
                }
            }
        }
        // As in the in-process worker: a provider that cannot filter
        // refuses, rather than start the sandbox with full egress.
        if !spec.egress_allow.is_empty() {
            provider
                .egress_allow_support()
                .map_err(|why| plain(Error::Unsupported(why)))?;
        }
        self.leases.admit_spawn(&lease).map_err(plain)?;
        let spawned = async {
            self.ensure_image(&spec.image, digest).await.map_err(|e| {
                let missing = matches!(e, Error::ImageNotFound(_));
                (e, missing)
            })?;
            provider.spawn(&spec).await.map_err(plain)
        }
        .await;
        if spawned.is_err() {
            self.leases.release(&lease);
        }
        spawned
    }

    async fn destroy(&self, lease: Lease) -> Result<()> {
        let provider = self.provider(&lease.provider)?.clone();
        self.leases.admit_destroy(&lease)?;
        provider.destroy(&lease.sandbox_id).await?;
        self.leases.release(&lease);
        Ok(())
    }

    async fn set_paused(&self, lease: Lease, paused: bool) -> Result<()> {
        let provider = self.provider(&lease.provider)?.clone();
        self.leases.admit_renewing(&lease).await?;
        if paused {
            provider.pause(&lease.sandbox_id).await?;
        } else {
            provider.resume(&lease.sandbox_id).await?;
        }
        self.leases.set_paused(&lease.sandbox_id, paused);
        Ok(())
    }

    /// This worker's volume host, for a volume id the caller sent.
    fn volume_host(&self, id: &str) -> Result<(&VolumeHost, VolumeId)> {
        let id = VolumeId::parse(id)
            .ok_or_else(|| Error::InvalidRequest(format!("{id:?} is not a volume id")))?;
        let host = self
            .volumes
            .as_ref()
            .ok_or_else(|| Error::Unsupported(format!("worker {} keeps no volumes", self.id)))?;
        if !crate::volumes::can_keep() {
            return Err(Error::Unsupported(format!(
                "worker {} runs without root and cannot loop-mount volumes",
                self.id
            )));
        }
        Ok((host, id))
    }

    async fn image_removed(&self, image: &ImageInfo) -> Result<()> {
        let mut first_error = None;
        for p in &self.providers {
            if let Err(e) = p.image_removed(image).await {
                first_error.get_or_insert(e);
            }
        }
        match self.catalog.delete(&image.name).await {
            Ok(()) | Err(Error::ImageNotFound(_)) | Err(Error::NotFound(_)) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The RPC service over a [`WorkerRpc`].
struct Service(Arc<WorkerRpc>);

type TunnelStream = Pin<Box<dyn futures_util::Stream<Item = Result<pb::Chunk, Status>> + Send>>;

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn parse_rfc3339(s: &str) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::InvalidRequest(format!("{s:?} is not an RFC 3339 time: {e}")))
}

fn answer<T>(r: Result<T>) -> std::result::Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| to_status(&e))
}

#[async_trait]
impl WorkerRpcService for Service {
    async fn volume_create(
        &self,
        req: Request<pb::VolumeRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let outcome = async {
            let (host, id) = self.0.volume_host(&r.volume_id)?;
            stacyvm_core::volumes::validate_volume_size("size_mb", r.size_mb)?;
            host.create(&id, r.size_mb).await
        }
        .await;
        answer(outcome.map(|()| pb::Empty {}))
    }

    async fn volume_mount(
        &self,
        req: Request<pb::VolumeRequest>,
    ) -> std::result::Result<Response<pb::VolumePath>, Status> {
        let r = req.into_inner();
        let outcome = async {
            let (host, id) = self.0.volume_host(&r.volume_id)?;
            host.ensure_mounted(&id).await
        }
        .await;
        answer(outcome.map(|p| pb::VolumePath {
            path: p.to_string_lossy().into_owned(),
        }))
    }

    async fn volume_remove(
        &self,
        req: Request<pb::VolumeRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let outcome = async {
            let (host, id) = self.0.volume_host(&r.volume_id)?;
            host.remove(&id).await
        }
        .await;
        answer(outcome.map(|()| pb::Empty {}))
    }

    async fn describe(
        &self,
        _: Request<pb::Empty>,
    ) -> std::result::Result<Response<pb::Description>, Status> {
        Ok(Response::new(pb::Description {
            id: self.0.id.to_string(),
            providers: self.0.provider_names(),
            egress_allow_providers: self.0.egress_allow_providers(),
        }))
    }

    async fn provider_health(
        &self,
        _: Request<pb::Empty>,
    ) -> std::result::Result<Response<pb::ProviderHealthList>, Status> {
        let providers = self
            .0
            .provider_health()
            .await
            .into_iter()
            .map(|h| pb::ProviderHealthEntry {
                name: h.name,
                healthy: h.health.healthy,
                detail: h.health.detail,
                mode: h.mode.map(|m| pb::ProviderMode {
                    mode: m.mode,
                    not_enforced: m.not_enforced,
                }),
            })
            .collect();
        Ok(Response::new(pb::ProviderHealthList { providers }))
    }

    async fn runtimes(
        &self,
        _: Request<pb::Empty>,
    ) -> std::result::Result<Response<pb::RuntimeList>, Status> {
        answer(self.0.runtimes().await.map(|rs| {
            pb::RuntimeList {
                runtimes: rs
                    .into_iter()
                    .map(|r| pb::Runtime {
                        provider: r.provider,
                        sandbox_id: r.runtime.sandbox_id.to_string(),
                        running: r.runtime.running,
                    })
                    .collect(),
            }
        }))
    }

    async fn image_removed(
        &self,
        req: Request<pb::ImageRemovedRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let outcome = async {
            let image = ImageInfo {
                name: r.name,
                size: r.size,
                digest: r.digest,
                created_at: parse_rfc3339(&r.created_at)?,
            };
            self.0.image_removed(&image).await
        }
        .await;
        answer(outcome.map(|()| pb::Empty {}))
    }

    async fn spawn(
        &self,
        req: Request<pb::SpawnRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let outcome = async {
            let lease = lease_from(r.lease).map_err(|e| (e, false))?;
            let spec: SpawnSpec = serde_json::from_str(&r.spec_json).map_err(|e| {
                (
                    Error::InvalidRequest(format!("a malformed spawn spec: {e}")),
                    false,
                )
            })?;
            self.0.spawn(lease, spec, &r.image_digest).await
        }
        .await;
        match outcome {
            Ok(()) => Ok(Response::new(pb::Empty {})),
            Err((e, missing)) => {
                let mut status = to_status(&e);
                if missing && r.can_push_image {
                    status
                        .metadata_mut()
                        .insert(PUSH_IMAGE, MetadataValue::from_static("1"));
                }
                Err(status)
            }
        }
    }

    async fn push_image(
        &self,
        req: Request<Streaming<pb::ImageChunk>>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let mut chunks = req.into_inner();
        let outcome = async {
            let first = chunks
                .message()
                .await
                .map_err(|s| Error::InvalidRequest(format!("the image push failed: {s}")))?
                .ok_or_else(|| Error::InvalidRequest("an image push without a chunk".into()))?;
            let (name, digest) = (first.name.clone(), first.digest.clone());
            let head = futures_util::stream::once(async move { Ok(first.data) });
            let rest = futures_util::stream::unfold(chunks, |mut c| async move {
                match c.message().await {
                    Ok(Some(chunk)) => Some((Ok(chunk.data), c)),
                    Ok(None) => None,
                    Err(s) => Some((Err(std::io::Error::other(s.to_string())), c)),
                }
            });
            let body: ByteStream = Box::pin(head.chain(rest));
            self.0.import(&name, &digest, body).await
        }
        .await;
        answer(outcome.map(|()| pb::Empty {}))
    }

    async fn destroy(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let outcome = async { self.0.destroy(lease_from(req.into_inner().lease)?).await }.await;
        answer(outcome.map(|()| pb::Empty {}))
    }

    async fn pause(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let outcome = async {
            self.0
                .set_paused(lease_from(req.into_inner().lease)?, true)
                .await
        }
        .await;
        answer(outcome.map(|()| pb::Empty {}))
    }

    async fn resume(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let outcome = async {
            self.0
                .set_paused(lease_from(req.into_inner().lease)?, false)
                .await
        }
        .await;
        answer(outcome.map(|()| pb::Empty {}))
    }

    async fn logs(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> std::result::Result<Response<pb::LogList>, Status> {
        let outcome = async {
            let lease = lease_from(req.into_inner().lease)?;
            let provider = self.0.provider(&lease.provider)?.clone();
            self.0.leases.admit_renewing(&lease).await?;
            provider.logs(&lease.sandbox_id).await
        }
        .await;
        answer(outcome.map(|lines| {
            pb::LogList {
                lines: lines
                    .into_iter()
                    .map(|l| pb::LogLine {
                        ts: rfc3339(l.ts),
                        source: l.source,
                        message: l.message,
                    })
                    .collect(),
            }
        }))
    }

    async fn stats(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> std::result::Result<Response<pb::StatsReply>, Status> {
        let outcome = async {
            let lease = lease_from(req.into_inner().lease)?;
            let provider = self.0.provider(&lease.provider)?.clone();
            self.0.leases.admit_renewing(&lease).await?;
            let stats = provider.stats(&lease.sandbox_id).await?;
            serde_json::to_string(&stats).map_err(|e| Error::internal("encoding stats", e))
        }
        .await;
        answer(outcome.map(|stats_json| pb::StatsReply { stats_json }))
    }

    type SnapshotStream = TunnelStream;

    async fn snapshot(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> std::result::Result<Response<TunnelStream>, Status> {
        let outcome = async {
            let lease = lease_from(req.into_inner().lease)?;
            let provider = self.0.provider(&lease.provider)?.clone();
            self.0.leases.admit_renewing(&lease).await?;
            provider.snapshot(&lease.sandbox_id).await
        }
        .await;
        let tar = outcome.map_err(|e| to_status(&e))?;
        // Split what the provider hands over into messages the control
        // plane accepts; a read error ends the stream with a status, so a
        // short tar is never taken for a whole one.
        let chunks = tar.flat_map(|piece| {
            let out: Vec<std::result::Result<pb::Chunk, Status>> = match piece {
                Ok(mut data) => {
                    let mut v = Vec::new();
                    while data.len() > SNAPSHOT_CHUNK {
                        v.push(Ok(pb::Chunk {
                            data: data.split_to(SNAPSHOT_CHUNK),
                        }));
                    }
                    v.push(Ok(pb::Chunk { data }));
                    v
                }
                Err(e) => vec![Err(to_status(&Error::internal(
                    "reading the sandbox's snapshot",
                    e,
                )))],
            };
            futures_util::stream::iter(out)
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    type AgentTunnelStream = TunnelStream;

    async fn agent_tunnel(
        &self,
        req: Request<Streaming<pb::Chunk>>,
    ) -> std::result::Result<Response<TunnelStream>, Status> {
        let opened = async {
            let lease = lease_from_metadata(req.metadata())?;
            let provider = self.0.provider(&lease.provider)?.clone();
            let lease_gone = self.0.leases.admit_renewing(&lease).await?;
            // The tunnel ends with the lease (taken, or lapsed without a
            // renewal) or with the server.
            let revoked = CancellationToken::new();
            let (gone, closing, end) = (lease_gone, self.0.closing.clone(), revoked.clone());
            let (leases, id, token) = (
                self.0.leases.clone(),
                lease.sandbox_id.clone(),
                lease.fencing_token,
            );
            tokio::spawn(async move {
                while let Some(expiry) = leases.expiry(&id, token) {
                    if expiry <= tokio::time::Instant::now() {
                        break;
                    }
                    tokio::select! {
                        () = gone.cancelled() => break,
                        () = closing.cancelled() => break,
                        () = end.cancelled() => break,
                        // Renewed meanwhile? Look again.
                        () = tokio::time::sleep_until(expiry) => {}
                    }
                }
                end.cancel();
            });
            let stream = provider.agent_stream(&lease.sandbox_id).await?;
            Ok::<_, Error>((lease.sandbox_id, revoked, stream))
        }
        .await;
        let (id, revoked, stream) = opened.map_err(|e| to_status(&e))?;
        let (reader, writer) = tokio::io::split(stream);
        tokio::spawn(pump_in(req.into_inner(), writer, revoked.clone(), id));
        let out = tokio_util::io::ReaderStream::with_capacity(reader, TUNNEL_READ)
            .map(|r| {
                r.map(|data| pb::Chunk { data })
                    .map_err(|e| Status::unavailable(format!("the agent connection failed: {e}")))
            })
            .take_until(revoked.cancelled_owned());
        Ok(Response::new(Box::pin(out)))
    }
}

/// Copies the control plane's side of a tunnel to the agent until either
/// ends, the lease goes or the server stops.
async fn pump_in(
    mut inbound: Streaming<pb::Chunk>,
    mut agent: tokio::io::WriteHalf<stacyvm_provider::AgentStream>,
    revoked: CancellationToken,
    id: SandboxId,
) {
    loop {
        let next = tokio::select! {
            () = revoked.cancelled() => break,
            next = inbound.message() => next,
        };
        match next {
            Ok(Some(chunk)) => {
                if let Err(e) = agent.write_all(&chunk.data).await {
                    tracing::debug!(sandbox = %id, error = %e, "the agent connection closed");
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(sandbox = %id, error = %e, "the control plane's side of a tunnel failed");
                break;
            }
        }
    }
    let _ = agent.shutdown().await;
    // The control plane closed its side: the agent's side goes too.
    revoked.cancel();
}

/// A worker RPC server that is up.
pub struct RpcServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl RpcServer {
    /// Serves `rpc` on `listener` (TLS when `tls` is given) until
    /// [`RpcServer::shutdown`].
    pub async fn start(
        rpc: Arc<WorkerRpc>,
        listener: TcpListener,
        tls: Option<&ServerTls>,
    ) -> Result<RpcServer> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::internal("reading the worker RPC's address", e))?;
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            // Tunnels carry file transfers: windows well above HTTP/2's
            // 64 KiB default keep a fast link busy.
            .initial_stream_window_size(Some(super::STREAM_WINDOW))
            .initial_connection_window_size(Some(super::CONNECTION_WINDOW));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.config()).map_err(|e| {
                Error::InvalidRequest(format!("the worker's TLS certificate or key: {e}"))
            })?;
        }
        let gate = rpc.clone();
        let service = InterceptedService::new(
            WorkerServer::new(Service(rpc.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            move |req: Request<()>| {
                gate.authorize(req.metadata())?;
                Ok(req)
            },
        );
        let stop = rpc.closing.clone();
        // Small agent frames go out at once (no Nagle delay on an exec's
        // round trip), and TCP keepalives notice a vanished peer.
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(std::time::Duration::from_secs(30)));
        let task = tokio::spawn(
            builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
        );
        Ok(RpcServer { addr, stop, task })
    }

    /// Stops accepting and waits a little for the calls in flight; open
    /// agent tunnels (which a control plane keeps as long as it likes) are
    /// then cut.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop.cancel();
        let ended = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(ended) => ended,
            Err(_) => {
                self.task.abort();
                return Ok(());
            }
        };
        match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::internal("serving the worker RPC", e)),
            Err(e) => Err(Error::internal("the worker RPC task", e)),
        }
    }
}
