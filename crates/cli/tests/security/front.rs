//! The HTTP front under abuse: slow request heads (slowloris), more
//! connections than the cap, a flood of bad keys from one address, forged
//! and proxied `X-Forwarded-For`, and what `/metrics` and `/v1/status`
//! tell a key that is not the operator's. Every test talks to a real
//! `stacyvm serve` over real TCP.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{random_hex, s, Api, Server, ServerOptions, StoreKind};

/// How long a test waits for the server to close a connection it should
/// close (far beyond the timeouts configured here).
const CLOSE_LIMIT: Duration = Duration::from_secs(60);

fn proot_server() -> ServerOptions {
    ServerOptions::new(StoreKind::Sqlite).providers("proot")
}

fn addr_of(server: &Server) -> Result<SocketAddr> {
    server
        .url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("unexpected server URL {}", server.url))?
        .parse()
        .context("the server URL's address")
}

/// Whether the server still holds `c` open: nothing to read yet, no end.
fn still_open(c: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Waits for the server to close `c`; false if it has not within `limit`.
async fn closed_by_server(mut c: TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let wait = async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, wait).await.is_ok()
}

/// One keep-alive `GET` on a raw connection: the status line and the body.
async fn raw_get(c: &mut TcpStream, path: &str) -> Result<(String, String)> {
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: stacyvm\r\n\r\n").as_bytes())
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = c.read(&mut buf).await?;
        ensure!(n > 0, "closed before the answer's head");
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .ok_or_else(|| anyhow!("no content-length in {head}"))?;
    while got.len() < head_end + len {
        let n = c.read(&mut buf).await?;
        ensure!(n > 0, "closed mid-body");
        got.extend_from_slice(&buf[..n]);
    }
    let status = head.lines().next().unwrap_or_default().to_owned();
    let body = String::from_utf8_lossy(&got[head_end..head_end + len]).into_owned();
    Ok((status, body))
}

/// The audit event of the request with id `request_id`, as an admin sees it.
async fn event_of(admin: &Api, query: &str, request_id: &str) -> Result<Value> {
    admin
        .audit(query)
        .await?
        .into_iter()
        .find(|e| e["request_id"] == request_id)
        .ok_or_else(|| anyhow!("no audit event ({query}) with request id {request_id}"))
}

/// Slowloris: 200 connections that send part of a request and stall (a few
/// keep trickling bytes) do not keep a real client from being served, and
/// the server closes every one of them after the header timeout.
#[tokio::test(flavor = "multi_thread")]
async fn slow_request_heads_are_dropped_while_real_clients_are_served() -> Result<()> {
    let server = Server::start(proot_server().arg("--header-timeout").arg("8"))?;
    let addr = addr_of(&server)?;
    let mut stalled = Vec::new();
    for i in 0..200 {
        let mut c = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connection {i}"))?;
        let part: &[u8] = match i % 3 {
            0 => b"GET /v1/sta",
            1 => b"GET /v1/status HTTP/1.1\r\nhost: stacyvm\r\n",
            _ => b"POST /v1/sandboxes HTTP/1.1\r\nhost: stacyvm\r\nauthorization: Bearer svm_",
        };
        c.write_all(part).await?;
        stalled.push(c);
    }
    // These add a byte to an endless header name every 300 ms: bytes alone
    // do not buy time, only a complete head does.
    let trickling: Vec<TcpStream> = stalled.split_off(180);
    let trickle = tokio::spawn(async move {
        let mut open = trickling;
        let mut closed = 0usize;
        let deadline = tokio::time::Instant::now() + CLOSE_LIMIT;
        while !open.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut still = Vec::new();
            for mut c in open {
                let gone = !still_open(&c) || c.write_all(b"x").await.is_err();
                if gone {
                    closed += 1;
                } else {
                    still.push(c);
                }
            }
            open = still;
        }
        closed
    });

    // A real client with a valid key is served while all of them are held.
    let admin = server.admin();
    let st = admin.get("/v1/status").await?.ok(200)?;
    ensure!(st["store"]["ok"] == true, "{st}");
    admin.get("/v1/sandboxes").await?.ok(200)?;
    let held = stalled.iter().filter(|c| still_open(c)).count();
    ensure!(
        held == stalled.len(),
        "only {held} of {} stalled connections were still open when the real client was served",
        stalled.len()
    );

    // Then the server drops every stalled connection by itself.
    let closed = join_all(
        stalled
            .into_iter()
            .map(|c| closed_by_server(c, CLOSE_LIMIT)),
    )
    .await;
    let kept = closed.iter().filter(|c| !**c).count();
    ensure!(
        kept == 0,
        "{kept} of 180 stalled connections were still open {CLOSE_LIMIT:?} after they stalled (--header-timeout 8)"
    );
    let trickled_closed = trickle.await.context("the trickling task")?;
    ensure!(
        trickled_closed == 20,
        "{} of 20 trickling connections were still open after {CLOSE_LIMIT:?}",
        20 - trickled_closed
    );
    // And keeps serving.
    admin.get("/v1/status").await?.ok(200)?;
    ensure!(
        !server.log_all().contains("panicked"),
        "the server panicked:\n{}",
        server.log_tail(40)
    );
    Ok(())
}

