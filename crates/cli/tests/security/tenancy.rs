//! Who may do what: the `owner` role and every cross-tenant refusal it
//! meets, `admin` keys only on the operator's own tenant, the providers a
//! tenant may use (PRoot only where the operator allows it, never chosen
//! automatically), the default quota of a new tenant, and the caps on
//! commands running at once.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{s, Api, Server, ServerOptions, StoreKind};

async fn server(opts: ServerOptions) -> Result<(Server, Api)> {
    let server = Server::start(opts)?;
    let admin = server.admin();
    admin.import_busybox().await?;
    Ok((server, admin))
}

/// The operator's own tenant: the bootstrap admin key's.
async fn system_tenant(admin: &Api) -> Result<String> {
    let keys = admin.get("/v1/keys").await?.ok(200)?;
    let boot = keys["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["name"] == "bootstrap-admin"))
        .context("the bootstrap key is listed")?;
    Ok(s(boot, "tenant_id")?.to_owned())
}

fn ids(list: &Value, field: &str, key: &str) -> Vec<String> {
    list[field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v[key].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_keys_are_minted_only_on_the_operators_tenant() -> Result<()> {
    let (_server, admin) =
        server(ServerOptions::new(StoreKind::Sqlite).providers("docker")).await?;
    let t = admin.tenant("acme").await?;
    let r = admin
        .post(
            "/v1/keys",
            json!({"tenant_id": t, "role": "admin", "name": "looks-scoped"}),
        )
        .await?;
    let e = r.err(400, "invalid_request")?;
    ensure!(
        e.message.contains("owner"),
        "the refusal names owner: {}",
        e.message
    );
    // On the operator's own tenant an admin key is fine.
    let system = system_tenant(&admin).await?;
    admin
        .post(
            "/v1/keys",
            json!({"tenant_id": system, "role": "admin", "name": "second-operator"}),
        )
        .await?
        .ok(201)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_manages_its_own_tenant_and_never_sees_another() -> Result<()> {
    let (_server, admin) =
        server(ServerOptions::new(StoreKind::Sqlite).providers("docker")).await?;
    let (mine, owner) = {
        let t = admin.tenant("mine").await?;
        let (_, owner) = admin.key(&t, "owner").await?;
        (t, owner)
    };
    let theirs = admin.tenant("theirs").await?;
    let (their_key_id, their_member) = admin.key(&theirs, "member").await?;
    let their_sandbox = their_member.sandbox("docker").await?;

    // Its own tenant's keys: owner, member and viewer; never admin.
    for role in ["owner", "member", "viewer"] {
        owner
            .post(
                "/v1/keys",
                json!({"tenant_id": mine, "role": role, "name": format!("by-owner-{role}")}),
            )
            .await?
            .ok(201)?;
    }
    owner
        .post(
            "/v1/keys",
            json!({"tenant_id": mine, "role": "admin", "name": "escalate"}),
        )
        .await?
        .err(403, "forbidden")?;
    // Another tenant does not exist for it.
    owner
        .post(
            "/v1/keys",
            json!({"tenant_id": theirs, "role": "member", "name": "intrude"}),
        )
        .await?
        .err(404, "not_found")?;
    owner
        .delete(&format!("/v1/keys/{their_key_id}"))
        .await?
        .err(404, "not_found")?;
    owner
        .get(&format!("/v1/tenants/{theirs}/quota"))
        .await?
        .err(404, "not_found")?;
    owner
        .get(&format!("/v1/sandboxes/{their_sandbox}"))
        .await?
        .err(404, "not_found")?;
    owner
        .post(
            &format!("/v1/sandboxes/{their_sandbox}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await?
        .err(404, "not_found")?;
    owner
        .delete(&format!("/v1/sandboxes/{their_sandbox}"))
        .await?
        .err(404, "not_found")?;

    // Lists hold its own tenant only.
    let keys = owner.get("/v1/keys").await?.ok(200)?;
    let tenants_of_keys: Vec<String> = ids(&keys, "keys", "tenant_id");
    ensure!(
        !tenants_of_keys.is_empty() && tenants_of_keys.iter().all(|t| *t == mine),
        "an owner lists other tenants' keys: {keys}"
    );
    let tenants = owner.get("/v1/tenants").await?.ok(200)?;
    ensure!(
        ids(&tenants, "tenants", "id") == [mine.clone()],
        "{tenants}"
    );
    let mine_sandbox = owner.sandbox("docker").await?;
    let sandboxes = owner.get("/v1/sandboxes").await?.ok(200)?;
    ensure!(
        ids(&sandboxes, "sandboxes", "id") == [mine_sandbox.clone()],
        "{sandboxes}"
    );
    let audit = owner.audit("").await?;
    ensure!(
        !audit.is_empty() && audit.iter().all(|e| e["tenant_id"] == mine.as_str()),
        "an owner reads another tenant's audit"
    );

    // Its quota it may see, not change; tenants it may not make.
    owner
        .get(&format!("/v1/tenants/{mine}/quota"))
        .await?
        .ok(200)?;
    owner
        .put(
            &format!("/v1/tenants/{mine}/quota"),
            json!({"max_sandboxes": 1000}),
        )
        .await?
        .err(403, "forbidden")?;
    owner
        .post("/v1/tenants", json!({"name": "another"}))
        .await?
        .err(403, "forbidden")?;

    // Revoking its own tenant's key works, and the key is refused after.
    let (kid, member) = admin.key(&mine, "member").await?;
    member.get("/v1/sandboxes").await?.ok(200)?;
    owner.delete(&format!("/v1/keys/{kid}")).await?.ok(204)?;
    member
        .get("/v1/sandboxes")
        .await?
        .err(401, "unauthenticated")?;

    // Members and viewers manage no keys.
    let (_, viewer) = admin.key(&mine, "viewer").await?;
    for who in [&their_member, &viewer] {
        who.post(
            "/v1/keys",
            json!({"tenant_id": mine, "role": "viewer", "name": "nope"}),
        )
        .await?
        .err(403, "forbidden")?;
    }
    // Every refusal above is in the audit log for the operator.
    let denied = admin.audit("outcome=denied").await?;
    ensure!(
        denied
            .iter()
            .any(|e| e["action"] == "key.create" && e["status"] == 403),
        "refusals are audited"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_is_only_for_tenants_the_operator_allows_and_never_automatic() -> Result<()> {
    let (_server, admin) = server(ServerOptions::new(StoreKind::Sqlite)).await?;
    // Made by hand: the suite's `tenant` helper lifts the defaults.
    let t = admin
        .post("/v1/tenants", json!({"name": "defaults"}))
        .await?
        .ok(201)?;
    let tenant = s(&t, "id")?.to_owned();
    let (_, member) = admin.key(&tenant, "member").await?;

    // A new tenant starts with the default quota, without PRoot.
    let quota = admin
        .get(&format!("/v1/tenants/{tenant}/quota"))
        .await?
        .ok(200)?;
    ensure!(
        quota["max_sandboxes"] == 10
            && quota["max_cpu"] == 8.0
            && quota["max_memory_mb"] == 16384
            && quota["max_concurrent_execs"] == 100
            && quota["max_volumes"] == 10
            && quota["max_volume_mb"] == 10240
            && quota["allowed_providers"].is_null(),
        "the default quota of a new tenant: {quota}"
    );
    let r = member
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot"}),
        )
        .await?;
    let e = r.err(403, "forbidden")?;
    ensure!(e.message.contains("proot"), "{}", e.message);
    // Without a provider it lands on Docker.
    let sbx = member.create_sandbox(json!({"image": "busybox"})).await?;
    ensure!(sbx["provider"] == "docker", "{sbx}");

    // Naming a provider the server does not run is refused.
    let mut q = quota.clone();
    q["allowed_providers"] = json!(["docker", "qemu"]);
    admin
        .put(&format!("/v1/tenants/{tenant}/quota"), q.clone())
        .await?
        .err(400, "invalid_request")?;
    // Once the operator allows it, the tenant may name it.
    q["allowed_providers"] = json!(["docker", "proot"]);
    admin
        .put(&format!("/v1/tenants/{tenant}/quota"), q)
        .await?
        .ok(200)?;
    let sbx = member
        .create_sandbox(json!({"image": "busybox", "provider": "proot"}))
        .await?;
    ensure!(sbx["provider"] == "proot", "{sbx}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_is_no_fallback_when_docker_is_down() -> Result<()> {
    let (_server, admin) = server(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,proot")
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
    )
    .await?;
    // Not even for the operator: a create that names no provider never
    // lands on PRoot.
    let e = admin
        .post("/v1/sandboxes", json!({"image": "busybox"}))
        .await?
        .err(503, "provider_unavailable")?;
    ensure!(
        e.message.contains("proot is never chosen automatically"),
        "{}",
        e.message
    );
    // Named, the operator's own tenant may use it.
    let sbx = admin
        .create_sandbox(json!({"image": "busybox", "provider": "proot"}))
        .await?;
    ensure!(sbx["provider"] == "proot", "{sbx}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_runs_only_isolating_providers_by_default() -> Result<()> {
    let (_server, admin) =
        server(ServerOptions::new(StoreKind::Sqlite).server_default_providers()).await?;
    let status = admin.get("/v1/status").await?.ok(200)?;
    let names = ids(&status, "providers", "name");
    ensure!(
        names == ["docker", "namespaces"],
        "default providers: {status}"
    );
    admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot"}),
        )
        .await?
        .err(400, "invalid_request")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_running_at_once_are_capped_per_sandbox_and_tenant() -> Result<()> {
    let (_server, admin) = server(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .arg("--max-execs-per-sandbox")
            .arg("2"),
    )
    .await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let a = member.sandbox("docker").await?;
    let b = member.sandbox("docker").await?;
    let sleeper = json!({"cmd": ["sh", "-c", "echo started; sleep 30"], "timeout_s": 60});

    // Two streams hold sandbox a's two slots until they end.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = member
            .exec_stream(&a, sleeper.clone())
            .await?
            .map_err(|r| anyhow::anyhow!("a stream was refused: {} {}", r.status, r.text()))?;
        let first = stream.next_event().await?.context("a first event")?;
        ensure!(first.event == "stdout", "{first:?}");
        held.push(stream);
    }
    let r = member
        .post(&format!("/v1/sandboxes/{a}/exec"), json!({"cmd": ["true"]}))
        .await?;
    r.err(429, "rate_limited")?;
    ensure!(r.header("retry-after").is_some(), "429 says when to retry");
    // Another sandbox of the tenant is not affected.
    member.sh(&b, "true").await?;
    // A finished (dropped) stream frees its slot.
    drop(held.pop());
    crate::support::eventually(Duration::from_secs(30), "a slot to come free", || {
        let member = &member;
        let a = &a;
        async move {
            let r = member
                .post(&format!("/v1/sandboxes/{a}/exec"), json!({"cmd": ["true"]}))
                .await?;
            Ok((r.status == 200).then_some(()))
        }
    })
    .await?;
    drop(held);

    // The tenant's quota caps its commands across sandboxes.
    let mut q = admin
        .get(&format!("/v1/tenants/{tenant}/quota"))
        .await?
        .ok(200)?;
    q["max_concurrent_execs"] = json!(1);
    admin
        .put(&format!("/v1/tenants/{tenant}/quota"), q)
        .await?
        .ok(200)?;
    let mut one = member
        .exec_stream(&a, sleeper.clone())
        .await?
        .map_err(|r| anyhow::anyhow!("a stream was refused: {} {}", r.status, r.text()))?;
    one.next_event().await?.context("a first event")?;
    member
        .post(&format!("/v1/sandboxes/{b}/exec"), json!({"cmd": ["true"]}))
        .await?
        .err(429, "quota_exceeded")?;
    drop(one);
    Ok(())
}

#[test]
fn a_short_admin_key_is_refused_at_start() -> Result<()> {
    let err = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .env("STACYVM_ADMIN_KEY", "svm_only-twenty-characters"),
    )
    .err()
    .context("a server started with a 20-character admin key")?;
    ensure!(
        format!("{err:#}").contains("at least 32"),
        "the refusal says how long: {err:#}"
    );
    Ok(())
}

#[test]
fn the_data_dir_is_the_servers_alone() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir()?;
    // An existing data dir others could read is narrowed to 0700.
    let dir = parent.path().join("data");
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .data_dir(&dir),
    )?;
    let mode = std::fs::metadata(&dir)?.permissions().mode() & 0o7777;
    ensure!(mode == 0o700, "the data dir's mode is {mode:o}");
    drop(server);
    // A shared directory (sticky, like /tmp) is refused.
    let shared = parent.path().join("shared");
    std::fs::create_dir(&shared)?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777))?;
    let err = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker")
            .data_dir(&shared),
    )
    .err()
    .context("a server started on a shared directory")?;
    ensure!(
        format!("{err:#}").contains("directory of its own"),
        "{err:#}"
    );
    Ok(())
}
