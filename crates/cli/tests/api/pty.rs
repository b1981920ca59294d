//! Interactive terminals over a WebSocket (`GET /v1/sandboxes/{id}/pty`) on
//! every provider that runs the agent: a real terminal (`tty`, `stty size`
//! following a resize, Ctrl-C reaching the foreground job), the exit code in
//! the close frame, clear refusals, and a closed socket killing the command.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::{eventually, random_hex, Api, Server, ServerOptions, StoreKind};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Bound on waiting for output that should come; a hang fails the test
/// instead of blocking it.
const PATIENCE: Duration = Duration::from_secs(60);

struct Term {
    ws: Socket,
    seen: Vec<u8>,
}

/// Opens a terminal; `Err((status, body))` when the server refuses the upgrade.
async fn open(api: &Api, id: &str, query: &str) -> Result<Result<Term, (u16, String)>> {
    let url = format!(
        "{}/v1/sandboxes/{id}/pty?{query}",
        api.base.replacen("http", "ws", 1)
    );
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.key_secret()).parse()?,
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Ok(Term {
            ws,
            seen: Vec::new(),
        })),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Ok(Err((resp.status().as_u16(), body)))
        }
        Err(e) => Err(e.into()),
    }
}

impl Term {
    async fn type_in(&mut self, text: &[u8]) -> Result<()> {
        self.ws.send(Message::Binary(text.to_vec().into())).await?;
        Ok(())
    }

    async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        let msg = serde_json::json!({"resize": {"cols": cols, "rows": rows}}).to_string();
        self.ws.send(Message::Text(msg.into())).await?;
        Ok(())
    }

    /// Reads output until it holds `needle` after what was consumed
    /// before; returns the output up to and including it.
    async fn expect(&mut self, needle: &str) -> Result<String> {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(at) = find(&self.seen, needle.as_bytes()) {
                    let end = at + needle.len();
                    let upto: Vec<u8> = self.seen.drain(..end).collect();
                    return Ok(String::from_utf8_lossy(&upto).into_owned());
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.seen.extend_from_slice(&b),
                    Some(Ok(Message::Close(c))) => bail!("closed ({c:?}) before {needle:?}"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("socket failed before {needle:?}: {e}"),
                    None => bail!("socket ended before {needle:?}"),
                }
            }
        })
        .await;
        match found {
            Ok(r) => r,
            Err(_) => bail!(
                "no {needle:?} in the output: {:?}",
                String::from_utf8_lossy(&self.seen)
            ),
        }
    }

    /// Reads until the server closes; returns the close code and reason.
    async fn closed(&mut self) -> Result<(CloseCode, String)> {
        let r = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.seen.extend_from_slice(&b),
                    Some(Ok(Message::Close(Some(c)))) => return Ok((c.code, c.reason.to_string())),
                    Some(Ok(Message::Close(None))) => bail!("closed without a code"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("socket failed before its close: {e}"),
                    None => bail!("socket ended without a close frame"),
                }
            }
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => bail!(
                "the terminal was not closed; output: {:?}",
                String::from_utf8_lossy(&self.seen)
            ),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A number no other process carries, to find a `sleep` job by.
fn job_number() -> Result<u32> {
    Ok(100_000 + u32::from_str_radix(&random_hex(4), 16)?)
}

/// Waits until `count` processes run `sleep n` in the sandbox.
async fn wait_jobs(api: &Api, id: &str, n: u32, count: usize, provider: &str) -> Result<()> {
    let script = format!(
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep {n} ' || true"
    );
    eventually(PATIENCE, &format!("{count} x sleep {n}"), || async {
        Ok((api.sh(id, &script).await?.trim() == count.to_string()).then_some(()))
    })
    .await
    .map_err(|e| anyhow!("{provider}: {e}"))
}