/// `--max-connections`: past the cap, new connections are not served (they
/// wait in the listen backlog) until a held one closes; then every waiting
/// one is served and the server carries on.
#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_wait_until_a_slot_frees() -> Result<()> {
    let server = Server::start(proot_server().arg("--max-connections").arg("8"))?;
    let addr = addr_of(&server)?;
    // Eight kept-alive connections, each answered once, so each holds a slot.
    let mut held = Vec::new();
    for i in 0..8 {
        let mut c = TcpStream::connect(addr).await?;
        let (status, _) = raw_get(&mut c, "/healthz")
            .await
            .with_context(|| format!("held connection {i}"))?;
        ensure!(status.starts_with("HTTP/1.1 200"), "{status}");
        held.push(c);
    }
    let waiting: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = TcpStream::connect(addr).await?;
                raw_get(&mut c, "/healthz").await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let served = waiting.iter().filter(|w| w.is_finished()).count();
    ensure!(
        served == 0,
        "{served} connections past --max-connections 8 were served while 8 were held"
    );
    for c in held.iter() {
        ensure!(still_open(c), "a held connection was closed");
    }
    // One slot frees: the waiting connections are served in turn, each
    // handing its slot on when it closes.
    drop(held.pop());
    for (i, w) in waiting.into_iter().enumerate() {
        let (status, body) = tokio::time::timeout(CLOSE_LIMIT, w)
            .await
            .with_context(|| format!("waiting connection {i} was never served"))?
            .context("the waiting task")??;
        ensure!(
            status.starts_with("HTTP/1.1 200") && body.contains("ok"),
            "{status} {body}"
        );
    }
    drop(held);
    server.admin().get("/v1/status").await?.ok(200)?;
    Ok(())
}

/// A flood of bad keys from one address is refused with 429 past the limit,
/// while valid keys from that same address keep working all along; every
/// refusal is audited.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_key_flood_never_locks_out_valid_keys_from_the_same_address() -> Result<()> {
    let server = Server::start(proot_server().arg("--auth-failures-per-minute").arg("5"))?;
    let admin = server.admin();
    let (tenant, member) = admin.tenant_with("member").await?;
    let wrong = server.client(&format!("svm_{}", random_hex(43)));
    for i in 0..30 {
        let r = wrong.get("/v1/sandboxes").await?;
        if i < 5 {
            r.err(401, "unauthenticated")
                .with_context(|| format!("bad key {i}"))?;
        } else {
            r.err(429, "rate_limited")
                .with_context(|| format!("bad key {i}"))?;
            let retry: u64 = r
                .header("retry-after")
                .ok_or_else(|| anyhow!("a 429 has Retry-After"))?
                .parse()
                .context("Retry-After is seconds")?;
            ensure!((1..=60).contains(&retry), "Retry-After {retry}");
        }
        member
            .get("/v1/sandboxes")
            .await?
            .ok(200)
            .with_context(|| format!("the member key after {} bad keys", i + 1))?;
    }
    // No key is a bad key too.
    server
        .anonymous()
        .get("/v1/sandboxes")
        .await?
        .err(429, "rate_limited")?;
    // A concurrent burst: bad keys all refused, valid ones all served.
    let bad = (0..40).map(|_| {
        let w = wrong.clone();
        async move { w.get("/v1/status").await.map(|r| r.status) }
    });
    let good = (0..20).map(|i| {
        let c = if i % 2 == 0 {
            member.clone()
        } else {
            admin.clone()
        };
        async move { c.get("/v1/status").await.map(|r| r.status) }
    });
    let (bad, good) = tokio::join!(join_all(bad), join_all(good));
    for r in bad {
        ensure!(r? == 429, "a bad key in the burst was not refused with 429");
    }
    for r in good {
        ensure!(r? == 200, "a valid key in the burst was refused");
    }
    let events = admin.audit("outcome=denied").await?;
    let of = |status: u64| {
        events
            .iter()
            .filter(|e| e["status"] == status && e["tenant_id"].is_null())
            .count()
    };
    ensure!(of(401) == 5, "five 401s audited: {events:?}");
    ensure!(
        of(429) == 25 + 1 + 40,
        "every 429 audited: {} of 66",
        of(429)
    );
    ensure!(
        events
            .iter()
            .filter(|e| e["status"] == 401 || e["status"] == 429)
            .all(|e| e["source_ip"] == "127.0.0.1"),
        "refusals record the address"
    );
    ensure!(
        events.iter().all(|e| e["tenant_id"] != tenant.as_str()),
        "no refusal was the member's"
    );
    Ok(())
}

