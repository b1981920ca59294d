//! Networking for sandboxes that ask for egress and are not Docker's:
//! microVM guests and `namespaces` sandboxes. Each sandbox has a network
//! namespace of its own holding one end of a veth pair whose other end is
//! on the host. A guest's namespace is made here and holds a bridge and a
//! tap device too (the VM's NIC is on it; the VM monitor runs inside that
//! namespace); a `namespaces` sandbox's is the one its processes already
//! live in, named here (`ip netns attach`) and given the veth end as
//! `eth0`. The sandbox and the host's veth end share a /30 from [`POOL`];
//! the host masquerades the sandbox's traffic out of whatever interface
//! routes it.
//!
//! The address lease is the host-side interface's name, `svq<slot>`: the
//! kernel refuses a second interface of the same name, so two spawns (of
//! this server or any other on the host) never share a slot, and a slot is
//! free again the moment its veth pair is gone. Nothing is recorded
//! outside the kernel but an owner file per namespace (so a namespace whose
//! sandbox directory vanished can be found and removed).
//!
//! One host-wide nftables table ([`NFT_TABLE`], replaced whole and
//! idempotently before every guest starts) keeps every guest off the host
//! (any local address, loopback services included), away from other
//! sandboxes (other guests, container bridges) and from spoofing source
//! addresses, and lets nothing open a connection into a guest. It names
//! the interfaces by prefix, so it holds nothing per sandbox.
//!
//! A guest with an allow list has it enforced on the bridge of its
//! namespace ([`arm_allow_list`]): a `bridge` table there passes only
//! frames to allowed destinations, and StacyVM's DNS filter listens on an
//! address of the bridge that the guest's resolver names. All of it goes
//! with the namespace.

use std::collections::HashSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stacyvm_core::{EgressRule, Error, Result, SandboxId, SpawnSpec};

use crate::egress_filter::{self, EgressGuard, EgressGuards, NetNs, Placement};
use crate::sandboxing::short_hash;

/// The private block guests' /30s come from.
pub const POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 213, 0, 0), 16);
/// /30s in [`POOL`].
pub const POOL_SLOTS: u32 = 1 << (32 - 16 - 2);
/// The host-side veth ends are `svq<slot>`.
pub const HOST_IF_PREFIX: &str = "svq";
/// Network namespaces are `svmq-<sandbox id>`.
pub const NETNS_PREFIX: &str = "svmq-";
/// StacyVM's nftables table for guests (family `inet`); distinct from the
/// Docker provider's table, which that provider replaces whole.
pub const NFT_TABLE: &str = "stacyvm_vm";
/// Inside a guest's namespace: the veth end, the bridge and the VM's tap.
pub const NS_VETH: &str = "veth0";
/// Inside a `namespaces` sandbox's namespace: its veth end.
pub const NS_ETH: &str = "eth0";
pub const NS_BRIDGE: &str = "br0";
pub const NS_TAP: &str = "tap0";
/// Host-wide state: the lock that serialises rule installation, and the
/// owner files.
const RUN_DIR: &str = "/run/stacyvm/qemu-net";
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// The file in a guest's sandbox directory recording its [`GuestNet`].
pub const LEASE_FILE: &str = "net.json";

/// One guest's network, as recorded in its sandbox directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestNet {
    pub netns: String,
    pub slot: u32,
}

impl GuestNet {
    pub fn host_if(&self) -> String {
        format!("{HOST_IF_PREFIX}{}", self.slot)
    }

    fn base(&self) -> u32 {
        u32::from(POOL.0) + self.slot * 4
    }

    /// The host's address on the veth, the guest's gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
    }

    pub fn guest_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 2)
    }

    /// A locally administered MAC address unique to the slot.
    pub fn mac(&self) -> String {
        format!(
            "52:54:00:d5:{:02x}:{:02x}",
            (self.slot >> 8) & 0xff,
            self.slot & 0xff
        )
    }

    /// What the guest's init reads: `ADDR/PREFIX GATEWAY`.
    pub fn guest_config(&self) -> String {
        format!("{}/30 {}\n", self.guest_addr(), self.gateway())
    }
}

