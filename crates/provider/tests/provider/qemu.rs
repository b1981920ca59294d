//! The qemu provider on real QEMU under TCG, with one guest for all the
//! checks to keep boots few: the sandbox runs its own kernel and sees none
//! of the host's files, its console is its log, pause saves the guest's
//! state to its overlay and stops QEMU, a new provider (a restarted
//! server) adopts the saved guest and resumes it in a new QEMU, a fork bomb stays inside the guest, and destroy
//! leaves nothing; a running guest snapshots live through its agent; the image's cached root
//! goes with the image once no guest reads it.
//! Egress guests (two more boots) reach a machine beyond the host through
//! its NAT, but neither the host nor each other, keep their network
//! through a save and restore, and leave no network behind; a network
//! whose sandbox vanished is swept. A guest with an allow list (one more
//! boot) reaches only what it lists, resolves only listed names, and gets
//! its DNS filter back from a restarted server.

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use stacyvm_core::{EgressRule, HostMount, Network, SandboxId};
use stacyvm_provider::egress_filter::far_side::FarSide;
use stacyvm_provider::microvm::net::{self, GuestNet};
use stacyvm_provider::{DynProvider, Provider};

use crate::support::{
    self, check_network_gone, exec_req, host_primary_ipv4, leftovers, reached_from, run,
    AgentCalls, Harness, HostListener, TestEnv,
};

