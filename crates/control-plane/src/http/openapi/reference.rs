//! Completes the generated OpenAPI document into a reference a person can
//! use: the error answers every call can give (with the contract's codes),
//! a description on every response, and an example of each JSON body.
//! The handlers' annotations carry what is particular to one call; what is
//! common to many is written once here.

use serde_json::{json, Map, Value};

/// Each error status: what it means, and the code of its example body.
const ERRORS: &[(&str, &str, &str)] = &[
    ("400", "invalid_request", "Malformed JSON, a missing or out-of-range field, a relative path or a NUL byte (`invalid_request`)."),
    ("401", "unauthenticated", "No key, an unknown key or a revoked key (`unauthenticated`)."),
    ("403", "forbidden", "The key's role may not make this call (`forbidden`)."),
    ("404", "not_found", "No such object for this tenant (`not_found`); another tenant's object is 404, never 403."),
    ("409", "conflict", "The object's state does not allow it, e.g. the sandbox is not running (`conflict`), or its provider cannot do this (`unsupported`)."),
    ("413", "payload_too_large", "The body is over the configured limit (`payload_too_large`)."),
    ("422", "image_not_found", "The image or template cannot be resolved (`image_not_found`)."),
    ("429", "rate_limited", "The tenant's quota would be exceeded (`quota_exceeded`), or too many requests (`rate_limited`; `Retry-After` says when to retry)."),
    ("500", "internal", "A bug (`internal`): the message holds no internals; the server log has them under the request id."),
    ("503", "store_unavailable", "No worker or provider can take it now (`no_capacity`, `provider_unavailable`), or the store is unreachable (`store_unavailable`)."),
    ("504", "timeout", "The call did not finish in time (`timeout`)."),
    ("502", "provider_unavailable", "Nothing listens on the sandbox's port, or it did not answer HTTP (`provider_unavailable`)."),
];

/// Admin-only reads: the other reads are open to every role of the tenant.
const ADMIN_READS: &[&str] = &["/v1/workers", "/v1/workers/{id}", "/v1/workers/tokens"];

/// The calls `stacyvm worker` makes with its worker token.
const WORKER_CALLS: &[&str] = &[
    "/v1/workers/register",
    "/v1/workers/{id}/heartbeat",
    "/v1/workers/{id}/images/{name}",
];

/// What `POST /v1/sandboxes/{id}/exec/stream` sends for `echo hi; echo oops >&2`.
const EXEC_STREAM_EXAMPLE: &str = "event: stdout\ndata: {\"data\":\"hi\\n\"}\n\n\
    event: stderr\ndata: {\"data\":\"oops\\n\"}\n\n\
    event: exit\ndata: {\"exit_code\":0,\"signal\":null,\"duration_ms\":3,\"timed_out\":false}\n\n";

/// One event of the exec stream: its name, and its data, a JSON object as
/// text (`{"data"}` for output, the exit status for `exit`, `{"code",
/// "message"}` for `error`).
fn sse_event_schema() -> Value {
    json!({
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": ["stdout", "stderr", "exit", "error"]},
            "data": {"type": "string", "description": "a JSON object"}
        }
    })
}

pub fn complete(doc: &mut Value) {
    let examples = body_examples();
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            describe_parameters(path, op);
            let statuses = error_statuses(path, method, op);
            let stream =
                op.get("operationId").and_then(Value::as_str) == Some("sandbox_exec_stream");
            let responses = op
                .entry("responses")
                .or_insert_with(|| Value::Object(Map::new()));
            let Some(responses) = responses.as_object_mut() else {
                continue;
            };
            for status in statuses {
                responses.entry(status).or_insert_with(|| {
                    json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
                });
            }
            for (status, resp) in responses.iter_mut() {
                complete_response(status, resp, &examples);
            }
            if stream {
                if let Some(ok) = responses.get_mut("200").and_then(Value::as_object_mut) {
                    ok.entry("content").or_insert_with(|| {
                        json!({"text/event-stream": {"schema": sse_event_schema(), "example": EXEC_STREAM_EXAMPLE}})
                    });
                }
            }
            if let Some(media) = op
                .get_mut("requestBody")
                .and_then(|b| b.pointer_mut("/content/application~1json"))
            {
                add_example(media, &examples);
            }
        }
    }
}

