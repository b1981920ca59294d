//! The core suite, run once per store (SQLite, PostgreSQL): the whole
//! create → exec → stream → files → destroy path on Docker, namespaces and PRoot, the
//! quota race, and persistence across `kill -9` and SIGTERM restarts.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::support::{eventually, runtime_exists, s, Server, ServerOptions, StoreKind};

macro_rules! per_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(crate::support::StoreKind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(crate::support::StoreKind::Postgres).await
                }
            )*
        }
    };
}

per_store!(
    core_path_docker,
    core_path_proot,
    core_path_namespaces,
    quota_race_admits_exactly_the_quota,
    restart_keeps_sandboxes_and_audit
);

async fn core_path_docker(store: StoreKind) -> Result<()> {
    core_path(store, "docker").await
}

async fn core_path_proot(store: StoreKind) -> Result<()> {
    core_path(store, "proot").await
}

async fn core_path_namespaces(store: StoreKind) -> Result<()> {
    core_path(store, "namespaces").await
}

/// Pseudo-random bytes (every value 0..=255 occurs, not valid UTF-8).
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

async fn core_path(store: StoreKind, provider: &str) -> Result<()> {
    let server = Server::start(ServerOptions::new(store).providers("docker,proot,namespaces"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;

    // Create.
    let sb = member
        .create_sandbox(json!({
            "image": "busybox", "provider": provider, "labels": {"suite": "api"},
            "env": {"GREETING": "hello"}, "cpu": 0.5, "memory_mb": 256, "timeout_s": 600, "workdir": "/tmp",
        }))
        .await?;
    let id = s(&sb, "id")?.to_owned();
    ensure!(
        sb["provider"] == provider && sb["tenant_id"] == tenant.as_str(),
        "{sb}"
    );
    ensure!(s(&sb, "worker_id")?.starts_with("wrk_"), "{sb}");
    ensure!(
        sb["image"] == "busybox"
            && sb["network"] == "none"
            && sb["labels"] == json!({"suite": "api"}),
        "{sb}"
    );
    ensure!(sb["cpu"] == 0.5 && sb["memory_mb"] == 256, "{sb}");
    ensure!(
        sb["expires_at"].is_string()
            && sb["started_at"].is_string()
            && sb["destroyed_at"].is_null(),
        "{sb}"
    );
    ensure!(sb["failure"].is_null(), "{sb}");
    let got = member.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    ensure!(
        got["id"] == id.as_str() && got["state"] == "running",
        "{got}"
    );

    // Exec: argv, env, exit code, both streams, stdin, not found, timeout.
    let out = member
        .exec(
            &id,
            json!({"cmd": ["sh", "-c", "echo $GREETING; echo oops >&2; exit 3"]}),
        )
        .await?;
    ensure!(
        out["exit_code"] == 3 && out["signal"].is_null() && out["timed_out"] == false,
        "{out}"
    );
    ensure!(
        out["stdout"] == "hello\n" && out["stderr"] == "oops\n",
        "{out}"
    );
    ensure!(
        out["duration_ms"].is_u64()
            && out["stdout_truncated"] == false
            && out["stderr_truncated"] == false,
        "{out}"
    );
    let out = member
        .exec(&id, json!({"cmd": ["echo", "a b", "$GREETING"]}))
        .await?;
    ensure!(
        out["stdout"] == "a b $GREETING\n",
        "argv is never joined into a shell string: {out}"
    );
    let out = member
        .exec(&id, json!({"cmd": ["cat"], "stdin": "from stdin"}))
        .await?;
    ensure!(
        out["stdout"] == "from stdin" && out["exit_code"] == 0,
        "{out}"
    );
    let out = member
        .exec(
            &id,
            json!({"cmd": ["sh", "-c", "pwd; echo $X"], "cwd": "/etc", "env": {"X": "1"}}),
        )
        .await?;
    ensure!(out["stdout"] == "/etc\n1\n", "cwd and env per exec: {out}");
    let out = member.exec(&id, json!({"cmd": ["pwd"]})).await?;
    ensure!(
        out["stdout"] == "/tmp\n",
        "the sandbox's workdir is the default cwd: {out}"
    );
    let out = member
        .exec(&id, json!({"cmd": ["/no/such/program"]}))
        .await?;
    ensure!(
        out["exit_code"] == 127 && !out["stderr"].as_str().unwrap_or_default().is_empty(),
        "{out}"
    );
    let out = member
        .exec(&id, json!({"cmd": ["sleep", "30"], "timeout_s": 1}))
        .await?;
    ensure!(
        out["timed_out"] == true && out["exit_code"].is_null() && out["signal"] == 9,
        "{out}"
    );

    // Streaming exec: output, then exactly one exit, last.
    let events = match member
        .exec_stream(
            &id,
            json!({"cmd": ["sh", "-c", "echo one; echo two >&2; echo three; exit 4"]}),
        )
        .await?
    {
        Ok(sse) => sse.collect().await?,
        Err(r) => anyhow::bail!("stream refused: {} {}", r.status, r.text()),
    };
    let last = events.last().ok_or_else(|| anyhow::anyhow!("no events"))?;
    ensure!(
        last.event == "exit" && last.data["exit_code"] == 4 && last.data["timed_out"] == false,
        "{events:?}"
    );
    ensure!(
        events.iter().filter(|e| e.event == "exit").count() == 1,
        "{events:?}"
    );
    let text = |kind: &str| {
        events
            .iter()
            .filter(|e| e.event == kind)
            .map(|e| e.data["data"].as_str().unwrap_or(""))
            .collect::<String>()
    };
    ensure!(
        text("stdout") == "one\nthree\n" && text("stderr") == "two\n",
        "{events:?}"
    );

    // Files: a binary round trip, stat, list, the file seen from exec.
    let bytes = noise(1024 * 1024 + 7, 1);
    let entry = member
        .put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/work/data.bin&mode=0640"),
            bytes.clone(),
        )
        .await?
        .ok(201)?;
    ensure!(
        entry["path"] == "/work/data.bin" && entry["name"] == "data.bin" && entry["type"] == "file",
        "{entry}"
    );
    ensure!(
        entry["size"] == bytes.len() && entry["mode"] == "0640",
        "{entry}"
    );
    let back = member
        .get(&format!("/v1/sandboxes/{id}/files?path=/work/data.bin"))
        .await?;
    ensure!(
        back.status == 200 && back.body == bytes,
        "download differs (status {})",
        back.status
    );
    let size = member.sh(&id, "wc -c < /work/data.bin").await?;
    ensure!(
        size.trim() == bytes.len().to_string(),
        "size seen inside: {size}"
    );
    let listed = member
        .get(&format!("/v1/sandboxes/{id}/files/list?path=/work"))
        .await?
        .ok(200)?;
    ensure!(
        listed["entries"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["path"] == "/work/data.bin")),
        "{listed}"
    );
    member
        .delete(&format!("/v1/sandboxes/{id}/files?path=/work/data.bin"))
        .await?
        .ok(204)?;
    member
        .get(&format!(
            "/v1/sandboxes/{id}/files/stat?path=/work/data.bin"
        ))
        .await?
        .err(404, "not_found")?;

    // The store in use is the one asked for.
    let st = admin.get("/v1/status").await?.ok(200)?;
    let kind = match store {
        StoreKind::Sqlite => "sqlite",
        StoreKind::Postgres => "postgres",
    };
    ensure!(
        st["store"]["kind"] == kind && st["store"]["ok"] == true,
        "{st}"
    );

    // Logs: at least the lifecycle lines.
    let logs = member
        .get(&format!("/v1/sandboxes/{id}/logs"))
        .await?
        .ok(200)?;
    ensure!(
        logs["lines"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["source"] == "lifecycle")),
        "{logs}"
    );

    // Destroy: 204, idempotent, readable as destroyed, runtime gone, exec refused.
    ensure!(
        runtime_exists(&server, provider, &id)?,
        "the runtime of a running sandbox exists"
    );
    member.destroy(&id).await?;
    member.destroy(&id).await?;
    let gone = member.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    ensure!(
        gone["state"] == "destroyed" && gone["destroyed_at"].is_string(),
        "{gone}"
    );
    ensure!(
        !runtime_exists(&server, provider, &id)?,
        "the runtime of {id} is still there after destroy"
    );
    member
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await?
        .err(409, "conflict")?;

    // The audit log has the create, exec, file write and destroy of it.
    let events = member.audit(&format!("sandbox_id={id}")).await?;
    for action in [
        "sandbox.create",
        "sandbox.exec",
        "sandbox.exec_stream",
        "file.write",
        "file.delete",
        "sandbox.destroy",
    ] {
        ensure!(
            events.iter().any(|e| e["action"] == action
                && e["outcome"] == "ok"
                && e["tenant_id"] == tenant.as_str()),
            "no ok {action} event for {id}: {events:?}"
        );
    }
    Ok(())
}

