//! The tools: their descriptions and input schemas (written for a model
//! reading them), argument checking, the calls behind them, and results
//! with a plain-text summary, structured content and capped output.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use stacyvm_api as api;

use crate::backend::{no_host_files, Backend, ToolError};
use crate::jsonrpc::{self, RpcError};
use crate::session::Session;
use crate::{KEEP_LABEL, OUTPUT_CAP, SESSION_LABEL};

/// Most entries a `list_files` or `list_sandboxes` result carries.
const LIST_CAP: usize = 500;

/// Most bytes `read_file` returns in one call.
const READ_MAX: usize = 1024 * 1024;

/// What a tool produced: a summary for the model and the same facts as data.
struct Outcome {
    text: String,
    data: Value,
}

/// Protocol revisions from this one on carry `structuredContent`, tool
/// titles and annotations.
fn has_structured(version: &str) -> bool {
    version >= "2025-06-18"
}

fn tool(
    name: &str,
    title: &str,
    description: &str,
    schema: Value,
    read_only: bool,
    destructive: bool,
) -> Value {
    json!({
        "name": name,
        "title": title,
        "description": description,
        "inputSchema": schema,
        "annotations": {
            "title": title,
            "readOnlyHint": read_only,
            "destructiveHint": destructive,
            "openWorldHint": false,
        },
    })
}

const SANDBOX_ID: &str = "The sandbox id (sbx_…) that create_sandbox returned.";

