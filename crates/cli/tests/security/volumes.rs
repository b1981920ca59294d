//! Volumes as a way out: a tenant's member key reaching another tenant's
//! volume, mounting over what the kernel or StacyVM owns, or planting
//! symlinks in a volume so the host follows them when it mounts or
//! deletes the volume, or reading the host's disk through a device node
//! made in one. Every provider with volumes, qemu guests (virtiofs)
//! included.

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::support::{s, Server, ServerOptions, StoreKind};

/// Unmounts what a failed test left under the server's volumes (the
/// delete does it otherwise), so the data dir can go.
struct MountGuard(std::path::PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let want = self.0.join("volumes/mnt").to_string_lossy().into_owned();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for m in info.lines().filter_map(|l| l.split(' ').nth(4)) {
            if m.starts_with(&format!("{want}/")) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(m)
                    .status();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_key_cannot_reach_another_tenants_volume_or_the_host() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .local_worker(),
    )?;
    let _guard = MountGuard(server.data_dir().to_path_buf());
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, alice) = admin.tenant_with("member").await?;
    let (_, mallory) = admin.tenant_with("member").await?;
    let v = alice
        .post("/v1/volumes", json!({"name": "secret", "size_mb": 16}))
        .await?
        .ok(201)?;
    let id = s(&v, "id")?.to_owned();

    // Another tenant's volume does not exist for mallory, by any route.
    mallory
        .get("/v1/volumes/secret")
        .await?
        .err(404, "not_found")?;
    mallory
        .delete("/v1/volumes/secret")
        .await?
        .err(404, "not_found")?;
    let list = mallory.get("/v1/volumes").await?.ok(200)?;
    ensure!(
        list["volumes"].as_array().is_some_and(Vec::is_empty),
        "{list}"
    );
    mallory
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "docker",
                "volumes": [{"volume": "secret", "path": "/data"}]}),
        )
        .await?
        .err(404, "not_found")?;

    // Nor may a volume cover the kernel's or StacyVM's own mounts, or climb out.
    for path in [
        "/proc",
        "/proc/self",
        "/sys",
        "/dev",
        "/.stacyvm",
        "/.stacyvm/run",
        "/x/../../etc",
    ] {
        alice
            .post(
                "/v1/sandboxes",
                json!({"image": "busybox", "provider": "docker",
                    "volumes": [{"volume": "secret", "path": path}]}),
            )
            .await?
            .err(400, "invalid_request")?;
    }

    // Links planted in the volume pointing at the host's root and at the
    // server's secrets are never followed by the host: not when it mounts
    // the volume again, not when it deletes it.
    // A stand-in for the server's secrets, beside them in the data dir.
    let key = server.data_dir().join("canary.secret");
    std::fs::write(&key, "host-secret-canary")?;
    let sbx = alice
        .create_sandbox(json!({"image": "busybox", "provider": "docker",
            "volumes": [{"volume": "secret", "path": "/data"}]}))
        .await?;
    let sbx = s(&sbx, "id")?.to_owned();
    let script = format!(
        "ln -s / /data/root && ln -s {} /data/key && mkdir -p /data/d && ln -s {} /data/d/up",
        key.display(),
        server.data_dir().display()
    );
    alice.sh(&sbx, &script).await?;
    // What the sandbox sees through them is its own root, not the host's.
    let seen = alice.sh(&sbx, "cat /data/key 2>&1; true").await?;
    ensure!(
        !seen.contains(&server.admin_key),
        "the admin key leaked: {seen}"
    );
    // Nor does a device node made in the volume open the host's disk.
    let (major, minor) = host_disk()?;
    let seen = alice
        .sh(
            &sbx,
            &format!(
                "mknod /data/disk b {major} {minor} 2>&1; \
                 head -c 512 /data/disk >/dev/null 2>&1 && echo read-the-disk; true"
            ),
        )
        .await?;
    ensure!(
        !seen.contains("read-the-disk"),
        "docker: the sandbox read the host's disk through its volume: {seen}"
    );
    alice.destroy(&sbx).await?;
    let again = alice
        .create_sandbox(json!({"image": "busybox", "provider": "docker",
            "volumes": [{"volume": "secret", "path": "/data"}]}))
        .await?;
    let again = s(&again, "id")?.to_owned();
    ensure!(alice.sh(&again, "readlink /data/root").await?.trim() == "/");
    alice.destroy(&again).await?;
    alice.delete("/v1/volumes/secret").await?.ok(204)?;
    ensure!(
        std::fs::read_to_string(&key)? == "host-secret-canary",
        "deleting the volume touched the host file"
    );
    ensure!(
        server.data_dir().join("volumes").is_dir(),
        "the volumes dir went"
    );
    let mnt = server.data_dir().join("volumes/mnt").join(&id);
    ensure!(mnt.symlink_metadata().is_err(), "{} is left", mnt.display());
    let st = admin.get("/v1/status").await?.ok(200)?;
    ensure!(st["store"]["ok"] == true, "the server survived: {st}");
    Ok(())
}

