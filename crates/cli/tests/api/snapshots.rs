//! Snapshots: a sandbox's filesystem saved as a catalog image of its
//! tenant, on every provider and, in the workers topology, carried from a
//! remote worker to the control plane's catalog: written files, a deleted file of the base
//! image, modes, symbolic and hard links carry over into a new sandbox;
//! names are checked, taken names refused, other tenants neither see the
//! image nor create from it, its tenant deletes it, and snapshots count
//! against the tenant's storage quota with its volumes.

use anyhow::{ensure, Result};
use serde_json::json;

use crate::support::{unique, Api, Server, ServerOptions, StoreKind};

const PROVIDERS: [&str; 3] = ["docker", "namespaces", "proot"];

/// Changes made before the snapshot: new files, a mode, links, a hard
/// link, a FIFO, and a file of the base image deleted.
const PREPARE: &str = "set -e; test -e /etc/group; mkdir -p /snap/sub; echo hello > /snap/sub/f; \
    printf '#!/bin/sh\\necho ran\\n' > /snap/run.sh; chmod 0751 /snap/run.sh; \
    ln -s /snap/sub/f /snap/rel-link; ln -s / /snap/escape; ln /snap/sub/f /snap/hard; \
    mkfifo /snap/fifo; rm /etc/group";

/// What the new sandbox must see.
const CHECK: &str = "set -e; cat /snap/sub/f; stat -c %a /snap/run.sh; /snap/run.sh; \
    readlink /snap/rel-link; readlink /snap/escape; cat /snap/hard; \
    if test -p /snap/fifo; then echo fifo; else echo no-fifo; fi; \
    test ! -e /etc/group && echo deleted";

