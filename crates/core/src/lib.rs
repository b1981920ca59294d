//! StacyVM domain types shared by every crate: typed IDs, the sandbox spec and
//! state machine, exec and file types, and the one transport-agnostic error.

pub mod egress;
pub mod error;
pub mod exec;
pub mod files;
pub mod ids;
pub mod sandbox;
pub mod volumes;

pub use egress::EgressRule;
pub use error::{Error, Result};
pub use exec::{ExecEvent, ExecOutcome, ExecRequest, ExitStatus};
pub use files::{validate_sandbox_path, ArchiveSummary, ByteStream, FileEntry, FileType};
pub use ids::{
    EventId, KeyId, SandboxId, TemplateVersionId, TenantId, VolumeId, WorkerId, WorkerTokenId,
};
pub use sandbox::{Network, SandboxState, SpawnSpec};
pub use volumes::{HostMount, VolumeMount};

/// The current time, truncated to microseconds so it round-trips through
/// every store backend unchanged.
pub fn now() -> time::OffsetDateTime {
    let t = time::OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .expect("a truncated nanosecond is always in range")
}
