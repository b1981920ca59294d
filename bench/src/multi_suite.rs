//! Suite `multi`: multi-worker mode against single-node, in the same run.
//! One side is a single-node `stacyvm serve`; the other a control plane
//! (`stacyvm serve --no-local-worker`) with `stacyvm worker` processes on
//! loopback. Both run Docker sandboxes of the same image, so the difference
//! is the worker hop: the control plane's gRPC call to the worker, which
//! then reaches the agent, instead of an in-process call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::baseline::ms;
use crate::report::{Report, Stats, Vs};
use crate::server::{start_cluster, Server};
use crate::{Args, Ctx};

/// Rounds the exec samples are split into, alternating the sides, so that
/// a change in the host's load reaches both alike.
const EXEC_ROUNDS: usize = 10;

pub async fn run(ctx: &Ctx, args: &Args, report: &mut Report) -> Result<()> {
    let bin = ctx.stacyvm_bin().await?;
    eprintln!(
        "bench[multi]: starting a single-node {} serve",
        bin.display()
    );
    let single =
        Arc::new(Server::start(&bin, &ctx.agent_bin, &format!("{}single", ctx.tag), &[]).await?);
    ctx.keep_server(single.clone());
    let n = usize::from(args.workers);
    eprintln!("bench[multi]: starting a control plane and {n} workers (docker)");
    let cp = start_cluster(ctx, &bin, "multi", n, "docker", &[]).await?;
    report.detail("workers", json!(n));
    let sides: [(&str, &Server); 2] = [("single", &single), ("multi", &cp)];
    let image = args.docker_image.as_str();

    let mut ids = Vec::new();
    for (side, s) in sides {
        let id = s
            .create(image, "docker")
            .await
            .with_context(|| format!("creating the {side} sandbox"))?;
        ids.push(id);
    }

    if !args.skipped("exec") {
        exec_section(args, report, &sides, &ids).await?;
    }
    if !args.skipped("files") {
        files_section(args, report, &sides, &ids).await?;
    }
    if !args.skipped("stream") {
        stream_section(args, report, &sides, &ids).await?;
    }
    for ((_, s), id) in sides.iter().zip(&ids) {
        s.destroy(id).await?;
    }
    if !args.skipped("burst") {
        for (side, s) in sides {
            burst(args, report, side, s).await?;
        }
    }
    for (side, s) in sides {
        if let Some(rss) = s.rss_kib() {
            let label = if side == "single" {
                "single-node server RSS at the end"
            } else {
                "control plane RSS at the end"
            };
            report.value(
                &format!("multi.rss.{side}"),
                label,
                "MiB",
                rss as f64 / 1024.0,
                "",
            );
        }
    }
    let pids = ctx.worker_pids();
    let rss: Vec<f64> = pids
        .iter()
        .filter_map(|p| crate::report::rss_kib(*p))
        .map(|k| k as f64 / 1024.0)
        .collect();
    if !rss.is_empty() {
        report.value(
            "multi.rss.worker",
            "worker RSS at the end (mean)",
            "MiB",
            rss.iter().sum::<f64>() / rss.len() as f64,
            &format!("{} workers", rss.len()),
        );
    }
    Ok(())
}

