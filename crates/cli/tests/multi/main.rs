//! Multi-worker mode with real processes: control planes (`stacyvm serve
//! --no-local-worker` on one PostgreSQL) and `stacyvm worker` processes on
//! this host, one of them in a network namespace of its own so a
//! partition is a link set down. Short lease TTLs keep failures quick.
//!
//! Needs what the API suite needs, plus `ip netns`.

#[allow(dead_code)]
#[path = "../common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../common/fixtures.rs"]
mod fixtures;
#[allow(dead_code)]
#[path = "../common/server.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use cluster::{worker_token, Netns, Worker, WorkerOptions};
use support::{docker_containers_of, eventually, s, Api, Server, ServerOptions, StoreKind};

/// The lease TTL of these tests, in seconds.
const TTL: &str = "3";

fn control_plane() -> Result<Server> {
    Server::start(
        ServerOptions::new(StoreKind::Postgres)
            .providers("docker")
            .arg("--no-local-worker")
            .arg("--lease-ttl")
            .arg(TTL),
    )
}

/// Live sandboxes per worker name.
async fn load(admin: &Api) -> Result<BTreeMap<String, i64>> {
    let list = admin.get("/v1/workers").await?.ok(200)?;
    Ok(list["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_owned(),
                w["sandboxes"].as_i64().unwrap_or(-1),
            )
        })
        .collect())
}

