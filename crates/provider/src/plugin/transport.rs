//! Reaching a plugin runtime's agent where the plugin says it listens: a
//! Unix socket (checked like every provider's: never through a symbolic
//! link, and the peer against the ids the plugin names), a TCP address, or
//! a vsock port behind a host socket that takes Firecracker's
//! `CONNECT <port>`. Exec, streams and files then go to the agent directly,
//! never through the plugin.

use std::io;
use std::net::SocketAddr;
use std::path::Path;

use stacyvm_core::{Error, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::protocol::AgentEndpoint;
use crate::agent_client::{AgentClient, PeerCheck};

/// Longest answer to `CONNECT <port>` read from a hybrid vsock socket.
const MAX_CONNECT_ANSWER: usize = 64;

fn unreachable(ep: &AgentEndpoint, e: impl std::fmt::Display) -> Error {
    Error::ProviderUnavailable(format!("the agent at {} is unreachable: {e}", describe(ep)))
}

/// The endpoint in words, for messages.
pub fn describe(ep: &AgentEndpoint) -> String {
    match ep {
        AgentEndpoint::Unix { path, .. } => format!("unix:{}", path.display()),
        AgentEndpoint::Tcp { address } => format!("tcp:{address}"),
        AgentEndpoint::VsockUds { path, port } => format!("vsock:{}:{port}", path.display()),
    }
}

/// Checks what a plugin answered before anything connects to it.
pub fn check(ep: &AgentEndpoint) -> std::result::Result<(), String> {
    let absolute = |p: &Path| {
        if p.is_absolute() {
            Ok(())
        } else {
            Err(format!("the socket path {} is not absolute", p.display()))
        }
    };
    match ep {
        AgentEndpoint::Unix { path, .. } | AgentEndpoint::VsockUds { path, .. } => absolute(path),
        AgentEndpoint::Tcp { address } => address
            .parse::<SocketAddr>()
            .map(|_| ())
            .map_err(|_| format!("the TCP address {address:?} is not IP:PORT")),
    }
}

/// Connects to the agent at `ep` and negotiates the agent protocol.
pub async fn connect(ep: &AgentEndpoint) -> Result<AgentClient> {
    let (r, w) = tokio::io::split(connect_raw(ep).await?);
    AgentClient::over(r, w).await
}

/// Connects to the agent at `ep` with the same checks as [`connect`] and
/// hands back the raw connection (see `Provider::agent_stream`).
pub async fn connect_raw(ep: &AgentEndpoint) -> Result<crate::AgentStream> {
    check(ep).map_err(|e| unreachable(ep, e))?;
    match ep {
        AgentEndpoint::Unix {
            path,
            peer_uid,
            peer_pid,
            peer_ancestor,
        } => {
            let check = PeerCheck {
                uid: *peer_uid,
                pid: *peer_pid,
                ancestor: *peer_ancestor,
            };
            Ok(Box::new(
                crate::agent_client::connect_unix_raw(path, &check).await?,
            ))
        }
        AgentEndpoint::Tcp { address } => {
            let addr: SocketAddr = address.parse().map_err(|e| unreachable(ep, e))?;
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(ep, e))?;
            stream.set_nodelay(true).map_err(|e| unreachable(ep, e))?;
            Ok(Box::new(stream))
        }
        AgentEndpoint::VsockUds { path, port } => {
            let stream = connect_hybrid(path, *port)
                .await
                .map_err(|e| unreachable(ep, e))?;
            Ok(Box::new(stream))
        }
    }
}

/// Opens a hybrid vsock connection: a host Unix socket, `CONNECT <port>\n`,
/// and an `OK <n>\n` answer, after which the stream is the guest's port.
async fn connect_hybrid(path: &Path, port: u32) -> io::Result<tokio::net::UnixStream> {
    let meta = tokio::fs::symlink_metadata(path).await?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::other("the socket path is a symbolic link"));
    }
    let mut stream = tokio::net::UnixStream::connect(path).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    // Read the answer a byte at a time: what follows it belongs to the agent
    // protocol and must stay in the socket.
    let mut answer = Vec::new();
    let mut r = BufReader::with_capacity(1, &mut stream);
    loop {
        let avail = r.fill_buf().await?;
        let Some(&b) = avail.first() else {
            return Err(io::Error::other(
                "the socket closed before answering CONNECT",
            ));
        };
        r.consume(1);
        if b == b'\n' {
            break;
        }
        answer.push(b);
        if answer.len() > MAX_CONNECT_ANSWER {
            return Err(io::Error::other("an overlong answer to CONNECT"));
        }
    }
    drop(r);
    if !answer.starts_with(b"OK ") {
        return Err(io::Error::other(format!(
            "CONNECT {port} was refused: {}",
            String::from_utf8_lossy(&answer)
        )));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_before_use() {
        let ok = [
            AgentEndpoint::Unix {
                path: "/run/a.sock".into(),
                peer_uid: None,
                peer_pid: None,
                peer_ancestor: None,
            },
            AgentEndpoint::Tcp {
                address: "127.0.0.1:4000".into(),
            },
            AgentEndpoint::Tcp {
                address: "[::1]:4000".into(),
            },
            AgentEndpoint::VsockUds {
                path: "/run/v.sock".into(),
                port: 52,
            },
        ];
        for ep in &ok {
            assert_eq!(check(ep), Ok(()), "{ep:?}");
        }
        let bad = [
            AgentEndpoint::Unix {
                path: "relative.sock".into(),
                peer_uid: None,
                peer_pid: None,
                peer_ancestor: None,
            },
            AgentEndpoint::Tcp {
                address: "localhost:4000".into(),
            },
        ];
        for ep in &bad {
            assert!(check(ep).is_err(), "{ep:?}");
        }
    }
}
