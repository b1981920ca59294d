//! Suite `provider`: the Docker, namespaces and PRoot providers through the
//! `Provider` trait (no HTTP), against `docker run`/`docker exec` of the same
//! image, the same through Docker's Engine API, plain `unshare` into the same
//! namespaces and a plain `proot` invocation over the same rootfs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use stacyvm_core::{ExecRequest, Network, SandboxId, SpawnSpec};
use stacyvm_provider::docker::{DockerConfig, DockerProvider};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::namespaces::{NamespacesConfig, NamespacesProvider};
use stacyvm_provider::proot::{ProotConfig, ProotProvider};
use stacyvm_provider::DynProvider;

use crate::baseline::{ms, proot_true, unshare_true};
use crate::report::{Report, Vs};
use crate::{Args, Ctx};

/// Sandboxes spawned through the providers and not yet destroyed, so an
/// interrupt or error can destroy them.
#[derive(Default)]
pub struct Live {
    sandboxes: Mutex<Vec<(DynProvider, SandboxId)>>,
}

impl Live {
    fn add(&self, p: &DynProvider, id: &SandboxId) {
        if let Ok(mut v) = self.sandboxes.lock() {
            v.push((p.clone(), id.clone()));
        }
    }

    fn remove(&self, id: &SandboxId) {
        if let Ok(mut v) = self.sandboxes.lock() {
            v.retain(|(_, i)| i != id);
        }
    }

    pub async fn destroy_all(&self) -> usize {
        let all = self
            .sandboxes
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        let n = all.len();
        for (p, id) in all {
            if let Err(e) = p.destroy(&id).await {
                eprintln!("bench: destroying {id}: {e}");
            }
        }
        n
    }
}

pub fn spec(image: &str) -> SpawnSpec {
    SpawnSpec {
        sandbox_id: SandboxId::generate(),
        image: image.to_owned(),
        cpu: 1.0,
        memory_mb: 512,
        env: BTreeMap::new(),
        workdir: None,
        network: Network::None,
        labels: BTreeMap::new(),
        mounts: Vec::new(),
        egress_allow: Vec::new(),
    }
}

pub fn true_req() -> ExecRequest {
    ExecRequest {
        cmd: vec!["true".into()],
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout_ms: 30_000,
        output_cap: 1024 * 1024,
        user: None,
    }
}

async fn exec_true(p: &DynProvider, id: &SandboxId) -> Result<()> {
    let out = p.agent(id).await?.exec(true_req()).await?;
    anyhow::ensure!(
        out.status.exit_code == Some(0),
        "`true` exited with {:?}",
        out.status
    );
    Ok(())
}

/// Spawn → first exec, timed; the sandbox is destroyed afterwards (untimed).
async fn cold_once(p: &DynProvider, image: &str, live: &Live) -> Result<f64> {
    let s = spec(image);
    live.add(p, &s.sandbox_id);
    let t = Instant::now();
    p.spawn(&s)
        .await
        .with_context(|| format!("spawning a {} sandbox", p.name()))?;
    exec_true(p, &s.sandbox_id).await?;
    let d = ms(t.elapsed());
    p.destroy(&s.sandbox_id).await?;
    live.remove(&s.sandbox_id);
    Ok(d)
}

async fn exec_loop(p: &DynProvider, id: &SandboxId, n: usize) -> Result<Vec<f64>> {
    // A few unrecorded calls first, so connection setup is not counted.
    for _ in 0..3 {
        exec_true(p, id).await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        exec_true(p, id).await?;
        v.push(ms(t.elapsed()));
    }
    Ok(v)
}

