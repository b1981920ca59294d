//! Containment: what code inside a sandbox can and cannot reach, against the
//! real providers. Docker and namespaces are tested for everything they
//! claim (pids, memory, network, file system, `/proc`); PRoot only for what
//! it claims (paths, `..` and symlinks resolved inside the root, and the
//! file API) — see docs/SECURITY.md for what PRoot does not contain; the
//! reference plugin (`plugin:ref`, which declares itself a boundary) for the
//! server's secrets and other sandboxes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{
    agent_bin, eventually, random_hex, runtime_exists, s, Api, Server, ServerOptions, StoreKind,
};

/// A host directory holding a secret file that no sandbox may read or change.
struct HostSecret {
    dir: tempfile::TempDir,
    secret: String,
}

impl HostSecret {
    fn new() -> Result<HostSecret> {
        let dir = tempfile::Builder::new()
            .prefix("svm-sec-host-")
            .tempdir_in("/tmp")
            .context("making the host secret dir")?;
        let secret = format!("host-secret-{}", random_hex(24));
        std::fs::write(dir.path().join("secret"), &secret).context("writing the host secret")?;
        Ok(HostSecret { dir, secret })
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// The host directory still holds only the untouched secret.
    fn check_untouched(&self) -> Result<()> {
        let names: Vec<String> = std::fs::read_dir(self.dir())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ensure!(
            names == ["secret"],
            "a sandbox created files in a host directory: {names:?}"
        );
        let now = std::fs::read_to_string(self.file())?;
        ensure!(now == self.secret, "a sandbox changed a host file: {now:?}");
        Ok(())
    }
}

async fn server_with(providers: &str) -> Result<(Server, Api)> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers(providers))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    Ok((server, admin))
}

/// A private copy of the agent binary that the sandboxes see at
/// `/.stacyvm/agent`, so a test can check that no sandbox changed it.
struct AgentCopy {
    _dir: tempfile::TempDir,
    path: PathBuf,
    original: Vec<u8>,
    mode: u32,
}

impl AgentCopy {
    fn new() -> Result<AgentCopy> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("svm-sec-agent-")
            .tempdir()?;
        let path = dir.path().join("stacyvm-agent");
        std::fs::copy(agent_bin()?, &path).context("copying the agent")?;
        let original = std::fs::read(&path)?;
        let mode = std::fs::metadata(&path)?.permissions().mode();
        Ok(AgentCopy {
            _dir: dir,
            path,
            original,
            mode,
        })
    }

    fn check_untouched(&self, provider: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&self.path)
            .with_context(|| format!("{provider}: a sandbox removed the host's agent binary"))?;
        ensure!(
            meta.permissions().mode() == self.mode,
            "{provider}: a sandbox changed the mode of the host's agent binary"
        );
        ensure!(
            std::fs::read(&self.path)? == self.original,
            "{provider}: a sandbox changed the host's agent binary"
        );
        Ok(())
    }
}

/// Runs `script` under `sh -c`, whatever its exit code; stdout + stderr.
async fn run(api: &Api, id: &str, script: &str) -> Result<(Value, String)> {
    let out = api
        .exec(id, json!({"cmd": ["sh", "-c", script], "timeout_s": 60}))
        .await?;
    let text = format!(
        "{}{}",
        out["stdout"].as_str().unwrap_or_default(),
        out["stderr"].as_str().unwrap_or_default()
    );
    Ok((out, text))
}

/// The host directory that holds a sandbox's agent socket.
fn socket_dir_of(server: &Server, id: &str) -> Result<PathBuf> {
    let candidates = [
        server.data_dir().join("docker"),
        PathBuf::from("/run/stacyvm/proot"),
        PathBuf::from("/run/stacyvm/namespaces"),
        PathBuf::from("/run/stacyvm"),
        PathBuf::from("/tmp"),
    ];
    for base in candidates {
        let Ok(rd) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name == id || name.ends_with(&format!("-{id}"))) && e.path().is_dir() {
                return Ok(e.path());
            }
        }
    }
    Err(anyhow!(
        "no agent socket directory found on the host for {id}"
    ))
}

