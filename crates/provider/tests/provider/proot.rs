//! PRoot specifics on the real `proot`: the shared read-only image below a
//! per-sandbox writable layer, supervision of detached processes, adoption
//! of running sandboxes by a new provider (a server restart), pause/resume,
//! and cleanup of sandboxes that died or were never finished.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context};
use stacyvm_core::SandboxId;
use stacyvm_provider::proot::{ProotConfig, ProotFeatures, ProotProvider};
use stacyvm_provider::{DynProvider, Provider};

use crate::support::AgentCalls;
use crate::support::{self, body, exec_req, leftovers, read_all, Harness, TestEnv};

async fn harness() -> anyhow::Result<Harness> {
    let env = TestEnv::new().await?;
    let provider: DynProvider = Arc::new(support::proot_provider_now(&env)?);
    Ok(Harness::new(env, provider))
}

/// A provider without overlayfs and cgroups: a copy per sandbox and
/// `/proc` supervision, as on a host without root or cgroup v2.
fn fallback_provider(env: &TestEnv) -> anyhow::Result<DynProvider> {
    let cfg = ProotConfig {
        data_dir: env.data_dir.clone(),
        agent_bin: env.agent_bin.clone(),
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
    };
    let features = ProotFeatures {
        overlay: false,
        cgroup: false,
    };
    Ok(Arc::new(ProotProvider::with_features(cfg, features)?))
}

async fn fallback_harness() -> anyhow::Result<Harness> {
    let env = TestEnv::new().await?;
    let provider = fallback_provider(&env)?;
    Ok(Harness::new(env, provider))
}

fn sandbox_dir(h: &Harness, id: &SandboxId) -> PathBuf {
    h.env.data_dir.join("proot").join(id.as_str())
}

fn recorded_pid(h: &Harness, id: &SandboxId, file: &str) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(sandbox_dir(h, id).join(file))?;
    Ok(text
        .split_whitespace()
        .next()
        .context("an empty pid file")?
        .parse()?)
}

