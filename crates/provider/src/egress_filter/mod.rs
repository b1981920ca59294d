//! Egress allow lists enforced inside a sandbox's own network namespace: an
//! nftables table there whose output chain lets out only loopback, replies,
//! the listed networks and the addresses StacyVM's DNS filter resolved for
//! the listed names; and that DNS filter itself (see [`dns`]).
//!
//! A microVM guest's traffic does not leave from its namespace's own
//! processes but crosses the bridge there from the guest's tap device; its
//! table (family `bridge`, see [`Placement::GuestBridge`]) filters those
//! frames instead, and its DNS filter listens on an address of that bridge.
//!
//! The table lives in the sandbox's namespace, so it disappears with the
//! sandbox however the server ends, and a sandbox without `CAP_NET_ADMIN`
//! can neither list nor change it. The DNS filter is a task of the server
//! process holding a socket that was opened inside the sandbox's namespace:
//! it needs no address on the host, nothing on the host can be reached
//! through it, and it ends with the server.

pub mod dns;
#[cfg(feature = "conformance")]
pub mod far_side;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stacyvm_core::{EgressRule, Error, Result, SandboxId};

/// The nftables table (family `inet`) inside each filtered sandbox.
pub const NFT_TABLE: &str = "stacyvm_egress";
/// Where a filtered sandbox's resolver points: a loopback address of the
/// sandbox's own namespace on which the DNS filter listens.
pub const RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
pub const RESOLVER_PORT: u16 = 53;
/// Where a guest's resolver points: an address of the bridge in the
/// guest's namespace (link-local, so no network anyone uses), which the
/// guest reaches through a host route on its NIC.
pub const GUEST_RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 53);
/// Docker's embedded resolver, present in every container on a user-defined
/// network; it would answer any name, so it is unreachable.
const DOCKER_RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
/// At most this many resolved addresses are kept per sandbox (per family).
const RESOLVED_SET_SIZE: u32 = 4096;
/// Resolved addresses stay reachable at least this long after an answer,
/// so a client that caches a short-lived answer a little longer still
/// reaches it...
const MIN_ADDRESS_TTL: Duration = Duration::from_secs(60);
/// ...and at most this long after the last answer that named them.
const MAX_ADDRESS_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where a sandbox's traffic is filtered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In the sandbox's own network namespace, on its processes' output
    /// (containers, `namespaces` sandboxes).
    Own,
    /// On the bridge of a microVM guest's namespace, on the frames its tap
    /// device `tap` sends on; `gateway` is the host's end, which the
    /// host's own table guards.
    GuestBridge {
        tap: &'static str,
        gateway: Ipv4Addr,
    },
}

impl Placement {
    /// The nftables family of the table.
    pub fn family(&self) -> &'static str {
        match self {
            Placement::Own => "inet",
            Placement::GuestBridge { .. } => "bridge",
        }
    }

    /// Where the DNS filter listens.
    pub fn resolver(&self) -> Ipv4Addr {
        match self {
            Placement::Own => RESOLVER_ADDR,
            Placement::GuestBridge { .. } => GUEST_RESOLVER_ADDR,
        }
    }

    /// The resolver configuration a filtered sandbox gets as
    /// `/etc/resolv.conf`.
    pub fn resolv_conf(&self) -> String {
        format!(
            "# StacyVM: this sandbox resolves only the host names of its allow list\n\
             nameserver {}\noptions ndots:0\n",
            self.resolver()
        )
    }

    /// The table that enforces `rules` here, as one nftables script that
    /// replaces any earlier copy of it atomically.
    pub fn ruleset(&self, rules: &[EgressRule]) -> String {
        match self {
            Placement::Own => nft_ruleset(rules),
            Placement::GuestBridge { tap, gateway } => bridge_ruleset(rules, tap, *gateway),
        }
    }
}

/// The resolver configuration a filtered container or `namespaces`
/// sandbox gets as `/etc/resolv.conf`.
pub fn resolv_conf() -> String {
    Placement::Own.resolv_conf()
}

