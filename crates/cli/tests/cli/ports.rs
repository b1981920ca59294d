//! `stacyvm sandbox expose` and the Rust SDK's port calls against a real
//! server with a Docker sandbox: the printed URL reaches the sandbox's
//! server, `--public` opens it to callers without a key, tokens and removal
//! work, and a port out of range fails the command.

use anyhow::{ensure, Context, Result};
use stacyvm_sdk::{CreateSandbox, Error, ExecRequest};

use crate::support::{run, test_image_tar, Server, IMAGE};

#[tokio::test(flavor = "multi_thread")]
async fn expose_prints_a_url_that_reaches_the_sandbox() -> Result<()> {
    let server = Server::start("proot,docker")?;
    let admin = server.admin();
    admin.image_import_path(IMAGE, test_image_tar()?).await?;
    let id = admin
        .sandbox_create(&CreateSandbox {
            provider: Some("docker".into()),
            ..CreateSandbox::image(IMAGE)
        })
        .await?
        .id;
    let out = admin
        .exec(
            &id,
            &ExecRequest::shell(
                "mkdir -p /www && echo served > /www/index.html && \
                 setsid busybox httpd -f -p 127.0.0.1:8080 -h /www </dev/null >/dev/null 2>&1 & \
                 i=0; while ! nc -z 127.0.0.1 8080 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done; echo up",
            ),
        )
        .await?;
    ensure!(out.stdout_text().trim() == "up", "{}", out.stdout_text());

    let http = reqwest::Client::new();
    let url = server.ok(&["sandbox", "expose", &id, "8080"])?;
    let url = url.trim();
    ensure!(url == format!("/v1/sandboxes/{id}/ports/8080/"), "{url}");
    let page = |key: Option<&str>| {
        let mut rb = http.get(format!("{}{url}index.html", server.url));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        rb.send()
    };
    let r = page(Some(&server.admin_key)).await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.text().await? == "served\n", "the page differs");
    ensure!(
        page(None).await?.status() == 401,
        "a private port opened without a key"
    );

    let json = server.json(&["sandbox", "expose", &id, "8080", "--public"])?;
    ensure!(json["port"] == 8080 && json["public"] == true, "{json}");
    ensure!(
        page(None).await?.status() == 200,
        "the public port is closed"
    );

    let ports = admin.sandbox_ports(&id).await?;
    ensure!(ports.len() == 1 && ports[0].public, "{ports:?}");
    let token = admin.sandbox_port_token(&id, 8080, 60).await?;
    ensure!(token.url.contains("stacyvm_token="), "{}", token.url);
    admin.sandbox_unexpose(&id, 8080).await?;
    ensure!(admin.sandbox_ports(&id).await?.is_empty(), "still listed");
    match admin.sandbox_unexpose(&id, 8080).await {
        Err(Error::Api(e)) if e.status == 404 => {}
        other => anyhow::bail!("removing twice: {other:?}"),
    }

    let out = run(server.cli().args(["sandbox", "expose", &id, "0"]))?;
    ensure!(!out.status.success(), "port 0 was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("1-65535"), "{err}");
    let out = run(server.cli().args(["sandbox", "expose", &id, "70000"]))?;
    ensure!(!out.status.success(), "port 70000 was accepted");
    admin.sandbox_destroy(&id).await.context("destroying")?;
    Ok(())
}
