//! The control plane's side of multi-worker mode over the API: worker
//! tokens, and the calls a remote worker makes (register, heartbeat), made
//! here by the test as a worker would, against a real server and store:
//! who may make them, what the store then says about the worker, a worker
//! that goes silent turning `down`, a revoked token, drain and undrain,
//! and `worker_labels` that no worker carries.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{eventually, random_hex, s, Api, Resp, Server, ServerOptions, StoreKind};

/// A worker as the test plays it: an id, a token and what it reports.
struct FakeWorker {
    id: String,
    api: Api,
}

impl FakeWorker {
    fn new(server: &Server, token: &str) -> FakeWorker {
        FakeWorker {
            id: format!("wrk_{}", random_hex(32)),
            api: server.anonymous().with_key(token),
        }
    }

    fn body(&self, labels: Value) -> Value {
        json!({
            "id": self.id,
            "name": "gpu-1",
            "address": "http://127.0.0.1:1",
            "providers": [{"name": "docker", "healthy": true, "detail": "docker 24"}],
            "labels": labels,
            "capacity": {"sandboxes": 4, "cpu": 8.0, "memory_mb": 8192},
        })
    }

    async fn register(&self, labels: Value) -> Result<Value> {
        self.api
            .post("/v1/workers/register", self.body(labels))
            .await?
            .ok(200)
    }

    async fn heartbeat(&self) -> Result<Resp> {
        self.api
            .post(
                &format!("/v1/workers/{}/heartbeat", self.id),
                json!({
                    "providers": [{"name": "docker", "healthy": true, "detail": "docker 24"}],
                    "runtimes": [],
                    "ready": true,
                }),
            )
            .await
    }
}

