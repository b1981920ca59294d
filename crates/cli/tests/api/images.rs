//! The image catalog over the API: import, list, get, delete, and what
//! happens to running sandboxes when their image is replaced or deleted
//! (as with Docker, they keep running from the image they started with).

use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::json;

use crate::support::{s, unique, Server};

#[tokio::test(flavor = "multi_thread")]
async fn import_list_get_and_delete() -> Result<()> {
    let server = Server::start_default()?;
    let admin = server.admin();
    let name = unique("img");
    let info = admin.import_image(&name).await?;
    ensure!(
        info["name"] == name.as_str() && s(&info, "digest")?.starts_with("sha256:"),
        "{info}"
    );
    ensure!(
        info["size"].as_u64().is_some_and(|n| n > 0) && info["created_at"].is_string(),
        "{info}"
    );
    let got = admin.get(&format!("/v1/images/{name}")).await?.ok(200)?;
    ensure!(
        got == info,
        "GET returns what the import did: {got} vs {info}"
    );
    let list = admin.get("/v1/images").await?.ok(200)?;
    ensure!(
        list["images"]
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["name"] == name.as_str())),
        "{list}"
    );
    let (_, member) = admin.tenant_with("member").await?;
    member.get(&format!("/v1/images/{name}")).await?.ok(200)?;
    member
        .delete(&format!("/v1/images/{name}"))
        .await?
        .err(403, "forbidden")?;

    // Not a tar: refused, and nothing is published under the name.
    let rb = admin
        .request(Method::POST, "/v1/images?name=garbage-image")
        .header("content-type", "application/x-tar")
        .body(b"this is not a tar archive at all".repeat(64));
    admin.send(rb).await?.err(400, "invalid_request")?;
    admin
        .get("/v1/images/garbage-image")
        .await?
        .err(404, "not_found")?;

    admin.delete(&format!("/v1/images/{name}")).await?.ok(204)?;
    admin
        .get(&format!("/v1/images/{name}"))
        .await?
        .err(404, "not_found")?;
    admin
        .delete(&format!("/v1/images/{name}"))
        .await?
        .err(404, "not_found")?;
    for provider in ["proot", "docker"] {
        let r = member
            .post(
                "/v1/sandboxes",
                json!({"image": name, "provider": provider}),
            )
            .await?;
        r.err(422, "image_not_found")
            .map_err(|e| e.context(provider))?;
    }
    Ok(())
}

/// Two sandboxes (PRoot and Docker) running from a fresh image `name`.
async fn sandboxes_on_a_fresh_image(
    server: &Server,
) -> Result<(String, crate::support::Api, Vec<(&'static str, String)>)> {
    let admin = server.admin();
    let name = unique("img");
    admin.import_image(&name).await?;
    let (_, member) = admin.tenant_with("member").await?;
    let mut ids = Vec::new();
    for provider in ["proot", "docker"] {
        let sb = member
            .create_sandbox(json!({"image": name, "provider": provider}))
            .await?;
        ids.push((provider, s(&sb, "id")?.to_owned()));
    }
    Ok((name, member, ids))
}

async fn still_alive(
    member: &crate::support::Api,
    ids: &[(&str, String)],
    after: &str,
) -> Result<()> {
    for (provider, id) in ids {
        let out = member
            .exec(id, json!({"cmd": ["sh", "-c", "ls /bin/sh && echo alive"]}))
            .await?;
        ensure!(
            out["exit_code"] == 0
                && out["stdout"]
                    .as_str()
                    .is_some_and(|o| o.ends_with("alive\n")),
            "{provider} sandbox {id} broke {after}: {out}"
        );
    }
    Ok(())
}

/// As with Docker, importing an image again under the same name leaves the
/// sandboxes already running from it untouched; new ones get the new one.
#[tokio::test(flavor = "multi_thread")]
async fn running_sandboxes_survive_a_reimport_of_their_image() -> Result<()> {
    let server = Server::start_default()?;
    let (name, member, ids) = sandboxes_on_a_fresh_image(&server).await?;
    server.admin().import_image(&name).await?;
    still_alive(&member, &ids, "when its image was imported again").await?;
    let fresh = member
        .create_sandbox(json!({"image": name, "provider": "proot"}))
        .await?;
    member.sh(s(&fresh, "id")?, "true").await?;
    Ok(())
}

/// Deleting an image that live sandboxes use is refused (409, as Docker
/// does) or leaves them working; either way they never break.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_image_in_use_never_breaks_its_sandboxes() -> Result<()> {
    let server = Server::start_default()?;
    let admin = server.admin();
    let (name, member, ids) = sandboxes_on_a_fresh_image(&server).await?;
    // The Docker sandbox made the Docker provider import the image.
    let info: stacyvm_provider::images::ImageInfo =
        serde_json::from_value(admin.get(&format!("/v1/images/{name}")).await?.ok(200)?)?;
    let docker_ref = stacyvm_provider::docker::DockerProvider::catalog_image_ref(&info);
    ensure!(
        docker_image_exists(&docker_ref)?,
        "{docker_ref} was never imported"
    );
    let r = admin.delete(&format!("/v1/images/{name}")).await?;
    if r.status == 409 {
        r.err(409, "conflict")?;
        still_alive(&member, &ids, "after a refused delete of its image").await?;
        for (_, id) in &ids {
            member.destroy(id).await?;
        }
        admin.delete(&format!("/v1/images/{name}")).await?.ok(204)?;
        // With its containers gone, the catalog's Docker copy goes too.
        ensure!(
            !docker_image_exists(&docker_ref)?,
            "{docker_ref} outlived its catalog image"
        );
    } else {
        r.ok(204)?;
        still_alive(&member, &ids, "when its image was deleted").await?;
        for (_, id) in &ids {
            member.destroy(id).await?;
        }
    }
    admin
        .get(&format!("/v1/images/{name}"))
        .await?
        .err(404, "not_found")?;
    Ok(())
}

/// A template resolves like an image name; an unknown one is 422.
#[tokio::test(flavor = "multi_thread")]
async fn templates_resolve_through_the_catalog() -> Result<()> {
    let server = Server::start(
        crate::support::ServerOptions::new(crate::support::StoreKind::Sqlite).providers("proot"),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let sb = admin
        .create_sandbox(json!({"template": "busybox", "provider": "proot"}))
        .await?;
    ensure!(sb["template"] == "busybox", "{sb}");
    admin.sh(s(&sb, "id")?, "true").await?;
    admin
        .post(
            "/v1/sandboxes",
            json!({"template": "no-such-template", "provider": "proot"}),
        )
        .await?
        .err(422, "image_not_found")?;
    Ok(())
}

fn docker_image_exists(reference: &str) -> Result<bool> {
    let out = std::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", reference])
        .output()?;
    Ok(out.status.success())
}
