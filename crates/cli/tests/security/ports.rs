//! A member exposing a port reaches its own sandbox's loopback and nothing
//! else: not a port the host listens on (the server's own included), not
//! another sandbox (its own tenant's or another tenant's), whatever the
//! path, the Host header or the port number says; and the server in the
//! sandbox never sees the caller's key, a token or the server's secrets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Api, Server, ServerOptions, StoreKind};

const ECHO_HEAD: &str = include_str!("../api/port_servers/echo_head.sh");

/// Starts the head-echoing server on `port` inside the sandbox, answering
/// with `marker` first.
async fn start_echo(api: &Api, id: &str, port: u16, marker: &str) -> Result<()> {
    let r = api
        .put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/srv/echo.sh"),
            ECHO_HEAD.as_bytes().to_vec(),
        )
        .await?;
    ensure!(r.status / 100 == 2, "writing echo.sh: {}", r.status);
    let out = api
        .sh(
            id,
            &format!(
                "echo {marker} > /srv/marker && chmod +x /srv/echo.sh && \
                 setsid nc -ll -p {port} -e /srv/echo.sh </dev/null >/dev/null 2>&1 & \
                 i=0; while ! nc -z 127.0.0.1 {port} 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done; \
                 echo started"
            ),
        )
        .await?;
    ensure!(out.trim() == "started", "starting the server: {out}");
    Ok(())
}

/// One request written byte for byte (no client normalises its path or
/// Host), read until the server closes. Returns the status and the whole
/// answer.
async fn raw(addr: &str, head: &str) -> Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(head.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .map_err(|_| anyhow!("no answer to {head:?}"))??;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {text:?}"))?;
    Ok((status, text))
}

