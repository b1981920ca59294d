//! The API on `--providers qemu` (real QEMU under TCG): a member's
//! sandbox is created, runs commands, reads and writes files, keeps running
//! through a `kill -9` of the server and is adopted by the restarted one,
//! then is destroyed with nothing left on the host.

use anyhow::{ensure, Result};
use serde_json::json;

use crate::support::{Server, ServerOptions, StoreKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_sandbox_serves_the_api_and_survives_kill_9() -> Result<()> {
    // The in-process worker in every topology: the test kills the process
    // that owns the VM and checks its run dir, which a remote worker's
    // topology would leave untouched.
    let mut server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("qemu")
            .local_worker(),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_tenant, member) = admin.tenant_with("member").await?;
    let member_key = member.key_secret().to_owned();
    let sb = member
        .create_sandbox(json!({"image": "busybox", "provider": "qemu", "env": {"GREETING": "hi"}}))
        .await?;
    let id = sb["id"].as_str().unwrap_or_default().to_owned();
    ensure!(sb["provider"] == "qemu", "{sb}");
    ensure!(member.sh(&id, "echo $GREETING").await?.trim() == "hi");
    member
        .put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/work/keep.txt"),
            b"kept".to_vec(),
        )
        .await?
        .ok(201)?;

    let dir = server.data_dir().join("qemu").join(&id);
    ensure!(dir.is_dir(), "no run dir {}", dir.display());
    server.kill9()?;
    server.restart()?;
    let member = server.client(&member_key);
    let after = member.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    ensure!(after["state"] == "running", "after kill -9: {after}");
    let out = member.sh(&id, "cat /work/keep.txt").await?;
    ensure!(out == "kept", "after kill -9 the file reads {out:?}");

    member.destroy(&id).await?;
    ensure!(!dir.exists(), "destroy left {}", dir.display());
    Ok(())
}
