//! Tenant-scoped behaviour of the sandbox collection: idempotent creates,
//! and listing with state and label filters and cursor paging.

use std::collections::BTreeSet;

use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{s, Api, Server, ServerOptions, StoreKind};

async fn create_with_key(api: &Api, key: &str) -> Result<(u16, Value)> {
    let rb = api
        .request(Method::POST, "/v1/sandboxes")
        .header("idempotency-key", key)
        .json(&json!({"image": "busybox", "provider": "proot"}));
    let r = api.send(rb).await?;
    ensure!(
        r.status == 201 || r.status == 200,
        "idempotent create: {} {}",
        r.status,
        r.text()
    );
    Ok((r.status, r.json()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_create_returns_the_first_sandbox() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (tenant_b, other) = admin.tenant_with("member").await?;

    let (_, first) = create_with_key(&member, "api-test-idem-1").await?;
    let (_, again) = create_with_key(&member, "api-test-idem-1").await?;
    ensure!(
        first["id"] == again["id"],
        "same key, same sandbox: {first} vs {again}"
    );
    ensure!(again["state"] == "running", "{again}");
    let (_, different) = create_with_key(&member, "api-test-idem-2").await?;
    ensure!(
        different["id"] != first["id"],
        "another key makes another sandbox"
    );
    // The key is scoped to the tenant.
    let (_, theirs) = create_with_key(&other, "api-test-idem-1").await?;
    ensure!(
        theirs["id"] != first["id"] && theirs["tenant_id"] == tenant_b.as_str(),
        "{theirs}"
    );

    // Concurrent repeats of one key still make one sandbox.
    let racing: Vec<_> = (0..8)
        .map(|_| create_with_key(&member, "api-test-idem-race"))
        .collect();
    let answers = futures_util::future::join_all(racing).await;
    let mut race_ids = std::collections::BTreeSet::new();
    for a in answers {
        race_ids.insert(a?.1["id"].as_str().unwrap_or_default().to_owned());
    }
    ensure!(
        race_ids.len() == 1,
        "8 concurrent creates with one key made {race_ids:?}"
    );

    let mine = member.get("/v1/sandboxes").await?.ok(200)?;
    ensure!(
        mine["sandboxes"].as_array().map(Vec::len) == Some(3),
        "no duplicate was made: {mine}"
    );
    let creates = admin.audit("action=sandbox.create").await?;
    let replay = creates
        .iter()
        .filter(|e| e["target"] == first["id"])
        .filter(|e| e["detail"]["idempotent_replay"] == true)
        .count();
    ensure!(replay == 1, "the replay is audited as such: {creates:?}");
    Ok(())
}

async fn ids(api: &Api, query: &str) -> Result<Vec<String>> {
    let page = api.get(&format!("/v1/sandboxes?{query}")).await?.ok(200)?;
    ensure!(
        page["next_cursor"].is_null(),
        "one page expected for {query}: {page}"
    );
    page["sandboxes"]
        .as_array()
        .map(|l| l.iter().map(|x| s(x, "id").map(str::to_owned)).collect())
        .unwrap_or_else(|| Ok(Vec::new()))
}

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_by_state_and_label_and_pages_with_cursors() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (_, other) = admin.tenant_with("member").await?;

    let mk = |labels: Value| {
        member.create_sandbox(json!({"image": "busybox", "provider": "proot", "labels": labels}))
    };
    let a1 = s(&mk(json!({"team": "a", "tier": "gold"})).await?, "id")?.to_owned();
    let a2 = s(&mk(json!({"team": "a", "tier": "free"})).await?, "id")?.to_owned();
    let b1 = s(&mk(json!({"team": "b"})).await?, "id")?.to_owned();
    let foreign = other
        .create_sandbox(json!({"image": "busybox", "provider": "proot", "labels": {"team": "a"}}))
        .await?;
    member.destroy(&a2).await?;

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    ensure!(
        sorted(ids(&member, "").await?) == sorted(vec![a1.clone(), a2.clone(), b1.clone()]),
        "only the caller's tenant"
    );
    ensure!(sorted(ids(&member, "state=running").await?) == sorted(vec![a1.clone(), b1.clone()]));
    ensure!(ids(&member, "state=destroyed").await? == vec![a2.clone()]);
    ensure!(sorted(ids(&member, "label=team=a").await?) == sorted(vec![a1.clone(), a2.clone()]));
    ensure!(ids(&member, "state=running&label=team=a").await? == vec![a1.clone()]);
    ensure!(
        ids(&member, "label=team=a&label=tier=gold").await? == vec![a1.clone()],
        "labels combine with AND"
    );
    ensure!(ids(&member, "label=team=b").await? == vec![b1.clone()]);
    ensure!(ids(&member, "label=team=c").await?.is_empty());
    ensure!(ids(&member, "state=paused").await?.is_empty());
    let all = ids(&admin, "label=team=a").await?;
    ensure!(
        all.len() == 3 && all.iter().any(|i| i == s(&foreign, "id").unwrap_or("")),
        "admins see all tenants: {all:?}"
    );

    // limit=1 walks all three, once each, and ends with a null cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let q = match &cursor {
            Some(c) => format!("/v1/sandboxes?limit=1&cursor={c}"),
            None => "/v1/sandboxes?limit=1".to_owned(),
        };
        let page = member.get(&q).await?.ok(200)?;
        let items = page["sandboxes"].as_array().cloned().unwrap_or_default();
        ensure!(items.len() <= 1, "limit=1 gave {}", items.len());
        seen.extend(
            items
                .iter()
                .filter_map(|x| x["id"].as_str().map(str::to_owned)),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => {
                cursor = None;
                break;
            }
        }
    }
    ensure!(cursor.is_none(), "paging did not end");
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    ensure!(seen.len() == 3 && unique.len() == 3, "pages: {seen:?}");
    ensure!(unique == BTreeSet::from([a1, a2, b1]), "pages: {seen:?}");
    // A filtered walk pages too.
    let first = member
        .get("/v1/sandboxes?limit=1&label=team=a")
        .await?
        .ok(200)?;
    let c = first["next_cursor"].as_str().map(str::to_owned);
    ensure!(
        c.is_some(),
        "two matches, limit 1: a cursor follows: {first}"
    );
    let second = member
        .get(&format!(
            "/v1/sandboxes?limit=1&label=team=a&cursor={}",
            c.unwrap_or_default()
        ))
        .await?
        .ok(200)?;
    ensure!(
        second["sandboxes"].as_array().map(Vec::len) == Some(1)
            && second["sandboxes"][0]["id"] != first["sandboxes"][0]["id"],
        "{second}"
    );
    Ok(())
}