/// Gives the parameters the annotations leave bare (path ids, paging) a
/// description.
fn describe_parameters(path: &str, op: &mut Map<String, Value>) {
    let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
        return;
    };
    for p in params.iter_mut().filter_map(Value::as_object_mut) {
        if p.get("description")
            .and_then(Value::as_str)
            .is_some_and(|d| !d.is_empty())
        {
            continue;
        }
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        let text = match (name, path) {
            ("id", p) if p.starts_with("/v1/sandboxes/") => "The sandbox's id (`sbx_…`).",
            ("pid", _) => "The background process's id inside the sandbox.",
            ("id", p) if p.starts_with("/v1/tenants/") => "The tenant's id (`tnt_…`).",
            ("id", p) if p.starts_with("/v1/keys/") => "The key's id (`key_…`).",
            ("id", p) if p.starts_with("/v1/workers/tokens/") => "The worker token's id (`wtk_…`).",
            ("id", p) if p.starts_with("/v1/workers/") => "The worker's id (`wrk_…`).",
            ("name", p) if p.contains("/images") => "The image's name in the catalog.",
            ("name", p) if p.starts_with("/v1/volumes/") => {
                "The volume's name in the caller's tenant."
            }
            ("name", p) if p.starts_with("/v1/templates/") => {
                "The template's name: the caller's tenant's, else the operator's."
            }
            ("cursor", _) => "The `next_cursor` of the previous page; absent for the first page.",
            ("limit", _) => "At most this many items (1 to 1000; default 100).",
            _ => continue,
        };
        p.insert("description".into(), Value::String(text.to_owned()));
    }
}

/// The error answers a call can give besides those its annotation names.
fn error_statuses(path: &str, method: &str, op: &Map<String, Value>) -> Vec<&'static str> {
    let public = op
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| s.iter().all(|r| r.as_object().is_some_and(Map::is_empty)));
    let takes_input = op.contains_key("requestBody")
        || op
            .get("parameters")
            .and_then(Value::as_array)
            .is_some_and(|ps| ps.iter().any(|p| p["in"] != "path"));
    let v1 = path.starts_with("/v1/");
    let mut out = Vec::new();
    if takes_input {
        out.push("400");
    }
    if !public {
        out.push("401");
    }
    if v1
        && !WORKER_CALLS.contains(&path)
        && path != "/v1/whoami"
        && (method != "get" || ADMIN_READS.contains(&path))
    {
        out.push("403");
    }
    if path.contains('{') {
        out.push("404");
    }
    if path.starts_with("/v1/sandboxes/{id}/")
        || (path.starts_with("/v1/volumes") && method != "get")
        || (path == "/v1/templates" && method == "post")
    {
        out.push("409");
    }
    if !public {
        out.push("429");
    }
    out.push("500");
    if v1 {
        out.push("503");
        out.push("504");
    }
    out
}

fn complete_response(status: &str, resp: &mut Value, examples: &Map<String, Value>) {
    let Some(resp) = resp.as_object_mut() else {
        return;
    };
    let error = ERRORS.iter().find(|(s, _, _)| *s == status);
    let described = resp
        .get("description")
        .and_then(Value::as_str)
        .is_some_and(|d| !d.is_empty());
    if !described {
        let text = match (error, status) {
            (Some((_, _, meaning)), _) => (*meaning).to_owned(),
            (None, "204") => "Done; no body.".to_owned(),
            (None, "201") => "Created.".to_owned(),
            (None, _) => "Success.".to_owned(),
        };
        resp.insert("description".into(), Value::String(text));
    }
    let Some(content) = resp.get_mut("content").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(media) = content.get_mut("application/json") {
        match error {
            Some((_, code, meaning)) => {
                if media.get("example").is_none() {
                    if let Some(m) = media.as_object_mut() {
                        m.insert("example".into(), error_example(code, meaning));
                    }
                }
            }
            None => add_example(media, examples),
        }
    }
}

fn error_example(code: &str, meaning: &str) -> Value {
    let message = meaning.split(" (`").next().unwrap_or(meaning);
    json!({"error": {"code": code, "message": message, "request_id": "req_01J9ZB6T3M4N5P6Q7R8S9T0V1W"}})
}

/// Sets the example of a JSON media type from its schema's name.
fn add_example(media: &mut Value, examples: &Map<String, Value>) {
    let Some(m) = media.as_object_mut() else {
        return;
    };
    if m.contains_key("example") {
        return;
    }
    let name = m
        .get("schema")
        .and_then(|s| s.get("$ref"))
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/components/schemas/"));
    if let Some(example) = name.and_then(|n| examples.get(n)) {
        m.insert("example".into(), example.clone());
    }
}