/// Exec `true` round trips on both sides, in alternating rounds; the hop
/// cost is the difference of the medians.
async fn exec_section(
    args: &Args,
    report: &mut Report,
    sides: &[(&str, &Server); 2],
    ids: &[String],
) -> Result<()> {
    eprintln!(
        "bench[multi]: exec `true`, {} times per side",
        args.exec_iters
    );
    let mut samples = [Vec::new(), Vec::new()];
    for ((_, s), id) in sides.iter().zip(ids) {
        for _ in 0..3 {
            s.exec_true(id).await?;
        }
    }
    for round in 0..EXEC_ROUNDS {
        let n = round_share(args.exec_iters, EXEC_ROUNDS, round);
        for (i, ((_, s), id)) in sides.iter().zip(ids).enumerate() {
            for _ in 0..n {
                let t = Instant::now();
                s.exec_true(id).await?;
                samples[i].push(ms(t.elapsed()));
            }
        }
    }
    report.time_ms(
        "multi.exec.single",
        "single-node: exec `true` round trip",
        &samples[0],
        Vs::NONE,
        "",
    );
    report.time_ms(
        "multi.exec.multi",
        "multi-worker: exec `true` round trip",
        &samples[1],
        Vs::cli("multi.exec.single"),
        "through the worker RPC",
    );
    let (a, b) = (Stats::of(&samples[0]), Stats::of(&samples[1]));
    report.value(
        "multi.exec.hop",
        "worker hop: multi p50 − single p50",
        "ms",
        b.median - a.median,
        &format!(
            "target < 1 ms; p95 {:+.3} ms, p99 {:+.3} ms",
            b.p95 - a.p95,
            b.p99 - a.p99
        ),
    );
    Ok(())
}

/// How many of `total` samples round `round` of `rounds` takes: equal
/// shares, the remainder spread over the first rounds.
pub fn round_share(total: usize, rounds: usize, round: usize) -> usize {
    if rounds == 0 {
        return 0;
    }
    total / rounds + usize::from(round < total % rounds)
}

/// The big file up and down on both sides, alternating.
async fn files_section(
    args: &Args,
    report: &mut Report,
    sides: &[(&str, &Server); 2],
    ids: &[String],
) -> Result<()> {
    let mib = args.big_file_mib;
    eprintln!(
        "bench[multi]: {mib} MiB file up and down, {} rounds per side",
        args.file_iters
    );
    let dir = tempfile::Builder::new()
        .prefix("svm-bench-multi-")
        .tempdir()?;
    let big = dir.path().join("big");
    {
        let mut f = tokio::fs::File::create(&big).await?;
        let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        for _ in 0..mib {
            f.write_all(&chunk).await?;
        }
        f.sync_all().await?;
    }
    let bytes = mib * 1024 * 1024;
    let mut up = [Vec::new(), Vec::new()];
    let mut down = [Vec::new(), Vec::new()];
    for round in 0..args.file_iters {
        for (i, ((_, s), id)) in sides.iter().zip(ids).enumerate() {
            let url = s.u(&format!("/v1/sandboxes/{id}/files"));
            let path = format!("/bench-big{round}");
            let f = tokio::fs::File::open(&big).await?;
            let t = Instant::now();
            let entry = s
                .json(
                    s.http
                        .put(format!("{url}?path={path}"))
                        .body(reqwest::Body::wrap_stream(
                            tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024),
                        )),
                )
                .await?;
            up[i].push(mib as f64 / t.elapsed().as_secs_f64());
            anyhow::ensure!(entry["size"] == json!(bytes), "uploaded entry {entry}");
            let back = dir.path().join("back");
            let t = Instant::now();
            let resp = s
                .http
                .get(format!("{url}?path={path}"))
                .send()
                .await?
                .error_for_status()?;
            let mut out = tokio::fs::File::create(&back).await?;
            let mut body = resp.bytes_stream();
            let mut n = 0u64;
            while let Some(c) = body.next().await {
                let c = c?;
                n += c.len() as u64;
                out.write_all(&c).await?;
            }
            out.flush().await?;
            down[i].push(mib as f64 / t.elapsed().as_secs_f64());
            anyhow::ensure!(n == bytes, "downloaded {n} bytes of {bytes}");
            let _ = std::fs::remove_file(&back);
            let _ = s.http.delete(format!("{url}?path={path}")).send().await;
        }
    }
    for (dir_key, dir_label, v) in [("up", "upload", &up), ("down", "download", &down)] {
        report.rate(
            &format!("multi.files.{dir_key}.single"),
            &format!("single-node: {dir_label} {mib} MiB file"),
            "MiB/s",
            &v[0],
            Vs::NONE,
            "",
        );
        report.rate(
            &format!("multi.files.{dir_key}.multi"),
            &format!("multi-worker: {dir_label} {mib} MiB file"),
            "MiB/s",
            &v[1],
            Vs::cli(&format!("multi.files.{dir_key}.single")),
            "target ≥ 0.9× single-node",
        );
    }
    Ok(())
}