/// The audit log pages with cursors and filters by action, sandbox and time;
/// every response carries (and echoes) its request id.
#[tokio::test(flavor = "multi_thread")]
async fn audit_pages_and_filters_and_request_ids_are_echoed() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("proot").await?;
    for i in 0..3 {
        let rb = member
            .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
            .header("x-request-id", format!("api-test-audit-{i}"))
            .json(&json!({"cmd": ["true"]}));
        let r = member.send(rb).await?;
        r.ok(200)?;
        ensure!(
            r.header("x-request-id").as_deref() == Some(format!("api-test-audit-{i}").as_str()),
            "echo on success"
        );
    }
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let rb = member
            .request(Method::GET, path)
            .header("x-request-id", "api-test-open-1");
        let r = member.send(rb).await?;
        ensure!(
            r.header("x-request-id").as_deref() == Some("api-test-open-1"),
            "{path} does not echo the request id"
        );
    }

    let execs = member
        .audit(&format!("action=sandbox.exec&sandbox_id={id}"))
        .await?;
    ensure!(execs.len() == 3, "{execs:?}");
    for (i, e) in execs.iter().enumerate() {
        ensure!(
            e["request_id"] == format!("api-test-audit-{i}").as_str(),
            "events are oldest first: {execs:?}"
        );
        ensure!(
            e["tenant_id"] == tenant.as_str() && e["outcome"] == "ok" && e["status"] == 200,
            "{e}"
        );
        ensure!(
            s(e, "id")?.starts_with("evt_") && e["ts"].is_string() && e["source_ip"].is_string(),
            "{e}"
        );
    }
    // limit=1 walks them one by one.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut q = format!("/v1/audit?limit=1&action=sandbox.exec&sandbox_id={id}");
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let page = member.get(&q).await?.ok(200)?;
        seen.extend(page["events"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    ensure!(seen == execs, "paging gives the same events: {seen:?}");
    // since: nothing before the last exec's time is returned.
    let since = s(&execs[2], "ts")?.to_owned();
    let later = member
        .audit(&format!("action=sandbox.exec&since={since}"))
        .await?;
    ensure!(
        later
            .iter()
            .all(|e| e["ts"].as_str() >= Some(since.as_str()))
            && later.iter().any(|e| e["id"] == execs[2]["id"]),
        "since={since}: {later:?}"
    );
    Ok(())
}
