//! The namespaces provider on the real kernel: what a sandbox sees of the
//! host (its own ids, processes, devices, network, capabilities, system
//! calls), the shared read-only image below a per-sandbox writable layer,
//! limits, pause/resume, adoption by a new provider (a server restart),
//! and cleanup of sandboxes that died, detached or were never finished.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{ensure, Context};
use stacyvm_core::{ByteStream, SandboxId};
use stacyvm_provider::namespaces::{NamespacesConfig, NamespacesFeatures, NamespacesProvider};
use stacyvm_provider::{DynProvider, Provider};

use crate::proot::{interfaces, pid_alive, writes_stay_in_their_own_sandbox};
use crate::support::AgentCalls;
use crate::support::{self, exec_req, leftovers, Harness, TestEnv};

async fn harness() -> anyhow::Result<Harness> {
    let env = TestEnv::new().await?;
    let provider: DynProvider = Arc::new(support::namespaces_provider_now(&env)?);
    Ok(Harness::new(env, provider))
}

/// A provider without overlayfs and cgroups: a copy per sandbox, no limits.
fn fallback_provider(env: &TestEnv) -> anyhow::Result<DynProvider> {
    let cfg = NamespacesConfig {
        data_dir: env.data_dir.clone(),
        agent_bin: env.agent_bin.clone(),
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
        egress_dns_upstreams: Vec::new(),
    };
    let features = NamespacesFeatures {
        overlay: false,
        cgroup: false,
    };
    // Without cgroups no limit can be enforced, and creates are refused
    // unless the operator accepts that: these tests are about destroy and
    // adoption on such a host, so they accept it.
    Ok(Arc::new(
        NamespacesProvider::with_features(cfg, features)?.allow_unenforced_limits(true),
    ))
}

async fn fallback_harness() -> anyhow::Result<Harness> {
    let env = TestEnv::new().await?;
    let provider = fallback_provider(&env)?;
    Ok(Harness::new(env, provider))
}

fn sandbox_dir(h: &Harness, id: &SandboxId) -> PathBuf {
    h.env.data_dir.join("namespaces").join(id.as_str())
}

fn recorded_pid(h: &Harness, id: &SandboxId, file: &str) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(sandbox_dir(h, id).join(file))?;
    Ok(text
        .split_whitespace()
        .next()
        .context("an empty pid file")?
        .parse()?)
}

/// The host id of the sandbox's root, from its meta.
fn root_host_id(h: &Harness, id: &SandboxId) -> anyhow::Result<u32> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sandbox_dir(h, id).join("meta.json"))?)?;
    meta["ids"]["first"]
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .context("ids.first in the meta")
}

/// A field of a host process's `/proc/<pid>/status`.
fn status_field(pid: i32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
}

fn host_uid(pid: i32) -> anyhow::Result<u32> {
    status_field(pid, "Uid:")
        .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        .context("no Uid line")?
        .parse()
        .context("the uid")
}

/// Host processes running `argv` under the sandbox's ids.
fn host_processes(h: &Harness, id: &SandboxId, argv: &[&str]) -> anyhow::Result<Vec<i32>> {
    let first = root_host_id(h, id)?;
    let want = argv.join("\0") + "\0";
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmd == want.as_bytes()
            && host_uid(pid).is_ok_and(|u| (first..first + 65536).contains(&u))
        {
            out.push(pid);
        }
    }
    Ok(out)
}

