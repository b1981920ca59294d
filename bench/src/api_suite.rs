//! Suite `api`: a real `stacyvm serve` measured through its HTTP API
//! (create, exec, streaming, files, throughput, burst, density) and its
//! `stacyvm` CLI, against the docker CLI, Docker's Engine API, plain
//! unshare and plain proot, measured in the same run; and the host memory
//! a thousand idle namespaces sandboxes take (`idle`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::json;
use stacyvm_provider::images::ImageCatalog;
use tokio::io::AsyncWriteExt;

use crate::baseline::{ms, proot_true, unshare_true};
use crate::report::{meminfo_kib, Report, Vs};
use crate::server::Server;
use crate::{Args, Ctx};

fn image_for(args: &Args, provider: &str) -> String {
    if provider == "docker" {
        args.docker_image.clone()
    } else {
        "busybox".to_owned()
    }
}

pub async fn run(ctx: &Ctx, args: &Args, report: &mut Report) -> Result<()> {
    let bin = ctx.stacyvm_bin().await?;
    eprintln!("bench[api]: starting {} serve", bin.display());
    let server = Arc::new(Server::start(&bin, &ctx.agent_bin, &ctx.tag, &[]).await?);
    ctx.keep_server(server.clone());
    let mut result = sections(ctx, args, report, &server, &bin).await;
    if result.is_ok() && args.wants("qemu") && !args.skipped("qemu") {
        result = crate::qemu::run(ctx, args, report).await;
    }
    if let Some(rss) = server.rss_kib() {
        report.value(
            "api.rss.end",
            "control plane RSS at the end",
            "MiB",
            rss as f64 / 1024.0,
            "",
        );
    }
    result
}