/// What a proot process leaves in /tmp when it cannot clean up.
fn proot_temp_files(proot_pid: i32) -> Vec<String> {
    let prefixes = [
        format!("prooted-{proot_pid}-"),
        format!("proot-{proot_pid}-"),
    ];
    std::fs::read_dir("/tmp")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat.rsplit_once(')') {
        Some((_, rest)) => !rest.trim_start().starts_with('Z'),
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_proot_and_how_sandboxes_are_built() -> anyhow::Result<()> {
    let h = harness().await?;
    let health = h.provider().health().await;
    ensure!(health.healthy, "{}", health.detail);
    ensure!(
        health.detail.contains("not a security boundary"),
        "{}",
        health.detail
    );
    ensure!(
        health.detail.contains("root:")
            && health.detail.contains("unprivileged user of its own")
            && health.detail.contains("limits enforced: pids, memory, cpu"),
        "{}",
        health.detail
    );
    Ok(())
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
        health.healthy && health.detail.contains("copy"),
        "{}",
        health.detail
    );
    writes_stay_in_their_own_sandbox(&h).await
}

pub(crate) async fn writes_stay_in_their_own_sandbox(h: &Harness) -> anyhow::Result<()> {
    let p = h.provider();
    let a = h.spawn_default().await?;
    let b = h.spawn_default().await?;
    let image_root = h.env.catalog.rootfs(support::IMAGE).await?;
    let image_hostname = std::fs::read_to_string(image_root.join("etc/hostname"))?;

    p.file_write(&a, "/work/only-in-a", None, body(b"a".to_vec()))
        .await?;
    h.sh_ok(&a, "echo changed-in-a > /etc/hostname && rm /bin/ls")
        .await?;

    let r = p.file_stat(&b, "/work/only-in-a").await;
    ensure!(
        matches!(&r, Err(e) if e.code() == "not_found"),
        "b sees a's file: {r:?}"
    );
    assert_eq!(h.sh_ok(&b, "cat /etc/hostname").await?, image_hostname);
    h.sh_ok(&b, "test -e /bin/ls")
        .await
        .context("a's delete showed in b")?;
    assert_eq!(h.sh_ok(&a, "cat /etc/hostname").await?, "changed-in-a\n");

    ensure!(
        !image_root.join("work/only-in-a").exists(),
        "a write reached the catalog's rootfs"
    );
    assert_eq!(
        std::fs::read_to_string(image_root.join("etc/hostname"))?,
        image_hostname
    );
    ensure!(
        std::fs::symlink_metadata(image_root.join("bin/ls")).is_ok(),
        "a delete reached the catalog's rootfs"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_kills_processes_that_left_the_session() -> anyhow::Result<()> {
    destroy_kills_detached(&harness().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_destroy_still_kills_processes_that_left_the_session() -> anyhow::Result<()>
{
    let h = fallback_harness().await?;
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
    // setsid puts the process in a session (and process group) of its own,
    // out of reach of a kill of the agent's group.
    h.sh_ok(
        &id,
        "setsid sh -c 'echo $$ > /tmp/detached.pid; exec sleep 1000' </dev/null >/dev/null 2>&1 &
         for i in $(seq 1 100); do [ -s /tmp/detached.pid ] && exit 0; sleep 0.05; done; exit 1",
    )
    .await?;
    let pid: u32 = read_all(p.file_read(&id, "/tmp/detached.pid").await?)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())?
        .parse()
        .context("the detached pid")?;
    ensure!(
        pid_alive(pid),
        "the detached process {pid} is not running on the host"
    );
    let sid = |pid: u32| -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name: state, ppid, pgrp, session.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        fields.get(3).map(|s| s.to_string())
    };
    ensure!(
        sid(pid) == Some(pid.to_string()),
        "the process did not get a session of its own: {:?}",
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
    );

    let proot_pid = recorded_pid(h, &id, "proot.pid")?;
    ensure!(
        !proot_temp_files(proot_pid).is_empty(),
        "no loader of proot {proot_pid} found in /tmp"
    );
    p.destroy(&id).await?;
    ensure!(
        !pid_alive(pid),
        "the detached process {pid} survived destroy"
    );
    let temp = proot_temp_files(proot_pid);
    ensure!(temp.is_empty(), "proot's files left in /tmp: {temp:?}");
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_provider_adopts_running_sandboxes() -> anyhow::Result<()> {
    let h = harness().await?;
    let id = h.spawn_default().await?;
    h.sh_ok(&id, "echo before-restart > /work/state").await?;

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
    let fresh: DynProvider = Arc::new(support::proot_provider_now(&h.env)?);
    h.guard.replace_provider(fresh.clone());

    let listed = fresh.list().await?;
    let me = listed
        .iter()
        .find(|r| r.sandbox_id == id)
        .context("the sandbox is listed after the restart")?;
    ensure!(me.running, "the adopted sandbox is not running: {listed:?}");
    assert_eq!(h.sh_ok(&id, "cat /work/state").await?, "before-restart\n");

    // Another instance on the same data directory does not claim it.
    let theirs = other_instance(&h.env)?.list().await?;
    ensure!(
        !theirs.iter().any(|r| r.sandbox_id == id),
        "another instance listed our sandbox"
    );

    fresh.destroy(&id).await?;
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

fn other_instance(env: &TestEnv) -> anyhow::Result<stacyvm_provider::proot::ProotProvider> {
    Ok(stacyvm_provider::proot::ProotProvider::new(
        stacyvm_provider::proot::ProotConfig {
            data_dir: env.data_dir.clone(),
            agent_bin: env.agent_bin.clone(),
            catalog: env.catalog.clone(),
            instance: format!("{}-other", env.instance),
        },
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_and_resume_thaws() -> anyhow::Result<()> {
    let h = harness().await?;
    let p = h.provider();
    let id = h.spawn_default().await?;
    // This host kind has freezers (v2 cgroup.freeze and the v1 freezer):
    // pause must work here.
    p.pause(&id).await?;
    let r = p.exec(&id, exec_req(&["true"])).await;
    ensure!(
        matches!(&r, Err(e) if e.code() == "conflict"),
        "exec while paused: {:?}",
        r.map(|o| o.status)
    );
    // Every process is frozen: the agent's state says so on the host.
    let agent_pid: u32 = std::fs::read_to_string(sandbox_dir(&h, &id).join("agent.pid"))?
        .split_whitespace()
        .next()
        .context("agent.pid")?
        .parse()?;
    let cgroup_events = find_cgroup_events(&id).context("the sandbox's cgroup")?;
    // Pause returned once the kernel reported the group frozen; a traced
    // task leaving its ptrace stop for the freezer clears that report for a
    // moment, so it is read until it holds again.
    let mut frozen = false;
    for _ in 0..200 {
        if std::fs::read_to_string(&cgroup_events)?.contains("frozen 1") {
            frozen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    ensure!(frozen, "not frozen");
    ensure!(pid_alive(agent_pid));

    p.resume(&id).await?;
    assert_eq!(h.sh_ok(&id, "echo thawed").await?, "thawed\n");
    // Destroy works on a paused sandbox too.
    p.pause(&id).await?;
    p.destroy(&id).await?;
    ensure!(
        !pid_alive(agent_pid),
        "the agent survived destroying a paused sandbox"
    );
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

fn find_cgroup_events(id: &SandboxId) -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mount = Path::new(left.split_whitespace().nth(4)?);
        for parent in std::fs::read_dir(mount).ok()?.flatten() {
            for child in std::fs::read_dir(parent.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if child.file_name().to_string_lossy().ends_with(id.as_str()) {
                    return Some(child.path().join("cgroup.events"));
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agent_is_listed_as_stopped_and_destroyed_cleanly() -> anyhow::Result<()> {
    let h = harness().await?;
    let p = h.provider();
    let id = h.spawn_default().await?;
    let proot_pid: i32 = std::fs::read_to_string(sandbox_dir(&h, &id).join("proot.pid"))?
        .split_whitespace()
        .next()
        .context("proot.pid")?
        .parse()?;
    let agent_pid: i32 = std::fs::read_to_string(sandbox_dir(&h, &id).join("agent.pid"))?
        .split_whitespace()
        .next()
        .context("agent.pid")?
        .parse()?;
    ensure!(pid_alive(agent_pid as u32));
    // SAFETY: kill has no memory preconditions; the pid is the sandbox's
    // agent, checked alive just above.
    unsafe { libc::kill(agent_pid, libc::SIGKILL) };
    for _ in 0..200 {
        if !pid_alive(agent_pid as u32) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
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
    ensure!(!pid_alive(proot_pid as u32), "proot survived destroy");
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
async fn concurrent_sandboxes_share_one_image() -> anyhow::Result<()> {
    let h = harness().await?;
    let mut specs = Vec::new();
    for _ in 0..4 {
        specs.push(support::spec());
    }
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
async fn without_cgroups_a_new_provider_adopts_and_destroys() -> anyhow::Result<()> {
    let h = fallback_harness().await?;
    let id = h.spawn_default().await?;
    h.sh_ok(
        &id,
        "sleep 1000 </dev/null >/dev/null 2>&1 & echo kept > /work/state",
    )
    .await?;
    drop(h.guard.take_provider());
    let fresh = fallback_provider(&h.env)?;
    h.guard.replace_provider(fresh.clone());
    assert_eq!(h.sh_ok(&id, "cat /work/state").await?, "kept\n");
    fresh.destroy(&id).await?;
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

/// The interfaces a sandbox sees, from its own `/proc/net/dev`.
pub(crate) async fn interfaces(h: &Harness, id: &SandboxId) -> anyhow::Result<Vec<String>> {
    let dev = h.sh_ok(id, "tail -n +3 /proc/net/dev").await?;
    let mut names: Vec<String> = dev
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_owned())
        .collect();
    names.sort();
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_none_leaves_only_loopback() -> anyhow::Result<()> {
    let h = harness().await?;
    ensure!(
        effective_uid() == 0,
        "the proot provider (and this test) needs root: run the suite as root"
    );
    let none = h.spawn_default().await?;
    assert_eq!(interfaces(&h, &none).await?, ["lo"]);
    let lo = h.sh_ok(&none, "ifconfig lo").await?;
    ensure!(
        lo.contains("UP") && lo.contains("127.0.0.1"),
        "loopback is not up: {lo}"
    );

    let mut spec = support::spec();
    spec.network = stacyvm_core::Network::Egress;
    let egress = h.spawn(spec).await?;
    let host: Vec<String> = std::fs::read_to_string("/proc/net/dev")?
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_owned())
        .collect();
    let mut host = host;
    host.sort();
    assert_eq!(
        interfaces(&h, &egress).await?,
        host,
        "egress shares the host's network"
    );
    Ok(())
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_start_fails_the_spawn_with_its_output() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let broken = env.data_dir.join("broken-agent");
    std::fs::write(&broken, "#!/bin/sh\necho agent-broken-marker >&2\nexit 3\n")?;
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let provider: DynProvider = Arc::new(ProotProvider::new(ProotConfig {
        data_dir: env.data_dir.clone(),
        agent_bin: broken,
        catalog: env.catalog.clone(),
        instance: env.instance.clone(),
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

/// The real uid of a host process.
fn host_uid(pid: i32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no Uid line")?
        .parse()
        .context("the uid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sandbox_runs_as_a_user_of_its_own_and_sees_nothing_of_the_host() -> anyhow::Result<()>
{
    let h = harness().await?;
    let mut spec = support::spec();
    // What a tenant might send to take over the tracer.
    spec.env = [
        ("LD_PRELOAD", "/no-such-preload.so"),
        ("PROOT_VERBOSE", "9"),
        ("TENANT_VALUE", "tenant-only"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let a = h.spawn(spec).await?;
    let b = h.spawn_default().await?;
    let agent_a = recorded_pid(&h, &a, "agent.pid")?;
    let agent_b = recorded_pid(&h, &b, "agent.pid")?;
    let proot_a = recorded_pid(&h, &a, "proot.pid")?;
    let (uid_a, uid_b) = (host_uid(agent_a)?, host_uid(agent_b)?);
    ensure!(
        uid_a >= 1_800_000_000 && uid_b >= 1_800_000_000,
        "sandboxes run as unprivileged users: {uid_a}, {uid_b}"
    );
    ensure!(uid_a != uid_b, "two sandboxes share the user {uid_a}");
    ensure!(
        host_uid(proot_a)? == uid_a,
        "the tracer runs as the sandbox's user too"
    );

    // Inside, the sandbox's user appears as root.
    assert_eq!(h.sh_ok(&a, "id -u").await?, "0\n");

    // Its /proc shows its own processes only.
    let pids = h.sh_ok(&a, "ls /proc | grep -E '^[0-9]+$'").await?;
    let me = std::process::id() as i32;
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        ensure!(pid != me, "the sandbox sees the server's process {me}");
        ensure!(pid != agent_b, "the sandbox sees another sandbox's agent");
        if let Ok(uid) = host_uid(pid) {
            ensure!(uid == uid_a, "the sandbox sees process {pid} of user {uid}");
        }
    }
    for path in [
        format!("/proc/{me}/environ"),
        format!("/proc/{agent_b}/environ"),
        "/proc/1/environ".to_owned(),
        format!("/proc/{me}/root/etc/hostname"),
    ] {
        let out = h.sh(&a, &format!("cat {path}")).await?;
        ensure!(
            out.status.exit_code != Some(0),
            "the sandbox read {path}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Its /dev holds only the harmless devices, none of the host's disks.
    let dev = h.sh_ok(&a, "ls /dev | sort | tr '\\n' ' '").await?;
    assert_eq!(
        dev.trim(),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    h.sh_ok(&a, "echo x > /dev/null && head -c 4 /dev/urandom | wc -c")
        .await?;

    // No capabilities, no new privileges, the seccomp filter on.
    let status = h.sh_ok(&a, "cat /proc/self/status").await?;
    for want in ["CapEff:\t0000000000000000", "NoNewPrivs:\t1", "Seccomp:\t2"] {
        ensure!(status.contains(want), "{want:?} not in\n{status}");
    }

    // The tenant's environment reaches commands, never the tracer.
    assert_eq!(h.sh_ok(&a, "echo $TENANT_VALUE").await?, "tenant-only\n");
    let tracer_env = std::fs::read(format!("/proc/{proot_a}/environ"))?;
    let tracer_env = String::from_utf8_lossy(&tracer_env);
    for name in ["LD_PRELOAD", "PROOT_VERBOSE", "TENANT_VALUE"] {
        ensure!(
            !tracer_env.contains(name),
            "{name} reached the tracer's environment: {tracer_env:?}"
        );
    }
    // The env file the agent read it from is gone.
    let out = h.sh(&a, "ls /.stacyvm/run").await?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "agent.sock\n");
    Ok(())
}
