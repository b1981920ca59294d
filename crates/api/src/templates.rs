//! Templates: a named, versioned recipe (a base, build steps, create
//! defaults) built once into a catalog image and started many times.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Network;

/// One build step, run in order in the build's sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TemplateStep {
    /// Runs an argv (never joined into a shell string) with the env and
    /// working directory the steps before set; a non-zero exit fails the
    /// build with the step's output.
    Run(Vec<String>),
    /// Writes a file, making its parent directories.
    Write(WriteStep),
    /// Unpacks a tar archive into a directory (the CLI sends a local
    /// directory this way).
    Upload(UploadStep),
    /// Sets variables for the later steps and for every sandbox of the template.
    Env(BTreeMap<String, String>),
    /// Sets (and makes) the working directory of the later steps and the
    /// default working directory of the template's sandboxes.
    Workdir(String),
}

/// `{"write": {"path", "content", "mode"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WriteStep {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// The file's text.
    pub content: String,
    /// Octal permissions such as `"0755"` (default `0644`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `{"upload": {"path", "tar"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UploadStep {
    /// The absolute directory the archive is unpacked into (made if missing).
    pub path: String,
    /// The tar archive, base64-encoded. The whole request stays under the
    /// JSON body limit (10 MiB by default).
    pub tar: String,
}

/// Body of `POST /v1/templates`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    /// 1 to 63 of `a-z`, `0-9`, `.`, `_`, `-`, starting with a letter or a digit.
    pub name: String,
    /// The base: a template visible to the caller (`name` or `name:version`)
    /// or a catalog image.
    pub from: String,
    #[serde(default)]
    pub steps: Vec<TemplateStep>,
    /// CPUs of the build's sandbox and the default of the template's sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory of the build's sandbox and the default of the template's sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<i64>,
    /// Network of the build only (default `none`); sandboxes choose their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Default environment of the template's sandboxes (over the steps' `env`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default working directory of the template's sandboxes (over the steps' `workdir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Started as a background process in every sandbox of the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Vec<String>>,
    /// Run until it exits 0 before a create from the template returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<Vec<String>>,
    /// The provider to build on (default: the first healthy one); it must
    /// be able to snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// How long the whole build may take, in seconds (default 1800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<i64>,
}

/// Where a template version's build stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TemplateState {
    Building,
    Ready,
    Failed,
    /// A state this client does not know yet (never sent by this server).
    #[serde(other)]
    Unknown,
}

/// A template version: `GET /v1/templates/{name}` answers the newest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Template {
    pub name: String,
    pub version: i64,
    pub state: TemplateState,
    /// The catalog image sandboxes of this version run from (null until ready).
    pub image: Option<String>,
    /// Why the build failed: the failing step and its output.
    pub failure: Option<String>,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "crate::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub built_at: Option<OffsetDateTime>,
    /// The owning tenant; the operator's templates are visible to every tenant.
    pub tenant_id: String,
    /// The base it was built from.
    pub from: String,
    /// The create defaults of the version.
    pub cpu: Option<f64>,
    pub memory_mb: Option<i64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub start: Option<Vec<String>>,
    pub ready: Option<Vec<String>>,
}

/// `GET /v1/templates` (the newest version of each) and
/// `GET /v1/templates/{name}/versions` (every version, oldest first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateList {
    pub templates: Vec<Template>,
}

/// `GET /v1/templates/{name}/logs` once the build has ended (while it runs,
/// the same call streams the log as server-sent events).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateLog {
    pub name: String,
    pub version: i64,
    pub state: TemplateState,
    pub failure: Option<String>,
    pub log: String,
}