async fn sections(
    ctx: &Ctx,
    args: &Args,
    report: &mut Report,
    s: &Server,
    bin: &std::path::Path,
) -> Result<()> {
    // Idle RSS: after start-up settled, before any sandbox or image.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(rss) = s.rss_kib() {
        report.value(
            "api.rss.idle",
            "control plane idle RSS",
            "MiB",
            rss as f64 / 1024.0,
            "target < 50 MiB",
        );
    }
    import_busybox(s, ctx).await?;
    // The proot baseline runs over its own unpacked copy of the same tar.
    let base_dir = tempfile::Builder::new()
        .prefix("svm-bench-base-")
        .tempdir()?;
    let catalog = ImageCatalog::open(&base_dir.path().join("images"))?;
    let file = tokio::fs::File::open(&ctx.image_tar).await?;
    catalog
        .import("busybox", Box::pin(tokio_util::io::ReaderStream::new(file)))
        .await?;
    let rootfs = catalog.rootfs("busybox").await?;
    let cli = &ctx.docker;
    let api = &ctx.engine;

    if !args.skipped("create") {
        for p in ["docker", "namespaces", "proot"]
            .into_iter()
            .filter(|p| args.wants(p))
        {
            eprintln!(
                "bench[api]: create → exec-ready, {p}, {} times",
                args.cold_iters
            );
            let image = image_for(args, p);
            let one = || async {
                let t = Instant::now();
                let id = s.create(&image, p).await?;
                s.exec_true(&id).await?;
                let d = ms(t.elapsed());
                s.destroy(&id).await?;
                anyhow::Ok(d)
            };
            one().await?;
            // The baselines' first starts are not recorded either.
            match p {
                "docker" => {
                    let (_, name) = cli.cold().await?;
                    cli.rm(&[name]).await?;
                    let (_, id) = api.cold().await?;
                    api.rm(&[id]).await?;
                }
                "namespaces" => {
                    unshare_true(&rootfs).await?;
                }
                _ => {
                    proot_true(&rootfs).await?;
                }
            }
            let mut ours = Vec::new();
            let mut base = Vec::new();
            let mut engine = Vec::new();
            for _ in 0..args.cold_iters {
                ours.push(one().await?);
                match p {
                    "docker" => {
                        let (d, name) = cli.cold().await?;
                        base.push(ms(d));
                        cli.rm(&[name]).await?;
                        let (d, id) = api.cold().await?;
                        engine.push(ms(d));
                        api.rm(&[id]).await?;
                    }
                    "namespaces" => base.push(ms(unshare_true(&rootfs).await?)),
                    _ => base.push(ms(proot_true(&rootfs).await?)),
                }
            }
            let (bk, bl) = match p {
                "docker" => (
                    "api.create.docker.base",
                    "baseline (CLI): docker run -d + docker exec",
                ),
                "namespaces" => (
                    "api.create.namespaces.base",
                    "baseline (CLI): unshare -U -r -m -p -f -n -u -i chroot ROOTFS /bin/true",
                ),
                _ => (
                    "api.create.proot.base",
                    "baseline (CLI): proot -r ROOTFS /bin/true",
                ),
            };
            let vs = if p == "docker" {
                Vs::both(bk, "api.create.docker.engine")
            } else {
                Vs::cli(bk)
            };
            report.time_ms(
                &format!("api.create.{p}"),
                &format!("API {p}: create → exec-ready"),
                &ours,
                vs,
                "cold, no warm pool",
            );
            report.time_ms(bk, bl, &base, Vs::NONE, "");
            if p == "docker" {
                report.time_ms(
                    "api.create.docker.engine",
                    "baseline (Engine API): create + start + exec `true`",
                    &engine,
                    Vs::NONE,
                    "exec = create, attached start, inspect",
                );
            }
        }
    }

    if !args.skipped("pool") {
        pool_section(ctx, args, report).await?;
    }

    if !args.skipped("template") {
        crate::api_templates::template_section(ctx, args, report).await?;
    }

    // One long-lived sandbox per provider and one plain container for the
    // exec, stream and file measurements.
    let mut ids = Vec::new();
    for p in ["docker", "namespaces", "proot"]
        .into_iter()
        .filter(|p| args.wants(p))
    {
        ids.push((p, s.create(&image_for(args, p), p).await?));
    }
    let base_ctr = cli.run_detached().await?;
    cli.exec_true(&base_ctr).await?;

    if !args.skipped("exec") {
        let mut b = Vec::new();
        for _ in 0..args.baseline_exec_iters {
            b.push(ms(cli.exec_true(&base_ctr).await?));
        }
        report.time_ms(
            "api.exec.base",
            "baseline (CLI): docker exec `true`",
            &b,
            Vs::NONE,
            "",
        );
        let mut e = Vec::new();
        for i in 0..args.baseline_exec_iters + 3 {
            let d = ms(api.exec_true(&base_ctr).await?);
            if i >= 3 {
                e.push(d);
            }
        }
        report.time_ms(
            "api.exec.engine",
            "baseline (Engine API): exec `true`",
            &e,
            Vs::NONE,
            "create, attached start, inspect",
        );
        for (p, id) in &ids {
            eprintln!("bench[api]: exec `true`, {p}, {} times", args.exec_iters);
            for _ in 0..3 {
                s.exec_true(id).await?;
            }
            let mut v = Vec::with_capacity(args.exec_iters);
            for _ in 0..args.exec_iters {
                let t = Instant::now();
                s.exec_true(id).await?;
                v.push(ms(t.elapsed()));
            }
            report.time_ms(
                &format!("api.exec.{p}"),
                &format!("API {p}: exec `true` round trip"),
                &v,
                Vs::both("api.exec.base", "api.exec.engine"),
                "target p50 < 2 ms, ≥ 20× docker exec",
            );
        }
        for (p, id) in &ids {
            eprintln!(
                "bench[api]: stacyvm sandbox exec `true`, {p}, {} times",
                args.baseline_exec_iters
            );
            let mut v = Vec::new();
            for i in 0..args.baseline_exec_iters + 1 {
                let d = ms(stacyvm_cli_exec(bin, s, id).await?);
                if i >= 1 {
                    v.push(d);
                }
            }
            report.time_ms(
                &format!("api.exec.cli.{p}"),
                &format!("CLI {p}: stacyvm sandbox exec `true`"),
                &v,
                Vs::cli("api.exec.base"),
                "a new process per command, like docker exec",
            );
        }
    }

    if !args.skipped("stream") {
        let mut b = Vec::new();
        for _ in 0..args.baseline_exec_iters {
            b.push(ms(cli.exec_first_byte(&base_ctr).await?));
        }
        report.time_ms(
            "api.stream.base",
            "baseline (CLI): docker exec `echo x`, first stdout byte",
            &b,
            Vs::NONE,
            "",
        );
        let mut e = Vec::new();
        for i in 0..args.baseline_exec_iters + 3 {
            let d = ms(api.exec_first_byte(&base_ctr).await?);
            if i >= 3 {
                e.push(d);
            }
        }
        report.time_ms(
            "api.stream.engine",
            "baseline (Engine API): exec `echo x`, first stdout frame",
            &e,
            Vs::NONE,
            "from exec create",
        );
        for (p, id) in &ids {
            eprintln!(
                "bench[api]: exec/stream first byte, {p}, {} times",
                args.stream_iters
            );
            let mut v = Vec::new();
            for i in 0..args.stream_iters + 3 {
                let d = stream_first_byte(s, id).await?;
                if i >= 3 {
                    v.push(ms(d));
                }
            }
            report.time_ms(
                &format!("api.stream.{p}"),
                &format!("API {p}: exec/stream `echo x`, first stdout event"),
                &v,
                Vs::both("api.stream.base", "api.stream.engine"),
                "",
            );
        }
    }

    if !args.skipped("files") {
        files(s, args, report, &ids, &base_ctr, ctx).await?;
    }
    crate::interactive::run_sections(ctx, args, report, s, &ids, &base_ctr).await?;

    if !args.skipped("throughput") {
        if let Some((_, id)) = ids.first() {
            let get = s.u(&format!("/v1/sandboxes/{id}"));
            throughput(s, args, report, "get", "GET /v1/sandboxes/{id}", &get).await?;
            let list = s.u("/v1/sandboxes");
            let n = ids.len();
            throughput(
                s,
                args,
                report,
                "list",
                &format!("GET /v1/sandboxes ({n} live)"),
                &list,
            )
            .await?;
        }
    }

    let all: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    s.destroy_many(&all).await;
    cli.rm(&[base_ctr]).await?;

    if !args.skipped("burst") {
        for p in ["docker", "namespaces", "proot"]
            .into_iter()
            .filter(|p| args.wants(p))
        {
            burst(s, args, report, p, cli).await?;
        }
    }
    if !args.skipped("density") {
        for p in ["docker", "namespaces", "proot"]
            .into_iter()
            .filter(|p| args.wants(p))
        {
            density(s, args, report, p).await?;
        }
    }
    if !args.skipped("idle") && args.wants("namespaces") && args.idle_count > 0 {
        idle(ctx, args, report).await?;
    }
    Ok(())
}

/// `stacyvm sandbox exec ID true` against `s`, timed from spawning the
/// process to its exit, as `docker exec` is.
async fn stacyvm_cli_exec(bin: &std::path::Path, s: &Server, id: &str) -> Result<Duration> {
    let bin = bin
        .to_str()
        .context("non-UTF-8 path of the stacyvm binary")?;
    let env = [
        ("STACYVM_URL", s.url.as_str()),
        ("STACYVM_API_KEY", s.key.as_str()),
        ("NO_PROXY", "127.0.0.1,localhost"),
    ];
    let t = Instant::now();
    crate::baseline::run_env(bin, &["sandbox", "exec", id, "true"], &env).await?;
    Ok(t.elapsed())
}

/// Imports the busybox test rootfs into `s`'s catalog as `busybox`.
pub(crate) async fn import_busybox(s: &Server, ctx: &Ctx) -> Result<()> {
    import_image(s, &ctx.image_tar, "busybox").await
}

