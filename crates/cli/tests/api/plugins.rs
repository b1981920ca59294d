//! Plugin providers through the API of a real server: the core path on the
//! reference plugin (`--providers plugin:ref --plugin ref=examples/…`), a
//! plugin that is no security boundary restricted like PRoot (and one that
//! only a remote worker runs, which cannot say it is one), and runtime
//! reconciliation that goes on for the other providers while a plugin is
//! down, then settles the plugin's sandboxes once it is back; where the
//! server finds a plugin, and what it says when it cannot.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{
    docker_containers_of, eventually, random_hex, s, workspace_root, Api, Server, ServerOptions,
    StoreKind,
};

fn reference_plugin() -> PathBuf {
    workspace_root().join("examples/plugins/docker_cli.py")
}

fn test_plugin(name: &str) -> PathBuf {
    workspace_root()
        .join("crates/provider/tests/provider/plugins")
        .join(name)
}

async fn get_sandbox(api: &Api, id: &str) -> Result<Value> {
    api.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_core_path_on_the_reference_plugin() -> Result<()> {
    let plugin = format!("ref={}", reference_plugin().display());
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("plugin:ref")
            .arg("--plugin")
            .arg(&plugin),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let status = admin.get("/v1/status").await?.ok(200)?;
    let p = &status["providers"][0];
    ensure!(
        p["name"] == "plugin:ref" && p["healthy"] == true,
        "the plugin is a healthy provider: {status}"
    );
    ensure!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("plugin ref") && d.contains("a security boundary")),
        "{p}"
    );
    server.anonymous().get("/readyz").await?.ok(200)?;

    // A member's create takes the one configured provider: it is isolating.
    let (_, member) = admin.tenant_with("member").await?;
    // It offers no network: egress is refused, and nothing of it runs.
    member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "network": "egress"}),
        )
        .await?
        .err(409, "unsupported")?;
    let listed = member.get("/v1/sandboxes").await?.ok(200)?;
    let listed = listed["sandboxes"].as_array().context("a list")?;
    ensure!(
        listed.len() == 1,
        "the refused create is listed: {listed:?}"
    );
    for refused in listed {
        let rid = s(refused, "id")?;
        ensure!(refused["state"] == "failed", "{refused}");
        ensure!(
            docker_containers_of(rid)?.is_empty(),
            "{rid} left a container"
        );
        let run_dir = server.host_path(&format!("plugin-state/ref/run/{rid}"));
        ensure!(!run_dir.exists(), "{} is gone", run_dir.display());
    }
    let sb = member
        .create_sandbox(json!({"image": "busybox", "env": {"GREETING": "hi"}, "workdir": "/work"}))
        .await?;
    ensure!(sb["provider"] == "plugin:ref", "{sb}");
    let id = s(&sb, "id")?.to_owned();
    ensure!(
        docker_containers_of(&id)?.len() == 1,
        "one container runs it"
    );

    let out = member
        .exec(
            &id,
            json!({"cmd": ["sh", "-c", "echo $GREETING; pwd; exit 3"]}),
        )
        .await?;
    ensure!(
        out["exit_code"] == 3 && out["stdout"] == "hi\n/work\n",
        "{out}"
    );
    let put = member
        .put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/work/a.txt"),
            b"through the agent".to_vec(),
        )
        .await?
        .ok(201)?;
    ensure!(put["size"] == 17, "{put}");
    let got = member
        .get(&format!("/v1/sandboxes/{id}/files?path=/work/a.txt"))
        .await?;
    ensure!(
        got.status == 200 && got.body == b"through the agent",
        "{}",
        got.text()
    );
    let events = member
        .exec_stream(&id, json!({"cmd": ["sh", "-c", "echo one; echo two >&2"]}))
        .await?
        .map_err(|r| anyhow::anyhow!("the stream was refused: {}", r.text()))?
        .collect()
        .await?;
    let last = events.last().context("an exit event")?;
    ensure!(
        last.event == "exit" && last.data["exit_code"] == 0,
        "{events:?}"
    );
    let logs = member
        .get(&format!("/v1/sandboxes/{id}/logs"))
        .await?
        .ok(200)?;
    ensure!(logs["lines"].is_array(), "{logs}");

    // The plugin declares pause: it works through it.
    let paused = member
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await?
        .ok(200)?;
    ensure!(paused["state"] == "paused", "{paused}");
    member
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await?
        .err(409, "conflict")?;
    member
        .post(&format!("/v1/sandboxes/{id}/resume"), json!({}))
        .await?
        .ok(200)?;
    ensure!(member.sh(&id, "cat /work/a.txt").await? == "through the agent");

    member.destroy(&id).await?;
    ensure!(
        docker_containers_of(&id)?.is_empty(),
        "destroy removes the container"
    );
    let run_dir = server.host_path(&format!("plugin-state/ref/run/{id}"));
    ensure!(!run_dir.exists(), "{} is gone", run_dir.display());
    ensure!(get_sandbox(&member, &id).await?["state"] == "destroyed");

    // What the plugin printed is in the log of the process that runs it,
    // under its name.
    let log = server.host_log_all();
    ensure!(
        log.lines()
            .any(|l| l.contains("docker-cli[ref]: ready") && l.contains("plugin=ref")),
        "the plugin's stderr reaches the log:\n{}",
        server.log_tail(40)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_is_no_security_boundary_is_restricted_like_proot() -> Result<()> {
    let plugin = format!("hx={}", test_plugin("hostexec.py").display());
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,plugin:hx")
            .env("STACYVM_PLUGINS", &plugin),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    // The harness's tenants may use every provider; this one starts from
    // the default instead.
    let quota_path = format!("/v1/tenants/{tenant}/quota");
    let mut q = admin.get(&quota_path).await?.ok(200)?;
    q["allowed_providers"] = Value::Null;
    let q = admin.put(&quota_path, q).await?.ok(200)?;
    ensure!(q["allowed_providers"].is_null(), "{q}");

    // Never chosen by default, and refused unless allowed.
    let sb = member.create_sandbox(json!({"image": "busybox"})).await?;
    ensure!(sb["provider"] == "docker", "{sb}");
    let refused = member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "plugin:hx"}),
        )
        .await?
        .err(403, "forbidden")?;
    ensure!(
        refused.message.contains("not a security boundary"),
        "{}",
        refused.message
    );

    // The operator's tenant may, and exec runs through the plugin (it has
    // no agent); file calls are 409 unsupported.
    let own = admin.sandbox("plugin:hx").await?;
    ensure!(admin.sh(&own, "echo via the plugin").await? == "via the plugin\n");
    admin
        .get(&format!("/v1/sandboxes/{own}/files?path=/etc/hostname"))
        .await?
        .err(409, "unsupported")?;

    // Allowed by the operator, the member may too.
    let mut q = admin.get(&quota_path).await?.ok(200)?;
    q["allowed_providers"] = json!(["docker", "plugin:hx"]);
    admin.put(&quota_path, q).await?.ok(200)?;
    let allowed = member.sandbox("plugin:hx").await?;
    ensure!(member.sh(&allowed, "echo ok").await? == "ok\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_only_a_remote_worker_runs_is_restricted() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    // A remote worker reports its providers' names and health, not whether
    // a plugin declared itself a security boundary.
    let token = admin
        .post("/v1/workers/tokens", json!({"name": "far"}))
        .await?
        .ok(201)?;
    let worker_id = format!("wrk_{}", random_hex(32));
    let worker = server.anonymous().with_key(s(&token, "token")?);
    let providers = json!([{"name": "plugin:far", "healthy": true, "detail": "plugin far"}]);
    worker
        .post(
            "/v1/workers/register",
            json!({
                "id": worker_id,
                "name": "far",
                "address": "http://127.0.0.1:1",
                "providers": providers,
                "labels": {},
                "capacity": {"sandboxes": 4},
            }),
        )
        .await?
        .ok(200)?;
    let hb = worker
        .post(
            &format!("/v1/workers/{worker_id}/heartbeat"),
            json!({"providers": providers, "runtimes": [], "ready": true}),
        )
        .await?
        .ok(200)?;
    ensure!(hb["state"] == "ready", "{hb}");

    let (tenant, member) = admin.tenant_with("member").await?;
    let quota_path = format!("/v1/tenants/{tenant}/quota");
    let mut q = admin.get(&quota_path).await?.ok(200)?;
    q["allowed_providers"] = Value::Null;
    admin.put(&quota_path, q).await?.ok(200)?;

    // So it is taken for one that is not: refused to a tenant the operator
    // did not allow it, and never chosen by default.
    let refused = member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "plugin:far"}),
        )
        .await?
        .err(403, "forbidden")?;
    ensure!(
        refused.message.contains("not a security boundary"),
        "{}",
        refused.message
    );
    let sb = member.create_sandbox(json!({"image": "busybox"})).await?;
    ensure!(sb["provider"] == "docker", "{sb}");
    member.destroy(s(&sb, "id")?).await?;
    Ok(())
}