pub async fn run(ctx: &Ctx, args: &Args, report: &mut Report) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("svm-bench-prov-")
        .tempdir()?;
    let catalog = Arc::new(ImageCatalog::open(&dir.path().join("images"))?);
    let file = tokio::fs::File::open(&ctx.image_tar).await?;
    catalog
        .import("busybox", Box::pin(tokio_util::io::ReaderStream::new(file)))
        .await
        .context("importing the busybox rootfs into the catalog")?;
    let rootfs = catalog.rootfs("busybox").await?;
    let instance = format!("bench-{}", ctx.tag);
    let live = &ctx.live;
    let cold = args.cold_iters;
    let n_exec = args.exec_iters;
    let n_base = args.baseline_exec_iters;

    if args.wants("docker") {
        eprintln!(
            "bench[provider]: docker: {cold} cold spawns, {n_exec} execs; baseline docker run/exec"
        );
        let p: DynProvider = Arc::new(DockerProvider::new(DockerConfig::new(
            dir.path().join("data"),
            ctx.agent_bin.clone(),
            catalog.clone(),
            instance.clone(),
        ))?);
        let cli = &ctx.docker;
        let api = &ctx.engine;
        // One unrecorded start of each, so first-use costs (image lookup,
        // page cache) do not land on any side.
        cold_once(&p, &args.docker_image, live).await?;
        let (_, warm) = cli.cold().await?;
        cli.rm(&[warm]).await?;
        let (_, warm) = api.cold().await?;
        api.rm(&[warm]).await?;

        let mut ours = Vec::new();
        let mut base = Vec::new();
        let mut engine = Vec::new();
        for _ in 0..cold {
            ours.push(cold_once(&p, &args.docker_image, live).await?);
            let (d, name) = cli.cold().await?;
            base.push(ms(d));
            cli.rm(&[name]).await?;
            let (d, id) = api.cold().await?;
            engine.push(ms(d));
            api.rm(&[id]).await?;
        }
        report.time_ms(
            "provider.cold.docker",
            "docker provider: spawn → exec-ready",
            &ours,
            Vs::both("provider.cold.docker.base", "provider.cold.docker.engine"),
            "",
        );
        report.time_ms(
            "provider.cold.docker.base",
            "baseline (CLI): docker run -d + docker exec",
            &base,
            Vs::NONE,
            "",
        );
        report.time_ms(
            "provider.cold.docker.engine",
            "baseline (Engine API): create + start + exec `true`",
            &engine,
            Vs::NONE,
            "exec = create, attached start, inspect",
        );

        let s = spec(&args.docker_image);
        live.add(&p, &s.sandbox_id);
        p.spawn(&s).await?;
        let v = exec_loop(&p, &s.sandbox_id, n_exec).await?;
        p.destroy(&s.sandbox_id).await?;
        live.remove(&s.sandbox_id);
        let name = cli.run_detached().await?;
        cli.exec_true(&name).await?;
        let mut b = Vec::new();
        for _ in 0..n_base {
            b.push(ms(cli.exec_true(&name).await?));
        }
        // The Engine API on the same container, after a few unrecorded
        // calls like the agent's side gets.
        let mut e = Vec::new();
        for i in 0..n_base + 3 {
            let d = ms(api.exec_true(&name).await?);
            if i >= 3 {
                e.push(d);
            }
        }
        cli.rm(&[name]).await?;
        report.time_ms(
            "provider.exec.docker",
            "docker provider: exec `true` (agent)",
            &v,
            Vs::both("provider.exec.docker.base", "provider.exec.docker.engine"),
            "",
        );
        report.time_ms(
            "provider.exec.docker.base",
            "baseline (CLI): docker exec `true`",
            &b,
            Vs::NONE,
            "",
        );
        report.time_ms(
            "provider.exec.docker.engine",
            "baseline (Engine API): exec `true`",
            &e,
            Vs::NONE,
            "create, attached start, inspect",
        );
    }

    if args.wants("namespaces") {
        eprintln!("bench[provider]: namespaces: {cold} cold spawns, {n_exec} execs; baseline unshare … chroot ROOTFS /bin/true");
        let p: DynProvider = Arc::new(NamespacesProvider::new(NamespacesConfig {
            data_dir: dir.path().join("data"),
            agent_bin: ctx.agent_bin.clone(),
            catalog: catalog.clone(),
            instance: instance.clone(),
            egress_dns_upstreams: Vec::new(),
        })?);
        cold_once(&p, "busybox", live).await?;
        unshare_true(&rootfs).await?;
        let mut ours = Vec::new();
        let mut base = Vec::new();
        for _ in 0..cold {
            ours.push(cold_once(&p, "busybox", live).await?);
            base.push(ms(unshare_true(&rootfs).await?));
        }
        report.time_ms(
            "provider.cold.namespaces",
            "namespaces provider: spawn → exec-ready",
            &ours,
            Vs::cli("provider.cold.namespaces.base"),
            "target p50 < 25 ms",
        );
        report.time_ms(
            "provider.cold.namespaces.base",
            "baseline (CLI): unshare -U -r -m -p -f -n -u -i chroot ROOTFS /bin/true",
            &base,
            Vs::NONE,
            "",
        );
        let s = spec("busybox");
        live.add(&p, &s.sandbox_id);
        p.spawn(&s).await?;
        let v = exec_loop(&p, &s.sandbox_id, n_exec).await?;
        p.destroy(&s.sandbox_id).await?;
        live.remove(&s.sandbox_id);
        report.time_ms(
            "provider.exec.namespaces",
            "namespaces provider: exec `true` (agent)",
            &v,
            Vs::cli("provider.cold.namespaces.base"),
            "against a new unshare per command",
        );
    }

    if args.wants("proot") {
        eprintln!("bench[provider]: proot: {cold} cold spawns, {n_exec} execs; baseline proot -r ROOTFS /bin/true");
        let p: DynProvider = Arc::new(ProotProvider::new(ProotConfig {
            data_dir: dir.path().join("data"),
            agent_bin: ctx.agent_bin.clone(),
            catalog: catalog.clone(),
            instance: instance.clone(),
        })?);
        cold_once(&p, "busybox", live).await?;
        proot_true(&rootfs).await?;
        let mut ours = Vec::new();
        let mut base = Vec::new();
        for _ in 0..cold {
            ours.push(cold_once(&p, "busybox", live).await?);
            base.push(ms(proot_true(&rootfs).await?));
        }
        report.time_ms(
            "provider.cold.proot",
            "proot provider: spawn → exec-ready",
            &ours,
            Vs::cli("provider.cold.proot.base"),
            "",
        );
        report.time_ms(
            "provider.cold.proot.base",
            "baseline (CLI): proot -r ROOTFS /bin/true",
            &base,
            Vs::NONE,
            "",
        );

        let s = spec("busybox");
        live.add(&p, &s.sandbox_id);
        p.spawn(&s).await?;
        let v = exec_loop(&p, &s.sandbox_id, n_exec).await?;
        p.destroy(&s.sandbox_id).await?;
        live.remove(&s.sandbox_id);
        let mut b = Vec::new();
        for _ in 0..n_base {
            b.push(ms(proot_true(&rootfs).await?));
        }
        report.time_ms(
            "provider.exec.proot",
            "proot provider: exec `true` (agent)",
            &v,
            Vs::cli("provider.exec.proot.base"),
            "",
        );
        report.time_ms(
            "provider.exec.proot.base",
            "baseline (CLI): proot -r ROOTFS /bin/true",
            &b,
            Vs::NONE,
            "a new proot per command",
        );
    }
    Ok(())
}