/// A member's sandbox of `provider` with a volume: it sees its volume and
/// nothing else of the host (not the data dir, not another tenant's
/// volume, not the host's files through links planted in the volume),
/// an image whose mount point is a link (made by an earlier sandbox and
/// saved as a snapshot) cannot send the mount out of the root, and no mount
/// outlives the sandboxes.
async fn a_volume_keeps_a_sandbox_in_its_root(provider: &str) -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,proot,namespaces,qemu")
            .local_worker(),
    )?;
    let _guard = MountGuard(server.data_dir().to_path_buf());
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, alice) = admin.tenant_with("member").await?;
    let (_, bob) = admin.tenant_with("member").await?;
    let theirs = bob
        .post("/v1/volumes", json!({"name": "theirs", "size_mb": 16}))
        .await?
        .ok(201)?;
    let theirs_id = s(&theirs, "id")?.to_owned();
    let bob_mnt = server.data_dir().join("volumes/mnt").join(&theirs_id);
    std::fs::write(bob_mnt.join("canary"), "bobs-canary")?;
    alice
        .post("/v1/volumes", json!({"name": "mine", "size_mb": 16}))
        .await?
        .ok(201)?;
    let with_mine = |image: &str, path: &str| {
        json!({"image": image, "provider": provider,
            "volumes": [{"volume": "mine", "path": path}]})
    };
    let sbx = alice.create_sandbox(with_mine("busybox", "/data")).await?;
    let sbx = s(&sbx, "id")?.to_owned();
    let data_dir = server.data_dir().display().to_string();
    let script = format!(
        "ln -s / /data/root; ln -s {data_dir} /data/dd; ln -s {bob} /data/bob; \
         cat {bob}/canary /data/bob/canary /data/dd/admin.key 2>&1; \
         ls {data_dir} /data/dd 2>&1; \
         find / -path /proc -prune -o -name canary -print 2>/dev/null; \
         [ \"$(stat -c %i /data/..)\" = \"$(stat -c %i /)\" ] && echo parent-is-root; true",
        bob = bob_mnt.display()
    );
    let seen = alice.sh(&sbx, &script).await?;
    ensure!(
        !seen.contains("bobs-canary") && !seen.contains(&server.admin_key),
        "{provider}: the sandbox reached the host: {seen}"
    );
    // A listing prints bare names; the refusals name the path.
    ensure!(
        !seen
            .lines()
            .any(|l| l.trim() == "volumes" || l.trim() == "images"),
        "{provider}: the sandbox listed the data dir: {seen}"
    );
    ensure!(seen.contains("parent-is-root"), "{provider}: {seen}");

    // A device node made in the volume never opens the host's disk: the
    // host mounts volumes `nodev`, and a guest's virtiofsd makes no nodes.
    let (major, minor) = host_disk()?;
    let seen = alice
        .sh(
            &sbx,
            &format!(
                "mknod /data/disk b {major} {minor} 2>&1; \
                 head -c 512 /data/disk >/dev/null 2>&1 && echo read-the-disk; true"
            ),
        )
        .await?;
    ensure!(
        !seen.contains("read-the-disk"),
        "{provider}: the sandbox read the host's disk through its volume: {seen}"
    );

    // An earlier sandbox leaves links where a later one mounts, and saves
    // itself as an image.
    let image = format!("evil-{provider}");
    alice
        .sh(
            &sbx,
            &format!("ln -s / /up && ln -s {data_dir} /dd && mkdir /ok && ln -s /ok /inroot"),
        )
        .await?;
    alice
        .post(
            &format!("/v1/sandboxes/{sbx}/snapshot"),
            json!({"image": image}),
        )
        .await?
        .ok(201)?;
    alice.destroy(&sbx).await?;
    for path in ["/up", "/up/etc", "/dd", "/dd/volumes", "/inroot"] {
        alice
            .post("/v1/sandboxes", with_mine(&image, path))
            .await?
            .err(400, "invalid_request")
            .with_context(|| format!("{provider}: a volume at {path}"))?;
    }
    // Nothing was mounted inside a volume's host directory (where "/dd/volumes"
    // would have gone had the link been followed).
    let vol_mnt = format!("{data_dir}/volumes/mnt/");
    for l in std::fs::read_to_string("/proc/self/mountinfo")?.lines() {
        let at = l.split(' ').nth(4).unwrap_or_default();
        ensure!(
            !at.strip_prefix(&vol_mnt)
                .is_some_and(|rest| rest.contains('/')),
            "{provider}: a mount landed inside a volume on the host: {l}"
        );
    }

    // The links planted in the volume are the sandbox's own in a new one.
    let again = alice.create_sandbox(with_mine(&image, "/data")).await?;
    let again = s(&again, "id")?.to_owned();
    ensure!(alice.sh(&again, "readlink /data/root").await?.trim() == "/");
    let seen = alice
        .sh(&again, "cat /data/bob/canary /data/dd/admin.key 2>&1; true")
        .await?;
    ensure!(
        !seen.contains("bobs-canary") && !seen.contains(&server.admin_key),
        "{provider}: {seen}"
    );
    alice.destroy(&again).await?;
    let left: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.contains(&sbx) || l.contains(&again))
        .map(str::to_owned)
        .collect();
    ensure!(left.is_empty(), "{provider}: mounts left: {left:?}");
    alice.delete("/v1/volumes/mine").await?.ok(204)?;
    bob.delete("/v1/volumes/theirs").await?.ok(204)?;
    Ok(())
}

/// The major and minor numbers of a real block device of the host, from
/// `/proc/partitions`.
fn host_disk() -> Result<(u32, u32)> {
    let table = std::fs::read_to_string("/proc/partitions")?;
    table
        .lines()
        .skip(2)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.parse().ok()?, f.get(1)?.parse().ok()?))
        })
        .context("the host lists no block device in /proc/partitions")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_qemu_guest_with_a_volume_stays_in_its_root() -> Result<()> {
    a_volume_keeps_a_sandbox_in_its_root("qemu").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespaces_sandbox_with_a_volume_stays_in_its_root() -> Result<()> {
    a_volume_keeps_a_sandbox_in_its_root("namespaces").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proot_sandbox_with_a_volume_stays_in_its_root() -> Result<()> {
    a_volume_keeps_a_sandbox_in_its_root("proot").await
}