/// The namespace of sandbox `id`: derived from the id alone, so it is
/// found again whatever a crash left unrecorded.
pub fn netns_name(id: &SandboxId) -> String {
    format!("{NETNS_PREFIX}{id}")
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Opens the namespace, for `setns(2)` in a child before it execs.
pub fn open_netns(name: &str) -> Result<OwnedFd> {
    let f = std::fs::File::open(netns_path(name))
        .map_err(|e| Error::internal(format!("opening network namespace {name}"), e))?;
    Ok(f.into())
}

/// Moves the calling process (a child between fork and exec) into the
/// network namespace `fd`.
///
/// # Safety
/// Only async-signal-safe calls are made: meant for `pre_exec`.
pub unsafe fn enter_netns(fd: i32) -> std::io::Result<()> {
    // SAFETY: setns(2) takes a file descriptor and a flag; it touches no
    // memory of ours.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `ip` (or another tool) to its end; its stderr becomes the error.
async fn run(program: &str, args: &[&str]) -> std::result::Result<String, String> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(TOOL_TIMEOUT, child).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("cannot run {program}: {e}")),
        Err(_) => return Err(format!("{program} {} hung", args.join(" "))),
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

async fn ip(args: &[&str]) -> Result<String> {
    run("ip", args).await.map_err(Error::Internal)
}

/// The rules of [`NFT_TABLE`], applied as one transaction that replaces
/// the whole table, so applying them again (from any number of servers at
/// once) leaves exactly this.
///
/// - `prerouting`: a guest's packet whose source is not its own address on
///   its own veth is dropped (no spoofing of other guests), and so is a
///   connection to any address of the host, before anything could
///   redirect it.
/// - `input`: nothing else from a guest reaches the host either (IPv6
///   link-local and broadcast included); replies to the host's own
///   connections pass.
/// - `forward`: nothing opens a connection into a guest (not another guest,
///   not a container, not a machine on the host's network), and a guest's
///   packets never go out to another guest or a container bridge.
/// - `postrouting`: a guest's traffic leaves with the host's address.
pub fn nft_ruleset() -> String {
    let p = HOST_IF_PREFIX;
    format!(
        r#"table inet {NFT_TABLE}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
	chain prerouting {{
		type filter hook prerouting priority mangle; policy accept;
		iifname "{p}*" ct state established,related accept
		iifname "{p}*" fib saddr . iif oif missing drop
		iifname "{p}*" fib daddr type local drop
	}}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname "{p}*" ct state established,related accept
		iifname "{p}*" drop
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		oifname "{p}*" ct state established,related accept
		oifname "{p}*" drop
		iifname "{p}*" oifname "docker*" drop
		iifname "{p}*" oifname "br-*" drop
		iifname "{p}*" oifname "svm-*" drop
		iifname "{p}*" oifname "veth*" drop
	}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		iifname "{p}*" oifname != "{p}*" masquerade
	}}
}}
"#
    )
}

/// Docker's `FORWARD` chain drops what no rule of Docker's accepts; its
/// `DOCKER-USER` chain is where other forwarding is let through. These
/// rules pass guests' outgoing traffic and the replies to it; the
/// nftables table above has already dropped what must not pass.
const DOCKER_USER_RULES: [&[&str]; 2] = [
    &["-i", "svq+", "!", "-o", "svq+", "-j", "ACCEPT"],
    &[
        "-o",
        "svq+",
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ],
];

/// A host-wide lock held while the host's rules are installed (so two
/// servers never both add Docker's rules).
struct HostLock {
    /// The lock is the open descriptor; closing it releases the lock.
    _held: std::fs::File,
}

impl HostLock {
    fn take() -> Result<HostLock> {
        std::fs::create_dir_all(RUN_DIR)
            .map_err(|e| Error::internal(format!("creating {RUN_DIR}"), e))?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(RUN_DIR).join("lock"))
            .map_err(|e| Error::internal("opening the network lock", e))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::internal(
                "locking the network lock",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(HostLock { _held: f })
    }
}

