//! Egress for Docker sandboxes: the host-wide bridge networks egress
//! sandboxes join, and StacyVM's own nftables table that keeps them off the
//! host and away from each other.
//!
//! Every server on a host shares one network per kind rather than making one
//! per sandbox: Docker's default address pools hold only a few dozen bridge
//! networks. A network is created by whichever spawn needs it first and is
//! never removed by StacyVM (Docker refuses to remove it while a container
//! uses it, and an idle one costs nothing). Its bridge has a fixed interface
//! name, which both makes concurrent creations safe (Docker refuses a second
//! network with the same bridge name, so racing servers find the winner's)
//! and lets firewall rules name it.

use std::collections::HashMap;

use bollard::models::{NetworkCreateRequest, NetworkInspect};
use bollard::Docker;
use stacyvm_core::{EgressRule, Error, Result, SandboxId};

use super::{is_status, Inner, LABEL_MANAGED};
use crate::egress_filter::{self, EgressGuard, NetNs, Placement};

/// The network of egress sandboxes that may not reach the host.
pub const EGRESS_NETWORK: &str = "stacyvm-egress";
/// Its bridge interface (at most 15 bytes, the kernel's limit).
pub const EGRESS_BRIDGE: &str = "svm-egress";
/// The network of egress sandboxes on a server started with
/// `--egress-host-access`: the same, but the host is reachable.
pub const EGRESS_HOST_NETWORK: &str = "stacyvm-egress-host";
pub const EGRESS_HOST_BRIDGE: &str = "svm-egress-host";
/// StacyVM's nftables table (family `inet`).
pub const NFT_TABLE: &str = "stacyvm";

/// Docker's option that turns inter-container communication on a bridge
/// on or off.
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
/// Without it, bridged frames bypass IP filtering, and neither Docker's
/// `enable_icc=false` rule nor StacyVM's own forward rule sees them.
const BRIDGE_NETFILTER: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// The rules StacyVM installs, applied as one nftables transaction that
/// replaces the whole table, so applying them again (by any number of
/// servers at once) leaves exactly this. Docker's own tables are never
/// touched.
///
/// - `egress_prerouting`: a connection an egress sandbox opens to any
///   address of the host is dropped before Docker's port publishing could
///   redirect it; `egress_input`: nothing else from that bridge is delivered
///   to the host either (broadcast and multicast included). Replies to
///   connections the host opened pass.
/// - `egress_forward`: no sandbox reaches another on the same bridge, on
///   either network (bridged frames pass the IP hooks through
///   `br_netfilter`, which Docker's own `enable_icc=false` rule relies on
///   too).
pub fn nft_ruleset() -> String {
    format!(
        r#"table inet {NFT_TABLE}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
	chain egress_prerouting {{
		type filter hook prerouting priority mangle; policy accept;
		iifname "{EGRESS_BRIDGE}" ct state established,related accept
		iifname "{EGRESS_BRIDGE}" fib daddr type local drop
	}}
	chain egress_input {{
		type filter hook input priority filter; policy accept;
		iifname "{EGRESS_BRIDGE}" ct state established,related accept
		iifname "{EGRESS_BRIDGE}" drop
	}}
	chain egress_forward {{
		type filter hook forward priority filter; policy accept;
		iifname "{EGRESS_BRIDGE}" oifname "{EGRESS_BRIDGE}" drop
		iifname "{EGRESS_HOST_BRIDGE}" oifname "{EGRESS_HOST_BRIDGE}" drop
	}}
}}
"#
    )
}

/// The network (and its bridge) an egress sandbox joins.
pub(super) fn egress_network(host_access: bool) -> (&'static str, &'static str) {
    if host_access {
        (EGRESS_HOST_NETWORK, EGRESS_HOST_BRIDGE)
    } else {
        (EGRESS_NETWORK, EGRESS_BRIDGE)
    }
}

