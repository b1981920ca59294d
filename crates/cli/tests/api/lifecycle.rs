//! Sandbox lifetime over the API: timeouts that expire and extensions that
//! keep a sandbox alive, pause and resume, and the operator endpoints
//! (health, readiness, metrics, OpenAPI, status, workers, drain).

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{eventually, runtime_exists, s, Server, ServerOptions, StoreKind};

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_expire_sandboxes_and_extensions_keep_them() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;

    // Made first with a short lifetime, then extended. The lifetime leaves
    // the extension ample time to land on a slow, loaded host: the test
    // waits for it to pass, it never races it.
    let lifetime = 15;
    let kept = member
        .create_sandbox(json!({"image": "busybox", "provider": "proot", "timeout_s": lifetime}))
        .await?;
    let kept_id = s(&kept, "id")?.to_owned();
    let extended = member
        .post(
            &format!("/v1/sandboxes/{kept_id}/timeout"),
            json!({"timeout_s": 600}),
        )
        .await?
        .ok(200)?;
    ensure!(
        extended["id"] == kept_id.as_str() && extended["state"] == "running",
        "{extended}"
    );
    ensure!(
        rfc3339(&extended, "expires_at")? > rfc3339(&kept, "expires_at")?,
        "expires_at moves later: {} then {}",
        kept["expires_at"],
        extended["expires_at"]
    );

    // Made after it with the same lifetime, so due after the first one's
    // original deadline: once the server has expired this one, it has
    // passed that deadline too.
    let short = member
        .create_sandbox(json!({"image": "busybox", "provider": "proot", "timeout_s": lifetime}))
        .await?;
    let short_id = s(&short, "id")?.to_owned();
    ensure!(
        rfc3339(&short, "expires_at")? >= rfc3339(&kept, "expires_at")?,
        "the second sandbox is due after the first one's original deadline: {} and {}",
        short["expires_at"],
        kept["expires_at"]
    );
    let member_ref = &member;
    let short_ref = &short_id;
    let gone = eventually(
        Duration::from_secs(120),
        "the short-lived sandbox to expire",
        || async move {
            let sb = member_ref
                .get(&format!("/v1/sandboxes/{short_ref}"))
                .await?
                .ok(200)?;
            Ok((sb["state"] == "destroyed").then_some(sb))
        },
    )
    .await?;
    ensure!(gone["destroyed_at"].is_string(), "{gone}");
    ensure!(
        !runtime_exists(&server, "proot", &short_id)?,
        "an expired sandbox leaves no runtime"
    );
    member
        .post(
            &format!("/v1/sandboxes/{short_id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await?
        .err(409, "conflict")?;
    let expiry = admin
        .audit(&format!("sandbox_id={short_id}&action=sandbox.expire"))
        .await?;
    ensure!(
        expiry.len() == 1 && expiry[0]["outcome"] == "ok",
        "the expiry is audited: {expiry:?}"
    );

    let still = member
        .get(&format!("/v1/sandboxes/{kept_id}"))
        .await?
        .ok(200)?;
    ensure!(
        still["state"] == "running",
        "the extended sandbox outlives its first deadline: {still}"
    );
    member.sh(&kept_id, "true").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_and_resume() -> Result<()> {
    let server = Server::start_default()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    for provider in ["docker", "proot"] {
        let id = member.sandbox(provider).await?;
        member.sh(&id, "echo 1 > /tmp/counter").await?;
        // Both pause on every host these tests run on (PRoot freezes its
        // cgroup); a host without cgroups is covered by
        // `pause_is_unsupported_where_the_provider_cannot_pause`.
        let paused = member
            .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await?
            .ok(200)
            .with_context(|| format!("{provider}: pause"))?;
        ensure!(paused["state"] == "paused", "{provider}: {paused}");
        let again = member
            .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await?
            .ok(200)?;
        ensure!(
            again["state"] == "paused",
            "pausing twice is harmless: {again}"
        );
        member
            .post(
                &format!("/v1/sandboxes/{id}/exec"),
                json!({"cmd": ["true"]}),
            )
            .await?
            .err(409, "conflict")?;
        let listed = member.get("/v1/sandboxes?state=paused").await?.ok(200)?;
        ensure!(
            listed["sandboxes"]
                .as_array()
                .is_some_and(|l| l.iter().any(|x| x["id"] == id.as_str())),
            "{listed}"
        );
        let resumed = member
            .post(&format!("/v1/sandboxes/{id}/resume"), json!({}))
            .await?
            .ok(200)?;
        ensure!(resumed["state"] == "running", "{provider}: {resumed}");
        let out = member.sh(&id, "cat /tmp/counter").await?;
        ensure!(out == "1\n", "{provider}: state survives a pause: {out:?}");
        // A paused sandbox can be destroyed too.
        member
            .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await?
            .ok(200)?;
        member.destroy(&id).await?;
        ensure!(
            !runtime_exists(&server, provider, &id)?,
            "{provider}: a destroyed paused sandbox leaves no runtime"
        );
    }
    Ok(())
}

fn paths_of(doc: &Value) -> Vec<String> {
    doc["paths"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_metrics_openapi_status_workers_and_drain() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    let anon = server.anonymous();
    admin.import_busybox().await?;

    let h = anon.get("/healthz").await?.ok(200)?;
    ensure!(h == json!({"status": "ok"}), "{h}");
    anon.get("/readyz").await?.ok(200)?;

    // The in-process worker, or the remote ones of the `workers` test
    // topology.
    let (mode, n_workers) = if server.workers.is_empty() {
        ("single-node", 1)
    } else {
        ("multi-worker", server.workers.len())
    };
    let st = admin.get("/v1/status").await?.ok(200)?;
    ensure!(
        st["version"].is_string() && st["mode"] == mode && st["uptime_s"].is_u64(),
        "{st}"
    );
    ensure!(
        st["store"]["kind"] == "sqlite" && st["store"]["ok"] == true,
        "{st}"
    );
    let providers = st["providers"]
        .as_array()
        .ok_or_else(|| anyhow!("providers: {st}"))?;
    ensure!(
        providers.len() == 1 && providers[0]["name"] == "proot" && providers[0]["healthy"] == true,
        "{st}"
    );
    ensure!(providers[0]["detail"].is_string(), "{st}");
    let workers = st["workers"]
        .as_array()
        .ok_or_else(|| anyhow!("workers: {st}"))?;
    ensure!(workers.len() == n_workers, "{st}");
    let w = &workers[0];
    for field in [
        "id",
        "name",
        "state",
        "address",
        "providers",
        "labels",
        "sandboxes",
        "capacity",
        "last_heartbeat",
    ] {
        ensure!(!w[field].is_null(), "worker has no {field}: {w}");
    }
    // Providers with their health, and capacity as an object (`API.md`,
    // "Multi-worker mode").
    ensure!(
        w["state"] == "ready"
            && w["providers"][0]["name"] == "proot"
            && w["providers"][0]["healthy"] == true
            && w["providers"][0]["detail"].is_string()
            && w["capacity"]["sandboxes"].is_i64(),
        "{w}"
    );
    ensure!(st["sandboxes"]["running"] == 0, "{st}");

    // The status counts what runs.
    let (_, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("proot").await?;
    let st = admin.get("/v1/status").await?.ok(200)?;
    let held: i64 = st["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["sandboxes"].as_i64())
        .sum();
    ensure!(st["sandboxes"]["running"] == 1 && held == 1, "{st}");
    member.get("/v1/status").await?.ok(200)?;

    // Metrics are the operator's: no key is 401, a tenant's key 403.
    anon.get("/metrics").await?.err(401, "unauthenticated")?;
    member.get("/metrics").await?.err(403, "forbidden")?;
    let metrics = admin.get("/metrics").await?;
    ensure!(metrics.status == 200, "metrics: {}", metrics.status);
    let text = metrics.text();
    ensure!(
        text.contains("stacyvm_http_requests_total"),
        "metrics lack stacyvm_http_requests_total:\n{text}"
    );

    let doc = anon.get("/openapi.json").await?.ok(200)?;
    ensure!(
        s(&doc, "openapi")?.starts_with("3.1."),
        "openapi version: {}",
        doc["openapi"]
    );
    let paths = paths_of(&doc);
    let documented = [
        ("/v1/sandboxes", &["post", "get"][..]),
        ("/v1/sandboxes/{id}", &["get", "delete"]),
        ("/v1/sandboxes/{id}/timeout", &["post"]),
        ("/v1/sandboxes/{id}/pause", &["post"]),
        ("/v1/sandboxes/{id}/resume", &["post"]),
        ("/v1/sandboxes/{id}/logs", &["get"]),
        ("/v1/sandboxes/{id}/exec", &["post"]),
        ("/v1/sandboxes/{id}/exec/stream", &["post"]),
        ("/v1/sandboxes/{id}/files", &["put", "get", "delete"]),
        ("/v1/sandboxes/{id}/files/stat", &["get"]),
        ("/v1/sandboxes/{id}/files/list", &["get"]),
        ("/v1/sandboxes/{id}/files/glob", &["get"]),
        ("/v1/sandboxes/{id}/files/move", &["post"]),
        ("/v1/sandboxes/{id}/files/chmod", &["post"]),
        ("/v1/sandboxes/{id}/files/mkdir", &["post"]),
        ("/v1/images", &["post", "get"]),
        ("/v1/images/{name}", &["get", "delete"]),
        ("/v1/tenants", &["post", "get"]),
        ("/v1/tenants/{id}/quota", &["get", "put"]),
        ("/v1/keys", &["post", "get"]),
        ("/v1/keys/{id}", &["delete"]),
        ("/v1/audit", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/v1/status", &["get"]),
        ("/v1/workers", &["get"]),
        ("/v1/workers/{id}/drain", &["post"]),
        ("/metrics", &["get"]),
    ];
    for (path, methods) in documented {
        ensure!(
            paths.iter().any(|p| p == path),
            "the OpenAPI document lacks {path}; it has {paths:?}"
        );
        for m in methods {
            ensure!(
                doc["paths"][path][m].is_object(),
                "the OpenAPI document lacks {m} {path}"
            );
        }
    }

    // Images.
    let images = admin.get("/v1/images").await?.ok(200)?;
    let busybox = admin.get("/v1/images/busybox").await?.ok(200)?;
    ensure!(
        s(&busybox, "digest")?.starts_with("sha256:")
            && busybox["size"].as_u64().is_some_and(|n| n > 0),
        "{busybox}"
    );
    ensure!(
        images["images"]
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["name"] == "busybox")),
        "{images}"
    );

    // Workers and drain: a drained worker keeps its sandboxes and takes no new ones.
    member.get("/v1/workers").await?.err(403, "forbidden")?;
    let listed = admin.get("/v1/workers").await?.ok(200)?;
    let worker = listed["workers"][0].clone();
    let wid = s(&worker, "id")?.to_owned();
    ensure!(
        wid.starts_with("wrk_") && worker["state"] == "ready",
        "{listed}"
    );
    member
        .post(&format!("/v1/workers/{wid}/drain"), json!({}))
        .await?
        .err(403, "forbidden")?;
    admin
        .post(
            "/v1/workers/wrk_00000000000000000000000000000000/drain",
            json!({}),
        )
        .await?
        .err(404, "not_found")?;
    // Every worker (one in-process; or the remote workers of the
    // `workers` test topology).
    let all: Vec<String> = listed["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["id"].as_str().map(str::to_owned))
        .collect();
    for w in &all {
        let drained = admin
            .post(&format!("/v1/workers/{w}/drain"), json!({}))
            .await?
            .ok(200)?;
        ensure!(drained["state"] == "draining", "{drained}");
    }
    let r = member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot"}),
        )
        .await?;
    r.err(503, "no_capacity")?;
    member
        .post("/v1/sandboxes", json!({"image": "busybox"}))
        .await?
        .err(503, "no_capacity")?;
    member.sh(&id, "true").await?;
    let drain_audit = admin.audit("action=worker.drain&outcome=ok").await?;
    ensure!(
        drain_audit.len() == all.len() && drain_audit.iter().any(|e| e["target"] == wid.as_str()),
        "{drain_audit:?}"
    );
    member.destroy(&id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_streams_until_the_sandbox_ends() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("proot").await?;

    let resp = member
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{id}/logs?follow=true"),
        )
        .send()
        .await?;
    ensure!(resp.status() == 200, "follow: {}", resp.status());
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    ensure!(
        ct.starts_with("text/event-stream"),
        "follow answers SSE, not {ct:?}"
    );
    let mut sse = crate::support::Sse::from_response(resp);
    let first = sse
        .next_event()
        .await?
        .ok_or_else(|| anyhow!("no log line"))?;
    ensure!(
        first.data["source"] == "lifecycle" && first.data["ts"].is_string(),
        "{first:?}"
    );
    member.destroy(&id).await?;
    // The stream ends by itself once the sandbox is gone, its last line saying so.
    let rest = sse.collect().await?;
    let last = rest.last().map(|e| e.data.clone()).unwrap_or(first.data);
    ensure!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("destroyed")),
        "the followed log ends with the destroy: {rest:?}"
    );
    Ok(())
}

/// A runtime removed behind the server's back is noticed: the sandbox ends
/// up `lost` (or `failed`) with a reason, and refuses exec.
#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_that_vanishes_is_reported() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("docker").await?;
    let containers = crate::support::docker_containers_of(&id)?;
    ensure!(containers.len() == 1, "{containers:?}");
    let out = std::process::Command::new("docker")
        .args(["rm", "-f", &containers[0]])
        .output()?;
    ensure!(
        out.status.success(),
        "docker rm: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let member_ref = &member;
    let id_ref = &id;
    let sb = eventually(
        Duration::from_secs(90),
        "the sandbox to be marked lost",
        || async move {
            let sb = member_ref
                .get(&format!("/v1/sandboxes/{id_ref}"))
                .await?
                .ok(200)?;
            Ok(matches!(sb["state"].as_str(), Some("lost" | "failed")).then_some(sb))
        },
    )
    .await?;
    ensure!(
        sb["failure"]["code"].is_string() && sb["failure"]["message"].is_string(),
        "{sb}"
    );
    member
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await?
        .err(409, "conflict")?;
    let st = admin.get("/v1/status").await?.ok(200)?;
    ensure!(st["sandboxes"]["running"] == 0, "{st}");
    member
        .delete(&format!("/v1/sandboxes/{id}"))
        .await?
        .ok(204)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_sandbox_still_expires() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    // Paused first, with the default lifetime, and only then given a short
    // one: the pause cannot race the expiry.
    let sb = member
        .create_sandbox(json!({"image": "busybox", "provider": "docker"}))
        .await?;
    let id = s(&sb, "id")?.to_owned();
    member
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await?
        .ok(200)?;
    let due = member
        .post(
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout_s": 1}),
        )
        .await?
        .ok(200)?;
    ensure!(due["state"] == "paused", "{due}");
    let member_ref = &member;
    let id_ref = &id;
    eventually(
        Duration::from_secs(60),
        "the paused sandbox to expire",
        || async move {
            let sb = member_ref
                .get(&format!("/v1/sandboxes/{id_ref}"))
                .await?
                .ok(200)?;
            Ok((sb["state"] == "destroyed").then_some(()))
        },
    )
    .await?;
    ensure!(
        !runtime_exists(&server, "docker", &id)?,
        "an expired paused sandbox leaves no container"
    );
    Ok(())
}

/// On a host where PRoot cannot freeze a sandbox (no cgroup v2), pause and
/// resume answer `409 unsupported`, and the sandbox keeps running.
#[tokio::test(flavor = "multi_thread")]
async fn pause_is_unsupported_where_the_provider_cannot_pause() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("proot")
            .without_cgroups(),
    )?;
    let admin = server.admin();
    let st = admin.get("/v1/status").await?.ok(200)?;
    let detail = st["providers"][0]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        !detail.contains("a cgroup v2 per sandbox"),
        "the server still sees cgroups: {detail}"
    );
    admin.import_busybox().await?;
    let id = admin.sandbox("proot").await?;
    let e = admin
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await?
        .err(409, "unsupported")?;
    ensure!(e.message.contains("pause"), "{e:?}");
    // Resuming a running sandbox is a no-op, as pausing a paused one is.
    let sb = admin
        .post(&format!("/v1/sandboxes/{id}/resume"), json!({}))
        .await?
        .ok(200)?;
    ensure!(sb["state"] == "running", "{sb}");
    let sb = admin.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    ensure!(
        sb["state"] == "running",
        "a refused pause changes nothing: {sb}"
    );
    admin.sh(&id, "true").await?;
    admin.destroy(&id).await?;
    ensure!(
        !runtime_exists(&server, "proot", &id)?,
        "destroy without cgroups leaves nothing"
    );
    Ok(())
}