/// Whether a process runs (a zombie does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// Host threads of a process (QEMU's vCPU and I/O threads).
fn threads(pid: i32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_its_own_machine_and_survives_a_server_restart() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let provider = support::qemu_provider(&env).await?;
    let h = Harness::new(env, provider);
    let id = h.spawn_default().await?;
    let dir = h.env.data_dir.join("qemu").join(id.as_str());

    // Its own kernel: the guest kernel's release, not the host's.
    let guest_dir = stacyvm_provider::microvm::GuestAssets::default_dir();
    let release = std::fs::read_to_string(guest_dir.join("kernel-release"))?;
    let uname = h.sh_ok(&id, "uname -r").await?;
    ensure!(
        uname.trim() == release.trim(),
        "guest kernel {uname:?}, expected {release:?}"
    );

    // None of the host's files: a file the host just wrote is not there,
    // whatever path the guest tries.
    let marker = h.env.data_dir.join("host-only-marker");
    std::fs::write(&marker, "host secret")?;
    let probe = format!(
        "cat {m} 2>&1; ls {d} 2>&1; cat /proc/1/cmdline | tr '\\0' ' '",
        m = marker.display(),
        d = h.env.data_dir.display()
    );
    let out = h.sh(&id, &probe).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !text.contains("host secret"),
        "the guest read a host file: {text}"
    );
    ensure!(
        text.contains("/.stacyvm/agent"),
        "the guest's init is not the agent: {text}"
    );

    // Network "none": no NIC at all.
    let ifaces = h.sh_ok(&id, "ls /sys/class/net").await?;
    ensure!(
        ifaces.split_whitespace().collect::<Vec<_>>() == ["lo"],
        "a network-none guest has interfaces {ifaces:?}"
    );
    ensure!(!dir.join("net.json").exists());

    // The console is the runtime log.
    let logs = h.provider().logs(&id).await?;
    ensure!(
        logs.iter()
            .any(|l| l.message.contains("starting the agent")),
        "the console is not in the logs: {logs:?}"
    );

    // A running guest's snapshot is its agent's tar of its root, read live:
    // what a command just wrote is in it, what the host holds is not.
    h.sh_ok(&id, "echo live > /work/live-mark").await?;
    let mut tar = h.provider().snapshot(&id).await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut tar).await {
        bytes.extend_from_slice(&chunk?);
    }
    let mut found = None;
    for entry in tar::Archive::new(bytes.as_slice()).entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        // The mount points stay, empty.
        let inside = |dir: &str| path.strip_prefix(dir).is_some_and(|rest| !rest.is_empty());
        ensure!(
            !inside("proc/") && !inside(".stacyvm/"),
            "the snapshot holds {path}"
        );
        if path.trim_start_matches("./") == "work/live-mark" {
            let mut text = String::new();
            entry.read_to_string(&mut text)?;
            found = Some(text);
        }
    }
    ensure!(
        found.as_deref() == Some("live\n"),
        "the live snapshot lacks the file just written: {found:?}"
    );

    // Pause saves the guest's state into its overlay and stops QEMU: the
    // guest's memory (a file only in its RAM, its boot id) survives QEMU,
    // and its agent is not handed out meanwhile.
    let boot_id = h
        .sh_ok(
            &id,
            "echo in-ram > /dev/shm/mark; cat /proc/sys/kernel/random/boot_id",
        )
        .await?;
    let booted_pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))?
        .trim()
        .parse()?;
    h.provider().pause(&id).await?;
    ensure!(
        dir.join("saved").exists(),
        "the paused guest's state was not saved: {:?}",
        h.provider().logs(&id).await?
    );
    ensure!(
        !alive(booted_pid),
        "QEMU (pid {booted_pid}) still runs after the guest was saved"
    );
    let e = h
        .provider()
        .agent(&id)
        .await
        .err()
        .context("a paused guest's agent")?;
    ensure!(matches!(e, stacyvm_core::Error::Conflict(_)), "{e}");

    // A restarted server: a new provider over the same data dir finds the
    // guest, still paused, and resumes it from its saved state.
    let adopted: DynProvider = Arc::new(support::qemu_provider_now(&h.env)?);
    h.guard.replace_provider(adopted.clone());
    let listed = adopted.list().await?;
    ensure!(
        listed.iter().any(|r| r.sandbox_id == id && r.running),
        "the new provider does not list the guest as running: {listed:?}"
    );
    let e = adopted
        .agent(&id)
        .await
        .err()
        .context("the adopted paused guest's agent")?;
    ensure!(matches!(e, stacyvm_core::Error::Conflict(_)), "{e}");
    adopted.resume(&id).await?;
    ensure!(!dir.join("saved").exists());
    let after = h
        .sh_ok(&id, "cat /dev/shm/mark /proc/sys/kernel/random/boot_id")
        .await?;
    ensure!(
        after == format!("in-ram\n{boot_id}"),
        "after the restore the guest reads {after:?}, before it was in-ram and {boot_id:?}"
    );
    let qemu_pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))?
        .trim()
        .parse()?;
    ensure!(qemu_pid != booted_pid && alive(qemu_pid));

    // A fork bomb is the guest's problem: on the host QEMU keeps its few
    // threads, and the guest is destroyed whole.
    let before = threads(qemu_pid)?;
    let mut bomb = exec_req(&["sh", "-c", "b() { b | b & }; b"]);
    bomb.timeout_ms = 5_000;
    let _ = adopted.agent_of(&id).await?.exec(bomb).await;
    let after = threads(qemu_pid)?;
    ensure!(
        after <= before + 8,
        "QEMU grew from {before} to {after} host threads during the guest's fork bomb"
    );

    // The image's cached ext4 root stays while a guest's overlay reads it,
    // and goes with the image once none does.
    let image = h.env.catalog.get("busybox").await?;
    let cached =
        stacyvm_provider::microvm::cached_rootfs(&h.env.data_dir.join("qemu-cache"), &image.digest);
    ensure!(cached.is_file(), "no cached root at {}", cached.display());
    ensure!(
        stacyvm_provider::microvm::qcow2_backing(&dir.join("root.qcow2")).as_deref()
            == Some(cached.as_path()),
        "the overlay does not name the cached root"
    );
    adopted.image_removed(&image).await?;
    ensure!(
        cached.is_file(),
        "the cached root went while a guest reads it"
    );

    adopted.destroy(&id).await?;
    adopted.image_removed(&image).await?;
    ensure!(!cached.exists(), "the cached root outlived its image");
    ensure!(
        std::fs::metadata(format!("/proc/{qemu_pid}")).is_err()
            || std::fs::read_to_string(format!("/proc/{qemu_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "QEMU outlived destroy"
    );
    adopted.destroy(&id).await?;
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// Another machine: a network namespace behind a veth pair, on an address
/// of the benchmarking block 198.18.0.0/15, with a TCP listener in it that
/// records each connection's peer and what it sent.
struct RemoteMachine {
    netns: String,
    addr: String,
    /// The host's address on the link to it.
    host_addr: String,
    port: u16,
    got: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RemoteMachine {
    fn start() -> anyhow::Result<RemoteMachine> {
        let id = SandboxId::generate().to_string();
        let tag = &id[id.len() - 8..];
        let seed = u32::from_str_radix(tag, 16)?;
        let (b2, b3, b4) = (18 + (seed >> 14) % 2, (seed >> 6) % 256, (seed % 64) * 4);
        let mut m = RemoteMachine {
            netns: format!("svmt-{tag}"),
            addr: format!("198.{b2}.{b3}.{}", b4 + 2),
            host_addr: format!("198.{b2}.{b3}.{}", b4 + 1),
            port: 9000,
            got: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        let (host_end, far_end) = (format!("svt{tag}h"), format!("svt{tag}n"));
        let host_cidr = format!("{}/30", m.host_addr);
        let far_cidr = format!("{}/30", m.addr);
        run("ip", &["netns", "add", &m.netns])?;
        let ns = m.netns.clone();
        for args in [
            vec![
                "link", "add", &host_end, "type", "veth", "peer", "name", &far_end, "netns", &ns,
            ],
            vec!["addr", "add", &host_cidr, "dev", &host_end],
            vec!["link", "set", &host_end, "up"],
            vec!["-n", &ns, "addr", "add", &far_cidr, "dev", &far_end],
            vec!["-n", &ns, "link", "set", &far_end, "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
            vec!["-n", &ns, "route", "add", "default", "via", &m.host_addr],
        ] {
            run("ip", &args)?;
        }
        // The listener's socket lives in the namespace its thread is in.
        let (tx, rx) = std::sync::mpsc::channel();
        let (got, stop, port) = (m.got.clone(), m.stop.clone(), m.port);
        let nsfile = std::fs::File::open(format!("/run/netns/{ns}"))?;
        m.thread = Some(std::thread::spawn(move || {
            // SAFETY: setns(2) on this thread only, with a descriptor it owns.
            if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(std::io::Error::last_os_error()));
                return;
            }
            let l = match std::net::TcpListener::bind(("0.0.0.0", port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = l.set_nonblocking(true);
            let _ = tx.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut text = String::new();
                        let _ = c.read_to_string(&mut text);
                        got.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((peer.ip().to_string(), text));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }));
        rx.recv_timeout(Duration::from_secs(10))
            .context("the remote listener did not start")??;
        Ok(m)
    }

    fn received(&self) -> Vec<(String, String)> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for RemoteMachine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Takes the veth pair with it.
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}

/// The guest's network as its sandbox directory records it.
fn recorded_net(h: &Harness, id: &SandboxId) -> anyhow::Result<GuestNet> {
    let path = h
        .env
        .data_dir
        .join("qemu")
        .join(id.as_str())
        .join("net.json");
    Ok(serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_guests_reach_other_machines_but_not_the_host_or_each_other() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let provider = support::qemu_provider(&env).await?;
    let h = Harness::new(env, provider);
    let remote = RemoteMachine::start()?;
    let mut a = support::spec();
    a.network = Network::Egress;
    let mut b = support::spec();
    b.network = Network::Egress;
    let a = h.spawn(a).await?;
    let b = h.spawn(b).await?;
    let (na, nb) = (recorded_net(&h, &a)?, recorded_net(&h, &b)?);
    ensure!(na.slot != nb.slot, "two guests share slot {}", na.slot);

    // The guest's NIC carries the leased address.
    let shown = h.sh_ok(&a, "ip -4 -o addr show dev eth0; ip route").await?;
    ensure!(
        shown.contains(&format!("inet {}/30", na.guest_addr()))
            && shown.contains(&format!("default via {}", na.gateway())),
        "guest a's network: {shown}"
    );

    // Out through the host's NAT: the remote machine sees the host's
    // address on its link, never the guest's.
    let out = h
        .sh(
            &a,
            &format!(
                "echo hello-remote | nc -w 5 {} {}; echo rc=$?",
                remote.addr, remote.port
            ),
        )
        .await?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.contains("rc=0"),
        "guest a could not reach {}: {out}",
        remote.addr
    );
    let mut got = remote.received();
    for _ in 0..100 {
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = remote.received();
    }
    ensure!(
        got == [(remote.host_addr.clone(), "hello-remote\n".to_string())],
        "the remote machine saw {got:?}"
    );

    // Not the host: not its address on the guest's link, not another
    // guest's gateway, not its address on its own network.
    let listener = HostListener::start().await?;
    let targets = vec![
        nb.gateway().to_string(),
        na.gateway().to_string(),
        host_primary_ipv4()?,
        remote.host_addr.clone(),
    ];
    let reached = reached_from(&h, &b, &targets, listener.port).await?;
    ensure!(
        reached.is_empty() && listener.peers().is_empty(),
        "guest b reached the host at {reached:?} (the host saw {:?})",
        listener.peers()
    );
    // The listener answers anyone else: the refusal was the guest's.
    tokio::net::TcpStream::connect(("127.0.0.1", listener.port)).await?;
    for _ in 0..100 {
        if !listener.peers().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(listener.peers().len() == 1, "{:?}", listener.peers());

    // A guest saved and restored keeps its NIC and address: the tap is
    // opened again by the new QEMU in the same namespace.
    h.provider().pause(&a).await?;
    h.provider().resume(&a).await?;

    // Not each other: a listens, b cannot connect, the host can.
    h.sh_ok(&a, "setsid nc -l -p 8080 >/tmp/got 2>&1 </dev/null &")
        .await?;
    let mut listening = false;
    for _ in 0..100 {
        let tcp = h.sh_ok(&a, "cat /proc/net/tcp /proc/net/tcp6").await?;
        if tcp.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(":1F90") && f[3] == "0A"
        }) {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(listening, "nc never listened in guest a");
    let from_b = h
        .sh(
            &b,
            &format!("echo from-b | nc -w 3 {} 8080; echo rc=$?", na.guest_addr()),
        )
        .await?;
    let from_b = String::from_utf8_lossy(&from_b.stdout).into_owned();
    ensure!(
        !from_b.contains("rc=0"),
        "guest b connected to guest a: {from_b}"
    );
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((na.guest_addr(), 8080)),
    )
    .await
    .context("the host's connection to guest a hung")??;
    tokio::io::AsyncWriteExt::write_all(&mut conn, b"from-host\n").await?;
    tokio::io::AsyncWriteExt::shutdown(&mut conn).await?;
    let mut got = String::new();
    for _ in 0..100 {
        got = h.sh_ok(&a, "cat /tmp/got").await?;
        if got.contains("from-host") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(got.trim() == "from-host", "guest a received {got:?}");

    for (id, n) in [(&a, &na), (&b, &nb)] {
        h.provider().destroy(id).await?;
        check_network_gone(id, n)?;
        let left = leftovers(id, &h.env.data_dir);
        ensure!(left.is_empty(), "left behind: {left:?}");
    }
    Ok(())
}

fn filtering_provider(
    env: &TestEnv,
    far: &FarSide,
) -> anyhow::Result<stacyvm_provider::qemu::QemuProvider> {
    support::qemu_provider_with(env, vec![format!("{}:53", far.dns).parse()?])
}

/// A guest with an allow list: the table on its namespace's bridge lets
/// out only the listed network and the addresses its DNS filter resolved
/// for listed names; the filter answers only those names; the guest's root
/// can neither reach the upstream resolver itself nor the host; a new
/// server starts the filter again; destroy leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_allow_list_holds_and_its_dns_filter_comes_back_after_a_restart(
) -> anyhow::Result<()> {
    let far = FarSide::start().await?;
    let env = TestEnv::new().await?;
    let p = Arc::new(filtering_provider(&env, &far)?);
    ensure!(p.health().await.healthy, "{}", p.health().await.detail);
    p.egress_allow_support().map_err(|e| anyhow::anyhow!(e))?;
    let provider: DynProvider = p.clone();
    let h = Harness::new(env, provider);
    let mut spec = support::spec();
    spec.network = Network::Egress;
    spec.egress_allow = EgressRule::parse_list(&[far.allowed.as_str(), "allowed.test"])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = h.spawn(spec).await?;
    let n = recorded_net(&h, &id)?;
    ensure!(p.egress_dns_filters() == 1);

    support::an_allow_list_holds(&h, &id, &far, "169.254.53.53").await?;
    let listener = HostListener::start().await?;
    let reached = reached_from(
        &h,
        &id,
        &[n.gateway().to_string(), host_primary_ipv4()?],
        listener.port,
    )
    .await?;
    ensure!(
        reached.is_empty() && listener.peers().is_empty(),
        "the guest reached the host at {reached:?}"
    );

    // The server ends, its DNS filter with it; the table stays in force.
    let _ = h.guard.take_provider();
    drop(p);
    let p = Arc::new(filtering_provider(&h.env, &far)?);
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
    let got = support::greeting(&h, &id, &far.allowed, far.port).await?;
    ensure!(got == format!("hello-from-{}", far.allowed), "{got:?}");

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

/// Volumes in a guest: a read-write directory of the host and a read-only
/// one, shared by virtiofsd. What either side writes the other reads; the
/// guest's root cannot write the read-only one (not even after remounting
/// it read-write in its own kernel) nor make a device node in either; a
/// pause holds in place and keeps them; destroy stops the daemons and
/// leaves the host's files. A mount path the image cannot hold fails the
/// spawn with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_mounts_its_volumes_and_shares_them_with_the_host() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let provider = support::qemu_provider(&env).await?;
    ensure!(provider.supports_mounts());
    let h = Harness::new(env, provider);
    let rw = h.env.data_dir.join("vol-rw");
    let ro = h.env.data_dir.join("vol-ro");
    for d in [&rw, &ro] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(rw.join("from-host"), "written on the host\n")?;
    std::fs::write(ro.join("kept"), "read-only\n")?;
    let mut spec = support::spec();
    spec.mounts = vec![
        HostMount {
            source: rw.display().to_string(),
            target: "/data".into(),
            read_only: false,
        },
        HostMount {
            source: ro.display().to_string(),
            target: "/srv/ref dir".into(),
            read_only: true,
        },
    ];
    let id = h.spawn(spec).await?;
    let dir = h.env.data_dir.join("qemu").join(id.as_str());
    let daemons: Vec<i32> = (0..2)
        .map(|i| -> anyhow::Result<i32> {
            Ok(std::fs::read_to_string(dir.join(format!("fs{i}.pid")))?
                .trim()
                .parse()?)
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        daemons.iter().all(|p| alive(*p)),
        "virtiofsd is not running"
    );

    let mounts = h.sh_ok(&id, "grep virtiofs /proc/mounts").await?;
    ensure!(
        mounts.contains("stacyvm-vol0 /data virtiofs rw")
            && mounts.contains("stacyvm-vol1 /srv/ref\\040dir virtiofs ro"),
        "{mounts}"
    );
    let got = h
        .sh_ok(
            &id,
            "cat /data/from-host '/srv/ref dir/kept'; echo from-guest > /data/from-guest",
        )
        .await?;
    ensure!(got == "written on the host\nread-only\n", "{got:?}");
    ensure!(std::fs::read_to_string(rw.join("from-guest"))? == "from-guest\n");

    let out = h
        .sh(
            &id,
            "echo x > '/srv/ref dir/new'; mount -o remount,rw '/srv/ref dir'; \
             echo x > '/srv/ref dir/new'; echo rc=$?",
        )
        .await?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        !out.contains("rc=0") && !ro.join("new").exists(),
        "the read-only volume was written: {out}"
    );
    let out = h
        .sh(
            &id,
            "mknod /data/disk b 8 0; mknod /data/mem c 1 1; ls /data; echo done",
        )
        .await?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        !rw.join("disk").exists() && !rw.join("mem").exists(),
        "the guest made a device node on the host: {out}"
    );

    // Paused in place (a shared directory cannot be saved), and whole again.
    h.provider().pause(&id).await?;
    ensure!(
        !dir.join("saved").exists(),
        "a guest with volumes was saved"
    );
    ensure!(qemu_alive(&dir), "QEMU stopped for a pause");
    h.provider().resume(&id).await?;
    let got = h.sh_ok(&id, "cat /data/from-guest").await?;
    ensure!(got == "from-guest\n", "{got:?}");

    // A snapshot is the guest's own files: the volumes' contents stay out,
    // their mount points stay in.
    let tar = stacyvm_provider::conformance::read_all(h.provider().snapshot(&id).await?).await?;
    let mut names = Vec::new();
    for e in tar::Archive::new(tar.as_slice()).entries()? {
        names.push(e?.path()?.display().to_string());
    }
    ensure!(
        names.iter().any(|n| n.trim_end_matches('/') == "data")
            && !names.iter().any(|n| {
                let n = n.trim_end_matches('/');
                n.starts_with("data/") || n.starts_with("srv/ref dir/")
            }),
        "the snapshot holds the volumes: {:?}",
        names
            .iter()
            .filter(|n| n.contains("data") || n.contains("ref"))
            .collect::<Vec<_>>()
    );

    h.provider().destroy(&id).await?;
    for pid in &daemons {
        ensure!(!alive(*pid), "virtiofsd {pid} outlived its sandbox");
    }
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:?}");
    ensure!(std::fs::read_to_string(rw.join("from-guest"))? == "from-guest\n");

    // A path the image cannot hold (under a file) is refused, not dropped.
    let mut spec = support::spec();
    spec.mounts = vec![HostMount {
        source: rw.display().to_string(),
        target: "/bin/busybox/data".into(),
        read_only: false,
    }];
    let sid = spec.sandbox_id.clone();
    match h.provider().spawn(&spec).await {
        Err(stacyvm_core::Error::InvalidRequest(why)) => {
            ensure!(why.contains("/bin/busybox/data"), "{why}")
        }
        other => bail!("a mount under a file was not refused: {other:?}"),
    }
    let left = leftovers(&sid, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

fn qemu_alive(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .is_some_and(alive)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_outlives_its_sandbox() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let provider = support::qemu_provider(&env).await?;
    let h = Harness::new(env, provider);

    // A spawn that fails after its network was made (QEMU refuses the
    // memory size) takes the network down with it.
    let mut spec = support::spec();
    spec.network = Network::Egress;
    spec.memory_mb = u64::MAX / 4;
    let id = spec.sandbox_id.clone();
    match h.spawn(spec).await {
        Ok(_) => bail!("QEMU booted a guest with {} MB", u64::MAX / 4),
        Err(e) => ensure!(format!("{e:#}").contains("qemu-system-x86_64"), "{e:#}"),
    }
    ensure!(!Path::new("/run/netns").join(net::netns_name(&id)).exists());
    ensure!(!h.env.data_dir.join("qemu").join(id.as_str()).exists());

    // A network whose sandbox directory vanished (the server's data dir
    // deleted under it, a crash between steps) is swept by the next list.
    let owner = h.env.data_dir.join("qemu").join("vanishing");
    std::fs::create_dir_all(&owner)?;
    let id = SandboxId::generate();
    let n = net::create(&id, &owner, net::Holder::Guest, |_| Ok(())).await?;
    let host_if = n.host_if();
    ensure!(
        Path::new("/sys/class/net").join(&host_if).exists(),
        "no veth {host_if}"
    );
    ensure!(n.gateway().octets()[..2] == [10, 213] && n.guest_addr() != Ipv4Addr::UNSPECIFIED);
    h.provider().list().await?;
    ensure!(
        Path::new("/run/netns").join(net::netns_name(&id)).exists(),
        "a network whose sandbox directory exists was swept"
    );
    std::fs::remove_dir_all(&owner)?;
    h.provider().list().await?;
    check_network_gone(&id, &n)?;
    Ok(())
}

/// Many pauses and resumes of one guest, each checked to reach the agent
/// again with the guest's memory intact: a restore plugs a new vsock
/// device in while the guest runs, so every cycle is a chance for a
/// `CONNECT` to reach vhost-device-vsock before the guest has set the
/// device up. Minutes under TCG, so only on request:
/// `cargo nextest run -p stacyvm-provider --run-ignored only -E 'test(qemu_soak)'`
/// (`STACYVM_QEMU_SOAK_CYCLES`, 20 by default). The provider's log gets
/// each restore's time to a ready agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes of TCG; run with --run-ignored"]
async fn qemu_soak_pause_resume_cycles() -> anyhow::Result<()> {
    let cycles: u32 = match std::env::var("STACYVM_QEMU_SOAK_CYCLES") {
        Ok(v) => v.parse().context("STACYVM_QEMU_SOAK_CYCLES")?,
        Err(_) => 20,
    };
    let env = TestEnv::new().await?;
    let provider = support::qemu_provider(&env).await?;
    let h = Harness::new(env, provider);
    let id = h.spawn_default().await?;
    let boot_id = h.sh_ok(&id, "cat /proc/sys/kernel/random/boot_id").await?;
    for i in 0..cycles {
        h.sh_ok(&id, &format!("echo {i} > /dev/shm/cycle")).await?;
        let t = std::time::Instant::now();
        h.provider()
            .pause(&id)
            .await
            .with_context(|| format!("pause {i}"))?;
        let paused = t.elapsed();
        let t = std::time::Instant::now();
        h.provider()
            .resume(&id)
            .await
            .with_context(|| format!("resume {i}"))?;
        let resumed = t.elapsed();
        let got = h
            .sh_ok(&id, "cat /dev/shm/cycle /proc/sys/kernel/random/boot_id")
            .await
            .with_context(|| format!("the agent after resume {i}"))?;
        ensure!(
            got == format!("{i}\n{boot_id}"),
            "cycle {i}: the guest reads {got:?}"
        );
        eprintln!(
            "cycle {i}: pause {} ms, resume to a ready agent {} ms",
            paused.as_millis(),
            resumed.as_millis()
        );
    }
    h.provider().destroy(&id).await?;
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}
