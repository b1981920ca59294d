//! Volumes against the real thing: a loop-mounted ext4 image per volume,
//! bound into Docker, namespaces and PRoot sandboxes (ID-mapped for the
//! latter two); data that outlives sandboxes and server
//! restarts, read-only mounts, the size limit, and deletion that leaves
//! nothing behind. Most of these servers keep the in-process worker in
//! every topology (`local_worker`), whose host keeps their volumes;
//! `volumes_live_on_a_remote_worker_and_sandboxes_follow_them` runs one with
//! remote workers only, where a worker's host keeps them.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{s, Api, Server, ServerOptions, StoreKind};

/// Unmounts whatever a failed test left mounted under the server's volumes
/// directory (the server's own delete does it when the test passes), so
/// the data dir can be removed. Declared after the server: dropped first.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let mnt = self.0.join("volumes").join("mnt");
        for m in mounts_under(&mnt) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&m)
                .status();
        }
    }
}

/// Mount points at or under `dir`, from this process's mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let want = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m == &want || m.starts_with(&format!("{want}/")))
        .collect()
}

pub fn start() -> Result<(Server, MountGuard)> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,proot,namespaces,qemu")
            .local_worker(),
    )?;
    let guard = MountGuard(server.data_dir().to_path_buf());
    Ok((server, guard))
}

pub async fn volume(api: &Api, name: &str, size_mb: i64) -> Result<Value> {
    api.post("/v1/volumes", json!({"name": name, "size_mb": size_mb}))
        .await?
        .ok(201)
}

async fn with_volume(api: &Api, name: &str, path: &str, read_only: bool) -> Result<String> {
    with_volume_on(api, "docker", name, path, read_only).await
}

pub async fn with_volume_on(
    api: &Api,
    provider: &str,
    name: &str,
    path: &str,
    read_only: bool,
) -> Result<String> {
    let s = api
        .create_sandbox(json!({"image": "busybox", "provider": provider,
            "volumes": [{"volume": name, "path": path, "read_only": read_only}]}))
        .await?;
    Ok(s["id"].as_str().unwrap_or_default().to_owned())
}

/// Mount points of this host that name `sandbox` (its root, its run
/// directory, a volume bound into it): none may outlive its destroy.
pub fn mounts_of_sandbox(sandbox: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.contains(sandbox))
        .collect()
}

/// Whether the volume's image file, mount point or mount is still on the host.
fn host_traces(server: &Server, id: &str) -> Vec<String> {
    let root = server.data_dir().join("volumes");
    let mut out = Vec::new();
    let image = root.join("images").join(format!("{id}.ext4"));
    let mnt = root.join("mnt").join(id);
    if image.exists() {
        out.push(image.display().to_string());
    }
    if mnt.symlink_metadata().is_ok() {
        out.push(mnt.display().to_string());
    }
    out.extend(mounts_under(&mnt));
    out
}

