//! API sections `pty`, `ports` and `snapshot`: a keystroke's echo through
//! `GET …/pty` against `docker exec -it` (CLI and Engine API); HTTP through
//! the port proxy against a direct connection to a container serving the
//! same file; and a snapshot of a sandbox with a large change set against
//! `docker commit` (CLI and Engine API).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::baseline::{ms, run};
use crate::report::{Report, Vs};
use crate::server::Server;
use crate::{Args, Ctx};

/// Unrecorded keystrokes, requests and rounds before each measured series.
const WARM: usize = 3;
/// The port the sandboxes' and the container's `httpd` listen on.
const HTTP_PORT: u16 = 8080;
/// Makes the 1 KiB file every side serves, as `/tmp/www/f`.
const WWW_SETUP: &str = "mkdir -p /tmp/www && head -c 1024 /dev/zero | tr '\\0' a > /tmp/www/f";

pub async fn run_sections(
    ctx: &Ctx,
    args: &Args,
    report: &mut Report,
    s: &Server,
    ids: &[(&str, String)],
    base_ctr: &str,
) -> Result<()> {
    if !args.skipped("pty") {
        pty(ctx, args, report, s, ids, base_ctr).await?;
    }
    if !args.skipped("ports") {
        ports(ctx, args, report, s, ids).await?;
    }
    if !args.skipped("snapshot") {
        snapshot(ctx, args, report, s).await?;
    }
    Ok(())
}

async fn pty(
    ctx: &Ctx,
    args: &Args,
    report: &mut Report,
    s: &Server,
    ids: &[(&str, String)],
    base_ctr: &str,
) -> Result<()> {
    let n = args.pty_iters;
    eprintln!("bench[api]: PTY keystroke echo, docker exec -it, {n} times");
    let cli = ctx.docker.pty_echo(base_ctr, WARM, n).await?;
    report.time_ms(
        "api.pty.base",
        "baseline (CLI): keystroke echo through docker exec -it … cat",
        &cli.into_iter().map(ms).collect::<Vec<_>>(),
        Vs::NONE,
        "on a local pseudo-terminal, as typed",
    );
    let engine = ctx.engine.pty_echo(base_ctr, WARM, n).await?;
    report.time_ms(
        "api.pty.engine",
        "baseline (Engine API): keystroke echo through an exec with Tty",
        &engine.into_iter().map(ms).collect::<Vec<_>>(),
        Vs::NONE,
        "hijacked attach of exec start",
    );
    for (p, id) in ids {
        eprintln!("bench[api]: PTY keystroke echo, {p}, {n} times");
        let v = stacyvm_pty_echo(s, id, WARM, n).await?;
        report.time_ms(
            &format!("api.pty.{p}"),
            &format!("API {p}: keystroke echo through GET …/pty (WebSocket)"),
            &v,
            Vs::both("api.pty.base", "api.pty.engine"),
            "`cat` on the sandbox's terminal echoes it",
        );
    }
    Ok(())
}

/// One `x` sent as a binary frame of a terminal running `cat`, timed
/// until a binary frame with its echo arrives.
async fn stacyvm_pty_echo(s: &Server, id: &str, warm: usize, iters: usize) -> Result<Vec<f64>> {
    let url = format!(
        "{}/v1/sandboxes/{id}/pty?cmd=cat",
        s.url.replacen("http", "ws", 1)
    );
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", s.key).parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .context("opening the terminal")?;
    let mut out = Vec::with_capacity(iters);
    for i in 0..warm + iters {
        let t = Instant::now();
        ws.send(Message::Binary(bytes::Bytes::from_static(b"x")))
            .await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .context("no echo within 10 s")?
                .context("the terminal closed")??;
            match msg {
                Message::Binary(b) if b.contains(&b'x') => break,
                Message::Close(c) => bail!("the terminal closed: {c:?}"),
                _ => {}
            }
        }
        if i >= warm {
            out.push(ms(t.elapsed()));
        }
    }
    // Closing the socket ends `cat`.
    let _ = ws.close(None).await;
    Ok(out)
}