/// The networks of an allow list, IPv4 and IPv6, as set elements.
fn network_elements(rules: &[EgressRule]) -> (String, String) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for r in rules {
        if let EgressRule::Cidr { addr, prefix } = r {
            match addr {
                IpAddr::V4(_) => v4.push(format!("{addr}/{prefix}")),
                IpAddr::V6(_) => v6.push(format!("{addr}/{prefix}")),
            }
        }
    }
    let elements = |list: &[String]| {
        if list.is_empty() {
            String::new()
        } else {
            format!("; elements = {{ {} }}", list.join(", "))
        }
    };
    (elements(&v4), elements(&v6))
}

/// The sets both tables hold: the listed networks and the addresses the
/// DNS filter resolved.
fn sets(rules: &[EgressRule]) -> String {
    let (e4, e6) = network_elements(rules);
    format!(
        "\tset allowed4 {{ type ipv4_addr; flags interval{e4}; }}\n\
         \tset allowed6 {{ type ipv6_addr; flags interval{e6}; }}\n\
         \tset resolved4 {{ type ipv4_addr; flags timeout; size {RESOLVED_SET_SIZE}; }}\n\
         \tset resolved6 {{ type ipv6_addr; flags timeout; size {RESOLVED_SET_SIZE}; }}\n"
    )
}

/// The table of a microVM guest: frames the guest sends through the bridge
/// pass only to the listed networks, the resolved addresses, or the host's
/// end of its link (the host's own table keeps the guest off the host, and
/// lets through only replies to the host's connections); ARP and IPv6
/// neighbour discovery pass too. What reaches the bridge's own address (the
/// DNS filter) is not forwarded and not filtered here. Nothing else leaves
/// the guest: it is dropped (the bridge family can neither track
/// connections nor answer with a reset on every kernel), so a denied
/// connection times out. Nothing can connect into a guest from outside
/// (the host's table), so no reply of the guest needs to pass unlisted.
pub fn bridge_ruleset(rules: &[EgressRule], tap: &str, gateway: Ipv4Addr) -> String {
    format!(
        r#"table bridge {NFT_TABLE}
delete table bridge {NFT_TABLE}
table bridge {NFT_TABLE} {{
{sets}	chain forward {{
		type filter hook forward priority filter; policy accept;
		iifname != "{tap}" accept
		ether type arp accept
		ip daddr {gateway} accept
		icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept
		ip daddr @allowed4 accept
		ip6 daddr @allowed6 accept
		ip daddr @resolved4 accept
		ip6 daddr @resolved6 accept
		drop
	}}
}}
"#,
        sets = sets(rules),
    )
}

/// The table that enforces `rules`, as one nftables script that replaces
/// any earlier copy of it atomically.
///
/// Everything leaving the namespace is refused (with a reset or an ICMP
/// error, so clients fail at once rather than time out) except loopback
/// (where the DNS filter listens; Docker's resolver excepted), replies to
/// connections already accepted, IPv6 neighbour discovery, and destinations
/// in the static sets (the listed networks) or the resolved sets (filled by
/// the DNS filter, each address with a timeout).
pub fn nft_ruleset(rules: &[EgressRule]) -> String {
    format!(
        r#"table inet {NFT_TABLE}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
{sets}	chain output {{
		type filter hook output priority filter; policy drop;
		ct state established,related accept
		ip daddr {DOCKER_RESOLVER} reject with icmpx type admin-prohibited
		oifname "lo" accept
		icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept
		ip daddr @allowed4 accept
		ip6 daddr @allowed6 accept
		ip daddr @resolved4 accept
		ip6 daddr @resolved6 accept
		meta l4proto tcp reject with tcp reset
		reject with icmpx type admin-prohibited
	}}
}}
"#,
        sets = sets(rules),
    )
}

/// The host names of an allow list.
pub fn allowed_names(rules: &[EgressRule]) -> Vec<String> {
    rules
        .iter()
        .filter_map(|r| match r {
            EgressRule::Host(h) => Some(h.clone()),
            EgressRule::Cidr { .. } => None,
        })
        .collect()
}

/// A handle on a network namespace (`/proc/PID/ns/net`), kept open so the
/// namespace it names cannot be swapped for another while it is held.
#[derive(Debug)]
pub struct NetNs(OwnedFd);

