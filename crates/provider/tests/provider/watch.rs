//! Directory watches through each provider's own agent, on the real
//! runtime: a watch sees what a command in the sandbox makes (the command
//! and the agent may see the sandbox's files through different mounts), a
//! sync comes after those events, and the watch stops with its client.

use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use stacyvm_provider::agent_client::{Watch, WatchEvent, WatchKind, WatchUpdate};
use stacyvm_provider::DynProvider;

use crate::support::{self, AgentCalls, Harness, TestEnv};

/// Every event up to the answer of one sync, within a minute.
async fn until_synced(w: &mut Watch) -> anyhow::Result<Vec<WatchEvent>> {
    w.sync.sync().await?;
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(60), w.events.next())
            .await
            .context("no sync answer within a minute")?
            .context("the watch ended")??;
        match next {
            WatchUpdate::Events(batch) => seen.extend(batch),
            WatchUpdate::Synced => return Ok(seen),
        }
    }
}

async fn a_watch_sees_what_commands_make(
    provider: DynProvider,
    env: TestEnv,
) -> anyhow::Result<()> {
    let h = Harness::new(env, provider);
    let id = h.spawn_default().await?;
    h.sh_ok(&id, "mkdir -p /tmp/w/old").await?;
    let agent = h.provider().agent_of(&id).await?;
    let mut w = agent.watch("/tmp/w", true).await?;
    h.sh_ok(
        &id,
        "echo x > /tmp/w/a.txt && echo y > /tmp/w/old/b.txt && mkdir -p /tmp/w/new/deep && \
         touch /tmp/w/new/deep/c.txt && rm /tmp/w/a.txt",
    )
    .await?;
    let events = until_synced(&mut w).await?;
    let has = |name: &str, kind: WatchKind| events.iter().any(|e| e.name == name && e.kind == kind);
    for (name, kind) in [
        ("a.txt", WatchKind::Create),
        ("a.txt", WatchKind::Write),
        ("old/b.txt", WatchKind::Create),
        ("new", WatchKind::Create),
        ("new/deep/c.txt", WatchKind::Create),
        ("a.txt", WatchKind::Remove),
    ] {
        if !has(name, kind) {
            bail!("no {kind:?} of {name} in {events:?}");
        }
    }
    // The agent's own writes show by the file's name.
    agent
        .file_write("/tmp/w/up.txt", None, support::body(b"up".to_vec()))
        .await?;
    let events = until_synced(&mut w).await?;
    if !events.iter().all(|e| e.name == "up.txt") || events.is_empty() {
        bail!("an agent write showed as {events:?}");
    }
    drop(w);
    // The connection and the sandbox go on.
    h.sh_ok(&id, "true").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let p = support::docker_provider(&env).await?;
    a_watch_sees_what_commands_make(p, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proot() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let p = support::proot_provider(&env).await?;
    a_watch_sees_what_commands_make(p, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let p = support::namespaces_provider(&env).await?;
    a_watch_sees_what_commands_make(p, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let p = support::qemu_provider(&env).await?;
    a_watch_sees_what_commands_make(p, env).await
}