impl Inner {
    /// Makes sure the egress network this server uses exists as StacyVM
    /// made it and that the firewall is in place; returns the network's
    /// name. Run before every egress spawn, so a network removed while idle
    /// is made again and a flushed ruleset is restored.
    pub(super) async fn egress_network_ready(&self, docker: &Docker) -> Result<&'static str> {
        let (network, bridge) = egress_network(self.cfg.egress_host_access);
        self.ensure_egress_network(docker, network, bridge).await?;
        check_bridge_netfilter()?;
        install_firewall().await?;
        Ok(network)
    }

    async fn ensure_egress_network(
        &self,
        docker: &Docker,
        network: &str,
        bridge: &str,
    ) -> Result<()> {
        if let Some(found) = self.inspect_network(docker, network).await? {
            return check_network(&found, network, bridge);
        }
        let request = NetworkCreateRequest {
            name: network.to_owned(),
            driver: Some("bridge".into()),
            options: Some(HashMap::from([
                (BRIDGE_NAME_OPTION.to_owned(), bridge.to_owned()),
                (ICC_OPTION.to_owned(), "false".to_owned()),
            ])),
            labels: Some(HashMap::from([(
                LABEL_MANAGED.to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        };
        let created = docker.create_network(request).await;
        match created {
            Ok(_) => {
                tracing::info!(
                    network,
                    bridge,
                    "created the Docker network of egress sandboxes"
                );
                Ok(())
            }
            Err(e) => {
                // Another server (or spawn) made it meanwhile: Docker
                // refuses a second network with the same bridge name.
                if let Some(found) = self.inspect_network(docker, network).await? {
                    return check_network(&found, network, bridge);
                }
                Err(self.docker_error(
                    format_args!("creating the Docker network {network} for egress sandboxes"),
                    e,
                ))
            }
        }
    }

    async fn inspect_network(
        &self,
        docker: &Docker,
        network: &str,
    ) -> Result<Option<NetworkInspect>> {
        match docker.inspect_network(network, None).await {
            Ok(n) => Ok(Some(n)),
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => {
                Err(self.docker_error(format_args!("inspecting the Docker network {network}"), e))
            }
        }
    }
}

/// Allow lists: the nftables table in the container's own namespace and the
/// DNS filter (see [`crate::egress_filter`]).
impl Inner {
    /// Where a sandbox's `/etc/resolv.conf` (pointing at its DNS filter) is
    /// kept on the host.
    fn resolv_conf_path(&self, id: &SandboxId) -> std::path::PathBuf {
        self.run_root.join(format!("{id}.resolv.conf"))
    }

    /// Marks the sandbox as being armed and writes its resolver file;
    /// returns the file's path.
    pub(super) async fn prepare_allow_list(&self, id: &SandboxId) -> Result<std::path::PathBuf> {
        self.egress_guards.arming(id);
        let path = self.resolv_conf_path(id);
        tokio::fs::write(&path, egress_filter::resolv_conf())
            .await
            .map_err(|e| Error::internal(format_args!("writing {}", path.display()), e))?;
        Ok(path)
    }

    pub(super) fn egress_upstreams(&self) -> Result<Vec<std::net::SocketAddr>> {
        egress_filter::upstreams(&self.cfg.egress_dns_upstreams)
    }

    /// Loads the allow list's table into the running container's network
    /// namespace and starts its DNS filter.
    pub(super) async fn arm_allow_list(
        &self,
        docker: &Docker,
        name: &str,
        id: &SandboxId,
        rules: &[EgressRule],
        upstreams: Vec<std::net::SocketAddr>,
    ) -> Result<()> {
        let netns = self.container_netns(docker, name).await?;
        let guard = EgressGuard::arm(netns, Placement::Own, rules, upstreams).await?;
        self.egress_guards.armed(id, guard);
        tracing::info!(sandbox = %id, entries = rules.len(), "egress allow list enforced");
        Ok(())
    }

    /// Starts the DNS filter again for a sandbox with an allow list that
    /// has none: one this server adopted after a restart (the filter ended
    /// with the server that started it; the table, in the sandbox's own
    /// namespace, did not). Until then the sandbox's lookups fail and its
    /// listed networks stay reachable, nothing else. Failures are logged:
    /// the sandbox stays as restricted as it was.
    pub(super) async fn rearm_allow_list(&self, docker: &Docker, id: &SandboxId, list: &str) {
        if self.egress_guards.has(id) {
            return;
        }
        let result = async {
            let rules: Vec<EgressRule> = serde_json::from_str(list)
                .map_err(|e| Error::internal("reading the allow list label", e))?;
            let netns = self
                .container_netns(docker, &self.container_name(id))
                .await?;
            let upstreams = self.egress_upstreams()?;
            EgressGuard::resume(netns, Placement::Own, &rules, upstreams).await
        }
        .await;
        match result {
            Ok(guard) => {
                if self.egress_guards.adopt(id, guard) {
                    tracing::info!(sandbox = %id, "DNS filter of an adopted sandbox started again");
                }
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e.message(), "cannot start the DNS filter of an adopted sandbox again; its lookups fail");
            }
        }
    }

    /// A handle on the network namespace of a running container, checked to
    /// belong to it: the PID is read again after the namespace is opened,
    /// so a container that stopped (and a PID reused) meanwhile is noticed.
    async fn container_netns(&self, docker: &Docker, name: &str) -> Result<NetNs> {
        let pid_of = |c: &bollard::models::ContainerInspectResponse| {
            c.state
                .as_ref()
                .filter(|s| s.running == Some(true))
                .and_then(|s| s.pid)
                .filter(|p| *p > 0)
                .and_then(|p| u32::try_from(p).ok())
        };
        let inspect = |docker: &Docker| {
            let docker = docker.clone();
            let name = name.to_owned();
            async move { docker.inspect_container(&name, None).await }
        };
        let first = inspect(docker)
            .await
            .map_err(|e| self.docker_error("inspecting the sandbox container", e))?;
        let pid = pid_of(&first).ok_or_else(|| {
            Error::ProviderUnavailable(
                "the sandbox container stopped before its allow list could be applied".into(),
            )
        })?;
        let netns = NetNs::of_pid(pid).map_err(|e| {
            Error::ProviderUnavailable(format!(
                "opening the network namespace of the sandbox container (pid {pid}): {e}"
            ))
        })?;
        let again = inspect(docker)
            .await
            .map_err(|e| self.docker_error("inspecting the sandbox container", e))?;
        if pid_of(&again) != Some(pid) {
            return Err(Error::ProviderUnavailable(
                "the sandbox container stopped while its allow list was being applied".into(),
            ));
        }
        Ok(netns)
    }

    /// Stops a sandbox's DNS filter and removes its resolver file; nothing
    /// to remove is success.
    pub(super) async fn disarm_allow_list(&self, id: &SandboxId) -> Result<()> {
        self.egress_guards.remove(id);
        let path = self.resolv_conf_path(id);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(
                format_args!("removing {}", path.display()),
                e,
            )),
        }
    }
}

