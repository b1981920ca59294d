//! Plugin providers against real plugin processes: the handshake and its
//! version negotiation, capabilities, every agent transport and its checks,
//! exec through a plugin without an agent, and supervision — a plugin that
//! crashes mid-call, hangs, or hangs while idle is restarted and adopts
//! its sandboxes again; its stderr reaches the log under its name.
//!
//! `plugins/hostexec.py` is a test plugin whose sandboxes are directories
//! on the host; `plugins/misbehave.py` makes a plugin crash or hang once.
//! The crash test drives the reference plugin (`examples/plugins`), which
//! needs dockerd.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures_util::StreamExt;
use stacyvm_core::{Error, ExecEvent, SandboxId};
use stacyvm_provider::plugin::PluginTiming;
use stacyvm_provider::{DynProvider, Provider};

use crate::support::{
    self, body, exec_req, plugin_provider_with, read_all, workspace_root, Harness, TestEnv,
};

fn plugin_file(name: &str) -> PathBuf {
    workspace_root()
        .join("crates/provider/tests/provider/plugins")
        .join(name)
}

fn hostexec() -> PathBuf {
    plugin_file("hostexec.py")
}

fn misbehave() -> PathBuf {
    plugin_file("misbehave.py")
}

/// Fast restarts, and a watchdog that stays out of the way unless a test
/// wants it.
fn quick() -> PluginTiming {
    PluginTiming {
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(500),
        watchdog: Duration::from_secs(3600),
        agent_ready: Duration::from_secs(5),
        ..PluginTiming::default()
    }
}

async fn harness(name: &str, exe: PathBuf, args: &[&str], timing: PluginTiming) -> Result<Harness> {
    let env = TestEnv::new().await?;
    let provider: DynProvider = Arc::new(plugin_provider_with(&env, name, exe, args, timing)?);
    Ok(Harness::new(env, provider))
}

