//! Background processes: kept by the sandbox's agent, so their output is
//! there from the start after the client went away and after the server
//! restarted; stdin, signals, the output bound, the cap, and who may do what.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{eventually, Api, Server, ServerOptions, Sse, SseEvent, StoreKind};

const PROVIDERS: [&str; 3] = ["docker", "namespaces", "proot"];

async fn start(api: &Api, id: &str, script: &str) -> Result<u64> {
    let p = api
        .post(
            &format!("/v1/sandboxes/{id}/processes"),
            json!({"cmd": ["sh", "-c", script], "env": {"WHO": "proc"}}),
        )
        .await?
        .ok(201)?;
    ensure!(p["state"] == "running", "started: {p}");
    p["pid"].as_u64().ok_or_else(|| anyhow!("no pid: {p}"))
}

async fn output(api: &Api, id: &str, pid: u64, follow: bool) -> Result<Sse> {
    let resp = api
        .request(
            Method::GET,
            &format!("/v1/sandboxes/{id}/processes/{pid}/output?follow={follow}"),
        )
        .send()
        .await?;
    ensure!(resp.status().as_u16() == 200, "output: {}", resp.status());
    Ok(Sse::from_response(resp))
}

fn stdout_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "stdout")
        .filter_map(|e| e.data["data"].as_str())
        .collect()
}

async fn exited(api: &Api, id: &str, pid: u64) -> Result<Value> {
    eventually(
        Duration::from_secs(60),
        "the process to exit",
        || async move {
            let p = api
                .get(&format!("/v1/sandboxes/{id}/processes/{pid}"))
                .await?
                .ok(200)?;
            Ok((p["state"] == "exited").then_some(p))
        },
    )
    .await
}

const SCRIPT: &str = "trap 'echo term; exit 3' TERM; echo start:$WHO; read l; echo got:$l; \
                      while :; do sleep 0.1; done";