async fn ports(
    ctx: &Ctx,
    args: &Args,
    report: &mut Report,
    s: &Server,
    ids: &[(&str, String)],
) -> Result<()> {
    let (ctr, ip) = ctx
        .docker
        .run_httpd(WWW_SETUP, "/tmp/www", HTTP_PORT)
        .await?;
    let result = async {
        let direct_url = format!("http://{ip}:{HTTP_PORT}/f");
        let direct = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()?;
        wait_http(&direct, &direct_url).await?;
        let n = args.port_requests;
        eprintln!("bench[api]: HTTP GET of 1 KiB, direct to a container, {n} times");
        let lat = latency(&direct, &direct_url, n).await?;
        report.time_ms(
            "api.ports.latency.base",
            "baseline (direct): GET 1 KiB from busybox httpd in a container",
            &lat,
            Vs::NONE,
            "to the container's bridge address, keep-alive",
        );
        let rps = throughput(&direct, &direct_url, args).await?;
        report.rate(
            "api.ports.rps.base",
            &format!(
                "baseline (direct): GET 1 KiB, {} clients",
                args.port_clients
            ),
            "req/s",
            &[rps],
            Vs::NONE,
            "",
        );
        // PRoot sandboxes share the host's loopback, so PRoot has no ports.
        for (p, id) in ids.iter().filter(|(p, _)| *p != "proot") {
            let url = expose_httpd(s, id).await?;
            wait_http(&s.http, &url).await?;
            eprintln!("bench[api]: HTTP GET of 1 KiB through the port proxy, {p}, {n} times");
            let lat = latency(&s.http, &url, n).await?;
            report.time_ms(
                &format!("api.ports.latency.{p}"),
                &format!("API {p}: GET 1 KiB through the port proxy (path form)"),
                &lat,
                Vs::cli("api.ports.latency.base"),
                "sandbox with network none; the agent relays the port",
            );
            let rps = throughput(&s.http, &url, args).await?;
            report.rate(
                &format!("api.ports.rps.{p}"),
                &format!(
                    "API {p}: GET 1 KiB through the port proxy, {} clients",
                    args.port_clients
                ),
                "req/s",
                &[rps],
                Vs::cli("api.ports.rps.base"),
                "",
            );
        }
        anyhow::Ok(())
    }
    .await;
    ctx.docker.rm(&[ctr]).await?;
    result
}

/// Starts busybox `httpd` as a background process of the sandbox and
/// exposes its port; returns the URL of the served file.
async fn expose_httpd(s: &Server, id: &str) -> Result<String> {
    let v = s
        .json(
            s.http
                .post(s.u(&format!("/v1/sandboxes/{id}/exec")))
                .json(&json!({"cmd": ["sh", "-c", WWW_SETUP]})),
        )
        .await?;
    anyhow::ensure!(v["exit_code"] == json!(0), "setting up /tmp/www: {v}");
    let port = HTTP_PORT.to_string();
    s.json(
        s.http
            .post(s.u(&format!("/v1/sandboxes/{id}/processes")))
            .json(&json!({"cmd": ["httpd", "-f", "-p", port, "-h", "/tmp/www"]})),
    )
    .await?;
    let v = s
        .json(
            s.http
                .post(s.u(&format!("/v1/sandboxes/{id}/ports")))
                .json(&json!({"port": HTTP_PORT})),
        )
        .await?;
    let url = v["url"].as_str().context("expose answered no url")?;
    let url = if url.starts_with('/') {
        s.u(url)
    } else {
        url.to_owned()
    };
    Ok(format!("{url}f"))
}

