//! The fake provider itself: its runtimes answer exec and files through the
//! real agent, its knobs do what the control plane's tests rely on, and it
//! leaves no directory or process behind.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use stacyvm_core::{Error, SandboxId};
use stacyvm_provider::fake::FakeProvider;
use stacyvm_provider::Provider;

use crate::support::{body, exec_req, read_all, spec};

/// Bounds a wait for something the test itself set in motion, so a bug
/// shows as a failure naming the wait instead of a hung test.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .with_context(|| format!("{what} did not happen"))
}

/// Whether `pid` still runs (a zombie waiting for its reaper does not).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Waits for `pid` to be gone: a SIGKILL is delivered asynchronously.
async fn gone(pid: i32) -> anyhow::Result<()> {
    bounded(&format!("the end of process {pid}"), async {
        while running(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Starts a background process in the runtime that outlives the command
/// that started it; returns its pid.
async fn background_sleep(fake: &FakeProvider, id: &SandboxId) -> anyhow::Result<i32> {
    let out = fake
        .agent(id)
        .await?
        .exec(exec_req(&[
            "sh",
            "-c",
            "sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
        ]))
        .await?;
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    ensure!(running(pid), "the background sleep {pid} is not running");
    Ok(pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_exec_and_files_reach_the_real_agent() -> anyhow::Result<()> {
    let fake = FakeProvider::new("fake");
    let mut s = spec();
    s.workdir = Some("/work".into());
    fake.spawn(&s).await?;
    let root = fake.root_of(&s.sandbox_id).context("no root")?;
    let agent = fake.agent(&s.sandbox_id).await?;

    let mut req = exec_req(&["sh", "-c", "echo \"$GREETING\"; pwd"]);
    req.env.insert("GREETING".into(), "hello".into());
    req.cwd = Some("/work".into());
    let out = agent.exec(req).await?;
    ensure!(out.status.exit_code == Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(stdout.starts_with("hello\n"), "{stdout:?}");
    ensure!(
        Path::new(stdout.lines().nth(1).unwrap_or_default()) == root.join("work").canonicalize()?,
        "the command did not run in the runtime's workdir: {stdout:?}"
    );

    agent
        .file_write("/work/a.txt", None, body(b"contents".to_vec()))
        .await?;
    ensure!(std::fs::read(root.join("work/a.txt"))? == b"contents");
    ensure!(read_all(agent.file_read("/work/a.txt").await?).await? == b"contents");
    // Paths stay inside the root, as with every provider.
    let e = agent.file_stat("/../../../../etc/passwd").await;
    ensure!(
        matches!(e, Err(Error::NotFound(_))),
        "a path left the root: {e:?}"
    );
    // The connection is cached.
    ensure!(Arc::ptr_eq(&agent, &fake.agent(&s.sandbox_id).await?));
    fake.destroy(&s.sandbox_id).await?;
    Ok(())
}

/// The pid of a process running `argv` with its working directory in `root`.
fn process_in(root: &Path, argv: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid = p.file_name().to_str()?.parse().ok()?;
        let cwd = std::fs::read_link(p.path().join("cwd")).ok()?;
        let cmdline = std::fs::read_to_string(p.path().join("cmdline")).ok()?;
        (cwd.starts_with(root) && cmdline == argv && running(pid)).then_some(pid)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_destroy_leaves_nothing_behind() -> anyhow::Result<()> {
    let fake = FakeProvider::new("fake");
    let s = spec();
    fake.spawn(&s).await?;
    let root = fake
        .root_of(&s.sandbox_id)
        .context("no root")?
        .canonicalize()?;
    let agent = fake.agent(&s.sandbox_id).await?;
    let background = background_sleep(&fake, &s.sandbox_id).await?;
    // A command still running when the runtime goes.
    let in_flight = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.exec(exec_req(&["sleep", "1001"])).await })
    };
    let sleeper = bounded("the in-flight command's start", async {
        loop {
            if let Some(pid) = process_in(&root, "sleep\x001001\x00") {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;

    fake.destroy(&s.sandbox_id).await?;
    ensure!(!root.exists(), "{} is left", root.display());
    ensure!(fake.list().await?.is_empty());
    gone(background).await?;
    gone(sleeper).await?;
    let ended = bounded("the end of the in-flight command", in_flight).await??;
    ensure!(ended.is_err(), "the in-flight command finished: {ended:?}");
    ensure!(!agent.is_alive(), "the connection outlived its runtime");
    // Destroying again, or what never existed, succeeds.
    fake.destroy(&s.sandbox_id).await?;
    fake.destroy(&SandboxId::generate()).await?;
    ensure!(matches!(
        fake.agent(&s.sandbox_id).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_drop_leaves_nothing_behind() -> anyhow::Result<()> {
    let fake = FakeProvider::new("fake");
    let mut left = Vec::new();
    for _ in 0..2 {
        let s = spec();
        fake.spawn(&s).await?;
        let root = fake.root_of(&s.sandbox_id).context("no root")?;
        left.push((root, background_sleep(&fake, &s.sandbox_id).await?));
    }
    drop(fake);
    for (root, pid) in left {
        ensure!(!root.exists(), "{} is left", root.display());
        gone(pid).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_knobs_do_what_they_say() -> anyhow::Result<()> {
    let fake = Arc::new(FakeProvider::new("fake"));

    fake.set_health(false, "switched off by the test");
    let h = fake.health().await;
    ensure!(
        !h.healthy && h.detail == "switched off by the test",
        "{h:?}"
    );

    // A failing spawn returns the error and leaves nothing.
    let refused = Error::ProviderUnavailable("the runtime refused".into());
    fake.fail_spawns(Some(refused.clone()));
    let s = spec();
    ensure!(fake.spawn(&s).await == Err(refused));
    ensure!(fake.list().await?.is_empty());
    fake.fail_spawns(None);

    // A held spawn waits at the gate until released.
    fake.hold_spawns();
    let held = {
        let fake = fake.clone();
        let s = s.clone();
        tokio::spawn(async move { fake.spawn(&s).await })
    };
    bounded("a spawn waiting at the gate", fake.spawns_waiting(1)).await?;
    ensure!(!held.is_finished() && fake.list().await?.is_empty());
    fake.release_spawns();
    bounded("the released spawn", held).await???;
    ensure!(fake.spawns_waiting_now() == 0);
    ensure!(fake.runtime_ids() == vec![s.sandbox_id.clone()]);

    // A destroy fails once, leaving the runtime, then works.
    fake.fail_next_destroy(Error::Timeout("the runtime did not stop".into()));
    ensure!(matches!(
        fake.destroy(&s.sandbox_id).await,
        Err(Error::Timeout(_))
    ));
    ensure!(fake.runtime_ids().len() == 1);
    fake.agent(&s.sandbox_id)
        .await?
        .exec(exec_req(&["true"]))
        .await?;
    fake.destroy(&s.sandbox_id).await?;
    ensure!(fake.runtime_ids().is_empty());

    // A stopped runtime is listed as not running and has no agent.
    let stopped = spec();
    fake.spawn(&stopped).await?;
    let agent = fake.agent(&stopped.sandbox_id).await?;
    ensure!(fake.stop_runtime(&stopped.sandbox_id));
    let listed = fake.list().await?;
    ensure!(listed.len() == 1 && !listed[0].running, "{listed:?}");
    ensure!(matches!(
        fake.agent(&stopped.sandbox_id).await,
        Err(Error::Conflict(_))
    ));
    ensure!(agent.exec(exec_req(&["true"])).await.is_err());

    // A vanished runtime is not listed and has no agent; its root is gone.
    let vanishing = spec();
    fake.spawn(&vanishing).await?;
    let root = fake.root_of(&vanishing.sandbox_id).context("no root")?;
    ensure!(fake.vanish(&vanishing.sandbox_id));
    ensure!(!root.exists());
    ensure!(fake
        .list()
        .await?
        .iter()
        .all(|r| r.sandbox_id != vanishing.sandbox_id));
    ensure!(matches!(
        fake.agent(&vanishing.sandbox_id).await,
        Err(Error::NotFound(_))
    ));
    ensure!(fake.calls().spawn == 4, "{:?}", fake.calls());
    Ok(())
}