/// Imports the root filesystem tar at `tar` into the server's catalog as
/// `name`.
pub(crate) async fn import_image(s: &Server, tar: &std::path::Path, name: &str) -> Result<()> {
    let file = tokio::fs::File::open(tar)
        .await
        .with_context(|| format!("opening {}", tar.display()))?;
    s.json(
        s.http
            .post(s.u(&format!("/v1/images?name={name}")))
            .header("content-type", "application/x-tar")
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::new(file),
            )),
    )
    .await
    .with_context(|| format!("importing {name}"))?;
    Ok(())
}

/// Time from sending an exec/stream request to the first stdout event.
async fn stream_first_byte(s: &Server, id: &str) -> Result<Duration> {
    let t = Instant::now();
    let resp = s
        .http
        .post(s.u(&format!("/v1/sandboxes/{id}/exec/stream")))
        .json(&json!({"cmd": ["echo", "x"]}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("exec/stream: HTTP {}", resp.status());
    }
    let mut body = resp.bytes_stream();
    let mut seen = Vec::new();
    let mut first = None;
    while let Some(chunk) = body.next().await {
        seen.extend_from_slice(&chunk?);
        let text = String::from_utf8_lossy(&seen);
        if first.is_none() && text.contains("event: stdout") {
            first = Some(t.elapsed());
        }
        if text.contains("event: exit") {
            break;
        }
    }
    first.context("the stream ended without a stdout event")
}

async fn files(
    s: &Server,
    args: &Args,
    report: &mut Report,
    ids: &[(&str, String)],
    base_ctr: &str,
    ctx: &Ctx,
) -> Result<()> {
    let (cli, api) = (&ctx.docker, &ctx.engine);
    let dir = tempfile::Builder::new()
        .prefix("svm-bench-files-")
        .tempdir()?;
    let n_small = args.small_files;
    let small = vec![b'x'; 1024];
    let small_dir = dir.path().join("small");
    std::fs::create_dir(&small_dir)?;
    for i in 0..n_small {
        std::fs::write(small_dir.join(format!("f{i}")), &small)?;
    }
    let big = dir.path().join("big");
    {
        let mut f = tokio::fs::File::create(&big).await?;
        let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        for _ in 0..args.big_file_mib {
            f.write_all(&chunk).await?;
        }
        f.sync_all().await?;
    }
    let big_mib = args.big_file_mib as f64;
    let small_label = format!("{n_small} × 1 KiB");

    // Baselines: docker cp of the directory (one tar) and of the big file.
    let (mut up, mut down, mut bup, mut bdown) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.file_iters {
        let to = format!("{base_ctr}:/small{i}");
        up.push(ms(cli.cp(small_dir.to_str().context("path")?, &to).await?));
        let back = dir.path().join(format!("small-back{i}"));
        down.push(ms(cli.cp(&to, back.to_str().context("path")?).await?));
        let to = format!("{base_ctr}:/big{i}");
        bup.push(
            big_mib
                / cli
                    .cp(big.to_str().context("path")?, &to)
                    .await?
                    .as_secs_f64(),
        );
        let back = dir.path().join(format!("big-back{i}"));
        bdown.push(
            big_mib
                / cli
                    .cp(&to, back.to_str().context("path")?)
                    .await?
                    .as_secs_f64(),
        );
        let _ = std::fs::remove_file(&back);
    }
    report.time_ms(
        "api.files.small.up.base",
        &format!("baseline (CLI): docker cp DIR ({small_label}) in"),
        &up,
        Vs::NONE,
        "one tar of the whole dir",
    );
    report.time_ms(
        "api.files.small.down.base",
        &format!("baseline (CLI): docker cp DIR ({small_label}) out"),
        &down,
        Vs::NONE,
        "",
    );
    report.rate(
        "api.files.big.up.base",
        &format!(
            "baseline (CLI): docker cp {} MiB file in",
            args.big_file_mib
        ),
        "MiB/s",
        &bup,
        Vs::NONE,
        "",
    );
    report.rate(
        "api.files.big.down.base",
        &format!(
            "baseline (CLI): docker cp {} MiB file out",
            args.big_file_mib
        ),
        "MiB/s",
        &bdown,
        Vs::NONE,
        "",
    );

    // Baselines: the same through PUT/GET /containers/{id}/archive.
    let (mut up, mut down, mut bup, mut bdown) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let expect = (args.big_file_mib * 1024 * 1024, n_small as u64 * 1024);
    for i in 0..args.file_iters {
        let name = format!("apismall{i}");
        up.push(ms(api.upload(base_ctr, &small_dir, &name, "/").await?));
        let (d, files, bytes) = api.download(base_ctr, &format!("/{name}"), None).await?;
        anyhow::ensure!(
            (files, bytes) == (n_small, expect.1),
            "GET archive of the tree gave {files} files, {bytes} bytes"
        );
        down.push(ms(d));
        let name = format!("apibig{i}");
        bup.push(big_mib / api.upload(base_ctr, &big, &name, "/").await?.as_secs_f64());
        let back = dir.path().join(format!("api-big-back{i}"));
        std::fs::create_dir(&back)?;
        let (d, files, bytes) = api
            .download(base_ctr, &format!("/{name}"), Some(back.clone()))
            .await?;
        anyhow::ensure!(
            (files, bytes) == (1, expect.0),
            "GET archive of the big file gave {files} files, {bytes} bytes"
        );
        bdown.push(big_mib / d.as_secs_f64());
        let _ = std::fs::remove_dir_all(&back);
    }
    report.time_ms(
        "api.files.small.up.engine",
        &format!("baseline (Engine API): PUT archive ({small_label})"),
        &up,
        Vs::NONE,
        "tar built from the directory while sent",
    );
    report.time_ms(
        "api.files.small.down.engine",
        &format!("baseline (Engine API): GET archive ({small_label})"),
        &down,
        Vs::NONE,
        "tar read in memory, not written to disk",
    );
    report.rate(
        "api.files.big.up.engine",
        &format!(
            "baseline (Engine API): PUT archive, {} MiB file",
            args.big_file_mib
        ),
        "MiB/s",
        &bup,
        Vs::NONE,
        "tar streamed from disk",
    );
    report.rate(
        "api.files.big.down.engine",
        &format!(
            "baseline (Engine API): GET archive, {} MiB file",
            args.big_file_mib
        ),
        "MiB/s",
        &bdown,
        Vs::NONE,
        "unpacked to disk while read",
    );

    for (p, id) in ids {
        eprintln!(
            "bench[api]: files, {p}: {n_small} small files × {} and a {} MiB file × {}",
            args.file_iters, args.big_file_mib, args.file_iters
        );
        let files_url = s.u(&format!("/v1/sandboxes/{id}/files"));
        let (mut up, mut down, mut bup, mut bdown) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut archive_up = Vec::new();
        for i in 0..args.file_iters {
            let t = Instant::now();
            let puts = (0..n_small).map(|j| {
                let req = s
                    .http
                    .put(format!("{files_url}?path=/bench/small{i}/f{j}"))
                    .body(small.clone());
                s.json(req)
            });
            let failed = futures_util::stream::iter(puts)
                .buffer_unordered(args.file_concurrency)
                .filter(|r| futures_util::future::ready(r.is_err()))
                .count()
                .await;
            up.push(ms(t.elapsed()));
            anyhow::ensure!(failed == 0, "{failed} small uploads failed");

            // The same files as one tar, built from the directory in the
            // timed part as `docker cp` builds its own.
            let t = Instant::now();
            let mut tar = tar::Builder::new(Vec::new());
            tar.append_dir_all(".", &small_dir)?;
            let tar = tar.into_inner()?;
            let summary = s
                .json(
                    s.http
                        .put(format!("{files_url}/archive?path=/bench/tree{i}"))
                        .header("content-type", "application/x-tar")
                        .body(tar),
                )
                .await?;
            archive_up.push(ms(t.elapsed()));
            anyhow::ensure!(
                summary["files"] == json!(n_small),
                "archive upload wrote {summary}"
            );
            let t = Instant::now();
            let gets = (0..n_small).map(|j| {
                let req = s.http.get(format!("{files_url}?path=/bench/small{i}/f{j}"));
                async move {
                    let r = req.send().await?.error_for_status()?;
                    anyhow::Ok(r.bytes().await?.len())
                }
            });
            let bytes: Vec<Result<usize>> = futures_util::stream::iter(gets)
                .buffer_unordered(args.file_concurrency)
                .collect()
                .await;
            down.push(ms(t.elapsed()));
            let total: usize = bytes
                .into_iter()
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .sum();
            anyhow::ensure!(
                total == n_small * 1024,
                "downloaded {total} bytes of {}",
                n_small * 1024
            );

            let path = format!("/bench/big{i}");
            let f = tokio::fs::File::open(&big).await?;
            let t = Instant::now();
            let entry = s
                .json(s.http.put(format!("{files_url}?path={path}")).body(
                    reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                        f,
                        256 * 1024,
                    )),
                ))
                .await?;
            bup.push(big_mib / t.elapsed().as_secs_f64());
            anyhow::ensure!(
                entry["size"] == json!(args.big_file_mib * 1024 * 1024),
                "uploaded entry {entry}"
            );
            let back = dir.path().join("api-back");
            let t = Instant::now();
            let resp = s
                .http
                .get(format!("{files_url}?path={path}"))
                .send()
                .await?
                .error_for_status()?;
            let mut out = tokio::fs::File::create(&back).await?;
            let mut body = resp.bytes_stream();
            let mut n = 0usize;
            while let Some(c) = body.next().await {
                let c = c?;
                n += c.len();
                out.write_all(&c).await?;
            }
            out.flush().await?;
            bdown.push(big_mib / t.elapsed().as_secs_f64());
            anyhow::ensure!(
                n as u64 == args.big_file_mib * 1024 * 1024,
                "downloaded {n} bytes"
            );
            let _ = std::fs::remove_file(&back);
            // Free the sandbox's disk for the next round.
            let _ = s
                .http
                .delete(format!("{files_url}?path={path}"))
                .send()
                .await;
        }
        let c = args.file_concurrency;
        report.time_ms(
            &format!("api.files.small.up.{p}"),
            &format!("API {p}: upload {small_label} (PUT each)"),
            &up,
            Vs::both("api.files.small.up.base", "api.files.small.up.engine"),
            &format!("{c} requests in flight"),
        );
        report.time_ms(
            &format!("api.files.small.archive.{p}"),
            &format!("API {p}: upload {small_label} (one tar, files/archive)"),
            &archive_up,
            Vs::both("api.files.small.up.base", "api.files.small.up.engine"),
            "tar built from the directory inside the timing",
        );
        report.time_ms(
            &format!("api.files.small.down.{p}"),
            &format!("API {p}: download {small_label} (GET each)"),
            &down,
            Vs::both("api.files.small.down.base", "api.files.small.down.engine"),
            &format!("{c} requests in flight"),
        );
        report.rate(
            &format!("api.files.big.up.{p}"),
            &format!("API {p}: upload {} MiB file", args.big_file_mib),
            "MiB/s",
            &bup,
            Vs::both("api.files.big.up.base", "api.files.big.up.engine"),
            "",
        );
        report.rate(
            &format!("api.files.big.down.{p}"),
            &format!("API {p}: download {} MiB file", args.big_file_mib),
            "MiB/s",
            &bdown,
            Vs::both("api.files.big.down.base", "api.files.big.down.engine"),
            "",
        );
    }
    Ok(())
}