/// `X-Forwarded-For` names the client only when the TCP peer is a trusted
/// proxy; the failed-auth limit counts that client and audit events record
/// it. From anyone else the header is ignored, and a malformed one never
/// fails the request.
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_counts_only_from_a_trusted_proxy() -> Result<()> {
    let server = Server::start(
        proot_server()
            .arg("--trusted-proxy")
            .arg("127.0.0.0/8")
            .arg("--auth-failures-per-minute")
            .arg("2"),
    )?;
    let admin = server.admin();
    let wrong = server.client(&format!("svm_{}", random_hex(43)));
    let call = |api: &Api, method: Method, path: &str, xff: &[u8], rid: &str| {
        api.request(method, path)
            .header(
                "x-forwarded-for",
                reqwest::header::HeaderValue::from_bytes(xff).expect("a header value"),
            )
            .header("x-request-id", rid)
    };

    // A forged entry on the left, the client the proxy saw on the right.
    let r = wrong
        .send(call(
            &wrong,
            Method::GET,
            "/v1/sandboxes",
            b"198.51.100.1, 203.0.113.7",
            "xff-1",
        ))
        .await?;
    r.err(401, "unauthenticated")?;
    let ev = event_of(&admin, "outcome=denied", "xff-1").await?;
    ensure!(ev["source_ip"] == "203.0.113.7", "{ev}");

    // The limit counts forwarded clients apart.
    wrong
        .send(call(
            &wrong,
            Method::GET,
            "/v1/sandboxes",
            b"203.0.113.7",
            "xff-2",
        ))
        .await?
        .err(401, "unauthenticated")?;
    wrong
        .send(call(
            &wrong,
            Method::GET,
            "/v1/sandboxes",
            b"203.0.113.7",
            "xff-3",
        ))
        .await?
        .err(429, "rate_limited")?;
    wrong
        .send(call(
            &wrong,
            Method::GET,
            "/v1/sandboxes",
            b"203.0.113.8",
            "xff-4",
        ))
        .await?
        .err(401, "unauthenticated")?;
    let ev = event_of(&admin, "outcome=denied", "xff-4").await?;
    ensure!(ev["source_ip"] == "203.0.113.8", "{ev}");

    // A successful call is recorded with the forwarded client too.
    admin
        .send(
            call(
                &admin,
                Method::POST,
                "/v1/tenants",
                b"203.0.113.50",
                "xff-5",
            )
            .json(&json!({"name": "forwarded"})),
        )
        .await?
        .ok(201)?;
    let ev = event_of(&admin, "action=tenant.create", "xff-5").await?;
    ensure!(ev["source_ip"] == "203.0.113.50", "{ev}");

    // Malformed headers never fail a call; the proxy's own address counts.
    for (i, raw) in [
        &b"not-an-address"[..],
        b"203.0.113.9, garbage",
        b",,,",
        b"",
        b"\xff\xfe203.0.113.9",
        b"999.1.1.1",
    ]
    .into_iter()
    .enumerate()
    {
        admin
            .send(call(
                &admin,
                Method::GET,
                "/v1/sandboxes",
                raw,
                &format!("bad-xff-{i}"),
            ))
            .await?
            .ok(200)
            .with_context(|| format!("X-Forwarded-For {raw:?}"))?;
    }
    admin
        .send(
            call(
                &admin,
                Method::POST,
                "/v1/tenants",
                b"203.0.113.9, garbage",
                "xff-6",
            )
            .json(&json!({"name": "malformed"})),
        )
        .await?
        .ok(201)?;
    let ev = event_of(&admin, "action=tenant.create", "xff-6").await?;
    ensure!(ev["source_ip"] == "127.0.0.1", "{ev}");

    // A server that does not trust this peer ignores the header entirely.
    let untrusting = Server::start(proot_server().arg("--trusted-proxy").arg("10.0.0.0/8"))?;
    let admin = untrusting.admin();
    let wrong = untrusting.client(&format!("svm_{}", random_hex(43)));
    wrong
        .send(call(
            &wrong,
            Method::GET,
            "/v1/sandboxes",
            b"203.0.113.7",
            "plain-1",
        ))
        .await?
        .err(401, "unauthenticated")?;
    let ev = event_of(&admin, "outcome=denied", "plain-1").await?;
    ensure!(
        ev["source_ip"] == "127.0.0.1",
        "a forged header was believed: {ev}"
    );
    admin
        .send(
            call(
                &admin,
                Method::POST,
                "/v1/tenants",
                b"203.0.113.50",
                "plain-2",
            )
            .json(&json!({"name": "direct"})),
        )
        .await?
        .ok(201)?;
    let ev = event_of(&admin, "action=tenant.create", "plain-2").await?;
    ensure!(
        ev["source_ip"] == "127.0.0.1",
        "a forged header was believed: {ev}"
    );
    Ok(())
}

