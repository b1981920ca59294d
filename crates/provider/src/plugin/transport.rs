//! Reaching a plugin runtime's agent where the plugin says it listens: a
//! Unix socket (checked like every provider's: never through a symbolic
//! link, and the peer against the ids the plugin names), a TCP address, or
//! a vsock port (through the kernel, or behind a host socket that takes
//! Firecracker's `CONNECT <port>`). Exec, streams and files then go to the
//! agent directly, never through the plugin.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use stacyvm_core::{Error, Result};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};

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
        AgentEndpoint::Vsock { cid, port } => format!("vsock:{cid}:{port}"),
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
        AgentEndpoint::Vsock { cid, .. } => {
            // 0 is the hypervisor, 1 the local loopback, 2 the host: none is
            // a guest of this host, and u32::MAX means any.
            if *cid < 3 && *cid != 1 || *cid == u32::MAX {
                Err(format!("vsock CID {cid} names no guest"))
            } else {
                Ok(())
            }
        }
    }
}

/// Connects to the agent at `ep` and negotiates the agent protocol.
pub async fn connect(ep: &AgentEndpoint) -> Result<AgentClient> {
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
            AgentClient::connect_unix_checked(path, &check).await
        }
        AgentEndpoint::Tcp { address } => {
            let addr: SocketAddr = address.parse().map_err(|e| unreachable(ep, e))?;
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(ep, e))?;
            stream.set_nodelay(true).map_err(|e| unreachable(ep, e))?;
            let (r, w) = stream.into_split();
            AgentClient::over(r, w).await
        }
        AgentEndpoint::Vsock { cid, port } => {
            let stream = VsockStream::connect(*cid, *port)
                .await
                .map_err(|e| unreachable(ep, e))?;
            let (r, w) = tokio::io::split(stream);
            AgentClient::over(r, w).await
        }
        AgentEndpoint::VsockUds { path, port } => {
            let stream = connect_hybrid(path, *port)
                .await
                .map_err(|e| unreachable(ep, e))?;
            let (r, w) = stream.into_split();
            AgentClient::over(r, w).await
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

/// A connected `AF_VSOCK` stream socket, driven by tokio's reactor.
struct VsockStream {
    fd: AsyncFd<OwnedFd>,
}

impl VsockStream {
    async fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
        // SAFETY: socket() has no memory effects; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just opened and own alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        // SAFETY: `addr` lives across the call and its size is passed.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, which alone closes
        // it, so it stays open and the same socket for the AsyncFd's life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        if rc < 0 {
            // A non-blocking connect finishes when the socket is writable;
            // SO_ERROR says how.
            let mut guard = fd.writable().await?;
            guard.clear_ready();
            let mut err: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: `err` and `len` are valid for writes of their sizes.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    std::ptr::addr_of_mut!(err).cast(),
                    &mut len,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        Ok(VsockStream { fd })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                // SAFETY: `unfilled` is valid for writes of its length.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let res = guard.try_io(|fd| {
                // SAFETY: `data` is valid for reads of its length.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown has no memory effects on a descriptor we own.
        let rc = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        if rc < 0 {
            Poll::Ready(Err(io::Error::last_os_error()))
        } else {
            Poll::Ready(Ok(()))
        }
    }
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
            AgentEndpoint::Vsock { cid: 3, port: 52 },
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
            AgentEndpoint::Vsock { cid: 2, port: 52 },
            AgentEndpoint::Vsock {
                cid: u32::MAX,
                port: 52,
            },
        ];
        for ep in &bad {
            assert!(check(ep).is_err(), "{ep:?}");
        }
    }
}