/// One realistic value of each body schema, by schema name.
fn body_examples() -> Map<String, Value> {
    let template = json!({"name": "py", "version": 3, "state": "ready",
        "image": "template/tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9/py:3", "failure": null,
        "created_at": "2026-12-04T14:00:00Z", "built_at": "2026-12-04T14:01:10Z",
        "tenant_id": "tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9", "from": "debian", "cpu": null,
        "memory_mb": 1024, "env": {"PYTHONUNBUFFERED": "1"}, "workdir": "/app",
        "start": ["python3", "-m", "http.server", "8000"],
        "ready": ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/"]});
    let volume = json!({
        "id": "vol_01J9ZC2D3E4F5G6H7J8K9M0N1P", "tenant_id": "tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9",
        "name": "cache", "size_mb": 1024, "created_at": "2026-05-04T10:00:00Z"});
    let sandbox = json!({
        "id": "sbx_01J9ZB5Q8W2X3Y4Z5A6B7C8D9E", "tenant_id": "tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9",
        "state": "running", "provider": "docker", "worker_id": "wrk_01J9Z9N1A2B3C4D5E6F7G8H9J0",
        "image": "busybox", "template": null, "cpu": 1.0, "memory_mb": 512, "network": "none",
        "labels": {"team": "web"}, "timeout_s": 300, "workdir": null,
        "created_at": "2026-12-04T15:00:00Z", "started_at": "2026-12-04T15:00:01Z",
        "expires_at": "2026-12-04T15:05:00Z", "destroyed_at": null, "failure": null
    });
    let entry = json!({"path": "/work/a.py", "name": "a.py", "type": "file", "size": 120,
        "mode": "0644", "mtime": "2026-12-04T15:01:00Z", "symlink_target": null});
    let quota = json!({"max_sandboxes": 20, "max_cpu": 16.0, "max_memory_mb": 32768,
        "max_timeout_s": 86400, "max_exec_per_minute": 600, "max_concurrent_execs": null,
        "allowed_providers": null, "max_volumes": 10, "max_volume_mb": 10240,
        "max_templates": 20});
    let provider = json!({"name": "docker", "healthy": true, "detail": "docker 26.1.5"});
    let provider_b = provider.clone();
    let lease = json!({"sandbox_id": "sbx_01J9ZB5Q8W2X3Y4Z5A6B7C8D9E", "provider": "docker",
        "fencing_token": 7});
    let worker = json!({"id": "wrk_01J9Z9N1A2B3C4D5E6F7G8H9J0", "name": "host-a", "state": "ready",
        "address": "http://10.0.0.5:7071", "providers": [provider.clone()], "labels": {"zone": "a"},
        "capacity": {"sandboxes": 100, "cpu": 16.0, "memory_mb": 65536}, "sandboxes": 3,
        "last_heartbeat": "2026-12-04T15:00:00Z"});
    let key = json!({"id": "key_01J9ZA1B2C3D4E5F6G7H8J9K0M", "tenant_id": "tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9",
        "role": "member", "name": "ci", "created_at": "2026-12-04T14:00:00Z", "revoked_at": null});
    let mut key_created = key.clone();
    key_created["key"] = json!("svm_3kQ9v…shown-once…");
    let tenant = json!({"id": "tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9", "name": "web",
        "quota": quota.clone(), "created_at": "2026-12-04T14:00:00Z"});
    let image = json!({"name": "busybox", "size": 2_232_320, "digest": "sha256:5b0e…",
        "created_at": "2026-12-04T14:00:00Z"});
    let token = json!({"id": "wtk_01J9ZA9X8Y7Z6A5B4C3D2E1F0G", "name": "host-a",
        "created_at": "2026-12-04T14:00:00Z", "revoked_at": null});
    let mut token_created = token.clone();
    token_created["token"] = json!("svmw_7Hc2…shown-once…");
    let event = json!({"id": "evt_01J9ZB5R1S2T3U4V5W6X7Y8Z9A", "ts": "2026-12-04T15:00:01Z",
        "tenant_id": "tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9",
        "actor": {"key_id": "key_01J9ZA1B2C3D4E5F6G7H8J9K0M", "role": "member"},
        "action": "sandbox.create", "target": "sbx_01J9ZB5Q8W2X3Y4Z5A6B7C8D9E",
        "sandbox_id": "sbx_01J9ZB5Q8W2X3Y4Z5A6B7C8D9E", "outcome": "ok", "status": 201,
        "request_id": "req_01J9ZB5Q7M4N5P6Q7R8S9T0V1W", "source_ip": "10.0.0.9",
        "detail": {"image": "busybox", "provider": "docker"}});
    let exposed = json!({"port": 8080, "public": false,
        "url": "/v1/sandboxes/sbx_01J9ZB5Q8W2X3Y4Z5A6B7C8D9E/ports/8080/"});
    let mut m = Map::new();
    for (name, value) in [
        ("Sandbox", sandbox.clone()),
        (
            "SandboxList",
            json!({"sandboxes": [sandbox], "next_cursor": null}),
        ),
        (
            "CreateSandbox",
            json!({"image": "busybox", "timeout_s": 600, "cpu": 1.0, "memory_mb": 512,
            "env": {"LANG": "C.UTF-8"}, "labels": {"team": "web"}, "workdir": "/work", "network": "none"}),
        ),
        ("SetTimeout", json!({"timeout_s": 900})),
        (
            "ProcessStart",
            json!({"cmd": ["python3", "-m", "http.server", "8000"], "env": {"DEBUG": "1"}, "cwd": "/work"}),
        ),
        (
            "Process",
            json!({"pid": 12, "cmd": ["python3", "-m", "http.server", "8000"], "cwd": "/work",
            "state": "running", "exit_code": null, "signal": null,
            "started_at": "2026-12-04T15:00:01.250Z", "ended_at": null, "stdin_open": true,
            "truncated": false, "stdout_dropped": 0, "stderr_dropped": 0}),
        ),
        (
            "ProcessList",
            json!({"processes": [{"pid": 12, "cmd": ["sleep", "600"], "cwd": null,
            "state": "exited", "exit_code": null, "signal": 15,
            "started_at": "2026-12-04T15:00:01.250Z", "ended_at": "2026-12-04T15:02:00.010Z",
            "stdin_open": false, "truncated": false, "stdout_dropped": 0, "stderr_dropped": 0}]}),
        ),
        ("ProcessSignal", json!({"signal": "TERM"})),
        ("SnapshotRequest", json!({"image": "team/app:prepared"})),
        ("StdinWritten", json!({"written": 6, "closed": false})),
        (
            "SandboxStats",
            json!({"sandbox_id": "sbx_01J9ZB5Q8W2X3Y4Z5A6B7C8D9E", "samples": [
                {"ts": "2026-12-04T15:00:05Z", "cpu_count": 1.0, "cpu_used_pct": 12.5,
                 "mem_used": 73400320, "mem_total": 536870912, "mem_cache": 4096,
                 "disk_used": 36_491_268_096_u64, "disk_total": 270_553_174_016_u64},
                {"ts": "2026-12-04T15:00:10Z", "cpu_count": 1.0, "cpu_used_pct": 99.8,
                 "mem_used": 73400320, "mem_total": 536870912, "mem_cache": 4096,
                 "disk_used": null, "disk_total": null}]}),
        ),
        (
            "Logs",
            json!({"lines": [{"ts": "2026-12-04T15:00:01Z", "source": "lifecycle", "message": "running"}]}),
        ),
        (
            "ExecRequest",
            json!({"cmd": ["sh", "-c", "echo hi; ls /work"], "env": {"DEBUG": "1"},
            "cwd": "/work", "timeout_s": 30}),
        ),
        (
            "ExecResponse",
            json!({"exit_code": 0, "signal": null, "stdout": "hi\na.py\n", "stderr": "",
            "duration_ms": 4, "timed_out": false, "stdout_truncated": false, "stderr_truncated": false}),
        ),
        ("FileEntry", entry.clone()),
        ("Entries", json!({"entries": [entry]})),
        ("Paths", json!({"paths": ["/work/a.py", "/work/lib/b.py"]})),
        (
            "MoveFile",
            json!({"from": "/work/a.py", "to": "/work/b.py", "overwrite": false}),
        ),
        ("Chmod", json!({"path": "/work/run.sh", "mode": "0755"})),
        ("Mkdir", json!({"path": "/work/out", "parents": true})),
        (
            "ArchiveSummary",
            json!({"path": "/work", "files": 12, "dirs": 3, "symlinks": 1, "bytes": 48213}),
        ),
        ("Image", image.clone()),
        ("ImageList", json!({"images": [image]})),
        ("CreateTenant", json!({"name": "web"})),
        ("Tenant", tenant.clone()),
        (
            "TenantList",
            json!({"tenants": [tenant], "next_cursor": null}),
        ),
        ("Quota", quota),
        (
            "CreateKey",
            json!({"tenant_id": "tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9", "role": "member", "name": "ci"}),
        ),
        ("ApiKey", key_created),
        ("KeyList", json!({"keys": [key], "next_cursor": null})),
        (
            "WhoAmI",
            json!({"key_id": "key_01J9ZA1B2C3D4E5F6G7H8J9K0M",
            "tenant_id": "tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9", "role": "member"}),
        ),
        ("AuditList", json!({"events": [event], "next_cursor": null})),
        ("Health", json!({"status": "ok"})),
        (
            "Status",
            json!({"version": "0.1.0", "mode": "single-node", "uptime_s": 3600,
            "store": {"kind": "sqlite", "ok": true}, "providers": [provider],
            "workers": [worker.clone()], "sandboxes": {"running": 3, "destroyed": 41}, "pools": []}),
        ),
        ("Worker", worker.clone()),
        ("WorkerList", json!({"workers": [worker]})),
        ("WorkerTokenCreate", json!({"name": "host-a"})),
        ("WorkerToken", token_created),
        ("WorkerTokenList", json!({"tokens": [token]})),
        (
            "WorkerRegister",
            json!({"id": "wrk_01J9Z9N1A2B3C4D5E6F7G8H9J0", "name": "host-a",
            "address": "http://10.0.0.5:7071", "providers": [provider_b.clone()],
            "labels": {"zone": "a"}, "capacity": {"sandboxes": 100, "cpu": 16.0, "memory_mb": 65536}}),
        ),
        (
            "WorkerRegistered",
            json!({"id": "wrk_01J9Z9N1A2B3C4D5E6F7G8H9J0", "secret": "…",
            "lease_ttl_ms": 15000, "heartbeat_interval_ms": 5000, "state": "ready",
            "leases": [lease.clone()]}),
        ),
        (
            "WorkerHeartbeat",
            json!({"providers": [provider_b], "ready": true,
            "runtimes": [{"sandbox_id": "sbx_01J9ZB5Q8W2X3Y4Z5A6B7C8D9E", "provider": "docker",
                "state": "running", "fencing_token": 7}]}),
        ),
        (
            "WorkerHeartbeatReply",
            json!({"state": "ready", "lease_ttl_ms": 15000,
            "heartbeat_interval_ms": 5000, "leases": [lease],
            "refused": [{"sandbox_id": "sbx_01J9ZB4A1B2C3D4E5F6G7H8J9K", "reason": "no current lease"}]}),
        ),
        ("CreateVolume", json!({"name": "cache", "size_mb": 1024})),
        ("Volume", volume.clone()),
        ("VolumeList", json!({"volumes": [volume]})),
        (
            "VolumeMount",
            json!({"volume": "cache", "path": "/data", "read_only": false}),
        ),
        (
            "CreateTemplate",
            json!({"name": "py", "from": "debian",
            "steps": [{"run": ["pip", "install", "requests"]},
                {"write": {"path": "/app/main.py", "content": "print(1)\n"}},
                {"env": {"PYTHONUNBUFFERED": "1"}}, {"workdir": "/app"}],
            "memory_mb": 1024, "start": ["python3", "-m", "http.server", "8000"],
            "ready": ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/"]}),
        ),
        ("Template", template.clone()),
        ("TemplateList", json!({"templates": [template]})),
        (
            "TemplateLog",
            json!({"name": "py", "version": 3, "state": "ready", "failure": null,
            "log": "step 1/4: run [\"pip\",\"install\",\"requests\"]\n…\nbuilt template/tnt_01J9Z9M0K1L2M3N4P5Q6R7S8T9/py:3\n"}),
        ),
        ("PortExpose", json!({"port": 8080, "public": false})),
        ("ExposedPort", exposed.clone()),
        ("PortList", json!({"ports": [exposed]})),
        ("PortTokenRequest", json!({"ttl_seconds": 3600})),
        (
            "PortToken",
            json!({"token": "1796400000.Yk3…", "expires_at": 1_796_400_000_i64,
            "url": "/v1/sandboxes/sbx_01J9ZB5Q8W2X3Y4Z5A6B7C8D9E/ports/8080/?stacyvm_token=1796400000.Yk3…"}),
        ),
    ] {
        m.insert(name.to_owned(), value);
    }
    m
}