/// Makes the host ready to forward guests' traffic: the nftables table,
/// Docker's forward chain if there is one, and IPv4 forwarding on (as
/// Docker turns it on).
async fn prepare_host() -> Result<()> {
    let lock = tokio::task::spawn_blocking(HostLock::take)
        .await
        .map_err(|e| Error::internal("taking the network lock", e))??;
    let result = async {
        crate::sandboxing::nft::apply(&nft_ruleset(), None)
            .await
            .map_err(|why| {
                Error::ProviderUnavailable(format!(
                    "installing the guests' nftables rules failed (egress needs the `nft` tool, \
                     Debian's nftables package, and a server running as root or with \
                     CAP_NET_ADMIN): {why}"
                ))
            })?;
        if run("iptables", &["-S", "DOCKER-USER"]).await.is_ok() {
            for rule in DOCKER_USER_RULES {
                let mut check = vec!["-C", "DOCKER-USER"];
                check.extend_from_slice(rule);
                if run("iptables", &check).await.is_err() {
                    let mut insert = vec!["-I", "DOCKER-USER"];
                    insert.extend_from_slice(rule);
                    run("iptables", &insert)
                        .await
                        .map_err(Error::ProviderUnavailable)?;
                }
            }
        }
        let fwd = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(fwd)
            .map(|s| s.trim() != "1")
            .unwrap_or(true)
        {
            std::fs::write(fwd, "1")
                .map_err(|e| Error::internal("turning IPv4 forwarding on", e))?;
        }
        Ok(())
    }
    .await;
    drop(lock);
    result
}

/// Every IPv4 address on the host's interfaces.
async fn host_addresses() -> Result<HashSet<Ipv4Addr>> {
    let out = ip(&["-4", "-o", "addr", "show"]).await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().skip_while(|w| *w != "inet");
            w.next();
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect())
}

fn owner_file(netns: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{netns}.owner"))
}

/// Whose network namespace a sandbox's network lives in.
#[derive(Clone, Copy, Debug)]
pub enum Holder {
    /// A microVM guest: a namespace made here, with a bridge and the VM's
    /// tap, that the VM monitor is started in.
    Guest,
    /// The namespace process `pid` (a `namespaces` sandbox's init) already
    /// lives in; the veth end becomes its `eth0` with the sandbox's address
    /// and default route.
    Process(u32),
}