/// 50 concurrent creates against `max_sandboxes = 5`: exactly 5 succeed.
async fn quota_race_admits_exactly_the_quota(store: StoreKind) -> Result<()> {
    let server = Server::start(ServerOptions::new(store).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let quota = admin
        .put(
            &format!("/v1/tenants/{tenant}/quota"),
            json!({"max_sandboxes": 5, "allowed_providers": ["proot"]}),
        )
        .await?
        .ok(200)?;
    ensure!(
        quota["max_sandboxes"] == 5 && quota["max_cpu"].is_null(),
        "{quota}"
    );

    let creates = (0..50).map(|_| {
        member.post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot"}),
        )
    });
    let answers = join_all(creates).await;
    let mut made = Vec::new();
    let mut refused = 0;
    for a in answers {
        let a = a?;
        match a.status {
            201 => made.push(s(&a.json()?, "id")?.to_owned()),
            429 => {
                a.err(429, "quota_exceeded")?;
                refused += 1;
            }
            other => anyhow::bail!("a create gave {other}: {}", a.text()),
        }
    }
    ensure!(
        made.len() == 5 && refused == 45,
        "{} created, {refused} refused",
        made.len()
    );
    let live = member.get("/v1/sandboxes?state=running").await?.ok(200)?;
    ensure!(
        live["sandboxes"].as_array().map(Vec::len) == Some(5),
        "{live}"
    );
    let denied = admin.audit("action=sandbox.create&outcome=denied").await?;
    ensure!(
        denied
            .iter()
            .filter(|e| e["tenant_id"] == tenant.as_str() && e["status"] == 429)
            .count()
            == 45,
        "every refused create is audited: {} events",
        denied.len()
    );
    for id in &made {
        member.destroy(id).await?;
    }
    // With the five gone, the quota admits a new one.
    let again = member.sandbox("proot").await?;
    member.destroy(&again).await?;
    Ok(())
}

