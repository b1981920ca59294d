//! The qemu provider on real QEMU under TCG, with one guest for all the
//! checks to keep boots few: the sandbox runs its own kernel and sees none
//! of the host's files, its console is its log, pause and resume go
//! through QMP, a new provider (a restarted server) adopts the running
//! guest, a fork bomb stays inside the guest, and destroy leaves nothing.

use std::sync::Arc;

use anyhow::{ensure, Context};
use stacyvm_provider::DynProvider;

use crate::support::{self, exec_req, leftovers, AgentCalls, Harness, TestEnv};

/// Host threads of a process (QEMU's vCPU and I/O threads).
fn threads(pid: i32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_its_own_machine_and_survives_a_server_restart() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let provider = support::qemu_provider(&env).await?;
    let h = Harness::new(env, provider);
    let id = h.spawn_default().await?;
    let dir = h.env.data_dir.join("qemu").join(id.as_str());

    // Its own kernel: the guest kernel's release, not the host's.
    let guest_dir = stacyvm_provider::microvm::GuestAssets::default_dir();
    let release = std::fs::read_to_string(guest_dir.join("kernel-release"))?;
    let uname = h.sh_ok(&id, "uname -r").await?;
    ensure!(
        uname.trim() == release.trim(),
        "guest kernel {uname:?}, expected {release:?}"
    );

    // None of the host's files: a file the host just wrote is not there,
    // whatever path the guest tries.
    let marker = h.env.data_dir.join("host-only-marker");
    std::fs::write(&marker, "host secret")?;
    let probe = format!(
        "cat {m} 2>&1; ls {d} 2>&1; cat /proc/1/cmdline | tr '\\0' ' '",
        m = marker.display(),
        d = h.env.data_dir.display()
    );
    let out = h.sh(&id, &probe).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !text.contains("host secret"),
        "the guest read a host file: {text}"
    );
    ensure!(
        text.contains("/.stacyvm/agent"),
        "the guest's init is not the agent: {text}"
    );

    // The console is the runtime log.
    let logs = h.provider().logs(&id).await?;
    ensure!(
        logs.iter()
            .any(|l| l.message.contains("starting the agent")),
        "the console is not in the logs: {logs:?}"
    );

    // Pause stops the guest (QMP stop): its agent is not handed out.
    h.provider().pause(&id).await?;
    let e = h
        .provider()
        .agent(&id)
        .await
        .err()
        .context("a paused guest's agent")?;
    ensure!(matches!(e, stacyvm_core::Error::Conflict(_)), "{e}");
    h.provider().resume(&id).await?;
    ensure!(h.sh_ok(&id, "echo back").await?.trim() == "back");

    // A restarted server: a new provider over the same data dir finds the
    // guest running and reaches its agent.
    let qemu_pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))?
        .trim()
        .parse()?;
    let adopted: DynProvider = Arc::new(support::qemu_provider_now(&h.env)?);
    h.guard.replace_provider(adopted.clone());
    let listed = adopted.list().await?;
    ensure!(
        listed.iter().any(|r| r.sandbox_id == id && r.running),
        "the new provider does not list the guest as running: {listed:?}"
    );
    ensure!(h.sh_ok(&id, "echo adopted").await?.trim() == "adopted");

    // A fork bomb is the guest's problem: on the host QEMU keeps its few
    // threads, and the guest is destroyed whole.
    let before = threads(qemu_pid)?;
    let mut bomb = exec_req(&["sh", "-c", "b() { b | b & }; b"]);
    bomb.timeout_ms = 5_000;
    let _ = adopted.agent_of(&id).await?.exec(bomb).await;
    let after = threads(qemu_pid)?;
    ensure!(
        after <= before + 8,
        "QEMU grew from {before} to {after} host threads during the guest's fork bomb"
    );

    adopted.destroy(&id).await?;
    ensure!(
        std::fs::metadata(format!("/proc/{qemu_pid}")).is_err()
            || std::fs::read_to_string(format!("/proc/{qemu_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "QEMU outlived destroy"
    );
    adopted.destroy(&id).await?;
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_is_refused_until_the_provider_gives_one() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let provider = support::qemu_provider(&env).await?;
    let h = Harness::new(env, provider);
    let mut spec = support::spec();
    spec.network = stacyvm_core::Network::Egress;
    let e = h
        .spawn(spec.clone())
        .await
        .err()
        .context("a spawn with network")?;
    let e = e.downcast::<stacyvm_core::Error>()?;
    ensure!(matches!(e, stacyvm_core::Error::Unsupported(_)), "{e}");
    ensure!(!h
        .env
        .data_dir
        .join("qemu")
        .join(spec.sandbox_id.as_str())
        .exists());
    Ok(())
}
