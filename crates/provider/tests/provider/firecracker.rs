//! The firecracker provider.
//!
//! No firecracker binary is in any package registry these machines reach,
//! and their `/dev/kvm` is PVM, on which a stock guest kernel does not
//! boot. So the lifecycle test here runs the provider against
//! `firecracker-standin.py`, a stand-in that serves Firecracker's API and
//! runs the real agent as a host process behind a hybrid-vsock socket: it
//! checks StacyVM's side of the protocol (the API calls and their bodies,
//! the vsock handshake, pause/save/restore bookkeeping, adoption, cleanup),
//! not Firecracker and not a VM boundary. The real boot is the ignored test
//! at the end, for a host with firecracker and hardware KVM.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context};
use stacyvm_provider::firecracker::{FirecrackerConfig, FirecrackerProvider};
use stacyvm_provider::microvm::net::{self, GuestNet};
use stacyvm_provider::{DynProvider, Provider};

use crate::support::{self, Harness, TestEnv};

fn standin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/provider/firecracker-standin.py")
}

/// A guest directory with placeholder assets: the stand-in checks the
/// kernel file exists and boots nothing.
fn placeholder_guest(env: &TestEnv) -> anyhow::Result<PathBuf> {
    let dir = env.data_dir.join("guest");
    std::fs::create_dir_all(&dir)?;
    for f in ["vmlinuz", "vmlinux", "initramfs.cpio.gz"] {
        std::fs::write(dir.join(f), b"placeholder: the stand-in boots nothing")?;
    }
    Ok(dir)
}

fn config(env: &TestEnv, guest_dir: &Path, bin: &Path) -> FirecrackerConfig {
    FirecrackerConfig {
        data_dir: env.data_dir.clone(),
        agent_bin: env.agent_bin.clone(),
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
        guest_dir: guest_dir.to_path_buf(),
        firecracker_bin: bin.to_path_buf(),
        egress_dns_upstreams: Vec::new(),
    }
}

fn provider(env: &TestEnv, guest_dir: &Path, bin: &Path) -> anyhow::Result<FirecrackerProvider> {
    Ok(FirecrackerProvider::new(config(env, guest_dir, bin))?)
}

fn calls(dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(dir.join("calls.jsonl")).context("the stand-in's calls")?;
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

fn call<'a>(
    calls: &'a [serde_json::Value],
    method: &str,
    path: &str,
) -> anyhow::Result<&'a serde_json::Value> {
    calls
        .iter()
        .find(|c| c["method"] == method && c["path"] == path)
        .map(|c| &c["body"])
        .with_context(|| format!("no {method} {path} in {calls:?}"))
}