/// The `tools/list` result.
pub(crate) fn list(version: &str, host_tools: bool) -> Value {
    let mut tools = vec![
        tool(
            "create_sandbox",
            "Create sandbox",
            "Start a new isolated sandbox (a Linux container or microVM) and return its id, which every other tool needs. \
             Use it before running anything; one sandbox can serve many commands and files, so create one per task rather than per command. \
             The sandbox has no network unless network is \"egress\", and is destroyed automatically after timeout_s seconds (server default 300) \
             and when this MCP session ends, unless keep is true. Fails with quota_exceeded when the tenant's quota is used up and image_not_found for an unknown image.",
            json!({
                "type": "object",
                "properties": {
                    "image": {"type": "string", "description": "Image to run, e.g. \"python:3.12-slim\" or a name from the server's image catalog. Defaults to the server's configured image when there is one."},
                    "provider": {"type": "string", "description": "Isolation backend (docker, namespaces, qemu, …). Leave it out to use the server's default."},
                    "cpu": {"type": "number", "description": "CPU cores (e.g. 0.5, 2)."},
                    "memory_mb": {"type": "integer", "description": "Memory limit in MiB."},
                    "timeout_s": {"type": "integer", "description": "Seconds until the sandbox is destroyed automatically."},
                    "network": {"type": "string", "enum": ["none", "egress"], "description": "\"none\" (default): no network. \"egress\": outbound access."},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Environment variables for every command."},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Labels to find the sandbox by later."},
                    "workdir": {"type": "string", "description": "Absolute working directory for commands."},
                    "keep": {"type": "boolean", "description": "Keep the sandbox after this session ends (it still expires after timeout_s). Default false."}
                },
                "additionalProperties": false
            }),
            false,
            false,
        ),
        tool(
            "run_command",
            "Run command",
            "Run a shell command in a sandbox and wait for it to finish; returns exit_code, stdout and stderr. \
             `command` is run with /bin/sh -c, so pipes and redirections work; give `argv` instead to run a program without a shell. \
             Each call is a fresh process: `cd` or exported variables do not carry over (use cwd and env). \
             Default timeout 60 s, after which the command is killed (timed_out true). \
             Each output stream is cut at 64 KiB and the result says so; redirect large output to a file and read parts of it with read_file.",
            json!({
                "type": "object",
                "properties": {
                    "sandbox_id": {"type": "string", "description": SANDBOX_ID},
                    "command": {"type": "string", "description": "Shell command line, run with /bin/sh -c."},
                    "argv": {"type": "array", "items": {"type": "string"}, "description": "Program and arguments, run without a shell (instead of command)."},
                    "cwd": {"type": "string", "description": "Absolute working directory."},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "stdin": {"type": "string", "description": "Text fed to the command's standard input."},
                    "timeout_s": {"type": "number", "description": "Seconds before the command is killed (default 60)."}
                },
                "required": ["sandbox_id"],
                "additionalProperties": false
            }),
            false,
            true,
        ),
        tool(
            "run_code",
            "Run code",
            "Run a snippet of Python, JavaScript (Node.js) or shell code in a sandbox: the code is saved to a file under /tmp in the sandbox and run with the matching interpreter (python3/python, node/nodejs, sh). \
             Returns exit_code, stdout and stderr like run_command, plus the file's path. \
             The sandbox's image must contain the interpreter; if it does not, the tool fails with interpreter_not_found (create the sandbox from an image that has it). \
             Output is cut at 64 KiB per stream; default timeout 60 s.",
            json!({
                "type": "object",
                "properties": {
                    "sandbox_id": {"type": "string", "description": SANDBOX_ID},
                    "language": {"type": "string", "enum": ["python", "node", "shell"], "description": "python, node (JavaScript) or shell."},
                    "code": {"type": "string", "description": "The program text."},
                    "stdin": {"type": "string"},
                    "timeout_s": {"type": "number", "description": "Seconds before the program is killed (default 60)."}
                },
                "required": ["sandbox_id", "language", "code"],
                "additionalProperties": false
            }),
            false,
            true,
        ),
        tool(
            "write_file",
            "Write file",
            "Create or replace a file in a sandbox (parent directories are created). \
             content is text, or base64 when encoding is \"base64\" (for binary files). Paths are absolute paths inside the sandbox.",
            json!({
                "type": "object",
                "properties": {
                    "sandbox_id": {"type": "string", "description": SANDBOX_ID},
                    "path": {"type": "string", "description": "Absolute path inside the sandbox, e.g. /work/main.py."},
                    "content": {"type": "string"},
                    "encoding": {"type": "string", "enum": ["utf-8", "base64"], "description": "How content is encoded (default utf-8)."},
                    "mode": {"type": "string", "description": "Octal permissions, e.g. \"0755\" (default 0644)."}
                },
                "required": ["sandbox_id", "path", "content"],
                "additionalProperties": false
            }),
            false,
            true,
        ),
        tool(
            "read_file",
            "Read file",
            "Read a file from a sandbox. Returns text when the bytes are UTF-8, otherwise base64 (encoding says which). \
             At most max_bytes (default 64 KiB, at most 1 MiB) are returned from offset; `more` is true when the file goes on, so read the rest with a larger offset.",
            json!({
                "type": "object",
                "properties": {
                    "sandbox_id": {"type": "string", "description": SANDBOX_ID},
                    "path": {"type": "string", "description": "Absolute path inside the sandbox."},
                    "offset": {"type": "integer", "minimum": 0, "description": "Byte offset to start at (default 0)."},
                    "max_bytes": {"type": "integer", "minimum": 1, "maximum": READ_MAX, "description": "Most bytes to return (default 65536)."}
                },
                "required": ["sandbox_id", "path"],
                "additionalProperties": false
            }),
            true,
            false,
        ),
        tool(
            "list_files",
            "List files",
            "List a directory in a sandbox: each entry's path, type (file, dir, symlink), size, mode and modification time. \
             recursive lists the whole tree below it. At most 500 entries are returned; the result says when more exist.",
            json!({
                "type": "object",
                "properties": {
                    "sandbox_id": {"type": "string", "description": SANDBOX_ID},
                    "path": {"type": "string", "description": "Absolute directory path (default /)."},
                    "recursive": {"type": "boolean"}
                },
                "required": ["sandbox_id"],
                "additionalProperties": false
            }),
            true,
            false,
        ),
        tool(
            "destroy_sandbox",
            "Destroy sandbox",
            "Destroy a sandbox and everything in it. Use it when a task is done to free resources. Destroying an already destroyed sandbox succeeds.",
            json!({
                "type": "object",
                "properties": {"sandbox_id": {"type": "string", "description": SANDBOX_ID}},
                "required": ["sandbox_id"],
                "additionalProperties": false
            }),
            false,
            true,
        ),
        tool(
            "list_sandboxes",
            "List sandboxes",
            "List the sandboxes this API key can see (running ones by default), with id, state, image, labels and expiry. \
             session_only limits it to sandboxes created in this MCP session. At most 500 are returned.",
            json!({
                "type": "object",
                "properties": {
                    "state": {"type": "string", "enum": ["pending", "starting", "running", "paused", "stopping", "destroyed", "failed", "lost", "all"], "description": "Only sandboxes in this state (default running; \"all\" for every state)."},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Only sandboxes carrying all these labels."},
                    "session_only": {"type": "boolean", "description": "Only sandboxes created in this session."}
                },
                "additionalProperties": false
            }),
            true,
            false,
        ),
    ];
    if host_tools {
        tools.push(tool(
            "upload_file",
            "Upload file from host",
            "Copy a file from this computer (the machine running the MCP server) into a sandbox. Use it to give the sandbox input data or source files too large to pass as write_file content. \
             host_path is a path on this computer; path is an absolute path in the sandbox.",
            json!({
                "type": "object",
                "properties": {
                    "sandbox_id": {"type": "string", "description": SANDBOX_ID},
                    "host_path": {"type": "string", "description": "Path of the file on this computer."},
                    "path": {"type": "string", "description": "Absolute destination path inside the sandbox."},
                    "mode": {"type": "string", "description": "Octal permissions (default 0644)."}
                },
                "required": ["sandbox_id", "host_path", "path"],
                "additionalProperties": false
            }),
            false,
            true,
        ));
        tools.push(tool(
            "download_file",
            "Download file to host",
            "Copy a file from a sandbox to this computer (the machine running the MCP server), replacing host_path if it exists. Use it to keep results (reports, images, archives) after the sandbox is gone.",
            json!({
                "type": "object",
                "properties": {
                    "sandbox_id": {"type": "string", "description": SANDBOX_ID},
                    "path": {"type": "string", "description": "Absolute path of the file inside the sandbox."},
                    "host_path": {"type": "string", "description": "Destination path on this computer."}
                },
                "required": ["sandbox_id", "path", "host_path"],
                "additionalProperties": false
            }),
            false,
            true,
        ));
    }
    // Older revisions know neither tool titles nor annotations.
    for t in &mut tools {
        if let Value::Object(o) = t {
            if version < "2025-06-18" {
                o.remove("title");
            }
            if version < "2025-03-26" {
                o.remove("annotations");
            }
        }
    }
    json!({ "tools": tools })
}