/// Gives sandbox `id` (whose directory is `owner`) its named network
/// namespace (made, or the holder's own) with a veth pair on a leased /30.
/// `record` is called with each slot before it is tried, so whatever a
/// crash leaves is found from the sandbox's directory; [`remove`] undoes
/// everything this made.
pub async fn create(
    id: &SandboxId,
    owner: &Path,
    holder: Holder,
    record: impl Fn(&GuestNet) -> Result<()>,
) -> Result<GuestNet> {
    for tool in ["ip", "nft"] {
        if super::find_program(tool).is_none() {
            return Err(Error::ProviderUnavailable(format!(
                "{tool} was not found (install Debian's iproute2 and nftables)"
            )));
        }
    }
    prepare_host().await?;
    let netns = netns_name(id);
    std::fs::create_dir_all(RUN_DIR)
        .map_err(|e| Error::internal(format!("creating {RUN_DIR}"), e))?;
    std::fs::File::create(owner_file(&netns))
        .and_then(|mut f| f.write_all(owner.as_os_str().as_encoded_bytes()))
        .map_err(|e| Error::internal("writing the network owner file", e))?;
    let made = match holder {
        Holder::Guest => run("ip", &["netns", "add", &netns]).await,
        Holder::Process(pid) => run("ip", &["netns", "attach", &netns, &pid.to_string()]).await,
    };
    made.map_err(|e| {
        Error::ProviderUnavailable(format!(
            "cannot make the sandbox's network namespace (egress needs a server running as root \
             or with CAP_SYS_ADMIN and CAP_NET_ADMIN): {e}"
        ))
    })?;
    let n = netns.as_str();
    ip(&["-n", n, "link", "set", "lo", "up"]).await?;
    let inner = match holder {
        Holder::Guest => {
            for args in [
                ["-n", n, "link", "add", NS_BRIDGE, "type", "bridge"].as_slice(),
                &["-n", n, "tuntap", "add", "dev", NS_TAP, "mode", "tap"],
                &["-n", n, "link", "set", NS_TAP, "master", NS_BRIDGE],
            ] {
                ip(args).await?;
            }
            NS_VETH
        }
        Holder::Process(_) => NS_ETH,
    };

    // The lease: the first free slot from a point of the sandbox's own.
    let used = host_addresses().await?;
    let start =
        u32::from_str_radix(&short_hash(id.as_str().as_bytes())[..8], 16).unwrap_or(0) % POOL_SLOTS;
    let mut leased = None;
    for i in 0..POOL_SLOTS {
        let net = GuestNet {
            netns: netns.clone(),
            slot: (start + i) % POOL_SLOTS,
        };
        let host_if = net.host_if();
        if Path::new("/sys/class/net").join(&host_if).exists()
            || used.contains(&net.gateway())
            || used.contains(&net.guest_addr())
        {
            continue;
        }
        record(&net)?;
        match ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", inner, "netns", &netns,
        ])
        .await
        {
            Ok(_) => {
                leased = Some(net);
                break;
            }
            // Taken by a spawn racing this one.
            Err(Error::Internal(e)) if e.contains("File exists") => continue,
            Err(e) => return Err(e),
        }
    }
    let net = leased.ok_or_else(|| {
        Error::Conflict(format!(
            "every sandbox address of {}/{} is in use",
            POOL.0, POOL.1
        ))
    })?;
    let host_if = net.host_if();
    // No IPv6 on the host's end: the sandbox has no business with the
    // host's link-local addresses.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6"),
        "1",
    );
    let gw = format!("{}/30", net.gateway());
    ip(&["addr", "add", &gw, "dev", &host_if]).await?;
    ip(&["link", "set", &host_if, "up"]).await?;
    match holder {
        Holder::Guest => {
            for args in [
                ["-n", n, "link", "set", NS_VETH, "master", NS_BRIDGE].as_slice(),
                &["-n", n, "link", "set", NS_VETH, "up"],
                &["-n", n, "link", "set", NS_TAP, "up"],
                &["-n", n, "link", "set", NS_BRIDGE, "up"],
            ] {
                ip(args).await?;
            }
        }
        Holder::Process(_) => {
            let addr = format!("{}/30", net.guest_addr());
            let gateway = net.gateway().to_string();
            for args in [
                ["-n", n, "addr", "add", addr.as_str(), "dev", NS_ETH].as_slice(),
                &["-n", n, "link", "set", NS_ETH, "up"],
                &["-n", n, "route", "add", "default", "via", gateway.as_str()],
            ] {
                ip(args).await?;
            }
        }
    }
    Ok(net)
}

/// Removes sandbox `id`'s namespace with its bridge, tap and veth pair
/// (and so its lease) and its owner file. Nothing is looked up by slot: a
/// slot recorded before a crash may belong to another sandbox by now,
/// while the pair's inner end is in this sandbox's namespace only.
pub async fn remove(id: &SandboxId) -> Result<()> {
    let netns = netns_name(id);
    if netns_path(&netns).exists() {
        // Deleting the inner end takes the pair down at once; the
        // namespace's own teardown would do it later, in the background,
        // keeping the lease a while.
        for inner in [NS_VETH, NS_ETH] {
            if ip(&["-n", &netns, "link", "show", inner]).await.is_ok() {
                ip(&["-n", &netns, "link", "del", inner]).await?;
            }
        }
        if let Err(e) = ip(&["netns", "del", &netns]).await {
            if netns_path(&netns).exists() {
                return Err(e);
            }
        }
    }
    match std::fs::remove_file(owner_file(&netns)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::internal("removing the network owner file", e)),
    }
}