/// Waits until `url` answers 200, for at most 20 s (the server inside is
/// just starting).
async fn wait_http(http: &reqwest::Client, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match http.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if Instant::now() >= deadline => bail!("{url} answered {}", r.status()),
            Err(e) if Instant::now() >= deadline => bail!("{url}: {e}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One GET of `url` read to its end; fails on anything but 200 and 1 KiB.
async fn get(http: &reqwest::Client, url: &str) -> Result<()> {
    let resp = http.get(url).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    anyhow::ensure!(
        status.is_success() && body.len() == 1024,
        "{url} answered {status} with {} bytes",
        body.len()
    );
    Ok(())
}

async fn latency(http: &reqwest::Client, url: &str, n: usize) -> Result<Vec<f64>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..WARM + n {
        let t = Instant::now();
        get(http, url).await?;
        if i >= WARM {
            v.push(ms(t.elapsed()));
        }
    }
    Ok(v)
}

/// Requests per second of `port_clients` clients each sending GETs back
/// to back for `throughput_secs`.
async fn throughput(http: &reqwest::Client, url: &str, args: &Args) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.throughput_secs);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.port_clients {
        let (http, url, done) = (http.clone(), url.to_owned(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                get(&http, &url).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64())
}

async fn snapshot(ctx: &Ctx, args: &Args, report: &mut Report, s: &Server) -> Result<()> {
    let mib = args.big_file_mib;
    let write = format!("head -c {} /dev/urandom > /snapfile", mib << 20);
    let rounds = args.file_iters;
    let repo = |side: &str, i: usize| format!("stacyvm-bench-snap-{}-{side}-{i}", ctx.tag);

    eprintln!("bench[api]: docker commit of a {mib} MiB change, {rounds} rounds");
    let ctr = ctx.docker.run_detached().await?;
    let base = async {
        run("docker", &["exec", &ctr, "sh", "-c", &write]).await?;
        let (mut cli, mut engine) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            cli.push(ms(ctx.docker.commit(&ctr, &repo("cli", i)).await?));
            engine.push(ms(ctx.engine.commit(&ctr, &repo("api", i)).await?));
        }
        anyhow::Ok((cli, engine))
    }
    .await;
    ctx.docker.rm(&[ctr]).await?;
    let (cli, engine) = base?;
    report.time_ms(
        "api.snapshot.base",
        &format!("baseline (CLI): docker commit, {mib} MiB changed"),
        &cli,
        Vs::NONE,
        "",
    );
    report.time_ms(
        "api.snapshot.engine",
        &format!("baseline (Engine API): POST /commit, {mib} MiB changed"),
        &engine,
        Vs::NONE,
        "",
    );

    for p in ["docker", "namespaces"]
        .into_iter()
        .filter(|p| args.wants(p))
    {
        eprintln!("bench[api]: snapshot of a {mib} MiB change, {p}, {rounds} rounds");
        let image = if p == "docker" {
            args.docker_image.clone()
        } else {
            "busybox".to_owned()
        };
        let id = s.create(&image, p).await?;
        let measured = async {
            let v = s
                .json(
                    s.http
                        .post(s.u(&format!("/v1/sandboxes/{id}/exec")))
                        .json(&json!({"cmd": ["sh", "-c", &write], "timeout_s": 600})),
                )
                .await?;
            anyhow::ensure!(v["exit_code"] == json!(0), "writing the change: {v}");
            let mut out = Vec::new();
            for i in 0..rounds {
                let name = repo(p, i);
                let t = Instant::now();
                s.json(
                    s.http
                        .post(s.u(&format!("/v1/sandboxes/{id}/snapshot")))
                        .json(&json!({"image": name})),
                )
                .await?;
                out.push(ms(t.elapsed()));
                let resp = s
                    .http
                    .delete(s.u(&format!("/v1/images/{name}")))
                    .send()
                    .await?;
                anyhow::ensure!(
                    resp.status().is_success(),
                    "deleting image {name}: {}",
                    resp.status()
                );
            }
            anyhow::Ok(out)
        }
        .await;
        s.destroy(&id).await?;
        report.time_ms(
            &format!("api.snapshot.{p}"),
            &format!("API {p}: POST …/snapshot, {mib} MiB changed"),
            &measured?,
            Vs::both("api.snapshot.base", "api.snapshot.engine"),
            "into the catalog, ready for creates",
        );
    }
    Ok(())
}