/// One volume through two sandboxes of `provider` in turn: what the first
/// writes the second reads, the sandbox's root owns the volume and its
/// files land on disk as root, deletion waits for the last sandbox, and
/// no mount of a sandbox outlives it.
async fn data_outlives_sandboxes_of(provider: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (server, _guard) = start()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let v = volume(&admin, "data", 16).await?;
    let id = s(&v, "id")?.to_owned();
    let first = with_volume_on(&admin, provider, "data", "/data", false).await?;
    let owners = admin
        .sh(
            &first,
            "echo kept > /data/file && stat -c '%u:%g' /data /data/file",
        )
        .await?;
    ensure!(
        owners.split_whitespace().all(|o| o == "0:0"),
        "{provider}: the sandbox's root does not own the volume: {owners}"
    );
    let on_disk = server.data_dir().join("volumes/mnt").join(&id).join("file");
    let meta = std::fs::metadata(&on_disk)?;
    ensure!(
        (meta.uid(), meta.gid()) == (0, 0),
        "{provider}: the file landed on disk as {}:{}",
        meta.uid(),
        meta.gid()
    );
    admin.destroy(&first).await?;
    ensure!(
        mounts_of_sandbox(&first).is_empty(),
        "{provider}: mounts outlived the sandbox: {:?}",
        mounts_of_sandbox(&first)
    );
    let second = with_volume_on(&admin, provider, "data", "/data", false).await?;
    ensure!(admin.sh(&second, "cat /data/file").await?.trim() == "kept");
    let e = admin
        .delete("/v1/volumes/data")
        .await?
        .err(409, "conflict")?;
    ensure!(e.message.contains(&second), "{}", e.message);
    admin.destroy(&second).await?;
    ensure!(
        mounts_of_sandbox(&second).is_empty(),
        "{provider}: mounts outlived the sandbox: {:?}",
        mounts_of_sandbox(&second)
    );
    admin.delete("/v1/volumes/data").await?.ok(204)?;
    ensure!(
        host_traces(&server, &id).is_empty(),
        "left: {:?}",
        host_traces(&server, &id)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn data_outlives_namespaces_sandboxes() -> Result<()> {
    data_outlives_sandboxes_of("namespaces").await
}

#[tokio::test(flavor = "multi_thread")]
async fn data_outlives_proot_sandboxes() -> Result<()> {
    data_outlives_sandboxes_of("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn data_outlives_qemu_sandboxes() -> Result<()> {
    data_outlives_sandboxes_of("qemu").await
}

#[tokio::test(flavor = "multi_thread")]
async fn data_outlives_sandboxes_and_deletion_leaves_nothing() -> Result<()> {
    let (server, _guard) = start()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let v = volume(&admin, "data", 16).await?;
    let id = s(&v, "id")?.to_owned();
    ensure!(id.starts_with("vol_") && v["size_mb"] == 16, "{v}");
    admin
        .post("/v1/volumes", json!({"name": "data", "size_mb": 16}))
        .await?
        .err(409, "conflict")?;
    let got = admin.get("/v1/volumes/data").await?.ok(200)?;
    ensure!(got == v, "get: {got} != {v}");
    let list = admin.get("/v1/volumes").await?.ok(200)?;
    ensure!(
        list["volumes"].as_array().is_some_and(|l| l.contains(&v)),
        "{list}"
    );

    // The parents of the mount are private to the server.
    use std::os::unix::fs::PermissionsExt;
    for d in ["volumes", "volumes/mnt", "volumes/images"] {
        let mode = std::fs::metadata(server.data_dir().join(d))?
            .permissions()
            .mode()
            & 0o777;
        ensure!(mode == 0o700, "{d} is {mode:o}");
    }

    let first = with_volume(&admin, "data", "/data", false).await?;
    admin.sh(&first, "echo kept > /data/file").await?;
    admin.destroy(&first).await?;

    let second = with_volume(&admin, "data", "/data", false).await?;
    ensure!(admin.sh(&second, "cat /data/file").await?.trim() == "kept");
    // Deleting while a live sandbox mounts it is refused, and keeps the data.
    let e = admin
        .delete("/v1/volumes/data")
        .await?
        .err(409, "conflict")?;
    ensure!(e.message.contains(&second), "{}", e.message);
    ensure!(admin.sh(&second, "cat /data/file").await?.trim() == "kept");
    admin.destroy(&second).await?;

    admin.delete("/v1/volumes/data").await?.ok(204)?;
    ensure!(
        host_traces(&server, &id).is_empty(),
        "left: {:?}",
        host_traces(&server, &id)
    );
    admin.get("/v1/volumes/data").await?.err(404, "not_found")?;
    admin
        .delete("/v1/volumes/data")
        .await?
        .err(404, "not_found")?;
    let events = admin.audit("action=volume.delete").await?;
    ensure!(
        events.iter().any(|e| e["target"] == id.as_str()),
        "audit: {events:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_mounts_refuse_writes_and_the_size_is_enforced() -> Result<()> {
    read_only_and_size_on("docker").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_read_only_mounts_and_the_size_are_enforced() -> Result<()> {
    read_only_and_size_on("namespaces").await
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_read_only_mounts_and_the_size_are_enforced() -> Result<()> {
    read_only_and_size_on("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_read_only_mounts_and_the_size_are_enforced() -> Result<()> {
    read_only_and_size_on("qemu").await
}

async fn read_only_and_size_on(provider: &str) -> Result<()> {
    let (server, _guard) = start()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    volume(&admin, "small", 16).await?;
    let rw = with_volume_on(&admin, provider, "small", "/data", false).await?;
    // Several sandboxes may mount one volume at once, read-only or not.
    let ro = with_volume_on(&admin, provider, "small", "/ro", true).await?;
    admin.sh(&rw, "echo shared > /data/x").await?;
    ensure!(admin.sh(&ro, "cat /ro/x").await?.trim() == "shared");
    let out = admin
        .exec(&ro, json!({"cmd": ["sh", "-c", "echo no > /ro/y"]}))
        .await?;
    ensure!(out["exit_code"] != 0, "a read-only write succeeded: {out}");
    ensure!(
        out["stderr"]
            .as_str()
            .unwrap_or_default()
            .contains("Read-only"),
        "{out}"
    );
    // Nor can the sandbox's root make it writable again.
    let out = admin
        .exec(
            &ro,
            json!({"cmd": ["sh", "-c", "mount -o remount,rw /ro; echo no > /ro/y"]}),
        )
        .await?;
    ensure!(out["exit_code"] != 0, "a remount made it writable: {out}");
    admin.sh(&rw, "test ! -e /data/y").await?;

    let out = admin
        .exec(
            &rw,
            json!({"cmd": ["sh", "-c", "dd if=/dev/zero of=/data/big bs=1M count=64"], "timeout_s": 60}),
        )
        .await?;
    ensure!(
        out["exit_code"] != 0,
        "writing past the size succeeded: {out}"
    );
    ensure!(
        out["stderr"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left"),
        "{out}"
    );
    admin.destroy(&rw).await?;
    admin.destroy(&ro).await?;
    admin.delete("/v1/volumes/small").await?.ok(204)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_server_mounts_its_volumes_again() -> Result<()> {
    let (mut server, _guard) = start()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let v = volume(&admin, "keep", 16).await?;
    let id = s(&v, "id")?.to_owned();
    let sbx = with_volume(&admin, "keep", "/keep", false).await?;
    admin.sh(&sbx, "echo across > /keep/f").await?;
    admin.destroy(&sbx).await?;
    server.sigterm()?;
    // As after a host reboot: nothing is mounted any more.
    let mnt = server.data_dir().join("volumes/mnt").join(&id);
    let st = std::process::Command::new("umount").arg(&mnt).status()?;
    ensure!(st.success(), "unmounting {}", mnt.display());
    server.restart()?;
    let admin = server.admin();
    let sbx = with_volume(&admin, "keep", "/keep", false).await?;
    ensure!(admin.sh(&sbx, "cat /keep/f").await?.trim() == "across");
    admin.destroy(&sbx).await?;
    admin.delete("/v1/volumes/keep").await?.ok(204)?;
    ensure!(
        host_traces(&server, &id).is_empty(),
        "left: {:?}",
        host_traces(&server, &id)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_volume_requests_are_refused_naming_the_field() -> Result<()> {
    let (server, _guard) = start()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    for (body, field) in [
        (json!({"name": "../x", "size_mb": 16}), "name"),
        (json!({"name": "UP", "size_mb": 16}), "name"),
        (json!({"name": "ok", "size_mb": 1}), "size_mb"),
        (json!({"name": "ok", "size_mb": 1_000_000_000}), "size_mb"),
    ] {
        let e = admin
            .post("/v1/volumes", body.clone())
            .await?
            .err(400, "invalid_request")?;
        ensure!(e.message.contains(field), "{body}: {}", e.message);
    }
    volume(&admin, "v", 16).await?;
    for (path, why) in [
        ("data", "relative"),
        ("/", "root"),
        ("/proc", "proc"),
        ("/sys/fs", "sys"),
        ("/dev/x", "dev"),
        ("/.stacyvm", "agent"),
        ("/.stacyvm/agent", "agent binary"),
        ("/a/../proc", "dot-dot"),
        ("/a/", "trailing slash"),
    ] {
        let e = admin
            .post(
                "/v1/sandboxes",
                json!({"image": "busybox", "provider": "docker",
                    "volumes": [{"volume": "v", "path": path}]}),
            )
            .await?
            .err(400, "invalid_request")
            .with_context(|| why.to_owned())?;
        ensure!(
            e.message.contains("volumes[0].path"),
            "{why}: {}",
            e.message
        );
    }
    let e = admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "docker",
                "volumes": [{"volume": "v", "path": "/a"}, {"volume": "v", "path": "/a"}]}),
        )
        .await?
        .err(400, "invalid_request")?;
    ensure!(e.message.contains("volumes[1].path"), "{}", e.message);
    admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "docker",
                "volumes": [{"volume": "nope", "path": "/a"}]}),
        )
        .await?
        .err(404, "not_found")?;
    // A mount point through a symbolic link of the image is refused by the
    // providers that build the root themselves.
    // The image's /linuxrc is a link to /bin/busybox, /etc/passwd a file.
    for provider in ["namespaces", "proot"] {
        for path in ["/linuxrc", "/linuxrc/sub", "/etc/passwd/x"] {
            let e = admin
                .post(
                    "/v1/sandboxes",
                    json!({"image": "busybox", "provider": provider,
                        "volumes": [{"volume": "v", "path": path}]}),
                )
                .await?
                .err(400, "invalid_request")
                .with_context(|| format!("{provider} {path}"))?;
            ensure!(e.message.contains("volumes[0].path"), "{}", e.message);
        }
    }
    // The failed creates hold no claim on the volume.
    admin.delete("/v1/volumes/v").await?.ok(204)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_without_workers_has_nowhere_to_keep_a_volume() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .local_worker()
            .arg("--no-local-worker"),
    )?;
    let e = server
        .admin()
        .post("/v1/volumes", json!({"name": "v", "size_mb": 16}))
        .await?
        .err(503, "no_capacity")?;
    ensure!(e.message.contains("no remote worker"), "{}", e.message);
    Ok(())
}

/// With no in-process worker, a volume is kept on a remote worker's host,
/// and every sandbox that mounts it is placed on that worker: data written
/// by one sandbox is read by the next (of another provider), deletion waits
/// for the last of them, and another tenant sees none of it.
#[tokio::test(flavor = "multi_thread")]
async fn volumes_live_on_a_remote_worker_and_sandboxes_follow_them() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,namespaces")
            .remote_workers(),
    )?;
    let _guards: Vec<MountGuard> = server
        .workers
        .iter()
        .map(|w| MountGuard(w.data_dir().to_path_buf()))
        .collect();
    ensure!(server.workers.len() == 2, "two remote workers expected");
    let admin = server.admin();
    admin.import_busybox().await?;
    let v = volume(&admin, "shared", 16).await?;
    let id = s(&v, "id")?.to_owned();
    let image = format!("volumes/images/{id}.ext4");
    let holders: Vec<&crate::cluster::Worker> = server
        .workers
        .iter()
        .filter(|w| w.data_dir().join(&image).exists())
        .collect();
    ensure!(
        holders.len() == 1,
        "the volume's image is on {} workers",
        holders.len()
    );
    let holder = holders[0];
    let holder_id = holder.id().context("the holder has no id")?;
    ensure!(
        !server.data_dir().join(&image).exists(),
        "the control plane's own host made the image"
    );
    let mnt = holder.data_dir().join("volumes/mnt").join(&id);
    ensure!(
        mounts_under(&mnt) == [mnt.display().to_string()],
        "not mounted"
    );

    // Every sandbox of it runs on the holder, whichever provider.
    let mut first = String::new();
    for (i, provider) in ["namespaces", "docker", "namespaces"].iter().enumerate() {
        let sb = with_volume_on(&admin, provider, "shared", "/data", false).await?;
        let got = admin.get(&format!("/v1/sandboxes/{sb}")).await?.ok(200)?;
        ensure!(got["worker_id"] == holder_id.as_str(), "{provider}: {got}");
        if i == 0 {
            admin.sh(&sb, "echo from-the-first > /data/file").await?;
            first = sb;
        } else {
            let out = admin.sh(&sb, "cat /data/file").await?;
            ensure!(out.trim() == "from-the-first", "{provider}: {out:?}");
            admin.destroy(&sb).await?;
        }
    }
    ensure!(
        std::fs::read_to_string(mnt.join("file"))?.trim() == "from-the-first",
        "the file is not on the holder's volume"
    );

    // Another tenant's member sees nothing of it.
    let (_, member) = admin.tenant_with("member").await?;
    member
        .get("/v1/volumes/shared")
        .await?
        .err(404, "not_found")?;
    member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "volumes": [{"volume": "shared", "path": "/d"}]}),
        )
        .await?
        .err(404, "not_found")?;

    // Deleted only once its last sandbox is gone; nothing is left on the
    // holder's host.
    let e = admin
        .delete("/v1/volumes/shared")
        .await?
        .err(409, "conflict")?;
    ensure!(e.message.contains(&first), "{}", e.message);
    admin.destroy(&first).await?;
    admin.delete("/v1/volumes/shared").await?.ok(204)?;
    ensure!(
        !holder.data_dir().join(&image).exists()
            && mnt.symlink_metadata().is_err()
            && mounts_under(&mnt).is_empty(),
        "the volume is left on its worker"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_quotas_are_enforced_and_freed_by_delete() -> Result<()> {
    let (server, _guard) = start()?;
    let admin = server.admin();
    let (tenant, member) = admin.tenant_with("member").await?;
    let q = admin
        .put(
            &format!("/v1/tenants/{tenant}/quota"),
            json!({"max_volumes": 2, "max_volume_mb": 40}),
        )
        .await?
        .ok(200)?;
    ensure!(q["max_volumes"] == 2 && q["max_volume_mb"] == 40, "{q}");
    volume(&member, "a", 24).await?;
    let e = member
        .post("/v1/volumes", json!({"name": "b", "size_mb": 24}))
        .await?
        .err(429, "quota_exceeded")?;
    ensure!(e.message.contains("max_volume_mb"), "{}", e.message);
    volume(&member, "b", 16).await?;
    let e = member
        .post("/v1/volumes", json!({"name": "c", "size_mb": 8}))
        .await?
        .err(429, "quota_exceeded")?;
    ensure!(e.message.contains("max_volumes"), "{}", e.message);
    member.delete("/v1/volumes/a").await?.ok(204)?;
    volume(&member, "c", 8).await?;
    for v in ["b", "c"] {
        member.delete(&format!("/v1/volumes/{v}")).await?.ok(204)?;
    }
    ensure!(
        mounts_under(&server.data_dir().join("volumes")).is_empty(),
        "mounts left"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_take_real_disk_and_never_more_than_the_host_has() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (server, _guard) = start()?;
    let admin = server.admin();
    // The image holds all its blocks from the start.
    let v = volume(&admin, "whole", 64).await?;
    let id = s(&v, "id")?.to_owned();
    let image = server
        .data_dir()
        .join("volumes/images")
        .join(format!("{id}.ext4"));
    let meta = std::fs::metadata(&image).with_context(|| image.display().to_string())?;
    ensure!(
        meta.blocks() * 512 >= 64 << 20,
        "image holds {} bytes of 64 MiB",
        meta.blocks() * 512
    );
    admin.delete("/v1/volumes/whole").await?.ok(204)?;
    // The largest volume the API takes is more than this host's disk can
    // ever hold: the request's fault, a 400 naming the limit.
    let (avail_mb, size_mb) = df_mb(server.data_dir())?;
    ensure!(
        size_mb < 1024 * 1024,
        "the data dir's filesystem ({size_mb} MiB) holds the largest volume; this test needs a \
         smaller one"
    );
    let e = admin
        .post(
            "/v1/volumes",
            json!({"name": "huge", "size_mb": 1024 * 1024}),
        )
        .await?
        .err(400, "invalid_request")?;
    ensure!(e.message.contains("can hold"), "{}", e.message);
    // A size the disk holds but has no room for now is a 409 saying so.
    let now = avail_mb + 1024;
    // Within the filesystem's size less the reserve (at most 2 GiB), so
    // only the free space is short.
    ensure!(
        now + 2048 < size_mb,
        "this host's disk is almost empty: {avail_mb} of {size_mb} MiB free"
    );
    let e = admin
        .post("/v1/volumes", json!({"name": "huge", "size_mb": now}))
        .await?
        .err(409, "conflict")?;
    ensure!(e.message.contains("no room"), "{}", e.message);
    admin.get("/v1/volumes/huge").await?.err(404, "not_found")?;
    let images = server.data_dir().join("volumes/images");
    let left: Vec<_> = std::fs::read_dir(&images)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    ensure!(left.is_empty(), "left behind: {left:?}");
    ensure!(
        mounts_under(&server.data_dir().join("volumes")).is_empty(),
        "mounts left"
    );
    Ok(())
}

/// The space available and the size of the filesystem holding `dir`, in MiB.
fn df_mb(dir: &Path) -> Result<(i64, i64)> {
    let out = std::process::Command::new("df")
        .args(["-B1M", "--output=avail,size"])
        .arg(dir)
        .output()
        .context("running df")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let nums: Vec<i64> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match nums[..] {
        [avail, size] => Ok((avail, size)),
        _ => anyhow::bail!("df said {text:?}"),
    }
}