/// Removes the networks whose sandbox directory is gone (a data dir
/// deleted under running sandboxes, a crash between steps of a destroy).
/// A namespace without an owner file is left alone: it is another
/// program's or one a spawn is making right now.
pub async fn sweep_orphans() {
    let Ok(rd) = std::fs::read_dir(RUN_DIR) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(netns) = name.to_str().and_then(|n| n.strip_suffix(".owner")) else {
            continue;
        };
        let Some(id) = netns.strip_prefix(NETNS_PREFIX).and_then(SandboxId::parse) else {
            continue;
        };
        let Ok(owner) = std::fs::read(entry.path()) else {
            continue;
        };
        let owner = PathBuf::from(String::from_utf8_lossy(&owner).into_owned());
        if owner.as_os_str().is_empty() || owner.exists() {
            continue;
        }
        match remove(&id).await {
            Ok(()) => tracing::info!(sandbox = %id, "removed the network of a vanished sandbox"),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "could not remove an orphaned network")
            }
        }
    }
}

/// What guest `lease` resolves names with: the upstream resolvers, or,
/// with an allow list (`filtered`), its DNS filter on the bridge of its
/// namespace, reached through a host route on the guest's NIC.
fn nic_settings<'a>(
    lease: &'a GuestNet,
    filtered: bool,
    upstreams: &[SocketAddr],
) -> super::NicSettings<'a> {
    if filtered {
        let at = filter_placement(lease);
        super::NicSettings {
            lease,
            on_link: Some(at.resolver()),
            resolv_conf: at.resolv_conf(),
        }
    } else {
        super::NicSettings {
            lease,
            on_link: None,
            resolv_conf: egress_filter::plain_resolv_conf(upstreams),
        }
    }
}

/// The resolvers of a guest's names: the operator's (`configured`), else
/// the host's. A guest with an allow list (`filtered`) needs them (its DNS
/// filter forwards to them); one with full egress does without, its
/// resolver file then saying so.
fn guest_upstreams(configured: &[SocketAddr], filtered: bool) -> Result<Vec<SocketAddr>> {
    match egress_filter::upstreams(configured) {
        Ok(u) => Ok(u),
        Err(e) if filtered => Err(e),
        Err(_) => Ok(Vec::new()),
    }
}

/// Where a guest's allow list is enforced: on the bridge of its namespace,
/// on what its tap sends.
pub fn filter_placement(lease: &GuestNet) -> Placement {
    Placement::GuestBridge {
        tap: NS_TAP,
        gateway: lease.gateway(),
    }
}

fn open_filter_netns(lease: &GuestNet) -> Result<NetNs> {
    NetNs::open(&netns_path(&lease.netns).to_string_lossy())
        .map_err(|e| Error::internal("opening the guest's network namespace", e))
}

/// Enforces `rules` on guest `lease` before it boots: the DNS filter's
/// address on the bridge of its namespace (with the route back to the
/// guest), the bridge's table, and the DNS filter itself.
async fn arm_allow_list(
    lease: &GuestNet,
    rules: &[EgressRule],
    upstreams: Vec<SocketAddr>,
) -> Result<EgressGuard> {
    let at = filter_placement(lease);
    let n = lease.netns.as_str();
    let resolver = format!("{}/32", at.resolver());
    let guest = format!("{}/32", lease.guest_addr());
    let src = at.resolver().to_string();
    for args in [
        ["-n", n, "addr", "add", resolver.as_str(), "dev", NS_BRIDGE].as_slice(),
        &[
            "-n",
            n,
            "route",
            "add",
            guest.as_str(),
            "dev",
            NS_BRIDGE,
            "src",
            src.as_str(),
        ],
    ] {
        ip(args).await?;
    }
    EgressGuard::arm(open_filter_netns(lease)?, at, rules, upstreams).await
}

/// Starts the DNS filter of guest `lease` again, its table and address
/// being in place (a server adopting a running guest).
async fn resume_allow_list(
    lease: &GuestNet,
    rules: &[EgressRule],
    upstreams: Vec<SocketAddr>,
) -> Result<EgressGuard> {
    EgressGuard::resume(
        open_filter_netns(lease)?,
        filter_placement(lease),
        rules,
        upstreams,
    )
    .await
}

