//! Which images a tenant may run: the image catalog's, and images of the
//! Docker daemon only where the operator allows them (`--docker-images`,
//! `STACYVM_DOCKER_IMAGES`) or for the operator's own tenant — warm-pool
//! claims included. A refused daemon image reads exactly like an unknown
//! one, so tenants cannot learn what the daemon holds.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{
    docker_containers_of, eventually, random_hex, s, test_image_tar, Api, Server, ServerOptions,
    StoreKind,
};

/// The busybox image the test scripts import into Docker, outside any
/// catalog.
const DAEMON_IMAGE: &str = "stacyvm-test/busybox:latest";

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("running docker")?;
    ensure!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Makes sure the daemon holds `DAEMON_IMAGE`.
fn daemon_image() -> Result<()> {
    if docker(&["image", "inspect", DAEMON_IMAGE]).is_err() {
        let tar = test_image_tar()?;
        docker(&[
            "import",
            tar.to_str().context("non-UTF-8 path")?,
            DAEMON_IMAGE,
        ])?;
    }
    Ok(())
}

/// Another name for the daemon's busybox. Dropped after the server: the
/// name goes, and so does the Docker copy of a catalog image of that name.
struct DaemonTag(String);

impl DaemonTag {
    fn new() -> Result<DaemonTag> {
        daemon_image()?;
        let name = format!("svm-img-{}", random_hex(10));
        docker(&["tag", DAEMON_IMAGE, &format!("{name}:latest")])?;
        Ok(DaemonTag(name))
    }
}

impl Drop for DaemonTag {
    fn drop(&mut self) {
        let _ = docker(&["rmi", &format!("{}:latest", self.0)]);
        let copies = docker(&[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            &format!("stacyvm-catalog/{}", self.0),
        ])
        .unwrap_or_default();
        for copy in copies.lines() {
            let _ = docker(&["rmi", copy]);
        }
    }
}

fn create_body(image: &str) -> Value {
    json!({"image": image, "provider": "docker"})
}

/// A create that must be refused as an unknown image; returns the message
/// with the image's name taken out.
async fn refused(api: &Api, image: &str) -> Result<String> {
    let e = api
        .post("/v1/sandboxes", create_body(image))
        .await?
        .err(422, "image_not_found")
        .with_context(|| format!("creating from {image}"))?;
    ensure!(
        e.message.contains("not in the image catalog") && e.message.contains("--docker-images"),
        "the refusal must say where images come from and how to allow one: {}",
        e.message
    );
    Ok(e.message.replace(image, "IMAGE"))
}

/// The image the container of a sandbox was created from.
fn container_image(sandbox: &str) -> Result<String> {
    let ids = docker_containers_of(sandbox)?;
    ensure!(ids.len() == 1, "containers of {sandbox}: {ids:?}");
    docker(&["inspect", "-f", "{{.Config.Image}}", &ids[0]])
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_run_catalog_images_and_daemon_images_only_for_the_operator() -> Result<()> {
    daemon_image()?;
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (_, owner) = admin.tenant_with("owner").await?;

    let sb = member.create_sandbox(create_body("busybox")).await?;
    member.destroy(s(&sb, "id")?).await?;

    for api in [&member, &owner] {
        let held = refused(api, DAEMON_IMAGE).await?;
        let absent = refused(api, "stacyvm-test/no-such-image:nope").await?;
        ensure!(
            held == absent,
            "a refused daemon image must read like an unknown one:\n{held}\n{absent}"
        );
    }
    let live = member.get("/v1/sandboxes").await?.ok(200)?;
    ensure!(
        live["sandboxes"]
            .as_array()
            .is_some_and(|l| l.iter().all(|s| s["image"] == "busybox")),
        "a refused create left a sandbox: {live}"
    );

    // The operator's own tenant runs what the daemon holds.
    let sb = admin.create_sandbox(create_body(DAEMON_IMAGE)).await?;
    ensure!(container_image(s(&sb, "id")?)? == DAEMON_IMAGE);
    admin.destroy(s(&sb, "id")?).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_allows_daemon_images_by_pattern() -> Result<()> {
    daemon_image()?;
    let other = DaemonTag::new()?;
    let id = docker(&["image", "inspect", "-f", "{{.Id}}", DAEMON_IMAGE])?;
    let hex = id.strip_prefix("sha256:").context("an image id")?;
    // Names Docker would resolve to an image of another name: a digest (the
    // tag is then ignored), the image id, a prefix of it.
    let by_id = [
        format!("stacyvm-test/busybox@{id}"),
        id.clone(),
        hex[..12].to_owned(),
    ];
    let flags = ServerOptions::new(StoreKind::Sqlite)
        .providers("docker")
        .arg("--docker-images")
        .arg("python:3.12*,stacyvm-test/busy*")
        .arg("--docker-images")
        .arg("team/*");
    let env = ServerOptions::new(StoreKind::Sqlite)
        .providers("docker")
        .env("STACYVM_DOCKER_IMAGES", "*");
    for (opts, refused_here) in [(flags, vec![other.0.clone()]), (env, Vec::new())] {
        let server = Server::start(opts)?;
        let admin = server.admin();
        let (_, member) = admin.tenant_with("member").await?;
        let sb = member.create_sandbox(create_body(DAEMON_IMAGE)).await?;
        ensure!(container_image(s(&sb, "id")?)? == DAEMON_IMAGE);
        member.destroy(s(&sb, "id")?).await?;
        for image in refused_here.iter().chain(&by_id) {
            refused(&member, image).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_pool_claims_hand_tenants_no_daemon_image() -> Result<()> {
    let image = DaemonTag::new()?;
    let name = image.0.clone();
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .arg("--warm-pool")
            .arg(&format!("docker:{name}=1")),
    )?;
    let admin = server.admin();
    let (_, member) = admin.tenant_with("member").await?;
    let ready = || async {
        let st = admin.get("/v1/status").await?.ok(200)?;
        Ok::<_, anyhow::Error>(st["pools"][0]["ready"].as_u64().unwrap_or(0))
    };
    eventually(Duration::from_secs(60), "the pool to fill", || async {
        Ok((ready().await? == 1).then_some(()))
    })
    .await?;

    // The member was spawned from the daemon's image: a tenant gets
    // neither it nor a cold sandbox of that image.
    refused(&member, &name).await?;
    ensure!(ready().await? == 1, "a refused create took the pool member");

    // Once the catalog has the name, a tenant runs the catalog's image, and
    // the member spawned from the daemon's stays in the pool.
    admin.import_image(&name).await?;
    let sb = member.create_sandbox(create_body(&name)).await?;
    let used = container_image(s(&sb, "id")?)?;
    ensure!(
        used.starts_with("stacyvm-catalog/"),
        "the tenant got {used}"
    );
    ensure!(
        ready().await? == 1,
        "the daemon-image member went to a tenant"
    );
    member.destroy(s(&sb, "id")?).await?;

    // The operator's own tenant may claim it.
    let sb = admin.create_sandbox(create_body(&name)).await?;
    let used = container_image(s(&sb, "id")?)?;
    ensure!(used == name, "the operator got {used}, not the pool member");
    admin.destroy(s(&sb, "id")?).await?;
    drop(server);
    Ok(())
}
