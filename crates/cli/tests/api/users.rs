//! `exec` with a `user`: commands run with that account's uid and primary
//! group from the sandbox's own `/etc/passwd` (or a bare uid), on every
//! provider; bad names are refused before anything runs.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;

use crate::support::{eventually, Server, ServerOptions, StoreKind};

#[tokio::test(flavor = "multi_thread")]
async fn commands_run_as_the_user_they_name() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,namespaces,proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    for provider in ["docker", "namespaces"] {
        let id = member.sandbox(provider).await?;
        let path = format!("/v1/sandboxes/{id}/exec");
        let exec = |user: &str, script: &str| {
            member.post(&path, json!({"cmd": ["sh", "-c", script], "user": user}))
        };
        // A name of the image's passwd: its uid, group and home.
        let out = exec("nobody", "id -u; id -g; echo $HOME $USER")
            .await?
            .ok(200)?;
        ensure!(
            out["stdout"] == "65534\n65534\n/nonexistent nobody\n",
            "{provider}: {out}"
        );
        // A bare uid, and what it makes is its own; root's files are not.
        let out = exec(
            "4242",
            "id -u; touch /tmp/mine && stat -c %u /tmp/mine; echo x > /etc/hostname-copy 2>/dev/null || echo refused",
        )
        .await?
        .ok(200)?;
        ensure!(
            out["stdout"] == "4242\n4242\nrefused\n",
            "{provider}: {out}"
        );
        // Without a user: the sandbox's own (root).
        ensure!(member.sh(&id, "id -u").await? == "0\n", "{provider}");
        // Background processes take a user too.
        member
            .post(
                &format!("/v1/sandboxes/{id}/processes"),
                json!({"cmd": ["sh", "-c", "id -u > /tmp/bg.tmp && mv /tmp/bg.tmp /tmp/bg"], "user": "nobody"}),
            )
            .await?
            .ok(201)?;
        let bg = eventually(Duration::from_secs(30), "the process to write", || async {
            let out = member.sh(&id, "cat /tmp/bg 2>/dev/null || true").await?;
            Ok((!out.is_empty()).then_some(out))
        })
        .await?;
        ensure!(bg == "65534\n", "{provider}: {bg}");
        member
            .post(
                &format!("/v1/sandboxes/{id}/processes"),
                json!({"cmd": ["id"], "user": "ghost"}),
            )
            .await?
            .err(400, "invalid_request")?;
        // Names the sandbox does not have, or that are no names at all.
        let e = exec("ghost", "id").await?.err(400, "invalid_request")?;
        ensure!(e.message.contains("no user \"ghost\""), "{provider}: {e:?}");
        for bad in ["", "-rf", "a b", "root:x", &"u".repeat(33)] {
            exec(bad, "id").await?.err(400, "invalid_request")?;
        }
        member.destroy(&id).await?;
    }
    // PRoot emulates the switch: the command sees the uid it asked for,
    // while every process of the sandbox stays the one unprivileged host
    // user it always is.
    let id = member.sandbox("proot").await?;
    let out = member
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["id", "-u"], "user": "nobody"}),
        )
        .await?
        .ok(200)?;
    ensure!(out["stdout"] == "65534\n", "proot: {out}");
    member.destroy(&id).await?;
    Ok(())
}
