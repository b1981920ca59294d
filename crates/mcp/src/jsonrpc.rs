//! JSON-RPC 2.0 as MCP uses it: classifying an incoming message (request,
//! notification, response) and building results and errors.

use serde_json::{json, Value};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// The request's protocol version is not one the server speaks (`data`
/// lists the supported ones).
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

/// One message from the client.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// Expects a response under `id`.
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    /// Expects none.
    Notification { method: String, params: Value },
    /// A client's answer to a server request; this server sends none, so
    /// these are ignored.
    Response,
    /// Not a JSON-RPC 2.0 message; answered with this error under `id`
    /// (null when the id could not be read).
    Invalid { id: Value, message: String },
}

/// Classifies one message (an element of a batch, or a whole line).
pub fn classify(msg: Value) -> Incoming {
    let Value::Object(mut obj) = msg else {
        return Incoming::Invalid {
            id: Value::Null,
            message: "a JSON-RPC message must be an object".into(),
        };
    };
    let id = obj.remove("id");
    // An id is a string or a number; anything else cannot be echoed back
    // as the same id.
    let id_ok = matches!(id, None | Some(Value::String(_)) | Some(Value::Number(_)));
    let reply_id = match (&id, id_ok) {
        (Some(v), true) => v.clone(),
        _ => Value::Null,
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Incoming::Invalid {
            id: reply_id,
            message: "the message must carry \"jsonrpc\": \"2.0\"".into(),
        };
    }
    if !id_ok {
        return Incoming::Invalid {
            id: Value::Null,
            message: "\"id\" must be a string or a number".into(),
        };
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => {
            return Incoming::Invalid {
                id: reply_id,
                message: "\"method\" must be a string".into(),
            }
        }
        None if id.is_some() && (obj.contains_key("result") || obj.contains_key("error")) => {
            return Incoming::Response
        }
        None => {
            return Incoming::Invalid {
                id: reply_id,
                message: "the message has no \"method\"".into(),
            }
        }
    };
    let params = obj.remove("params").unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return Incoming::Invalid {
            id: reply_id,
            message: "\"params\" must be an object or an array".into(),
        };
    }
    match id {
        Some(id) => Incoming::Request { id, method, params },
        None => Incoming::Notification { method, params },
    }
}

pub fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

pub fn error(id: Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

/// A protocol error, as the session hands it to the transport.
#[derive(Debug, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn to_response(&self, id: Value) -> Value {
        let mut v = error(id, self.code, self.message.clone());
        if let Some(d) = &self.data {
            v["error"]["data"] = d.clone();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_classified() {
        let cases: Vec<(Value, Incoming)> = vec![
            (
                json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
                Incoming::Request {
                    id: json!(1),
                    method: "ping".into(),
                    params: Value::Null,
                },
            ),
            (
                json!({"jsonrpc": "2.0", "id": "a", "method": "tools/list", "params": {}}),
                Incoming::Request {
                    id: json!("a"),
                    method: "tools/list".into(),
                    params: json!({}),
                },
            ),
            (
                json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                Incoming::Notification {
                    method: "notifications/initialized".into(),
                    params: Value::Null,
                },
            ),
            (
                json!({"jsonrpc": "2.0", "id": 3, "result": {}}),
                Incoming::Response,
            ),
            (
                json!({"jsonrpc": "1.0", "id": 4, "method": "ping"}),
                Incoming::Invalid {
                    id: json!(4),
                    message: "the message must carry \"jsonrpc\": \"2.0\"".into(),
                },
            ),
            (
                json!({"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}),
                Incoming::Invalid {
                    id: Value::Null,
                    message: "\"id\" must be a string or a number".into(),
                },
            ),
            (
                json!({"jsonrpc": "2.0", "id": 5, "method": 7}),
                Incoming::Invalid {
                    id: json!(5),
                    message: "\"method\" must be a string".into(),
                },
            ),
            (
                json!({"jsonrpc": "2.0", "id": 6, "method": "ping", "params": 3}),
                Incoming::Invalid {
                    id: json!(6),
                    message: "\"params\" must be an object or an array".into(),
                },
            ),
            (
                json!([1, 2]),
                Incoming::Invalid {
                    id: Value::Null,
                    message: "a JSON-RPC message must be an object".into(),
                },
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(classify(msg.clone()), want, "{msg}");
        }
    }
}
