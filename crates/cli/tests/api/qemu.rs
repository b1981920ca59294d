//! The API on `--providers qemu` (real QEMU under TCG): a member's
//! sandbox, with egress, is created, runs commands, reads and writes files,
//! keeps running through a `kill -9` of the server and is adopted by the
//! restarted one, never reaches the server's API port or any other service
//! of the host, and is destroyed with nothing left on the host (its
//! network namespace and veth pair included).

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::support::{Api, Server, ServerOptions, StoreKind};

/// The port of the server's API (it listens on every address).
fn api_port(server: &Server) -> Result<u16> {
    server
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {}", server.url))
}

/// Every IPv4 address of the host, on every interface.
fn host_ipv4s() -> Result<Vec<String>> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .context("running ip addr")?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let addrs: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(f.get(3)?.split('/').next()?.to_owned())
        })
        .collect();
    ensure!(
        addrs.len() > 1,
        "the host has no addresses but loopback: {out}"
    );
    Ok(addrs)
}

/// Tries the API port and a listener of the test's, on every host address
/// and the guest's gateway, from the sandbox: nothing may connect.
async fn check_host_unreachable(server: &Server, member: &Api, id: &str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let probe_port = listener.local_addr()?.port();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let accept = tokio::spawn(async move {
        while let Ok((_c, peer)) = listener.accept().await {
            record
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(peer.to_string());
        }
    });
    let route = member.sh(id, "ip route").await?;
    let gateway = route
        .lines()
        .find_map(|l| l.strip_prefix("default via "))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("the guest has no default route: {route}"))?
        .to_owned();
    let mut targets = host_ipv4s()?;
    targets.push(gateway);
    let api = api_port(server)?;
    let script = format!(
        "for a in {}; do for p in {api} {probe_port}; do \
         (echo probe | nc -w 3 $a $p >/dev/null 2>&1; echo \"$a:$p rc=$?\") & done; done; wait",
        targets.join(" ")
    );
    let out = member.sh(id, &script).await?;
    accept.abort();
    ensure!(
        out.lines().count() == targets.len() * 2,
        "one result per address and port expected: {out}"
    );
    let reached: Vec<&str> = out.lines().filter(|l| l.ends_with(" rc=0")).collect();
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(
        reached.is_empty() && seen.is_empty(),
        "the guest reached the host at {reached:?} (the host saw {seen:?})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_sandbox_serves_the_api_and_survives_kill_9() -> Result<()> {
    // The in-process worker in every topology: the test kills the process
    // that owns the VM and checks its run dir, which a remote worker's
    // topology would leave untouched. On every address, so the guest
    // could try it through any of the host's.
    let mut server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("qemu")
            .local_worker()
            .listen("0.0.0.0:0"),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_tenant, member) = admin.tenant_with("member").await?;
    let member_key = member.key_secret().to_owned();
    let sb = member
        .create_sandbox(json!({
            "image": "busybox", "provider": "qemu", "network": "egress",
            "env": {"GREETING": "hi"}
        }))
        .await?;
    let id = sb["id"].as_str().unwrap_or_default().to_owned();
    ensure!(sb["provider"] == "qemu", "{sb}");
    ensure!(sb["network"] == "egress", "{sb}");
    ensure!(member.sh(&id, "echo $GREETING").await?.trim() == "hi");
    member
        .put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/work/keep.txt"),
            b"kept".to_vec(),
        )
        .await?
        .ok(201)?;
    let addr = member.sh(&id, "ip -4 -o addr show dev eth0").await?;
    ensure!(addr.contains("inet 10.213."), "the guest's eth0: {addr}");
    check_host_unreachable(&server, &member, &id).await?;

    let dir = server.data_dir().join("qemu").join(&id);
    ensure!(dir.is_dir(), "no run dir {}", dir.display());
    let netns = Path::new("/run/netns").join(format!("svmq-{id}"));
    ensure!(netns.exists(), "no network namespace {}", netns.display());
    let lease: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("net.json"))?)?;
    let veth = Path::new("/sys/class/net").join(format!("svq{}", lease["slot"]));
    ensure!(veth.exists(), "no veth {}", veth.display());
    server.kill9()?;
    server.restart()?;
    let member = server.client(&member_key);
    let after = member.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    ensure!(after["state"] == "running", "after kill -9: {after}");
    let out = member.sh(&id, "cat /work/keep.txt").await?;
    ensure!(out == "kept", "after kill -9 the file reads {out:?}");
    // The adopted guest keeps its network, and its containment.
    ensure!(member.sh(&id, "ip -4 -o addr show dev eth0").await? == addr);
    check_host_unreachable(&server, &member, &id).await?;

    member.destroy(&id).await?;
    ensure!(!dir.exists(), "destroy left {}", dir.display());
    ensure!(!netns.exists(), "destroy left {}", netns.display());
    ensure!(!veth.exists(), "destroy left {}", veth.display());
    Ok(())
}