/// `network: none` leaves a Docker sandbox with loopback only; `egress`
/// gives it an interface out (on StacyVM's own bridge; what it can reach is
/// tested in the security suite).
#[tokio::test(flavor = "multi_thread")]
async fn docker_network_modes() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let interfaces = |dev: String| -> Vec<String> {
        dev.lines()
            .skip(2)
            .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
            .collect()
    };
    let none = admin
        .create_sandbox(json!({"image": "busybox", "provider": "docker"}))
        .await?;
    ensure!(
        none["network"] == "none",
        "the default network is none: {none}"
    );
    let ifs = interfaces(admin.sh(s(&none, "id")?, "cat /proc/net/dev").await?);
    ensure!(ifs == ["lo"], "network none: interfaces {ifs:?}");
    let egress = admin
        .create_sandbox(json!({"image": "busybox", "provider": "docker", "network": "egress"}))
        .await?;
    ensure!(egress["network"] == "egress", "{egress}");
    let ifs = interfaces(admin.sh(s(&egress, "id")?, "cat /proc/net/dev").await?);
    ensure!(
        ifs.iter().any(|i| i != "lo"),
        "network egress: interfaces {ifs:?}"
    );
    Ok(())
}

/// The RFC 3339 time in `v[field]`.
fn rfc3339(v: &Value, field: &str) -> Result<time::OffsetDateTime> {
    let text = s(v, field)?;
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{field} {text:?} is not RFC 3339"))
}
