//! Exposed ports: a server inside a sandbox without a network interface is
//! reached through the control plane (path form and host form), with the
//! sandbox's key, a signed token, or nothing for a public port; and the
//! relay reaches only the sandbox's own loopback.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::{eventually, Api, Server, ServerOptions, StoreKind};

/// Bound on waiting for bytes that should come: a relay that holds them
/// back fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

/// Small servers for `nc -ll -e` inside the sandbox (busybox has no
/// WebSocket or chunked-encoding server of its own).
const SERVERS: &[(&str, u16, &str)] = &[
    ("ws", 9001, include_str!("port_servers/ws.sh")),
    ("chunks", 9002, include_str!("port_servers/chunks.sh")),
    ("upload", 9003, include_str!("port_servers/upload.sh")),
];

/// Starts `busybox httpd` on `port` inside the sandbox, serving a small
/// index and a 12 MiB random file; returns the file's SHA-256.
async fn start_httpd(api: &Api, id: &str, port: u16) -> Result<String> {
    let script = format!(
        "mkdir -p /www && echo hello-from-the-sandbox > /www/index.html && \
         head -c 12582912 /dev/urandom > /www/big && \
         setsid busybox httpd -f -p 127.0.0.1:{port} -h /www </dev/null >/dev/null 2>&1 & \
         i=0; while ! nc -z 127.0.0.1 {port} 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done; \
         sha256sum /www/big | cut -d' ' -f1"
    );
    let out = api.sh(id, &script).await?;
    Ok(out.trim().to_owned())
}

async fn start_servers(api: &Api, id: &str) -> Result<()> {
    for (name, _, body) in SERVERS {
        let r = api
            .put_bytes(
                &format!("/v1/sandboxes/{id}/files?path=/srv/{name}.sh"),
                body.as_bytes().to_vec(),
            )
            .await?;
        ensure!(
            r.status / 100 == 2,
            "writing {name}.sh: {} {}",
            r.status,
            r.text()
        );
    }
    let mut script = String::from("chmod +x /srv/*.sh && ");
    for (name, port, _) in SERVERS {
        script.push_str(&format!(
            "setsid nc -ll -p {port} -e /srv/{name}.sh </dev/null >/dev/null 2>&1 & \
             i=0; while ! nc -z 127.0.0.1 {port} 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done; "
        ));
    }
    script.push_str("echo started");
    let out = api.sh(id, &script).await?;
    ensure!(out.trim() == "started", "starting the servers: {out}");
    Ok(())
}

/// A WebSocket through the proxy at `url` (ws://…), with `key` if given.
async fn websocket_echo(url: &str, key: Option<&str>, what: &str) -> Result<()> {
    let mut req = url.into_client_request()?;
    if let Some(key) = key {
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse()?);
    }
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tungstenite::Error::Http(resp)) => bail!(
            "{what}: the upgrade was refused: {} {}",
            resp.status(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        ),
        Err(e) => bail!("{what}: {e}"),
    };
    for msg in [
        Message::Text("hello over websocket".into()),
        Message::Binary(vec![0u8, 1, 2, 0xfe, 0xff].into()),
    ] {
        ws.send(msg.clone()).await?;
        let back = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .map_err(|_| anyhow!("{what}: no echo within {PATIENCE:?}"))?
            .context("the socket ended")??;
        ensure!(back == msg, "{what}: sent {msg:?}, got {back:?}");
    }
    ws.close(None).await?;
    Ok(())
}