/// Why guests of `provider` cannot have allow lists on this host, if so:
/// the namespace's table needs root, `ip` and `nft`.
pub fn allow_list_unavailable(provider: &str) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(format!(
            "the {provider} provider enforces an egress allow list (network.allow) in the \
             guest's network namespace, which needs a server running as root"
        ));
    }
    ["ip", "nft"]
        .into_iter()
        .find(|t| super::find_program(t).is_none())
        .map(|tool| {
            format!(
                "the {provider} provider enforces an egress allow list (network.allow) with `ip` \
                 and `nft`, and {tool} was not found (install Debian's iproute2 and nftables)"
            )
        })
}

/// The DNS filters of one microVM provider's guests with allow lists.
#[derive(Default)]
pub struct GuestFilters(EgressGuards);

impl GuestFilters {
    /// The NIC settings of guest `lease` of `spec` (whose directory is
    /// `dir`), with its allow list, if any, armed first; `configured` are
    /// the operator's upstream resolvers.
    pub async fn nic<'a>(
        &self,
        spec: &SpawnSpec,
        dir: &Path,
        lease: &'a GuestNet,
        configured: &[SocketAddr],
    ) -> Result<super::NicSettings<'a>> {
        let filtered = !spec.egress_allow.is_empty();
        let upstreams = guest_upstreams(configured, filtered)?;
        if filtered {
            self.arm(
                &spec.sandbox_id,
                dir,
                lease,
                &spec.egress_allow,
                upstreams.clone(),
            )
            .await?;
        }
        Ok(nic_settings(lease, filtered, &upstreams))
    }

    /// Enforces `rules` on guest `id` (its lease `lease`, its directory
    /// `dir`) before it boots.
    async fn arm(
        &self,
        id: &SandboxId,
        dir: &Path,
        lease: &GuestNet,
        rules: &[EgressRule],
        upstreams: Vec<SocketAddr>,
    ) -> Result<()> {
        self.0.arming(id);
        let guard = arm_allow_list(lease, rules, upstreams).await?;
        self.0.armed(id, guard);
        crate::sandboxing::logs::provider_log(
            dir,
            &format!(
                "egress allow list enforced on the namespace's bridge ({} entries)",
                rules.len()
            ),
        );
        Ok(())
    }

    /// Starts the DNS filter again for guest `id` (its directory `dir`),
    /// whose `rules` are in force, when it has none: one a new server
    /// adopted (the filter ended with the server that started it; the
    /// table, in the guest's namespace, did not). Failures are logged: the
    /// guest stays as restricted as it was, its lookups fail.
    pub async fn rearm(
        &self,
        id: &SandboxId,
        dir: &Path,
        rules: &[EgressRule],
        configured: &[SocketAddr],
    ) {
        if rules.is_empty() || self.0.has(id) {
            return;
        }
        let result = async {
            let lease = crate::sandboxing::logs::read_json::<GuestNet>(dir, LEASE_FILE)
                .ok_or_else(|| Error::Conflict(format!("sandbox {id} has no network lease")))?;
            resume_allow_list(&lease, rules, egress_filter::upstreams(configured)?).await
        }
        .await;
        match result {
            Ok(guard) => {
                if self.0.adopt(id, guard) {
                    tracing::info!(sandbox = %id, "DNS filter of an adopted guest started again");
                }
            }
            Err(e) => tracing::warn!(
                sandbox = %id,
                error = %e.message(),
                "cannot start the DNS filter of an adopted guest again; its lookups fail"
            ),
        }
    }

    /// Stops guest `id`'s filter.
    pub fn remove(&self, id: &SandboxId) {
        self.0.remove(id);
    }

    /// How many filters run.
    pub fn running(&self) -> usize {
        self.0.running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_make_disjoint_30s_inside_the_pool() {
        let n = |slot| GuestNet {
            netns: "x".into(),
            slot,
        };
        assert_eq!(n(0).gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(n(0).guest_addr(), Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(n(1).gateway(), Ipv4Addr::new(10, 213, 0, 5));
        let last = n(POOL_SLOTS - 1);
        assert_eq!(last.guest_addr(), Ipv4Addr::new(10, 213, 255, 254));
        assert_eq!(last.host_if(), "svq16383");
        assert!(last.host_if().len() <= 15);
        assert_ne!(n(1).mac(), n(257).mac());
        assert_eq!(n(1).guest_config(), "10.213.0.6/30 10.213.0.5\n");
    }
}