/// `args.clients` concurrent clients hitting one URL for a fixed time.
async fn throughput(
    s: &Server,
    args: &Args,
    report: &mut Report,
    key: &str,
    label: &str,
    url: &str,
) -> Result<()> {
    eprintln!(
        "bench[api]: {label}: {} clients for {} s",
        args.clients, args.throughput_secs
    );
    let deadline = Instant::now() + Duration::from_secs(args.throughput_secs);
    let start = Instant::now();
    let tasks = (0..args.clients).map(|_| {
        let http = s.http.clone();
        let url = url.to_owned();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                match http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => lat.push(ms(t.elapsed())),
                        Err(_) => errors += 1,
                    },
                    _ => errors += 1,
                }
            }
            (lat, errors)
        })
    });
    let mut lat = Vec::new();
    let mut errors = 0;
    for r in futures_util::future::join_all(tasks).await {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    let rps = lat.len() as f64 / secs;
    let note = format!(
        "{} clients, {} s, {errors} errors",
        args.clients, args.throughput_secs
    );
    report.rate(
        &format!("api.rps.{key}"),
        &format!("{label}: requests/s"),
        "req/s",
        &[rps],
        Vs::NONE,
        &note,
    );
    report.time_ms(
        &format!("api.rps.{key}.latency"),
        &format!("{label}: latency"),
        &lat,
        Vs::NONE,
        &note,
    );
    Ok(())
}