/// Refuses a network of that name that StacyVM would not have made: one
/// that lets sandboxes talk to each other, or whose bridge the firewall
/// rules do not name.
fn check_network(found: &NetworkInspect, network: &str, bridge: &str) -> Result<()> {
    let options = found.options.clone().unwrap_or_default();
    let driver = found.driver.as_deref().unwrap_or("");
    let problem = if driver != "bridge" {
        Some(format!("its driver is {driver:?}, not \"bridge\""))
    } else if options.get(BRIDGE_NAME_OPTION).map(String::as_str) != Some(bridge) {
        Some(format!("its bridge is not named {bridge:?}"))
    } else if options.get(ICC_OPTION).map(String::as_str) != Some("false") {
        Some(format!("it does not set {ICC_OPTION}=false"))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(Error::ProviderUnavailable(format!(
            "the Docker network {network} exists but is not the one StacyVM makes ({why}), so \
             egress sandboxes would not be isolated; remove it (`docker network rm {network}`, once \
             no container uses it) and StacyVM makes it again"
        ))),
    }
}

fn check_bridge_netfilter() -> Result<()> {
    match std::fs::read_to_string(BRIDGE_NETFILTER) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) | Err(_) => Err(Error::ProviderUnavailable(format!(
            "bridge netfilter is off on this host ({BRIDGE_NETFILTER} is not 1), so egress \
             sandboxes on one bridge could reach each other; run `modprobe br_netfilter && \
             sysctl -w net.bridge.bridge-nf-call-iptables=1` (dockerd does this itself when it \
             manages iptables)"
        ))),
    }
}

/// Applies [`nft_ruleset`]. Fails closed: without the rules no egress
/// sandbox is started.
pub(super) async fn install_firewall() -> Result<()> {
    crate::sandboxing::nft::apply(&nft_ruleset(), None)
        .await
        .map_err(|why| firewall_error(&why))
}

fn firewall_error(why: &str) -> Error {
    Error::ProviderUnavailable(format!(
        "cannot install the nftables table `inet {NFT_TABLE}` that keeps egress sandboxes off the \
         host and away from each other ({why}); egress needs the `nft` tool (Debian's nftables \
         package) and a server running as root (or with CAP_NET_ADMIN)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_the_kernel_limit() {
        for b in [EGRESS_BRIDGE, EGRESS_HOST_BRIDGE] {
            assert!(b.len() <= 15, "{b}");
        }
    }

    #[test]
    fn the_ruleset_replaces_only_stacyvms_table() {
        let rules = nft_ruleset();
        let first: Vec<&str> = rules.lines().take(3).collect();
        assert_eq!(
            first,
            [
                "table inet stacyvm",
                "delete table inet stacyvm",
                "table inet stacyvm {"
            ]
        );
        assert!(!rules.contains("flush ruleset"));
        assert_eq!(rules.matches("table ").count(), 3, "{rules}");
    }

    #[test]
    fn a_foreign_network_of_the_same_name_is_refused() {
        let net = |driver: &str, opts: &[(&str, &str)]| NetworkInspect {
            driver: Some(driver.into()),
            options: Some(
                opts.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        };
        let ours = net(
            "bridge",
            &[(BRIDGE_NAME_OPTION, EGRESS_BRIDGE), (ICC_OPTION, "false")],
        );
        assert!(check_network(&ours, EGRESS_NETWORK, EGRESS_BRIDGE).is_ok());
        for bad in [
            net("bridge", &[(BRIDGE_NAME_OPTION, EGRESS_BRIDGE)]),
            net(
                "bridge",
                &[(BRIDGE_NAME_OPTION, EGRESS_BRIDGE), (ICC_OPTION, "true")],
            ),
            net(
                "bridge",
                &[(BRIDGE_NAME_OPTION, "br0"), (ICC_OPTION, "false")],
            ),
            net(
                "macvlan",
                &[(BRIDGE_NAME_OPTION, EGRESS_BRIDGE), (ICC_OPTION, "false")],
            ),
        ] {
            assert!(matches!(
                check_network(&bad, EGRESS_NETWORK, EGRESS_BRIDGE),
                Err(Error::ProviderUnavailable(_))
            ));
        }
    }
}
