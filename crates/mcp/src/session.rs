//! One MCP session: the initialize handshake and version negotiation, the
//! method dispatch, and the cleanup at its end (destroying the sandboxes
//! it created, except those created with `keep`).

use std::sync::Mutex;

use serde_json::{json, Value};

use crate::backend::Backend;
use crate::jsonrpc::{self, Incoming, RpcError};
use crate::tools;
use crate::{
    HANDSHAKE_VERSIONS, KEEP_LABEL, PROTOCOL_VERSIONS, SESSION_LABEL, STATELESS_VERSIONS,
    VERSION_META_KEY,
};

/// How the client reaches the server: it decides which tools exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A local process on stdin/stdout, running as the user.
    Stdio,
    /// The control plane's `/mcp` endpoint.
    Http,
}

/// What a session is set up with.
#[derive(Clone, Debug)]
pub struct Options {
    pub transport: Transport,
    /// The image `create_sandbox` uses when the call names none.
    pub default_image: Option<String>,
}

struct State {
    initialized: bool,
    /// `initialize` was answered (its notification may still be coming).
    version_set: bool,
    version: &'static str,
}

/// A session over one backend. Requests may be handled concurrently.
pub struct Session<B> {
    pub(crate) backend: B,
    pub(crate) options: Options,
    id: String,
    state: Mutex<State>,
}

/// What closing a session did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CloseReport {
    pub destroyed: Vec<String>,
    pub kept: Vec<String>,
    /// Sandboxes that could not be destroyed, with the reason.
    pub failed: Vec<(String, String)>,
}

/// A fresh, unguessable session id.
fn new_session_id() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    format!("mcp_{}", hex::encode(b))
}