/// `args.burst` creates at once, each followed by an exec; the time until
/// every one of them answered.
async fn burst(
    s: &Server,
    args: &Args,
    report: &mut Report,
    p: &str,
    cli: &crate::baseline::DockerCli,
) -> Result<()> {
    let n = args.burst;
    eprintln!("bench[api]: burst of {n} creates, {p}");
    let image = image_for(args, p);
    let start = Instant::now();
    let tasks = (0..n).map(|_| async {
        let t = Instant::now();
        let id = s.create(&image, p).await?;
        s.exec_true(&id).await?;
        anyhow::Ok(ms(t.elapsed()))
    });
    let results = futures_util::future::join_all(tasks).await;
    let total = ms(start.elapsed());
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(d) => lat.push(d),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    // Whatever was made, ready or not, goes away before the next step.
    let live = s.live_ids().await?;
    let failed_destroys = s.destroy_many(&live).await;
    let note = format!("{} ok, {} failed", lat.len(), errors.len());
    let baseline = if p == "docker" {
        docker_burst(args, report, cli).await?;
        Vs::cli("api.burst.docker.base")
    } else {
        Vs::NONE
    };
    report.time_ms(
        &format!("api.burst.{p}.total"),
        &format!("API {p}: burst of {n} creates, all exec-ready"),
        &[total],
        baseline,
        &format!("{note}; {}", burst_target(p)),
    );
    report.time_ms(
        &format!("api.burst.{p}.each"),
        &format!("API {p}: burst, each create → exec-ready"),
        &lat,
        Vs::NONE,
        &note,
    );
    errors.truncate(5);
    report.detail(&format!("burst_{p}_errors"), json!(errors));
    if failed_destroys > 0 {
        eprintln!("bench: {failed_destroys} destroys after the burst failed");
    }
    Ok(())
}

/// The target a provider's burst is held to.
fn burst_target(p: &str) -> &'static str {
    match p {
        "docker" => "target < 5 s",
        "namespaces" => "target < 2 s",
        _ => "no target",
    }
}

/// The same burst with the docker CLI: `n` × (`docker run -d` + first
/// `docker exec`) at once.
async fn docker_burst(
    args: &Args,
    report: &mut Report,
    cli: &crate::baseline::DockerCli,
) -> Result<()> {
    let n = args.burst;
    eprintln!("bench[api]: baseline: burst of {n} docker run -d + docker exec");
    let start = Instant::now();
    let results = futures_util::future::join_all((0..n).map(|_| cli.cold())).await;
    let total = ms(start.elapsed());
    let mut lat = Vec::new();
    let mut failed = 0;
    for r in results {
        match r {
            Ok((d, _)) => lat.push(ms(d)),
            Err(_) => failed += 1,
        }
    }
    cli.cleanup().await?;
    let note = format!("{} ok, {failed} failed", lat.len());
    report.time_ms(
        "api.burst.docker.base",
        &format!("baseline (CLI): {n} × (docker run -d + docker exec) at once"),
        &[total],
        Vs::NONE,
        &note,
    );
    report.time_ms(
        "api.burst.docker.base.each",
        "baseline (CLI): burst, each docker run + exec",
        &lat,
        Vs::NONE,
        &note,
    );
    Ok(())
}

/// The agent processes of one provider's sandboxes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct AgentRss {
    /// Their summed VmRSS.
    kib: u64,
    /// Their summed Pss.
    pss_kib: u64,
    processes: usize,
    /// The sandboxes they belong to (a namespaces sandbox runs two).
    sandboxes: usize,
}

impl AgentRss {
    /// Summed agent RSS / the sandboxes they serve, MiB; NaN for none.
    fn per_sandbox_mib(&self) -> f64 {
        if self.sandboxes == 0 {
            return f64::NAN;
        }
        self.kib as f64 / 1024.0 / self.sandboxes as f64
    }
}

/// The agent processes of one provider that belong to `ids`: container ids
/// for Docker, sandbox ids for PRoot and namespaces.
fn agent_rss(p: &str, ids: &[String]) -> AgentRss {
    let mut out = AgentRss::default();
    let mut seen = std::collections::HashSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !cmdline.starts_with(b"/.stacyvm/agent\0") {
            continue;
        }
        let mine = if p == "docker" || p == "namespaces" {
            // A container's cgroup is named after its id; a namespaces
            // sandbox's after the instance and the sandbox id.
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            ids.iter().position(|c| cg.contains(c.as_str()))
        } else {
            // A proot agent's parent is the proot over the sandbox's root,
            // whose path holds the sandbox id.
            let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().nth(1))
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            std::fs::read(format!("/proc/{ppid}/cmdline"))
                .ok()
                .and_then(|c| {
                    let c = String::from_utf8_lossy(&c);
                    ids.iter().position(|id| c.contains(id.as_str()))
                })
        };
        if let Some(i) = mine {
            if let Some(r) = crate::report::rss_kib(pid) {
                out.kib += r;
                out.pss_kib += crate::report::pss_kib(pid).unwrap_or(0);
                out.processes += 1;
                seen.insert(i);
            }
        }
    }
    out.sandboxes = seen.len();
    out
}