/// `tools/call`: an unknown tool or malformed params are protocol errors;
/// everything that goes wrong inside a tool (including bad arguments, so
/// the model can correct them) is a result with `isError`.
pub(crate) async fn call<B: Backend>(
    session: &Session<B>,
    version: &str,
    params: Value,
) -> Result<Value, RpcError> {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            RpcError::new(
                jsonrpc::INVALID_PARAMS,
                "tools/call needs a string \"name\"",
            )
        })?
        .to_owned();
    let args = match params.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => {
            return Err(RpcError::new(
                jsonrpc::INVALID_PARAMS,
                "tools/call \"arguments\" must be an object",
            ))
        }
    };
    let host = session.host_tools();
    let known = matches!(
        name.as_str(),
        "create_sandbox"
            | "run_command"
            | "run_code"
            | "write_file"
            | "read_file"
            | "list_files"
            | "destroy_sandbox"
            | "list_sandboxes"
    ) || (host && matches!(name.as_str(), "upload_file" | "download_file"));
    if !known {
        let hint = if matches!(name.as_str(), "upload_file" | "download_file") {
            ": host file transfer exists only in the local stdio server"
        } else {
            ""
        };
        return Err(RpcError::new(
            jsonrpc::INVALID_PARAMS,
            format!("unknown tool {name:?}{hint}"),
        ));
    }
    let outcome = run(session, &name, args).await;
    Ok(render(version, outcome))
}

fn render(version: &str, outcome: Result<Outcome, ToolError>) -> Value {
    let structured = has_structured(version);
    match outcome {
        Ok(o) => {
            let mut r = json!({"content": [{"type": "text", "text": o.text}], "isError": false});
            if structured {
                r["structuredContent"] = o.data;
            }
            r
        }
        Err(e) => {
            let mut text = format!("error {}: {}", e.code, e.message);
            if let Some(id) = &e.request_id {
                text.push_str(&format!(" (request id {id})"));
            }
            let mut r = json!({"content": [{"type": "text", "text": text}], "isError": true});
            if structured {
                r["structuredContent"] = json!({"error": {
                    "code": e.code, "message": e.message, "status": e.status, "request_id": e.request_id,
                }});
            }
            r
        }
    }
}

