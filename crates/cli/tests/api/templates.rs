//! Templates on real Docker: a build of `run`, `write`, `env`, `workdir`
//! and `upload` steps, creates that find its files, env, working directory
//! and running `start` process (and override its defaults), versions and
//! pinning while a newer version builds, a failing step that leaves
//! nothing behind, a `ready` command that never succeeds, tenancy (another
//! tenant gets 404, the operator's templates are public), a delete that
//! leaves running sandboxes alone, and a `kill -9` mid-build cleaned up at
//! the restart.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use serde_json::{json, Value};

use crate::support::{unique, Api, Server, ServerOptions, StoreKind};

/// A server on Docker; with `STACYVM_TEST_TOPOLOGY=workers` its sandboxes,
/// builds included, run on remote workers.
fn docker_server(store: StoreKind) -> Result<Server> {
    Server::start(
        ServerOptions::new(store)
            .providers("docker")
            .arg("--request-timeout")
            .arg("20"),
    )
}

/// A server whose sandboxes run on its in-process worker in every
/// topology: for what only that worker does (warm pools, failing at start
/// a build its own worker ran).
fn docker_server_local(store: StoreKind) -> Result<Server> {
    Server::start(
        ServerOptions::new(store)
            .providers("docker")
            .local_worker()
            .arg("--request-timeout")
            .arg("20"),
    )
}

