//! The sandbox state machine and the spec a provider spawns from.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::ids::SandboxId;

/// `pending → starting → running ⇄ paused → stopping → destroyed`, or
/// `failed` (spawn error) or `lost` (worker gone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Pending,
    Starting,
    Running,
    Paused,
    Stopping,
    Destroyed,
    Failed,
    Lost,
}

impl SandboxState {
    pub const ALL: [SandboxState; 8] = [
        SandboxState::Pending,
        SandboxState::Starting,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Stopping,
        SandboxState::Destroyed,
        SandboxState::Failed,
        SandboxState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Pending => "pending",
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopping => "stopping",
            SandboxState::Destroyed => "destroyed",
            SandboxState::Failed => "failed",
            SandboxState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxState> {
        SandboxState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Terminal states hold no runtime and count against no quota.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SandboxState::Destroyed | SandboxState::Failed | SandboxState::Lost
        )
    }

    /// Whether the state machine allows moving from `self` to `next`.
    pub fn can_become(self, next: SandboxState) -> bool {
        use SandboxState::*;
        match (self, next) {
            (a, b) if a == b => true,
            (Pending, Starting | Failed | Stopping | Destroyed) => true,
            (Starting, Running | Failed | Stopping | Destroyed | Lost) => true,
            (Running, Paused | Stopping | Destroyed | Failed | Lost) => true,
            (Paused, Running | Stopping | Destroyed | Lost) => true,
            (Stopping, Destroyed | Failed | Lost) => true,
            // A lost sandbox whose runtime is found again may still be torn down.
            (Lost, Stopping | Destroyed) => true,
            (Failed, Stopping | Destroyed) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Network access of a sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Loopback only.
    #[default]
    None,
    /// Outbound access.
    Egress,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Egress => "egress",
        }
    }

    pub fn parse(s: &str) -> Option<Network> {
        match s {
            "none" => Some(Network::None),
            "egress" => Some(Network::Egress),
            _ => None,
        }
    }
}

/// What a provider needs to spawn a runtime. Providers never see tenants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpawnSpec {
    pub sandbox_id: SandboxId,
    /// Image name: from the image catalog, or (Docker) from the daemon.
    pub image: String,
    pub cpu: f64,
    pub memory_mb: u64,
    pub env: BTreeMap<String, String>,
    /// Working directory for commands; created if missing.
    pub workdir: Option<String>,
    pub network: Network,
    pub labels: BTreeMap<String, String>,
    /// With [`Network::Egress`]: when not empty, only these destinations
    /// are reachable and DNS answers only for the listed names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<crate::EgressRule>,
    /// Host directories (mounted volumes) to bind into the sandbox.
    #[serde(default)]
    pub mounts: Vec<crate::HostMount>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_do_not_come_back() {
        for s in [SandboxState::Destroyed] {
            for n in SandboxState::ALL {
                if n != s {
                    assert!(!s.can_become(n), "{s} -> {n}");
                }
            }
        }
        assert!(SandboxState::Running.can_become(SandboxState::Paused));
        assert!(SandboxState::Paused.can_become(SandboxState::Running));
        assert!(!SandboxState::Failed.can_become(SandboxState::Running));
    }

    #[test]
    fn states_parse_from_their_names() {
        for s in SandboxState::ALL {
            assert_eq!(SandboxState::parse(s.as_str()), Some(s));
        }
        assert_eq!(SandboxState::parse("nope"), None);
    }
}