/// A listener on the host that counts the connections it gets and answers
/// each with a secret.
async fn host_listener(secret: &'static str) -> Result<(u16, Arc<AtomicUsize>)> {
    let l = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let port = l.local_addr()?.port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{secret}",
                secret.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    Ok((port, hits))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exposed_port_reaches_only_its_own_sandbox() -> Result<()> {
    let data = tempfile::Builder::new().prefix("svm-ports-").tempdir()?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,namespaces")
            .data_dir(data.path())
            .arg("--proxy-domain")
            .arg("sb.test"),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let addr = admin.base.trim_start_matches("http://").to_owned();
    let server_port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the server's port")?;
    const SECRET: &str = "HOST-LISTENER-SECRET";
    let (host_port, hits) = host_listener(SECRET).await?;

    let (_, member) = admin.tenant_with("member").await?;
    let (_, stranger) = admin.tenant_with("member").await?;
    for provider in ["docker", "namespaces"] {
        // Three sandboxes with a server on 8080 each: ours, a sibling of
        // the same tenant, and another tenant's.
        let mine = member.sandbox(provider).await?;
        let sibling = member.sandbox(provider).await?;
        let theirs = stranger.sandbox(provider).await?;
        start_echo(&member, &mine, 8080, "MINE").await?;
        start_echo(&member, &sibling, 8081, "SIBLING").await?;
        start_echo(&stranger, &theirs, 8080, "THEIRS").await?;
        for (api, id) in [(&member, &mine), (&stranger, &theirs)] {
            api.post(&format!("/v1/sandboxes/{id}/ports"), json!({"port": 8080}))
                .await?
                .ok(201)?;
        }
        let key = member.key_secret().to_owned();

        // The sibling listens on 8081, ours does not: our 8081 is our own
        // loopback's, where nothing answers.
        member
            .post(
                &format!("/v1/sandboxes/{mine}/ports"),
                json!({"port": 8081}),
            )
            .await?
            .ok(201)?;
        let r = member
            .get(&format!("/v1/sandboxes/{mine}/ports/8081/"))
            .await?;
        ensure!(
            r.status == 502 && !r.text().contains("SIBLING"),
            "{provider}: our 8081 reached the sibling: {} {}",
            r.status,
            r.text()
        );

        // Ports the host listens on, the server's own and another
        // listener's, are not the sandbox's: nothing answers there.
        for port in [server_port, host_port] {
            member
                .post(
                    &format!("/v1/sandboxes/{mine}/ports"),
                    json!({"port": port}),
                )
                .await?
                .ok(201)?;
            let r = member
                .get(&format!("/v1/sandboxes/{mine}/ports/{port}/healthz"))
                .await?;
            ensure!(
                r.status == 502 && !r.text().contains(SECRET),
                "{provider}: host port {port} answered: {} {}",
                r.status,
                r.text()
            );
        }

        // Another tenant's sandbox: not exposable, not reachable, no
        // token, by path or by host.
        member
            .post(
                &format!("/v1/sandboxes/{theirs}/ports"),
                json!({"port": 8080}),
            )
            .await?
            .err(404, "not_found")?;
        member
            .post(
                &format!("/v1/sandboxes/{theirs}/ports/8080/token"),
                json!({"ttl_seconds": 60}),
            )
            .await?
            .err(404, "not_found")?;
        let r = member
            .get(&format!("/v1/sandboxes/{theirs}/ports/8080/"))
            .await?;
        ensure!(
            r.status == 404 && !r.text().contains("THEIRS"),
            "{provider}: {} {}",
            r.status,
            r.text()
        );
        let (status, text) = raw(
            &addr,
            &format!(
                "GET / HTTP/1.1\r\nHost: 8080-{theirs}.sb.test\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await?;
        ensure!(
            status == 404 && !text.contains("THEIRS"),
            "{provider} host form: {text}"
        );
        // A token of our own port does not open theirs.
        let t = member
            .post(
                &format!("/v1/sandboxes/{mine}/ports/8080/token"),
                json!({"ttl_seconds": 600}),
            )
            .await?
            .ok(201)?;
        let token = t["token"].as_str().context("token")?.to_owned();
        let r = server
            .anonymous()
            .get(&format!(
                "/v1/sandboxes/{theirs}/ports/8080/?stacyvm_token={token}"
            ))
            .await?;
        ensure!(
            r.status == 401 && !r.text().contains("THEIRS"),
            "{provider}: {} {}",
            r.status,
            r.text()
        );

        // Steering: dot segments (plain and encoded), another Host,
        // absolute-form targets, forwarded-host headers, names under the
        // proxy domain that are not port addresses. Each request reaches our
        // own sandbox, is refused, or (a Host outside the proxy domain) is
        // the API's own; never the other tenant's sandbox or the host.
        enum Want {
            Mine,
            Refused,
            NotProxied,
        }
        let steer = [
            (format!("GET /v1/sandboxes/{mine}/ports/8080/../../../{theirs}/ports/8080/ HTTP/1.1\r\nHost: {addr}\r\n"), Want::Mine),
            (format!("GET /v1/sandboxes/{mine}/ports/8080/%2e%2e/%2e%2e/%2e%2e/{theirs}/ports/8080/ HTTP/1.1\r\nHost: {addr}\r\n"), Want::Mine),
            (format!("GET /v1/sandboxes/{mine}/ports/8080/ HTTP/1.1\r\nHost: 8080-{theirs}.sb.test\r\n"), Want::Refused),
            (format!("GET /v1/sandboxes/{mine}/ports/8080/ HTTP/1.1\r\nHost: 127.0.0.1:{host_port}\r\n"), Want::Mine),
            (format!("GET http://127.0.0.1:{host_port}/ HTTP/1.1\r\nHost: 8080-{mine}.sb.test\r\n"), Want::Mine),
            (format!("GET / HTTP/1.1\r\nHost: 8080-{mine}.sb.test\r\nX-Forwarded-Host: 8080-{theirs}.sb.test\r\n"), Want::Mine),
            (format!("GET / HTTP/1.1\r\nHost: {host_port}-{mine}.sb.test.127.0.0.1\r\n"), Want::NotProxied),
            (format!("GET /v1/whoami HTTP/1.1\r\nHost: 8080-{mine}.{theirs}.sb.test\r\n"), Want::Refused),
            (format!("GET / HTTP/1.1\r\nHost: 8080-{theirs}.sb.test:{host_port}\r\n"), Want::Refused),
            (format!("GET /v1/sandboxes/{mine}/ports/8080@127.0.0.1:{host_port}/ HTTP/1.1\r\nHost: {addr}\r\n"), Want::Refused),
        ];
        for (head, want) in &steer {
            let (status, text) = raw(
                &addr,
                &format!("{head}Authorization: Bearer {key}\r\nConnection: close\r\n\r\n"),
            )
            .await?;
            ensure!(
                !text.contains("THEIRS") && !text.contains(SECRET),
                "{provider}: {head:?} reached elsewhere: {text}"
            );
            let ok = match want {
                Want::Mine => status == 200 && text.contains("MINE"),
                Want::Refused => (400..500).contains(&status) && !text.contains("MINE"),
                Want::NotProxied => status < 500 && !text.contains("MINE"),
            };
            ensure!(ok, "{provider}: {head:?}: {text}");
        }

        // Port numbers that are not ports: 4xx, by path and by host (a
        // name under the proxy domain never reaches the API's own routes).
        for port in ["0", "65536", "-1", "99999999999", "8080x", "%38080"] {
            let (status, text) = raw(
                &addr,
                &format!(
                    "GET /v1/sandboxes/{mine}/ports/{port}/ HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
                ),
            )
            .await?;
            ensure!(
                (400..500).contains(&status),
                "{provider}: port {port:?}: {text}"
            );
            let (status, text) = raw(
                &addr,
                &format!(
                    "GET /v1/whoami HTTP/1.1\r\nHost: {port}-{mine}.sb.test\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
                ),
            )
            .await?;
            ensure!(
                (400..500).contains(&status) && !text.contains("MINE"),
                "{provider}: host port {port:?}: {text}"
            );
        }

        // What reaches the sandbox carries no credential of the caller's
        // and none of the server's.
        let (status, text) = raw(
            &addr,
            &format!(
                "GET /v1/sandboxes/{mine}/ports/8080/x?a=1&stacyvm_token={token} HTTP/1.1\r\nHost: {addr}\r\n\
                 Authorization: Bearer {key}\r\nX-API-Key: {key}\r\nProxy-Authorization: Basic eDp5\r\nConnection: close\r\n\r\n"
            ),
        )
        .await?;
        ensure!(status == 200 && text.contains("MINE"), "{provider}: {text}");
        let seen = text.split("MINE").nth(1).unwrap_or_default();
        ensure!(seen.contains("GET /x?a=1 "), "{provider}: the path: {seen}");
        for leaked in [
            key.as_str(),
            token.as_str(),
            server.admin_key.as_str(),
            "eDp5",
        ] {
            ensure!(
                !seen.contains(leaked),
                "{provider}: {leaked:?} reached the sandbox: {seen}"
            );
        }
        let lower = seen.to_ascii_lowercase();
        ensure!(
            !lower.contains("authorization") && !lower.contains("x-api-key"),
            "{provider}: credentials reached the sandbox: {seen}"
        );

        for (api, id) in [(&member, &mine), (&member, &sibling), (&stranger, &theirs)] {
            api.destroy(id).await?;
        }
    }
    ensure!(
        hits.load(Ordering::SeqCst) == 0,
        "the host listener was connected to {} times",
        hits.load(Ordering::SeqCst)
    );
    Ok(())
}