fn args<T: DeserializeOwned>(v: Value) -> Result<T, ToolError> {
    serde_json::from_value(v).map_err(|e| ToolError::invalid(format!("invalid arguments: {e}")))
}

async fn run<B: Backend>(s: &Session<B>, name: &str, a: Value) -> Result<Outcome, ToolError> {
    match name {
        "create_sandbox" => create_sandbox(s, args(a)?).await,
        "run_command" => run_command(s, args(a)?).await,
        "run_code" => run_code(s, args(a)?).await,
        "write_file" => write_file(s, args(a)?).await,
        "read_file" => read_file(s, args(a)?).await,
        "list_files" => list_files(s, args(a)?).await,
        "destroy_sandbox" => destroy_sandbox(s, args(a)?).await,
        "list_sandboxes" => list_sandboxes(s, args(a)?).await,
        "upload_file" => upload_file(s, args(a)?).await,
        "download_file" => download_file(s, args(a)?).await,
        other => Err(ToolError::invalid(format!("unknown tool {other:?}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateArgs {
    image: Option<String>,
    provider: Option<String>,
    cpu: Option<f64>,
    memory_mb: Option<i64>,
    timeout_s: Option<i64>,
    network: Option<api::Network>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    workdir: Option<String>,
    #[serde(default)]
    keep: bool,
}

fn sandbox_summary(s: &api::Sandbox) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        // Internal placement details mean nothing to a model.
        o.remove("worker_id");
        o.remove("tenant_id");
    }
    v
}

async fn create_sandbox<B: Backend>(s: &Session<B>, a: CreateArgs) -> Result<Outcome, ToolError> {
    let image = a
        .image
        .or_else(|| s.options.default_image.clone())
        .ok_or_else(|| {
            ToolError::invalid("image is required (this server has no default image)")
        })?;
    let mut labels = a.labels;
    if labels.keys().any(|k| k == SESSION_LABEL || k == KEEP_LABEL) {
        return Err(ToolError::invalid(format!(
            "the labels {SESSION_LABEL} and {KEEP_LABEL} are set by the MCP server; use the keep argument"
        )));
    }
    labels.insert(SESSION_LABEL.into(), s.id().to_owned());
    if a.keep {
        labels.insert(KEEP_LABEL.into(), "true".into());
    }
    let spec = api::CreateSandbox {
        image: Some(image),
        provider: a.provider,
        cpu: a.cpu,
        memory_mb: a.memory_mb,
        timeout_s: a.timeout_s,
        env: a.env,
        labels,
        workdir: a.workdir,
        network: a.network,
        ..Default::default()
    };
    let sbx = s.backend.sandbox_create(spec).await?;
    let mut text = format!(
        "Created sandbox {} (image {}, {} CPU, {} MiB, network {}), state {:?}.",
        sbx.id, sbx.image, sbx.cpu, sbx.memory_mb, sbx.network, sbx.state
    );
    if let Some(exp) = sbx.expires_at {
        text.push_str(&format!(" It expires at {exp}."));
    }
    text.push_str(if a.keep {
        " It is kept after this session ends."
    } else {
        " It is destroyed when this session ends."
    });
    let mut data = sandbox_summary(&sbx);
    data["keep"] = json!(a.keep);
    Ok(Outcome { text, data })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandArgs {
    sandbox_id: String,
    command: Option<String>,
    argv: Option<Vec<String>>,
    cwd: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    stdin: Option<String>,
    timeout_s: Option<f64>,
}

async fn run_command<B: Backend>(s: &Session<B>, a: CommandArgs) -> Result<Outcome, ToolError> {
    let cmd = match (a.command, a.argv) {
        (Some(c), None) => vec!["/bin/sh".to_owned(), "-c".to_owned(), c],
        (None, Some(argv)) if !argv.is_empty() => argv,
        (None, Some(_)) => return Err(ToolError::invalid("argv must hold at least the program")),
        (Some(_), Some(_)) => {
            return Err(ToolError::invalid("give either command or argv, not both"))
        }
        (None, None) => return Err(ToolError::invalid("command (or argv) is required")),
    };
    let req = api::ExecRequest {
        cmd,
        env: a.env,
        cwd: a.cwd,
        stdin: a.stdin,
        timeout_s: a.timeout_s,
        user: None,
    };
    let out = s.backend.exec(&a.sandbox_id, req).await?;
    Ok(exec_outcome(out, None))
}

/// Output text cut to the cap (at a character boundary), and whether it was.
fn capped(bytes: &[u8]) -> (String, bool) {
    let cut = bytes.len() > OUTPUT_CAP;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_CAP)]).into_owned();
    (text, cut)
}

