//! Egress policy: the destinations a sandbox with an allow list may reach.
//!
//! An entry is either an IP network in CIDR form (a bare address counts as a
//! single host) or a DNS host name. Entries are validated and normalised here
//! once, so the API, the store and the providers all see the same form.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The most entries one allow list may hold: enough for real policies, small
/// enough that the rules and the DNS filter stay cheap.
pub const MAX_ALLOW_ENTRIES: usize = 64;

/// The longest host name DNS can carry (RFC 1035).
const MAX_HOST_LEN: usize = 253;

/// One allowed destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum EgressRule {
    /// An IP network: the address is already masked to its prefix.
    Cidr { addr: IpAddr, prefix: u8 },
    /// A host name, lower-case, without a trailing dot.
    Host(String),
}

/// Why an allow-list entry was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("network.allow entry {entry:?} {reason}")]
pub struct BadRule {
    pub entry: String,
    pub reason: &'static str,
}

impl EgressRule {
    /// Parses one entry: `10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`, or a
    /// host name such as `pypi.org`.
    pub fn parse(entry: &str) -> Result<EgressRule, BadRule> {
        let bad = |reason| BadRule {
            entry: entry.chars().take(300).collect(),
            reason,
        };
        if entry.is_empty() {
            return Err(bad("is empty"));
        }
        let (addr_part, prefix_part) = match entry.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (entry, None),
        };
        if let Ok(addr) = addr_part.parse::<IpAddr>() {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix_part {
                None => max,
                Some(p)
                    if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    match p.parse::<u8>() {
                        Ok(n) if n <= max => n,
                        _ => return Err(bad("has a prefix length out of range")),
                    }
                }
                Some(_) => return Err(bad("has a prefix length that is not a number")),
            };
            return Ok(EgressRule::Cidr {
                addr: mask(addr, prefix),
                prefix,
            });
        }
        if prefix_part.is_some() {
            return Err(bad("is not a valid CIDR network"));
        }
        let host = entry
            .strip_suffix('.')
            .unwrap_or(entry)
            .to_ascii_lowercase();
        if host.is_empty() || host.len() > MAX_HOST_LEN {
            return Err(bad("is not a valid host name (1 to 253 characters)"));
        }
        let labels: Vec<&str> = host.split('.').collect();
        for label in &labels {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(bad(
                    "is neither a CIDR network nor a valid host name (RFC 1123 labels)",
                ));
            }
        }
        // A name whose last label is all digits would read as an address.
        if labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(bad("is neither a valid IP address nor a valid host name"));
        }
        Ok(EgressRule::Host(host))
    }

    /// Parses and checks a whole allow list: at most [`MAX_ALLOW_ENTRIES`]
    /// entries; duplicates are dropped.
    pub fn parse_list<S: AsRef<str>>(entries: &[S]) -> Result<Vec<EgressRule>, BadRule> {
        if entries.len() > MAX_ALLOW_ENTRIES {
            return Err(BadRule {
                entry: format!("#{}", MAX_ALLOW_ENTRIES + 1),
                reason: "is one too many: an allow list holds at most 64 entries",
            });
        }
        let mut out: Vec<EgressRule> = Vec::with_capacity(entries.len());
        for e in entries {
            let rule = EgressRule::parse(e.as_ref())?;
            if !out.contains(&rule) {
                out.push(rule);
            }
        }
        Ok(out)
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressRule::Cidr { addr, prefix } => write!(f, "{addr}/{prefix}"),
            EgressRule::Host(h) => f.write_str(h),
        }
    }
}

impl TryFrom<String> for EgressRule {
    type Error = BadRule;
    fn try_from(s: String) -> Result<Self, BadRule> {
        EgressRule::parse(&s)
    }
}

impl From<EgressRule> for String {
    fn from(r: EgressRule) -> String {
        r.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_masked_and_bare_addresses_are_hosts() {
        assert_eq!(
            EgressRule::parse("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            EgressRule::parse("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            EgressRule::parse("2001:db8::1/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(
            EgressRule::parse("0.0.0.0/0").unwrap().to_string(),
            "0.0.0.0/0"
        );
    }

    #[test]
    fn host_names_follow_rfc_1123() {
        assert_eq!(
            EgressRule::parse("PyPI.org.").unwrap(),
            EgressRule::Host("pypi.org".into())
        );
        assert!(EgressRule::parse("3com.example").is_ok());
        for bad in [
            "",
            "-a.example",
            "a-.example",
            "a..example",
            "a_b.example",
            "10.0.0.0/33",
            "10.0.0.0/x",
            "1.2.3.4/",
            "example.com/8",
            "999.1.1.1",
            "exa mple.com",
            "*.example.com",
        ] {
            let err = EgressRule::parse(bad).unwrap_err();
            assert_eq!(err.entry, bad);
        }
        assert!(EgressRule::parse(&"a".repeat(64)).is_err());
        assert!(EgressRule::parse(&format!("{}.com", "a.".repeat(130))).is_err());
    }

    #[test]
    fn lists_are_bounded_and_deduplicated() {
        let many: Vec<String> = (0..=MAX_ALLOW_ENTRIES)
            .map(|i| format!("10.0.0.{i}"))
            .collect();
        assert!(EgressRule::parse_list(&many).is_err());
        let list = EgressRule::parse_list(&["10.0.0.1", "10.0.0.1/32", "a.example"]).unwrap();
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn rules_round_trip_through_json() {
        let list = EgressRule::parse_list(&["10.0.0.0/8", "pypi.org"]).unwrap();
        let json = serde_json::to_string(&list).unwrap();
        assert_eq!(json, r#"["10.0.0.0/8","pypi.org"]"#);
        let back: Vec<EgressRule> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, list);
        assert!(serde_json::from_str::<Vec<EgressRule>>(r#"["nope..x"]"#).is_err());
    }
}