fn pid_of(dir: &Path) -> anyhow::Result<i32> {
    Ok(std::fs::read_to_string(dir.join("firecracker.pid"))?
        .trim()
        .parse()?)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_drives_the_firecracker_api_through_a_lifecycle() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // The stand-in runs this agent.
    std::env::set_var("STACYVM_AGENT_BIN", &env.agent_bin);
    let guest = placeholder_guest(&env)?;
    let p = provider(&env, &guest, &standin())?;
    let health = p.health().await;
    ensure!(health.healthy, "{}", health.detail);
    let h = Harness::new(env, Arc::new(p));
    let mut spec = support::spec();
    spec.cpu = 2.0;
    spec.memory_mb = 300;
    let id = h.spawn(spec).await?;
    let dir = h.env.data_dir.join("firecracker").join(id.as_str());

    // The boot, as Firecracker is asked for it.
    let seen = calls(&dir)?;
    let boot = call(&seen, "PUT", "/boot-source")?;
    ensure!(boot["kernel_image_path"] == guest.join("vmlinux").to_str().unwrap());
    ensure!(boot["initrd_path"]
        .as_str()
        .is_some_and(|p| Path::new(p).is_file()));
    let root = call(&seen, "PUT", "/drives/rootfs")?;
    ensure!(
        root["path_on_host"] == dir.join("root.ext4").to_str().unwrap()
            && root["is_read_only"] == false
    );
    let settings = call(&seen, "PUT", "/drives/settings")?;
    ensure!(settings["is_read_only"] == true);
    ensure!(
        call(&seen, "PUT", "/machine-config")?
            == &serde_json::json!({"vcpu_count": 2, "mem_size_mib": 300, "smt": false})
    );
    ensure!(call(&seen, "PUT", "/vsock")?["uds_path"] == dir.join("vsock.sock").to_str().unwrap());
    ensure!(call(&seen, "PUT", "/actions")?["action_type"] == "InstanceStart");
    ensure!(
        !seen.iter().any(|c| c["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/network-interfaces"))),
        "a network-none sandbox got a NIC: {seen:?}"
    );
    // Disks before the start, the start last.
    let order: Vec<&str> = seen
        .iter()
        .filter_map(|c| c["path"].as_str())
        .filter(|p| *p != "/")
        .collect();
    ensure!(order.last() == Some(&"/actions"), "{order:?}");
    // The root is the sandbox's own copy of the cached image.
    ensure!(std::fs::metadata(dir.join("root.ext4"))?.len() > 0);

    // Exec and files through the agent behind the vsock handshake.
    ensure!(h.sh_ok(&id, "echo hello").await?.trim() == "hello");
    let agent = h.provider().agent(&id).await?;
    agent
        .file_write("/kept.txt", None, support::body(b"kept".to_vec()))
        .await?;

    // Pause: vCPUs stopped, the state saved, Firecracker gone; the agent
    // is not handed out meanwhile; still listed.
    let first_pid = pid_of(&dir)?;
    h.provider().pause(&id).await?;
    let seen = calls(&dir)?;
    ensure!(call(&seen, "PATCH", "/vm")?["state"] == "Paused");
    let create = call(&seen, "PUT", "/snapshot/create")?;
    ensure!(create["snapshot_type"] == "Full");
    ensure!(
        dir.join("saved").exists() && dir.join("vm.state").exists() && dir.join("vm.mem").exists()
    );
    ensure!(
        !alive(first_pid),
        "firecracker still runs after a saved pause"
    );
    ensure!(
        h.provider().agent(&id).await.is_err(),
        "a paused guest's agent was handed out"
    );
    h.provider().pause(&id).await?; // idempotent

    // A restarted server adopts the saved guest and resumes it.
    let p2: DynProvider = Arc::new(provider(&h.env, &guest, &standin())?);
    let listed = p2.list().await?;
    ensure!(
        listed.iter().any(|r| r.sandbox_id == id && r.running),
        "{listed:?}"
    );
    // The save names the kind of KVM it was made under; a guest saved
    // under another kind is refused, not loaded.
    let kind = std::fs::read_to_string(dir.join("saved"))?;
    ensure!(kind == stacyvm_provider::kvm::detect().as_str(), "{kind:?}");
    let other = if kind == "hardware" {
        "pvm"
    } else {
        "hardware"
    };
    std::fs::write(dir.join("saved"), other)?;
    let e = p2
        .resume(&id)
        .await
        .expect_err("a guest saved under another KVM");
    ensure!(
        matches!(e, stacyvm_core::Error::Conflict(_)) && e.to_string().contains(other),
        "{e}"
    );
    std::fs::write(dir.join("saved"), &kind)?;
    p2.resume(&id).await?;
    let load = call(&calls(&dir)?, "PUT", "/snapshot/load")?.clone();
    ensure!(
        load["mem_backend"]["backend_path"] == dir.join("vm.mem").to_str().unwrap()
            && load["resume_vm"] == true
    );
    ensure!(!dir.join("saved").exists() && !dir.join("vm.mem").exists());
    let kept = support::read_all(p2.agent(&id).await?.file_read("/kept.txt").await?).await?;
    ensure!(kept == b"kept", "{:?}", String::from_utf8_lossy(&kept));

    // Paused in place when the snapshot cannot be written: vCPUs only.
    let second_pid = pid_of(&dir)?;
    std::fs::create_dir(dir.join("vm.mem"))?; // the stand-in cannot write there
    p2.pause(&id).await?;
    ensure!(alive(second_pid) && !dir.join("saved").exists());
    std::fs::remove_dir(dir.join("vm.mem"))?;
    p2.resume(&id).await?;
    ensure!(call(&calls(&dir)?, "PATCH", "/vm")? != &serde_json::Value::Null);
    ensure!(h.sh_ok(&id, "echo again").await?.trim() == "again");

    // Logs carry the console (the stand-in's stdout) and the provider's notes.
    let logs = p2.logs(&id).await?;
    ensure!(
        logs.iter()
            .any(|l| l.message.contains("starting the agent")),
        "{logs:?}"
    );

    // Destroy leaves nothing, twice over.
    p2.destroy(&id).await?;
    ensure!(!dir.exists());
    ensure!(!alive(second_pid));
    p2.destroy(&id).await?;
    ensure!(matches!(
        p2.agent(&id).await,
        Err(stacyvm_core::Error::NotFound(_))
    ));

    // The image's cached ext4 root goes with the image.
    let image = h.env.catalog.get("busybox").await?;
    let cached = stacyvm_provider::microvm::cached_rootfs(
        &h.env.data_dir.join("firecracker-cache"),
        &image.digest,
    );
    ensure!(cached.is_file(), "no cached root at {}", cached.display());
    p2.image_removed(&image).await?;
    ensure!(!cached.exists(), "the cached root outlived its image");
    p2.image_removed(&image).await?;
    Ok(())
}