/// A streamed exec writing `big_file_mib` MiB to stdout, on both sides.
async fn stream_section(
    args: &Args,
    report: &mut Report,
    sides: &[(&str, &Server); 2],
    ids: &[String],
) -> Result<()> {
    let mib = args.big_file_mib;
    eprintln!(
        "bench[multi]: exec/stream of {mib} MiB of stdout, {} rounds per side",
        args.file_iters
    );
    let mut rates = [Vec::new(), Vec::new()];
    // One unrecorded run per side warms the path.
    for ((_, s), id) in sides.iter().zip(ids) {
        stream_stdout(s, id, 1).await?;
    }
    for _ in 0..args.file_iters {
        for (i, ((_, s), id)) in sides.iter().zip(ids).enumerate() {
            let d = stream_stdout(s, id, mib).await?;
            rates[i].push(mib as f64 / d.as_secs_f64());
        }
    }
    let what = format!("exec/stream of {mib} MiB of stdout");
    report.rate(
        "multi.stream.single",
        &format!("single-node: {what}"),
        "MiB/s",
        &rates[0],
        Vs::NONE,
        "head -c … /dev/zero | tr '\\0' a; until the exit event",
    );
    report.rate(
        "multi.stream.multi",
        &format!("multi-worker: {what}"),
        "MiB/s",
        &rates[1],
        Vs::cli("multi.stream.single"),
        "target ≥ 0.9× single-node",
    );
    Ok(())
}

/// Runs a command printing `mib` MiB of `a` through exec/stream; the time
/// until the exit event, once the stdout events carried every byte.
async fn stream_stdout(s: &Server, id: &str, mib: u64) -> Result<Duration> {
    let bytes = mib * 1024 * 1024;
    // Printable bytes: a NUL would be escaped to six characters in the JSON
    // of each event, measuring the escaping instead of the transport.
    let script = format!("head -c {bytes} /dev/zero | tr '\\0' a");
    let t = Instant::now();
    let resp = s
        .http
        .post(s.u(&format!("/v1/sandboxes/{id}/exec/stream")))
        .json(&json!({"cmd": ["sh", "-c", script], "timeout_s": 600}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("exec/stream: HTTP {}", resp.status());
    }
    let mut body = resp.bytes_stream();
    let mut counter = SseCounter::default();
    while let Some(chunk) = body.next().await {
        counter.feed(&chunk?);
        if counter.exit.is_some() {
            break;
        }
    }
    let d = t.elapsed();
    let exit = counter
        .exit
        .context("the stream ended without an exit event")?;
    anyhow::ensure!(
        exit["exit_code"] == json!(0),
        "the command ended with {exit}"
    );
    anyhow::ensure!(
        counter.stdout == bytes,
        "stdout carried {} bytes of {bytes}",
        counter.stdout
    );
    Ok(d)
}

/// Reads a `text/event-stream` as it arrives: counts the bytes of the
/// `stdout` events' `data` and keeps the `exit` event.
#[derive(Default)]
pub struct SseCounter {
    pending: Vec<u8>,
    event: String,
    pub stdout: u64,
    pub exit: Option<Value>,
}

impl SseCounter {
    pub fn feed(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|b| *b == b'\n') {
            let line = &self.pending[start..start + nl];
            start += nl + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(name) = line.strip_prefix(b"event:") {
                self.event = String::from_utf8_lossy(name).trim().to_owned();
            } else if let Some(data) = line.strip_prefix(b"data:") {
                let Ok(v) = serde_json::from_slice::<Value>(data) else {
                    continue;
                };
                match self.event.as_str() {
                    "stdout" => {
                        self.stdout += v["data"].as_str().map_or(0, |d| d.len() as u64);
                    }
                    "exit" => self.exit = Some(v),
                    _ => {}
                }
            }
        }
        self.pending.drain(..start);
    }
}

