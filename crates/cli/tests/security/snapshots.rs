//! A member's snapshot holds only the sandbox: links to host files stay
//! links (the host's bytes never enter the image), the provider's bind
//! mounts are left out, a taken name (an operator's image or another
//! tenant's snapshot) is never overwritten, and another tenant can neither
//! see nor run the image.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::support::{unique, Server, ServerOptions, StoreKind};

/// Every `image.tar` of the catalog under `data`.
fn catalog_tars(data: &Path) -> Result<Vec<std::path::PathBuf>> {
    let versions = data.join("images").join(".versions");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&versions).with_context(|| versions.display().to_string())? {
        let tar = e?.path().join("image.tar");
        if tar.is_file() {
            out.push(tar);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_cannot_capture_host_files_or_take_another_tenants_image() -> Result<()> {
    let data = tempfile::Builder::new().prefix("svm-snap-").tempdir()?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,namespaces,proot")
            .data_dir(data.path()),
    )?;
    let admin = server.admin();
    let busybox = admin.import_busybox().await?;
    // A host file outside every sandbox, with a marker no image may hold.
    let marker = unique("host-secret-marker");
    let secret_dir = data.path().join("host-secret");
    std::fs::create_dir(&secret_dir)?;
    std::fs::write(secret_dir.join("secret.txt"), &marker)?;
    let dir = secret_dir.display().to_string();

    let (_, member) = admin.tenant_with("member").await?;
    let (_, other) = admin.tenant_with("member").await?;
    let others_id = other.sandbox("docker").await?;
    let others_image = unique("others");
    other
        .post(
            &format!("/v1/sandboxes/{others_id}/snapshot"),
            json!({"image": others_image}),
        )
        .await?
        .ok(201)?;
    let others_digest = other
        .get(&format!("/v1/images/{others_image}"))
        .await?
        .ok(200)?["digest"]
        .clone();

    for provider in ["docker", "namespaces", "proot"] {
        let id = member.sandbox(provider).await?;
        member
            .sh(
                &id,
                &format!(
                    "ln -s {dir} /leak-dir; ln -s {dir}/secret.txt /leak-file; \
                     ln -s / /root-link; echo mine > /mine"
                ),
            )
            .await?;
        // Neither an operator's image nor another tenant's is overwritten;
        // the other tenant's name is refused like any taken name.
        for taken in ["busybox", others_image.as_str()] {
            member
                .post(
                    &format!("/v1/sandboxes/{id}/snapshot"),
                    json!({"image": taken}),
                )
                .await?
                .err(409, "conflict")?;
        }
        let image = unique(&format!("leak-{provider}"));
        member
            .post(
                &format!("/v1/sandboxes/{id}/snapshot"),
                json!({"image": image}),
            )
            .await?
            .ok(201)?;

        // The host's bytes are in no image of the catalog, and the provider's
        // bind mounts (the agent, its socket directory) were not captured.
        for tar in catalog_tars(data.path())? {
            let bytes = std::fs::read(&tar)?;
            ensure!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{provider}: {} holds the host file's contents",
                tar.display()
            );
            let mut archive = tar::Archive::new(&bytes[..]);
            for entry in archive.entries()? {
                let entry = entry?;
                let path = entry.path()?.to_path_buf();
                ensure!(
                    !(path.starts_with(".stacyvm") && entry.header().entry_type().is_file()),
                    "{provider}: the snapshot captured {}",
                    path.display()
                );
            }
        }
        // In a sandbox made from it the links point inside that sandbox.
        let copy = member
            .create_sandbox(json!({"image": image, "provider": provider}))
            .await?;
        let copy_id = copy["id"].as_str().unwrap_or_default().to_owned();
        let out = member
            .exec(
                &copy_id,
                json!({"cmd": ["sh", "-c", "cat /leak-file /leak-dir/secret.txt; cat /mine"]}),
            )
            .await?;
        let stdout = out["stdout"].as_str().unwrap_or_default();
        ensure!(
            !stdout.contains(&marker) && stdout.contains("mine"),
            "{provider}: {out}"
        );
        // The other tenant can neither see nor run it.
        other
            .get(&format!("/v1/images/{image}"))
            .await?
            .err(404, "not_found")?;
        other
            .post(
                "/v1/sandboxes",
                json!({"image": image, "provider": provider}),
            )
            .await?
            .err(422, "image_not_found")?;
        member.destroy(&copy_id).await?;
        member.destroy(&id).await?;
        admin
            .delete(&format!("/v1/images/{image}"))
            .await?
            .ok(204)?;
    }
    // Nothing the member tried replaced what was there.
    let now = admin.get("/v1/images/busybox").await?.ok(200)?;
    ensure!(now["digest"] == busybox["digest"], "busybox changed: {now}");
    let now = admin
        .get(&format!("/v1/images/{others_image}"))
        .await?
        .ok(200)?;
    ensure!(
        now["digest"] == others_digest,
        "the other tenant's image changed: {now}"
    );
    member
        .get(&format!("/v1/images/{others_image}"))
        .await?
        .err(404, "not_found")?;
    other.destroy(&others_id).await?;
    admin
        .delete(&format!("/v1/images/{others_image}"))
        .await?
        .ok(204)?;
    Ok(())
}