pub(crate) async fn docker_ids(s: &Server) -> Vec<String> {
    let Some(instance) = s.instance() else {
        return Vec::new();
    };
    let filter = format!("label=dev.stacyvm.instance={instance}");
    crate::baseline::run("docker", &["ps", "-q", "--no-trunc", "--filter", &filter])
        .await
        .map(|o| o.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Idle sandboxes added in steps until the step's create p99 doubles
/// against the first step, the cap, or the time budget.
async fn density(s: &Server, args: &Args, report: &mut Report, p: &str) -> Result<()> {
    eprintln!(
        "bench[api]: density, {p}: steps of {} up to {} within {} s",
        args.density_step, args.density_max, args.density_secs
    );
    let image = image_for(args, p);
    let mem0 = meminfo_kib("MemAvailable").unwrap_or(0) as f64;
    let rss0 = s.rss_kib().unwrap_or(0) as f64;
    let start = Instant::now();
    let mut ids: Vec<String> = Vec::new();
    let mut first_p99: Option<f64> = None;
    let mut steps = Vec::new();
    let mut stop = String::from("cap reached");
    let mut all_lat = Vec::new();
    while ids.len() < args.density_max {
        if start.elapsed() > Duration::from_secs(args.density_secs) {
            stop = format!("time budget of {} s used", args.density_secs);
            break;
        }
        let mut lat = Vec::new();
        for _ in 0..args.density_step.min(args.density_max - ids.len()) {
            let t = Instant::now();
            match s.create(&image, p).await {
                Ok(id) => {
                    lat.push(ms(t.elapsed()));
                    ids.push(id);
                }
                Err(e) => {
                    stop = format!("create failed: {e:#}");
                    break;
                }
            }
        }
        let st = crate::report::Stats::of(&lat);
        all_lat.extend(&lat);
        let owned = if p == "docker" {
            docker_ids(s).await
        } else {
            ids.clone()
        };
        let agents = agent_rss(p, &owned);
        let mem = meminfo_kib("MemAvailable").unwrap_or(0) as f64;
        let rss = s.rss_kib().unwrap_or(0) as f64;
        steps.push(json!({
            "sandboxes": ids.len(),
            "create_p50_ms": st.median, "create_p99_ms": st.p99,
            "control_plane_rss_mib": rss / 1024.0,
            "agents": agents.processes, "agent_rss_mib_per_sandbox": agents.per_sandbox_mib(),
            "host_mem_used_mib_per_sandbox": (mem0 - mem) / 1024.0 / ids.len().max(1) as f64,
        }));
        eprintln!(
            "bench[api]:   {p} density: {} sandboxes, step p99 {:.1} ms, agents {}",
            ids.len(),
            st.p99,
            agents.processes
        );
        if !stop.starts_with("cap") {
            break;
        }
        match first_p99 {
            None => first_p99 = Some(st.p99),
            Some(f) if st.p99 >= 2.0 * f => {
                stop = format!("step p99 {:.1} ms ≥ 2 × first step's {:.1} ms", st.p99, f);
                break;
            }
            _ => {}
        }
    }
    let owned = if p == "docker" {
        docker_ids(s).await
    } else {
        ids.clone()
    };
    let agents = agent_rss(p, &owned);
    let mem = meminfo_kib("MemAvailable").unwrap_or(0) as f64;
    let rss = s.rss_kib().unwrap_or(0) as f64;
    let n = ids.len().max(1) as f64;
    report.value(
        &format!("api.density.{p}.count"),
        &format!("API {p}: idle sandboxes reached"),
        "count",
        ids.len() as f64,
        &stop,
    );
    report.time_ms(
        &format!("api.density.{p}.create"),
        &format!("API {p}: create latency while filling"),
        &all_lat,
        Vs::NONE,
        "sequential",
    );
    report.value(
        &format!("api.density.{p}.cp_rss"),
        &format!("API {p}: control plane RSS with them"),
        "MiB",
        rss / 1024.0,
        &format!("+{:.2} MiB per sandbox", (rss - rss0) / 1024.0 / n),
    );
    if agents.sandboxes > 0 {
        report.value(
            &format!("api.density.{p}.agent_rss"),
            &format!("API {p}: agent RSS per sandbox"),
            "MiB",
            agents.per_sandbox_mib(),
            &format!(
                "{} agent processes in {} sandboxes; target < 5 MiB",
                agents.processes, agents.sandboxes
            ),
        );
    }
    report.value(
        &format!("api.density.{p}.host_mem"),
        &format!("API {p}: host memory per sandbox"),
        "MiB",
        (mem0 - mem) / 1024.0 / n,
        "MemAvailable delta / count",
    );
    report.detail(&format!("density_{p}_steps"), json!(steps));
    let failed = s.destroy_many(&ids).await;
    if failed > 0 {
        eprintln!("bench: {failed} destroys after density failed");
    }
    Ok(())
}

/// Members each warm pool keeps ready in the pool section.
const POOL_SIZE: usize = 4;

/// Create → exec-ready when a warm pool has a member ready: a second server
/// started with `--warm-pool`, each claim measured once the pool refilled,
/// against the same cold baselines as the create section.
async fn pool_section(ctx: &Ctx, args: &Args, report: &mut Report) -> Result<()> {
    let providers: Vec<&str> = ["docker", "proot"]
        .into_iter()
        .filter(|p| args.wants(p))
        .collect();
    if providers.is_empty() {
        return Ok(());
    }
    let spec = providers
        .iter()
        .map(|p| format!("{p}:{}={POOL_SIZE}", image_for(args, p)))
        .collect::<Vec<_>>()
        .join(",");
    let bin = ctx.stacyvm_bin().await?;
    eprintln!("bench[api]: starting a second server with --warm-pool {spec}");
    let s = Server::start(
        &bin,
        &ctx.agent_bin,
        &format!("{}pool", ctx.tag),
        &["--warm-pool".into(), spec],
    )
    .await?;
    let result = async {
        import_busybox(&s, ctx).await?;
        for p in &providers {
            let image = image_for(args, p);
            eprintln!(
                "bench[api]: create → exec-ready from a warm pool, {p}, {} times",
                args.cold_iters
            );
            let mut ours = Vec::new();
            for _ in 0..=args.cold_iters {
                pool_full(&s, p).await?;
                let t = Instant::now();
                let id = s.create(&image, p).await?;
                s.exec_true(&id).await?;
                ours.push(ms(t.elapsed()));
                s.destroy(&id).await?;
            }
            // The first claim warms the connection; it is not recorded.
            ours.remove(0);
            let vs = if *p == "docker" {
                Vs::both("api.create.docker.base", "api.create.docker.engine")
            } else {
                Vs::cli("api.create.proot.base")
            };
            report.time_ms(
                &format!("api.create.pool.{p}"),
                &format!("API {p}: create → exec-ready from a warm pool"),
                &ours,
                vs,
                "target p50 < 10 ms",
            );
        }
        anyhow::Ok(())
    }
    .await;
    s.shutdown().await;
    result
}

/// Waits (bounded) until the provider's pool has all its members ready.
async fn pool_full(s: &Server, provider: &str) -> Result<()> {
    pool_filled(s, "provider", provider, POOL_SIZE).await
}

/// Waits (bounded) until the pool whose `field` (in `/v1/status`) is
/// `value` has `size` members ready.
pub(crate) async fn pool_filled(s: &Server, field: &str, value: &str, size: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = s.json(s.http.get(s.u("/v1/status"))).await?;
        let ready = st["pools"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p[field] == value))
            .and_then(|p| p["ready"].as_u64())
            .unwrap_or(0);
        if ready as usize >= size {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the warm pool of {field} {value} did not fill within 120 s: {}",
                st["pools"]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates in flight at once while the idle section fills up.
const IDLE_CONCURRENCY: usize = 8;

/// `args.idle_count` idle namespaces sandboxes held at once, and what they
/// cost the host. A single-node server's in-process worker takes 256
/// sandboxes, so this section runs its own control plane with one worker
/// (`--max-sandboxes` raised to fit); the worker's own RSS is reported
/// apart, and is part of the host-memory figure.
async fn idle(ctx: &Ctx, args: &Args, report: &mut Report) -> Result<()> {
    let n = args.idle_count;
    let bin = ctx.stacyvm_bin().await?;
    eprintln!("bench[api]: idle: a control plane and one namespaces worker for {n} sandboxes");
    let cap = (n + 16).to_string();
    let cp = crate::server::start_cluster(
        ctx,
        &bin,
        "idle",
        1,
        "namespaces",
        &["--max-sandboxes".into(), cap],
    )
    .await?;
    let result = async {
        import_busybox(&cp, ctx).await?;
        // The image reaches the worker with the first create; that one is
        // destroyed before the readings start.
        let first = cp.create("busybox", "namespaces").await?;
        cp.exec_true(&first).await?;
        cp.destroy(&first).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let worker_pid = ctx.worker_pids().first().copied();
        let worker_rss = || worker_pid.and_then(crate::report::rss_kib).unwrap_or(0) as f64;
        let kernel0 = kernel_mem_kib();
        let (mem0, cp0, w0) = (
            meminfo_kib("MemAvailable").unwrap_or(0) as f64,
            cp.rss_kib().unwrap_or(0) as f64,
            worker_rss(),
        );
        eprintln!("bench[api]: idle: creating {n} namespaces sandboxes, {IDLE_CONCURRENCY} in flight");
        let start = Instant::now();
        let creates = (0..n).map(|_| async {
            let t = Instant::now();
            let id = cp.create("busybox", "namespaces").await?;
            anyhow::Ok((ms(t.elapsed()), id))
        });
        let results: Vec<Result<(f64, String)>> = futures_util::stream::iter(creates)
            .buffer_unordered(IDLE_CONCURRENCY)
            .collect()
            .await;
        let fill_s = start.elapsed().as_secs_f64();
        let mut lat = Vec::new();
        let mut ids = Vec::new();
        let mut errors = Vec::new();
        for r in results {
            match r {
                Ok((d, id)) => {
                    lat.push(d);
                    ids.push(id);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        // Let the new agents and the kernel's lazily freed memory settle.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let agents = agent_rss("namespaces", &ids);
        let kernel1 = kernel_mem_kib();
        let (mem1, cp1, w1) = (
            meminfo_kib("MemAvailable").unwrap_or(0) as f64,
            cp.rss_kib().unwrap_or(0) as f64,
            worker_rss(),
        );
        // Every one still answers: they are idle, not gone.
        let alive = futures_util::stream::iter(ids.iter().map(|id| cp.exec_true(id)))
            .buffer_unordered(IDLE_CONCURRENCY)
            .filter(|r| futures_util::future::ready(r.is_ok()))
            .count()
            .await;
        let held = ids.len();
        let per = |kib: f64| kib / 1024.0 / held.max(1) as f64;
        report.value(
            "api.idle.namespaces.count",
            "API namespaces: idle sandboxes held at once",
            "count",
            held as f64,
            &format!(
                "{} failed; {alive} answered an exec afterwards; filled in {fill_s:.1} s",
                errors.len()
            ),
        );
        report.time_ms(
            "api.idle.namespaces.create",
            "API namespaces: create latency while filling",
            &lat,
            Vs::NONE,
            &format!("{IDLE_CONCURRENCY} in flight"),
        );
        report.value(
            "api.idle.namespaces.host_mem",
            "API namespaces: host memory per idle sandbox",
            "MiB",
            per(mem0 - mem1),
            "MemAvailable delta / count; target < 3 MiB",
        );
        if agents.sandboxes > 0 {
            report.value(
                "api.idle.namespaces.agent_rss",
                "API namespaces: agent RSS per idle sandbox",
                "MiB",
                agents.per_sandbox_mib(),
                &format!(
                    "{} agent processes in {} sandboxes, summed / sandboxes",
                    agents.processes, agents.sandboxes
                ),
            );
        }
        if agents.sandboxes > 0 {
            report.value(
                "api.idle.namespaces.agent_pss",
                "API namespaces: agent PSS per idle sandbox",
                "MiB",
                agents.pss_kib as f64 / 1024.0 / agents.sandboxes as f64,
                "summed Pss / sandboxes: shared pages of the static agent counted once",
            );
        }
        let kernel_held: f64 = kernel1.iter().zip(&kernel0).map(|(a, b)| a - b).sum();
        report.value(
            "api.idle.namespaces.parts",
            "API namespaces: memory per idle sandbox, sum of parts",
            "MiB",
            idle_parts_mib(agents.pss_kib as f64, kernel_held, (cp1 - cp0) + (w1 - w0), held),
            "agent Pss + kernel (Slab, Percpu, KernelStack, PageTables, Shmem) + control-plane and worker growth, / count; target < 3 MiB",
        );
        report.value(
            "api.idle.namespaces.cp_rss",
            "API namespaces: control plane RSS with them",
            "MiB",
            cp1 / 1024.0,
            &format!("{:+.3} MiB per sandbox", per(cp1 - cp0)),
        );
        report.value(
            "api.idle.namespaces.worker_rss",
            "API namespaces: worker RSS with them",
            "MiB",
            w1 / 1024.0,
            &format!("{:+.3} MiB per sandbox", per(w1 - w0)),
        );
        eprintln!("bench[api]: idle: destroying {held} sandboxes");
        let destroy_errors: Vec<String> =
            futures_util::stream::iter(ids.iter().map(|id| cp.destroy(id)))
                .buffer_unordered(IDLE_CONCURRENCY)
                .filter_map(|r| futures_util::future::ready(r.err().map(|e| format!("{e:#}"))))
                .collect()
                .await;
        if !destroy_errors.is_empty() {
            eprintln!(
                "bench: {} destroys after the idle section failed, first: {}",
                destroy_errors.len(),
                destroy_errors[0]
            );
        }
        report.detail(
            "idle_namespaces_destroy_errors",
            json!({"count": destroy_errors.len(), "first": destroy_errors.iter().take(3).collect::<Vec<_>>()}),
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mem2 = meminfo_kib("MemAvailable").unwrap_or(0) as f64;
        let kernel2 = kernel_mem_kib();
        let kernel_per: serde_json::Map<String, serde_json::Value> = KERNEL_FIELDS
            .iter()
            .zip(kernel0.iter().zip(&kernel1).zip(&kernel2))
            .map(|(f, ((k0, k1), k2))| {
                (
                    (*f).to_owned(),
                    json!({"held_mib_per_sandbox": per(k1 - k0), "freed_mib_per_sandbox": per(k1 - k2)}),
                )
            })
            .collect();
        errors.truncate(5);
        report.detail("idle_namespaces_errors", json!(errors));
        report.detail(
            "idle_namespaces_memory",
            json!({
                "sandboxes": held, "agent_processes": agents.processes,
                "mem_available_before_mib": mem0 / 1024.0, "mem_available_with_them_mib": mem1 / 1024.0,
                // Memory a destroyed cgroup held may be given back later
                // than this reading: a second, weaker reading of the cost.
                "mem_available_after_destroy_mib": mem2 / 1024.0,
                "mem_available_freed_mib_per_sandbox": per(mem2 - mem1),
                "control_plane_rss_before_mib": cp0 / 1024.0, "control_plane_rss_after_mib": cp1 / 1024.0,
                "worker_rss_before_mib": w0 / 1024.0, "worker_rss_after_mib": w1 / 1024.0,
                "agent_rss_sum_mib": agents.kib as f64 / 1024.0,
                "kernel": kernel_per,
            }),
        );
        anyhow::Ok(())
    }
    .await;
    ctx.stop_cluster(cp).await;
    result
}

/// Memory per sandbox from its parts, MiB: the agents' Pss, the kernel's
/// growth, and the growth of the control plane and worker (all KiB).
fn idle_parts_mib(agent_pss_kib: f64, kernel_kib: f64, processes_kib: f64, n: usize) -> f64 {
    (agent_pss_kib + kernel_kib + processes_kib) / 1024.0 / n.max(1) as f64
}

/// The kernel's own memory, by /proc/meminfo field: what namespaces,
/// mounts, cgroups and page tables cost, less moved by other processes'
/// page cache than MemAvailable.
const KERNEL_FIELDS: [&str; 5] = ["Slab", "Percpu", "KernelStack", "PageTables", "Shmem"];

fn kernel_mem_kib() -> Vec<f64> {
    KERNEL_FIELDS
        .iter()
        .map(|f| meminfo_kib(f).unwrap_or(0) as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::AgentRss;

    #[test]
    fn agent_rss_is_per_sandbox_not_per_process() {
        // Two agent processes per sandbox: the figure is per sandbox.
        let a = AgentRss {
            kib: 4 * 1024 * 3,
            pss_kib: 0,
            processes: 6,
            sandboxes: 3,
        };
        assert_eq!(a.per_sandbox_mib(), 4.0);
        assert!(AgentRss::default().per_sandbox_mib().is_nan());
    }

    #[test]
    fn the_parts_add_up_per_sandbox() {
        assert_eq!(
            super::idle_parts_mib(1024.0 * 600.0, 1024.0 * 300.0, 1024.0 * 100.0, 1000),
            1.0
        );
        assert_eq!(super::idle_parts_mib(2048.0, 0.0, 0.0, 0), 2.0);
    }

    #[test]
    fn each_provider_has_its_burst_target() {
        assert_eq!(super::burst_target("namespaces"), "target < 2 s");
        assert_eq!(super::burst_target("docker"), "target < 5 s");
        assert_eq!(super::burst_target("proot"), "no target");
    }
}
