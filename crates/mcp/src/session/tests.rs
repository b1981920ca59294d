//! The JSON-RPC handling of a session against an in-memory backend:
//! negotiation, protocol errors, tool errors, truncation and cleanup.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{json, Value};
use stacyvm_api as api;

use super::*;
use crate::backend::{ExecResult, FileChunk, ToolError};

#[derive(Clone, Default)]
struct Fake {
    sandboxes: Arc<Mutex<Vec<api::Sandbox>>>,
    /// What every exec prints on stdout.
    stdout: Arc<Mutex<Vec<u8>>>,
}

fn sandbox(id: &str, labels: std::collections::BTreeMap<String, String>) -> api::Sandbox {
    serde_json::from_value(json!({
        "id": id, "tenant_id": "tnt_1", "state": "running", "provider": "docker",
        "worker_id": null, "image": "busybox", "template": null, "cpu": 1.0,
        "memory_mb": 512, "network": "none", "labels": labels,
        "created_at": "2026-01-01T00:00:00Z", "started_at": null, "expires_at": null,
        "destroyed_at": null, "failure": null
    }))
    .expect("a valid sandbox")
}

#[async_trait]
impl Backend for Fake {
    async fn sandbox_create(&self, spec: api::CreateSandbox) -> Result<api::Sandbox, ToolError> {
        let mut all = self.sandboxes.lock().unwrap();
        let s = sandbox(&format!("sbx_{}", all.len()), spec.labels);
        all.push(s.clone());
        Ok(s)
    }
    async fn sandbox_list(
        &self,
        labels: Vec<(String, String)>,
        _state: Option<String>,
    ) -> Result<Vec<api::Sandbox>, ToolError> {
        Ok(self
            .sandboxes
            .lock()
            .unwrap()
            .iter()
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .cloned()
            .collect())
    }
    async fn sandbox_destroy(&self, id: &str) -> Result<(), ToolError> {
        let mut all = self.sandboxes.lock().unwrap();
        let before = all.len();
        all.retain(|s| s.id != id);
        if all.len() == before {
            return Err(ToolError {
                status: Some(404),
                ..ToolError::new("not_found", format!("no sandbox {id}"))
            });
        }
        Ok(())
    }
    async fn exec(&self, id: &str, _req: api::ExecRequest) -> Result<ExecResult, ToolError> {
        if !self.sandboxes.lock().unwrap().iter().any(|s| s.id == id) {
            return Err(ToolError::new("not_found", format!("no sandbox {id}")));
        }
        Ok(ExecResult {
            exit_code: Some(0),
            stdout: self.stdout.lock().unwrap().clone(),
            ..Default::default()
        })
    }
    async fn file_write(
        &self,
        _id: &str,
        _path: &str,
        _mode: Option<String>,
        _data: Vec<u8>,
    ) -> Result<api::FileEntry, ToolError> {
        Err(ToolError::new("unsupported", "not in this fake"))
    }
    async fn file_read(
        &self,
        _id: &str,
        _path: &str,
        offset: u64,
        limit: usize,
    ) -> Result<FileChunk, ToolError> {
        let text = "héllo wörld".as_bytes();
        let start = (offset as usize).min(text.len());
        let end = (start + limit).min(text.len());
        Ok(FileChunk {
            data: text[start..end].to_vec(),
            more: end < text.len(),
        })
    }
    async fn file_list(
        &self,
        _id: &str,
        _path: &str,
        _recursive: bool,
    ) -> Result<Vec<api::FileEntry>, ToolError> {
        Ok(Vec::new())
    }
}

fn session(transport: Transport) -> (Session<Fake>, Fake) {
    let fake = Fake::default();
    let s = Session::new(
        fake.clone(),
        Options {
            transport,
            default_image: Some("busybox".into()),
        },
    );
    (s, fake)
}

async fn send(s: &Session<Fake>, msg: Value) -> Value {
    s.handle_message(msg).await.expect("a response")
}

