//! The API's shapes as this server fills them: conversions from the
//! store's records and the core's values to the `stacyvm-api` types (the
//! one definition of the public contract, shared with the SDKs). The HTTP
//! layer answers with these; it never sees the store itself.

use stacyvm_api as api;
use stacyvm_core::{ExecOutcome, FileEntry};
use stacyvm_provider::images::ImageInfo;
use stacyvm_provider::LogLine;
use stacyvm_store::{ApiKey, AuditEvent, Quota, SandboxRecord, Tenant};

pub fn sandbox(r: &SandboxRecord) -> api::Sandbox {
    api::Sandbox {
        id: r.id.to_string(),
        tenant_id: r.tenant_id.to_string(),
        state: api::SandboxState::parse(r.state.as_str()).unwrap_or(api::SandboxState::Unknown),
        provider: r.provider.clone(),
        worker_id: r.worker_id.as_ref().map(|w| w.to_string()),
        image: r.image.clone(),
        template: r.template.clone(),
        cpu: r.cpu,
        memory_mb: r.memory_mb,
        network: r.network.as_str().into(),
        network_allow: r.egress_allow.iter().map(ToString::to_string).collect(),
        labels: r.labels.clone(),
        timeout_s: Some(r.timeout_s),
        workdir: r.workdir.clone(),
        created_at: r.created_at,
        started_at: r.started_at,
        expires_at: r.expires_at,
        destroyed_at: r.destroyed_at,
        failure: r.failure.as_ref().map(|f| api::Failure {
            code: f.code.clone(),
            message: f.message.clone(),
        }),
    }
}