/// Waits until version `version` of `name` leaves `building`; returns it.
async fn built(api: &Api, name: &str, version: i64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let t = api
            .get(&format!("/v1/templates/{name}?version={version}"))
            .await?
            .ok(200)?;
        if t["state"] != "building" {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("template {name} version {version} is still building: {t}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the build log of `name` holds `needle`.
async fn log_shows(api: &Api, name: &str, version: i64, needle: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // While building the answer is an event stream: read what the
        // store has through the versions list instead.
        let r = api
            .request(
                reqwest::Method::GET,
                &format!("/v1/templates/{name}/logs?version={version}"),
            )
            .send()
            .await?;
        let is_sse = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        if is_sse {
            // The opening event carries the log so far.
            let mut r = r;
            let chunk = tokio::time::timeout(Duration::from_secs(5), r.chunk())
                .await
                .ok()
                .and_then(|c| c.ok().flatten())
                .unwrap_or_default();
            if String::from_utf8_lossy(&chunk).contains(needle) {
                return Ok(());
            }
        } else {
            let body: Value = r.json().await?;
            if body["log"].as_str().is_some_and(|l| l.contains(needle)) {
                return Ok(());
            }
            bail!("the build ended without {needle:?} in its log: {body}");
        }
        if Instant::now() > deadline {
            bail!("the build log never showed {needle:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tar_of(files: &[(&str, &str)]) -> Result<String> {
    use base64::Engine;
    let mut b = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, content.as_bytes())?;
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(b.into_inner()?))
}

/// The live sandboxes of the build of `version_label` (`stacyvm.template.build` label).
async fn build_sandboxes(admin: &Api) -> Result<Vec<Value>> {
    let page = admin.get("/v1/sandboxes?limit=1000").await?.ok(200)?;
    Ok(page["sandboxes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| {
            s["labels"].get("stacyvm.template.build").is_some()
                && !matches!(s["state"].as_str(), Some("destroyed" | "failed" | "lost"))
        })
        .collect())
}

fn id_of(s: &Value) -> String {
    s["id"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_builds_once_and_starts_with_its_files_env_and_start_process() -> Result<()> {
    let server = docker_server(StoreKind::Sqlite)?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let name = unique("app");
    let body = json!({
        "name": name,
        "from": "busybox",
        "steps": [
            {"run": ["sh", "-c", "mkdir -p /app && echo built > /app/built"]},
            {"write": {"path": "/app/hello.txt", "content": "hi\n"}},
            {"upload": {"path": "/app/src", "tar": tar_of(&[("main.sh", "echo main\n")])?}},
            {"env": {"GREETING": "hello"}},
            {"workdir": "/app"},
            {"run": ["sh", "-c", "echo $GREETING > env.txt"]}
        ],
        "env": {"MODE": "test"},
        "start": ["sh", "-c", "echo started > /tmp/started; exec sleep 1000"],
        "ready": ["test", "-e", "/tmp/started"]
    });
    let accepted = member.post("/v1/templates", body).await?.ok(202)?;
    ensure!(
        accepted["state"] == "building" && accepted["version"] == 1 && accepted["image"].is_null(),
        "{accepted}"
    );
    let t = built(&member, &name, 1).await?;
    ensure!(t["state"] == "ready", "{t}");
    let image = t["image"].as_str().unwrap_or_default().to_owned();
    ensure!(image.ends_with(&format!("/{name}:1")), "{t}");
    ensure!(
        t["env"]["GREETING"] == "hello" && t["env"]["MODE"] == "test" && t["workdir"] == "/app",
        "{t}"
    );
    // The whole log, once built.
    let log = member
        .get(&format!("/v1/templates/{name}/logs"))
        .await?
        .ok(200)?;
    let text = log["log"].as_str().unwrap_or_default();
    ensure!(
        text.contains("step 6/6") && text.contains("built "),
        "{log}"
    );
    // No build sandbox is left.
    ensure!(build_sandboxes(&admin).await?.is_empty());

    let s = member.create_sandbox(json!({"template": name})).await?;
    ensure!(
        s["template"] == format!("{name}:1") && s["image"] == image.as_str(),
        "{s}"
    );
    let id = id_of(&s);
    let seen = member
        .sh(&id, "cat /app/built /app/hello.txt /app/env.txt /tmp/started; sh /app/src/main.sh; echo $GREETING $MODE; pwd")
        .await?;
    ensure!(
        seen == "built\nhi\nhello\nstarted\nmain\nhello test\n/app\n",
        "{seen:?}"
    );
    let procs = member
        .get(&format!("/v1/sandboxes/{id}/processes"))
        .await?
        .ok(200)?;
    ensure!(
        procs["processes"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["cmd"][0] == "sh")),
        "the start process is not running: {procs}"
    );

    // Explicit fields win over the template's defaults.
    let o = member
        .create_sandbox(json!({"template": name, "env": {"MODE": "override"}, "workdir": "/tmp"}))
        .await?;
    let seen = member.sh(&id_of(&o), "echo $GREETING $MODE; pwd").await?;
    ensure!(seen == "hello override\n/tmp\n", "{seen:?}");

    // Audited.
    let events = admin.audit("action=template.build").await?;
    ensure!(
        events
            .iter()
            .any(|e| e["outcome"] == "ok" && e["target"] == name.as_str()),
        "{events:?}"
    );
    member.destroy(&id).await?;
    member.destroy(&id_of(&o)).await?;
    member
        .delete(&format!("/v1/templates/{name}"))
        .await?
        .ok(204)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_pin_while_a_newer_one_builds_and_a_delete_spares_running_sandboxes() -> Result<()>
{
    let server = docker_server(StoreKind::Postgres)?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let name = unique("ver");
    let version = |content: &str| {
        json!({"name": name, "from": "busybox",
            "steps": [{"write": {"path": "/v", "content": content}}]})
    };
    member
        .post("/v1/templates", version("one"))
        .await?
        .ok(202)?;
    ensure!(built(&member, &name, 1).await?["state"] == "ready");
    member
        .post("/v1/templates", version("two"))
        .await?
        .ok(202)?;
    ensure!(built(&member, &name, 2).await?["state"] == "ready");
    // Version 3 blocks until the test lets it go (it never does).
    let blocked = json!({"name": name, "from": "busybox",
        "steps": [{"run": ["sh", "-c", "while ! test -e /never; do sleep 0.2; done"]}]});
    let v3 = member.post("/v1/templates", blocked).await?.ok(202)?;
    ensure!(v3["version"] == 3, "{v3}");
    log_shows(&member, &name, 3, "step 1/1").await?;

    let newest = member.create_sandbox(json!({"template": name})).await?;
    ensure!(newest["template"] == format!("{name}:2"), "{newest}");
    let pinned = member
        .create_sandbox(json!({"template": format!("{name}:1")}))
        .await?;
    ensure!(member.sh(&id_of(&pinned), "cat /v").await? == "one");
    ensure!(member.sh(&id_of(&newest), "cat /v").await? == "two");
    ensure!(
        member
            .get(&format!("/v1/templates/{name}"))
            .await?
            .ok(200)?["state"]
            == "building"
    );
    member
        .post("/v1/sandboxes", json!({"template": format!("{name}:3")}))
        .await?
        .err(422, "image_not_found")?;
    member
        .post("/v1/sandboxes", json!({"template": format!("{name}:9")}))
        .await?
        .err(422, "image_not_found")?;
    let versions = member
        .get(&format!("/v1/templates/{name}/versions"))
        .await?
        .ok(200)?;
    ensure!(
        versions["templates"].as_array().map(Vec::len) == Some(3),
        "{versions}"
    );

    // Deleting the template cuts the build off and spares running sandboxes.
    member
        .delete(&format!("/v1/templates/{name}"))
        .await?
        .ok(204)?;
    member
        .get(&format!("/v1/templates/{name}"))
        .await?
        .err(404, "not_found")?;
    member
        .post("/v1/sandboxes", json!({"template": name}))
        .await?
        .err(422, "image_not_found")?;
    ensure!(member.sh(&id_of(&pinned), "cat /v").await? == "one");
    ensure!(member.sh(&id_of(&newest), "cat /v").await? == "two");
    // The cut-off build stops at its next heartbeat and takes its sandbox along.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !build_sandboxes(&admin).await?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the deleted template's build still runs"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    member.destroy(&id_of(&pinned)).await?;
    member.destroy(&id_of(&newest)).await?;
    // A new build of the name takes a new number.
    member
        .post("/v1/templates", version("four"))
        .await?
        .ok(202)?;
    let v4 = built(&member, &name, 4).await?;
    ensure!(v4["state"] == "ready", "{v4}");
    member
        .delete(&format!("/v1/templates/{name}"))
        .await?
        .ok(204)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_step_fails_the_build_with_its_output_and_leaves_nothing() -> Result<()> {
    let server = docker_server(StoreKind::Sqlite)?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let name = unique("bad");
    let body = json!({"name": name, "from": "busybox", "steps": [
        {"run": ["sh", "-c", "echo before"]},
        {"run": ["sh", "-c", "echo boom >&2; exit 3"]},
        {"run": ["sh", "-c", "echo never"]}
    ]});
    member.post("/v1/templates", body).await?.ok(202)?;
    let t = built(&member, &name, 1).await?;
    let failure = t["failure"].as_str().unwrap_or_default();
    ensure!(
        t["state"] == "failed"
            && t["image"].is_null()
            && failure.contains("step 2")
            && failure.contains("code 3")
            && failure.contains("boom"),
        "{t}"
    );
    let log = member
        .get(&format!("/v1/templates/{name}/logs"))
        .await?
        .ok(200)?;
    let text = log["log"].as_str().unwrap_or_default();
    ensure!(
        text.contains("before") && !text.contains("step 3/3"),
        "{log}"
    );
    ensure!(build_sandboxes(&admin).await?.is_empty());
    let images = admin.get("/v1/images").await?.ok(200)?;
    ensure!(
        !images["images"].as_array().is_some_and(|l| l
            .iter()
            .any(|i| i["name"].as_str().is_some_and(|n| n.contains(&name)))),
        "a failed build left an image: {images}"
    );
    member
        .post("/v1/sandboxes", json!({"template": name}))
        .await?
        .err(422, "image_not_found")?;

    // Bad requests are 400 before anything runs.
    for bad in [
        json!({"name": "Not Valid", "from": "busybox"}),
        json!({"name": "ok", "from": "busybox", "steps": [{"run": []}]}),
        json!({"name": "ok", "from": "busybox", "steps": [{"write": {"path": "rel", "content": ""}}]}),
        json!({"name": "ok", "from": "busybox", "steps": [{"upload": {"path": "/x", "tar": "%%"}}]}),
        json!({"name": "ok", "from": "busybox", "steps": [{"dance": true}]}),
    ] {
        member
            .post("/v1/templates", bad)
            .await?
            .err(400, "invalid_request")?;
    }
    member
        .post(
            "/v1/templates",
            json!({"name": "ok", "from": "no-such-image"}),
        )
        .await?
        .err(422, "image_not_found")?;

    // A ready command that never succeeds fails the create with its output
    // and leaves no sandbox running.
    let never = unique("never");
    member
        .post(
            "/v1/templates",
            json!({"name": never, "from": "busybox",
            "ready": ["sh", "-c", "echo not yet; exit 1"]}),
        )
        .await?
        .ok(202)?;
    ensure!(built(&member, &never, 1).await?["state"] == "ready");
    let e = member
        .post("/v1/sandboxes", json!({"template": never}))
        .await?
        .err(504, "timeout")?;
    ensure!(e.message.contains("not yet"), "{e:?}");
    let live = member.get("/v1/sandboxes?state=running").await?.ok(200)?;
    ensure!(
        live["sandboxes"].as_array().is_some_and(Vec::is_empty),
        "{live}"
    );
    member
        .delete(&format!("/v1/templates/{never}"))
        .await?
        .ok(204)?;
    member
        .delete(&format!("/v1/templates/{name}"))
        .await?
        .ok(204)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_belong_to_their_tenant_and_the_operators_are_public() -> Result<()> {
    let server = docker_server(StoreKind::Sqlite)?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (_, stranger) = admin.tenant_with("member").await?;
    let private = unique("mine");
    member
        .post(
            "/v1/templates",
            json!({"name": private, "from": "busybox",
            "steps": [{"write": {"path": "/secret", "content": "s"}}]}),
        )
        .await?
        .ok(202)?;
    ensure!(built(&member, &private, 1).await?["state"] == "ready");
    for path in [
        format!("/v1/templates/{private}"),
        format!("/v1/templates/{private}/versions"),
        format!("/v1/templates/{private}/logs"),
    ] {
        stranger.get(&path).await?.err(404, "not_found")?;
    }
    stranger
        .delete(&format!("/v1/templates/{private}"))
        .await?
        .err(404, "not_found")?;
    stranger
        .post("/v1/sandboxes", json!({"template": private}))
        .await?
        .err(422, "image_not_found")?;
    let listed = stranger.get("/v1/templates").await?.ok(200)?;
    ensure!(
        !listed["templates"]
            .as_array()
            .is_some_and(|l| l.iter().any(|t| t["name"] == private.as_str())),
        "{listed}"
    );
    // A template built from another tenant's template is refused like the image.
    stranger
        .post(
            "/v1/templates",
            json!({"name": unique("steal"), "from": private}),
        )
        .await?
        .err(422, "image_not_found")?;

    // The operator's templates: every tenant sees them and starts from
    // them, and may build on them, but only the operator deletes them.
    let public = unique("pub");
    admin
        .post(
            "/v1/templates",
            json!({"name": public, "from": "busybox",
            "steps": [{"write": {"path": "/pub", "content": "p"}}], "env": {"FROM": "operator"}}),
        )
        .await?
        .ok(202)?;
    ensure!(built(&admin, &public, 1).await?["state"] == "ready");
    stranger
        .get(&format!("/v1/templates/{public}"))
        .await?
        .ok(200)?;
    let s = stranger.create_sandbox(json!({"template": public})).await?;
    ensure!(stranger.sh(&id_of(&s), "cat /pub; echo $FROM").await? == "poperator\n");
    stranger.destroy(&id_of(&s)).await?;
    let child = unique("child");
    stranger
        .post(
            "/v1/templates",
            json!({"name": child, "from": public,
            "steps": [{"run": ["sh", "-c", "cat /pub > /child"]}]}),
        )
        .await?
        .ok(202)?;
    let c = built(&stranger, &child, 1).await?;
    ensure!(
        c["state"] == "ready" && c["env"]["FROM"] == "operator",
        "{c}"
    );
    let s = stranger.create_sandbox(json!({"template": child})).await?;
    ensure!(stranger.sh(&id_of(&s), "cat /child").await? == "p");
    stranger.destroy(&id_of(&s)).await?;
    stranger
        .delete(&format!("/v1/templates/{public}"))
        .await?
        .err(403, "forbidden")?;
    let denied = admin.audit("action=template.delete&outcome=denied").await?;
    ensure!(
        !denied.is_empty(),
        "another tenant's 404 is audited as denied"
    );
    stranger
        .delete(&format!("/v1/templates/{child}"))
        .await?
        .ok(204)?;
    admin
        .delete(&format!("/v1/templates/{public}"))
        .await?
        .ok(204)?;
    member
        .delete(&format!("/v1/templates/{private}"))
        .await?
        .ok(204)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_cut_off_by_kill_9_leaves_no_sandbox_or_image_after_the_restart() -> Result<()> {
    build_cut_off_by_kill_9(StoreKind::Sqlite).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_cut_off_by_kill_9_on_postgres_is_cleaned_up_at_the_restart() -> Result<()> {
    build_cut_off_by_kill_9(StoreKind::Postgres).await
}

async fn build_cut_off_by_kill_9(store: StoreKind) -> Result<()> {
    // With SQLite (one server per database) a restart fails every build it
    // finds, wherever its sandbox ran; with PostgreSQL only those of its own
    // worker (others wait for the stale heartbeat), so that case keeps it.
    let mut server = match store {
        StoreKind::Postgres => docker_server_local(store)?,
        _ => docker_server(store)?,
    };
    let admin = server.admin();
    admin.import_busybox().await?;
    let name = unique("crash");
    admin
        .post(
            "/v1/templates",
            json!({"name": name, "from": "busybox",
            "steps": [{"run": ["sh", "-c", "while ! test -e /never; do sleep 0.2; done"]}]}),
        )
        .await?
        .ok(202)?;
    log_shows(&admin, &name, 1, "step 1/1").await?;
    let before = build_sandboxes(&admin).await?;
    ensure!(
        before.len() == 1,
        "the build runs in one sandbox: {before:?}"
    );
    server.kill9()?;
    server.restart()?;
    let admin = server.admin();
    let t = admin.get(&format!("/v1/templates/{name}")).await?.ok(200)?;
    ensure!(
        t["state"] == "failed"
            && t["failure"]
                .as_str()
                .is_some_and(|f| f.contains("interrupted")),
        "{t}"
    );
    ensure!(
        build_sandboxes(&admin).await?.is_empty(),
        "a build sandbox survived the restart"
    );
    let s = admin
        .get(&format!("/v1/sandboxes/{}", id_of(&before[0])))
        .await?
        .ok(200)?;
    ensure!(s["state"] == "destroyed", "{s}");
    let images = admin.get("/v1/images").await?.ok(200)?;
    ensure!(
        !images["images"].as_array().is_some_and(|l| l
            .iter()
            .any(|i| i["name"].as_str().is_some_and(|n| n.contains(&name)))),
        "{images}"
    );
    admin
        .delete(&format!("/v1/templates/{name}"))
        .await?
        .ok(204)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_bound_templates_and_their_images_and_refuse_before_a_build_starts() -> Result<()> {
    let server = docker_server(StoreKind::Sqlite)?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let quota = |templates: i64, mb: Option<i64>| json!({"allowed_providers": ["docker"], "max_templates": templates, "max_volume_mb": mb});
    let q = admin
        .put(&format!("/v1/tenants/{tenant}/quota"), quota(1, None))
        .await?
        .ok(200)?;
    ensure!(q["max_templates"] == 1, "{q}");
    let body = |name: &str| {
        json!({"name": name, "from": "busybox",
            "steps": [{"write": {"path": "/which", "content": name}}]})
    };
    let first = unique("first");
    member.post("/v1/templates", body(&first)).await?.ok(202)?;
    ensure!(built(&member, &first, 1).await?["state"] == "ready");
    // A new version of the template it keeps is no new template.
    member.post("/v1/templates", body(&first)).await?.ok(202)?;
    ensure!(built(&member, &first, 2).await?["state"] == "ready");

    // A second template is refused before any sandbox starts.
    let count = || async {
        let page = member.get("/v1/sandboxes?limit=1000").await?.ok(200)?;
        anyhow::Ok(page["sandboxes"].as_array().map_or(0, Vec::len))
    };
    let before = count().await?;
    let second = unique("second");
    let e = member
        .post("/v1/templates", body(&second))
        .await?
        .err(429, "quota_exceeded")?;
    ensure!(e.message.contains("max_templates is 1"), "{}", e.message);
    ensure!(build_sandboxes(&admin).await?.is_empty());
    ensure!(
        count().await? == before,
        "a refused build started a sandbox"
    );
    member
        .get(&format!("/v1/templates/{second}"))
        .await?
        .err(404, "not_found")?;
    let denied = admin.audit("action=template.build&outcome=denied").await?;
    ensure!(
        denied.iter().any(|e| e["status"] == 429
            && e["target"] == second.as_str()
            && e["tenant_id"] == tenant.as_str()
            && e["detail"]["error"] == "quota_exceeded"),
        "the refusal is audited by name: {denied:?}"
    );

    // Deleting the template frees its slot.
    member
        .delete(&format!("/v1/templates/{first}"))
        .await?
        .ok(204)?;
    member.post("/v1/templates", body(&second)).await?.ok(202)?;
    ensure!(built(&member, &second, 1).await?["state"] == "ready");

    // Template images are the tenant's snapshot images: with them filling
    // max_volume_mb, a build is refused before it starts.
    admin
        .put(&format!("/v1/tenants/{tenant}/quota"), quota(5, Some(1)))
        .await?
        .ok(200)?;
    let e = member
        .post("/v1/templates", body(&second))
        .await?
        .err(429, "quota_exceeded")?;
    ensure!(
        e.message.contains("max_volume_mb") && e.message.contains("template"),
        "{}",
        e.message
    );
    ensure!(build_sandboxes(&admin).await?.is_empty());
    member
        .delete(&format!("/v1/templates/{second}"))
        .await?
        .ok(204)?;
    // Once its image is gone the space is free again: a build starts, and
    // its own busybox image (over a MiB) is what the snapshot refuses.
    let tiny = unique("tiny");
    member.post("/v1/templates", body(&tiny)).await?.ok(202)?;
    let t = built(&member, &tiny, 1).await?;
    ensure!(
        t["state"] == "failed"
            && t["failure"]
                .as_str()
                .is_some_and(|f| f.contains("max_volume_mb")),
        "{t}"
    );
    let images = admin.get("/v1/images").await?.ok(200)?;
    ensure!(
        !images["images"].as_array().is_some_and(|l| l
            .iter()
            .any(|i| i["name"].as_str().is_some_and(|n| n.contains(&tiny)))),
        "a build over max_volume_mb left its image: {images}"
    );
    member
        .delete(&format!("/v1/templates/{tiny}"))
        .await?
        .ok(204)?;
    Ok(())
}

/// The pool of `image` in `/v1/status`.
async fn pool_of(admin: &Api, image: &str) -> Result<Value> {
    let st = admin.get("/v1/status").await?.ok(200)?;
    st["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["image"] == image).cloned())
        .ok_or_else(|| anyhow::anyhow!("no pool of {image} in {st}"))
}

/// How many creates the pool of `image` has served (its claims counter).
async fn pool_claims(admin: &Api, image: &str) -> Result<u64> {
    let text = admin.get("/metrics").await?.text();
    let wanted = format!("image=\"{image}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("stacyvm_pool_claims_total{") && l.contains(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// The server's containers on the host that no sandbox row accounts for:
/// its warm-pool members.
async fn pool_containers(server: &Server, admin: &Api) -> Result<Vec<String>> {
    let instance = server
        .instance_id()
        .ok_or_else(|| anyhow::anyhow!("the server wrote no instance.id"))?;
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=dev.stacyvm.instance={instance}"),
            "--format",
            "{{.Label \"dev.stacyvm.sandbox\"}}",
        ])
        .output()?;
    ensure!(out.status.success(), "docker ps: {out:?}");
    let page = admin.get("/v1/sandboxes?limit=1000").await?.ok(200)?;
    let rows: Vec<String> = page["sandboxes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(id_of)
        .collect();
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|id| !rows.iter().any(|r| r == id))
        .map(str::to_owned)
        .collect())
}

/// Waits until the pool of `image` holds `n` ready members of `version`.
async fn pool_full(admin: &Api, image: &str, version: &str, n: u64) -> Result<()> {
    crate::support::eventually(
        Duration::from_secs(180),
        &format!("the pool of {image} to hold {n} of {version}"),
        || async {
            let p = pool_of(admin, image).await?;
            Ok((p["template"] == version && p["ready"].as_u64() == Some(n)).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_warm_pool_serves_started_ready_sandboxes_and_follows_new_versions() -> Result<()>
{
    let name = unique("warm");
    let image = format!("template/{name}");
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .local_worker()
            .arg("--request-timeout")
            .arg("30")
            .arg("--warm-pool")
            .arg(&format!("docker:{image}=2")),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    // No version yet: the pool waits, holding nothing.
    let p = pool_of(&admin, &image).await?;
    ensure!(p["ready"] == 0 && p["template"].is_null(), "{p}");

    // The operator's template: public, so every tenant's creates may take
    // its members. `ready` holds until `start` has written its mark.
    let version = |v: &str| {
        json!({"name": name, "from": "busybox", "memory_mb": 192,
            "steps": [{"write": {"path": "/v", "content": v}}],
            "env": {"KIND": "warm"}, "workdir": "/srv",
            "start": ["sh", "-c", "echo $KIND > /tmp/started; exec sleep 100000"],
            "ready": ["test", "-s", "/tmp/started"]})
    };
    admin.post("/v1/templates", version("one")).await?.ok(202)?;
    ensure!(built(&admin, &name, 1).await?["state"] == "ready");
    pool_full(&admin, &image, &format!("{name}:1"), 2).await?;
    ensure!(pool_containers(&server, &admin).await?.len() == 2);

    // A tenant's create is served from the pool, and is what a cold create
    // would be: the version recorded, its defaults, its start process
    // running (it wrote its mark) and ready.
    let claims = pool_claims(&admin, &image).await?;
    let s = member.create_sandbox(json!({"template": name})).await?;
    ensure!(
        pool_claims(&admin, &image).await? == claims + 1,
        "the create was not served from the pool"
    );
    ensure!(
        s["template"] == format!("{name}:1") && s["memory_mb"] == 192,
        "{s}"
    );
    let id = id_of(&s);
    let seen = member
        .sh(&id, "cat /v /tmp/started; echo $KIND; pwd")
        .await?;
    ensure!(seen == "onewarm\nwarm\n/srv\n", "{seen:?}");
    let procs = member
        .get(&format!("/v1/sandboxes/{id}/processes"))
        .await?
        .ok(200)?;
    ensure!(
        procs["processes"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["cmd"][0] == "sh" && p["state"] == "running")),
        "the start process does not run in the pooled sandbox: {procs}"
    );

    // A create that asks for more than the defaults starts cold.
    let claims = pool_claims(&admin, &image).await?;
    let cold = member
        .create_sandbox(json!({"template": name, "env": {"KIND": "cold"}}))
        .await?;
    ensure!(pool_claims(&admin, &image).await? == claims);
    ensure!(member.sh(&id_of(&cold), "cat /tmp/started").await? == "cold\n");
    member.destroy(&id_of(&cold)).await?;

    // A tenant with a template of the same name sees its own: never the
    // operator's members.
    let (_, shadow) = admin.tenant_with("member").await?;
    shadow
        .post(
            "/v1/templates",
            json!({"name": name, "from": "busybox",
            "steps": [{"write": {"path": "/v", "content": "mine"}}]}),
        )
        .await?
        .ok(202)?;
    ensure!(built(&shadow, &name, 1).await?["state"] == "ready");
    let claims = pool_claims(&admin, &image).await?;
    let own = shadow.create_sandbox(json!({"template": name})).await?;
    ensure!(pool_claims(&admin, &image).await? == claims);
    ensure!(shadow.sh(&id_of(&own), "cat /v").await? == "mine");
    shadow.destroy(&id_of(&own)).await?;

    // A new version replaces the pool's members; version 1 pinned still
    // starts (cold).
    admin.post("/v1/templates", version("two")).await?.ok(202)?;
    ensure!(built(&admin, &name, 2).await?["state"] == "ready");
    pool_full(&admin, &image, &format!("{name}:2"), 2).await?;
    crate::support::eventually(
        Duration::from_secs(60),
        "the version 1 members to go",
        || async { Ok((pool_containers(&server, &admin).await?.len() == 2).then_some(())) },
    )
    .await?;
    let claims = pool_claims(&admin, &image).await?;
    let s2 = member.create_sandbox(json!({"template": name})).await?;
    ensure!(pool_claims(&admin, &image).await? == claims + 1);
    ensure!(s2["template"] == format!("{name}:2"), "{s2}");
    ensure!(member.sh(&id_of(&s2), "cat /v /tmp/started").await? == "twowarm\n");
    let pinned = member
        .create_sandbox(json!({"template": format!("{name}:1")}))
        .await?;
    ensure!(pool_claims(&admin, &image).await? == claims + 1);
    ensure!(member.sh(&id_of(&pinned), "cat /v /tmp/started").await? == "onewarm\n");
    // The sandbox claimed from version 1 keeps running on it.
    ensure!(member.sh(&id, "cat /v").await? == "one");

    for s in [&s, &s2, &pinned] {
        member.destroy(&id_of(s)).await?;
    }
    // Deleting the template empties its pool.
    admin
        .delete(&format!("/v1/templates/{name}"))
        .await?
        .ok(204)?;
    crate::support::eventually(Duration::from_secs(60), "the pool to empty", || async {
        Ok((pool_containers(&server, &admin).await?.is_empty()).then_some(()))
    })
    .await?;
    let p = pool_of(&admin, &image).await?;
    ensure!(p["ready"] == 0 && p["template"].is_null(), "{p}");
    Ok(())
}