/// An egress sandbox: Firecracker is given the tap in the sandbox's own
/// network namespace and runs inside it; destroy removes the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_sandbox_gets_its_tap_and_namespace_and_loses_them() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    std::env::set_var("STACYVM_AGENT_BIN", &env.agent_bin);
    let guest = placeholder_guest(&env)?;
    let p = provider(&env, &guest, &standin())?;
    let h = Harness::new(env, Arc::new(p));
    let mut spec = support::spec();
    spec.network = stacyvm_core::Network::Egress;
    let id = h.spawn(spec).await?;
    let dir = h.env.data_dir.join("firecracker").join(id.as_str());
    let lease: GuestNet = serde_json::from_slice(&std::fs::read(dir.join("net.json"))?)?;
    let nic = call(&calls(&dir)?, "PUT", "/network-interfaces/eth0")?.clone();
    ensure!(
        nic == serde_json::json!({"iface_id": "eth0", "host_dev_name": net::NS_TAP,
                                   "guest_mac": lease.mac()}),
        "{nic}"
    );
    // Firecracker runs in the sandbox's namespace, where the tap is.
    let ns = Path::new("/run/netns").join(net::netns_name(&id));
    let pid = pid_of(&dir)?;
    let inode = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    ensure!(
        inode(&ns)? == inode(Path::new(&format!("/proc/{pid}/ns/net")))?,
        "firecracker is not in the sandbox's network namespace"
    );
    ensure!(h.sh_ok(&id, "echo up").await?.trim() == "up");
    h.provider().destroy(&id).await?;
    ensure!(!ns.exists(), "the network namespace is left");
    ensure!(
        !Path::new("/sys/class/net").join(lease.host_if()).exists(),
        "the veth is left"
    );
    ensure!(!alive(pid) && !dir.exists());
    Ok(())
}

/// A file of the settings disk (a tar) the guest's init reads.
fn settings_file(dir: &Path, name: &str) -> anyhow::Result<String> {
    let tar = std::fs::read(dir.join("settings.tar"))?;
    for e in tar::Archive::new(tar.as_slice()).entries()? {
        let mut e = e?;
        if e.path()?.to_str() == Some(name) {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s)?;
            return Ok(s);
        }
    }
    anyhow::bail!("the settings disk has no {name}")
}

/// Whether StacyVM's DNS filter answers a query at the guest's resolver
/// address, asked from inside the guest's namespace (where the guest's
/// frames arrive).
fn the_filter_answers(ns: &Path) -> anyhow::Result<bool> {
    let netns = stacyvm_provider::egress_filter::NetNs::open(&ns.to_string_lossy())?;
    let query = stacyvm_provider::egress_filter::far_side::a_query(7, "denied.test");
    Ok(netns.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        s.send_to(&query, "169.254.53.53:53")?;
        let mut buf = [0u8; 512];
        Ok(matches!(s.recv(&mut buf), Ok(n) if n >= 12 && buf[..2] == [0, 7]))
    })?)
}

