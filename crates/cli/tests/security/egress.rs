//! A member's sandbox with an egress allow list (Docker and namespaces)
//! cannot widen it from inside: no capability to change its namespace's
//! netfilter, routes or links, and neither the upstream resolver nor
//! Docker's own is reachable, whatever its resolver file says (read-only
//! on Docker; a namespaces sandbox's root may rewrite it, to no avail).
//! A qemu guest's root owns its whole kernel, and still cannot: the
//! filter is on the bridge outside the VM, and nothing there routes for
//! it. Real servers and a real DNS server stand beyond the host, in a
//! network namespace the test creates.

use anyhow::{ensure, Context, Result};
use serde_json::json;
use stacyvm_provider::egress_filter::far_side::FarSide;

use crate::support::{Api, Server, ServerOptions, StoreKind};

/// What `script` prints (stdout, then stderr) run by `member` in sandbox
/// `id`.
async fn output_of(member: &Api, id: &str, script: String) -> Result<String> {
    let out = member
        .exec(id, json!({"cmd": ["sh", "-c", script]}))
        .await?;
    Ok(format!(
        "{}{}",
        out["stdout"].as_str().unwrap_or_default(),
        out["stderr"].as_str().unwrap_or_default()
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_members_sandbox_cannot_widen_its_allow_list() -> Result<()> {
    let far = FarSide::start().await?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,namespaces")
            .local_worker()
            .env("STACYVM_EGRESS_DNS_UPSTREAM", &far.dns),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_tenant, member) = admin.tenant_with("member").await?;
    for provider in ["docker", "namespaces"] {
        let s = member
            .create_sandbox(json!({"image": "busybox", "provider": provider,
                "network": {"allow": [far.allowed, "allowed.test"]}}))
            .await?;
        let id = s["id"].as_str().context("no id")?.to_owned();
        let sh = |script: String| output_of(&member, &id, script);
        let greeting =
            |addr: &str| format!("nc -w 3 {addr} {} </dev/null 2>/dev/null; true", far.port);

        // No CAP_NET_ADMIN (bit 12): the table, routes and links are out of reach.
        let status = sh("cat /proc/self/status".into()).await?;
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .context("no CapEff line")?;
        ensure!(
            u64::from_str_radix(cap_eff.trim(), 16)? & (1 << 12) == 0,
            "CapEff {cap_eff}"
        );
        for attempt in [
            "ip link set lo down".to_owned(),
            format!("ip route add {}/32 dev eth0", far.denied),
            format!("ip addr add {}/32 dev lo", far.denied),
        ] {
            let out = sh(format!("{attempt} 2>&1; echo rc=$?")).await?;
            ensure!(
                out.contains("not permitted") && !out.contains("rc=0"),
                "{provider}: {attempt}: {out}"
            );
        }
        let out = sh(format!(
            "echo nameserver {} > /etc/resolv.conf 2>&1; echo rc=$?",
            far.dns
        ))
        .await?;
        ensure!(provider != "docker" || !out.contains("rc=0"), "{out}");

        // Still exactly the list: the denied address, the upstream resolver
        // and Docker's resolver stay out of reach; the listed ones answer.
        let out = sh(greeting(&far.denied)).await?;
        ensure!(
            !out.contains("hello-from"),
            "{provider}: a denied address answered: {out}"
        );
        for server in [far.dns.as_str(), "127.0.0.11"] {
            let out = sh(format!(
                "nslookup -type=a denied.test {server} 2>&1; echo rc=$?"
            ))
            .await?;
            ensure!(
                !out.contains("rc=0") && !out.contains(&far.denied),
                "{provider}: {server}: {out}"
            );
        }
        let out = sh("nslookup -type=a denied.test 2>&1; echo rc=$?".into()).await?;
        ensure!(!out.contains("rc=0") && !out.contains(&far.denied), "{out}");
        ensure!(
            far.asked().iter().all(|n| n == "allowed.test"),
            "the upstream was asked {:?}",
            far.asked()
        );
        // A namespaces sandbox's root rewrote its resolver file above, to
        // no avail; pointed back at the filter, the listed name resolves.
        sh("echo nameserver 127.0.0.53 > /etc/resolv.conf".into()).await?;
        let out = sh(greeting(&far.allowed)).await?;
        ensure!(
            out.trim() == format!("hello-from-{}", far.allowed),
            "{out:?}"
        );
        let out = sh(greeting("allowed.test")).await?;
        ensure!(out.trim() == format!("hello-from-{}", far.named), "{out:?}");
        member.destroy(&id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_members_guest_cannot_widen_its_allow_list_from_its_own_kernel() -> Result<()> {
    let far = FarSide::start().await?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("qemu")
            .local_worker()
            .env("STACYVM_EGRESS_DNS_UPSTREAM", &far.dns),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_tenant, member) = admin.tenant_with("member").await?;
    let s = member
        .create_sandbox(json!({"image": "busybox", "provider": "qemu",
            "network": {"allow": [far.allowed, "allowed.test"]}}))
        .await?;
    let id = s["id"].as_str().context("no id")?.to_owned();
    let sh = |script: String| output_of(&member, &id, script);
    let greeting = |addr: &str| format!("nc -w 3 {addr} {} </dev/null 2>/dev/null; true", far.port);

    // The guest's root asks its own kernel for what it can: the upstream
    // resolver as its resolver, the DNS filter's address as a router to
    // the denied machine.
    let out = sh(format!(
        "echo nameserver {} > /etc/resolv.conf; nslookup -type=a denied.test 2>&1; echo rc=$?",
        far.dns
    ))
    .await?;
    ensure!(
        !out.contains("rc=0") && !out.contains(&far.denied),
        "the upstream answered the guest: {out}"
    );
    let out = sh(format!(
        "ip route add {}/32 via 169.254.53.53 dev eth0 2>&1; echo rc=$?",
        far.denied
    ))
    .await?;
    ensure!(out.contains("rc=0"), "the guest's own route: {out}");
    let out = sh(greeting(&far.denied)).await?;
    ensure!(
        !out.contains("hello-from"),
        "a denied address answered through the DNS filter's address: {out}"
    );
    sh(format!("ip route del {}/32", far.denied)).await?;
    ensure!(
        far.asked().iter().all(|n| n == "allowed.test"),
        "the upstream was asked {:?}",
        far.asked()
    );
    sh("echo nameserver 169.254.53.53 > /etc/resolv.conf".into()).await?;
    let out = sh(greeting("allowed.test")).await?;
    ensure!(out.trim() == format!("hello-from-{}", far.named), "{out:?}");
    member.destroy(&id).await?;
    Ok(())
}