fn exec_outcome(out: crate::ExecResult, file: Option<&str>) -> Outcome {
    let (stdout, out_cut) = capped(&out.stdout);
    let (stderr, err_cut) = capped(&out.stderr);
    let status = match (out.exit_code, out.signal, out.timed_out) {
        (_, _, true) => format!("timed out after {} ms and was killed", out.duration_ms),
        (Some(c), _, _) => format!("exit code {c}"),
        (None, Some(sig), _) => format!("killed by signal {sig}"),
        (None, None, _) => "ended without an exit code".to_owned(),
    };
    let mut text = format!("{status} ({} ms)\n", out.duration_ms);
    if let Some(f) = file {
        text.push_str(&format!("code file: {f}\n"));
    }
    let mut notes = Vec::new();
    for (name, body, bytes, cut, server_cut) in [
        (
            "stdout",
            &stdout,
            out.stdout.len(),
            out_cut,
            out.stdout_truncated,
        ),
        (
            "stderr",
            &stderr,
            out.stderr.len(),
            err_cut,
            out.stderr_truncated,
        ),
    ] {
        if !body.is_empty() {
            text.push_str(&format!("--- {name} ---\n{body}"));
            if !body.ends_with('\n') {
                text.push('\n');
            }
        }
        if cut || server_cut {
            let note = if server_cut {
                format!("{name} was truncated: the server kept only its first {bytes} bytes, and {} are shown", bytes.min(OUTPUT_CAP))
            } else {
                format!("{name} was truncated: {OUTPUT_CAP} of {bytes} bytes shown; redirect it to a file and use read_file for the rest")
            };
            notes.push(note);
        }
    }
    for n in &notes {
        text.push_str(&format!("[{n}]\n"));
    }
    let mut data = json!({
        "exit_code": out.exit_code,
        "signal": out.signal,
        "timed_out": out.timed_out,
        "duration_ms": out.duration_ms,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_truncated": out_cut || out.stdout_truncated,
        "stderr_truncated": err_cut || out.stderr_truncated,
        "stdout_bytes": out.stdout.len(),
        "stderr_bytes": out.stderr.len(),
    });
    if let Some(f) = file {
        data["file"] = json!(f);
    }
    Outcome { text, data }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeArgs {
    sandbox_id: String,
    language: String,
    code: String,
    stdin: Option<String>,
    timeout_s: Option<f64>,
}

/// The interpreters tried for a language, in order, and the file suffix.
fn interpreters(language: &str) -> Option<(&'static [&'static str], &'static str)> {
    match language.to_ascii_lowercase().as_str() {
        "python" | "python3" | "py" => Some((&["python3", "python"], "py")),
        "node" | "nodejs" | "javascript" | "js" => Some((&["node", "nodejs"], "js")),
        "shell" | "sh" | "bash" => Some((&["sh"], "sh")),
        _ => None,
    }
}