/// What it must print. FIFOs survive where Docker imports the image; the
/// catalog's root filesystems (namespaces, PRoot, QEMU's disks) drop special
/// files of every image, snapshots included.
fn expected(provider: &str) -> String {
    let fifo = if provider == "docker" {
        "fifo"
    } else {
        "no-fifo"
    };
    format!("hello\n751\nran\n/snap/sub/f\n/\nhello\n{fifo}\ndeleted\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_carries_files_deletions_modes_and_links_into_a_new_sandbox() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,proot,namespaces"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (_, stranger) = admin.tenant_with("member").await?;
    for provider in PROVIDERS {
        check_snapshot(&admin, &member, &stranger, provider).await?;
    }
    Ok(())
}

/// The same on a QEMU guest (under TCG here): its own agent reads its files
/// while it is woken from its saved state, and it is paused again for the
/// copy; the host never parses the guest's disk.
#[tokio::test(flavor = "multi_thread")]
async fn a_qemu_snapshot_carries_files_into_a_new_guest() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("qemu"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (_, stranger) = admin.tenant_with("member").await?;
    check_snapshot(&admin, &member, &stranger, "qemu").await
}

/// Prepares a sandbox of `provider`, snapshots it, and checks the image
/// from a new sandbox and from every side of the tenancy.
async fn check_snapshot(admin: &Api, member: &Api, stranger: &Api, provider: &str) -> Result<()> {
    let id = member.sandbox(provider).await?;
    member.sh(&id, PREPARE).await?;
    let image = unique(&format!("snap-{provider}"));
    let resp = member
        .post(
            &format!("/v1/sandboxes/{id}/snapshot"),
            json!({"image": image}),
        )
        .await?;
    let info = resp.ok(201)?;
    ensure!(
        info["name"] == image.as_str()
            && info["digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
        "{provider}: {info}"
    );
    // The source keeps running after the copy (it was paused, then
    // resumed).
    ensure!(
        member.sh(&id, "echo alive").await? == "alive\n",
        "{provider}"
    );

    // A taken name is refused, whoever holds it.
    for taken in [image.as_str(), "busybox"] {
        member
            .post(
                &format!("/v1/sandboxes/{id}/snapshot"),
                json!({"image": taken}),
            )
            .await?
            .err(409, "conflict")?;
    }
    member
        .post(
            &format!("/v1/sandboxes/{id}/snapshot"),
            json!({"image": "Not A Name"}),
        )
        .await?
        .err(400, "invalid_request")?;
    // Another tenant's sandbox does not exist for the stranger.
    stranger
        .post(
            &format!("/v1/sandboxes/{id}/snapshot"),
            json!({"image": unique("theft")}),
        )
        .await?
        .err(404, "not_found")?;

    let copy = member
        .create_sandbox(json!({"image": image, "provider": provider}))
        .await?;
    let copy_id = copy["id"].as_str().unwrap_or_default().to_owned();
    let seen = member.sh(&copy_id, CHECK).await?;
    ensure!(
        seen == expected(provider),
        "{provider}: the new sandbox saw {seen:?}"
    );

    // The tenant sees its image; another tenant neither sees nor runs it.
    member.get(&format!("/v1/images/{image}")).await?.ok(200)?;
    stranger
        .get(&format!("/v1/images/{image}"))
        .await?
        .err(404, "not_found")?;
    let list = stranger.get("/v1/images").await?.ok(200)?;
    ensure!(
        !list["images"]
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["name"] == image.as_str())),
        "another tenant lists the snapshot: {list}"
    );
    stranger
        .post(
            "/v1/sandboxes",
            json!({"image": image, "provider": provider}),
        )
        .await?
        .err(422, "image_not_found")?;

    // The call is audited against the sandbox.
    let audit = admin
        .get(&format!(
            "/v1/audit?sandbox_id={id}&action=sandbox.snapshot"
        ))
        .await?
        .ok(200)?;
    ensure!(
        audit["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["outcome"] == "ok")),
        "{provider}: no audit event of the snapshot: {audit}"
    );

    // The tenant removes its own snapshot once nothing runs from it;
    // another tenant cannot, and operator images stay the operator's.
    member
        .delete(&format!("/v1/images/{image}"))
        .await?
        .err(409, "conflict")?;
    member.destroy(&copy_id).await?;
    member.destroy(&id).await?;
    stranger
        .delete(&format!("/v1/images/{image}"))
        .await?
        .err(404, "not_found")?;
    member
        .delete("/v1/images/busybox")
        .await?
        .err(403, "forbidden")?;
    member
        .delete(&format!("/v1/images/{image}"))
        .await?
        .ok(204)?;
    member
        .get(&format!("/v1/images/{image}"))
        .await?
        .err(404, "not_found")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_count_against_the_storage_quota_with_volumes() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .local_worker(),
    )?;
    let _mounts = crate::volumes::MountGuard(server.data_dir().to_path_buf());
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let quota = |mb: i64| json!({"allowed_providers": ["docker"], "max_volume_mb": mb});
    admin
        .put(&format!("/v1/tenants/{tenant}/quota"), quota(1))
        .await?
        .ok(200)?;
    let id = member.sandbox("docker").await?;
    // A busybox root filesystem is more than a MiB: refused once copied,
    // and nothing of it stays.
    let tight = unique("tight");
    let e = member
        .post(
            &format!("/v1/sandboxes/{id}/snapshot"),
            json!({"image": tight}),
        )
        .await?
        .err(429, "quota_exceeded")?;
    ensure!(
        e.message.contains("max_volume_mb") && e.message.contains("snapshot images"),
        "{}",
        e.message
    );
    admin
        .get(&format!("/v1/images/{tight}"))
        .await?
        .err(404, "not_found")?;

    admin
        .put(&format!("/v1/tenants/{tenant}/quota"), quota(64))
        .await?
        .ok(200)?;
    let image = unique("held");
    let info = member
        .post(
            &format!("/v1/sandboxes/{id}/snapshot"),
            json!({"image": image}),
        )
        .await?
        .ok(201)?;
    let image_mb = info["size"].as_u64().unwrap_or(0).div_ceil(1 << 20) as i64;
    ensure!(image_mb > 0, "{info}");
    // The snapshot's MiB are gone from what volumes may take.
    let e = member
        .post(
            "/v1/volumes",
            json!({"name": "v", "size_mb": 64 - image_mb + 1}),
        )
        .await?
        .err(429, "quota_exceeded")?;
    ensure!(e.message.contains("snapshot images"), "{}", e.message);
    member.destroy(&id).await?;
    member
        .delete(&format!("/v1/images/{image}"))
        .await?
        .ok(204)?;
    // Deleting the snapshot gives its share back.
    member
        .post("/v1/volumes", json!({"name": "v", "size_mb": 64}))
        .await?
        .ok(201)?;
    member.delete("/v1/volumes/v").await?.ok(204)?;
    Ok(())
}