/// The escape attempts every provider must contain: absolute host paths,
/// `..`, symbolic and hard links. `extra` adds provider-specific ones.
fn escape_script(secret: &HostSecret, other_socket_dir: &Path, extra: &[String]) -> String {
    let f = secret.file();
    let f = f.display();
    let d = secret.dir().display();
    let o = other_socket_dir.display();
    let mut attempts = vec![
        format!("cat {f}"),
        format!("cat /../../../..{f}"),
        format!("cd / && cat ../../../..{f}"),
        format!("ln -s {f} /tmp/sym && cat /tmp/sym"),
        format!("ln -s / /tmp/rootlink && cat /tmp/rootlink{f}"),
        format!("ln -s {d} /tmp/dirlink && ls /tmp/dirlink && cat /tmp/dirlink/secret"),
        format!("ln {f} /tmp/hard && cat /tmp/hard"),
        format!("ls -la {o}"),
        format!("ls -la /../..{o}"),
        format!("ls -la /var/run/docker.sock /run/docker.sock"),
        format!("echo pwned > {f}"),
        format!("echo pwned > {d}/planted"),
    ];
    attempts.extend(extra.iter().cloned());
    attempts
        .into_iter()
        .map(|a| format!("( {a} ) 2>&1; echo \"== exit $?\""))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn check_no_escape(provider: &str, extra: &[String]) -> Result<()> {
    let agent = AgentCopy::new()?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers(provider)
            .env("STACYVM_AGENT_BIN", &agent.path.display().to_string()),
    )?;
    let admin = &server.admin();
    admin.import_busybox().await?;
    let server = &server;
    let secret = HostSecret::new()?;
    // The agent is the one host file every sandbox sees: it must stay read-only.
    let mut extra = extra.to_vec();
    extra.extend(
        [
            "echo pwned >> /.stacyvm/agent",
            "ln /.stacyvm/agent /tmp/agent-hard && echo pwned >> /tmp/agent-hard",
            "chmod 777 /.stacyvm/agent",
            "rm -f /.stacyvm/agent",
            "mv /.stacyvm/agent /tmp/agent-moved",
        ]
        .map(str::to_owned),
    );
    let extra = &extra[..];
    let a = admin.sandbox(provider).await?;
    let b = admin.sandbox(provider).await?;
    let b_dir = socket_dir_of(server, &b)?;
    ensure!(b_dir.is_dir(), "{} exists on the host", b_dir.display());
    let sock_name = std::fs::read_dir(&b_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    let script = escape_script(&secret, &b_dir, extra);
    let (_, text) = run(admin, &a, &script).await?;
    eprintln!(
        "{provider}: {} escape attempts from inside a sandbox:\n{text}",
        script.lines().count()
    );
    ensure!(
        !text.contains(&secret.secret),
        "{provider}: a sandbox read a host file:\n{text}"
    );
    for name in &sock_name {
        ensure!(
            !text.contains(&format!(" {name}\n")),
            "{provider}: a sandbox listed another sandbox's socket dir ({name}):\n{text}"
        );
    }
    let (sock, _) = run(
        admin,
        &a,
        "test -S /var/run/docker.sock || test -S /run/docker.sock",
    )
    .await?;
    ensure!(
        sock["exit_code"] == 1,
        "{provider}: the Docker socket is visible in the sandbox"
    );
    secret.check_untouched()?;
    agent.check_untouched(provider)?;
    // The sandbox's own socket dir holds its own socket only.
    let own = admin.sh(&a, "ls /.stacyvm/run").await?;
    ensure!(
        own.split_whitespace().collect::<Vec<_>>() == ["agent.sock"],
        "{provider}: /.stacyvm/run shows more than the sandbox's own socket: {own:?}"
    );
    // The attempts above ran inside the sandbox: it keeps working.
    ensure!(admin.sh(&a, "echo alive").await?.trim() == "alive");
    ensure!(admin.sh(&b, "echo alive").await?.trim() == "alive");
    Ok(())
}

/// `/proc` escapes: a container's `/proc` shows its own processes, whose
/// roots are its own.
fn proc_escapes() -> Vec<String> {
    vec![
        "cat /proc/1/root/etc/hostname; ls /proc/1/root/tmp".to_owned(),
        "cat /proc/self/root/../../../tmp/svm-sec-host-*/secret".to_owned(),
        "cat /proc/1/root/../../tmp/svm-sec-host-*/secret".to_owned(),
        "cat /proc/1/cwd/../../tmp/svm-sec-host-*/secret".to_owned(),
        "ls -la /proc/1/root/tmp/svm-test-*/docker".to_owned(),
        "for p in /proc/[0-9]*; do cat $p/root/tmp/svm-sec-host-*/secret; done".to_owned(),
        "cat /sys/fs/cgroup/../../../tmp/svm-sec-host-*/secret".to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_sandbox_cannot_reach_host_files_sockets_or_proc() -> Result<()> {
    check_no_escape("docker", &proc_escapes()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_sandbox_cannot_reach_host_files_sockets_or_proc() -> Result<()> {
    let mut extra = proc_escapes();
    // What only root of the host could do; the sandbox is root of its own
    // user namespace alone.
    extra.extend(
        [
            "mount -t tmpfs none /mnt && echo mounted",
            "mount --bind / /mnt && ls /mnt/tmp",
            "unshare -U -r cat /proc/self/uid_map",
            "mknod /tmp/vda b 254 0 && head -c 64 /tmp/vda",
            "nsenter -t 1 -m cat /tmp/svm-sec-host-*/secret",
            "chroot /proc/1/root cat /tmp/svm-sec-host-*/secret",
        ]
        .map(str::to_owned),
    );
    check_no_escape("namespaces", &extra).await
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_sandbox_resolves_paths_and_links_inside_its_root() -> Result<()> {
    // Only what PRoot claims: path translation. `/proc/<pid>/root` is the
    // host's and is documented as not contained.
    check_no_escape("proot", &[]).await
}

/// Plants symlinks to host paths inside the sandbox, then reads and writes
/// through them with the file API: everything must stay inside.
async fn check_file_api_symlinks(provider: &str) -> Result<()> {
    let (_server, admin) = server_with(provider).await?;
    let secret = HostSecret::new()?;
    let id = admin.sandbox(provider).await?;
    let f = secret.file().display().to_string();
    let d = secret.dir().display().to_string();
    admin
        .sh(
            &id,
            &format!(
                "mkdir -p /work && ln -s {f} /work/secret && ln -s / /work/root \
                 && ln -s {d} /work/dir && ln -s /etc/shadow /work/shadow && ln -s /../../.. /work/up"
            ),
        )
        .await?;
    let q = |p: &str| format!("/v1/sandboxes/{id}/files?path={p}");
    // The suite runs as root, so the host's /etc/shadow is readable here.
    let host_shadow = std::fs::read("/etc/shadow").context("reading the host's /etc/shadow")?;
    ensure!(!host_shadow.is_empty(), "the host's /etc/shadow is empty");

    for path in [
        "/work/secret".to_owned(),
        format!("/work/root{f}"),
        "/work/dir/secret".to_owned(),
        format!("/work/up{f}"),
        format!("/../../..{f}"),
        "/work/shadow".to_owned(),
        "/work/root/etc/shadow".to_owned(),
    ] {
        let r = admin.get(&q(&path)).await?;
        ensure!(
            !r.text().contains(&secret.secret),
            "{provider}: the file API read a host file through {path}"
        );
        ensure!(
            r.status != 200 || r.body != host_shadow,
            "{provider}: the file API read the host's /etc/shadow through {path}"
        );
        if r.status != 200 {
            r.err(r.status, r.json()?["error"]["code"].as_str().unwrap_or("?"))?;
        }
    }
    let listed = admin
        .get(&format!("/v1/sandboxes/{id}/files/list?path=/work/dir"))
        .await?;
    ensure!(
        !listed.text().contains("\"secret\"") || listed.status != 200,
        "{provider}: the file API listed a host directory: {}",
        listed.text()
    );
    let glob = admin
        .get(&format!(
            "/v1/sandboxes/{id}/files/glob?pattern=/work/root{d}/*"
        ))
        .await?;
    ensure!(
        !glob.text().contains("secret"),
        "{provider}: glob matched a host file: {}",
        glob.text()
    );
    let stat = admin
        .get(&format!("/v1/sandboxes/{id}/files/stat?path=/work/secret"))
        .await?
        .ok(200)?;
    ensure!(stat["type"] == "symlink", "stat does not follow: {stat}");

    // Writes through the planted links land inside the sandbox or fail.
    for path in [
        "/work/secret".to_owned(),
        format!("/work/root{f}"),
        "/work/dir/planted".to_owned(),
        format!("/work/up{d}/planted2"),
    ] {
        let r = admin.put_bytes(&q(&path), b"pwned".to_vec()).await?;
        ensure!(
            r.status == 201 || (400..500).contains(&r.status),
            "{provider}: writing {path} gave {}: {}",
            r.status,
            r.text()
        );
    }
    // Move, chmod and delete through the links: each lands on the
    // sandbox's own copy of the path (the writes above made it), so each
    // succeeds, and its effect is visible inside, never on the host.
    let stat = |p: String| format!("/v1/sandboxes/{id}/files/stat?path={p}");
    for (from, to) in [
        ("/work/secret", "/work/dir/moved".to_owned()),
        ("/work/shadow", format!("/work/root{d}/moved2")),
    ] {
        let moved = admin
            .post(
                &format!("/v1/sandboxes/{id}/files/move"),
                json!({"from": from, "to": to, "overwrite": true}),
            )
            .await?
            .ok(200)
            .with_context(|| format!("{provider}: moving {from} to {to}"))?;
        ensure!(
            moved["type"] == "symlink",
            "{provider}: the link itself moves, not its target: {moved}"
        );
    }
    for inside in [format!("{d}/moved"), format!("{d}/moved2")] {
        let e = admin.get(&stat(inside.clone())).await?.ok(200)?;
        ensure!(
            e["type"] == "symlink",
            "{provider}: {inside} in the sandbox is the moved link: {e}"
        );
    }
    let chmodded = admin
        .post(
            &format!("/v1/sandboxes/{id}/files/chmod"),
            json!({"path": format!("/work/root{f}"), "mode": "0777"}),
        )
        .await?
        .ok(200)
        .with_context(|| format!("{provider}: chmod through /work/root"))?;
    ensure!(chmodded["mode"] == "0777", "{provider}: {chmodded}");
    let inside = admin.get(&stat(f.clone())).await?.ok(200)?;
    ensure!(
        inside["mode"] == "0777",
        "{provider}: the chmod changed the sandbox's {f}: {inside}"
    );
    admin
        .delete(&format!("/v1/sandboxes/{id}/files?path=/work/root{f}"))
        .await?
        .ok(204)
        .with_context(|| format!("{provider}: deleting through /work/root"))?;
    admin
        .get(&stat(f.clone()))
        .await?
        .err(404, "not_found")
        .with_context(|| format!("{provider}: the delete removed the sandbox's {f}"))?;
    secret.check_untouched()?;
    let mode = std::fs::metadata(secret.file())?;
    use std::os::unix::fs::PermissionsExt;
    ensure!(
        mode.permissions().mode() & 0o777 != 0o777,
        "{provider}: chmod through a symlink reached the host file"
    );
    // And what was written is visible inside the sandbox, where it belongs.
    let inside = admin
        .sh(
            &id,
            &format!("cat {f} 2>/dev/null; cat {d}/planted 2>/dev/null; true"),
        )
        .await?;
    ensure!(
        inside.contains("pwned"),
        "{provider}: the writes should have landed inside the sandbox: {inside:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_file_api_never_follows_planted_symlinks_out() -> Result<()> {
    check_file_api_symlinks("docker").await
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_file_api_never_follows_planted_symlinks_out() -> Result<()> {
    check_file_api_symlinks("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_file_api_never_follows_planted_symlinks_out() -> Result<()> {
    check_file_api_symlinks("namespaces").await
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_fork_bomb_is_stopped_by_the_pids_limit() -> Result<()> {
    let (server, admin) = server_with("docker").await?;
    let bomb = admin.sandbox("docker").await?;
    let bystander = admin.sandbox("docker").await?;
    let max = admin
        .sh(
            &bomb,
            "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
        )
        .await?;
    ensure!(max.trim() == "512", "the sandbox's pids limit: {max:?}");

    let api = admin.clone();
    let id = bomb.clone();
    let task = tokio::spawn(async move {
        api.post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["sh", "-c", "f() { f | f & }; f; sleep 60"], "timeout_s": 25}),
        )
        .await
    });
    // While the bomb runs: it hits the limit, and nothing else suffers. On
    // a host loaded by other suites forking is slow: the bomb has as long
    // as its exec's timeout. Whether the limit was reached is the kernel's
    // count of refused forks; the count of processes only samples a number
    // that rises and falls as refused shells exit.
    let peak = eventually(
        Duration::from_secs(25),
        "the bomb to hit the pids limit",
        || {
            let server = &server;
            let bomb = &bomb;
            async move {
                let (n, refused) = docker_pids_counters(server, bomb)?;
                Ok((refused > 0).then_some(n))
            }
        },
    )
    .await?;
    ensure!(peak <= 512, "the bomb exceeded the pids limit: {peak}");
    ensure!(admin.sh(&bystander, "echo alive").await?.trim() == "alive");
    let host = std::process::Command::new("sh")
        .args(["-c", "echo host-ok"])
        .output()
        .context("the host cannot start a process during the fork bomb")?;
    ensure!(String::from_utf8_lossy(&host.stdout).trim() == "host-ok");
    let healthz = server.anonymous().get("/healthz").await?;
    ensure!(
        healthz.status == 200,
        "the server stops serving during a fork bomb"
    );

    let out = task.await.context("the bomb task")??;
    ensure!(
        out.status == 200,
        "the bomb's exec answers with its result: {} {}",
        out.status,
        out.text().chars().take(300).collect::<String>()
    );
    let v = out.json()?;
    eprintln!(
        "fork bomb: {peak} processes when the limit refused a fork (limit 512); exec ended with exit {} signal {} timed_out {}",
        v["exit_code"], v["signal"], v["timed_out"]
    );
    // Once the exec is over its processes are gone and the sandbox works again.
    eventually(
        Duration::from_secs(60),
        "the bomb's processes to be gone",
        || {
            let server = &server;
            let bomb = &bomb;
            async move { Ok((docker_pids(server, bomb)? < 10).then_some(())) }
        },
    )
    .await?;
    ensure!(admin.sh(&bomb, "echo alive").await?.trim() == "alive");
    // The bomb sandbox can still be destroyed cleanly.
    admin.destroy(&bomb).await?;
    ensure!(
        !runtime_exists(&server, "docker", &bomb)?,
        "the bomb's container is gone"
    );
    ensure!(admin.sh(&bystander, "echo alive").await?.trim() == "alive");
    Ok(())
}

/// The number of processes in a sandbox's container, from the host.
fn docker_pids(server: &Server, id: &str) -> Result<u64> {
    Ok(docker_pids_counters(server, id)?.0)
}

/// The processes in a sandbox's container and how many forks its pids
/// limit has refused, from the host's cgroup files.
fn docker_pids_counters(server: &Server, id: &str) -> Result<(u64, u64)> {
    let name = format!("stacyvm-{}-{id}", server.instance_id().unwrap_or_default());
    let out = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{.State.Pid}}", &name])
        .output()
        .context("docker inspect")?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("the cgroups of {name} (pid {pid:?})"))?;
    // cgroup v1 (`N:pids:/path`) or v2 (`0::/path`, mounted at the root or at `unified`).
    let mut candidates = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        if controllers.split(',').any(|c| c == "pids") {
            candidates.push(format!("/sys/fs/cgroup/pids{path}"));
        } else if controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}"));
            candidates.push(format!("/sys/fs/cgroup/unified{path}"));
        }
    }
    let (dir, current) = candidates
        .iter()
        .find_map(|c| {
            Some((
                c,
                std::fs::read_to_string(format!("{c}/pids.current")).ok()?,
            ))
        })
        .ok_or_else(|| anyhow!("no pids.current for {name} among {candidates:?}"))?;
    let current = current
        .trim()
        .parse()
        .with_context(|| format!("pids.current of {name}: {current:?}"))?;
    // `max N`: the forks refused because the limit was reached.
    let events = std::fs::read_to_string(format!("{dir}/pids.events"))
        .with_context(|| format!("pids.events of {name}"))?;
    let refused = events
        .lines()
        .find_map(|l| l.strip_prefix("max "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow!("pids.events of {name} without a max count: {events:?}"))?;
    Ok((current, refused))
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_memory_hog_is_killed_by_the_memory_limit() -> Result<()> {
    let (server, admin) = server_with("docker").await?;
    let s = admin
        .create_sandbox(json!({"image": "busybox", "provider": "docker", "memory_mb": 64}))
        .await?;
    let id = s["id"].as_str().unwrap_or_default().to_owned();
    // dd allocates one 512 MiB block and fills it: far past 64 MiB.
    let out = admin
        .exec(
            &id,
            json!({"cmd": ["dd", "if=/dev/zero", "of=/dev/null", "bs=512M", "count=1"], "timeout_s": 60}),
        )
        .await?;
    ensure!(
        out["signal"] == 9 || out["exit_code"] == 137,
        "the hog was killed by the OOM killer: {out}"
    );
    ensure!(out["timed_out"] == false, "{out}");
    // The sandbox (its agent) survived, and so did the host and the server.
    ensure!(admin.sh(&id, "echo alive").await?.trim() == "alive");
    let st = admin.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    ensure!(st["state"] == "running", "{st}");
    admin.destroy(&id).await?;
    ensure!(!runtime_exists(&server, "docker", &id)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_network_none_has_only_loopback() -> Result<()> {
    check_network_none("docker").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_network_none_has_only_loopback() -> Result<()> {
    check_network_none("namespaces").await
}

async fn check_network_none(provider: &str) -> Result<()> {
    let (_server, admin) = server_with(provider).await?;
    let id = admin.sandbox(provider).await?;
    let ifaces = admin.sh(&id, "ls /sys/class/net").await?;
    ensure!(
        ifaces.split_whitespace().collect::<Vec<_>>() == ["lo"],
        "network none must have only lo: {ifaces:?}"
    );
    let dev = admin.sh(&id, "cat /proc/net/dev").await?;
    let names: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    ensure!(names == ["lo"], "/proc/net/dev: {dev}");
    let (out, text) = run(&admin, &id, "nc -w 2 1.1.1.1 80 </dev/null; echo rc=$?").await?;
    ensure!(
        !text.contains("rc=0"),
        "a connection left a network-none sandbox: {out}"
    );
    Ok(())
}

async fn check_agent_kill(provider: &str) -> Result<()> {
    let (server, admin) = server_with(provider).await?;
    let id = admin.sandbox(provider).await?;
    let other = admin.sandbox(provider).await?;
    // The exec'd shell's parent is the agent.
    let r = admin
        .send(
            admin
                .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .json(&json!({"cmd": ["sh", "-c", "kill -9 $PPID; sleep 5"], "timeout_s": 30})),
        )
        .await?;
    if r.status != 200 {
        let code = r.json()?["error"]["code"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        r.err(r.status, &code)?;
    }
    let st = eventually(
        Duration::from_secs(60),
        "the sandbox to be reported failed",
        || {
            let admin = &admin;
            let id = &id;
            async move {
                let v = admin.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
                Ok(matches!(s(&v, "state")?, "failed" | "lost").then_some(v))
            }
        },
    )
    .await?;
    ensure!(st["failure"].is_object(), "a failed sandbox says why: {st}");
    let again = admin
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await?;
    again.err(409, "conflict")?;
    let r = admin.delete(&format!("/v1/sandboxes/{id}")).await?;
    r.ok(204)?;
    ensure!(
        !runtime_exists(&server, provider, &id)?,
        "{provider}: the dead sandbox's runtime is gone"
    );
    ensure!(
        socket_dir_of(&server, &id).is_err(),
        "{provider}: the dead sandbox's socket dir is gone"
    );
    ensure!(admin.sh(&other, "echo alive").await?.trim() == "alive");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_sandbox_that_kills_its_agent_is_failed_and_destroyable() -> Result<()> {
    check_agent_kill("docker").await
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_sandbox_that_kills_its_agent_is_failed_and_destroyable() -> Result<()> {
    check_agent_kill("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_sandbox_that_kills_its_agent_is_failed_and_destroyable() -> Result<()> {
    check_agent_kill("namespaces").await
}

/// A server running Docker, namespaces and PRoot, and a member key of a
/// tenant the operator allowed all three.
async fn member_of_a_tenant_with_every_provider() -> Result<(Server, Api, Api)> {
    let (server, admin) = server_with("docker,namespaces,proot").await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let mut q = admin
        .get(&format!("/v1/tenants/{tenant}/quota"))
        .await?
        .ok(200)?;
    q["allowed_providers"] = json!(["docker", "namespaces", "proot"]);
    admin
        .put(&format!("/v1/tenants/{tenant}/quota"), q)
        .await?
        .ok(200)?;
    Ok((server, admin, member))
}

/// A server running the reference plugin (`examples/plugins/docker_cli.py`,
/// which declares itself a security boundary) as `plugin:ref`, and a member
/// key of a tenant allowed it.
async fn member_of_a_tenant_with_the_reference_plugin() -> Result<(Server, Api, Api)> {
    let plugin = crate::fixtures::workspace_root().join("examples/plugins/docker_cli.py");
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("plugin:ref")
            .env("STACYVM_PLUGINS", &format!("ref={}", plugin.display())),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    Ok((server, admin, member))
}

async fn check_member_cannot_reach_server_secrets(provider: &str) -> Result<()> {
    let (server, _admin, member) = if provider.starts_with("plugin:") {
        member_of_a_tenant_with_the_reference_plugin().await?
    } else {
        member_of_a_tenant_with_every_provider().await?
    };
    let victim = member.sandbox(provider).await?;
    let other_secret = format!("other-sandbox-secret-{}", random_hex(16));
    member
        .sh(&victim, &format!("echo {other_secret} > /work-secret"))
        .await?;
    let attacker = member.sandbox(provider).await?;
    let data = server.data_dir().display().to_string();
    let pid = server.pid().context("the server's pid")?;
    let run_base = format!("/run/stacyvm/{provider}");
    let script = format!(
        "cat /proc/{pid}/environ; cat /proc/1/environ; \
         for f in /proc/[0-9]*/environ; do cat \"$f\"; done; \
         cat {data}/admin.key; ls -la {data}; head -c 64 {data}/stacyvm.db; \
         cat /proc/{pid}/root{data}/admin.key; cat /proc/1/root{data}/admin.key; \
         cat {data}/{provider}/{victim}/upper/work-secret; \
         cat {run_base}/*-{victim}/root/work-secret; \
         for p in /proc/[0-9]*; do cat \"$p/root/work-secret\"; done; \
         ls /dev; cat /dev/vda 2>&1 | head -c 64; true"
    );
    let (_, text) = run(&member, &attacker, &script).await?;
    let secret = server.admin_key.clone();
    ensure!(
        !text.contains(&secret),
        "{provider}: a member's sandbox read the admin key"
    );
    ensure!(
        !text.contains("STACYVM_ADMIN_KEY"),
        "{provider}: a member's sandbox read the server's environment"
    );
    ensure!(
        !text.contains("SQLite format"),
        "{provider}: a member's sandbox read the database"
    );
    ensure!(
        !text.contains(&other_secret),
        "{provider}: a member's sandbox read another sandbox's file"
    );
    ensure!(
        !text.contains("instance.id") && !text.contains("images"),
        "{provider}: a member's sandbox listed the data dir: {text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_member_cannot_reach_server_secrets_data_dir_or_other_sandboxes() -> Result<()> {
    check_member_cannot_reach_server_secrets("docker").await
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_member_cannot_reach_server_secrets_data_dir_or_other_sandboxes() -> Result<()> {
    check_member_cannot_reach_server_secrets("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_member_cannot_reach_server_secrets_data_dir_or_other_sandboxes() -> Result<()> {
    check_member_cannot_reach_server_secrets("namespaces").await
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_member_cannot_reach_server_secrets_data_dir_or_other_sandboxes() -> Result<()> {
    check_member_cannot_reach_server_secrets("plugin:ref").await
}

/// The number of processes in a PRoot or namespaces sandbox's cgroup, from
/// the host.
fn cgroup_pids(provider: &str, id: &str) -> Result<u64> {
    for base in [
        format!("/sys/fs/cgroup/pids/stacyvm-{provider}"),
        format!("/sys/fs/cgroup/stacyvm-{provider}"),
    ] {
        let Ok(rd) = std::fs::read_dir(base) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(&format!("-{id}")) {
                let text = std::fs::read_to_string(e.path().join("pids.current"))?;
                return text.trim().parse().context("pids.current");
            }
        }
    }
    Err(anyhow!("no pids cgroup of sandbox {id}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_fork_bomb_is_stopped_by_the_pids_limit() -> Result<()> {
    check_fork_bomb_in_cgroup("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_fork_bomb_is_stopped_by_the_pids_limit() -> Result<()> {
    check_fork_bomb_in_cgroup("namespaces").await
}

async fn check_fork_bomb_in_cgroup(provider: &str) -> Result<()> {
    let (server, _admin, member) = member_of_a_tenant_with_every_provider().await?;
    let bomb = member.sandbox(provider).await?;
    let bystander = member.sandbox(provider).await?;
    let api = member.clone();
    let id = bomb.clone();
    let task = tokio::spawn(async move {
        api.post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["sh", "-c", "f() { f | f & }; f; sleep 30"], "timeout_s": 20}),
        )
        .await
    });
    let mut peak = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while !task.is_finished() && std::time::Instant::now() < deadline {
        peak = peak.max(cgroup_pids(provider, &bomb)?);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(peak > 100, "the bomb did not get going: {peak} processes");
    ensure!(peak <= 512, "the bomb exceeded the pids limit: {peak}");
    ensure!(member.sh(&bystander, "echo alive").await?.trim() == "alive");
    ensure!(
        server.anonymous().get("/healthz").await?.status == 200,
        "the server stops serving during a fork bomb"
    );
    let out = task.await.context("the bomb task")??;
    ensure!(out.status == 200, "the bomb's exec answers: {}", out.text());
    member.destroy(&bomb).await?;
    ensure!(!runtime_exists(&server, provider, &bomb)?);
    ensure!(member.sh(&bystander, "echo alive").await?.trim() == "alive");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_memory_hog_is_killed_by_the_memory_limit() -> Result<()> {
    check_memory_hog_in_cgroup("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_memory_hog_is_killed_by_the_memory_limit() -> Result<()> {
    check_memory_hog_in_cgroup("namespaces").await
}

async fn check_memory_hog_in_cgroup(provider: &str) -> Result<()> {
    let (server, _admin, member) = member_of_a_tenant_with_every_provider().await?;
    let s = member
        .create_sandbox(json!({"image": "busybox", "provider": provider, "memory_mb": 64}))
        .await?;
    let id = s["id"].as_str().unwrap_or_default().to_owned();
    let out = member
        .exec(
            &id,
            json!({"cmd": ["dd", "if=/dev/zero", "of=/dev/null", "bs=512M", "count=1"], "timeout_s": 60}),
        )
        .await?;
    ensure!(
        out["signal"] == 9 || out["exit_code"] == 137,
        "the hog was killed by the OOM killer: {out}"
    );
    if provider == "namespaces" {
        // The OOM killer took the hog, not the sandbox's init or agent.
        ensure!(member.sh(&id, "echo alive").await?.trim() == "alive");
    }
    member.destroy(&id).await?;
    ensure!(!runtime_exists(&server, provider, &id)?);
    Ok(())
}

async fn check_exec_with_exhausted_pids(provider: &str) -> Result<()> {
    let (server, _admin, member) = member_of_a_tenant_with_every_provider().await?;
    let id = member.sandbox(provider).await?;
    let pids = |server: &Server, id: &str| match provider {
        "docker" => docker_pids(server, id),
        p => cgroup_pids(p, id),
    };
    // Orphans in a session of their own outlive their exec and take all but
    // a few of the 512 processes the sandbox may have (whatever forks last
    // and fails gives its own back).
    member
        .sh(
            &id,
            "setsid sh -c 'yes 1000 | head -n 600 | xargs -P 600 -n 1 sleep' \
             </dev/null >/dev/null 2>&1 & echo started",
        )
        .await?;
    eventually(
        Duration::from_secs(120),
        "the orphans to fill the pids limit",
        || {
            let server = &server;
            let id = &id;
            async move { Ok((pids(server, id)? >= 490).then_some(())) }
        },
    )
    .await?;
    // Long commands take what is left, until one cannot start.
    let mut held = Vec::new();
    let mut exhausted = None;
    for _ in 0..30 {
        match member
            // It says so once it runs (a bare `sleep` would send nothing
            // until it ends), then holds its process.
            .exec_stream(
                &id,
                json!({"cmd": ["sh", "-c", "echo up; exec sleep 1000"], "timeout_s": 300}),
            )
            .await?
        {
            Ok(stream) => held.push(stream),
            Err(r) if r.status == 409 => {
                exhausted = Some(r.err(409, "sandbox_resource_exhausted")?);
                break;
            }
            Err(r) => anyhow::bail!(
                "{provider}: a command at the pids limit answered {}: {}",
                r.status,
                r.text()
            ),
        }
        // A stream refused mid-way (the agent could start no thread or
        // process for it) says so as its first event; one that runs says
        // `up` (a shell that cannot fork still execs).
        if let Some(stream) = held.last_mut() {
            let first = stream.next_event().await?.context("a first event")?;
            match first.event.as_str() {
                "error" => {
                    ensure!(
                        first.data["code"] == "sandbox_resource_exhausted",
                        "{provider}: {first:?}"
                    );
                    held.pop();
                    break;
                }
                "stdout" => ensure!(first.data["data"] == "up\n", "{provider}: {first:?}"),
                _ => anyhow::bail!("{provider}: a held command sent {first:?} first"),
            }
        }
    }
    let r = member
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"], "timeout_s": 30}),
        )
        .await?;
    let e = match exhausted {
        Some(e) => e,
        None => r.err(409, "sandbox_resource_exhausted")?,
    };
    ensure!(
        e.message.contains("process limit"),
        "{provider}: the error names the pids limit: {}",
        e.message
    );
    drop(held);
    // The sandbox is still destroyed cleanly, orphans and all.
    member.destroy(&id).await?;
    ensure!(!runtime_exists(&server, provider, &id)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_exec_at_the_pids_limit_is_a_clear_409() -> Result<()> {
    check_exec_with_exhausted_pids("docker").await
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_exec_at_the_pids_limit_is_a_clear_409() -> Result<()> {
    check_exec_with_exhausted_pids("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_exec_at_the_pids_limit_is_a_clear_409() -> Result<()> {
    check_exec_with_exhausted_pids("namespaces").await
}

// ---------------------------------------------------------------------------
// Egress: other machines yes; the host, and other sandboxes, no

/// A TCP server on every address of the host (`0.0.0.0`) that records the
/// peer of each connection it accepts (and closes it at once).
struct HostListener {
    port: u16,
    peers: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HostListener {
    async fn start() -> Result<HostListener> {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
        let port = listener.local_addr()?.port();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((_conn, peer)) = listener.accept().await {
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(peer.to_string());
            }
        });
        Ok(HostListener { port, peers, task })
    }

    fn peers(&self) -> Vec<String> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The host's first global IPv4 address on an interface that is not a
/// bridge or veth of containers.
fn host_primary_ipv4() -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .context("running ip addr")?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.get(1)?, f.get(3)?.split('/').next()?))
        })
        .find(|(dev, _)| {
            !["docker", "br-", "svm-", "veth", "svt", "svq"]
                .iter()
                .any(|p| dev.starts_with(p))
        })
        .map(|(_, addr)| addr.to_owned())
        .with_context(|| format!("no global IPv4 address outside container bridges: {out}"))
}

/// The sandbox's own address and its gateway (the host's address on the
/// sandbox's bridge), as the sandbox sees them.
async fn addresses_of(api: &Api, id: &str) -> Result<(String, String)> {
    let addr = api.sh(id, "ip -4 -o addr show dev eth0").await?;
    let addr = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .with_context(|| format!("no IPv4 address on eth0: {addr}"))?
        .to_owned();
    let route = api.sh(id, "ip route").await?;
    let gateway = route
        .lines()
        .find_map(|l| l.strip_prefix("default via "))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("no default route: {route}"))?
        .to_owned();
    Ok((addr, gateway))
}

/// Tries a TCP connection from the sandbox to `port` on each address at
/// once; returns the addresses it reached.
async fn reached_from(api: &Api, id: &str, addrs: &[String], port: u16) -> Result<Vec<String>> {
    let script = format!(
        "for a in {}; do (echo probe | nc -w 3 $a {port} >/dev/null 2>&1; echo \"$a rc=$?\") & done; wait",
        addrs.join(" ")
    );
    let (_, out) = run(api, id, &script).await?;
    ensure!(
        out.lines().count() == addrs.len(),
        "one result per address expected: {out}"
    );
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(" rc=0"))
        .map(str::to_owned)
        .collect())
}

async fn egress_sandbox(api: &Api, provider: &str) -> Result<String> {
    let sb = api
        .create_sandbox(json!({"image": "busybox", "provider": provider, "network": "egress"}))
        .await?;
    Ok(s(&sb, "id")?.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_egress_sandboxes_reach_neither_each_other_nor_the_host() -> Result<()> {
    egress_sandboxes_reach_neither_each_other_nor_the_host("docker").await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_egress_sandboxes_reach_neither_each_other_nor_the_host() -> Result<()> {
    egress_sandboxes_reach_neither_each_other_nor_the_host("namespaces").await
}

/// Two tenants' egress sandboxes on `provider`: neither reaches the other
/// or the host's services, while the host reaches a sandbox's listener.
async fn egress_sandboxes_reach_neither_each_other_nor_the_host(provider: &str) -> Result<()> {
    let (_server, admin) = server_with(provider).await?;
    let (_, member) = admin.tenant_with("member").await?;
    let a = egress_sandbox(&admin, provider).await?;
    let b = egress_sandbox(&member, provider).await?;
    let (a_ip, _) = addresses_of(&admin, &a).await?;
    let (b_ip, gateway) = addresses_of(&member, &b).await?;

    // Another tenant's sandbox, listening: unreachable by its address.
    admin
        .sh(&a, "setsid nc -l -p 8080 >/tmp/got 2>&1 </dev/null &")
        .await?;
    eventually(Duration::from_secs(20), "nc to listen", || async {
        let tcp = admin.sh(&a, "cat /proc/net/tcp /proc/net/tcp6").await?;
        Ok(tcp
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(":1F90") && f[3] == "0A"
            })
            .then_some(()))
    })
    .await?;
    let (_, from_b) = run(
        &member,
        &b,
        &format!("echo from-b | nc -w 3 {a_ip} 8080; echo rc=$?"),
    )
    .await?;
    ensure!(
        !from_b.contains("rc=0"),
        "sandbox {b} opened a connection to sandbox {a} at {a_ip}: {from_b}"
    );
    // The listener was there all along: the host gets in.
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((a_ip.as_str(), 8080)),
    )
    .await
    .context("the host's connection to the sandbox hung")??;
    tokio::io::AsyncWriteExt::write_all(&mut conn, b"from-host\n").await?;
    tokio::io::AsyncWriteExt::shutdown(&mut conn).await?;
    let got = eventually(Duration::from_secs(20), "the host's line", || async {
        let got = admin.sh(&a, "cat /tmp/got").await?;
        Ok(got.contains("from-host").then_some(got))
    })
    .await?;
    ensure!(got.trim() == "from-host", "sandbox {a} received {got:?}");

    // The host's own services: not through the gateway, not through its
    // address on the network it lives on.
    let listener = HostListener::start().await?;
    let targets = vec![gateway, host_primary_ipv4()?];
    let reached = reached_from(&member, &b, &targets, listener.port).await?;
    ensure!(
        reached.is_empty() && listener.peers().is_empty(),
        "an egress sandbox reached the host at {reached:?} (the host saw {:?})",
        listener.peers()
    );

    // DNS still answers (Docker's resolver, inside the sandbox's namespace).
    if provider == "docker" {
        let answer = member.sh(&b, "nslookup \"$(hostname)\"").await?;
        ensure!(answer.contains(&format!("Address: {b_ip}")), "{answer}");
    }
    admin.destroy(&a).await?;
    member.destroy(&b).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_egress_host_access_flag_lets_sandboxes_reach_the_host() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .arg("--egress-host-access"),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let id = egress_sandbox(&member, "docker").await?;
    let (_, gateway) = addresses_of(&member, &id).await?;
    let listener = HostListener::start().await?;
    let mut targets = vec![gateway, host_primary_ipv4()?];
    let mut reached = reached_from(&member, &id, &targets, listener.port).await?;
    targets.sort();
    reached.sort();
    ensure!(reached == targets, "reached {reached:?} of {targets:?}");
    ensure!(listener.peers().len() == 2, "{:?}", listener.peers());
    member.destroy(&id).await?;
    Ok(())
}