/// Streaming through the proxy: a chunked answer arrives part by part, a
/// large upload reaches the server while it is still being sent, and a
/// WebSocket echoes both ways (path form and host form).
async fn streams(server: &Server, api: &Api, id: &str, provider: &str) -> Result<()> {
    start_servers(api, id).await?;
    for port in [9001, 9002, 9003] {
        api.post(&format!("/v1/sandboxes/{id}/ports"), json!({"port": port}))
            .await?
            .ok(201)?;
    }

    // Chunked: the second part waits for /tmp/go, which is only made once
    // the first part has arrived.
    let resp = tokio::time::timeout(
        PATIENCE,
        api.request(Method::GET, &format!("/v1/sandboxes/{id}/ports/9002/"))
            .send(),
    )
    .await
    .map_err(|_| anyhow!("{provider}: the chunked answer was held back"))?
    .with_context(|| format!("{provider}: the chunked answer"))?;
    ensure!(
        resp.status() == 200,
        "{provider} chunked: {}",
        resp.status()
    );
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while !got.ends_with(b"first\n") {
        let chunk = tokio::time::timeout(PATIENCE, body.next())
            .await
            .map_err(|_| anyhow!("{provider}: the first chunk was held back"))?
            .context("the body ended before its first chunk")??;
        got.extend_from_slice(&chunk);
    }
    ensure!(
        got == b"first\n",
        "{provider}: {:?}",
        String::from_utf8_lossy(&got)
    );
    api.sh(id, "touch /tmp/go").await?;
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.next())
        .await
        .map_err(|_| anyhow!("{provider}: the second chunk never came"))?
    {
        got.extend_from_slice(&chunk?);
    }
    ensure!(
        got == b"first\nsecond\n",
        "{provider}: {:?}",
        String::from_utf8_lossy(&got)
    );

    // Upload: half of 12 MiB, then wait until the server holds most of it,
    // then the rest; a relay that buffered the body would never let it see
    // the first half.
    const HALF: usize = 6 << 20;
    let data: Vec<u8> = (0..2 * HALF).map(|i| (i * 7 + i / 4093) as u8).collect();
    let want = sha256_hex(&data);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let rb = api
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{id}/ports/9003/upload"),
        )
        .header("content-length", data.len().to_string())
        .body(reqwest::Body::wrap_stream(futures_util::stream::poll_fn(
            move |cx| rx.poll_recv(cx),
        )));
    let call = tokio::spawn(async move {
        let r = rb.send().await?;
        let status = r.status().as_u16();
        Ok::<_, anyhow::Error>((status, r.text().await?))
    });
    for part in data[..HALF].chunks(64 * 1024) {
        tx.send(Ok(part.to_vec())).await?;
    }
    eventually(PATIENCE, "the first half of the upload inside", || async {
        let n = api
            .sh(id, "stat -c %s /tmp/up 2>/dev/null || echo 0")
            .await?;
        let n: usize = n.trim().parse().unwrap_or(0);
        Ok((n >= HALF / 2).then_some(()))
    })
    .await
    .with_context(|| format!("{provider}: the upload was not streamed"))?;
    for part in data[HALF..].chunks(64 * 1024) {
        tx.send(Ok(part.to_vec())).await?;
    }
    drop(tx);
    let (status, text) = tokio::time::timeout(PATIENCE, call)
        .await
        .map_err(|_| anyhow!("{provider}: the upload got no answer"))???;
    ensure!(status == 200, "{provider} upload: {status} {text}");
    ensure!(
        text == want,
        "{provider}: the upload arrived as {text}, not {want}"
    );

    // WebSocket, path form with the key, and host form (public).
    let ws_base = api.base.replacen("http", "ws", 1);
    websocket_echo(
        &format!("{ws_base}/v1/sandboxes/{id}/ports/9001/"),
        Some(api.key_secret()),
        provider,
    )
    .await?;
    api.post(
        &format!("/v1/sandboxes/{id}/ports"),
        json!({"port": 9001, "public": true}),
    )
    .await?
    .ok(201)?;
    let addr = server.admin().base.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await?;
    let mut req = format!("ws://{addr}/").into_client_request()?;
    req.headers_mut()
        .insert("host", format!("9001-{id}.sb.test").parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .with_context(|| format!("{provider}: the host-form upgrade"))?;
    ws.send(Message::Text("by host".into())).await?;
    let back = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .map_err(|_| anyhow!("{provider}: no echo by host"))?
        .context("the socket ended")??;
    ensure!(back == Message::Text("by host".into()), "{back:?}");
    ws.close(None).await?;
    Ok(())
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

async fn exercise(server: &Server, provider: &str) -> Result<()> {
    let admin = server.admin();
    let (tenant, member) = admin.tenant_with("member").await?;
    let (_, other) = admin.tenant_with("member").await?;
    let anon = server.anonymous();
    let s = member
        .create_sandbox(json!({"image": "busybox", "provider": provider, "network": "none"}))
        .await?;
    let id = s["id"].as_str().context("sandbox id")?.to_owned();
    let want = start_httpd(&member, &id, 8080).await?;
    ensure!(want.len() == 64, "{provider}: sha256sum said {want:?}");
    streams(server, &member, &id, provider).await?;

    // Out of range and bad bodies.
    for bad in [
        json!({"port": 0}),
        json!({"port": 65536}),
        json!({"port": -5}),
    ] {
        member
            .post(&format!("/v1/sandboxes/{id}/ports"), bad)
            .await?
            .err(400, "invalid_request")?;
    }
    // A viewer may not expose.
    let (_, viewer) = admin.key(&tenant, "viewer").await?;
    viewer
        .post(&format!("/v1/sandboxes/{id}/ports"), json!({"port": 8080}))
        .await?
        .err(403, "forbidden")?;

    let exposed = member
        .post(&format!("/v1/sandboxes/{id}/ports"), json!({"port": 8080}))
        .await?
        .ok(201)?;
    ensure!(exposed["port"] == 8080, "{exposed}");
    // With a proxy domain the answer gives the host form; the path form
    // works as well.
    let host_url = exposed["url"].as_str().context("url")?.to_owned();
    ensure!(
        host_url == format!("http://8080-{id}.sb.test/"),
        "{host_url}"
    );
    let url = format!("/v1/sandboxes/{id}/ports/8080/");
    let listed = member
        .get(&format!("/v1/sandboxes/{id}/ports"))
        .await?
        .ok(200)?;
    ensure!(listed["ports"][0]["port"] == 8080, "{listed}");

    // Path form with the key.
    let r = member.get(&format!("{url}index.html")).await?;
    ensure!(r.status == 200, "{provider}: {} {}", r.status, r.text());
    ensure!(r.text() == "hello-from-the-sandbox\n", "{}", r.text());
    // A large download, streamed, checked by hash.
    let r = member.get(&format!("{url}big")).await?;
    ensure!(r.status == 200, "{provider}: {}", r.status);
    ensure!(
        sha256_hex(&r.body) == want,
        "{provider}: the 12 MiB download differs"
    );
    // Keep-alive: several requests on the same client connection pool.
    for _ in 0..3 {
        let r = member.get(&format!("{url}index.html")).await?;
        ensure!(r.status == 200, "keep-alive: {}", r.status);
    }

    // Private: no key 401, another tenant's key 404.
    anon.get(&format!("{url}index.html"))
        .await?
        .err(401, "unauthenticated")?;
    other
        .get(&format!("{url}index.html"))
        .await?
        .err(404, "not_found")?;
    // A read-only key does not reach a private port: what answers there
    // may change the sandbox.
    viewer
        .get(&format!("{url}index.html"))
        .await?
        .err(403, "forbidden")?;
    let audited = admin
        .audit(&format!("sandbox_id={id}&action=port.expose"))
        .await?;
    ensure!(
        audited.iter().any(|e| e["outcome"] == "ok"),
        "{provider}: port.expose not audited: {audited:?}"
    );
    // Signed token: 200; expired (or forged) 401.
    let t = member
        .post(
            &format!("/v1/sandboxes/{id}/ports/8080/token"),
            json!({"ttl_seconds": 600}),
        )
        .await?
        .ok(201)?;
    let token = t["token"].as_str().context("token")?.to_owned();
    let r = anon
        .get(&format!("{url}index.html?stacyvm_token={token}"))
        .await?;
    ensure!(r.status == 200, "token: {} {}", r.status, r.text());
    let (_, mac) = token.split_once('.').context("token shape")?;
    anon.get(&format!("{url}index.html?stacyvm_token=1.{mac}"))
        .await?
        .err(401, "unauthenticated")?;
    anon.get(&format!("{url}index.html?stacyvm_token=99999999999.{mac}"))
        .await?
        .err(401, "unauthenticated")?;

    // Public: nothing needed.
    member
        .post(
            &format!("/v1/sandboxes/{id}/ports"),
            json!({"port": 8080, "public": true}),
        )
        .await?
        .ok(201)?;
    let r = anon.get(&format!("{url}index.html")).await?;
    ensure!(r.status == 200, "public: {} {}", r.status, r.text());
    let r = viewer.get(&format!("{url}index.html")).await?;
    ensure!(r.status == 200, "public, viewer: {} {}", r.status, r.text());

    // Host form: Host {port}-{id}.DOMAIN at the server's own address.
    let rb = anon
        .request(Method::GET, "/index.html")
        .header("host", format!("8080-{id}.sb.test"));
    let r = anon.send(rb).await?;
    ensure!(
        r.status == 200 && r.text() == "hello-from-the-sandbox\n",
        "host form: {} {}",
        r.status,
        r.text()
    );

    // Nothing listening: a 502 with a JSON body.
    member
        .post(&format!("/v1/sandboxes/{id}/ports"), json!({"port": 8081}))
        .await?
        .ok(201)?;
    let r = member
        .get(&format!("/v1/sandboxes/{id}/ports/8081/"))
        .await?;
    ensure!(r.status == 502, "{} {}", r.status, r.text());
    ensure!(
        r.json()?["error"]["code"] == "provider_unavailable",
        "{}",
        r.text()
    );

    // Containment: a port the host listens on (the server's own) is not
    // reached from inside the sandbox's loopback.
    let host_port: u16 = server
        .admin()
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("server port")?;
    member
        .post(
            &format!("/v1/sandboxes/{id}/ports"),
            json!({"port": host_port}),
        )
        .await?
        .ok(201)?;
    let r = member
        .get(&format!("/v1/sandboxes/{id}/ports/{host_port}/healthz"))
        .await?;
    ensure!(
        r.status == 502,
        "{provider}: the host's port answered: {} {}",
        r.status,
        r.text()
    );
    // The API takes no host: an extra field is refused.
    member
        .post(
            &format!("/v1/sandboxes/{id}/ports"),
            json!({"port": 8080, "host": "10.0.0.1"}),
        )
        .await?
        .err(400, "invalid_request")?;

    // Removal, and destroy forgets exposures.
    let r = member
        .delete(&format!("/v1/sandboxes/{id}/ports/8081"))
        .await?;
    ensure!(r.status == 204, "remove: {} {}", r.status, r.text());
    member.destroy(&id).await?;
    // The public exposure went with the sandbox: anonymous callers are
    // asked for a key, the tenant's key finds nothing.
    anon.get(&format!("{url}index.html"))
        .await?
        .err(401, "unauthenticated")?;
    let r = member.get(&format!("{url}index.html")).await?;
    ensure!(r.status == 404, "after destroy: {} {}", r.status, r.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn exposed_ports_on_docker_and_namespaces() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,namespaces,proot")
            .arg("--proxy-domain")
            .arg("sb.test"),
    )?;
    server.admin().import_busybox().await?;
    for provider in ["docker", "namespaces"] {
        exercise(&server, provider).await?;
    }
    // PRoot shares the host's loopback: refused.
    let (_, member) = server.admin().tenant_with("member").await?;
    let id = member.sandbox("proot").await?;
    let r = member
        .post(&format!("/v1/sandboxes/{id}/ports"), json!({"port": 8080}))
        .await?;
    if r.status != 409 {
        bail!("proot: {} {}", r.status, r.text());
    }
    member.destroy(&id).await?;
    Ok(())
}