/// `/metrics` needs an admin key (others get 401/403, audited) unless the
/// server runs with `--metrics-public`; `/healthz` and `/readyz` stay open.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_an_admin_key_unless_made_public() -> Result<()> {
    let server = Server::start(proot_server())?;
    let admin = server.admin();
    let (tenant, member) = admin.tenant_with("member").await?;
    let anon = server.anonymous();
    anon.get("/metrics").await?.err(401, "unauthenticated")?;
    server
        .client(&format!("svm_{}", random_hex(43)))
        .get("/metrics")
        .await?
        .err(401, "unauthenticated")?;
    member.get("/metrics").await?.err(403, "forbidden")?;
    let m = admin.get("/metrics").await?;
    ensure!(
        m.status == 200 && m.text().contains("stacyvm_http_requests_total"),
        "admin /metrics: {} {}",
        m.status,
        m.text()
    );
    anon.get("/healthz").await?.ok(200)?;
    anon.get("/readyz").await?.ok(200)?;
    let denied = admin.audit("action=metrics.get&outcome=denied").await?;
    ensure!(
        denied
            .iter()
            .any(|e| e["status"] == 401 && e["tenant_id"].is_null())
            && denied
                .iter()
                .any(|e| e["status"] == 403 && e["tenant_id"] == tenant.as_str()),
        "the refusals are audited: {denied:?}"
    );

    let public = Server::start(proot_server().arg("--metrics-public"))?;
    let m = public.anonymous().get("/metrics").await?;
    ensure!(
        m.status == 200 && m.text().contains("stacyvm_sandboxes"),
        "public /metrics: {} {}",
        m.status,
        m.text()
    );
    Ok(())
}

/// `/v1/status` shows the deployment (all tenants' sandboxes, workers,
/// pools) to admin keys only; a tenant's key sees its own sandboxes and
/// the providers.
#[tokio::test(flavor = "multi_thread")]
async fn status_shows_a_tenant_only_its_own_sandboxes() -> Result<()> {
    let server = Server::start(proot_server())?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member_a) = admin.tenant_with("member").await?;
    let (tenant_b, member_b) = admin.tenant_with("member").await?;
    let (_, viewer_b) = admin.key(&tenant_b, "viewer").await?;
    member_b.sandbox("proot").await?;
    member_b.sandbox("proot").await?;

    let all = admin.get("/v1/status").await?.ok(200)?;
    ensure!(all["sandboxes"]["running"] == 2, "{all}");
    ensure!(
        all["workers"].as_array().is_some_and(|w| w.len() == 1),
        "{all}"
    );

    let a = member_a.get("/v1/status").await?.ok(200)?;
    let counts = a["sandboxes"]
        .as_object()
        .ok_or_else(|| anyhow!("sandboxes: {a}"))?;
    ensure!(
        counts.contains_key("running") && counts.values().all(|n| n == 0),
        "tenant A sees other tenants' sandboxes: {a}"
    );
    ensure!(a["workers"] == json!([]) && a["pools"] == json!([]), "{a}");
    let providers = a["providers"]
        .as_array()
        .ok_or_else(|| anyhow!("providers: {a}"))?;
    ensure!(
        providers
            .iter()
            .any(|p| p["name"] == "proot" && p["healthy"] == true),
        "the provider list is shown: {a}"
    );
    ensure!(!s(&a, "version")?.is_empty(), "{a}");

    for (who, api) in [("member", &member_b), ("viewer", &viewer_b)] {
        let b = api.get("/v1/status").await?.ok(200)?;
        ensure!(b["sandboxes"]["running"] == 2, "tenant B's {who}: {b}");
        ensure!(b["workers"] == json!([]), "tenant B's {who}: {b}");
    }
    Ok(())
}