async fn init(s: &Session<Fake>, version: &str) -> Value {
    let r = send(
        s,
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
    )
    .await;
    assert!(
        s.handle_message(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await
            .is_none(),
        "a notification gets no response"
    );
    r
}

async fn call(s: &Session<Fake>, name: &str, args: Value) -> Value {
    send(
        s,
        json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": name, "arguments": args}}),
    )
    .await
}

#[tokio::test]
async fn versions_are_negotiated() {
    for (asked, got) in [
        ("2025-11-25", "2025-11-25"),
        ("2025-06-18", "2025-06-18"),
        ("2025-03-26", "2025-03-26"),
        ("2024-11-05", "2024-11-05"),
        ("1999-01-01", crate::HANDSHAKE_VERSIONS[0]),
        // The stateless revision has no handshake: the newest handshake
        // revision is offered instead.
        ("2026-07-28", crate::HANDSHAKE_VERSIONS[0]),
    ] {
        let (s, _) = session(Transport::Stdio);
        let r = init(&s, asked).await;
        assert_eq!(r["result"]["protocolVersion"], got, "asked {asked}");
        assert_eq!(r["result"]["serverInfo"]["name"], "stacyvm");
        assert!(r["result"]["capabilities"]["tools"].is_object());
    }
}

#[tokio::test]
async fn protocol_errors_are_json_rpc_errors() {
    let (s, _) = session(Transport::Stdio);
    let early = send(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    assert_eq!(early["error"]["code"], jsonrpc::INVALID_REQUEST, "{early}");
    let ping = send(&s, json!({"jsonrpc": "2.0", "id": 2, "method": "ping"})).await;
    assert_eq!(ping["result"], json!({}), "ping works before initialize");
    init(&s, "2025-06-18").await;
    let r = send(&s, json!({"jsonrpc": "2.0", "id": 3, "method": "no/such"})).await;
    assert_eq!(r["error"]["code"], jsonrpc::METHOD_NOT_FOUND);
    assert_eq!(r["id"], 3);
    let r = s.handle_line("{not json").await.expect("a response");
    let r: Value = serde_json::from_str(&r).unwrap();
    assert_eq!(r["error"]["code"], jsonrpc::PARSE_ERROR);
    assert_eq!(r["id"], Value::Null);
    let r = call(&s, "no_such_tool", json!({})).await;
    assert_eq!(r["error"]["code"], jsonrpc::INVALID_PARAMS, "{r}");
    let r = send(
        &s,
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"arguments": {}}}),
    )
    .await;
    assert_eq!(r["error"]["code"], jsonrpc::INVALID_PARAMS, "{r}");
    let r = send(&s, json!([])).await;
    assert_eq!(r["error"]["code"], jsonrpc::INVALID_REQUEST);
    let r = send(
        &s,
        json!([{"jsonrpc": "2.0", "id": "a", "method": "ping"}, {"jsonrpc": "2.0", "method": "notifications/x"}]),
    )
    .await;
    assert_eq!(r, json!([{"jsonrpc": "2.0", "id": "a", "result": {}}]));
    assert!(s.handle_line("   ").await.is_none());
}