impl NetNs {
    /// The network namespace of process `pid`.
    pub fn of_pid(pid: u32) -> io::Result<NetNs> {
        let path = std::ffi::CString::new(format!("/proc/{pid}/ns/net"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a NUL-terminated path and plain flags; the returned
        // descriptor is checked before it is owned.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened here and is owned by nothing else.
        Ok(NetNs(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A named network namespace (`/run/netns/NAME`) or any other
    /// namespace file.
    pub fn open(path: &str) -> io::Result<NetNs> {
        Ok(NetNs(std::fs::File::open(path)?.into()))
    }

    /// Runs `f` on a thread of its own that first joins this namespace, so
    /// the sockets `f` opens belong to it while the rest of the process
    /// stays where it is. The thread ends with `f`.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let fd = self.0.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: `fd` stays open for the whole scope (borrowed from
                // self); setns changes only this thread's namespace.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .map_err(|_| {
                io::Error::other("the thread inside the sandbox's network namespace panicked")
            })?
        })
    }

    /// Applies an nftables script inside this namespace.
    pub async fn nft(&self, script: &str) -> Result<()> {
        crate::sandboxing::nft::apply(script, Some(self.0.as_raw_fd()))
            .await
            .map_err(|why| nft_error(&why))
    }
}

fn nft_error(why: &str) -> Error {
    Error::ProviderUnavailable(format!(
        "cannot apply the egress allow list in the sandbox's network namespace ({why}); allow \
         lists need the `nft` tool (Debian's nftables package) and a server running as root"
    ))
}

/// The upstream resolvers named by a `resolv.conf`: the DNS filter forwards
/// allowed names to them from the host's network namespace.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            // A scoped IPv6 address (fe80::1%eth0) has no portable form
            // here; such hosts configure an upstream explicitly.
            let addr: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(addr, 53))
        })
        .collect()
}

/// The resolvers allow-listed names are forwarded to: the operator's
/// (`--egress-dns-upstream`), else the host's.
pub fn upstreams(configured: &[SocketAddr]) -> Result<Vec<SocketAddr>> {
    if configured.is_empty() {
        host_upstreams()
    } else {
        Ok(configured.to_vec())
    }
}

/// The `/etc/resolv.conf` of a sandbox with full egress: the upstream
/// resolvers reachable from a sandbox (a loopback address of the host is
/// not: the sandbox's loopback is its own).
pub fn plain_resolv_conf(upstreams: &[SocketAddr]) -> String {
    let usable: Vec<String> = upstreams
        .iter()
        .filter(|a| a.port() == 53 && !a.ip().is_loopback())
        .map(|a| format!("nameserver {}\n", a.ip()))
        .collect();
    if usable.is_empty() {
        return "# StacyVM: the host names no nameserver a sandbox can reach (its own are \
                loopback addresses); the operator sets one with --egress-dns-upstream\n"
            .into();
    }
    format!("# StacyVM: the host's nameservers\n{}", usable.concat())
}

/// The host's resolvers, from `/etc/resolv.conf`.
pub fn host_upstreams() -> Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string("/etc/resolv.conf").map_err(|e| {
        Error::ProviderUnavailable(format!(
            "reading /etc/resolv.conf for the upstream resolver of allow-listed names: {e}; \
             configure one with --egress-dns-upstream"
        ))
    })?;
    let found = upstreams_from_resolv_conf(&text);
    if found.is_empty() {
        return Err(Error::ProviderUnavailable(
            "/etc/resolv.conf names no usable nameserver for the upstream resolver of \
             allow-listed names; configure one with --egress-dns-upstream"
                .into(),
        ));
    }
    Ok(found)
}

/// Everything enforcing one sandbox's allow list from the host side: the
/// namespace handle and the DNS filter. Dropping it stops the filter; the
/// table goes with the namespace.
pub struct EgressGuard {
    _dns: dns::DnsFilter,
}

impl EgressGuard {
    /// Loads the table for `rules` into `netns`, filtering at `placement`,
    /// and starts the DNS filter for its host names (also when there are
    /// none, so every lookup gets a clear refusal rather than a timeout).
    pub async fn arm(
        netns: NetNs,
        placement: Placement,
        rules: &[EgressRule],
        upstreams: Vec<SocketAddr>,
    ) -> Result<EgressGuard> {
        netns.nft(&placement.ruleset(rules)).await?;
        let sets = Arc::new(ResolvedSets::at(netns, placement));
        let dns = dns::DnsFilter::start(sets, allowed_names(rules), upstreams).await?;
        Ok(EgressGuard { _dns: dns })
    }

