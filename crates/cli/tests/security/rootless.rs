//! The namespaces provider of a server that is not root: `stacyvm serve`
//! runs as a throwaway unprivileged uid (through `setpriv`), and the real
//! kernel's unprivileged user namespaces and overlayfs carry its sandboxes.
//! Checked: `/v1/status` names the mode and the limits it cannot enforce, a
//! create that needs them is refused, sandboxes work (exec, files, working
//! directory), contain a member's code (the data dir, the server's secrets,
//! another sandbox, host files the server's user may read, `/proc/1/root`,
//! `..` and symlinks), pause is a clear 409, and destroy leaves no process,
//! mount or file. A host that refuses unprivileged user namespaces fails
//! these tests. Beside them, the status of a server that is root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{eventually, random_hex, Api, Server, ServerOptions, StoreKind};

/// A throwaway unprivileged identity with a data dir and a host secret of
/// its own: files that a process escaping a sandbox as the server's user
/// could read, which no sandbox may.
struct RootlessHost {
    uid: u32,
    gid: u32,
    data: tempfile::TempDir,
    secret_dir: tempfile::TempDir,
    secret: String,
}

impl RootlessHost {
    fn new() -> Result<RootlessHost> {
        // No account: an id nothing else on the host runs as, so every
        // process of it at the end is a leftover of this test.
        let uid = 420_000 + std::process::id() % 20_000;
        let gid = uid;
        let data = tempfile::Builder::new()
            .prefix("svm-rootless-data-")
            .tempdir_in("/tmp")
            .context("making the data dir")?;
        let secret_dir = tempfile::Builder::new()
            .prefix("svm-rootless-host-")
            .tempdir_in("/tmp")
            .context("making the host secret dir")?;
        let secret = format!("rootless-host-secret-{}", random_hex(24));
        std::fs::write(secret_dir.path().join("secret"), &secret)?;
        for (p, mode) in [
            (data.path().to_path_buf(), 0o700),
            (secret_dir.path().to_path_buf(), 0o700),
            (secret_dir.path().join("secret"), 0o600),
        ] {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                .with_context(|| format!("handing {} to uid {uid}", p.display()))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(RootlessHost {
            uid,
            gid,
            data,
            secret_dir,
            secret,
        })
    }

    fn data(&self) -> &Path {
        self.data.path()
    }

    fn secret_file(&self) -> PathBuf {
        self.secret_dir.path().join("secret")
    }

    fn server(&self, allow_unenforced_limits: bool) -> Result<Server> {
        let mut o = ServerOptions::new(StoreKind::Sqlite)
            .providers("namespaces")
            .data_dir(self.data())
            .run_as(self.uid, self.gid)
            .env("HOME", &self.data().display().to_string());
        if allow_unenforced_limits {
            o = o.env("STACYVM_NAMESPACES_UNENFORCED_LIMITS", "allow");
        }
        Server::start(o)
    }

    /// Once the server is gone: no process of the uid, no mount of the
    /// data dir in any mount namespace.
    async fn check_nothing_left(&self) -> Result<()> {
        let uid = self.uid;
        eventually(
            Duration::from_secs(30),
            "the uid's processes to end",
            || async move {
                let left = pids_where(|pid| uid_of(pid) == Some(uid));
                Ok(left.is_empty().then_some(()))
            },
        )
        .await?;
        let data = self.data().display().to_string();
        let mounted = mounts_mentioning(&data);
        ensure!(
            mounted.is_empty(),
            "mounts of the data dir remain: {mounted:?}"
        );
        Ok(())
    }
}

fn pids_where(f: impl Fn(i32) -> bool) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| f(p))
        .collect()
}

fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Lines of any process's mountinfo that mention `needle`.
fn mounts_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for pid in pids_where(|_| true) {
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        out.extend(
            info.lines()
                .filter(|l| l.contains(needle))
                .map(|l| format!("{pid}: {l}")),
        );
    }
    out
}