#[tokio::test]
async fn host_tools_exist_only_over_stdio() {
    let names = |r: &Value| -> Vec<String> {
        r["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, _) = session(Transport::Http);
    init(&s, "2025-06-18").await;
    let r = send(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    let tools = names(&r);
    assert!(tools.contains(&"run_code".to_owned()), "{tools:?}");
    assert!(!tools.iter().any(|t| t.contains("load")), "{tools:?}");
    for t in r["result"]["tools"].as_array().unwrap() {
        assert!(t["description"].as_str().unwrap().len() > 40, "{t}");
        assert_eq!(t["inputSchema"]["type"], "object");
    }
    // The fake has no host access either, so stdio does not offer them.
    let r = call(
        &s,
        "upload_file",
        json!({"sandbox_id": "sbx_0", "host_path": "/etc/passwd", "path": "/x"}),
    )
    .await;
    assert_eq!(r["error"]["code"], jsonrpc::INVALID_PARAMS, "{r}");
}

#[tokio::test]
async fn tool_errors_carry_the_api_code() {
    let (s, _) = session(Transport::Stdio);
    init(&s, "2025-06-18").await;
    let r = call(
        &s,
        "run_command",
        json!({"sandbox_id": "sbx_nope", "command": "true"}),
    )
    .await;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["error"]["code"],
        "not_found"
    );
    assert!(r["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("not_found"));
    let r = call(
        &s,
        "run_command",
        json!({"sandbox_id": "sbx_0", "bogus": 1}),
    )
    .await;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["error"]["code"],
        "invalid_request"
    );
    let r = call(&s, "run_command", json!({"sandbox_id": "sbx_0"})).await;
    assert_eq!(
        r["result"]["structuredContent"]["error"]["code"],
        "invalid_request"
    );
    let r = call(
        &s,
        "create_sandbox",
        json!({"labels": {"mcp-session": "x"}}),
    )
    .await;
    assert_eq!(r["result"]["isError"], true, "{r}");
}

#[tokio::test]
async fn output_is_capped_and_says_so() {
    let (s, fake) = session(Transport::Stdio);
    init(&s, "2025-06-18").await;
    call(&s, "create_sandbox", json!({})).await;
    *fake.stdout.lock().unwrap() = vec![b'x'; crate::OUTPUT_CAP * 3];
    let r = call(
        &s,
        "run_command",
        json!({"sandbox_id": "sbx_0", "command": "yes"}),
    )
    .await;
    let sc = &r["result"]["structuredContent"];
    assert_eq!(sc["stdout_truncated"], true, "{sc}");
    assert_eq!(sc["stdout"].as_str().unwrap().len(), crate::OUTPUT_CAP);
    assert_eq!(sc["stdout_bytes"], crate::OUTPUT_CAP * 3);
    let text = r["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("stdout was truncated"),
        "{}",
        &text[text.len() - 200..]
    );
    *fake.stdout.lock().unwrap() = b"short".to_vec();
    let r = call(
        &s,
        "run_command",
        json!({"sandbox_id": "sbx_0", "command": "echo"}),
    )
    .await;
    assert_eq!(r["result"]["structuredContent"]["stdout_truncated"], false);
}

#[tokio::test]
async fn a_read_cut_mid_character_returns_whole_characters() {
    let (s, _) = session(Transport::Stdio);
    init(&s, "2025-06-18").await;
    // "h" then "é" (two bytes): a 2-byte read ends inside the "é".
    let r = call(
        &s,
        "read_file",
        json!({"sandbox_id": "sbx_0", "path": "/f", "max_bytes": 2}),
    )
    .await;
    let sc = &r["result"]["structuredContent"];
    assert_eq!(sc["content"], "h", "{sc}");
    assert_eq!(sc["encoding"], "utf-8");
    assert_eq!(sc["next_offset"], 1);
    assert_eq!(sc["more"], true);
}

#[tokio::test]
async fn older_revisions_get_no_structured_content() {
    let (s, _) = session(Transport::Stdio);
    init(&s, "2024-11-05").await;
    let r = call(&s, "list_sandboxes", json!({})).await;
    assert!(r["result"].get("structuredContent").is_none(), "{r}");
    assert_eq!(r["result"]["isError"], false);
    let r = send(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    assert!(r["result"]["tools"][0].get("annotations").is_none());
}

#[tokio::test]
async fn closing_destroys_what_the_session_made_except_kept() {
    let (s, fake) = session(Transport::Stdio);
    init(&s, "2025-06-18").await;
    // Someone else's sandbox in the same tenant.
    fake.sandboxes
        .lock()
        .unwrap()
        .push(sandbox("sbx_other", Default::default()));
    call(&s, "create_sandbox", json!({})).await;
    let kept = call(&s, "create_sandbox", json!({"keep": true})).await;
    let kept_id = kept["result"]["structuredContent"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let report = s.close().await;
    assert_eq!(report.kept, vec![kept_id.clone()]);
    assert_eq!(report.destroyed.len(), 1, "{report:?}");
    let left: Vec<String> = fake
        .sandboxes
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.id.clone())
        .collect();
    assert_eq!(left, vec!["sbx_other".to_owned(), kept_id]);
}

#[tokio::test]
async fn stateless_requests_need_no_handshake() {
    let (s, _) = session(Transport::Stdio);
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}});
    let r = send(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}}),
    )
    .await;
    let versions = r["result"]["supportedVersions"]
        .as_array()
        .expect("versions");
    assert!(versions.contains(&json!("2026-07-28")), "{r}");
    assert!(versions.contains(&json!("2025-06-18")), "{r}");
    assert_eq!(r["result"]["resultType"], "complete");
    let r = send(
        &s,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"_meta": meta}}),
    )
    .await;
    assert_eq!(r["result"]["resultType"], "complete", "{r}");
    assert!(r["result"]["tools"].as_array().unwrap().len() >= 8);
    let r = send(
        &s,
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"_meta": meta, "name": "create_sandbox", "arguments": {}}}),
    )
    .await;
    assert_eq!(r["result"]["resultType"], "complete", "{r}");
    assert_eq!(r["result"]["structuredContent"]["image"], "busybox", "{r}");
    let r = send(
        &s,
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2099-01-01"}}}),
    )
    .await;
    assert_eq!(
        r["error"]["code"],
        jsonrpc::UNSUPPORTED_PROTOCOL_VERSION,
        "{r}"
    );
    assert_eq!(r["error"]["data"]["requested"], "2099-01-01");
    assert!(r["error"]["data"]["supported"]
        .as_array()
        .unwrap()
        .contains(&json!("2026-07-28")));
}

#[test]
fn resumed_sessions_need_a_well_formed_id() {
    let opts = Options {
        transport: Transport::Http,
        default_image: None,
    };
    assert!(Session::resume(Fake::default(), opts.clone(), "mcp_x", None).is_none());
    let id = format!("mcp_{}", "a".repeat(32));
    assert!(Session::resume(Fake::default(), opts.clone(), &id, Some("2000-01-01")).is_none());
    let s = Session::resume(Fake::default(), opts, &id, Some("2025-03-26")).expect("resumed");
    assert_eq!(s.version(), "2025-03-26");
}