fn ids_of(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect()
}

/// `kill -9` and SIGTERM both keep running sandboxes usable across a
/// restart, and every audit event acknowledged before the kill survives.
async fn restart_keeps_sandboxes_and_audit(store: StoreKind) -> Result<()> {
    let mut server = Server::start(ServerOptions::new(store))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_tenant, member) = admin.tenant_with("member").await?;
    let member_key = member.key_secret().to_owned();
    let proot = member.sandbox("proot").await?;
    let docker = member.sandbox("docker").await?;
    for id in [&proot, &docker] {
        member
            .put_bytes(
                &format!("/v1/sandboxes/{id}/files?path=/work/keep.txt"),
                b"kept".to_vec(),
            )
            .await?
            .ok(201)?;
        member.sh(id, "echo before").await?;
    }
    // One that falls due while the server is down: the restarted server
    // must still destroy it. Its lifetime outlasts the few calls before the
    // kill (it is checked to be running just before), and the server stays
    // down until its deadline has passed.
    let short = member
        .create_sandbox(json!({"image": "busybox", "provider": "proot", "timeout_s": 10}))
        .await?;
    let short = s(&short, "id")?.to_owned();
    let before = ids_of(&admin.audit("").await?);
    ensure!(
        before.len() >= 7,
        "audit events before the kill: {}",
        before.len()
    );
    let due = member
        .get(&format!("/v1/sandboxes/{short}"))
        .await?
        .ok(200)?;
    ensure!(due["state"] == "running", "before the kill: {due}");
    let deadline = time::OffsetDateTime::parse(
        s(&due, "expires_at")?,
        &time::format_description::well_known::Rfc3339,
    )
    .context("expires_at is RFC 3339")?;

    server.kill9()?;
    while time::OffsetDateTime::now_utc() <= deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.restart()?;
    let admin = server.admin();
    let member = server.client(&member_key);
    for id in [&proot, &docker] {
        let sb = member.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
        ensure!(sb["state"] == "running", "after kill -9: {sb}");
        let out = member.sh(id, "cat /work/keep.txt").await?;
        ensure!(out == "kept", "after kill -9 the file reads {out:?}");
    }
    let after = ids_of(&admin.audit("").await?);
    let missing: Vec<_> = before.iter().filter(|id| !after.contains(id)).collect();
    ensure!(
        missing.is_empty(),
        "audit events lost by kill -9: {missing:?}"
    );

    let member_ref = &member;
    let short_ref = &short;
    eventually(
        Duration::from_secs(60),
        "the due sandbox to expire after the restart",
        || async move {
            let sb = member_ref
                .get(&format!("/v1/sandboxes/{short_ref}"))
                .await?
                .ok(200)?;
            Ok((sb["state"] == "destroyed").then_some(()))
        },
    )
    .await?;
    ensure!(
        !runtime_exists(&server, "proot", &short)?,
        "the expired sandbox left its runtime"
    );

    // Graceful shutdown: exit 0, sandboxes kept.
    let status = server.sigterm()?;
    ensure!(status.success(), "SIGTERM exit status: {status}");
    server.restart()?;
    let member = server.client(&member_key);
    for id in [&proot, &docker] {
        let out = member.sh(id, "cat /work/keep.txt; echo ' again'").await?;
        ensure!(out == "kept again\n", "after SIGTERM: {out:?}");
    }
    let admin = server.admin();
    let after = ids_of(&admin.audit("").await?);
    ensure!(
        before.iter().all(|id| after.contains(id)),
        "audit events lost by the SIGTERM restart"
    );
    for id in [&proot, &docker] {
        member.destroy(id).await?;
        let server_ref = &server;
        let provider = if id == &proot { "proot" } else { "docker" };
        eventually(
            Duration::from_secs(30),
            "the runtime to go",
            || async move { Ok((!runtime_exists(server_ref, provider, id)?).then_some(())) },
        )
        .await?;
    }
    Ok(())
}