/// The namespaces entry of `/v1/status`.
async fn namespaces_status(admin: &Api) -> Result<Value> {
    let st = admin.get("/v1/status").await?.ok(200)?;
    st["providers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "namespaces"))
        .cloned()
        .ok_or_else(|| anyhow!("no namespaces provider in the status: {st}"))
}

async fn check_status(admin: &Api, host: &RootlessHost) -> Result<Value> {
    let ns = namespaces_status(admin).await?;
    ensure!(
        ns["healthy"] == true,
        "the rootless provider is unhealthy: {ns}"
    );
    ensure!(
        ns["mode"] == "rootless",
        "the status does not say rootless: {ns}"
    );
    ensure!(
        ns["not_enforced"] == json!(["memory", "cpu", "pids", "pause"]),
        "the status must name every limit it cannot enforce here: {ns}"
    );
    let detail = ns["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains("single id") && detail.contains(&format!("uid {}", host.uid)),
        "the detail must say sandboxes map the server's own uid: {detail}"
    );
    Ok(ns)
}

/// The same status fields of a server that is root, on a host whose
/// cgroups carry every limit (v1 `cpu`, `memory`, `pids` and `freezer`
/// beside a cgroup2 mount, or pure v2): `root`, nothing unenforced, and the
/// detail names the limits and where they come from. A create's limits are
/// then its cgroups' limits.
#[tokio::test(flavor = "multi_thread")]
async fn root_namespaces_status_names_its_mode_and_the_limits_it_enforces() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("namespaces"))?;
    let admin = server.admin();
    let ns = namespaces_status(&admin).await?;
    ensure!(ns["healthy"] == true, "{ns}");
    ensure!(ns["mode"] == "root", "the status must say root: {ns}");
    ensure!(
        ns["not_enforced"] == json!([]),
        "a host with every controller enforces every limit: {ns}"
    );
    let detail = ns["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains("mode: root;")
            && detail.contains("limits enforced: pids, memory, cpu (")
            && !detail.contains("pause unsupported"),
        "the detail must name the limits and their cgroups: {detail}"
    );
    admin.import_busybox().await?;
    let id = admin
        .create_sandbox(json!({
            "image": "busybox", "provider": "namespaces", "memory_mb": 200, "cpu": 0.5
        }))
        .await?;
    let id = id["id"].as_str().unwrap_or_default().to_owned();
    // Read on the host, from the cgroups its init is in (inside, its
    // cgroup namespace hides where they are).
    let dir = server.data_dir().join("namespaces").join(&id);
    let init: i32 = std::fs::read_to_string(dir.join("init.pid"))?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no init pid for {id}"))?;
    let limit = |file: &str, v1: &str| -> Result<String> {
        let groups = std::fs::read_to_string(format!("/proc/{init}/cgroup"))?;
        for line in groups.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(controllers), Some(path)) = (controllers, path) else {
                continue;
            };
            let base = if controllers.split(',').any(|c| c == v1) {
                format!("/sys/fs/cgroup/{v1}{path}")
            } else if controllers.is_empty() {
                format!("/sys/fs/cgroup{path}")
            } else {
                continue;
            };
            if let Ok(v) = std::fs::read_to_string(format!("{base}/{file}")) {
                return Ok(v.trim().to_owned());
            }
        }
        Err(anyhow!("no {file} for the init's cgroups: {groups}"))
    };
    let memory = limit("memory.limit_in_bytes", "memory").or_else(|_| limit("memory.max", ""))?;
    let pids = limit("pids.max", "pids")?;
    ensure!(
        memory == (200u64 << 20).to_string() && pids == "512",
        "memory_mb 200 and pids 512 must be the sandbox's cgroup limits: {memory} {pids}"
    );
    admin.destroy(&id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rootless_namespaces_refuses_limits_it_cannot_enforce() -> Result<()> {
    let host = RootlessHost::new()?;
    {
        let server = host.server(false)?;
        let admin = server.admin();
        let ns = check_status(&admin, &host).await?;
        ensure!(
            ns["detail"]
                .as_str()
                .is_some_and(|d| d.contains("creates are refused")),
            "the detail must say creates are refused: {ns}"
        );
        admin.import_busybox().await?;
        let e = admin
            .post(
                "/v1/sandboxes",
                json!({"image": "busybox", "provider": "namespaces", "memory_mb": 256}),
            )
            .await?
            .err(409, "unsupported")?;
        for named in [
            "memory_mb 256",
            "cpu",
            "pids",
            "STACYVM_NAMESPACES_UNENFORCED_LIMITS",
        ] {
            ensure!(
                e.message.contains(named),
                "the refusal must name {named:?}: {}",
                e.message
            );
        }
        let left: Vec<_> = std::fs::read_dir(host.data().join("namespaces"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        ensure!(left.is_empty(), "a refused create left {left:?}");
    }
    host.check_nothing_left().await
}

#[tokio::test(flavor = "multi_thread")]
async fn rootless_namespaces_runs_contains_and_cleans_up() -> Result<()> {
    let host = RootlessHost::new()?;
    {
        let server = host.server(true)?;
        let admin = server.admin();
        check_status(&admin, &host).await?;
        admin.import_busybox().await?;
        let (_, member) = admin.tenant_with("member").await?;

        // The sandbox's root is the server's uid and nothing else; the
        // hardening of root mode holds.
        let a = member.sandbox("namespaces").await?;
        let me = member
            .sh(
                &a,
                "id -u; cat /proc/self/uid_map; \
                 grep -E '^(NoNewPrivs|Seccomp|CapBnd):' /proc/self/status; \
                 ip link 2>/dev/null | grep -c '^[0-9]' || ls /sys/class/net | wc -l",
            )
            .await?;
        let words: Vec<&str> = me.split_whitespace().collect();
        ensure!(
            words.starts_with(&["0", "0", &host.uid.to_string(), "1"]),
            "the sandbox's root must map the server's uid alone: {me}"
        );
        ensure!(
            me.contains("NoNewPrivs:\t1") && me.contains("Seccomp:\t2"),
            "no_new_privs and seccomp: {me}"
        );
        ensure!(
            me.contains("CapBnd:\t00000000a80425fb"),
            "the bounding set must be Docker's default: {me}"
        );
        ensure!(
            me.trim_end().ends_with('1'),
            "network none has loopback only: {me}"
        );

        // Files both ways, and a working directory made inside the root.
        member
            .put_bytes(
                &format!("/v1/sandboxes/{a}/files?path=/work/in.txt"),
                b"hello rootless".to_vec(),
            )
            .await?
            .ok(201)?;
        let got = member
            .sh(&a, "cat /work/in.txt; printf out > /work/out.txt")
            .await?;
        ensure!(got == "hello rootless", "read back {got:?}");
        let back = member
            .get(&format!("/v1/sandboxes/{a}/files?path=/work/out.txt"))
            .await?;
        ensure!(
            back.status == 200 && back.body == b"out",
            "the file API read {} {:?}",
            back.status,
            back.text()
        );
        let w = member
            .create_sandbox(json!({
                "image": "busybox", "provider": "namespaces", "workdir": "/srv/app/deep"
            }))
            .await?;
        let w = w["id"].as_str().unwrap_or_default().to_owned();
        ensure!(member.sh(&w, "pwd").await?.trim() == "/srv/app/deep");

        // Containment: another sandbox, the data dir, the server's secrets
        // and a host file the server's user may read are out of reach.
        let victim_secret = format!("victim-secret-{}", random_hex(16));
        member
            .sh(&w, &format!("echo {victim_secret} > /work-secret"))
            .await?;
        let data = host.data().display().to_string();
        let f = host.secret_file().display().to_string();
        let d = host.secret_dir.path().display().to_string();
        let pid = server.pid().context("the server's pid")?;
        let script = [
            format!("cat {f}"),
            format!("cat /../../../..{f}"),
            format!("cd / && cat ../../../..{f}"),
            format!("ln -s {f} /tmp/sym && cat /tmp/sym"),
            format!("ln -s / /tmp/rootlink && cat /tmp/rootlink{f}"),
            format!("ln -s {d} /tmp/dirlink && cat /tmp/dirlink/secret"),
            format!("echo pwned > {f}"),
            format!("cat /proc/1/root{f}; cat /proc/1/root/../..{f}"),
            format!("cat /proc/1/cwd/../..{f}"),
            format!("for p in /proc/[0-9]*; do cat $p/root{f} $p/root/work-secret; done"),
            format!("cat /proc/{pid}/environ; cat /proc/{pid}/root{f}"),
            "for e in /proc/[0-9]*/environ; do cat $e; done".to_owned(),
            format!("ls -la {data}; head -c 64 {data}/stacyvm.db; cat {data}/instance.id"),
            format!("cat {data}/namespaces/{w}/upper/work-secret"),
            format!("ls -la {data}/run; cat {data}/run/*-{w}/sock/env"),
            "ls -la /.stacyvm/run; cat /.stacyvm/run/env".to_owned(),
            format!("cat /sys/fs/cgroup/../../..{f}"),
            "mount -t proc proc /mnt && cat /mnt/1/root/etc/hostname".to_owned(),
            "unshare -U -r cat /proc/1/root/etc/hostname".to_owned(),
        ]
        .into_iter()
        .map(|a| format!("( {a} ) 2>&1; echo \"== exit $?\""))
        .collect::<Vec<_>>()
        .join("\n");
        let out = member
            .exec(&a, json!({"cmd": ["sh", "-c", script], "timeout_s": 60}))
            .await?;
        let text = format!(
            "{}{}",
            out["stdout"].as_str().unwrap_or_default(),
            out["stderr"].as_str().unwrap_or_default()
        );
        eprintln!("escape attempts from a rootless sandbox:\n{text}");
        ensure!(
            !text.contains(&host.secret),
            "a sandbox read a host file:\n{text}"
        );
        ensure!(
            !text.contains(&victim_secret),
            "a sandbox read another sandbox's file:\n{text}"
        );
        ensure!(
            !text.contains(&server.admin_key) && !text.contains("STACYVM_ADMIN_KEY"),
            "a sandbox read the server's environment:\n{text}"
        );
        let instance = server.instance_id().context("the server's instance id")?;
        ensure!(
            !text.contains("SQLite format") && !text.contains(&instance),
            "a sandbox reached the data dir:\n{text}"
        );
        ensure!(
            std::fs::read_to_string(host.secret_file())? == host.secret,
            "a sandbox changed a host file"
        );
        let names: Vec<_> = std::fs::read_dir(host.secret_dir.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        ensure!(names == ["secret"], "a sandbox planted files: {names:?}");
        ensure!(member.sh(&w, "cat /work-secret").await?.trim() == victim_secret);

        // Pause needs a freezer this mode does not have.
        let e = member
            .post(&format!("/v1/sandboxes/{a}/pause"), json!({}))
            .await?
            .err(409, "unsupported")?;
        ensure!(e.message.contains("pause"), "{}", e.message);
        ensure!(member.sh(&a, "echo alive").await?.trim() == "alive");

        // Destroy ends every process of the sandbox (its PID namespace),
        // its overlay and its files.
        let dir = host.data().join("namespaces").join(&a);
        let init: i32 = std::fs::read_to_string(dir.join("init.pid"))?
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no init pid for {a}"))?;
        let pidns = std::fs::read_link(format!("/proc/{init}/ns/pid"))?;
        member
            .sh(
                &a,
                "sleep 1000 >/dev/null 2>&1 & (setsid sleep 1000 >/dev/null 2>&1 &); true",
            )
            .await?;
        let upper = dir.join("upper").display().to_string();
        ensure!(
            !mounts_mentioning(&upper).is_empty(),
            "the sandbox's overlay is not found before destroy"
        );
        member.destroy(&a).await?;
        ensure!(!dir.exists(), "{} is left after destroy", dir.display());
        let run_left: Vec<_> = std::fs::read_dir(host.data().join("run"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(&a))
            .collect();
        ensure!(run_left.is_empty(), "run dirs left: {run_left:?}");
        let pidns2 = pidns.clone();
        eventually(
            Duration::from_secs(10),
            "the sandbox's processes to end",
            || {
                let pidns = pidns2.clone();
                async move {
                    let left = pids_where(|p| {
                        std::fs::read_link(format!("/proc/{p}/ns/pid"))
                            .ok()
                            .as_ref()
                            == Some(&pidns)
                    });
                    Ok(left.is_empty().then_some(()))
                }
            },
        )
        .await?;
        let mounted = mounts_mentioning(&upper);
        ensure!(
            mounted.is_empty(),
            "the overlay outlived destroy: {mounted:?}"
        );
        ensure!(member.sh(&w, "echo alive").await?.trim() == "alive");
        member.destroy(&w).await?;
    }
    host.check_nothing_left().await
}

/// A root server on a host without cgroups cannot enforce any limit: it
/// says so and refuses creates, unless the operator allowed them.
#[tokio::test(flavor = "multi_thread")]
async fn root_namespaces_without_cgroups_refuses_limits_unless_allowed() -> Result<()> {
    for allow in [false, true] {
        let mut opts = ServerOptions::new(StoreKind::Sqlite)
            .providers("namespaces")
            .without_cgroups();
        if allow {
            opts = opts.env("STACYVM_NAMESPACES_UNENFORCED_LIMITS", "allow");
        }
        let server = Server::start(opts)?;
        let admin = server.admin();
        let ns = namespaces_status(&admin).await?;
        ensure!(ns["mode"] == "root", "{ns}");
        ensure!(
            ns["not_enforced"]
                .as_array()
                .is_some_and(|m| m.iter().any(|x| x == "memory")),
            "no cgroups, no memory limit: {ns}"
        );
        admin.import_busybox().await?;
        let r = admin
            .post(
                "/v1/sandboxes",
                json!({"image": "busybox", "provider": "namespaces", "memory_mb": 256}),
            )
            .await?;
        if allow {
            let sb = r.ok(201)?;
            let id = sb["id"].as_str().unwrap_or_default().to_owned();
            admin.sh(&id, "true").await?;
            admin.destroy(&id).await?;
        } else {
            let e = r.err(409, "unsupported")?;
            ensure!(
                e.message.contains("memory_mb 256")
                    && e.message
                        .contains("STACYVM_NAMESPACES_UNENFORCED_LIMITS=allow"),
                "{}",
                e.message
            );
            let detail = ns["detail"].as_str().unwrap_or_default();
            ensure!(detail.contains("creates are refused"), "{detail}");
        }
    }
    Ok(())
}
