//! The OpenAPI 3.1 document of the API, generated from the handlers'
//! annotations (`/docs` renders it: see `ui.rs`).

use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use stacyvm_api as api;

use super::{admin, files, ports, procs, pty, sandboxes, snapshots, templates, volumes, workers};

mod reference;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("svm_…")
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "StacyVM API", version = "1", description = "Run untrusted code in isolated sandboxes."),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
    paths(
        sandboxes::sandbox_create, sandboxes::sandbox_list, sandboxes::sandbox_get, sandboxes::sandbox_destroy,
        sandboxes::sandbox_timeout, sandboxes::sandbox_pause, sandboxes::sandbox_resume, sandboxes::sandbox_logs,
        sandboxes::sandbox_stats,
        sandboxes::sandbox_exec, sandboxes::sandbox_exec_stream, pty::sandbox_pty,
        files::file_write, files::file_archive_put, files::file_archive_get, files::file_read, files::file_stat, files::file_list, files::file_glob,
        files::file_move, files::file_chmod, files::file_mkdir, files::file_delete,
        admin::image_import, admin::image_list, admin::image_get, admin::image_delete,
        admin::tenant_create, admin::tenant_list, admin::quota_get, admin::quota_set,
        admin::key_create, admin::key_list, admin::key_revoke, admin::whoami, admin::audit_list,
        admin::status, workers::worker_list, workers::worker_get, workers::worker_drain,
        workers::worker_undrain, workers::worker_token_create, workers::worker_token_list,
        workers::worker_token_revoke, workers::worker_register, workers::worker_heartbeat,
        workers::worker_image,
        admin::healthz, admin::readyz, admin::metrics,
        procs::process_start, procs::process_list, procs::process_get, procs::process_output,
        procs::process_stdin, procs::process_signal,
        snapshots::sandbox_snapshot,
        volumes::volume_create, volumes::volume_list, volumes::volume_get, volumes::volume_delete,
        templates::template_build, templates::template_list, templates::template_get,
        templates::template_versions, templates::template_logs, templates::template_delete,
        ports::port_expose, ports::port_list, ports::port_remove, ports::port_token, ports::proxy_path,
    ),
    components(schemas(
        api::ErrorBody, api::ErrorDetail, api::Sandbox, api::SandboxState, api::Network, api::Failure,
        api::CreateSandbox, api::SandboxList, api::SetTimeout, api::LogLine, api::Logs,
        api::StatsSample, api::SandboxStats,
        api::ExecRequest, api::ExecResponse, api::ExitStatus, api::StreamChunk, api::StreamError,
        api::FileType, api::FileEntry, api::Entries, api::Paths, api::MoveFile, api::Chmod, api::Mkdir,
        api::ArchiveSummary, api::Image, api::ImageList, api::CreateTenant, api::Quota, api::Tenant,
        api::TenantList, api::Role, api::CreateKey, api::ApiKey, api::KeyList, api::WhoAmI, api::Actor,
        api::AuditEvent, api::AuditList, api::Worker, api::WorkerList, api::WorkerProvider,
        api::WorkerCapacity, api::WorkerTokenCreate, api::WorkerToken, api::WorkerTokenList,
        api::WorkerRegister, api::WorkerRegistered, api::LeaseGrant, api::WorkerHeartbeat,
        api::RuntimeReport, api::WorkerHeartbeatReply, api::RefusedReport, api::StoreStatus,
        api::ProviderStatus, api::PoolStatus, api::Status, api::Health, RawBytes,
        procs::ProcessStart, procs::Process, procs::ProcessList, procs::ProcessSignal, procs::StdinWritten,
        snapshots::SnapshotRequest,
        api::Volume, api::CreateVolume, api::VolumeList, api::VolumeMount,
        api::CreateTemplate, api::TemplateStep, api::WriteStep, api::UploadStep, api::TemplateState,
        api::Template, api::TemplateList, api::TemplateLog,
        ports::PortExpose, ports::ExposedPort, ports::PortList, ports::PortTokenRequest, ports::PortToken,
    )),
    tags(
        (name = "sandboxes", description = "Create, inspect and destroy sandboxes"),
        (name = "exec", description = "Run commands"),
        (name = "files", description = "Move files in and out"),
        (name = "images", description = "The image catalog"),
        (name = "tenants", description = "Tenants and quotas"),
        (name = "keys", description = "API keys"),
        (name = "audit", description = "The audit log"),
        (name = "status", description = "Health, readiness, status, metrics"),
        (name = "workers", description = "Workers of multi-worker mode, their tokens, and the calls workers make"),
        (name = "volumes", description = "Volumes: data that outlives a sandbox"),
        (name = "templates", description = "Templates: environments built once and started many times"),
    )
)]
pub struct ApiDoc;

/// The document as served at `/openapi.json`: the handlers' annotations,
/// with the errors every call can answer and an example of each body added
/// (see `reference`).
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    reference::complete(&mut doc);
    doc
}

pub async fn openapi_json() -> Response {
    axum::Json(document()).into_response()
}

/// Raw bytes: a file's content, or a root filesystem as a tar stream.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct RawBytes(pub Vec<u8>);