fn body(data: &[u8]) -> ByteStream {
    support::body(data.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_namespaces_and_the_limits() -> anyhow::Result<()> {
    let h = harness().await?;
    let health = h.provider().health().await;
    ensure!(health.healthy, "{}", health.detail);
    for want in [
        "user (its root is a block of 65536",
        "mount, PID, network, UTS, IPC and cgroup namespaces",
        "seccomp allow-list",
        "root: an overlay",
        "limits enforced: pids, memory, cpu",
        "egress through a veth pair",
        "mode: root;",
    ] {
        ensure!(
            health.detail.contains(want),
            "{want:?} not in {}",
            health.detail
        );
    }
    let mode = h
        .provider()
        .mode()
        .context("the namespaces provider reports a mode")?;
    ensure!(mode.mode == "root", "{mode:?}");
    ensure!(
        mode.not_enforced.is_empty(),
        "a host with every controller enforces every limit: {mode:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sandbox_has_its_own_ids_processes_devices_and_kernel_view() -> anyhow::Result<()> {
    let h = harness().await?;
    let mut spec = support::spec();
    spec.env = [("TENANT_VALUE", "tenant-only")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let a = h.spawn(spec).await?;
    let b = h.spawn_default().await?;
    let (init_a, agent_a) = (
        recorded_pid(&h, &a, "init.pid")?,
        recorded_pid(&h, &a, "agent.pid")?,
    );
    let agent_b = recorded_pid(&h, &b, "agent.pid")?;
    let (root_a, root_b) = (root_host_id(&h, &a)?, root_host_id(&h, &b)?);
    ensure!(root_a != root_b, "two sandboxes share host ids");
    for (pid, want) in [(init_a, root_a), (agent_a, root_a), (agent_b, root_b)] {
        ensure!(
            host_uid(pid)? == want,
            "process {pid} runs as host user {}, not {want}",
            host_uid(pid)?
        );
    }
    ensure!(
        (1_900_000_000..1 << 31).contains(&root_a),
        "the sandbox's root is an unprivileged host id: {root_a}"
    );
    // Inside: root of its own user namespace, which maps 65536 ids.
    assert_eq!(h.sh_ok(&a, "id -u; id -g").await?, "0\n0\n");
    let map = h.sh_ok(&a, "cat /proc/self/uid_map").await?;
    let map: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(map, ["0", &root_a.to_string(), "65536"]);

    // PID 1 is the init, the agent its child; nothing of the host shows.
    let pids = h
        .sh_ok(&a, "ls /proc | grep -E '^[0-9]+$' | sort -n")
        .await?;
    let pids: Vec<i32> = pids.lines().filter_map(|l| l.parse().ok()).collect();
    ensure!(pids.starts_with(&[1, 2]), "the sandbox's pids: {pids:?}");
    assert_eq!(
        h.sh_ok(&a, "cat /proc/1/cmdline | tr '\\0' ' '").await?,
        "/.stacyvm/agent --init --listen /.stacyvm/run/agent.sock --env-file /.stacyvm/run/env "
    );
    ensure!(
        pids.len() < 10,
        "the sandbox sees more processes than its own: {pids:?}"
    );
    assert_eq!(h.sh_ok(&a, "hostname").await?.trim(), a.as_str());
    assert_eq!(
        h.sh_ok(&a, "cat /proc/self/cgroup | cut -d: -f3 | sort -u")
            .await?,
        "/\n"
    );

    // Its /dev holds only the harmless devices.
    let dev = h.sh_ok(&a, "ls /dev | sort | tr '\\n' ' '").await?;
    assert_eq!(
        dev.trim(),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    h.sh_ok(&a, "echo x > /dev/null && head -c 4 /dev/urandom | wc -c")
        .await?;

    // Docker's capabilities, no new privileges, the seccomp filter on.
    let status = h.sh_ok(&a, "cat /proc/self/status").await?;
    for want in [
        "CapEff:\t00000000a80425fb",
        "CapBnd:\t00000000a80425fb",
        "CapInh:\t0000000000000000",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        ensure!(status.contains(want), "{want:?} not in\n{status}");
    }

    // Masked and read-only kernel state; no mounts, no new namespaces.
    for (script, what) in [
        ("test ! -s /proc/timer_list", "/proc/timer_list is masked"),
        (
            "! echo 1 > /proc/sys/kernel/ns_last_pid",
            "/proc/sys is read-only",
        ),
        (
            "! echo c > /proc/sysrq-trigger",
            "/proc/sysrq-trigger is read-only",
        ),
        ("! touch /sys/kernel/x", "/sys is read-only"),
        (
            "! ls /sys/firmware/* 2>/dev/null | grep -q .",
            "/sys/firmware is masked",
        ),
        ("! mount -t tmpfs none /mnt", "mount is refused"),
        ("! unshare -U true", "unshare is refused"),
        ("! echo pwned >> /.stacyvm/agent", "the agent is read-only"),
        (
            "test $(ls /.stacyvm/run) = agent.sock",
            "the env file was read and deleted",
        ),
        (
            "test \"$TENANT_VALUE\" = tenant-only",
            "the tenant's environment arrives",
        ),
        (
            "test \"$STACYVM_SANDBOX\" = \"$(hostname)\"",
            "the sandbox marker is set",
        ),
    ] {
        let out = h.sh(&a, script).await?;
        ensure!(
            out.status.exit_code == Some(0),
            "{what}: `{script}` gave {:?}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The other sandbox is as private.
    let b_pids = h.sh_ok(&b, "ls /proc | grep -cE '^[0-9]+$'").await?;
    ensure!(
        b_pids.trim().parse::<u32>()? < 10,
        "b sees {b_pids} processes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped_by_the_sandboxs_init() -> anyhow::Result<()> {
    let h = harness().await?;
    let id = h.spawn_default().await?;
    // The shell exits at once; its background children become orphans.
    h.sh_ok(&id, "for i in 1 2 3; do sleep 0.1 & done").await?;
    let out = h
        .sh_ok(
            &id,
            "sleep 1; for s in /proc/[0-9]*/stat; do cut -d' ' -f3 $s; done | sort | uniq -c",
        )
        .await?;
    ensure!(!out.contains(" Z"), "zombies in the sandbox: {out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_come_from_the_sandboxs_cgroups() -> anyhow::Result<()> {
    let h = harness().await?;
    let mut spec = support::spec();
    spec.memory_mb = 96;
    spec.cpu = 0.5;
    let id = h.spawn(spec).await?;
    let pids = find_cgroup(&id, "pids").context("the sandbox's pids cgroup")?;
    assert_eq!(
        std::fs::read_to_string(pids.join("pids.max"))?.trim(),
        "512"
    );
    let memory = find_cgroup(&id, "memory").context("the sandbox's memory cgroup")?;
    let limit = std::fs::read_to_string(memory.join("memory.limit_in_bytes"))
        .or_else(|_| std::fs::read_to_string(memory.join("memory.max")))?;
    assert_eq!(limit.trim(), (96u64 << 20).to_string());
    // Every process of the sandbox is in it, the init included.
    let procs = std::fs::read_to_string(pids.join("cgroup.procs"))?;
    let init = recorded_pid(&h, &id, "init.pid")?;
    ensure!(
        procs.lines().any(|l| l.trim() == init.to_string()),
        "the init {init} is not in {procs}"
    );
    Ok(())
}

/// The directory of a sandbox's cgroup in the hierarchy that serves
/// `controller` (v1 `<mount>/<controller>/…`, or v2).
fn find_cgroup(id: &SandboxId, controller: &str) -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let options = r.nth(1).unwrap_or_default();
        let serves = match fstype {
            "cgroup" => options.split(',').any(|o| o == controller),
            "cgroup2" => true,
            _ => false,
        };
        if !serves {
            continue;
        }
        let base = PathBuf::from(left.split_whitespace().nth(4)?).join("stacyvm-namespaces");
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let has = e.path().join(format!("{controller}.max")).exists()
                || e.path()
                    .join(format!("{controller}.limit_in_bytes"))
                    .exists();
            if e.file_name().to_string_lossy().ends_with(id.as_str()) && has {
                return Some(e.path());
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stay_in_their_own_sandbox_and_never_reach_the_image() -> anyhow::Result<()> {
    writes_stay_in_their_own_sandbox(&harness().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_keep_writes_in_their_own_sandbox_too() -> anyhow::Result<()> {
    let h = fallback_harness().await?;
    let health = h.provider().health().await;
    ensure!(
        health.healthy && health.detail.contains("copy") && health.detail.contains("no limits"),
        "{}",
        health.detail
    );
    writes_stay_in_their_own_sandbox(&h).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_kills_processes_that_left_the_session() -> anyhow::Result<()> {
    destroy_kills_detached(&harness().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_destroy_still_kills_processes_that_left_the_session() -> anyhow::Result<()>
{
    let h = fallback_harness().await?;
    let mode = h
        .provider()
        .mode()
        .context("the namespaces provider reports a mode")?;
    ensure!(
        mode.mode == "root" && mode.not_enforced == ["memory", "cpu", "pids", "pause"],
        "without cgroups no limit is enforced: {mode:?}"
    );
    let id = h.spawn_default().await?;
    let r = h.provider().pause(&id).await;
    ensure!(
        matches!(&r, Err(e) if e.code() == "unsupported"),
        "pause without a cgroup: {r:?}"
    );
    destroy_kills_detached(&h).await
}

async fn destroy_kills_detached(h: &Harness) -> anyhow::Result<()> {
    let p = h.provider();
    let id = h.spawn_default().await?;
    // setsid puts the process in a session (and process group) of its own.
    h.sh_ok(
        &id,
        "setsid sh -c 'echo $$ > /tmp/detached.pid; exec sleep 1000' </dev/null >/dev/null 2>&1 &
         for i in $(seq 1 100); do [ -s /tmp/detached.pid ] && exit 0; sleep 0.05; done; exit 1",
    )
    .await?;
    let found = host_processes(h, &id, &["sleep", "1000"])?;
    let [pid] = found[..] else {
        anyhow::bail!("not one detached sleep on the host: {found:?}");
    };
    let sid = std::fs::read_to_string(format!("/proc/{pid}/stat"))?
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(3).map(str::to_owned));
    ensure!(
        sid == Some(pid.to_string()),
        "the process did not get a session of its own: {sid:?}"
    );
    p.destroy(&id).await?;
    ensure!(
        !pid_alive(pid as u32),
        "the detached process {pid} survived destroy"
    );
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_provider_adopts_running_sandboxes() -> anyhow::Result<()> {
    let h = harness().await?;
    let id = h.spawn_default().await?;
    h.sh_ok(&id, "echo before-restart > /work-state").await?;

    // The server goes away: the provider and its cached agent connection
    // are dropped. The sandbox keeps running on its own.
    let old = h
        .guard
        .take_provider()
        .context("the guard holds the provider")?;
    let weak = Arc::downgrade(&old);
    drop(old);
    ensure!(
        weak.upgrade().is_none(),
        "the old provider is still referenced"
    );
    let fresh: DynProvider = Arc::new(support::namespaces_provider_now(&h.env)?);
    h.guard.replace_provider(fresh.clone());

    let listed = fresh.list().await?;
    let me = listed
        .iter()
        .find(|r| r.sandbox_id == id)
        .context("the sandbox is listed after the restart")?;
    ensure!(me.running, "the adopted sandbox is not running: {listed:?}");
    assert_eq!(h.sh_ok(&id, "cat /work-state").await?, "before-restart\n");

    // Another instance on the same data directory does not claim it.
    let other = NamespacesProvider::new(NamespacesConfig {
        data_dir: h.env.data_dir.clone(),
        agent_bin: h.env.agent_bin.clone(),
        catalog: h.env.catalog.clone(),
        instance: format!("{}-other", h.env.instance),
        egress_dns_upstreams: Vec::new(),
    })?;
    ensure!(
        !other.list().await?.iter().any(|r| r.sandbox_id == id),
        "another instance listed our sandbox"
    );

    fresh.destroy(&id).await?;
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_a_new_provider_adopts_and_destroys() -> anyhow::Result<()> {
    let h = fallback_harness().await?;
    let id = h.spawn_default().await?;
    h.sh_ok(
        &id,
        "sleep 1000 </dev/null >/dev/null 2>&1 & echo kept > /work-state",
    )
    .await?;
    drop(h.guard.take_provider());
    let fresh = fallback_provider(&h.env)?;
    h.guard.replace_provider(fresh.clone());
    assert_eq!(h.sh_ok(&id, "cat /work-state").await?, "kept\n");
    let sleeper = host_processes(&h, &id, &["sleep", "1000"])?;
    ensure!(sleeper.len() == 1, "the sleeper on the host: {sleeper:?}");
    fresh.destroy(&id).await?;
    ensure!(
        !pid_alive(sleeper[0] as u32),
        "the sleeper survived destroy"
    );
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_and_resume_thaws() -> anyhow::Result<()> {
    let h = harness().await?;
    let p = h.provider();
    let id = h.spawn_default().await?;
    p.pause(&id).await?;
    let r = p.exec(&id, exec_req(&["true"])).await;
    ensure!(
        matches!(&r, Err(e) if e.code() == "conflict"),
        "exec while paused: {:?}",
        r.map(|o| o.status)
    );
    let agent = recorded_pid(&h, &id, "agent.pid")?;
    let state = status_field(agent, "State:").unwrap_or_default();
    let frozen = find_cgroup(&id, "freezer")
        .and_then(|d| std::fs::read_to_string(d.join("freezer.state")).ok())
        .is_some_and(|s| s.trim() == "FROZEN")
        || find_cgroup_events(&id)
            .and_then(|e| std::fs::read_to_string(e).ok())
            .is_some_and(|e| e.contains("frozen 1"));
    ensure!(
        frozen,
        "the sandbox's cgroup is not frozen (agent state {state})"
    );
    ensure!(pid_alive(agent as u32));

    p.resume(&id).await?;
    assert_eq!(h.sh_ok(&id, "echo thawed").await?, "thawed\n");
    // Destroy works on a paused sandbox too.
    p.pause(&id).await?;
    p.destroy(&id).await?;
    ensure!(
        !pid_alive(agent as u32),
        "the agent survived destroying a paused sandbox"
    );
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

/// `cgroup.events` of the sandbox's v2 cgroup.
fn find_cgroup_events(id: &SandboxId) -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let v2 = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap_or_default()))
    })?;
    std::fs::read_dir(v2.join("stacyvm-namespaces"))
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(id.as_str()))
        .map(|e| e.path().join("cgroup.events"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agent_ends_the_sandbox_which_is_listed_stopped_and_destroyed() -> anyhow::Result<()>
{
    let h = harness().await?;
    let p = h.provider();
    let id = h.spawn_default().await?;
    let init = recorded_pid(&h, &id, "init.pid")?;
    let agent = recorded_pid(&h, &id, "agent.pid")?;
    ensure!(pid_alive(agent as u32) && pid_alive(init as u32));
    // SAFETY: kill has no memory preconditions; the pid is the sandbox's
    // agent, checked alive just above.
    unsafe { libc::kill(agent, libc::SIGKILL) };
    // The init follows its agent, and the PID namespace with it.
    for _ in 0..400 {
        if !pid_alive(init as u32) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    ensure!(!pid_alive(init as u32), "the init outlived its agent");
    let listed = p.list().await?;
    let me = listed
        .iter()
        .find(|r| r.sandbox_id == id)
        .context("still listed")?;
    ensure!(
        !me.running,
        "a sandbox without its agent is listed as running"
    );
    let r = p.exec(&id, exec_req(&["true"])).await;
    ensure!(
        matches!(&r, Err(e) if e.code() == "conflict"),
        "exec without an agent: {:?}",
        r.map(|o| o.status)
    );
    let logs = p.logs(&id).await?;
    ensure!(
        logs.iter().any(|l| l.source == "provider"),
        "no provider lines in {logs:?}"
    );
    p.destroy(&id).await?;
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_created_sandboxes_are_listed_and_destroyed() -> anyhow::Result<()> {
    let h = harness().await?;
    let p = h.provider();
    // A crash right after the sandbox directory was made.
    let id = SandboxId::generate();
    h.guard.register(&id);
    std::fs::create_dir_all(sandbox_dir(&h, &id).join("upper/work"))?;
    let listed = p.list().await?;
    let me = listed
        .iter()
        .find(|r| r.sandbox_id == id)
        .context("a half-made sandbox is listed")?;
    ensure!(!me.running);
    p.destroy(&id).await?;
    ensure!(!sandbox_dir(&h, &id).exists());

    // A spawn that fails half-way (the workdir cannot be made: a file is in
    // the way in the image) leaves nothing behind.
    let mut spec = support::spec();
    spec.workdir = Some("/etc/hostname/sub".into());
    let r = h.spawn(spec.clone()).await;
    ensure!(r.is_err(), "spawn with an impossible workdir succeeded");
    let left = leftovers(&spec.sandbox_id, &h.env.data_dir);
    ensure!(left.is_empty(), "a failed spawn left: {left:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_mount_points_are_links_is_refused() -> anyhow::Result<()> {
    let h = harness().await?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, "etc/", std::io::empty())?;
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_mode(0o777);
    link.set_size(0);
    tar.append_link(&mut link, "dev", "/etc")?;
    let bytes = tar.into_inner()?;
    h.env.catalog.import("linked-dev", body(&bytes)).await?;
    let mut spec = support::spec();
    spec.image = "linked-dev".into();
    let err = h
        .spawn(spec.clone())
        .await
        .err()
        .context("an image with /dev -> /etc spawned")?;
    let msg = format!("{err:#}");
    ensure!(msg.contains("symbolic link"), "{msg}");
    let left = leftovers(&spec.sandbox_id, &h.env.data_dir);
    ensure!(left.is_empty(), "a refused spawn left: {left:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sandboxes_share_one_image() -> anyhow::Result<()> {
    let h = harness().await?;
    let specs: Vec<_> = (0..4).map(|_| support::spec()).collect();
    let spawns = specs.iter().map(|s| h.spawn(s.clone()));
    for r in futures_util::future::join_all(spawns).await {
        r?;
    }
    for s in &specs {
        let who = h.sh_ok(&s.sandbox_id, "echo $STACYVM_SANDBOX").await?;
        assert_eq!(who.trim(), s.sandbox_id.as_str());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_none_has_only_loopback() -> anyhow::Result<()> {
    let h = harness().await?;
    let none = h.spawn_default().await?;
    assert_eq!(interfaces(&h, &none).await?, ["lo"]);
    assert_eq!(h.sh_ok(&none, "ls /sys/class/net").await?.trim(), "lo");
    let lo = h.sh_ok(&none, "ifconfig lo").await?;
    ensure!(
        lo.contains("UP") && lo.contains("127.0.0.1"),
        "loopback is not up: {lo}"
    );
    // Loopback works inside; nothing leaves.
    let out = h
        .sh(
            &none,
            "nc -l -p 7000 -e echo inside & sleep 0.2; nc 127.0.0.1 7000 </dev/null; \
             nc -w 2 1.1.1.1 80 </dev/null && echo escaped",
        )
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("inside"), "loopback: {out:?}");
    ensure!(!text.contains("escaped"), "a connection left the sandbox");

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_start_fails_the_spawn_with_its_output() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let broken = env.data_dir.join("broken-agent");
    std::fs::write(&broken, "#!/bin/sh\necho agent-broken-marker >&2\nexit 3\n")?;
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let provider: DynProvider = Arc::new(NamespacesProvider::new(NamespacesConfig {
        data_dir: env.data_dir.clone(),
        agent_bin: broken,
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
        egress_dns_upstreams: Vec::new(),
    })?);
    let h = Harness::new(env, provider);
    let spec = support::spec();
    let err = h
        .spawn(spec.clone())
        .await
        .err()
        .context("a broken agent spawned")?;
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("agent-broken-marker"),
        "the agent's output is not in the error: {msg}"
    );
    let left = leftovers(&spec.sandbox_id, &h.env.data_dir);
    ensure!(left.is_empty(), "a failed spawn left: {left:#?}");
    Ok(())
}

// ---------------------------------------------------------------- egress

use stacyvm_core::{EgressRule, Network};
use stacyvm_provider::egress_filter::far_side::FarSide;
use stacyvm_provider::microvm::net::GuestNet;

use crate::support::{check_network_gone, host_primary_ipv4, reached_from, HostListener};

/// A namespaces provider whose resolvers are the test's DNS server, and a
/// harness holding it; the concrete provider is returned too.
async fn egress_harness(far: &FarSide) -> anyhow::Result<(Harness, Arc<NamespacesProvider>)> {
    let env = TestEnv::new().await?;
    let p = Arc::new(egress_provider(&env, far)?);
    let provider: DynProvider = p.clone();
    Ok((Harness::new(env, provider), p))
}

fn egress_provider(env: &TestEnv, far: &FarSide) -> anyhow::Result<NamespacesProvider> {
    Ok(NamespacesProvider::new(NamespacesConfig {
        data_dir: env.data_dir.clone(),
        agent_bin: env.agent_bin.clone(),
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
        egress_dns_upstreams: vec![format!("{}:53", far.dns).parse()?],
    })?)
}

fn recorded_net(h: &Harness, id: &SandboxId) -> anyhow::Result<GuestNet> {
    let path = sandbox_dir(h, id).join("net.json");
    Ok(serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_other_machines_but_not_the_host_or_another_sandbox() -> anyhow::Result<()> {
    let far = FarSide::start().await?;
    let (h, _) = egress_harness(&far).await?;
    let mut a = support::spec();
    a.network = Network::Egress;
    let mut b = support::spec();
    b.network = Network::Egress;
    let a = h.spawn(a).await?;
    let b = h.spawn(b).await?;
    let (na, nb) = (recorded_net(&h, &a)?, recorded_net(&h, &b)?);
    ensure!(na.slot != nb.slot, "two sandboxes share slot {}", na.slot);

    let shown = h.sh_ok(&a, "ip -4 -o addr show dev eth0; ip route").await?;
    ensure!(
        shown.contains(&format!("inet {}/30", na.guest_addr()))
            && shown.contains(&format!("default via {}", na.gateway())),
        "sandbox a's network: {shown}"
    );
    assert_eq!(interfaces(&h, &a).await?, ["eth0", "lo"]);
    let resolv = h.sh_ok(&a, "cat /etc/resolv.conf").await?;
    ensure!(
        resolv.contains(&format!("nameserver {}", far.dns)),
        "{resolv}"
    );

    // Other machines, by address and by name, through the host's NAT.
    for addr in [&far.allowed, &far.denied] {
        let got = support::greeting(&h, &a, addr, far.port).await?;
        ensure!(got == format!("hello-from-{addr}"), "{addr}: {got:?}");
    }
    let got = support::greeting(&h, &a, "denied.test", far.port).await?;
    ensure!(got == format!("hello-from-{}", far.denied), "{got:?}");

    // Not the host: not its end of either sandbox's link, not its address
    // on its own network.
    let listener = HostListener::start().await?;
    let targets = vec![
        nb.gateway().to_string(),
        na.gateway().to_string(),
        host_primary_ipv4()?,
    ];
    let reached = reached_from(&h, &b, &targets, listener.port).await?;
    ensure!(
        reached.is_empty() && listener.peers().is_empty(),
        "sandbox b reached the host at {reached:?} (the host saw {:?})",
        listener.peers()
    );
    tokio::net::TcpStream::connect(("127.0.0.1", listener.port)).await?;

    // Not each other: a listens, b cannot connect.
    h.sh_ok(
        &a,
        "setsid nc -l -p 8080 -e echo inside-a </dev/null >/dev/null 2>&1 &",
    )
    .await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let own = h
        .sh_ok(&a, "nc -w 3 127.0.0.1 8080 </dev/null; true")
        .await?;
    ensure!(own.contains("inside-a"), "a's own listener: {own:?}");
    h.sh_ok(
        &a,
        "setsid nc -l -p 8080 -e echo inside-a </dev/null >/dev/null 2>&1 &",
    )
    .await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let from_b = support::greeting(&h, &b, &na.guest_addr().to_string(), 8080).await?;
    ensure!(from_b.is_empty(), "sandbox b reached sandbox a: {from_b:?}");

    // The sandbox cannot change its link, routes or address.
    for attempt in [
        "ip link set eth0 down",
        "ip route del default",
        "ip addr add 10.213.0.99/30 dev eth0",
    ] {
        let out = h.sh(&a, &format!("{attempt} 2>&1")).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.exit_code != Some(0) && text.contains("not permitted"),
            "{attempt}: {:?} {text}",
            out.status
        );
    }

    for (id, n) in [(&a, &na), (&b, &nb)] {
        h.provider().destroy(id).await?;
        check_network_gone(id, n)?;
        let left = leftovers(id, &h.env.data_dir);
        ensure!(left.is_empty(), "left behind: {left:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_holds_and_its_dns_filter_comes_back_after_a_restart() -> anyhow::Result<()> {
    let far = FarSide::start().await?;
    let (h, p) = egress_harness(&far).await?;
    let mut spec = support::spec();
    spec.network = Network::Egress;
    spec.egress_allow = EgressRule::parse_list(&[far.allowed.as_str(), "allowed.test"])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = h.spawn(spec).await?;
    let n = recorded_net(&h, &id)?;
    ensure!(p.egress_dns_filters() == 1);

    support::an_allow_list_holds(&h, &id, &far, "127.0.0.53").await?;

    // The server ends, its DNS filter with it; the table stays in force.
    let _ = h.guard.take_provider();
    drop(p);
    let p = Arc::new(egress_provider(&h.env, &far)?);
    let provider: DynProvider = p.clone();
    h.guard.replace_provider(provider);
    let lookup = h
        .sh_ok(&id, "nslookup -type=a allowed.test; echo rc=$?")
        .await?;
    ensure!(!lookup.contains(&far.named), "{lookup}");
    let got = support::greeting(&h, &id, &far.denied, far.port).await?;
    ensure!(got.is_empty(), "a denied address answered: {got:?}");

    // Listing (what a starting server does) starts the filter again.
    ensure!(p
        .list()
        .await?
        .iter()
        .any(|r| r.sandbox_id == id && r.running));
    ensure!(p.egress_dns_filters() == 1);
    let lookup = h
        .sh_ok(&id, "nslookup -type=a allowed.test; echo rc=$?")
        .await?;
    ensure!(
        lookup.contains(&format!("Address: {}", far.named)),
        "{lookup}"
    );
    let got = support::greeting(&h, &id, &far.denied, far.port).await?;
    ensure!(got.is_empty(), "a denied address answered: {got:?}");

    p.destroy(&id).await?;
    ensure!(
        p.egress_dns_filters() == 0,
        "the DNS filter outlived its sandbox"
    );
    check_network_gone(&id, &n)?;
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}