#[tokio::test(flavor = "multi_thread")]
async fn background_processes_run_on_after_the_client_and_take_stdin_and_signals() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,proot,namespaces"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let (_, viewer) = admin.key(&tenant, "viewer").await?;
    let (_, stranger) = admin.tenant_with("member").await?;
    for provider in PROVIDERS {
        let id = member.sandbox(provider).await?;
        let pid = start(&member, &id, SCRIPT).await?;
        let list = member
            .get(&format!("/v1/sandboxes/{id}/processes"))
            .await?
            .ok(200)?;
        ensure!(
            list["processes"].as_array().is_some_and(|ps| ps
                .iter()
                .any(|p| p["pid"] == pid && p["state"] == "running")),
            "{provider}: list {list}"
        );
        // Read the first line, then go away: the process must not notice.
        let mut sse = output(&member, &id, pid, true).await?;
        let first = sse
            .next_event()
            .await?
            .ok_or_else(|| anyhow!("{provider}: no output"))?;
        ensure!(
            first.event == "stdout" && first.data["data"] == "start:proc\n",
            "{provider}: {first:?}"
        );
        drop(sse);

        // Viewers read but do not touch; other tenants see nothing.
        viewer
            .get(&format!("/v1/sandboxes/{id}/processes/{pid}"))
            .await?
            .ok(200)?;
        let r = viewer
            .post_raw(
                &format!("/v1/sandboxes/{id}/processes/{pid}/stdin"),
                "application/octet-stream",
                b"no\n".to_vec(),
            )
            .await?;
        ensure!(
            r.status == 403,
            "{provider}: viewer stdin {} {}",
            r.status,
            r.text()
        );
        let r = viewer
            .post(
                &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
                json!({"signal": "KILL"}),
            )
            .await?;
        ensure!(r.status == 403, "{provider}: viewer signal {}", r.status);
        // Both are in the audit log by name, the refusal as denied.
        let started = admin
            .audit(&format!("sandbox_id={id}&action=process.start"))
            .await?;
        ensure!(
            started.iter().any(|e| e["outcome"] == "ok"),
            "{provider}: process.start not audited: {started:?}"
        );
        let denied = admin
            .audit(&format!("sandbox_id={id}&action=process.signal"))
            .await?;
        ensure!(
            denied.iter().any(|e| e["outcome"] == "denied"),
            "{provider}: process.signal refusal not audited: {denied:?}"
        );
        let r = viewer
            .post(
                &format!("/v1/sandboxes/{id}/processes"),
                json!({"cmd": ["true"]}),
            )
            .await?;
        ensure!(r.status == 403, "{provider}: viewer start {}", r.status);
        for path in [
            format!("/v1/sandboxes/{id}/processes"),
            format!("/v1/sandboxes/{id}/processes/{pid}"),
            format!("/v1/sandboxes/{id}/processes/{pid}/output"),
        ] {
            let r = stranger.get(&path).await?;
            ensure!(r.status == 404, "{provider}: stranger {path}: {}", r.status);
        }
        let r = stranger
            .post(
                &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
                json!({"signal": "KILL"}),
            )
            .await?;
        ensure!(r.status == 404, "{provider}: stranger signal {}", r.status);

        let w = member
            .post_raw(
                &format!("/v1/sandboxes/{id}/processes/{pid}/stdin"),
                "application/octet-stream",
                b"hello\n".to_vec(),
            )
            .await?
            .ok(200)?;
        ensure!(w["written"] == 6, "{provider}: {w}");
        let (member_ref, id_ref) = (&member, &id);
        eventually(
            Duration::from_secs(30),
            "the echo of stdin",
            || async move {
                let events = output(member_ref, id_ref, pid, false)
                    .await?
                    .collect()
                    .await?;
                Ok(stdout_of(&events).contains("got:hello\n").then_some(()))
            },
        )
        .await?;

        let r = member
            .post(
                &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
                json!({"signal": "SEGV"}),
            )
            .await?;
        ensure!(
            r.status == 400,
            "{provider}: SEGV {} {}",
            r.status,
            r.text()
        );
        member
            .post(
                &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
                json!({"signal": "TERM"}),
            )
            .await?
            .ok(200)?;
        // From the start, to the exit.
        let events = output(&member, &id, pid, true).await?.collect().await?;
        ensure!(
            stdout_of(&events) == "start:proc\ngot:hello\nterm\n",
            "{provider}: {events:?}"
        );
        let last = events
            .last()
            .ok_or_else(|| anyhow!("{provider}: no events"))?;
        ensure!(
            last.event == "exit" && last.data["exit_code"] == 3,
            "{provider}: {last:?}"
        );
        let p = exited(&member, &id, pid).await?;
        ensure!(p["exit_code"] == 3, "{provider}: {p}");
        let r = member
            .post(
                &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
                json!({"signal": "KILL"}),
            )
            .await?;
        ensure!(
            r.status == 409,
            "{provider}: signal after exit {}",
            r.status
        );

        // An empty body with close=true ends stdin.
        let pid = start(&member, &id, "cat; echo done").await?;
        member
            .post_raw(
                &format!("/v1/sandboxes/{id}/processes/{pid}/stdin"),
                "application/octet-stream",
                b"abc".to_vec(),
            )
            .await?
            .ok(200)?;
        member
            .post_raw(
                &format!("/v1/sandboxes/{id}/processes/{pid}/stdin?close=true"),
                "application/octet-stream",
                Vec::new(),
            )
            .await?
            .ok(200)?;
        let events = output(&member, &id, pid, true).await?.collect().await?;
        ensure!(stdout_of(&events) == "abcdone\n", "{provider}: {events:?}");
        ensure!(
            events
                .last()
                .is_some_and(|e| e.event == "exit" && e.data["exit_code"] == 0),
            "{provider}: {events:?}"
        );
        let r = member
            .get(&format!("/v1/sandboxes/{id}/processes/999999"))
            .await?;
        ensure!(r.status == 404, "{provider}: unknown pid {}", r.status);
        member.destroy(&id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn background_processes_survive_a_server_restart() -> Result<()> {
    let mut server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,proot,namespaces"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let key = member.key_secret().to_owned();
    let mut started = Vec::new();
    for provider in ["docker", "namespaces"] {
        let id = member.sandbox(provider).await?;
        let pid = start(&member, &id, "echo before; read l; echo after:$l").await?;
        started.push((provider, id, pid));
    }
    let status = server.sigterm()?;
    ensure!(status.success(), "SIGTERM exit status: {status}");
    server.restart()?;
    let member = server.client(&key);
    for (provider, id, pid) in &started {
        let list = member
            .get(&format!("/v1/sandboxes/{id}/processes"))
            .await?
            .ok(200)?;
        ensure!(
            list["processes"].as_array().is_some_and(|ps| ps
                .iter()
                .any(|p| p["pid"] == *pid && p["state"] == "running")),
            "{provider}: after the restart: {list}"
        );
        member
            .post_raw(
                &format!("/v1/sandboxes/{id}/processes/{pid}/stdin?close=true"),
                "application/octet-stream",
                b"x\n".to_vec(),
            )
            .await?
            .ok(200)?;
        let events = output(&member, id, *pid, true).await?.collect().await?;
        ensure!(
            stdout_of(&events) == "before\nafter:x\n",
            "{provider}: {events:?}"
        );
        member.destroy(id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn background_output_is_bounded_and_processes_are_capped() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,proot,namespaces"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("docker").await?;
    // 3 MiB on stdout; 1 MiB is kept.
    let pid = start(&member, &id, "head -c 3145728 /dev/zero | tr '\\0' x").await?;
    let p = exited(&member, &id, pid).await?;
    ensure!(
        p["truncated"] == true && p["stdout_dropped"] == 2 * 1024 * 1024,
        "{p}"
    );
    let events = output(&member, &id, pid, true).await?.collect().await?;
    ensure!(
        stdout_of(&events).len() == 1024 * 1024,
        "kept {}",
        stdout_of(&events).len()
    );
    let last = events.last().ok_or_else(|| anyhow!("no events"))?;
    ensure!(
        last.event == "exit" && last.data["stdout_dropped"] == 2 * 1024 * 1024,
        "{last:?}"
    );

    let mut pids = Vec::new();
    loop {
        let r = member
            .post(
                &format!("/v1/sandboxes/{id}/processes"),
                json!({"cmd": ["sleep", "600"]}),
            )
            .await?;
        match r.status {
            201 => pids.push(r.json()?["pid"].clone()),
            409 => break,
            s => bail!("start {}: {s} {}", pids.len(), r.text()),
        }
        ensure!(pids.len() <= 64, "no cap after {} processes", pids.len());
    }
    ensure!(pids.len() == 32, "the cap let {} run", pids.len());
    member.destroy(&id).await?;
    Ok(())
}