async fn worker_state(admin: &Api, id: &str) -> Result<String> {
    let w = admin.get(&format!("/v1/workers/{id}")).await?.ok(200)?;
    Ok(s(&w, "state")?.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_tokens_are_shown_once_and_for_operators_only() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    let (_, member) = admin.tenant_with("member").await?;

    member
        .post("/v1/workers/tokens", json!({"name": "edge"}))
        .await?
        .err(403, "forbidden")?;
    member
        .get("/v1/workers/tokens")
        .await?
        .err(403, "forbidden")?;
    admin
        .post("/v1/workers/tokens", json!({"name": ""}))
        .await?
        .err(400, "invalid_request")?;

    let made = admin
        .post("/v1/workers/tokens", json!({"name": "edge"}))
        .await?
        .ok(201)?;
    let id = s(&made, "id")?.to_owned();
    ensure!(id.starts_with("wtk_"), "{made}");
    ensure!(s(&made, "token")?.starts_with("svmw_"), "{made}");
    ensure!(
        made["name"] == "edge" && made["revoked_at"].is_null(),
        "{made}"
    );

    let list = admin.get("/v1/workers/tokens").await?.ok(200)?;
    let tokens = list["tokens"].as_array().context("tokens")?;
    ensure!(tokens.iter().any(|t| t["id"] == id.as_str()), "{list}");
    ensure!(
        tokens
            .iter()
            .all(|t| t.get("token").is_none_or(Value::is_null)),
        "a listed token shows its secret: {list}"
    );
    // The secret is stored as a hash only.
    let db = server.data_dir().join("stacyvm.db");
    let dump = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(".dump worker_tokens")
        .output()
        .context("running sqlite3")?;
    ensure!(dump.status.success(), "sqlite3 failed");
    ensure!(
        !String::from_utf8_lossy(&dump.stdout).contains(s(&made, "token")?),
        "the store holds the token's secret"
    );

    admin
        .delete(&format!("/v1/workers/tokens/{id}"))
        .await?
        .ok(204)?;
    admin
        .delete("/v1/workers/tokens/wtk_00000000000000000000")
        .await?
        .err(404, "not_found")?;
    let list = admin.get("/v1/workers/tokens").await?.ok(200)?;
    ensure!(
        list["tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["id"] == id.as_str() && t["revoked_at"].is_string()),
        "{list}"
    );
    let audit = admin.audit("action=worker_token.create").await?;
    ensure!(
        audit.iter().any(|e| e["target"] == id.as_str()),
        "{audit:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_register_heartbeat_go_down_when_silent_and_are_refused_once_revoked() -> Result<()>
{
    // A short lease TTL: the silent worker is down within seconds.
    let server = Server::start(
        ServerOptions::new(StoreKind::Postgres)
            .providers("proot")
            .arg("--lease-ttl")
            .arg("2"),
    )?;
    let admin = server.admin();
    let token = admin
        .post("/v1/workers/tokens", json!({"name": "pool-a"}))
        .await?
        .ok(201)?;
    let secret = s(&token, "token")?.to_owned();
    let worker = FakeWorker::new(&server, &secret);

    // No token, an API key, a made-up token: all refused alike.
    let body = worker.body(json!({"gpu": "a100"}));
    server
        .anonymous()
        .post("/v1/workers/register", body.clone())
        .await?
        .err(401, "unauthenticated")?;
    admin
        .post("/v1/workers/register", body.clone())
        .await?
        .err(401, "unauthenticated")?;
    server
        .anonymous()
        .with_key("svmw_not-a-token")
        .post("/v1/workers/register", body.clone())
        .await?
        .err(401, "unauthenticated")?;
    // Bad reports are 400s.
    for (field, value) in [
        ("id", json!("not-an-id")),
        ("address", json!("ftp://example")),
        ("capacity", json!({"sandboxes": 0})),
        ("labels", json!({"bad key!": "x"})),
    ] {
        let mut b = body.clone();
        b[field] = value;
        worker
            .api
            .post("/v1/workers/register", b)
            .await?
            .err(400, "invalid_request")
            .with_context(|| format!("a bad {field}"))?;
    }

    let reg = worker.register(json!({"gpu": "a100"})).await?;
    ensure!(reg["id"] == worker.id.as_str(), "{reg}");
    ensure!(s(&reg, "secret")?.len() >= 32, "{reg}");
    ensure!(
        reg["lease_ttl_ms"] == 2000 && reg["heartbeat_interval_ms"].as_u64() < Some(2000),
        "{reg}"
    );
    ensure!(reg["leases"] == json!([]), "{reg}");
    // Down until a heartbeat says it is ready.
    ensure!(worker_state(&admin, &worker.id).await? == "down");
    let hb = worker.heartbeat().await?.ok(200)?;
    ensure!(hb["state"] == "ready" && hb["refused"] == json!([]), "{hb}");
    let w = admin
        .get(&format!("/v1/workers/{}", worker.id))
        .await?
        .ok(200)?;
    ensure!(
        w["name"] == "gpu-1"
            && w["labels"] == json!({"gpu": "a100"})
            && w["capacity"] == json!({"sandboxes": 4, "cpu": 8.0, "memory_mb": 8192})
            && w["providers"]
                == json!([{"name": "docker", "healthy": true, "detail": "docker 24",
                            "certified": null, "certified_at": null}])
            && w["sandboxes"] == 0,
        "{w}"
    );
    let st = admin.get("/v1/status").await?.ok(200)?;
    ensure!(st["mode"] == "multi-worker", "{st}");

    // A report of a sandbox it holds no lease on is refused (and audited).
    let hb = worker
        .api
        .post(
            &format!("/v1/workers/{}/heartbeat", worker.id),
            json!({
                "providers": [{"name": "docker", "healthy": true, "detail": ""}],
                "runtimes": [{"sandbox_id": "sbx_0123456789abcdef0123", "provider": "docker",
                              "fencing_token": 3, "state": "running"}],
                "ready": true,
            }),
        )
        .await?
        .ok(200)?;
    ensure!(
        hb["refused"][0]["sandbox_id"] == "sbx_0123456789abcdef0123",
        "{hb}"
    );
    let beats = admin.audit("action=worker.heartbeat").await?;
    ensure!(
        beats.len() == 1,
        "only the heartbeat with a refusal is audited: {beats:?}"
    );
    ensure!(
        !admin.audit("action=worker.register").await?.is_empty(),
        "registration is audited"
    );

    // Drain and undrain.
    let w = admin
        .post(&format!("/v1/workers/{}/drain", worker.id), json!({}))
        .await?
        .ok(200)?;
    ensure!(w["state"] == "draining", "{w}");
    // A drain outlives re-registration and heartbeats.
    worker.register(json!({"gpu": "a100"})).await?;
    worker.heartbeat().await?.ok(200)?;
    ensure!(worker_state(&admin, &worker.id).await? == "draining");
    let w = admin
        .post(&format!("/v1/workers/{}/undrain", worker.id), json!({}))
        .await?
        .ok(200)?;
    ensure!(w["state"] == "ready", "{w}");

    // Silent past the lease TTL: down. A heartbeat brings it back.
    eventually(
        Duration::from_secs(60),
        "the silent worker to be down",
        || {
            let admin = &admin;
            let id = &worker.id;
            async move { Ok((worker_state(admin, id).await? == "down").then_some(())) }
        },
    )
    .await?;
    worker.heartbeat().await?.ok(200)?;
    ensure!(worker_state(&admin, &worker.id).await? == "ready");
    admin
        .post(
            &format!("/v1/workers/{}/undrain", "wrk_00000000000000000000"),
            json!({}),
        )
        .await?
        .err(404, "not_found")?;

    // Another token cannot take over the id, nor heartbeat for it.
    let other = admin
        .post("/v1/workers/tokens", json!({"name": "pool-b"}))
        .await?
        .ok(201)?;
    let intruder = FakeWorker {
        id: worker.id.clone(),
        api: server.anonymous().with_key(s(&other, "token")?),
    };
    intruder
        .api
        .post("/v1/workers/register", worker.body(json!({})))
        .await?
        .err(409, "conflict")?;
    intruder.heartbeat().await?.err(403, "forbidden")?;
    // An unknown worker is told so: it registers again.
    FakeWorker {
        id: "wrk_00000000000000000000".into(),
        api: worker.api.clone(),
    }
    .heartbeat()
    .await?
    .err(404, "not_found")?;

    // Revoked: refused from the next call on, and down at once.
    admin
        .delete(&format!("/v1/workers/tokens/{}", s(&token, "id")?))
        .await?
        .ok(204)?;
    ensure!(worker_state(&admin, &worker.id).await? == "down");
    worker.heartbeat().await?.err(401, "unauthenticated")?;
    worker
        .api
        .post("/v1/workers/register", worker.body(json!({})))
        .await?
        .err(401, "unauthenticated")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_labels_no_worker_carries_are_a_503_naming_them() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let r = admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot", "worker_labels": {"gpu": "h100"}}),
        )
        .await?;
    let e = r.err(503, "no_capacity")?;
    ensure!(e.message.contains("gpu=h100"), "{}", e.message);
    admin
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": "proot", "worker_labels": {"bad key!": "x"}}),
        )
        .await?
        .err(400, "invalid_request")?;
    // The in-process worker has no labels; without any the create works.
    let sbx = admin
        .create_sandbox(json!({"image": "busybox", "provider": "proot", "worker_labels": {}}))
        .await?;
    admin.destroy(s(&sbx, "id")?).await?;
    Ok(())
}
