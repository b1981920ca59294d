//! Volumes: named, sized filesystems of a tenant that outlive the sandboxes
//! they are mounted into.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Volume {
    /// `vol_…`.
    pub id: String,
    pub tenant_id: String,
    /// Unique within the tenant: 1-63 characters of `a-z`, `0-9`, `-`, `_`.
    pub name: String,
    /// The filesystem's size; writes past it fail with `ENOSPC`.
    pub size_mb: i64,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: OffsetDateTime,
}

/// Body of `POST /v1/volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateVolume {
    pub name: String,
    /// At least 8 MiB.
    pub size_mb: i64,
}

/// `GET /v1/volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeList {
    pub volumes: Vec<Volume>,
}

/// One volume a sandbox create mounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeMount {
    /// The volume's name, in the caller's tenant.
    pub volume: String,
    /// Absolute, normalised path inside the sandbox; not `/`, not under
    /// `/proc`, `/sys`, `/dev` or `/.stacyvm`.
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}