/// Whether `id` looks like a session id this server hands out. Checked on
/// ids a client sends back, since they end up in a label filter.
pub fn valid_session_id(id: &str) -> bool {
    id.len() == 36 && id.starts_with("mcp_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

impl<B: Backend> Session<B> {
    /// A new session, waiting for `initialize`.
    pub fn new(backend: B, options: Options) -> Session<B> {
        Session {
            backend,
            options,
            id: new_session_id(),
            state: Mutex::new(State {
                initialized: false,
                version_set: false,
                version: HANDSHAKE_VERSIONS[0],
            }),
        }
    }

    /// A session already initialized elsewhere (an HTTP request carrying
    /// the `Mcp-Session-Id` an earlier `initialize` handed out). `None` if
    /// the id is not one this server could have made.
    pub fn resume(
        backend: B,
        options: Options,
        id: &str,
        version: Option<&str>,
    ) -> Option<Session<B>> {
        if !valid_session_id(id) {
            return None;
        }
        let version = match version {
            None => HANDSHAKE_VERSIONS[0],
            Some(v) => *PROTOCOL_VERSIONS.iter().find(|s| **s == v)?,
        };
        Some(Session {
            backend,
            options,
            id: id.to_owned(),
            state: Mutex::new(State {
                initialized: true,
                version_set: true,
                version,
            }),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The negotiated protocol version of the handshake (the newest until
    /// `initialize`).
    pub fn version(&self) -> &'static str {
        self.lock().version
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two plain fields; a panic elsewhere cannot leave it
        // half-written, so a poisoned lock is still good to read.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles one line of the stdio transport; returns the line to send
    /// back, if any.
    pub async fn handle_line(&self, line: &str) -> Option<String> {
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        let reply = match serde_json::from_str::<Value>(line) {
            Ok(v) => self.handle_message(v).await,
            Err(e) => Some(jsonrpc::error(
                Value::Null,
                jsonrpc::PARSE_ERROR,
                format!("parse error: {e}"),
            )),
        };
        reply.map(|v| v.to_string())
    }

    /// Handles one parsed message or batch; returns the response, if any.
    pub async fn handle_message(&self, msg: Value) -> Option<Value> {
        match msg {
            Value::Array(items) => {
                if items.is_empty() {
                    return Some(jsonrpc::error(
                        Value::Null,
                        jsonrpc::INVALID_REQUEST,
                        "an empty batch is not a valid request",
                    ));
                }
                let mut out = Vec::new();
                for item in items {
                    if let Some(r) = self.handle_one(item).await {
                        out.push(r);
                    }
                }
                (!out.is_empty()).then_some(Value::Array(out))
            }
            other => self.handle_one(other).await,
        }
    }

    async fn handle_one(&self, msg: Value) -> Option<Value> {
        match jsonrpc::classify(msg) {
            Incoming::Invalid { id, message } => {
                Some(jsonrpc::error(id, jsonrpc::INVALID_REQUEST, message))
            }
            Incoming::Response => None,
            Incoming::Notification { method, .. } => {
                if method == "notifications/initialized" {
                    self.lock().initialized = true;
                }
                // Cancellation and every other notification need no answer;
                // a cancelled call finishes and its response is dropped by
                // the client.
                None
            }
            Incoming::Request { id, method, params } => {
                Some(match self.request(&method, params).await {
                    Ok(result) => jsonrpc::result(id, result),
                    Err(e) => e.to_response(id),
                })
            }
        }
    }

    async fn request(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        // A stateless request names its version itself and needs no
        // handshake; everything else uses the session's.
        let stateless = match params
            .get("_meta")
            .and_then(|m| m.get(VERSION_META_KEY))
            .map(|v| v.as_str())
        {
            None => None,
            Some(Some(v)) if STATELESS_VERSIONS.contains(&v) => {
                STATELESS_VERSIONS.iter().find(|s| **s == v).copied()
            }
            Some(asked) => return Err(unsupported_version(asked.unwrap_or(""))),
        };
        if method == "server/discover" {
            return Ok(discover());
        }
        if method == "initialize" {
            return Ok(self.initialize(&params));
        }
        let version = match stateless {
            Some(v) => v,
            None if method == "ping" => return Ok(json!({})),
            None if !self.lock().initialized && !self.initialize_seen() => {
                return Err(RpcError::new(
                    jsonrpc::INVALID_REQUEST,
                    "the session is not initialized: send initialize (or server/discover and a versioned request) first",
                ))
            }
            None => self.version(),
        };
        let mut result = match method {
            "ping" => json!({}),
            "tools/list" => tools::list(version, self.host_tools()),
            "tools/call" => tools::call(self, version, params).await?,
            "resources/list" => json!({"resources": []}),
            "resources/templates/list" => json!({"resourceTemplates": []}),
            "prompts/list" => json!({"prompts": []}),
            other => {
                return Err(RpcError::new(
                    jsonrpc::METHOD_NOT_FOUND,
                    format!("method not found: {other}"),
                ))
            }
        };
        if stateless.is_some() {
            result["resultType"] = json!("complete");
            if method.ends_with("/list") {
                result["ttlMs"] = json!(0);
                result["cacheScope"] = json!("private");
            }
        }
        Ok(result)
    }

    /// A client that sent `initialize` but whose `initialized`
    /// notification is still on its way (stdio handles messages
    /// concurrently) is served: the order between them is not guaranteed
    /// once they are in flight.
    fn initialize_seen(&self) -> bool {
        self.lock().version_set
    }

    fn initialize(&self, params: &Value) -> Value {
        let asked = params.get("protocolVersion").and_then(Value::as_str);
        let version = asked
            .and_then(|a| HANDSHAKE_VERSIONS.iter().find(|v| **v == a).copied())
            .unwrap_or(HANDSHAKE_VERSIONS[0]);
        {
            let mut st = self.lock();
            st.version = version;
            st.version_set = true;
        }
        json!({
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": server_info(),
            "instructions": INSTRUCTIONS,
        })
    }

    /// Whether the host file tools exist in this session.
    pub(crate) fn host_tools(&self) -> bool {
        self.options.transport == Transport::Stdio && self.backend.host_transfers()
    }

    /// Ends the session: destroys every sandbox it created that was not
    /// created with `keep`. Safe to call more than once.
    pub async fn close(&self) -> CloseReport {
        let mut report = CloseReport::default();
        let listed = self
            .backend
            .sandbox_list(vec![(SESSION_LABEL.into(), self.id.clone())], None)
            .await;
        let sandboxes = match listed {
            Ok(s) => s,
            Err(e) => {
                report.failed.push(("*".into(), e.to_string()));
                return report;
            }
        };
        for sbx in sandboxes {
            if matches!(
                sbx.state,
                stacyvm_api::SandboxState::Destroyed
                    | stacyvm_api::SandboxState::Failed
                    | stacyvm_api::SandboxState::Lost
            ) {
                continue;
            }
            if sbx.labels.get(KEEP_LABEL).map(String::as_str) == Some("true") {
                report.kept.push(sbx.id);
                continue;
            }
            match self.backend.sandbox_destroy(&sbx.id).await {
                Ok(()) => report.destroyed.push(sbx.id),
                Err(e) if e.code == "not_found" => report.destroyed.push(sbx.id),
                Err(e) => report.failed.push((sbx.id, e.to_string())),
            }
        }
        report
    }
}

fn server_info() -> Value {
    json!({
        "name": "stacyvm",
        "title": "StacyVM sandboxes",
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// The `server/discover` result of the stateless revisions.
fn discover() -> Value {
    json!({
        "supportedVersions": PROTOCOL_VERSIONS,
        "capabilities": {"tools": {"listChanged": false}},
        "instructions": INSTRUCTIONS,
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {"io.modelcontextprotocol/serverInfo": server_info()},
    })
}

fn unsupported_version(asked: &str) -> RpcError {
    RpcError {
        code: jsonrpc::UNSUPPORTED_PROTOCOL_VERSION,
        message: format!(
            "unsupported protocol version {asked:?}; supported: {}",
            PROTOCOL_VERSIONS.join(", ")
        ),
        data: Some(json!({"supported": PROTOCOL_VERSIONS, "requested": asked})),
    }
}

const INSTRUCTIONS: &str = "StacyVM runs code in isolated sandboxes (containers or microVMs). \
Typical flow: create_sandbox, then run_command / run_code and the file tools with its id, \
then destroy_sandbox when done. Sandboxes created in this session are destroyed when the \
session ends unless created with keep=true. Each sandbox expires after its timeout \
(300 s by default) even if nobody destroys it.";

#[cfg(test)]
mod tests;
