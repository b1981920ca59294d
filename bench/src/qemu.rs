//! API section `qemu` (only with `--providers …,qemu`): the microVM
//! provider against the Docker provider of the same server, in the same
//! run: boot to agent-ready (create → first exec), restore from a saved
//! state to agent-ready (resume of a paused sandbox → first exec), exec
//! round trip, and the host memory each sandbox's processes hold (QEMU and
//! its vsock backend; Docker's shim, the agent and the container's
//! processes).

use std::time::Instant;

use anyhow::Result;

use crate::baseline::ms;
use crate::report::{Report, Vs};
use crate::server::Server;
use crate::{Args, Ctx};

/// Idle sandboxes per provider whose memory is read.
const MEM_SANDBOXES: usize = 3;

pub async fn run(ctx: &Ctx, args: &Args, report: &mut Report) -> Result<()> {
    let bin = ctx.stacyvm_bin().await?;
    eprintln!("bench[api]: starting a server with --providers docker,qemu");
    let s = Server::start(
        &bin,
        &ctx.agent_bin,
        &format!("{}qemu", ctx.tag),
        &["--providers".into(), "docker,qemu".into()],
    )
    .await?;
    let result = sections(ctx, args, report, &s).await;
    s.shutdown().await;
    result
}

async fn sections(ctx: &Ctx, args: &Args, report: &mut Report, s: &Server) -> Result<()> {
    crate::api_suite::import_busybox(s, ctx).await?;
    let sides = [
        ("qemu", "busybox".to_owned()),
        ("docker", args.docker_image.clone()),
    ];
    let n = args.qemu_iters;

    for (p, image) in &sides {
        eprintln!("bench[api]: qemu section: create → exec-ready, {p}, {n} times");
        let mut v = Vec::new();
        for i in 0..=n {
            let t = Instant::now();
            let id = s.create(image, p).await?;
            s.exec_true(&id).await?;
            let d = ms(t.elapsed());
            s.destroy(&id).await?;
            // The first start fills caches (the guest's root image, the
            // container image's layers); it is not recorded.
            if i > 0 {
                v.push(d);
            }
        }
        let (key, vs, note) = if *p == "qemu" {
            (
                "api.qemu.create",
                Vs::cli("api.qemu.create.docker"),
                "boot to agent-ready; TCG unless certified for KVM; vs: Docker provider, same run",
            )
        } else {
            ("api.qemu.create.docker", Vs::NONE, "same server and run")
        };
        report.time_ms(key, &format!("API {p}: create → exec-ready"), &v, vs, note);
    }

    for (p, image) in &sides {
        eprintln!("bench[api]: qemu section: pause, then resume → exec-ready, {p}, {n} times");
        let id = s.create(image, p).await?;
        let measured = async {
            s.exec_true(&id).await?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                s.lifecycle(&id, "pause").await?;
                let t = Instant::now();
                s.lifecycle(&id, "resume").await?;
                s.exec_true(&id).await?;
                v.push(ms(t.elapsed()));
            }
            anyhow::Ok(v)
        }
        .await;
        s.destroy(&id).await?;
        let v = measured?;
        let (key, vs, note) = if *p == "qemu" {
            (
                "api.qemu.restore",
                Vs::cli("api.qemu.restore.docker"),
                "a pause saves the guest's state to disk and stops QEMU; the resume starts QEMU \
                 from that state; vs: Docker provider's unfreeze, same run",
            )
        } else {
            (
                "api.qemu.restore.docker",
                Vs::NONE,
                "cgroup freezer: the container's memory stays in place",
            )
        };
        report.time_ms(
            key,
            &format!("API {p}: resume of a paused sandbox → exec-ready"),
            &v,
            vs,
            note,
        );
    }

    let mut ids = Vec::new();
    let result = async {
        for (p, image) in &sides {
            for _ in 0..MEM_SANDBOXES {
                ids.push((*p, s.create(image, p).await?));
            }
        }
        for (p, _) in &sides {
            let id = ids
                .iter()
                .find(|(q, _)| q == p)
                .map(|(_, id)| id.clone())
                .unwrap_or_default();
            let iters = args.qemu_exec_iters;
            eprintln!("bench[api]: qemu section: exec `true`, {p}, {iters} times");
            for _ in 0..3 {
                s.exec_true(&id).await?;
            }
            let mut v = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t = Instant::now();
                s.exec_true(&id).await?;
                v.push(ms(t.elapsed()));
            }
            let (key, vs) = if *p == "qemu" {
                ("api.qemu.exec", Vs::cli("api.qemu.exec.docker"))
            } else {
                ("api.qemu.exec.docker", Vs::NONE)
            };
            report.time_ms(
                key,
                &format!("API {p}: exec `true` round trip"),
                &v,
                vs,
                "vs: Docker provider, same run",
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let docker_ctrs = crate::api_suite::docker_ids(s).await;
        for (p, _) in &sides {
            let mine: Vec<String> = if *p == "docker" {
                docker_ctrs.clone()
            } else {
                ids.iter()
                    .filter(|(q, _)| q == p)
                    .map(|(_, id)| id.clone())
                    .collect()
            };
            let (pss, procs) = pss_of(&mine);
            let per = pss as f64 / 1024.0 / mine.len().max(1) as f64;
            report.value(
                &format!("api.qemu.mem.{p}"),
                &format!("API {p}: host memory per idle sandbox (Pss)"),
                "MiB",
                per,
                &format!(
                    "{} sandboxes, {procs} processes{}",
                    mine.len(),
                    if *p == "qemu" {
                        ": QEMU and vhost-device-vsock"
                    } else {
                        ": shim, agent and the container's processes"
                    }
                ),
            );
        }
        anyhow::Ok(())
    }
    .await;
    let all: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
    s.destroy_many(&all).await;
    result
}

/// Summed `Pss` (KiB) and count of the processes that belong to `ids`:
/// whose command line names one (QEMU, its vsock backend, a container's
/// shim) or whose cgroup does (a container's processes).
fn pss_of(ids: &[String]) -> (u64, usize) {
    let (mut kib, mut n) = (0, 0);
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if ids
            .iter()
            .any(|id| cmdline.contains(id.as_str()) || cgroup.contains(id.as_str()))
        {
            if let Some(p) = crate::report::pss_kib(pid) {
                kib += p;
                n += 1;
            }
        }
    }
    (kib, n)
}
