//! Resource readings of sandboxes (`GET /v1/sandboxes/{id}/stats`) on
//! every process-based provider and, in the workers topology, from a
//! remote worker over its RPC: memory a sandbox holds and CPU it burns show
//! up, readings form a series, and other tenants, unknown ids, bad ranges
//! and ended sandboxes are refused.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use serde_json::{json, Value};

use crate::support::{Api, Server, ServerOptions, StoreKind};

const PROVIDERS: [&str; 3] = ["docker", "namespaces", "proot"];
const MIB: u64 = 1024 * 1024;

/// Reads the stats until `done` holds of the newest reading; fails after
/// 60 reads a second apart (no time limit is asserted).
async fn poll(api: &Api, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    for _ in 0..60 {
        let body = api
            .get(&format!("/v1/sandboxes/{id}/stats"))
            .await?
            .ok(200)?;
        if let Some(s) = body["samples"].as_array().and_then(|s| s.last()) {
            if done(s) {
                return Ok(body);
            }
            last = s.clone();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("the stats never showed {what}; newest reading: {last}")
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_show_the_memory_and_cpu_a_sandbox_uses() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,namespaces,proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (_, stranger) = admin.tenant_with("member").await?;
    for provider in PROVIDERS {
        let id = member.sandbox(provider).await?;
        let first = poll(&member, &id, "a reading", |_| true).await?;
        let s = &first["samples"][0];
        ensure!(first["sandbox_id"] == id.as_str(), "{first}");
        ensure!(
            s["cpu_count"].as_f64().is_some_and(|c| c > 0.0),
            "{provider}: {s}"
        );
        ensure!(
            s["mem_total"].as_u64().is_some_and(|t| t > 0),
            "{provider}: {s}"
        );
        ensure!(
            s["disk_total"].as_u64().is_some_and(|t| t > 0),
            "{provider}: {s}"
        );
        let base = s["mem_used"].as_u64().unwrap_or(0);

        // The shell keeps 60 MiB in a variable while it sleeps (the echo
        // after the sleep keeps it from exec'ing the sleep).
        for cmd in [
            "x=$(head -c 62914560 /dev/zero | tr '\\0' a); sleep 600; echo ${#x}",
            "while :; do :; done",
        ] {
            member
                .post(
                    &format!("/v1/sandboxes/{id}/processes"),
                    json!({"cmd": ["sh", "-c", cmd]}),
                )
                .await?
                .ok(201)?;
        }
        poll(&member, &id, "60 MiB more memory", |s| {
            s["mem_used"].as_u64().unwrap_or(0) >= base + 50 * MIB
        })
        .await?;
        let busy = poll(&member, &id, "a busy CPU", |s| {
            s["cpu_used_pct"].as_f64().unwrap_or(0.0) >= 30.0
        })
        .await?;
        let stamps: Vec<&str> = busy["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["ts"].as_str())
            .collect();
        ensure!(stamps.len() >= 2, "{provider}: no series: {busy}");
        ensure!(stamps.windows(2).all(|w| w[0] < w[1]), "{provider}: {busy}");

        // A range before the sandbox: nothing.
        let old = member
            .get(&format!(
                "/v1/sandboxes/{id}/stats?since=2001-01-01T00:00:00Z&until=2001-01-02T00:00:00Z"
            ))
            .await?
            .ok(200)?;
        ensure!(old["samples"] == json!([]), "{old}");
        stranger
            .get(&format!("/v1/sandboxes/{id}/stats"))
            .await?
            .err(404, "not_found")?;
        member
            .get(&format!("/v1/sandboxes/{id}/stats?since=soon"))
            .await?
            .err(400, "invalid_request")?;
        member.destroy(&id).await?;
        member
            .get(&format!("/v1/sandboxes/{id}/stats"))
            .await?
            .err(409, "conflict")?;
    }
    member
        .get(&format!("/v1/sandboxes/sbx_{}/stats", "0".repeat(32)))
        .await?
        .err(404, "not_found")?;
    Ok(())
}
