//! Streaming exec over SSE: output reaches the client while the command
//! still runs, `exit` is always last, and a client that goes away kills the
//! command.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Result};
use serde_json::json;

use crate::support::{eventually, random_hex, Api, Server, Sse};

async fn open(api: &Api, id: &str, script: &str) -> Result<Sse> {
    match api
        .exec_stream(id, json!({"cmd": ["sh", "-c", script]}))
        .await?
    {
        Ok(sse) => Ok(sse),
        Err(r) => bail!("the stream was refused: {} {}", r.status, r.text()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn output_arrives_before_the_command_ends() -> Result<()> {
    let server = Server::start_default()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    for provider in ["proot", "docker"] {
        let id = member.sandbox(provider).await?;

        // The command cannot finish until the client has seen its first
        // line and answered by creating the gate file: no clock involved.
        let gate = format!("/tmp/gate-{}", random_hex(8));
        let script = format!(
            "echo a; i=0; while [ ! -e {gate} ]; do i=$((i+1)); [ $i -gt 600 ] && exit 9; sleep 0.1; done; echo b"
        );
        let mut sse = open(&member, &id, &script).await?;
        let first = sse
            .next_event()
            .await?
            .ok_or_else(|| anyhow!("{provider}: the stream ended at once"))?;
        ensure!(
            first.event == "stdout" && first.data["data"] == "a\n",
            "{provider}: first event {first:?}"
        );
        member
            .put_bytes(&format!("/v1/sandboxes/{id}/files?path={gate}"), Vec::new())
            .await?
            .ok(201)?;
        let rest = sse.collect().await?;
        let last = rest
            .last()
            .ok_or_else(|| anyhow!("{provider}: no exit event"))?;
        ensure!(
            last.event == "exit" && last.data["exit_code"] == 0,
            "{provider}: {rest:?}"
        );
        ensure!(
            rest.iter()
                .any(|e| e.event == "stdout" && e.data["data"] == "b\n"),
            "{provider}: {rest:?}"
        );

        // With plain sleeps: the first stdout event still precedes the exit.
        let events = open(&member, &id, "echo a; sleep 2; echo b")
            .await?
            .collect()
            .await?;
        let first_out = events.iter().position(|e| e.event == "stdout");
        let exit = events.iter().position(|e| e.event == "exit");
        ensure!(
            matches!((first_out, exit), (Some(o), Some(x)) if o < x && x == events.len() - 1),
            "{provider}: {events:?}"
        );

        // Bytes that are not UTF-8 carry their exact value in data_b64.
        let events = open(&member, &id, "printf '\\377\\376ok'")
            .await?
            .collect()
            .await?;
        let raw = events
            .iter()
            .find(|e| e.event == "stdout")
            .ok_or_else(|| anyhow!("{provider}: {events:?}"))?;
        ensure!(
            raw.data["data_b64"].is_string(),
            "{provider}: non-UTF-8 output needs data_b64: {raw:?}"
        );

        // A command that times out ends the stream with exit, timed_out.
        let rb = member
            .request(
                reqwest::Method::POST,
                &format!("/v1/sandboxes/{id}/exec/stream"),
            )
            .json(&json!({"cmd": ["sleep", "30"], "timeout_s": 1}));
        let r = rb.send().await?;
        ensure!(r.status() == 200, "{provider}: {}", r.status());
        let text = r.text().await?;
        ensure!(
            text.contains("event: exit") && text.contains("\"timed_out\":true"),
            "{provider}: {text}"
        );
        member.destroy(&id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_kills_the_command() -> Result<()> {
    let server = Server::start_default()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    for provider in ["docker", "proot"] {
        let id = member.sandbox(provider).await?;
        // A sleep length no other process on the host uses (PRoot shares the host's process table).
        let marker = 40_000 + u32::from(u16::from_str_radix(&random_hex(4), 16)?);
        let script = format!("echo started; sleep {marker}; touch /tmp/survived");
        let mut sse = open(&member, &id, &script).await?;
        let first = sse
            .next_event()
            .await?
            .ok_or_else(|| anyhow!("{provider}: no output"))?;
        ensure!(
            first.event == "stdout" && first.data["data"] == "started\n",
            "{provider}: {first:?}"
        );
        // The command is running now.
        let ps = member.sh(&id, "ps").await?;
        ensure!(
            ps.contains(&format!("sleep {marker}")),
            "{provider}: the command should be running:\n{ps}"
        );
        drop(sse);

        let member_ref = &member;
        let id_ref = &id;
        let pattern = format!("sleep {marker}");
        let pattern_ref = &pattern;
        eventually(
            Duration::from_secs(30),
            "the abandoned command to be killed",
            || async move {
                let ps = member_ref.sh(id_ref, "ps").await?;
                Ok((!ps.lines().any(|l| l.contains(pattern_ref.as_str()))).then_some(()))
            },
        )
        .await?;
        let out = member
            .exec(&id, json!({"cmd": ["test", "-e", "/tmp/survived"]}))
            .await?;
        ensure!(
            out["exit_code"] == 1,
            "{provider}: the rest of the script must never run: {out}"
        );
        member.destroy(&id).await?;
    }
    Ok(())
}

/// Output past the cap (16 MiB per stream by default) is cut and flagged;
/// the other stream is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn output_beyond_the_cap_is_cut_and_flagged() -> Result<()> {
    let server = Server::start(
        crate::support::ServerOptions::new(crate::support::StoreKind::Sqlite).providers("proot"),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let id = admin.sandbox("proot").await?;
    let cap = 16 * 1024 * 1024;
    let out = admin
        .exec(
            &id,
            json!({"cmd": ["sh", "-c", "yes | head -c 17825792; echo done >&2"]}),
        )
        .await?;
    let stdout = out["stdout"].as_str().unwrap_or_default();
    ensure!(
        out["stdout_truncated"] == true,
        "17 MiB of output is over the cap: truncated flag {}",
        out["stdout_truncated"]
    );
    ensure!(
        stdout.len() <= cap && stdout.len() >= cap / 2,
        "stdout kept {} bytes",
        stdout.len()
    );
    ensure!(
        stdout.bytes().all(|b| b == b'y' || b == b'\n'),
        "the kept output is the output"
    );
    ensure!(
        out["stderr"] == "done\n" && out["stderr_truncated"] == false,
        "stderr: {}",
        out["stderr"]
    );
    ensure!(
        out["exit_code"] == 0,
        "the command still runs to its end: {}",
        out["exit_code"]
    );
    Ok(())
}

/// Many commands at once on one sandbox each get their own output.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_execs_keep_their_outputs_apart() -> Result<()> {
    let server = Server::start_default()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    for provider in ["docker", "proot"] {
        let id = admin.sandbox(provider).await?;
        let runs = (0..16).map(|i| {
            let admin = admin.clone();
            let id = id.clone();
            async move {
                let script =
                    format!("for j in 1 2 3; do echo {i}-$j; done; echo err-{i} >&2; exit {i}");
                let out = admin
                    .exec(&id, json!({"cmd": ["sh", "-c", script]}))
                    .await?;
                ensure!(out["exit_code"] == i, "{provider} run {i}: {out}");
                ensure!(
                    out["stdout"] == format!("{i}-1\n{i}-2\n{i}-3\n").as_str(),
                    "{provider} run {i}: {out}"
                );
                ensure!(
                    out["stderr"] == format!("err-{i}\n").as_str(),
                    "{provider} run {i}: {out}"
                );
                Ok::<_, anyhow::Error>(())
            }
        });
        for r in futures_util::future::join_all(runs).await {
            r?;
        }
        admin.destroy(&id).await?;
    }
    Ok(())
}

/// A stream whose sandbox is destroyed under it still ends properly: the
/// last event is `exit` or `error`, and the stream closes.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_cleanly_when_its_sandbox_is_destroyed() -> Result<()> {
    let server = Server::start_default()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    for provider in ["docker", "proot"] {
        let id = admin.sandbox(provider).await?;
        let mut sse = open(&admin, &id, "echo up; sleep 60; echo never").await?;
        let first = sse
            .next_event()
            .await?
            .ok_or_else(|| anyhow!("{provider}: no output"))?;
        ensure!(first.data["data"] == "up\n", "{provider}: {first:?}");
        admin.destroy(&id).await?;
        let rest = sse.collect().await?;
        let last = rest
            .last()
            .ok_or_else(|| anyhow!("{provider}: the stream ended without exit or error"))?;
        ensure!(
            last.event == "exit" || last.event == "error",
            "{provider}: last event {last:?}"
        );
        ensure!(
            !rest.iter().any(|e| e.data["data"] == "never\n"),
            "{provider}: the command outlived its sandbox: {rest:?}"
        );
        if last.event == "error" {
            ensure!(
                last.data["code"].is_string() && last.data["message"].is_string(),
                "{last:?}"
            );
        }
    }
    Ok(())
}
