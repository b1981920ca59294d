//! The create body's `network` field: the API's three forms mapped to the
//! sandbox's network mode and its validated egress allow list.

use stacyvm_api as api;
use stacyvm_core::{EgressRule, Error, Network, Result};

/// Splits the API's network field into a mode and an allow list; a bad
/// allow-list entry is a `400 invalid_request` that names the entry.
pub fn network_from_api(n: Option<api::Network>) -> Result<(Option<Network>, Vec<EgressRule>)> {
    Ok(match n {
        None => (None, Vec::new()),
        Some(api::Network::None) => (Some(Network::None), Vec::new()),
        Some(api::Network::Egress | api::Network::Full) => (Some(Network::Egress), Vec::new()),
        Some(api::Network::Allow(entries)) => {
            if entries.is_empty() {
                return Err(Error::InvalidRequest(
                    "network.allow must list at least one CIDR network or host name; use \"none\" for no network"
                        .into(),
                ));
            }
            let rules = EgressRule::parse_list(&entries)
                .map_err(|e| Error::InvalidRequest(e.to_string()))?;
            (Some(Network::Egress), rules)
        }
    })
}
