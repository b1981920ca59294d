//! Keys and tenants: every endpoint of the API tried with no key, a wrong
//! key, a revoked key, a viewer key (on mutating calls) and another tenant's
//! member key (on the first tenant's sandbox) — each refused with the
//! documented status and body, each refusal in the audit log; no secret in
//! the server's log, an error body or an audit event; auth failures rate
//! limited per address.

use std::collections::HashMap;

use anyhow::{anyhow, ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{random_hex, s, Api, Resp, Server, ServerOptions, StoreKind};

/// One API call, described once and tried with every kind of bad key.
struct Endpoint {
    method: Method,
    path: String,
    body: Option<Value>,
    raw: Option<(&'static str, Vec<u8>)>,
    /// Changes something (a viewer must be refused).
    mutating: bool,
    /// Names the first tenant's sandbox (another tenant must get 404).
    sandbox_scoped: bool,
}

fn ep(
    method: Method,
    path: String,
    body: Option<Value>,
    mutating: bool,
    sandbox_scoped: bool,
) -> Endpoint {
    Endpoint {
        method,
        path,
        body,
        raw: None,
        mutating,
        sandbox_scoped,
    }
}

/// Every endpoint of API.md, with the first tenant's sandbox `sbx`, tenant
/// `tnt`, a key id `key` and the local worker `wrk`.
fn endpoints(sbx: &str, tnt: &str, key: &str, wrk: &str) -> Vec<Endpoint> {
    use Method as M;
    let sb = |rest: &str| format!("/v1/sandboxes/{sbx}{rest}");
    let mut v = vec![
        ep(
            M::POST,
            "/v1/sandboxes".into(),
            Some(json!({"image": "busybox", "provider": "proot"})),
            true,
            false,
        ),
        ep(M::GET, "/v1/sandboxes".into(), None, false, false),
        ep(M::GET, sb(""), None, false, true),
        ep(M::DELETE, sb(""), None, true, true),
        ep(
            M::POST,
            sb("/timeout"),
            Some(json!({"timeout_s": 100})),
            true,
            true,
        ),
        ep(M::POST, sb("/pause"), Some(json!({})), true, true),
        ep(M::POST, sb("/resume"), Some(json!({})), true, true),
        ep(M::GET, sb("/logs"), None, false, true),
        ep(
            M::POST,
            sb("/exec"),
            Some(json!({"cmd": ["true"]})),
            true,
            true,
        ),
        ep(
            M::POST,
            sb("/exec/stream"),
            Some(json!({"cmd": ["true"]})),
            true,
            true,
        ),
        ep(M::GET, sb("/files?path=/etc/passwd"), None, false, true),
        ep(M::DELETE, sb("/files?path=/tmp/x"), None, true, true),
        ep(M::GET, sb("/files/stat?path=/"), None, false, true),
        ep(M::GET, sb("/files/list?path=/"), None, false, true),
        ep(M::GET, sb("/files/glob?pattern=/*"), None, false, true),
        ep(
            M::POST,
            sb("/files/move"),
            Some(json!({"from": "/tmp/a", "to": "/tmp/b"})),
            true,
            true,
        ),
        ep(
            M::POST,
            sb("/files/chmod"),
            Some(json!({"path": "/tmp/a", "mode": "0644"})),
            true,
            true,
        ),
        ep(
            M::POST,
            sb("/files/mkdir"),
            Some(json!({"path": "/tmp/d", "parents": true})),
            true,
            true,
        ),
        ep(M::GET, "/v1/images".into(), None, false, false),
        ep(M::GET, "/v1/images/busybox".into(), None, false, false),
        ep(M::DELETE, "/v1/images/busybox".into(), None, true, false),
        ep(
            M::POST,
            "/v1/tenants".into(),
            Some(json!({"name": "intruder"})),
            true,
            false,
        ),
        ep(M::GET, "/v1/tenants".into(), None, false, false),
        ep(
            M::GET,
            format!("/v1/tenants/{tnt}/quota"),
            None,
            false,
            false,
        ),
        ep(
            M::PUT,
            format!("/v1/tenants/{tnt}/quota"),
            Some(json!({"max_sandboxes": 1})),
            true,
            false,
        ),
        ep(
            M::POST,
            "/v1/keys".into(),
            Some(json!({"tenant_id": tnt, "role": "admin", "name": "x"})),
            true,
            false,
        ),
        ep(M::GET, "/v1/keys".into(), None, false, false),
        ep(M::DELETE, format!("/v1/keys/{key}"), None, true, false),
        ep(M::GET, "/v1/audit".into(), None, false, false),
        ep(M::GET, "/v1/status".into(), None, false, false),
        ep(M::GET, "/v1/workers".into(), None, false, false),
        ep(
            M::POST,
            format!("/v1/workers/{wrk}/drain"),
            Some(json!({})),
            true,
            false,
        ),
    ];
    v.push(Endpoint {
        method: M::PUT,
        path: sb("/files?path=/tmp/x"),
        body: None,
        raw: Some(("application/octet-stream", b"payload".to_vec())),
        mutating: true,
        sandbox_scoped: true,
    });
    v.push(Endpoint {
        method: M::POST,
        path: "/v1/images?name=intruder".into(),
        body: None,
        raw: Some(("application/x-tar", vec![0u8; 1024])),
        mutating: true,
        sandbox_scoped: false,
    });
    v
}

async fn call(api: &Api, e: &Endpoint, request_id: &str) -> Result<Resp> {
    let mut rb = api
        .request(e.method.clone(), &e.path)
        .header("x-request-id", request_id);
    if let Some(b) = &e.body {
        rb = rb.json(b);
    }
    if let Some((ct, bytes)) = &e.raw {
        rb = rb.header("content-type", *ct).body(bytes.clone());
    }
    api.send(rb).await
}

/// A refusal the audit log must hold.
struct Expected {
    request_id: String,
    status: u16,
    tenant: Option<String>,
    what: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_refuses_bad_keys_with_an_audit_event_and_no_secret_leaks() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("proot")
            // Every attempt below comes from 127.0.0.1: keep the address limit out of the way.
            .arg("--auth-failures-per-minute")
            .arg("100000")
            // Debug logs for StacyVM's own crates make the "no key in the log" check stronger.
            .env(
                "STACYVM_LOG",
                "info,stacyvm_control_plane=debug,stacyvm_store=debug,stacyvm=debug",
            ),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant_a, member_a) = admin.tenant_with("member").await?;
    let (viewer_key_id, viewer) = admin.key(&tenant_a, "viewer").await?;
    let (revoked_id, revoked) = admin.key(&tenant_a, "member").await?;
    admin
        .delete(&format!("/v1/keys/{revoked_id}"))
        .await?
        .ok(204)?;
    let (tenant_b, member_b) = admin.tenant_with("member").await?;
    let wrong = admin.with_key(&format!("svm_{}", random_hex(40)));
    let anonymous = server.anonymous();

    let sbx = member_a.sandbox("proot").await?;
    let workers = admin.get("/v1/workers").await?.ok(200)?;
    let wrk = workers["workers"]
        .as_array()
        .and_then(|w| w.first())
        .map(|w| s(w, "id").map(str::to_owned))
        .ok_or_else(|| anyhow!("no worker: {workers}"))??;

    let secrets: Vec<String> = [&admin, &member_a, &viewer, &revoked, &member_b, &wrong]
        .iter()
        .map(|a| a.key_secret().to_owned())
        .collect();
    let list = endpoints(&sbx, &tenant_a, &viewer_key_id, &wrk);
    let mut expected = Vec::new();
    let mut bodies = Vec::new();
    let mut tried = 0usize;

    // (client, label, expected status and code, applies to, audit tenant)
    for e in &list {
        let mut cases: Vec<(&Api, &str, u16, &str, Option<String>)> = vec![
            (&anonymous, "no key", 401, "unauthenticated", None),
            (&wrong, "a wrong key", 401, "unauthenticated", None),
            (&revoked, "a revoked key", 401, "unauthenticated", None),
        ];
        if e.mutating {
            cases.push((
                &viewer,
                "a viewer key",
                403,
                "forbidden",
                Some(tenant_a.clone()),
            ));
        }
        if e.sandbox_scoped {
            cases.push((
                &member_b,
                "another tenant's key",
                404,
                "not_found",
                Some(tenant_b.clone()),
            ));
        }
        for (api, label, status, code, tenant) in cases {
            let rid = format!("sec-{}", random_hex(16));
            let what = format!("{} {} with {label}", e.method, e.path);
            let r = call(api, e, &rid).await.with_context(|| what.clone())?;
            tried += 1;
            let err = r.err(status, code).with_context(|| what.clone())?;
            ensure!(err.request_id == rid, "{what}: the request id is echoed");
            bodies.push(r.text());
            expected.push(Expected {
                request_id: rid,
                status,
                tenant,
                what,
            });
        }
    }
    // The other tenant does not even see the sandbox or its events.
    let theirs = member_b.get("/v1/sandboxes").await?.ok(200)?;
    ensure!(
        !theirs.to_string().contains(&sbx),
        "another tenant lists the sandbox: {theirs}"
    );
    let their_audit = member_b.audit("").await?;
    ensure!(
        their_audit
            .iter()
            .all(|e| e["tenant_id"] == tenant_b.as_str()),
        "another tenant reads foreign audit events"
    );
    // Nothing above changed anything: the sandbox still runs, the key still works.
    ensure!(member_a.sh(&sbx, "echo alive").await?.trim() == "alive");
    ensure!(viewer.get(&format!("/v1/sandboxes/{sbx}")).await?.status == 200);

    let denied = admin.audit("outcome=denied").await?;
    let by_rid: HashMap<&str, &Value> = denied
        .iter()
        .filter_map(|ev| ev["request_id"].as_str().map(|r| (r, ev)))
        .collect();
    for x in &expected {
        let ev = by_rid
            .get(x.request_id.as_str())
            .ok_or_else(|| anyhow!("no audit event for the refusal of {}", x.what))?;
        ensure!(ev["status"] == x.status, "{}: audited status: {ev}", x.what);
        ensure!(ev["outcome"] == "denied", "{}: {ev}", x.what);
        match &x.tenant {
            None => ensure!(
                ev["tenant_id"].is_null(),
                "{}: no tenant for no key: {ev}",
                x.what
            ),
            Some(t) => ensure!(ev["tenant_id"] == t.as_str(), "{}: tenant: {ev}", x.what),
        }
        ensure!(
            ev["source_ip"] == "127.0.0.1",
            "{}: source ip: {ev}",
            x.what
        );
    }
    eprintln!(
        "{tried} refused calls over {} endpoints, all audited as denied",
        list.len()
    );

    // No secret anywhere it could leak.
    let everything = admin.audit("").await?;
    let audit_dump = serde_json::to_string(&everything)?;
    let key_list = admin.get("/v1/keys").await?.ok(200)?.to_string();
    let log = server.log_all();
    for secret in &secrets {
        ensure!(
            !log.contains(secret.as_str()),
            "a key appears in the server log"
        );
        ensure!(
            !audit_dump.contains(secret.as_str()),
            "a key appears in the audit log"
        );
        ensure!(
            !key_list.contains(secret.as_str()),
            "GET /v1/keys shows a secret"
        );
        ensure!(
            bodies.iter().all(|b| !b.contains(secret.as_str())),
            "a key appears in an error body"
        );
        // Not even the hex part after the prefix (e.g. a truncated or re-encoded key).
        let tail = &secret[secret.len().saturating_sub(20)..];
        ensure!(
            !log.contains(tail),
            "part of a key appears in the server log"
        );
        ensure!(
            !audit_dump.contains(tail),
            "part of a key appears in the audit log"
        );
    }
    ensure!(
        log.contains("request"),
        "the log was captured: {}",
        server.log_tail(5)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_failures_are_rate_limited_per_address() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("proot")
            .arg("--auth-failures-per-minute")
            .arg("5"),
    )?;
    let wrong = server.admin().with_key(&format!("svm_{}", random_hex(40)));
    for i in 1..=5 {
        wrong
            .get("/v1/sandboxes")
            .await?
            .err(401, "unauthenticated")
            .with_context(|| format!("attempt {i}"))?;
    }
    let sixth = wrong.get("/v1/sandboxes").await?;
    sixth.err(429, "rate_limited")?;
    let retry: u64 = sixth
        .header("retry-after")
        .ok_or_else(|| anyhow!("a 429 has Retry-After"))?
        .parse()
        .context("Retry-After is a number of seconds")?;
    ensure!((1..=60).contains(&retry), "Retry-After {retry}");
    // An address that keeps guessing stays refused, whatever it sends.
    server
        .anonymous()
        .get("/v1/status")
        .await?
        .err(429, "rate_limited")?;
    // Health checks need no key and are not refused.
    ensure!(server.anonymous().get("/healthz").await?.status == 200);

    // The refusals are audited (read straight from the store: this address is blocked).
    let db = server.data_dir().join("stacyvm.db");
    ensure!(db.exists(), "the SQLite store is at {}", db.display());
    let text = crate::fixtures::sqlite3(
        &format!("file:{}?mode=ro", db.display()),
        "SELECT status, COUNT(*) FROM audit_events GROUP BY status ORDER BY status",
    )?;
    eprintln!("audit by status: {text}");
    ensure!(text.contains("401|5"), "five 401s audited: {text}");
    ensure!(text.contains("429|2"), "two 429s audited: {text}");
    Ok(())
}
