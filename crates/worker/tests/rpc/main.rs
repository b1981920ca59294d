//! The worker RPC against real providers: a `RemoteWorker` drives a worker
//! RPC server on loopback (TLS once), and everything the control plane does
//! to a sandbox (spawn, exec, streams, files, pause, destroy) goes through
//! it, with the fencing and authentication a remote worker enforces.
//!
//! Needs: dockerd, proot, user namespaces, `STACYVM_AGENT_BIN` and
//! `STACYVM_TEST_IMAGE_TAR` (`. scripts/lib.sh && prepare_test_env`).

mod node;
mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use stacyvm_core::{ByteStream, Error, ExecEvent};
use stacyvm_worker::{ClientTls, Lease, ServerTls, Worker};
use support::{sh, spec, Node, SECRET};

/// Spawn, exec, a streaming exec whose output arrives before it exits, a
/// file of several MiB written and read back in chunks, and an idempotent
/// destroy, all through the RPC and the agent tunnel.
async fn round_trip(provider: &str) -> anyhow::Result<()> {
    let node = Node::start(provider, None).await?;
    let w = node.remote();
    let spec = spec();
    let lease = Lease::new(&spec.sandbox_id, 3, &node.provider_name());
    node.guard.register(&spec.sandbox_id);
    w.spawn(&lease, &spec).await?;

    let listed = w.runtimes().await?;
    assert!(
        listed
            .iter()
            .any(|r| r.runtime.sandbox_id == spec.sandbox_id),
        "{listed:?}"
    );

    let agent = w.agent(&lease).await?;
    let out = agent.exec(sh("echo hello; echo oops >&2; exit 3")).await?;
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status.exit_code, Some(3));

    // The command waits for a file only the test creates once it has seen
    // the first line: it can only end if that line crossed the RPC first.
    let mut stream = agent
        .exec_stream(sh(
            "echo started; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo finished",
        ))
        .await?;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("started\n") {
        match stream.next().await {
            Some(Ok(ExecEvent::Stdout(b))) => seen.extend_from_slice(&b),
            Some(Ok(ExecEvent::Exit(s))) => panic!("exited before the test let it: {s:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // A second call on the same tunnel while the stream is open.
    let go: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from_static(b"go"))]));
    agent.file_write("/tmp/go", None, go).await?;
    let mut exit = None;
    while let Some(ev) = stream.next().await {
        match ev? {
            ExecEvent::Stdout(b) => seen.extend_from_slice(&b),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(s) => exit = Some(s),
        }
    }
    assert_eq!(String::from_utf8_lossy(&seen), "started\nfinished\n");
    assert_eq!(exit.and_then(|s| s.exit_code), Some(0));

    // 12 MiB in 64 KiB chunks made on demand, never whole in memory.
    const CHUNKS: u32 = 192;
    let chunk = |i: u32| {
        let mut h = Sha256::new();
        h.update(i.to_le_bytes());
        let seed = h.finalize();
        Bytes::from(
            seed.iter()
                .cycle()
                .take(64 * 1024)
                .copied()
                .collect::<Vec<u8>>(),
        )
    };
    let mut want = Sha256::new();
    for i in 0..CHUNKS {
        want.update(chunk(i));
    }
    let body: ByteStream =
        Box::pin(futures_util::stream::iter(0..CHUNKS).map(move |i| Ok(chunk(i))));
    let entry = agent.file_write("/tmp/big", None, body).await?;
    assert_eq!(entry.size, u64::from(CHUNKS) * 64 * 1024);
    let mut read = agent.file_read("/tmp/big").await?;
    let mut got = Sha256::new();
    let mut total = 0u64;
    while let Some(b) = read.next().await {
        let b = b?;
        total += b.len() as u64;
        got.update(&b);
    }
    assert_eq!(total, u64::from(CHUNKS) * 64 * 1024);
    assert_eq!(got.finalize(), want.finalize());

    let logs = w.logs(&lease).await?;
    drop(logs);
    // A reading of the sandbox's use, measured on the worker's host.
    let stats = w.stats(&lease).await?;
    assert!(stats.cpu_time_ns.is_some_and(|t| t > 0), "{stats:?}");
    assert!(stats.mem_used.is_some_and(|m| m > 0), "{stats:?}");
    assert!(
        stats
            .mem_total
            .is_some_and(|t| t >= stats.mem_used.unwrap_or(0)),
        "{stats:?}"
    );
    w.destroy(&lease).await?;
    w.destroy(&lease).await?;
    // Destroyed: the worker holds no lease to measure it under.
    let gone = w.stats(&lease).await;
    assert!(matches!(gone, Err(Error::Conflict(_))), "{gone:?}");
    let listed = w.runtimes().await?;
    assert!(
        !listed
            .iter()
            .any(|r| r.runtime.sandbox_id == spec.sandbox_id),
        "{listed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_docker() -> anyhow::Result<()> {
    round_trip("docker").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_namespaces() -> anyhow::Result<()> {
    round_trip("namespaces").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_proot() -> anyhow::Result<()> {
    round_trip("proot").await
}

/// A plugin's sandboxes through the RPC: the tunnel reaches the plugin's
/// agent, or the bridge that serves exec for a plugin without one.
async fn plugin_round_trip(kind: &str) -> anyhow::Result<()> {
    let node = Node::start(kind, None).await?;
    let w = node.remote();
    let spec = spec();
    let lease = Lease::new(&spec.sandbox_id, 1, &node.provider_name());
    assert_eq!(lease.provider, "plugin:hostexec");
    node.guard.register(&spec.sandbox_id);
    w.spawn(&lease, &spec).await?;
    let agent = w.agent(&lease).await?;
    let out = agent.exec(sh("echo plugin; exit 4")).await?;
    assert_eq!(out.stdout, b"plugin\n");
    assert_eq!(out.status.exit_code, Some(4));
    let mut stream = agent.exec_stream(sh("echo one; echo two >&2")).await?;
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(ev) = stream.next().await {
        match ev? {
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
            ExecEvent::Exit(s) => exit = Some(s),
        }
    }
    assert_eq!(
        (stdout.as_slice(), stderr.as_slice()),
        (&b"one\n"[..], &b"two\n"[..])
    );
    assert_eq!(exit.and_then(|s| s.exit_code), Some(0));
    w.destroy(&lease).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_plugin_with_its_own_agent() -> anyhow::Result<()> {
    plugin_round_trip("plugin-unix").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_plugin_bridge() -> anyhow::Result<()> {
    plugin_round_trip("plugin-bridge").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_fencing_token_is_refused() -> anyhow::Result<()> {
    let node = Node::start("namespaces", None).await?;
    let w = node.remote();
    let spec = spec();
    let id = spec.sandbox_id.clone();
    let provider = node.provider_name();
    node.guard.register(&id);
    w.spawn(&Lease::new(&id, 5, &provider), &spec).await?;
    let old = Lease::new(&id, 4, &provider);
    for e in [
        w.pause(&old).await.unwrap_err(),
        w.logs(&old).await.unwrap_err(),
        w.stats(&old).await.unwrap_err(),
        w.agent(&old).await.unwrap_err(),
        w.destroy(&old).await.unwrap_err(),
        w.spawn(&old, &spec).await.unwrap_err(),
    ] {
        assert!(
            matches!(e, Error::Conflict(ref m) if m.contains("stale")),
            "{e:?}"
        );
    }
    // The sandbox is untouched and the holder of the current token acts.
    let current = Lease::new(&id, 5, &provider);
    let old_agent = w.agent(&current).await?;
    let out = old_agent.exec(sh("echo alive")).await?;
    assert_eq!(out.stdout, b"alive\n");
    // A newer claim fences the old holder out, its open tunnel included.
    let newer = Lease::new(&id, 6, &provider);
    w.logs(&newer).await?;
    assert!(matches!(w.logs(&current).await, Err(Error::Conflict(_))));
    assert!(old_agent.exec(sh("echo still")).await.is_err());
    let out = w.agent(&newer).await?.exec(sh("echo alive")).await?;
    assert_eq!(out.stdout, b"alive\n");
    w.pause(&newer).await?;
    w.resume(&newer).await?;
    // No lease at all on an unknown sandbox: refused, but destroy passes.
    let stranger = Lease::new(&support::spec().sandbox_id, 1, &provider);
    assert!(matches!(w.pause(&stranger).await, Err(Error::Conflict(_))));
    w.destroy(&stranger).await?;
    w.destroy(&newer).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_secret_are_refused() -> anyhow::Result<()> {
    let node = Node::start("proot", None).await?;
    // The remote worker maps the refusal to an unreachable worker.
    let e = node
        .remote_with("svmws_wrong", None)
        .runtimes()
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Unavailable(ref m) if m.contains("credentials")),
        "{e:?}"
    );
    // A bare gRPC client, no credentials at all, on every kind of call.
    let mut raw = stacyvm_worker::rpc::pb::worker_client::WorkerClient::connect(format!(
        "http://{}",
        node.addr()
    ))
    .await?;
    let s = raw
        .runtimes(stacyvm_worker::rpc::pb::Empty {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    let s = raw
        .destroy(stacyvm_worker::rpc::pb::LeaseRequest {
            lease: Some((&Lease::overriding(&spec().sandbox_id, "proot")).into()),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    let s = raw
        .agent_tunnel(futures_util::stream::empty())
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    // The right secret works on the same port.
    node.remote().runtimes().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_between_control_plane_and_worker() -> anyhow::Result<()> {
    let cert = rcgen::generate_simple_self_signed(vec!["worker.test".into()])?;
    let server_tls = ServerTls {
        cert_pem: cert.cert.pem().into_bytes(),
        key_pem: cert.signing_key.serialize_pem().into_bytes(),
    };
    let node = Node::start("proot", Some(&server_tls)).await?;
    let trusted = ClientTls {
        ca_pem: cert.cert.pem().into_bytes(),
        domain: Some("worker.test".into()),
    };
    let w = node.remote_with(SECRET, Some(trusted));
    let spec = spec();
    let lease = Lease::new(&spec.sandbox_id, 1, &node.provider_name());
    node.guard.register(&spec.sandbox_id);
    w.spawn(&lease, &spec).await?;
    let out = w.agent(&lease).await?.exec(sh("echo over tls")).await?;
    assert_eq!(out.stdout, b"over tls\n");
    w.destroy(&lease).await?;

    // A control plane trusting another CA does not get through, nor does
    // one speaking plain HTTP/2 to the TLS port.
    let other = rcgen::generate_simple_self_signed(vec!["worker.test".into()])?;
    let untrusted = ClientTls {
        ca_pem: other.cert.pem().into_bytes(),
        domain: Some("worker.test".into()),
    };
    let e = node
        .remote_with(SECRET, Some(untrusted))
        .runtimes()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let e = node.remote_with(SECRET, None).runtimes().await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_went_away_is_unavailable() -> anyhow::Result<()> {
    let mut node = Node::start("proot", None).await?;
    let w = node.remote();
    let spec = spec();
    let lease = Lease::new(&spec.sandbox_id, 1, &node.provider_name());
    node.guard.register(&spec.sandbox_id);
    w.spawn(&lease, &spec).await?;
    let agent = w.agent(&lease).await?;
    agent.exec(sh("true")).await?;
    node.server.take().expect("running").shutdown().await?;
    let e = w.runtimes().await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let e = w.destroy(&lease).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    // The tunnel went with the server: the cached agent fails, not hangs.
    assert!(agent.exec(sh("true")).await.is_err());
    Ok(())
}

/// A remote worker whose provider cannot enforce an allow list refuses the
/// spawn (`unsupported`, naming the provider) and starts nothing, rather
/// than give the sandbox full egress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_worker_refuses_an_allow_list_its_provider_cannot_enforce() -> anyhow::Result<()> {
    let node = Node::start("proot", None).await?;
    let w = node.remote();
    let mut spec = spec();
    spec.network = stacyvm_core::Network::Egress;
    spec.egress_allow = stacyvm_core::EgressRule::parse_list(&["192.0.2.1", "pypi.org"])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let lease = Lease::new(&spec.sandbox_id, 1, &node.provider_name());
    node.guard.register(&spec.sandbox_id);
    match w.spawn(&lease, &spec).await {
        Err(Error::Unsupported(why)) => {
            anyhow::ensure!(why.contains("proot") && why.contains("allow"), "{why}")
        }
        other => anyhow::bail!("a spawn with an allow list on proot answered {other:?}"),
    }
    let listed = w.runtimes().await?;
    anyhow::ensure!(
        !listed
            .iter()
            .any(|r| r.runtime.sandbox_id == spec.sandbox_id),
        "{listed:?}"
    );
    Ok(())
}

/// A remote worker's Docker provider takes an allow list (the worker says
/// so when asked) and enforces it: an address off the list is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_docker_worker_enforces_an_allow_list() -> anyhow::Result<()> {
    let node = Node::start("docker", None).await?;
    let w = node.remote();
    let mut spec = spec();
    spec.network = stacyvm_core::Network::Egress;
    spec.egress_allow =
        stacyvm_core::EgressRule::parse_list(&["192.0.2.1"]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let lease = Lease::new(&spec.sandbox_id, 1, &node.provider_name());
    node.guard.register(&spec.sandbox_id);
    w.spawn(&lease, &spec).await?;
    let agent = w.agent(&lease).await?;
    let out = agent
        .exec(sh(
            "cat /etc/resolv.conf; nc -w 2 198.51.100.1 80 </dev/null 2>&1; echo rc=$?",
        ))
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        text.contains("nameserver 127.0.0.53") && !text.contains("rc=0"),
        "{text}"
    );
    w.destroy(&lease).await?;
    Ok(())
}

/// A worker binds into sandboxes only the volumes it keeps itself: a
/// worker with no volume directory refuses volume calls, and a spawn whose
/// mount names any other host path is refused before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_binds_in_only_volumes_it_keeps() -> anyhow::Result<()> {
    let node = Node::start("docker", None).await?;
    let w = node.remote();
    let vol = stacyvm_core::VolumeId::generate();
    for r in [
        w.volume_create(&vol, 16).await,
        w.volume_remove(&vol).await,
        w.volume_mount(&vol).await.map(|_| ()),
    ] {
        match r {
            Err(Error::Unsupported(why)) => anyhow::ensure!(why.contains("no volumes"), "{why}"),
            other => anyhow::bail!("a worker without volumes answered {other:?}"),
        }
    }
    let mut spec = spec();
    spec.mounts = vec![stacyvm_core::HostMount {
        source: "/etc".into(),
        target: "/host-etc".into(),
        read_only: true,
    }];
    let lease = Lease::new(&spec.sandbox_id, 1, &node.provider_name());
    node.guard.register(&spec.sandbox_id);
    match w.spawn(&lease, &spec).await {
        Err(Error::InvalidRequest(why)) => {
            anyhow::ensure!(
                why.contains("/etc") && why.contains("not a volume"),
                "{why}"
            )
        }
        other => anyhow::bail!("a spawn binding /etc answered {other:?}"),
    }
    anyhow::ensure!(
        !w.runtimes()
            .await?
            .iter()
            .any(|r| r.runtime.sandbox_id == spec.sandbox_id),
        "the refused sandbox runs"
    );
    Ok(())
}