/// `args.burst` × (create + exec `true`) at once on one side; how the
/// multi-worker side spread them over its workers.
async fn burst(args: &Args, report: &mut Report, side: &str, s: &Server) -> Result<()> {
    let n = args.burst;
    eprintln!("bench[multi]: burst of {n} creates, {side}");
    let image = args.docker_image.as_str();
    let start = Instant::now();
    let tasks = (0..n).map(|_| async {
        let t = Instant::now();
        let id = s.create(image, "docker").await?;
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
    let mut note = format!("{} ok, {} failed", lat.len(), errors.len());
    if side == "multi" {
        let list = s.json(s.http.get(s.u("/v1/workers"))).await?;
        let spread = worker_spread(&list);
        note.push_str(&format!(
            "; per worker {}",
            spread
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join("/")
        ));
        report.detail("burst_spread", json!(spread));
    }
    let live = s.live_ids().await?;
    let failed = s.destroy_many(&live).await;
    if failed > 0 {
        eprintln!("bench: {failed} destroys after the {side} burst failed");
    }
    let (who, vs) = if side == "single" {
        ("single-node", Vs::NONE)
    } else {
        ("multi-worker", Vs::cli("multi.burst.single.total"))
    };
    report.time_ms(
        &format!("multi.burst.{side}.total"),
        &format!("{who}: burst of {n} creates, all exec-ready"),
        &[total],
        vs,
        &note,
    );
    report.time_ms(
        &format!("multi.burst.{side}.each"),
        &format!("{who}: burst, each create → exec-ready"),
        &lat,
        Vs::NONE,
        &note,
    );
    errors.truncate(5);
    report.detail(&format!("burst_{side}_errors"), json!(errors));
    Ok(())
}

/// Live sandboxes per worker, from `GET /v1/workers`, by worker name.
pub fn worker_spread(list: &Value) -> Vec<u64> {
    let mut v: Vec<(String, u64)> = list["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_owned(),
                w["sandboxes"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_share_every_sample() {
        for (total, rounds) in [(500, 10), (7, 10), (503, 10), (0, 3), (10, 1)] {
            let shares: Vec<usize> = (0..rounds).map(|r| round_share(total, rounds, r)).collect();
            assert_eq!(shares.iter().sum::<usize>(), total, "{total} over {rounds}");
            let (lo, hi) = (shares.iter().min(), shares.iter().max());
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{shares:?}");
        }
        assert_eq!(round_share(5, 0, 0), 0);
    }

    #[test]
    fn the_sse_counter_counts_stdout_across_chunk_boundaries() {
        let text = "event: stdout\ndata: {\"data\":\"aaaa\"}\n\nevent: stderr\ndata: {\"data\":\"zz\"}\n\n\
                    event: stdout\r\ndata: {\"data\":\"aa\"}\r\n\r\nevent: exit\ndata: {\"exit_code\":0}\n\n";
        // Fed one byte at a time, and whole: the same result.
        let mut whole = SseCounter::default();
        whole.feed(text.as_bytes());
        let mut bytes = SseCounter::default();
        for b in text.as_bytes() {
            bytes.feed(std::slice::from_ref(b));
        }
        for c in [whole, bytes] {
            assert_eq!(c.stdout, 6);
            assert_eq!(c.exit, Some(json!({"exit_code": 0})));
            assert!(c.pending.is_empty());
        }
        let mut cut = SseCounter::default();
        cut.feed(b"event: stdout\ndata: {\"data\":\"a");
        assert_eq!((cut.stdout, cut.exit.is_none()), (0, true));
    }

    #[test]
    fn the_spread_is_per_worker_by_name() {
        let list = json!({"workers": [
            {"name": "w2", "sandboxes": 30},
            {"name": "w0", "sandboxes": 36},
            {"name": "w1", "sandboxes": 34},
        ]});
        assert_eq!(worker_spread(&list), vec![36, 34, 30]);
        assert!(worker_spread(&json!({})).is_empty());
    }
}