    /// Starts the DNS filter again for a namespace whose table is already
    /// loaded (its server ended), leaving the table and its resolved sets
    /// as they are, so connections and answers already handed out keep
    /// working.
    pub async fn resume(
        netns: NetNs,
        placement: Placement,
        rules: &[EgressRule],
        upstreams: Vec<SocketAddr>,
    ) -> Result<EgressGuard> {
        let sets = Arc::new(ResolvedSets::at(netns, placement));
        let dns = dns::DnsFilter::start(sets, allowed_names(rules), upstreams).await?;
        Ok(EgressGuard { _dns: dns })
    }
}

/// One provider's DNS filters, by sandbox: `None` while a spawn arms one,
/// so a listing meanwhile (adoption) does not start a second.
#[derive(Default)]
pub struct EgressGuards(std::sync::Mutex<HashMap<SandboxId, Option<EgressGuard>>>);

impl EgressGuards {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Option<EgressGuard>>> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A spawn is arming `id`'s filter.
    pub fn arming(&self, id: &SandboxId) {
        self.map().insert(id.clone(), None);
    }

    /// `id`'s filter runs.
    pub fn armed(&self, id: &SandboxId, guard: EgressGuard) {
        self.map().insert(id.clone(), Some(guard));
    }

    /// Whether `id` has a filter, or one being armed.
    pub fn has(&self, id: &SandboxId) -> bool {
        self.map().contains_key(id)
    }

    /// Keeps the filter an adoption started for `id` unless one was armed
    /// meanwhile (it is then dropped); says whether it was kept.
    pub fn adopt(&self, id: &SandboxId, guard: EgressGuard) -> bool {
        let mut map = self.map();
        if map.contains_key(id) {
            return false;
        }
        map.insert(id.clone(), Some(guard));
        true
    }

    /// Stops `id`'s filter.
    pub fn remove(&self, id: &SandboxId) {
        let gone = self.map().remove(id);
        drop(gone);
    }

    /// How many filters run.
    pub fn running(&self) -> usize {
        self.map().values().filter(|g| g.is_some()).count()
    }
}

/// The resolved-address sets of one sandbox's table, and when each address
/// StacyVM added expires, so a shorter TTL never cuts a longer one short.
pub struct ResolvedSets {
    netns: NetNs,
    placement: Placement,
    expiry: tokio::sync::Mutex<HashMap<IpAddr, Instant>>,
}

impl ResolvedSets {
    /// The sets of a table in the sandbox's own namespace.
    pub fn new(netns: NetNs) -> ResolvedSets {
        ResolvedSets::at(netns, Placement::Own)
    }