/// With very short header and idle timeouts, nothing in flight is cut — a
/// long exec, a streamed exec that is silent for a while, a slowly sent
/// upload, a log follow — while an idle connection is closed; and SIGTERM
/// still lets a call in flight finish.
#[tokio::test(flavor = "multi_thread")]
async fn short_timeouts_close_idle_connections_but_never_cut_a_call() -> Result<()> {
    let mut server = Server::start(
        proot_server()
            .arg("--header-timeout")
            .arg("1")
            .arg("--idle-timeout")
            .arg("2"),
    )?;
    let addr = addr_of(&server)?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    // Its own connections, never reused near the server's 2 s idle limit:
    // what is checked is that the server cuts no call, not the client's
    // pool racing the server's close of an idle connection.
    let member = member.with_pool_idle(Duration::from_millis(500));
    let id = member.sandbox("proot").await?;

    // An idle kept-alive connection is closed after the idle timeout.
    let mut idle = TcpStream::connect(addr).await?;
    let (status, _) = raw_get(&mut idle, "/healthz").await?;
    ensure!(status.starts_with("HTTP/1.1 200"), "{status}");
    ensure!(
        closed_by_server(idle, CLOSE_LIMIT).await,
        "an idle connection was kept past --idle-timeout 2"
    );

    let out = member
        .exec(&id, json!({"cmd": ["sh", "-c", "sleep 4; echo slow"]}))
        .await?;
    ensure!(out["stdout"] == "slow\n", "{out}");

    let mut sse = member
        .exec_stream(&id, json!({"cmd": ["sh", "-c", "echo a; sleep 4; echo b"]}))
        .await?
        .map_err(|r| anyhow!("exec/stream: {} {}", r.status, r.text()))?;
    let mut text = String::new();
    let mut exit = None;
    while let Some(e) = sse.next_event().await? {
        match e.event.as_str() {
            "stdout" => text.push_str(e.data["data"].as_str().unwrap_or_default()),
            "exit" => exit = Some(e.data),
            other => bail!("unexpected event {other}: {}", e.data),
        }
    }
    ensure!(text == "a\nb\n", "{text:?}");
    ensure!(exit.is_some_and(|x| x["exit_code"] == 0), "no clean exit");

    let chunks = futures_util::stream::unfold(0u8, |i| async move {
        if i == 4 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        Some((Ok::<_, std::io::Error>(vec![b'a' + i; 1000]), i + 1))
    });
    member
        .send(
            member
                .request(
                    Method::PUT,
                    &format!("/v1/sandboxes/{id}/files?path=/work/slow"),
                )
                .body(reqwest::Body::wrap_stream(chunks)),
        )
        .await?
        .ok(201)?;
    let back = member
        .get(&format!("/v1/sandboxes/{id}/files?path=/work/slow"))
        .await?;
    ensure!(
        back.body.len() == 4000 && back.body[3999] == b'd',
        "upload cut"
    );

    // A follower that sees nothing new for longer than both timeouts stays
    // connected, and ends with the sandbox.
    let follow = member
        .request(Method::GET, &format!("/v1/sandboxes/{id}/logs?follow=true"))
        .send()
        .await?;
    ensure!(follow.status() == 200, "follow: {}", follow.status());
    let mut follow = crate::support::Sse::from_response(follow);
    follow
        .next_event()
        .await?
        .ok_or_else(|| anyhow!("no first log line"))?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    member.destroy(&id).await?;
    let rest = follow.collect().await?;
    ensure!(
        rest.iter().any(|e| e.data["message"]
            .as_str()
            .is_some_and(|m| m.contains("destroyed"))),
        "the follow was cut before the sandbox ended: {rest:?}"
    );

    // SIGTERM while a call is in flight: it finishes, then the server exits 0.
    let id = member.sandbox("proot").await?;
    let mut sse = member
        .exec_stream(
            &id,
            json!({"cmd": ["sh", "-c", "echo started; sleep 3; echo done"]}),
        )
        .await?
        .map_err(|r| anyhow!("exec/stream: {} {}", r.status, r.text()))?;
    let first = sse
        .next_event()
        .await?
        .ok_or_else(|| anyhow!("no first event"))?;
    ensure!(first.data["data"] == "started\n", "{first:?}");
    let status = tokio::task::block_in_place(|| server.sigterm())?;
    ensure!(status.success(), "SIGTERM exit status: {status}");
    let rest = sse.collect().await?;
    ensure!(
        rest.iter().any(|e| e.data["data"] == "done\n")
            && rest.last().is_some_and(|e| e.event == "exit"),
        "the call in flight was cut by the shutdown: {rest:?}"
    );
    server.restart()?;
    server.client(member.key_secret()).destroy(&id).await?;
    Ok(())
}
