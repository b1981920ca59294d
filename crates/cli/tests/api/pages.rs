//! The browser pages (`/ui`, `/docs`) and `GET /v1/whoami`, which the
//! console reads to show only what its key may do. The pages' behaviour in
//! a real browser is tested by `tests/ui` (headless Chromium).

use anyhow::{ensure, Result};

use crate::support::{Server, ServerOptions, StoreKind};

#[tokio::test(flavor = "multi_thread")]
async fn whoami_names_the_calling_key_and_its_role() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    let me = admin.get("/v1/whoami").await?.ok(200)?;
    ensure!(me["role"] == "admin", "{me}");
    let (tenant, viewer) = admin.tenant_with("viewer").await?;
    let v = viewer.get("/v1/whoami").await?.ok(200)?;
    ensure!(
        v["role"] == "viewer" && v["tenant_id"] == tenant.as_str(),
        "{v}"
    );
    ensure!(
        v["key_id"].as_str().is_some_and(|k| k.starts_with("key_")) && v["key_id"] != me["key_id"],
        "{v} vs {me}"
    );
    let anon = server.anonymous().get("/v1/whoami").await?;
    ensure!(anon.status == 401, "{} {}", anon.status, anon.text());
    let revoked = admin
        .delete(&format!(
            "/v1/keys/{}",
            v["key_id"].as_str().unwrap_or_default()
        ))
        .await?;
    ensure!(revoked.status == 204, "{}", revoked.text());
    let after = viewer.get("/v1/whoami").await?;
    ensure!(after.status == 401, "a revoked key: {}", after.status);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pages_are_served_from_the_binary_under_a_strict_csp() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let anon = server.anonymous();
    for (path, content_type, needle) in [
        ("/ui/", "text/html", "/ui/app.js"),
        ("/ui/app.js", "text/javascript", "/v1/whoami"),
        ("/ui/volumes.js", "text/javascript", "/v1/volumes"),
        ("/ui/sandbox.js", "text/javascript", "/ports"),
        ("/ui/console.css", "text/css", "font"),
        ("/docs", "text/html", "/docs/swagger-ui-bundle.js"),
        ("/docs/docs.js", "text/javascript", "/openapi.json"),
        ("/docs/swagger-ui-bundle.js", "text/javascript", "SwaggerUI"),
        ("/docs/swagger-ui.css", "text/css", ".swagger-ui"),
        ("/docs/LICENSE", "text/plain", "Apache License"),
    ] {
        let r = anon.get(path).await?;
        ensure!(r.status == 200, "{path}: {} {}", r.status, r.text());
        let ct = r.header("content-type").unwrap_or_default();
        ensure!(ct.starts_with(content_type), "{path}: content-type {ct}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        ensure!(
            csp.contains("default-src 'none'")
                && csp.contains("script-src 'self';")
                && csp.contains("connect-src 'self';")
                && !csp.contains("unsafe"),
            "{path}: CSP {csp:?}"
        );
        ensure!(
            r.header("x-content-type-options").as_deref() == Some("nosniff"),
            "{path}"
        );
        ensure!(r.text().contains(needle), "{path} lacks {needle:?}");
    }
    // The HTML pages load their scripts from files: nothing inline for the
    // CSP to refuse.
    for path in ["/ui/", "/docs"] {
        let html = anon.get(path).await?.text();
        ensure!(
            !html.contains("<script>") && !html.contains("<style"),
            "{path} has inline script or style"
        );
    }
    // `/ui` sends the browser to the console's one page, `/ui/`.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let bare = no_redirects
        .get(format!("{}/ui", server.url))
        .send()
        .await?;
    let location = bare
        .headers()
        .get("location")
        .map(|l| l.as_bytes().to_vec());
    ensure!(
        bare.status() == 308 && location.as_deref() == Some(b"/ui/".as_slice()),
        "/ui: {} {location:?}",
        bare.status()
    );
    for path in [
        "/ui/nope.js",
        "/docs/nope.css",
        "/ui/..%2Fdocs%2Findex.html",
    ] {
        let r = anon.get(path).await?;
        ensure!(r.status == 404, "{path}: {}", r.status);
        ensure!(
            r.json()?["error"]["code"] == "not_found",
            "{path}: {}",
            r.text()
        );
    }
    Ok(())
}