/// Polls `check` until it yields a value; fails naming `what` after `limit`
/// (a bound on a hang, not a measurement).
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} did not happen within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code<T>(r: &stacyvm_core::Result<T>) -> Option<&'static str> {
    r.as_ref().err().map(Error::code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_settles_on_a_version_both_speak() -> Result<()> {
    // The plugin picks the newest version offered that it speaks.
    let h = harness("versions", hostexec(), &["--versions", "1,2"], quick()).await?;
    let health = h.provider().health().await;
    ensure!(health.healthy, "{}", health.detail);
    ensure!(
        health.detail.contains("(protocol 1)"),
        "the detail names the version: {}",
        health.detail
    );

    // Plugins that cannot agree are down with the reason, and refuse work.
    for (args, reason) in [
        (
            &["--versions", "2"][..],
            "speaks none of the protocol versions StacyVM offers ([1])",
        ),
        (&["--answer-version", "7"], "chose protocol version 7"),
        (&["--garbage-hello"], "broke the protocol"),
        // The kernel's AF_VSOCK is no transport StacyVM reaches.
        (&["--declare", "unix,vsock"], "unknown variant `vsock`"),
    ] {
        let h = harness("versions", hostexec(), args, quick()).await?;
        let p = h.provider();
        let health = p.health().await;
        ensure!(!health.healthy, "{args:?}: {}", health.detail);
        ensure!(
            health.detail.contains(reason),
            "{args:?}: the detail says why: {}",
            health.detail
        );
        let spawned = p.spawn(&support::spec()).await;
        ensure!(
            code(&spawned) == Some("provider_unavailable"),
            "{args:?}: {spawned:?}"
        );
        ensure!(
            !p.security_boundary(),
            "{args:?}: a plugin that never finished its handshake is no boundary"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_is_a_security_boundary_only_when_it_says_so() -> Result<()> {
    let h = harness("plain", hostexec(), &[], quick()).await?;
    let health = h.provider().health().await;
    ensure!(health.healthy, "{}", health.detail);
    ensure!(
        health.detail.contains("not a security boundary"),
        "{}",
        health.detail
    );
    ensure!(!h.provider().security_boundary());
    assert_eq!(h.provider().name(), "plugin:plain");

    let h = harness("boundary", hostexec(), &["--boundary"], quick()).await?;
    let health = h.provider().health().await;
    ensure!(health.healthy, "{}", health.detail);
    ensure!(h.provider().security_boundary());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_through_a_plugin_without_an_agent() -> Result<()> {
    let h = harness("hostexec", hostexec(), &[], quick()).await?;
    let p = h.provider();
    let mut spec = support::spec();
    spec.env.insert("FROM_SPAWN".into(), "spawn value".into());
    spec.workdir = Some("/work/app".into());
    let id = h.spawn(spec).await?;

    let out = h
        .sh(&id, "echo \"$FROM_SPAWN|$FROM_REQ\"; pwd; exit 7")
        .await?;
    assert_eq!(out.status.exit_code, Some(7), "{out:?}");
    let stdout = text(&out.stdout);
    ensure!(stdout.starts_with("spawn value|\n"), "{stdout:?}");
    ensure!(stdout.trim_end().ends_with("/work/app"), "{stdout:?}");

    let agent = p.agent(&id).await?;
    let missing = agent.exec(exec_req(&["/no/such/program"])).await?;
    assert_eq!(missing.status.exit_code, Some(127));
    ensure!(
        !missing.stderr.is_empty(),
        "no reason for a missing program"
    );

    let input = b"binary\x00\xff stdin\n".to_vec();
    let mut req = exec_req(&["cat"]);
    req.stdin = Some(input.clone());
    assert_eq!(agent.exec(req).await?.stdout, input);

    // Output past the cap is cut and flagged, as from an agent.
    let mut req = exec_req(&["head", "-c", "100000", "/dev/zero"]);
    req.output_cap = 1000;
    let out = agent.exec(req).await?;
    assert_eq!(out.stdout.len(), 1000);
    ensure!(out.stdout_truncated && !out.stderr_truncated, "{out:?}");

    // The plugin kills a command at its timeout.
    let mut req = exec_req(&["sleep", "30"]);
    req.timeout_ms = 300;
    let out = agent.exec(req).await?;
    ensure!(
        out.status.timed_out && out.status.signal == Some(9) && out.status.exit_code.is_none(),
        "{:?}",
        out.status
    );

    // A stream delivers output while the command runs: it cannot end
    // before `go` exists, made only once `a` arrived.
    let script = "echo a; while [ ! -e go ]; do sleep 0.05; done; echo b; echo e >&2";
    let mut stream = agent.exec_stream(exec_req(&["sh", "-c", script])).await?;
    let first = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .context("the first chunk while the command runs")?
        .context("a first event")??;
    ensure!(
        matches!(&first, ExecEvent::Stdout(b) if b.as_ref() == b"a\n"),
        "{first:?}"
    );
    h.sh_ok(&id, "touch go").await?;
    let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(ev) = stream.next().await {
        match ev? {
            ExecEvent::Stdout(b) => out.extend_from_slice(&b),
            ExecEvent::Stderr(b) => err.extend_from_slice(&b),
            ExecEvent::Exit(st) => exit = Some(st),
        }
    }
    assert_eq!((text(&out), text(&err)), ("b\n".into(), "e\n".into()));
    assert_eq!(exit.context("an exit event")?.exit_code, Some(0));

    // No agent, no file operations, no pause: 409 unsupported each.
    let stat = agent.file_stat("/work").await;
    ensure!(code(&stat) == Some("unsupported"), "{stat:?}");
    let read = agent.file_read("/work/x").await.map(|_| ());
    ensure!(code(&read) == Some("unsupported"), "{read:?}");
    let write = agent.file_write("/work/x", None, body(b"x".to_vec())).await;
    ensure!(code(&write) == Some("unsupported"), "{write:?}");
    let paused = p.pause(&id).await;
    ensure!(code(&paused) == Some("unsupported"), "{paused:?}");
    // A watch is refused at once, never left waiting.
    let watched = tokio::time::timeout(Duration::from_secs(60), agent.watch("/work", false))
        .await
        .context("a watch through a plugin did not answer")?
        .map(|_| ());
    ensure!(code(&watched) == Some("unsupported"), "{watched:?}");

    // Spawn got the catalog rootfs of the image.
    let logs = p.logs(&id).await?;
    let rootfs = h.env.catalog.rootfs(support::IMAGE).await?;
    ensure!(
        logs.iter()
            .any(|l| l.source == "provider" && l.message.contains(&*rootfs.to_string_lossy())),
        "{logs:?}"
    );

    p.destroy(&id).await?;
    p.destroy(&id).await.context("destroy twice")?;
    ensure!(!p.list().await?.iter().any(|r| r.sandbox_id == id));
    let gone = h.sh(&id, "true").await;
    ensure!(
        gone.as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<Error>())
            .map(Error::code)
            == Some("not_found"),
        "{gone:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_go_through_a_plugin_that_offers_them() -> Result<()> {
    let h = harness("files", hostexec(), &["--files"], quick()).await?;
    let id = h.spawn_default().await?;
    let agent = h.provider().agent(&id).await?;
    let data = stacyvm_provider::conformance::random_bytes(300 * 1024);
    let entry = agent
        .file_write("/work/blob.bin", Some(0o600), body(data.clone()))
        .await?;
    assert_eq!(
        (entry.size, entry.mode.as_str()),
        (data.len() as u64, "0600")
    );
    ensure!(read_all(agent.file_read("/work/blob.bin").await?).await? == data);
    let missing = agent.file_read("/work/none").await.map(|_| ());
    ensure!(code(&missing) == Some("not_found"), "{missing:?}");
    let relative = agent.file_read("work/blob.bin").await.map(|_| ());
    ensure!(code(&relative) == Some("invalid_request"), "{relative:?}");
    let stat = agent.file_stat("/work/blob.bin").await;
    ensure!(code(&stat) == Some("unsupported"), "{stat:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_reached_over_unix_tcp_and_hybrid_vsock() -> Result<()> {
    for kind in ["unix", "tcp", "vsock_uds"] {
        let h = harness("agents", hostexec(), &["--agent", kind], quick()).await?;
        let p = h.provider();
        let id = h.spawn_default().await?;
        let agent = p.agent(&id).await?;
        ensure!(
            !agent.info().version.contains("no agent"),
            "{kind}: a real agent answers: {:?}",
            agent.info()
        );
        assert_eq!(h.sh_ok(&id, "echo hi").await?, "hi\n", "{kind}");
        agent
            .file_write("/in-root.txt", None, body(b"kept".to_vec()))
            .await?;
        assert_eq!(
            read_all(agent.file_read("/in-root.txt").await?).await?,
            b"kept"
        );
        p.destroy(&id).await?;
        ensure!(p.list().await?.is_empty(), "{kind}: destroyed");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_addresses_that_fail_the_checks_are_refused() -> Result<()> {
    let timing = PluginTiming {
        agent_ready: Duration::from_secs(2),
        ..quick()
    };
    for (args, why) in [
        (
            &["--agent", "unix", "--peer-uid", "4242"][..],
            "user id 4242",
        ),
        (&["--agent", "unix", "--symlink"], "symbolic link"),
        (
            &["--agent", "tcp", "--declare", "unix"],
            "not among those its handshake declared",
        ),
    ] {
        let h = harness("checks", hostexec(), args, timing.clone()).await?;
        let spec = support::spec();
        let spawned = h.spawn(spec.clone()).await;
        let e = spawned
            .err()
            .with_context(|| format!("{args:?}: the spawn is refused"))?;
        ensure!(format!("{e:#}").contains(why), "{args:?}: {e:#}");
        // Nothing of the refused sandbox stays.
        ensure!(h.provider().list().await?.is_empty(), "{args:?}");
        let boxes = h.env.data_dir.join("plugin-state/checks/boxes");
        ensure!(
            std::fs::read_dir(&boxes)?.next().is_none(),
            "{args:?}: {} is empty",
            boxes.display()
        );
    }
    Ok(())
}

/// The lines of the `starts` file the misbehave wrapper keeps.
fn starts(env: &TestEnv, name: &str) -> usize {
    std::fs::read_to_string(env.data_dir.join("plugin-state").join(name).join("starts"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn container_of(env: &TestEnv, plugin: &str, id: &SandboxId) -> String {
    format!("stacyvm-{plugin}-{}-{id}", env.instance)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_crashes_mid_call_is_restarted_and_adopts_its_sandboxes() -> Result<()> {
    support::require_docker()?;
    let reference = support::reference_plugin();
    let hold_dir = tempfile::tempdir()?;
    let hold = hold_dir.path().join("hold");
    let hold_arg = hold.to_string_lossy().into_owned();
    let args = [
        reference.to_str().context("a UTF-8 path")?,
        "--crash-on",
        "logs",
        "--hold",
        &hold_arg,
    ];
    let h = harness("crashy", misbehave(), &args, quick()).await?;
    let result = crash_and_adopt(&h, &hold, &args).await;
    // Whatever happened, the plugin comes back so the sandboxes can go.
    let _ = std::fs::remove_file(&hold);
    let back = eventually(
        "the plugin back for the cleanup",
        Duration::from_secs(60),
        || async { Ok(h.provider().health().await.healthy.then_some(())) },
    )
    .await;
    if back.is_err() {
        remove_behind_the_plugin(&h.env);
    }
    result
}

/// The last resort when the plugin cannot destroy its sandboxes: the
/// containers of the test's instance and the socket mounts under its data
/// dir go without it.
fn remove_behind_the_plugin(env: &TestEnv) {
    let filter = format!("label=dev.stacyvm.instance={}", env.instance);
    if let Ok(out) = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    {
        for id in text(&out.stdout).split_whitespace() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", id])
                .output();
        }
    }
    let data_dir = env.data_dir.to_string_lossy().into_owned();
    for line in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if let Some(point) = line.split_whitespace().nth(4) {
            if point.starts_with(&data_dir) {
                let _ = std::process::Command::new("umount")
                    .args(["-l", point])
                    .output();
            }
        }
    }
}

async fn crash_and_adopt(h: &Harness, hold: &std::path::Path, args: &[&str]) -> Result<()> {
    let p = h.provider();
    let kept = h.spawn_default().await?;
    let vanishing = h.spawn_default().await?;
    h.sh_ok(&kept, "echo before > /kept").await?;

    // The crash fails the call in flight, naming it; while the plugin is
    // held down the provider is unhealthy with the reason.
    std::fs::write(hold, "")?;
    let crashed = p.logs(&kept).await;
    let e = crashed.err().context("logs on a crashing plugin fails")?;
    ensure!(e.code() == "provider_unavailable", "{e}");
    ensure!(e.to_string().contains("exit status: 7"), "{e}");
    let health = p.health().await;
    ensure!(!health.healthy, "{}", health.detail);
    ensure!(
        health.detail.contains("exit status: 7"),
        "{}",
        health.detail
    );
    let listed = p.list().await;
    ensure!(
        code(&listed) == Some("provider_unavailable"),
        "a plugin that is down lists nothing, rather than nothing running: {listed:?}"
    );
    // Its agents do not go through it: exec keeps working.
    assert_eq!(h.sh_ok(&kept, "cat /kept").await?, "before\n");
    // Meanwhile one sandbox goes away behind its back.
    let rm = std::process::Command::new("docker")
        .args(["rm", "-f", &container_of(&h.env, "crashy", &vanishing)])
        .output()?;
    ensure!(rm.status.success(), "{}", text(&rm.stderr));
    eventually(
        "a start of the plugin that is held down",
        Duration::from_secs(60),
        || async { Ok((starts(&h.env, "crashy") >= 2).then_some(())) },
    )
    .await?;
    ensure!(!p.health().await.healthy, "still down while held");

    std::fs::remove_file(hold)?;
    let health = eventually("the plugin's return", Duration::from_secs(60), || async {
        let health = p.health().await;
        Ok(health.healthy.then_some(health))
    })
    .await?;
    ensure!(
        health.detail.contains("restarted") && health.detail.contains("exit status: 7"),
        "the detail says it restarted and why: {}",
        health.detail
    );
    // Adopted: what it still runs is listed and works; what vanished is
    // not running (the control plane marks its row).
    let listed = p.list().await?;
    let find = |id: &SandboxId| listed.iter().find(|r| &r.sandbox_id == id);
    ensure!(find(&kept).is_some_and(|r| r.running), "{listed:?}");
    ensure!(find(&vanishing).is_none_or(|r| !r.running), "{listed:?}");
    let gone = p.agent(&vanishing).await.map(|_| ());
    ensure!(
        matches!(code(&gone), Some("conflict" | "not_found")),
        "{gone:?}"
    );
    assert_eq!(h.sh_ok(&kept, "cat /kept").await?, "before\n");
    // The call that crashed it works now.
    p.logs(&kept).await.context("logs after the restart")?;

    // A new provider (a server restart) adopts them the same way.
    let again = plugin_provider_with(&h.env, "crashy", misbehave(), args, quick())?;
    let out = again
        .agent(&kept)
        .await?
        .exec(exec_req(&["cat", "/kept"]))
        .await?;
    assert_eq!(text(&out.stdout), "before\n");
    drop(again);

    p.destroy(&vanishing).await?;
    ensure!(!p.list().await?.iter().any(|r| r.sandbox_id == vanishing));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_hangs_is_timed_out_and_restarted() -> Result<()> {
    let timing = PluginTiming {
        logs: Duration::from_secs(2),
        ..quick()
    };
    let plugin = hostexec();
    let args = [
        plugin.to_str().context("a UTF-8 path")?,
        "--hang-on",
        "logs",
    ];
    let h = harness("hangs", misbehave(), &args, timing).await?;
    let p = h.provider();
    let id = h.spawn_default().await?;
    h.sh_ok(&id, "echo before > kept").await?;

    let hung = p.logs(&id).await;
    let e = hung.err().context("logs on a hanging plugin fails")?;
    ensure!(e.code() == "timeout", "{e}");
    ensure!(e.to_string().contains("did not answer `logs`"), "{e}");

    let health = eventually("the plugin's restart", Duration::from_secs(60), || async {
        let health = p.health().await;
        Ok(health.healthy.then_some(health))
    })
    .await?;
    ensure!(
        health.detail.contains("restarted 1 time")
            && health.detail.contains("did not answer `logs` within 2 s"),
        "{}",
        health.detail
    );
    ensure!(starts(&h.env, "hangs") == 2, "killed and started once more");
    // The same sandbox, adopted by the new plugin process.
    ensure!(p
        .list()
        .await?
        .iter()
        .any(|r| r.sandbox_id == id && r.running));
    ensure!(!p.logs(&id).await?.is_empty(), "logs answer now");
    assert_eq!(h.sh_ok(&id, "cat kept").await?, "before\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_plugin_that_hangs_is_found_by_the_watchdog() -> Result<()> {
    let timing = PluginTiming {
        health: Duration::from_secs(1),
        watchdog: Duration::from_millis(300),
        ..quick()
    };
    let plugin = hostexec();
    let args = [
        plugin.to_str().context("a UTF-8 path")?,
        "--hang-on",
        "health",
    ];
    let h = harness("idle", misbehave(), &args, timing).await?;
    // Nothing calls the plugin: its watchdog's ping hangs, and the plugin
    // is started again.
    eventually(
        "a restart by the watchdog",
        Duration::from_secs(60),
        || async { Ok((starts(&h.env, "idle") >= 2).then_some(())) },
    )
    .await?;
    let health = eventually("the plugin's return", Duration::from_secs(60), || async {
        let health = h.provider().health().await;
        Ok(health.healthy.then_some(health))
    })
    .await?;
    ensure!(
        health.detail.contains("did not answer `health`"),
        "{}",
        health.detail
    );
    Ok(())
}

/// A log sink for the whole test process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_stderr_reaches_the_log_with_its_name() -> Result<()> {
    let log = Captured::default();
    let sink = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log capture: {e}"))?;
    let said = format!("hello from the plugin {}", SandboxId::generate());
    let h = harness("talker", hostexec(), &["--say", &said], quick()).await?;
    ensure!(h.provider().health().await.healthy);
    let line = eventually(
        "the plugin's line in the log",
        Duration::from_secs(30),
        || {
            let log = log.clone();
            let said = said.clone();
            async move {
                let text = text(&log.0.lock().unwrap_or_else(|p| p.into_inner()));
                Ok(text.lines().find(|l| l.contains(&said)).map(str::to_owned))
            }
        },
    )
    .await?;
    ensure!(line.contains("plugin=talker"), "{line}");
    Ok(())
}