async fn state_of(api: &Api, id: &str) -> Result<String> {
    let v = api.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
    Ok(s(&v, "state")?.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_spreads_honours_labels_and_drain_and_every_call_reaches_the_worker() -> Result<()>
{
    let server = control_plane()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, token) = worker_token(&admin, "pool").await?;
    let mut a = Worker::start(WorkerOptions::new(&server, &token, "docker").label("pool", "a"))?;
    let mut b =
        Worker::start(WorkerOptions::new(&server, &token, "docker,namespaces").label("pool", "b"))?;
    let wa = a.ready(&admin).await?;
    let wb = b.ready(&admin).await?;
    ensure!(wa["labels"] == json!({"pool": "a"}), "{wa}");
    ensure!(
        wb["providers"][0]["name"] == "docker" && wb["providers"][0]["healthy"] == true,
        "{wb}"
    );
    // A provider's mode travels with the worker's health reports.
    ensure!(
        wb["providers"][1]["name"] == "namespaces" && wb["providers"][1]["mode"] == "root",
        "{wb}"
    );
    let st = admin.get("/v1/status").await?.ok(200)?;
    ensure!(st["mode"] == "multi-worker", "{st}");
    let ns = st["providers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "namespaces"))
        .with_context(|| format!("namespaces in {st}"))?;
    ensure!(
        ns["mode"] == "root" && ns["not_enforced"].is_array(),
        "{ns}"
    );

    let (_, member) = admin.tenant_with("member").await?;
    // Four creates spread over the two workers.
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            s(
                &member.create_sandbox(json!({"image": "busybox"})).await?,
                "id",
            )?
            .to_owned(),
        );
    }
    let l = load(&admin).await?;
    ensure!(
        l.get(&a.opts.name) == Some(&2) && l.get(&b.opts.name) == Some(&2),
        "four creates on two idle workers go two and two: {l:?}"
    );
    // Labels pick the worker.
    let on_b = member
        .create_sandbox(json!({"image": "busybox", "worker_labels": {"pool": "b"}}))
        .await?;
    let on_b = s(&on_b, "id")?.to_owned();
    ensure!(load(&admin).await?.get(&b.opts.name) == Some(&3));
    // A drained worker takes nothing new: with labels only it fits, 503.
    let bid = b.id().context("worker b's id")?;
    admin
        .post(&format!("/v1/workers/{bid}/drain"), json!({}))
        .await?
        .ok(200)?;
    let e = member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "worker_labels": {"pool": "b"}}),
        )
        .await?
        .err(503, "no_capacity")?;
    ensure!(
        e.message.contains("draining") && e.message.contains("pool=b"),
        "{}",
        e.message
    );
    admin
        .post(&format!("/v1/workers/{bid}/undrain"), json!({}))
        .await?
        .ok(200)?;

    // Every kind of call reaches the sandbox on its worker.
    let out = member
        .exec(
            &on_b,
            json!({"cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
        )
        .await?;
    ensure!(
        out["stdout"] == "out\n" && out["stderr"] == "err\n" && out["exit_code"] == 3,
        "{out}"
    );
    let events = member
        .exec_stream(
            &on_b,
            json!({"cmd": ["sh", "-c", "echo one; sleep 1; echo two"]}),
        )
        .await?
        .map_err(|r| anyhow::anyhow!("stream refused: {}", r.text()))?
        .collect()
        .await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    ensure!(
        kinds == ["stdout", "stdout", "exit"] && events[0].data["data"] == "one\n",
        "{events:?}"
    );
    // Eight MiB in and out, streamed through the worker hop.
    let blob: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    member
        .put_bytes(
            &format!("/v1/sandboxes/{on_b}/files?path=/tmp/blob"),
            blob.clone(),
        )
        .await?
        .ok(201)?;
    let back = member
        .get(&format!("/v1/sandboxes/{on_b}/files?path=/tmp/blob"))
        .await?;
    ensure!(
        back.status == 200 && back.body == blob,
        "the file came back changed"
    );
    let list = member
        .get(&format!("/v1/sandboxes/{on_b}/files/list?path=/tmp"))
        .await?
        .ok(200)?;
    ensure!(list.to_string().contains("blob"), "{list}");
    let logs = member
        .get(&format!("/v1/sandboxes/{on_b}/logs"))
        .await?
        .ok(200)?;
    ensure!(logs["lines"].is_array(), "{logs}");

    // The worker hop and the heartbeats are on /metrics.
    let metrics = admin.get("/metrics").await?.text();
    for name in [
        "stacyvm_worker_rpc_duration_seconds",
        "stacyvm_worker_heartbeat_age_seconds",
        "stacyvm_worker_leases",
    ] {
        ensure!(metrics.contains(name), "/metrics lacks {name}");
    }

    // Destroy removes the runtime on the worker, and is idempotent.
    for id in ids.iter().chain([&on_b]) {
        member.destroy(id).await?;
        member.destroy(id).await?;
        ensure!(
            docker_containers_of(id)?.is_empty(),
            "{id} left a container"
        );
    }
    let l = load(&admin).await?;
    ensure!(l.values().all(|n| *n == 0), "{l:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_loses_its_sandboxes_and_when_restarted_destroys_their_runtimes(
) -> Result<()> {
    let server = control_plane()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, token) = worker_token(&admin, "pool").await?;
    let mut w = Worker::start(WorkerOptions::new(&server, &token, "docker").label("pool", "a"))?;
    let mut spare =
        Worker::start(WorkerOptions::new(&server, &token, "docker").label("pool", "b"))?;
    w.ready(&admin).await?;
    spare.ready(&admin).await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    admin
        .put(
            &format!("/v1/tenants/{tenant}/quota"),
            json!({"max_sandboxes": 2}),
        )
        .await?
        .ok(200)?;
    let mut doomed = Vec::new();
    for _ in 0..2 {
        let v = member
            .create_sandbox(json!({"image": "busybox", "worker_labels": {"pool": "a"}}))
            .await?;
        doomed.push(s(&v, "id")?.to_owned());
    }
    member
        .post("/v1/sandboxes", json!({"image": "busybox"}))
        .await?
        .err(429, "quota_exceeded")?;

    w.kill9()?;
    let wid = w.id().context("the worker's id")?;
    eventually(
        Duration::from_secs(60),
        "the killed worker to be down and its sandboxes lost",
        || {
            let (admin, member, doomed, wid) = (&admin, &member, &doomed, &wid);
            async move {
                let wv = admin.get(&format!("/v1/workers/{wid}")).await?.ok(200)?;
                let mut lost = wv["state"] == "down";
                for id in doomed {
                    lost &= state_of(member, id).await? == "lost";
                }
                Ok(lost.then_some(()))
            }
        },
    )
    .await?;
    // The quota is free again: the spare worker takes two new ones.
    for _ in 0..2 {
        let v = member.create_sandbox(json!({"image": "busybox"})).await?;
        member.destroy(s(&v, "id")?).await?;
    }
    let audit = admin.audit("action=sandbox.lost").await?;
    for id in &doomed {
        ensure!(
            audit.iter().any(|e| e["sandbox_id"] == id.as_str()),
            "no sandbox.lost event for {id}: {audit:?}"
        );
    }
    // Their containers still run on the dead worker's host...
    for id in &doomed {
        ensure!(!docker_containers_of(id)?.is_empty(), "{id} vanished early");
    }
    // ...until it comes back: it holds no lease on them, so it removes
    // them, adopts nothing, and is ready again.
    w.restart()?;
    w.ready(&admin).await?;
    eventually(
        Duration::from_secs(60),
        "the returning worker to remove the lost sandboxes' containers",
        || {
            let doomed = &doomed;
            async move {
                for id in doomed {
                    if !docker_containers_of(id)?.is_empty() {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
        },
    )
    .await?;
    for id in &doomed {
        ensure!(state_of(&member, id).await? == "lost");
    }
    let wv = admin.get(&format!("/v1/workers/{wid}")).await?.ok(200)?;
    ensure!(wv["sandboxes"] == 0 && wv["state"] == "ready", "{wv}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_that_heals_is_fenced_and_the_old_owner_drops_its_runtime() -> Result<()> {
    let ns = Netns::new()?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Postgres)
            .providers("docker")
            .arg("--no-local-worker")
            .arg("--lease-ttl")
            .arg(TTL)
            .listen(&format!("{}:0", ns.host_ip)),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, token) = worker_token(&admin, "edge").await?;
    let cp = server.url.clone();
    let mut w =
        Worker::start(WorkerOptions::new(&server, &token, "namespaces").in_netns(&ns, &cp))?;
    w.ready(&admin).await?;
    let (_, member) = admin.tenant_with("member").await?;
    let v = member
        .create_sandbox(json!({"image": "busybox", "provider": "namespaces"}))
        .await?;
    let id = s(&v, "id")?.to_owned();
    ensure!(member.sh(&id, "echo hi").await? == "hi\n");
    let runtime_dir = w.data_dir().join("namespaces").join(&id);
    ensure!(
        runtime_dir.exists(),
        "no runtime at {}",
        runtime_dir.display()
    );

    ns.cut()?;
    eventually(
        Duration::from_secs(60),
        "the partitioned worker's sandbox to be lost",
        || {
            let (member, id) = (&member, &id);
            async move { Ok((state_of(member, id).await? == "lost").then_some(())) }
        },
    )
    .await?;
    // The control plane cannot reach it; the runtime still runs there.
    ensure!(
        runtime_dir.exists(),
        "the runtime went away during the partition"
    );
    member
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await?
        .err(409, "conflict")?;

    ns.heal()?;
    // Its first heartbeat after the partition reports the runtime it held:
    // the control plane refuses it (and audits that), and the worker drops
    // the runtime.
    eventually(
        Duration::from_secs(60),
        "the healed worker's stale report to be refused",
        || {
            let (admin, id) = (&admin, &id);
            async move {
                let events = admin.audit("action=worker.heartbeat").await?;
                Ok(events.into_iter().find(|e| {
                    e["detail"]["refused"]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|x| x["sandbox_id"] == id.as_str()))
                }))
            }
        },
    )
    .await?;
    eventually(
        Duration::from_secs(60),
        "the old owner to destroy the runtime it lost",
        || {
            let dir = runtime_dir.clone();
            async move { Ok((!dir.exists()).then_some(())) }
        },
    )
    .await?;
    w.ready(&admin).await?;
    ensure!(state_of(&member, &id).await? == "lost");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_worker_token_stops_the_worker_and_marks_it_down() -> Result<()> {
    let server = control_plane()?;
    let admin = server.admin();
    let (tid, token) = worker_token(&admin, "short-lived").await?;
    let mut w = Worker::start(WorkerOptions::new(&server, &token, "docker"))?;
    w.ready(&admin).await?;
    admin
        .delete(&format!("/v1/workers/tokens/{tid}"))
        .await?
        .ok(204)?;
    let wid = w.id().context("worker id")?;
    let wv = admin.get(&format!("/v1/workers/{wid}")).await?.ok(200)?;
    ensure!(wv["state"] == "down", "{wv}");
    let status = w.exited(Duration::from_secs(60)).await?;
    ensure!(!status.success(), "a refused worker exits non-zero");
    ensure!(
        w.log_all().contains("revoked") || w.log_all().contains("refused"),
        "the worker says why it stopped:\n{}",
        w.log_all()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_stream_leaves_the_other_serving_and_reconciling() -> Result<()> {
    let mut first = control_plane()?;
    let second = Server::start(first.replica_options()?)?;
    let admin = first.admin();
    admin.import_busybox().await?;
    let (_, token) = worker_token(&admin, "pool").await?;
    // The worker reaches the surviving replica (in production, all of
    // them behind one address); the client starts on the doomed one.
    let mut w = Worker::start(WorkerOptions::new(&second, &token, "docker"))?;
    w.ready(&admin).await?;
    let (_, member) = admin.tenant_with("member").await?;
    let on_second = second.client(member.key_secret());
    let v = member.create_sandbox(json!({"image": "busybox"})).await?;
    let id = s(&v, "id")?.to_owned();
    // Expires later on whichever replica runs the reconcilers then.
    let short = member
        .create_sandbox(json!({"image": "busybox", "timeout_s": 8}))
        .await?;
    let short = s(&short, "id")?.to_owned();

    let cmd =
        json!({"cmd": ["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; sleep 1; done"]});
    let mut stream = member
        .exec_stream(&id, cmd.clone())
        .await?
        .map_err(|r| anyhow::anyhow!("stream refused: {}", r.text()))?;
    let first_event = stream.next_event().await?.context("a first event")?;
    ensure!(first_event.event == "stdout", "{first_event:?}");
    first.kill9()?;
    // The stream on the dead replica ends without an exit event.
    let mut ended_cleanly = false;
    while let Ok(Some(e)) = stream.next_event().await {
        ended_cleanly |= e.event == "exit";
    }
    ensure!(!ended_cleanly, "a stream outlived its replica");
    // The client retries on the other replica, which reaches the same
    // worker and sandbox.
    let events = on_second
        .exec_stream(&id, cmd)
        .await?
        .map_err(|r| anyhow::anyhow!("stream refused: {}", r.text()))?
        .collect()
        .await?;
    let last: &Value = &events.last().context("events")?.data;
    ensure!(
        events.last().map(|e| e.event.as_str()) == Some("exit") && last["exit_code"] == 0,
        "{events:?}"
    );
    ensure!(
        events.iter().filter(|e| e.event == "stdout").count() >= 1,
        "{events:?}"
    );
    // The reconcilers run on the survivor: the short sandbox expires.
    eventually(
        Duration::from_secs(60),
        "the short-lived sandbox to expire on the surviving replica",
        || {
            let (api, short) = (&on_second, &short);
            async move { Ok((state_of(api, short).await? == "destroyed").then_some(())) }
        },
    )
    .await?;
    on_second.destroy(&id).await?;
    Ok(())
}