/// An executable that runs the test plugin through the misbehave wrapper
/// (the server starts plugins without arguments).
fn wrapper(dir: &Path, hold: &Path) -> Result<PathBuf> {
    let path = dir.join("flaky-plugin");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec python3 {} {} --crash-on logs --hold {}\n",
            test_plugin("misbehave.py").display(),
            test_plugin("hostexec.py").display(),
            hold.display()
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread")]
async fn reconciliation_goes_on_while_a_plugin_is_down() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let hold = scratch.path().join("hold");
    let plugin = format!("flaky={}", wrapper(scratch.path(), &hold)?.display());
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,plugin:flaky")
            .arg("--plugin")
            .arg(&plugin),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let kept = admin.sandbox("plugin:flaky").await?;
    let vanishing = admin.sandbox("plugin:flaky").await?;
    let container = admin.sandbox("docker").await?;
    let result = down_and_back(&server, &admin, &hold, [&kept, &vanishing, &container]).await;
    // The plugin comes back whatever happened, so the guard can clean up.
    let _ = std::fs::remove_file(&hold);
    let _ = eventually(Duration::from_secs(60), "the plugin back", || async {
        let st = admin.get("/v1/status").await?.ok(200)?;
        Ok(st["providers"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| p["healthy"] == true))
            .then_some(()))
    })
    .await;
    result
}