/// Output as text, and its exact bytes in base64 when it is not UTF-8.
fn text_and_b64(bytes: &[u8]) -> (String, Option<String>) {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

pub fn exec_response(o: ExecOutcome) -> api::ExecResponse {
    let (stdout, stdout_b64) = text_and_b64(&o.stdout);
    let (stderr, stderr_b64) = text_and_b64(&o.stderr);
    api::ExecResponse {
        exit_code: o.status.exit_code,
        signal: o.status.signal,
        stdout,
        stderr,
        stdout_b64,
        stderr_b64,
        duration_ms: o.status.duration_ms,
        timed_out: o.status.timed_out,
        stdout_truncated: o.stdout_truncated,
        stderr_truncated: o.stderr_truncated,
    }
}

pub fn exit_status(s: &stacyvm_core::ExitStatus) -> api::ExitStatus {
    api::ExitStatus {
        exit_code: s.exit_code,
        signal: s.signal,
        duration_ms: s.duration_ms,
        timed_out: s.timed_out,
    }
}

pub fn stream_chunk(bytes: &[u8]) -> api::StreamChunk {
    let (data, data_b64) = text_and_b64(bytes);
    api::StreamChunk { data, data_b64 }
}

pub fn stats_sample(x: &crate::app::stats::StatsSample) -> api::StatsSample {
    api::StatsSample {
        ts: x.at,
        cpu_count: x.stats.cpu_count,
        cpu_used_pct: x.cpu_used_pct,
        mem_used: x.stats.mem_used,
        mem_total: x.stats.mem_total,
        mem_cache: x.stats.mem_cache,
        disk_used: x.stats.disk_used,
        disk_total: x.stats.disk_total,
    }
}

pub fn log_line(l: &LogLine) -> api::LogLine {
    api::LogLine {
        ts: l.ts,
        source: l.source.clone(),
        message: l.message.clone(),
    }
}

pub fn archive(a: stacyvm_core::ArchiveSummary) -> api::ArchiveSummary {
    api::ArchiveSummary {
        path: a.path,
        files: a.files,
        dirs: a.dirs,
        symlinks: a.symlinks,
        bytes: a.bytes,
    }
}

pub fn entry(e: &FileEntry) -> api::FileEntry {
    use stacyvm_core::FileType as T;
    api::FileEntry {
        path: e.path.clone(),
        name: e.name.clone(),
        file_type: match e.file_type {
            T::File => api::FileType::File,
            T::Dir => api::FileType::Dir,
            T::Symlink => api::FileType::Symlink,
            T::Other => api::FileType::Other,
        },
        size: e.size,
        mode: e.mode.clone(),
        mtime: e.mtime,
        symlink_target: e.symlink_target.clone(),
    }
}

pub fn image(i: &ImageInfo) -> api::Image {
    api::Image {
        name: i.name.clone(),
        size: i.size,
        digest: i.digest.clone(),
        created_at: i.created_at,
    }
}

pub fn quota(q: &Quota) -> api::Quota {
    api::Quota {
        max_sandboxes: q.max_sandboxes,
        max_cpu: q.max_cpu,
        max_memory_mb: q.max_memory_mb,
        max_timeout_s: q.max_timeout_s,
        max_exec_per_minute: q.max_exec_per_minute,
        allowed_providers: q.allowed_providers.clone(),
        max_concurrent_execs: q.max_concurrent_execs,
        max_volumes: q.max_volumes,
        max_volume_mb: q.max_volume_mb,
        max_templates: q.max_templates,
    }
}

pub fn quota_from(q: api::Quota) -> Quota {
    Quota {
        max_sandboxes: q.max_sandboxes,
        max_cpu: q.max_cpu,
        max_memory_mb: q.max_memory_mb,
        max_timeout_s: q.max_timeout_s,
        max_exec_per_minute: q.max_exec_per_minute,
        allowed_providers: q.allowed_providers,
        max_concurrent_execs: q.max_concurrent_execs,
        max_volumes: q.max_volumes,
        max_volume_mb: q.max_volume_mb,
        max_templates: q.max_templates,
    }
}

pub fn tenant(t: &Tenant, q: &Quota) -> api::Tenant {
    api::Tenant {
        id: t.id.to_string(),
        name: t.name.clone(),
        quota: quota(q),
        created_at: Some(t.created_at),
    }
}

pub fn key(k: &ApiKey, secret: Option<String>) -> api::ApiKey {
    api::ApiKey {
        id: k.id.to_string(),
        key_e2b: secret.as_deref().and_then(super::auth::e2b_spelling),
        key: secret,
        tenant_id: k.tenant_id.to_string(),
        role: k.role.as_str().into(),
        name: k.name.clone(),
        created_at: k.created_at,
        revoked_at: k.revoked_at,
    }
}

pub fn audit_event(e: &AuditEvent) -> api::AuditEvent {
    api::AuditEvent {
        id: e.id.to_string(),
        ts: e.ts,
        tenant_id: e.tenant_id.as_ref().map(|t| t.to_string()),
        actor: api::Actor {
            key_id: e.actor.key_id.as_ref().map(|k| k.to_string()),
            role: e.actor.role.map(|r| r.as_str().to_owned()),
        },
        action: e.action.clone(),
        target: e.target.clone(),
        sandbox_id: e.sandbox_id.clone(),
        outcome: e.outcome.as_str().into(),
        status: e.status,
        request_id: e.request_id.clone(),
        source_ip: e.source_ip.clone(),
        detail: e.detail.clone(),
    }
}

/// A worker token as listed (never its secret).
pub fn worker_token(t: &stacyvm_store::WorkerToken) -> api::WorkerToken {
    api::WorkerToken {
        id: t.id.to_string(),
        token: None,
        name: t.name.clone(),
        created_at: t.created_at,
        revoked_at: t.revoked_at,
    }
}

/// A worker with `sandboxes` live sandboxes. A provider it has not reported
/// health for yet shows as unhealthy, saying so.
pub fn worker(w: stacyvm_store::WorkerRecord, sandboxes: i64) -> api::Worker {
    let providers = w
        .providers
        .iter()
        .map(
            |name| match w.provider_health.iter().find(|h| &h.name == name) {
                Some(h) => api::WorkerProvider {
                    name: name.clone(),
                    healthy: h.healthy,
                    detail: h.detail.clone(),
                    mode: h.mode.clone(),
                    not_enforced: h.not_enforced.clone(),
                    certified: h.certified,
                    certified_at: h.certified_at,
                },
                None => api::WorkerProvider {
                    name: name.clone(),
                    healthy: false,
                    detail: "no health reported yet".into(),
                    mode: None,
                    not_enforced: None,
                    certified: None,
                    certified_at: None,
                },
            },
        )
        .collect();
    api::Worker {
        id: w.id.to_string(),
        name: w.name,
        state: w.state.as_str().into(),
        address: w.address,
        providers,
        labels: w.labels,
        capacity: api::WorkerCapacity {
            sandboxes: w.capacity,
            cpu: w.capacity_cpu,
            memory_mb: w.capacity_memory_mb,
        },
        sandboxes,
        last_heartbeat: w.last_heartbeat,
    }
}