/// A guest with an allow list: before Firecracker starts, the table is on
/// the bridge of its namespace and the DNS filter listens there, the
/// settings disk points the guest's resolver at it; a new server starts
/// the filter again; destroy stops it with the namespace. (The stand-in
/// has no guest kernel: what the guest's frames meet is tested on qemu,
/// which shares this code.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_is_armed_on_the_guests_bridge_and_rearmed_after_a_restart(
) -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    std::env::set_var("STACYVM_AGENT_BIN", &env.agent_bin);
    let guest = placeholder_guest(&env)?;
    let p = Arc::new(FirecrackerProvider::new(FirecrackerConfig {
        egress_dns_upstreams: vec!["192.0.2.53:53".parse()?],
        ..config(&env, &guest, &standin())
    })?);
    p.egress_allow_support().map_err(|e| anyhow::anyhow!(e))?;
    let provider: DynProvider = p.clone();
    let h = Harness::new(env, provider);
    let mut spec = support::spec();
    spec.network = stacyvm_core::Network::Egress;
    spec.egress_allow = stacyvm_core::EgressRule::parse_list(&["192.0.2.0/24", "allowed.test"])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = h.spawn(spec).await?;
    let dir = h.env.data_dir.join("firecracker").join(id.as_str());
    let lease: GuestNet = serde_json::from_slice(&std::fs::read(dir.join("net.json"))?)?;
    ensure!(p.egress_dns_filters() == 1);
    let line = settings_file(&dir, "net")?;
    ensure!(
        line == format!(
            "{}/30 {} 169.254.53.53\n",
            lease.guest_addr(),
            lease.gateway()
        ),
        "{line}"
    );
    let resolv = settings_file(&dir, "resolv.conf")?;
    ensure!(resolv.contains("nameserver 169.254.53.53"), "{resolv}");
    let ns = Path::new("/run/netns").join(net::netns_name(&id));
    let table = support::run(
        "ip",
        &[
            "netns",
            "exec",
            &net::netns_name(&id),
            "nft",
            "list",
            "table",
            "bridge",
            "stacyvm_egress",
        ],
    )?;
    ensure!(
        table.contains("192.0.2.0/24") && table.contains("iifname != \"tap0\""),
        "{table}"
    );
    ensure!(the_filter_answers(&ns)?, "the DNS filter does not answer");

    // The server ends, its filter with it; a new one starts it again.
    let _ = h.guard.take_provider();
    drop(p);
    ensure!(!the_filter_answers(&ns)?, "the filter outlived its server");
    let p = Arc::new(FirecrackerProvider::new(FirecrackerConfig {
        egress_dns_upstreams: vec!["192.0.2.53:53".parse()?],
        ..config(&h.env, &guest, &standin())
    })?);
    let provider: DynProvider = p.clone();
    h.guard.replace_provider(provider);
    ensure!(p
        .list()
        .await?
        .iter()
        .any(|r| r.sandbox_id == id && r.running));
    ensure!(p.egress_dns_filters() == 1);
    ensure!(the_filter_answers(&ns)?, "the filter did not come back");

    p.destroy(&id).await?;
    ensure!(p.egress_dns_filters() == 0, "the filter outlived its guest");
    ensure!(!ns.exists(), "the network namespace is left");
    ensure!(!dir.exists());
    Ok(())
}

#[tokio::test]
async fn a_missing_binary_is_unhealthy_and_spawn_says_why() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guest = placeholder_guest(&env)?;
    let p = provider(&env, &guest, Path::new("/nonexistent/firecracker"))?;
    let health = p.health().await;
    ensure!(
        !health.healthy && health.detail.contains("no firecracker binary"),
        "{}",
        health.detail
    );
    let spec = support::spec();
    let e = p.spawn(&spec).await.unwrap_err();
    ensure!(
        matches!(e, stacyvm_core::Error::ProviderUnavailable(_)),
        "{e}"
    );
    ensure!(!env
        .data_dir
        .join("firecracker")
        .join(spec.sandbox_id.as_str())
        .exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a firecracker binary and hardware KVM; this host's /dev/kvm is PVM"]
async fn a_real_firecracker_guest_runs_the_agent() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let bin = stacyvm_provider::firecracker::default_binary();
    let p = provider(
        &env,
        &stacyvm_provider::microvm::GuestAssets::default_dir(),
        &bin,
    )?;
    let health = p.health().await;
    ensure!(health.healthy, "{}", health.detail);
    let h = Harness::new(env, Arc::new(p));
    let id = h.spawn_default().await?;
    ensure!(h
        .sh_ok(&id, "cat /proc/1/cmdline")
        .await?
        .contains("/.stacyvm/agent"));
    h.provider().pause(&id).await?;
    h.provider().resume(&id).await?;
    ensure!(h.sh_ok(&id, "echo ok").await?.trim() == "ok");
    h.provider().destroy(&id).await?;
    Ok(())
}
