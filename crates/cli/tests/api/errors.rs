//! Every error code of the API contract, provoked for real, with its status,
//! the `{"error": {"code", "message", "request_id"}}` body and the
//! `x-request-id` header checked each time.

use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::json;

use crate::support::{s, Server, ServerOptions, StoreKind};

#[tokio::test(flavor = "multi_thread")]
async fn invalid_request_is_400_with_the_documented_body() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;

    // The request id is echoed when the client sends one, in the header and the body.
    let rb = member
        .request(Method::POST, "/v1/sandboxes")
        .header("x-request-id", "api-test-echo-1")
        .header("content-type", "application/json")
        .body("{not json");
    let r = member.send(rb).await?;
    let e = r.err(400, "invalid_request")?;
    ensure!(
        e.request_id == "api-test-echo-1",
        "request id not echoed: {e:?}"
    );
    // A generated one otherwise.
    let r = member
        .post_raw(
            "/v1/sandboxes",
            "application/json",
            b"{\"image\": ".to_vec(),
        )
        .await?;
    let e = r.err(400, "invalid_request")?;
    ensure!(e.request_id != "api-test-echo-1", "{e:?}");

    let bad_creates = [
        json!({"image": 5}),
        json!({"image": "busybox", "cpu": "two"}),
        json!({"image": "busybox", "labels": ["not", "a", "map"]}),
        json!({}),
        json!({"provider": "proot"}),
        json!({"image": "busybox", "cpu": 0}),
        json!({"image": "busybox", "cpu": -1}),
        json!({"image": "busybox", "cpu": 1000}),
        json!({"image": "busybox", "memory_mb": 1}),
        json!({"image": "busybox", "memory_mb": 100_000_000}),
        json!({"image": "busybox", "timeout_s": 0}),
        json!({"image": "busybox", "timeout_s": 100_000_000}),
        json!({"image": "busybox", "network": "everywhere"}),
        json!({"image": "busybox", "workdir": "relative/dir"}),
        json!({"image": "busybox", "env": {"A=B": "x"}}),
        json!({"image": "busybox", "labels": {"bad key!": "x"}}),
    ];
    for body in bad_creates {
        let r = member.post("/v1/sandboxes", body.clone()).await?;
        r.err(400, "invalid_request")
            .map_err(|e| e.context(format!("create {body}")))?;
    }
    // An empty body, and a body that is JSON but not an object.
    member
        .post_raw("/v1/sandboxes", "application/json", Vec::new())
        .await?
        .err(400, "invalid_request")?;
    member
        .post_raw("/v1/sandboxes", "application/json", b"[1,2]".to_vec())
        .await?
        .err(400, "invalid_request")?;

    let id = member.sandbox("proot").await?;
    let base = format!("/v1/sandboxes/{id}");
    let bad_execs = [
        json!({"cmd": []}),
        json!({"cmd": "echo hi"}),
        json!({"cmd": [""]}),
        json!({"cmd": ["true"], "cwd": "relative"}),
        json!({"cmd": ["true"], "timeout_s": 0}),
        json!({"cmd": ["true"], "timeout_s": -5}),
        json!({"cmd": ["true"], "env": {"": "x"}}),
    ];
    for body in bad_execs {
        let r = member.post(&format!("{base}/exec"), body.clone()).await?;
        r.err(400, "invalid_request")
            .map_err(|e| e.context(format!("exec {body}")))?;
        let r = member
            .post(&format!("{base}/exec/stream"), body.clone())
            .await?;
        r.err(400, "invalid_request")
            .map_err(|e| e.context(format!("exec/stream {body}")))?;
    }

    // Paths: relative, NUL byte, missing; modes that are not octal permission bits.
    for q in [
        "path=relative/file",
        "path=%2Fwork%2Fa%00b",
        "path=",
        "mode=0644",
    ] {
        member
            .put_bytes(&format!("{base}/files?{q}"), b"x".to_vec())
            .await?
            .err(400, "invalid_request")?;
        if !q.starts_with("mode") {
            member
                .get(&format!("{base}/files?{q}"))
                .await?
                .err(400, "invalid_request")?;
            member
                .get(&format!("{base}/files/stat?{q}"))
                .await?
                .err(400, "invalid_request")?;
            member
                .delete(&format!("{base}/files?{q}"))
                .await?
                .err(400, "invalid_request")?;
        }
    }
    for mode in ["999", "abc", "0o777", "77777", "-1"] {
        let r = member
            .put_bytes(
                &format!("{base}/files?path=/work/m&mode={mode}"),
                b"x".to_vec(),
            )
            .await?;
        r.err(400, "invalid_request")
            .map_err(|e| e.context(format!("mode {mode}")))?;
        let r = member
            .post(
                &format!("{base}/files/chmod"),
                json!({"path": "/work", "mode": mode}),
            )
            .await?;
        r.err(400, "invalid_request")
            .map_err(|e| e.context(format!("chmod {mode}")))?;
    }
    member
        .post(&format!("{base}/files/mkdir"), json!({"path": "rel"}))
        .await?
        .err(400, "invalid_request")?;
    member
        .post(
            &format!("{base}/files/move"),
            json!({"from": "/work/a", "to": "b"}),
        )
        .await?
        .err(400, "invalid_request")?;
    member
        .post(
            &format!("{base}/files/move"),
            json!({"from": "/work/a\u{0}", "to": "/b"}),
        )
        .await?
        .err(400, "invalid_request")?;
    member
        .get(&format!("{base}/files/glob?pattern=*.py"))
        .await?
        .err(400, "invalid_request")?;
    member
        .get(&format!("{base}/files/glob"))
        .await?
        .err(400, "invalid_request")?;
    member
        .delete(&format!("{base}/files?path=/"))
        .await?
        .err(400, "invalid_request")?;
    // Reading a directory as a file.
    member
        .get(&format!("{base}/files?path=/work"))
        .await?
        .err(400, "invalid_request")?;

    // Timeouts and lists.
    member
        .post(&format!("{base}/timeout"), json!({"timeout_s": 0}))
        .await?
        .err(400, "invalid_request")?;
    member
        .post(&format!("{base}/timeout"), json!({"timeout_s": "soon"}))
        .await?
        .err(400, "invalid_request")?;
    member
        .get("/v1/sandboxes?limit=0")
        .await?
        .err(400, "invalid_request")?;
    member
        .get("/v1/sandboxes?limit=1001")
        .await?
        .err(400, "invalid_request")?;
    member
        .get("/v1/sandboxes?limit=many")
        .await?
        .err(400, "invalid_request")?;
    member
        .get("/v1/sandboxes?state=sleeping")
        .await?
        .err(400, "invalid_request")?;
    member
        .get("/v1/sandboxes?label=novalue")
        .await?
        .err(400, "invalid_request")?;
    member
        .get("/v1/audit?outcome=maybe")
        .await?
        .err(400, "invalid_request")?;
    member
        .get("/v1/audit?since=yesterday")
        .await?
        .err(400, "invalid_request")?;

    // Admin bodies.
    admin
        .post("/v1/tenants", json!({"name": ""}))
        .await?
        .err(400, "invalid_request")?;
    admin
        .post("/v1/tenants", json!({}))
        .await?
        .err(400, "invalid_request")?;
    let t = admin.tenant("t").await?;
    admin
        .post(
            "/v1/keys",
            json!({"tenant_id": t, "role": "superuser", "name": "k"}),
        )
        .await?
        .err(400, "invalid_request")?;
    admin
        .put(
            &format!("/v1/tenants/{t}/quota"),
            json!({"max_sandboxes": -1}),
        )
        .await?
        .err(400, "invalid_request")?;
    let r = admin
        .send(admin.request(Method::POST, "/v1/images").body(Vec::new()))
        .await?;
    r.err(400, "invalid_request")?;

    // A body that is not an object: serde would fill a struct from an array
    // of its fields, which no schema allows.
    for (path, body) in [
        (format!("/v1/tenants/{t}/quota"), json!([null, null])),
        ("/v1/tenants".to_owned(), json!(["a name"])),
        (format!("/v1/sandboxes/{id}/timeout"), json!([60])),
    ] {
        let method = if path.ends_with("/quota") {
            Method::PUT
        } else {
            Method::POST
        };
        let r = admin.send(admin.request(method, &path).json(&body)).await?;
        let e = r.err(400, "invalid_request")?;
        ensure!(e.message.contains("object"), "{path} {body}: {e:?}");
    }
    // Percent-encodings that are not UTF-8, in a path segment and in a query
    // value: the documented 400, not a plain-text rejection or a path with
    // U+FFFD in it.
    for path in [
        "/v1/images/%FF".to_owned(),
        "/v1/keys/%C3".to_owned(),
        format!("/v1/sandboxes/{id}/files/stat?path=/work/%FF"),
        format!("/v1/sandboxes/{id}/files?path=/work/%E2%82"),
    ] {
        let r = if path.starts_with("/v1/keys") {
            admin.delete(&path).await?
        } else {
            admin.get(&path).await?
        };
        r.err(400, "invalid_request")
            .with_context(|| format!("GET/DELETE {path}"))?;
    }
    // A mode that is not octal is refused wherever it is sent, not only by
    // the write that uses it.
    for op in ["files", "files/stat", "files/list"] {
        admin
            .get(&format!("/v1/sandboxes/{id}/{op}?path=/work&mode=9"))
            .await?
            .err(400, "invalid_request")
            .with_context(|| format!("{op} with mode=9"))?;
    }
    // A tenant's own list takes the same limits as the admin's.
    for limit in ["0", "1001"] {
        member
            .get(&format!("/v1/tenants?limit={limit}"))
            .await?
            .err(400, "invalid_request")
            .with_context(|| format!("a member's /v1/tenants?limit={limit}"))?;
    }

    // None of it left a sandbox behind except the one made on purpose.
    let all = member.get("/v1/sandboxes").await?.ok(200)?;
    ensure!(
        all["sandboxes"].as_array().map(Vec::len) == Some(1),
        "{all}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_and_forbidden() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    let anon = server.anonymous();

    // No key, a malformed header, an unknown key.
    let rb = anon
        .request(Method::GET, "/v1/sandboxes")
        .header("x-request-id", "api-test-nokey-1");
    let e = anon.send(rb).await?.err(401, "unauthenticated")?;
    ensure!(e.request_id == "api-test-nokey-1", "{e:?}");
    anon.post("/v1/sandboxes", json!({"image": "busybox"}))
        .await?
        .err(401, "unauthenticated")?;
    let rb = anon
        .request(Method::GET, "/v1/status")
        .header("authorization", "Basic dXNlcjpwYXNz");
    anon.send(rb).await?.err(401, "unauthenticated")?;
    let unknown = server.client("svm_thiskeywasnevermadebyanyone0000");
    unknown
        .get("/v1/sandboxes")
        .await?
        .err(401, "unauthenticated")?;
    server
        .client("")
        .get("/v1/status")
        .await?
        .err(401, "unauthenticated")?;

    // A revoked key is refused from then on.
    let tenant = admin.tenant("t").await?;
    let (key_id, member) = admin.key(&tenant, "member").await?;
    member.get("/v1/sandboxes").await?.ok(200)?;
    let keys = admin.get("/v1/keys").await?.ok(200)?;
    let listed = keys["keys"].as_array().cloned().unwrap_or_default();
    ensure!(listed.iter().any(|k| k["id"] == key_id.as_str()), "{keys}");
    ensure!(
        listed.iter().all(|k| k["key"].is_null()),
        "GET /v1/keys never shows secrets: {keys}"
    );
    admin.delete(&format!("/v1/keys/{key_id}")).await?.ok(204)?;
    member
        .get("/v1/sandboxes")
        .await?
        .err(401, "unauthenticated")?;
    admin
        .delete("/v1/keys/key_00000000000000000000000000000000")
        .await?
        .err(404, "not_found")?;

    // Roles: viewers read only, members stay inside their tenant.
    let (_, viewer) = admin.key(&tenant, "viewer").await?;
    let (_, member) = admin.key(&tenant, "member").await?;
    viewer.get("/v1/sandboxes").await?.ok(200)?;
    viewer
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot"}),
        )
        .await?
        .err(403, "forbidden")?;
    member
        .post("/v1/tenants", json!({"name": "nope"}))
        .await?
        .err(403, "forbidden")?;
    member
        .post(
            "/v1/keys",
            json!({"tenant_id": tenant, "role": "admin", "name": "escalate"}),
        )
        .await?
        .err(403, "forbidden")?;
    member
        .put(
            &format!("/v1/tenants/{tenant}/quota"),
            json!({"max_sandboxes": 1000}),
        )
        .await?
        .err(403, "forbidden")?;
    member.get("/v1/workers").await?.err(403, "forbidden")?;
    let rb = member
        .request(Method::POST, "/v1/images?name=mine")
        .header("content-type", "application/x-tar")
        .body(Vec::new());
    member.send(rb).await?.err(403, "forbidden")?;
    viewer
        .get(&format!("/v1/tenants/{tenant}/quota"))
        .await?
        .ok(200)?;
    // A viewer may look at its tenant's sandbox but change nothing in it.
    admin.import_busybox().await?;
    let id = member.sandbox("proot").await?;
    let base = format!("/v1/sandboxes/{id}");
    viewer.get(&base).await?.ok(200)?;
    viewer
        .get(&format!("{base}/files/list?path=/"))
        .await?
        .ok(200)?;
    viewer
        .post(&format!("{base}/exec"), json!({"cmd": ["true"]}))
        .await?
        .err(403, "forbidden")?;
    viewer
        .post(&format!("{base}/exec/stream"), json!({"cmd": ["true"]}))
        .await?
        .err(403, "forbidden")?;
    viewer
        .put_bytes(&format!("{base}/files?path=/work/v"), b"v".to_vec())
        .await?
        .err(403, "forbidden")?;
    viewer
        .post(&format!("{base}/files/mkdir"), json!({"path": "/work/v"}))
        .await?
        .err(403, "forbidden")?;
    viewer
        .delete(&format!("{base}/files?path=/etc/hostname"))
        .await?
        .err(403, "forbidden")?;
    viewer
        .post(&format!("{base}/timeout"), json!({"timeout_s": 60}))
        .await?
        .err(403, "forbidden")?;
    viewer
        .post(&format!("{base}/pause"), json!({}))
        .await?
        .err(403, "forbidden")?;
    viewer.delete(&base).await?.err(403, "forbidden")?;
    ensure!(
        member.get(&base).await?.ok(200)?["state"] == "running",
        "the viewer changed nothing"
    );

    // Refusals are audited: with no key, tenant_id is null and only admins see it.
    let denied = admin.audit("outcome=denied").await?;
    let nokey = denied
        .iter()
        .find(|e| e["request_id"] == "api-test-nokey-1")
        .ok_or_else(|| anyhow::anyhow!("the no-key refusal is not audited: {denied:?}"))?;
    ensure!(
        nokey["tenant_id"].is_null()
            && nokey["status"] == 401
            && nokey["actor"]["key_id"].is_null(),
        "{nokey}"
    );
    ensure!(
        denied.iter().any(|e| e["status"] == 403
            && e["tenant_id"] == tenant.as_str()
            && e["action"] == "sandbox.create"),
        "the viewer's refused create is audited: {denied:?}"
    );
    let seen_by_member = member.audit("outcome=denied").await?;
    ensure!(
        seen_by_member
            .iter()
            .all(|e| e["tenant_id"] == tenant.as_str()),
        "a member sees only its tenant's events"
    );
    ensure!(
        !seen_by_member
            .iter()
            .any(|e| e["request_id"] == "api-test-nokey-1"),
        "tenant-less events are admin-only"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn another_tenants_sandbox_is_404_and_audited() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant_a, alice) = admin.tenant_with("member").await?;
    let (tenant_b, bob) = admin.tenant_with("member").await?;
    let id = alice.sandbox("proot").await?;
    let base = format!("/v1/sandboxes/{id}");

    let rb = bob
        .request(Method::GET, &base)
        .header("x-request-id", "api-test-cross-1");
    let e = bob.send(rb).await?.err(404, "not_found")?;
    ensure!(
        !e.message.contains(&tenant_a),
        "the refusal does not name the owner: {e:?}"
    );
    bob.post(&format!("{base}/exec"), json!({"cmd": ["true"]}))
        .await?
        .err(404, "not_found")?;
    bob.post(&format!("{base}/exec/stream"), json!({"cmd": ["true"]}))
        .await?
        .err(404, "not_found")?;
    bob.get(&format!("{base}/files?path=/etc/hostname"))
        .await?
        .err(404, "not_found")?;
    bob.put_bytes(&format!("{base}/files?path=/work/x"), b"x".to_vec())
        .await?
        .err(404, "not_found")?;
    bob.post(&format!("{base}/timeout"), json!({"timeout_s": 60}))
        .await?
        .err(404, "not_found")?;
    bob.get(&format!("{base}/logs"))
        .await?
        .err(404, "not_found")?;
    bob.delete(&base).await?.err(404, "not_found")?;
    let (_, bob_viewer) = admin.key(&tenant_b, "viewer").await?;
    bob_viewer.get(&base).await?.err(404, "not_found")?;
    let listed = bob.get("/v1/sandboxes").await?.ok(200)?;
    ensure!(
        listed["sandboxes"].as_array().is_some_and(|l| l.is_empty()),
        "{listed}"
    );
    bob.get(&format!("/v1/tenants/{tenant_a}/quota"))
        .await?
        .err(404, "not_found")?;

    // Unknown ids: well-formed and not.
    for unknown in [
        "sbx_00000000000000000000000000000000",
        "sbx_nope",
        "not-an-id",
    ] {
        alice
            .get(&format!("/v1/sandboxes/{unknown}"))
            .await?
            .err(404, "not_found")?;
        alice
            .delete(&format!("/v1/sandboxes/{unknown}"))
            .await?
            .err(404, "not_found")?;
        alice
            .post(
                &format!("/v1/sandboxes/{unknown}/exec"),
                json!({"cmd": ["true"]}),
            )
            .await?
            .err(404, "not_found")?;
    }
    admin
        .get("/v1/images/no-such-image")
        .await?
        .err(404, "not_found")?;
    admin
        .get("/v1/no/such/endpoint")
        .await?
        .err(404, "not_found")?;

    // Still Alice's and still running.
    let sb = alice.get(&base).await?.ok(200)?;
    ensure!(sb["state"] == "running", "{sb}");
    let seen = admin.get(&base).await?.ok(200)?;
    ensure!(
        seen["tenant_id"] == tenant_a.as_str(),
        "admins see every tenant: {seen}"
    );

    // Every cross-tenant attempt is audited as denied under Bob's tenant.
    let denied = admin
        .audit(&format!("outcome=denied&sandbox_id={id}"))
        .await?;
    let first = denied
        .iter()
        .find(|e| e["request_id"] == "api-test-cross-1")
        .ok_or_else(|| anyhow::anyhow!("the cross-tenant GET is not audited: {denied:?}"))?;
    ensure!(
        first["tenant_id"] == tenant_b.as_str()
            && first["status"] == 404
            && first["action"] == "sandbox.get",
        "{first}"
    );
    ensure!(
        first["actor"]["role"] == "member" && s(&first["actor"], "key_id")?.starts_with("key_"),
        "{first}"
    );
    for action in [
        "sandbox.exec",
        "sandbox.exec_stream",
        "file.read",
        "file.write",
        "sandbox.destroy",
    ] {
        ensure!(
            denied
                .iter()
                .any(|e| e["action"] == action && e["tenant_id"] == tenant_b.as_str()),
            "no denied {action} event: {denied:?}"
        );
    }
    // Alice does not see Bob's attempts in her tenant's log; Bob does.
    ensure!(!alice
        .audit("outcome=denied")
        .await?
        .iter()
        .any(|e| e["tenant_id"] == tenant_b.as_str()));
    ensure!(bob
        .audit("outcome=denied")
        .await?
        .iter()
        .any(|e| e["request_id"] == "api-test-cross-1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicts_payload_limits_and_images() -> Result<()> {
    let server = Server::start_default()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("proot").await?;
    let base = format!("/v1/sandboxes/{id}");

    // Move onto an existing path without overwrite; then with it.
    member
        .put_bytes(&format!("{base}/files?path=/work/a"), b"A".to_vec())
        .await?
        .ok(201)?;
    member
        .put_bytes(&format!("{base}/files?path=/work/b"), b"B".to_vec())
        .await?
        .ok(201)?;
    member
        .post(
            &format!("{base}/files/move"),
            json!({"from": "/work/a", "to": "/work/b"}),
        )
        .await?
        .err(409, "conflict")?;
    let b = member.get(&format!("{base}/files?path=/work/b")).await?;
    ensure!(b.body == b"B", "a refused move changes nothing");
    member
        .post(
            &format!("{base}/files/move"),
            json!({"from": "/work/a", "to": "/work/b", "overwrite": true}),
        )
        .await?
        .ok(200)?;
    // A non-empty directory without recursive; then with it; then gone.
    member
        .put_bytes(
            &format!("{base}/files?path=/work/d/inner.txt"),
            b"x".to_vec(),
        )
        .await?
        .ok(201)?;
    member
        .delete(&format!("{base}/files?path=/work/d"))
        .await?
        .err(409, "conflict")?;
    member
        .delete(&format!("{base}/files?path=/work/d&recursive=true"))
        .await?
        .ok(204)?;
    member
        .delete(&format!("{base}/files?path=/work/d"))
        .await?
        .err(404, "not_found")?;
    member
        .get(&format!("{base}/files?path=/work/missing"))
        .await?
        .err(404, "not_found")?;

    // A JSON body over 10 MiB, with a Content-Length and chunked.
    let mut big = b"{\"image\": \"busybox\", \"labels\": {\"pad\": \"".to_vec();
    big.resize(10 * 1024 * 1024 + 100, b'x');
    big.extend_from_slice(b"\"}}");
    member
        .post_raw("/v1/sandboxes", "application/json", big.clone())
        .await?
        .err(413, "payload_too_large")?;
    let chunks: Vec<std::result::Result<Vec<u8>, std::io::Error>> =
        big.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let rb = member
        .request(Method::POST, &format!("{base}/exec"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )));
    member.send(rb).await?.err(413, "payload_too_large")?;

    // Unknown images on both providers: 422, and no sandbox is left running.
    for provider in ["proot", "docker"] {
        let r = member
            .post(
                "/v1/sandboxes",
                json!({"image": "no-such-image-anywhere", "provider": provider}),
            )
            .await?;
        r.err(422, "image_not_found")
            .map_err(|e| e.context(provider))?;
    }
    let live = member.get("/v1/sandboxes?state=running").await?.ok(200)?;
    ensure!(
        live["sandboxes"].as_array().map(Vec::len) == Some(1),
        "{live}"
    );

    // A destroyed sandbox refuses exec, streams, files and timeouts with 409.
    member.destroy(&id).await?;
    member
        .post(&format!("{base}/exec"), json!({"cmd": ["true"]}))
        .await?
        .err(409, "conflict")?;
    match member.exec_stream(&id, json!({"cmd": ["true"]})).await? {
        Ok(_) => anyhow::bail!("a stream on a destroyed sandbox must be refused"),
        Err(r) => {
            r.err(409, "conflict")?;
        }
    }
    member
        .put_bytes(&format!("{base}/files?path=/work/x"), b"x".to_vec())
        .await?
        .err(409, "conflict")?;
    member
        .get(&format!("{base}/files/list?path=/"))
        .await?
        .err(409, "conflict")?;
    member
        .post(&format!("{base}/timeout"), json!({"timeout_s": 60}))
        .await?
        .err(409, "conflict")?;
    member
        .post(&format!("{base}/pause"), json!({}))
        .await?
        .err(409, "conflict")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_exceeded_and_rate_limited() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let quota = admin
        .put(
            &format!("/v1/tenants/{tenant}/quota"),
            json!({"max_sandboxes": 1, "max_timeout_s": 300, "max_exec_per_minute": 3, "max_cpu": null,
                   "allowed_providers": ["proot"]}),
        )
        .await?
        .ok(200)?;
    ensure!(
        quota["max_exec_per_minute"] == 3 && quota["max_timeout_s"] == 300,
        "{quota}"
    );
    let got = member
        .get(&format!("/v1/tenants/{tenant}/quota"))
        .await?
        .ok(200)?;
    ensure!(
        got == quota,
        "GET returns the quota in force: {got} vs {quota}"
    );

    member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot", "timeout_s": 301}),
        )
        .await?
        .err(429, "quota_exceeded")?;
    let id = member.sandbox("proot").await?;
    member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot"}),
        )
        .await?
        .err(429, "quota_exceeded")?;
    member
        .post(
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout_s": 301}),
        )
        .await?
        .err(429, "quota_exceeded")?;

    // CPU and memory count what live sandboxes hold.
    let (cpu_tenant, cpu_member) = admin.tenant_with("member").await?;
    admin
        .put(
            &format!("/v1/tenants/{cpu_tenant}/quota"),
            json!({"max_cpu": 1.5, "max_memory_mb": 700, "allowed_providers": ["proot"]}),
        )
        .await?
        .ok(200)?;
    let first = cpu_member
        .create_sandbox(
            json!({"image": "busybox", "provider": "proot", "cpu": 1, "memory_mb": 256}),
        )
        .await?;
    cpu_member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot", "cpu": 1, "memory_mb": 256}),
        )
        .await?
        .err(429, "quota_exceeded")?;
    cpu_member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot", "cpu": 0.5, "memory_mb": 512}),
        )
        .await?
        .err(429, "quota_exceeded")?;
    let second = cpu_member
        .create_sandbox(
            json!({"image": "busybox", "provider": "proot", "cpu": 0.5, "memory_mb": 444}),
        )
        .await?;
    cpu_member.destroy(s(&first, "id")?).await?;
    cpu_member.destroy(s(&second, "id")?).await?;

    for _ in 0..3 {
        member.sh(&id, "true").await?;
    }
    let r = member
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await?;
    r.err(429, "rate_limited")?;
    let retry = r
        .header("retry-after")
        .ok_or_else(|| anyhow::anyhow!("a 429 rate_limited has no Retry-After"))?;
    let secs: u64 = retry
        .parse()
        .map_err(|_| anyhow::anyhow!("Retry-After {retry:?} is not whole seconds"))?;
    ensure!((1..=60).contains(&secs), "Retry-After {secs}");
    // The limit is per tenant: another tenant still runs commands.
    let (_, other) = admin.tenant_with("member").await?;
    let other_id = other.sandbox("proot").await?;
    other.sh(&other_id, "true").await?;

    let denied = admin.audit("outcome=denied").await?;
    ensure!(
        denied
            .iter()
            .filter(|e| e["status"] == 429 && e["tenant_id"] == tenant.as_str())
            .count()
            >= 4,
        "429s are audited: {denied:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unconfigured_and_unhealthy_providers() -> Result<()> {
    // A provider that is not configured is a bad request.
    let proot_only = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = proot_only.admin();
    admin.import_busybox().await?;
    admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "docker"}),
        )
        .await?
        .err(400, "invalid_request")?;
    admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "firecracker"}),
        )
        .await?
        .err(400, "invalid_request")?;
    drop(proot_only);

    // A configured provider that cannot work: 503 provider_unavailable, and not ready.
    let broken = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
    )?;
    let admin = broken.admin();
    admin.import_busybox().await?;
    admin
        .post("/v1/sandboxes", json!({"image": "busybox"}))
        .await?
        .err(503, "provider_unavailable")?;
    admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "docker"}),
        )
        .await?
        .err(503, "provider_unavailable")?;
    broken
        .anonymous()
        .get("/readyz")
        .await?
        .err(503, "provider_unavailable")?;
    broken.anonymous().get("/healthz").await?.ok(200)?;
    let status = admin.get("/v1/status").await?.ok(200)?;
    let docker = status["providers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "docker"))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("docker missing from status: {status}"))?;
    ensure!(
        docker["healthy"] == false && !s(&docker, "detail")?.is_empty(),
        "{docker}"
    );
    let live = admin.get("/v1/sandboxes?state=running").await?.ok(200)?;
    ensure!(
        live["sandboxes"].as_array().is_some_and(|l| l.is_empty()),
        "{live}"
    );
    Ok(())
}

/// A runtime frozen behind the server's back (`docker pause` on its
/// container) cannot finish an exec: the call ends with `504 timeout`
/// instead of hanging, and the sandbox works again once thawed.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_runtime_gives_504_timeout() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let id = admin.sandbox("docker").await?;
    admin.sh(&id, "true").await?;
    let containers = crate::support::docker_containers_of(&id)?;
    ensure!(containers.len() == 1, "{containers:?}");
    let docker = |verb: &str| -> Result<()> {
        let out = std::process::Command::new("docker")
            .args([verb, &containers[0]])
            .output()?;
        ensure!(
            out.status.success(),
            "docker {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    docker("pause")?;
    let r = admin
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"], "timeout_s": 1}),
        )
        .await;
    docker("unpause")?;
    r?.err(504, "timeout")?;
    admin.sh(&id, "echo thawed").await?;
    Ok(())
}