async fn run_code<B: Backend>(s: &Session<B>, a: CodeArgs) -> Result<Outcome, ToolError> {
    let (candidates, suffix) = interpreters(&a.language).ok_or_else(|| {
        ToolError::invalid(format!(
            "language {:?} is not supported: use python, node or shell",
            a.language
        ))
    })?;
    // Which interpreter the image has, found by the sandbox's own shell.
    let probe = format!(
        "for c in {}; do if command -v \"$c\" >/dev/null 2>&1; then echo \"$c\"; exit 0; fi; done; exit 1",
        candidates.join(" ")
    );
    let found = s
        .backend
        .exec(
            &a.sandbox_id,
            api::ExecRequest {
                cmd: vec!["/bin/sh".into(), "-c".into(), probe],
                timeout_s: Some(30.0),
                ..Default::default()
            },
        )
        .await?;
    let interpreter = String::from_utf8_lossy(&found.stdout)
        .lines()
        .next()
        .map(str::trim)
        .filter(|l| found.exit_code == Some(0) && candidates.contains(l))
        .map(str::to_owned);
    let Some(interpreter) = interpreter else {
        return Err(ToolError::new(
            "interpreter_not_found",
            format!(
                "the sandbox's image has no {} interpreter (looked for {} on PATH); create a sandbox from an image that has it, or use run_command",
                a.language,
                candidates.join(", ")
            ),
        ));
    };
    let mut name = [0u8; 6];
    rand::fill(&mut name);
    let file = format!("/tmp/stacyvm-mcp/code-{}.{suffix}", hex::encode(name));
    s.backend
        .file_write(
            &a.sandbox_id,
            &file,
            Some("0644".into()),
            a.code.into_bytes(),
        )
        .await?;
    let out = s
        .backend
        .exec(
            &a.sandbox_id,
            api::ExecRequest {
                cmd: vec![interpreter, file.clone()],
                stdin: a.stdin,
                timeout_s: a.timeout_s,
                ..Default::default()
            },
        )
        .await?;
    Ok(exec_outcome(out, Some(&file)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    sandbox_id: String,
    path: String,
    content: String,
    encoding: Option<String>,
    mode: Option<String>,
}

async fn write_file<B: Backend>(s: &Session<B>, a: WriteArgs) -> Result<Outcome, ToolError> {
    let data = match a.encoding.as_deref() {
        None | Some("utf-8") | Some("utf8") | Some("text") => a.content.into_bytes(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(a.content.trim())
            .map_err(|e| ToolError::invalid(format!("content is not valid base64: {e}")))?,
        Some(other) => {
            return Err(ToolError::invalid(format!(
                "encoding {other:?} is not supported: use utf-8 or base64"
            )))
        }
    };
    let entry = s
        .backend
        .file_write(&a.sandbox_id, &a.path, a.mode, data)
        .await?;
    Ok(Outcome {
        text: format!(
            "Wrote {} bytes to {} (mode {}).",
            entry.size, entry.path, entry.mode
        ),
        data: serde_json::to_value(&entry).unwrap_or(Value::Null),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    sandbox_id: String,
    path: String,
    #[serde(default)]
    offset: u64,
    max_bytes: Option<usize>,
}

async fn read_file<B: Backend>(s: &Session<B>, a: ReadArgs) -> Result<Outcome, ToolError> {
    let limit = a.max_bytes.unwrap_or(OUTPUT_CAP);
    if limit == 0 || limit > READ_MAX {
        return Err(ToolError::invalid(format!(
            "max_bytes must be between 1 and {READ_MAX}"
        )));
    }
    let chunk = s
        .backend
        .file_read(&a.sandbox_id, &a.path, a.offset, limit)
        .await?;
    let mut data = chunk.data;
    let mut more = chunk.more;
    // A cut through a multi-byte character would make text look binary:
    // hand back whole characters and let the next read start at the rest.
    if more {
        if let Err(e) = std::str::from_utf8(&data) {
            if e.error_len().is_none() && e.valid_up_to() > 0 {
                data.truncate(e.valid_up_to());
                more = true;
            }
        }
    }
    let end = a.offset + data.len() as u64;
    let (encoding, content) = match String::from_utf8(data) {
        Ok(t) => ("utf-8", t),
        Err(e) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
        ),
    };
    let mut text = if encoding == "utf-8" {
        content.clone()
    } else {
        format!("(binary file, base64)\n{content}")
    };
    if more {
        text.push_str(&format!(
            "\n[truncated: bytes {}..{end} shown; the file goes on, read again with offset {end}]",
            a.offset
        ));
    }
    Ok(Outcome {
        text,
        data: json!({
            "path": a.path, "offset": a.offset, "bytes": end - a.offset,
            "encoding": encoding, "content": content, "more": more, "next_offset": if more { Some(end) } else { None },
        }),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    sandbox_id: String,
    path: Option<String>,
    #[serde(default)]
    recursive: bool,
}

async fn list_files<B: Backend>(s: &Session<B>, a: ListArgs) -> Result<Outcome, ToolError> {
    let path = a.path.unwrap_or_else(|| "/".into());
    let mut entries = s
        .backend
        .file_list(&a.sandbox_id, &path, a.recursive)
        .await?;
    let total = entries.len();
    entries.truncate(LIST_CAP);
    let mut text = String::new();
    for e in &entries {
        let kind = match e.file_type {
            api::FileType::Dir => "dir ",
            api::FileType::File => "file",
            api::FileType::Symlink => "link",
            api::FileType::Other => "other",
        };
        text.push_str(&format!("{kind} {:>10} {} {}", e.size, e.mode, e.path));
        if let Some(t) = &e.symlink_target {
            text.push_str(&format!(" -> {t}"));
        }
        text.push('\n');
    }
    if entries.is_empty() {
        text.push_str("(empty directory)\n");
    }
    let truncated = total > LIST_CAP;
    if truncated {
        text.push_str(&format!(
            "[truncated: {LIST_CAP} of {total} entries shown; list a subdirectory]\n"
        ));
    }
    Ok(Outcome {
        text,
        data: json!({"path": path, "entries": entries, "total": total, "truncated": truncated}),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdArgs {
    sandbox_id: String,
}

async fn destroy_sandbox<B: Backend>(s: &Session<B>, a: IdArgs) -> Result<Outcome, ToolError> {
    s.backend.sandbox_destroy(&a.sandbox_id).await?;
    Ok(Outcome {
        text: format!("Destroyed sandbox {}.", a.sandbox_id),
        data: json!({"sandbox_id": a.sandbox_id, "destroyed": true}),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListSandboxesArgs {
    state: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    session_only: bool,
}

async fn list_sandboxes<B: Backend>(
    s: &Session<B>,
    a: ListSandboxesArgs,
) -> Result<Outcome, ToolError> {
    let state = match a.state.as_deref() {
        None => Some("running".to_owned()),
        Some("all") => None,
        Some(st) => Some(st.to_owned()),
    };
    let mut labels: Vec<(String, String)> = a.labels.into_iter().collect();
    if a.session_only {
        labels.push((SESSION_LABEL.into(), s.id().to_owned()));
    }
    let mut list = s.backend.sandbox_list(labels, state).await?;
    let total = list.len();
    list.truncate(LIST_CAP);
    let mut text = String::new();
    for sbx in &list {
        let mine = sbx.labels.get(SESSION_LABEL).map(String::as_str) == Some(s.id());
        text.push_str(&format!(
            "{} {:?} image={}{}\n",
            sbx.id,
            sbx.state,
            sbx.image,
            if mine { " (this session)" } else { "" }
        ));
    }
    if list.is_empty() {
        text.push_str("(no sandboxes)\n");
    }
    if total > LIST_CAP {
        text.push_str(&format!(
            "[truncated: {LIST_CAP} of {total} sandboxes shown]\n"
        ));
    }
    let items: Vec<Value> = list
        .iter()
        .map(|sbx| {
            let mut v = sandbox_summary(sbx);
            v["this_session"] =
                json!(sbx.labels.get(SESSION_LABEL).map(String::as_str) == Some(s.id()));
            v
        })
        .collect();
    Ok(Outcome {
        text,
        data: json!({"sandboxes": items, "total": total, "truncated": total > LIST_CAP}),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadArgs {
    sandbox_id: String,
    host_path: String,
    path: String,
    mode: Option<String>,
}

async fn upload_file<B: Backend>(s: &Session<B>, a: UploadArgs) -> Result<Outcome, ToolError> {
    if !s.host_tools() {
        return Err(no_host_files());
    }
    let entry = s
        .backend
        .upload(&a.sandbox_id, &a.host_path, &a.path, a.mode)
        .await?;
    Ok(Outcome {
        text: format!(
            "Uploaded {} ({} bytes) to {}.",
            a.host_path, entry.size, entry.path
        ),
        data: serde_json::to_value(&entry).unwrap_or(Value::Null),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadArgs {
    sandbox_id: String,
    path: String,
    host_path: String,
}

async fn download_file<B: Backend>(s: &Session<B>, a: DownloadArgs) -> Result<Outcome, ToolError> {
    if !s.host_tools() {
        return Err(no_host_files());
    }
    let bytes = s
        .backend
        .download(&a.sandbox_id, &a.path, &a.host_path)
        .await?;
    Ok(Outcome {
        text: format!("Downloaded {} ({bytes} bytes) to {}.", a.path, a.host_path),
        data: json!({"path": a.path, "host_path": a.host_path, "bytes": bytes}),
    })
}
