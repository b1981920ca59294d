//! Certification as the API shows it: `/v1/status` and `/v1/workers`
//! carry `certified` and `certified_at` for every provider (true, false or
//! null), and a provider that may serve only once certified is listed
//! unhealthy with `"not certified on this host: …"` while it has no passing
//! record.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::fixtures::agent_bin;
use crate::support::{Server, ServerOptions, StoreKind};

fn certify(data_dir: &Path, args: &[&str]) -> Result<Option<i32>> {
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .arg("certify")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("STACYVM_AGENT_BIN", agent_bin()?)
        .output()
        .context("running stacyvm certify")?;
    eprintln!(
        "certify {args:?}: exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.status.code())
}

fn provider<'a>(list: &'a Value, name: &str) -> Result<&'a Value> {
    list.as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .with_context(|| format!("no {name} in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_certification_and_gates_firecracker_on_it() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("svm-certified-")
        .tempdir()?;
    ensure!(certify(dir.path(), &["--provider", "proot"])? == Some(0));
    // A failed certification, made fast: no kernel to boot.
    let kernel = dir.path().join("no-vmlinuz");
    ensure!(
        certify(
            dir.path(),
            &[
                "--provider",
                "firecracker",
                "--guest-kernel",
                kernel.to_str().context("utf-8 path")?,
            ],
        )? == Some(1)
    );
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("proot,namespaces,firecracker")
            .data_dir(dir.path()),
    )?;
    let admin = server.admin();
    let status = admin.get("/v1/status").await?.ok(200)?;
    let providers = &status["providers"];

    let proot = provider(providers, "proot")?;
    ensure!(
        proot["healthy"] == true && proot["certified"] == true,
        "{proot}"
    );
    ensure!(
        proot["certified_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{proot}"
    );

    // Never certified: both fields are there, and null.
    let ns = provider(providers, "namespaces")?;
    ensure!(
        ns.get("certified") == Some(&Value::Null) && ns.get("certified_at") == Some(&Value::Null),
        "{ns}"
    );

    let fc = provider(providers, "firecracker")?;
    ensure!(
        fc["healthy"] == false && fc["certified"] == false && fc["certified_at"].is_string(),
        "{fc}"
    );
    let detail = fc["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.starts_with("not certified on this host: ")
            && detail.contains("guest-kernel")
            && detail.contains("scripts/build-guest.sh"),
        "the reason of the failed check and its fix: {detail}"
    );

    // The worker view carries the same.
    let workers = admin.get("/v1/workers").await?.ok(200)?;
    let local = workers["workers"]
        .as_array()
        .and_then(|w| w.first())
        .with_context(|| format!("no worker: {workers}"))?;
    let proot = provider(&local["providers"], "proot")?;
    ensure!(proot["certified"] == true, "{proot}");

    // A create on the gated provider is refused with the reason.
    admin.import_busybox().await?;
    let refused = admin
        .post(
            "/v1/sandboxes",
            serde_json::json!({"image": "busybox", "provider": "firecracker"}),
        )
        .await?;
    ensure!(refused.status == 503, "{}", refused.status);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_provider_without_a_record_is_unhealthy_and_says_how_to_certify() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot,firecracker"))?;
    let status = server.admin().get("/v1/status").await?.ok(200)?;
    let fc = provider(&status["providers"], "firecracker")?;
    ensure!(
        fc["healthy"] == false && fc["certified"].is_null() && fc["certified_at"].is_null(),
        "{fc}"
    );
    ensure!(
        fc["detail"]
            == "not certified on this host: never certified; run `stacyvm certify --provider \
                firecracker`",
        "{fc}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_worker_reports_its_certification_in_its_heartbeat() -> Result<()> {
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("proot")
            .arg("--no-local-worker")
            .arg("--lease-ttl")
            .arg("3"),
    )?;
    let admin = server.admin();
    let (_, token) = crate::cluster::worker_token(&admin, "certified").await?;
    let mut worker = crate::cluster::Worker::start(crate::cluster::WorkerOptions::new(
        &server, &token, "proot",
    ))?;
    let listed = worker.ready(&admin).await?;
    let proot = provider(&listed["providers"], "proot")?;
    ensure!(
        proot.get("certified") == Some(&Value::Null),
        "not certified on the worker's host yet: {proot}"
    );
    // Certified on the worker's host, in the worker's data dir: the next
    // heartbeat carries it to the control plane.
    ensure!(certify(worker.data_dir(), &["--provider", "proot"])? == Some(0));
    let name = worker.opts.name.clone();
    let seen = crate::support::eventually(
        std::time::Duration::from_secs(60),
        "the worker's proot to be reported certified",
        || {
            let admin = admin.clone();
            let name = name.clone();
            async move {
                let list = admin.get("/v1/workers").await?.ok(200)?;
                let Some(w) = list["workers"]
                    .as_array()
                    .and_then(|ws| ws.iter().find(|w| w["name"] == name.as_str()))
                else {
                    return Ok(None);
                };
                let p = provider(&w["providers"], "proot")?.clone();
                Ok((p["certified"] == true).then_some(p))
            }
        },
    )
    .await?;
    ensure!(seen["certified_at"].is_string(), "{seen}");
    let status = admin.get("/v1/status").await?.ok(200)?;
    ensure!(
        provider(&status["providers"], "proot")?["certified"] == true,
        "{status}"
    );
    Ok(())
}