async fn down_and_back(
    server: &Server,
    admin: &Api,
    hold: &Path,
    [kept, vanishing, container]: [&String; 3],
) -> Result<()> {
    // The plugin crashes on a call and is held down.
    std::fs::write(hold, "")?;
    let logs = admin
        .get(&format!("/v1/sandboxes/{kept}/logs"))
        .await?
        .ok(200)?;
    ensure!(
        logs.to_string().contains("exit status: 7"),
        "the logs say the provider's part is unavailable, and why: {logs}"
    );

    // Docker's reconciliation goes on meanwhile: a container removed behind
    // the server's back is noticed.
    let ids = docker_containers_of(container)?;
    ensure!(ids.len() == 1, "{ids:?}");
    let rm = std::process::Command::new("docker")
        .args(["rm", "-f", &ids[0]])
        .output()?;
    ensure!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    eventually(
        Duration::from_secs(90),
        "the Docker sandbox marked",
        || async {
            let sb = get_sandbox(admin, container).await?;
            Ok(matches!(sb["state"].as_str(), Some("lost" | "failed")).then_some(()))
        },
    )
    .await?;
    // The plugin's sandboxes are left as they were: it could not say.
    for id in [kept, vanishing] {
        let sb = get_sandbox(admin, id).await?;
        ensure!(sb["state"] == "running", "{sb}");
    }

    // One of them goes away while the plugin is down; once it is back, its
    // row is settled and the other is adopted.
    std::fs::remove_dir_all(server.host_path(&format!("plugin-state/flaky/boxes/{vanishing}")))?;
    std::fs::remove_file(hold)?;
    let gone = eventually(
        Duration::from_secs(90),
        "the vanished sandbox marked",
        || async {
            let sb = get_sandbox(admin, vanishing).await?;
            Ok(matches!(sb["state"].as_str(), Some("lost" | "failed")).then_some(sb))
        },
    )
    .await?;
    ensure!(gone["failure"]["message"].is_string(), "{gone}");
    ensure!(get_sandbox(admin, kept).await?["state"] == "running");
    ensure!(admin.sh(kept, "echo adopted").await? == "adopted\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_installed_in_the_data_dir_is_found() -> Result<()> {
    // Installed as DATA_DIR/plugins/NAME, `plugin:NAME` alone enables it.
    let data = tempfile::Builder::new().prefix("svm-test-").tempdir()?;
    std::fs::create_dir(data.path().join("plugins"))?;
    let installed = data.path().join("plugins/hx");
    std::fs::copy(test_plugin("hostexec.py"), &installed)?;
    std::fs::set_permissions(&installed, std::fs::Permissions::from_mode(0o755))?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("plugin:hx")
            .data_dir(data.path()),
    )?;
    let status = server.admin().get("/v1/status").await?.ok(200)?;
    ensure!(
        status["providers"][0]["name"] == "plugin:hx" && status["providers"][0]["healthy"] == true,
        "{status}"
    );
    Ok(())
}

/// Not async: a server that fails to start is dropped outside a runtime.
#[test]
fn a_missing_plugin_stops_the_server_from_starting_and_is_named() -> Result<()> {
    // Neither given nor installed: the server does not start, and says why.
    let missing = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("plugin:absent"));
    let e = format!(
        "{:#}",
        missing
            .err()
            .context("a server without its plugin starts")?
    );
    ensure!(
        e.contains("plugin:absent") && e.contains("--plugin absent=/path/to/plugin"),
        "{e}"
    );
    let bad = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("plugin:hx")
            .arg("--plugin")
            .arg("hx"),
    );
    let e = format!(
        "{:#}",
        bad.err().context("--plugin without a path is refused")?
    );
    ensure!(e.contains("expected NAME=PATH"), "{e}");
    Ok(())
}