    /// The sets of a table filtering at `placement`.
    pub fn at(netns: NetNs, placement: Placement) -> ResolvedSets {
        ResolvedSets {
            netns,
            placement,
            expiry: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// Where the table filters (and so where the DNS filter listens).
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Makes `addrs` reachable for at least their TTLs (clamped to
    /// [`MIN_ADDRESS_TTL`]..[`MAX_ADDRESS_TTL`]); returns once the kernel
    /// has them, so an answer is only handed out once it can be used.
    ///
    /// An address is given twice its TTL and refreshed only once less than
    /// one TTL is left: every answer is still covered for as long as a
    /// client may cache it, while a sandbox repeating a lookup costs the
    /// host an `nft` run at most once per TTL and address.
    pub async fn add(&self, addrs: &[(IpAddr, u32)]) -> Result<()> {
        let mut expiry = self.expiry.lock().await;
        let now = Instant::now();
        expiry.retain(|_, until| *until > now);
        let mut wanted: Vec<(IpAddr, u64)> = Vec::new();
        for (addr, ttl) in addrs {
            let ttl = Duration::from_secs(u64::from(*ttl)).clamp(MIN_ADDRESS_TTL, MAX_ADDRESS_TTL);
            if expiry.get(addr).is_some_and(|until| *until >= now + ttl) {
                continue;
            }
            let secs = (2 * ttl).as_secs();
            if let Some(w) = wanted.iter_mut().find(|(a, _)| a == addr) {
                w.1 = w.1.max(secs);
            } else {
                wanted.push((*addr, secs));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        self.netns
            .nft(&refresh_script(self.placement.family(), &wanted))
            .await?;
        for (addr, secs) in wanted {
            expiry.insert(addr, now + Duration::from_secs(secs));
        }
        Ok(())
    }
}

/// Adds each address with its timeout, replacing the timeout of one already
/// there: add (so it exists), delete, add again, in one transaction.
fn refresh_script(family: &str, addrs: &[(IpAddr, u64)]) -> String {
    let mut out = String::new();
    for (set, v4) in [("resolved4", true), ("resolved6", false)] {
        let these: Vec<&(IpAddr, u64)> = addrs.iter().filter(|(a, _)| a.is_ipv4() == v4).collect();
        if these.is_empty() {
            continue;
        }
        let with_timeout = these
            .iter()
            .map(|(a, s)| format!("{a} timeout {s}s"))
            .collect::<Vec<_>>()
            .join(", ");
        let bare = these
            .iter()
            .map(|(a, _)| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "add element {family} {NFT_TABLE} {set} {{ {with_timeout} }}\n\
             delete element {family} {NFT_TABLE} {set} {{ {bare} }}\n\
             add element {family} {NFT_TABLE} {set} {{ {with_timeout} }}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(entries: &[&str]) -> Vec<EgressRule> {
        EgressRule::parse_list(entries).unwrap()
    }

    #[test]
    fn the_ruleset_holds_the_networks_and_replaces_only_its_table() {
        let r = nft_ruleset(&rules(&[
            "10.1.0.0/16",
            "192.0.2.7",
            "2001:db8::/32",
            "pypi.org",
        ]));
        assert!(r.starts_with("table inet stacyvm_egress\ndelete table inet stacyvm_egress\n"));
        assert!(
            r.contains("elements = { 10.1.0.0/16, 192.0.2.7/32 }"),
            "{r}"
        );
        assert!(r.contains("elements = { 2001:db8::/32 }"), "{r}");
        assert!(!r.contains("pypi"), "{r}");
        assert!(r.contains("policy drop"));
        assert!(!r.contains("flush ruleset"));
        // Without networks the sets are declared empty.
        let r = nft_ruleset(&rules(&["pypi.org"]));
        assert!(!r.contains("elements"), "{r}");
    }

    #[test]
    fn upstreams_come_from_nameserver_lines() {
        let text = "# c\nsearch x\nnameserver 10.0.0.2\nnameserver ::1\nnameserver fe80::1%eth0\nnameserver\n";
        assert_eq!(
            upstreams_from_resolv_conf(text),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_refresh_adds_deletes_and_adds_per_family() {
        let s = refresh_script(
            "inet",
            &[
                ("192.0.2.1".parse().unwrap(), 60),
                ("2001:db8::1".parse().unwrap(), 90),
            ],
        );
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 6, "{s}");
        assert_eq!(
            lines[0],
            "add element inet stacyvm_egress resolved4 { 192.0.2.1 timeout 60s }"
        );
        assert_eq!(
            lines[1],
            "delete element inet stacyvm_egress resolved4 { 192.0.2.1 }"
        );
        assert!(lines[3].contains("resolved6 { 2001:db8::1 timeout 90s }"));
        let s = refresh_script("bridge", &[("192.0.2.1".parse().unwrap(), 60)]);
        assert!(
            s.starts_with("add element bridge stacyvm_egress resolved4 {"),
            "{s}"
        );
    }

    #[test]
    fn a_guests_table_filters_frames_from_its_tap_only() {
        let at = Placement::GuestBridge {
            tap: "tap0",
            gateway: Ipv4Addr::new(10, 213, 0, 1),
        };
        let r = at.ruleset(&rules(&["10.1.0.0/16", "pypi.org"]));
        assert!(r.starts_with("table bridge stacyvm_egress\ndelete table bridge stacyvm_egress\n"));
        assert!(r.contains("elements = { 10.1.0.0/16 }"), "{r}");
        assert!(r.contains("iifname != \"tap0\" accept"), "{r}");
        assert!(r.contains("ip daddr 10.213.0.1 accept"), "{r}");
        assert!(r.trim_end().ends_with("drop\n\t}\n}"), "{r}");
        assert!(at.resolv_conf().contains("nameserver 169.254.53.53\n"));
        assert_eq!(at.family(), "bridge");
        assert!(Placement::Own
            .resolv_conf()
            .contains("nameserver 127.0.0.53\n"));
    }
}
