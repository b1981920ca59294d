//! Exposed ports: a server inside a sandbox without a network interface is
//! reached through the control plane (path form and host form), with the
//! sandbox's key, a signed token, or nothing for a public port; and the
//! relay reaches only the sandbox's own loopback.

use anyhow::{bail, ensure, Context, Result};
use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::support::{Api, Server, ServerOptions, StoreKind};

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