async fn term(api: &Api, id: &str, query: &str) -> Result<Term> {
    match open(api, id, query).await? {
        Ok(t) => Ok(t),
        Err((status, body)) => bail!("the terminal was refused: {status} {body}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_is_a_real_tty_on_every_provider() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,proot,namespaces"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    for provider in ["docker", "namespaces", "proot"] {
        let id = member.sandbox(provider).await?;
        let mut t = term(&member, &id, "cols=100&rows=30").await?;

        // The markers are computed by the shell, so the echoed command
        // line never matches them.
        t.type_in(b"tty; stty size; echo T$((40+2))T\n").await?;
        let out = t.expect("T42T").await?;
        ensure!(out.contains("/dev/pts/"), "{provider}: tty says {out:?}");
        ensure!(out.contains("30 100"), "{provider}: stty size said {out:?}");

        t.resize(50, 20).await?;
        t.type_in(b"stty size; echo R$((1+1))R\n").await?;
        let out = t.expect("R2R").await?;
        ensure!(out.contains("20 50"), "{provider}: after resize {out:?}");

        // Ctrl-C interrupts the foreground job; the shell lives on.
        // ^C is sent once the job runs (in the foreground), not while the
        // shell is still starting it.
        let n = job_number()?;
        t.type_in(format!("sleep {n}\n").as_bytes()).await?;
        wait_jobs(&member, &id, n, 1, provider).await?;
        t.type_in(&[0x03]).await?;
        t.type_in(b"echo C$((2+2))C\n").await?;
        t.expect("C4C").await?;

        t.type_in(b"exit 7\n").await?;
        let (code, reason) = t.closed().await?;
        ensure!(
            code == CloseCode::Normal && reason == "exit:7",
            "{provider}: closed with {code:?} {reason:?}"
        );

        // A command that does not exist says so and exits 127.
        let mut t = term(&member, &id, "cmd=no-such-program-here").await?;
        let (code, reason) = t.closed().await?;
        let said = String::from_utf8_lossy(&t.seen).into_owned();
        ensure!(
            code == CloseCode::Normal && reason == "exit:127" && said.contains("not found"),
            "{provider}: {code:?} {reason:?} {said:?}"
        );

        // argv is passed as given, one `cmd` per element.
        let mut t = term(&member, &id, "cmd=sh&cmd=-c&cmd=exit%203").await?;
        let (_, reason) = t.closed().await?;
        ensure!(reason == "exit:3", "{provider}: {reason}");
        member.destroy(&id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_the_socket_kills_the_command() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,proot,namespaces"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    for provider in ["docker", "namespaces", "proot"] {
        let id = member.sandbox(provider).await?;
        let n = job_number()?;
        let mut t = term(&member, &id, "").await?;
        t.type_in(format!("sleep {n}\n").as_bytes()).await?;
        wait_jobs(&member, &id, n, 1, provider).await?;
        t.ws.close(None).await?;
        drop(t);
        wait_jobs(&member, &id, n, 0, provider).await?;
        member.destroy(&id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn terminals_are_refused_clearly() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (tenant, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("proot").await?;

    for (query, what) in [
        ("cmd=", "cmd[0]"),
        ("cols=0", "cols"),
        ("rows=abc", "rows"),
        ("size=3", "unknown query parameter"),
    ] {
        match open(&member, &id, query).await? {
            Ok(_) => bail!("{query}: accepted"),
            Err((status, body)) => ensure!(
                status == 400 && body.contains(what),
                "{query}: {status} {body}"
            ),
        }
    }

    let (_, viewer) = admin.key(&tenant, "viewer").await?;
    match open(&viewer, &id, "").await? {
        Ok(_) => bail!("a viewer key opened a terminal"),
        Err((status, body)) => ensure!(status == 403, "viewer: {status} {body}"),
    }
    let (_, other) = admin.tenant_with("member").await?;
    match open(&other, &id, "").await? {
        Ok(_) => bail!("another tenant opened a terminal"),
        Err((status, body)) => ensure!(status == 404, "other tenant: {status} {body}"),
    }

    // A plain GET without an upgrade is told what the endpoint needs.
    let r = member.get(&format!("/v1/sandboxes/{id}/pty")).await?;
    ensure!(
        r.status == 400 && r.text().contains("WebSocket"),
        "plain GET: {} {}",
        r.status,
        r.text()
    );

    // The audit log names the terminal.
    let events = admin.audit(&format!("target={id}")).await?;
    ensure!(
        events
            .iter()
            .any(|e| e["action"].as_str().is_some_and(|a| a.contains("pty"))),
        "no pty audit event: {events:?}"
    );
    member.destroy(&id).await?;
    Ok(())
}
