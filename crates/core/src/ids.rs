//! Typed, prefixed, opaque IDs (`sbx_…`, `tnt_…`, `key_…`, `wrk_…`, `evt_…`, `vol_…`).
//!
//! IDs are UUIDv7 in lowercase hex behind a type prefix, so they sort in
//! creation order; list cursors rely on that.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh, time-ordered ID.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, uuid::Uuid::now_v7().simple()))
            }

            /// Accepts a string as this kind of ID if it carries the right
            /// prefix and only ID characters; `None` otherwise.
            pub fn parse(s: &str) -> Option<Self> {
                let rest = s.strip_prefix($prefix)?;
                if rest.is_empty()
                    || rest.len() > 64
                    || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return None;
                }
                Some(Self(s.to_owned()))
            }

            /// Wraps a value read back from trusted storage without checking it.
            pub fn from_trusted(s: impl Into<String>) -> Self {
                Self(s.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

typed_id!(
    /// A sandbox.
    SandboxId, "sbx_"
);
typed_id!(
    /// A tenant: the unit of isolation and quota.
    TenantId, "tnt_"
);
typed_id!(
    /// An API key (the ID, never the secret).
    KeyId, "key_"
);
typed_id!(
    /// A worker: one host that owns runtimes.
    WorkerId, "wrk_"
);
typed_id!(
    /// A worker token (the ID, never the secret).
    WorkerTokenId, "wtk_"
);
typed_id!(
    /// An audit event.
    EventId, "evt_"
);
typed_id!(
    /// A volume.
    VolumeId, "vol_"
);
typed_id!(
    /// One version (one build) of a template.
    TemplateVersionId, "tpv_"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_sort_in_creation_order() {
        let a = SandboxId::generate();
        let b = SandboxId::generate();
        assert!(a < b);
        assert_eq!(SandboxId::parse(a.as_str()), Some(a));
    }

    #[test]
    fn foreign_prefixes_and_junk_are_refused() {
        assert!(SandboxId::parse("tnt_abc").is_none());
        assert!(SandboxId::parse("sbx_").is_none());
        assert!(SandboxId::parse("sbx_../etc").is_none());
        assert!(SandboxId::parse("sbx_a\0b").is_none());
    }
}
