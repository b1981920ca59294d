//! The host side of a hybrid vsock (Firecracker's, and vhost-device-vsock's
//! `--uds-path`): a Unix socket on which `CONNECT <port>\n` asks for a
//! connection to a guest port and `OK <host port>\n` grants it; after that
//! the socket carries the guest connection's bytes.

use std::path::Path;
use std::time::Duration;

use stacyvm_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The longest answer line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_ANSWER: usize = 64;

/// Connects to guest `port` through the hybrid-vsock socket `uds`.
/// `Conflict` when the guest does not (yet) listen there.
pub async fn connect(uds: &Path, port: u32, limit: Duration) -> Result<UnixStream> {
    let attempt = async {
        let mut s = UnixStream::connect(uds).await.map_err(|e| {
            Error::Conflict(format!(
                "cannot reach the vsock socket {}: {e}",
                uds.display()
            ))
        })?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| Error::Conflict(format!("vsock CONNECT {port}: {e}")))?;
        // Byte by byte: what follows the newline is already the guest's.
        let mut line = Vec::new();
        loop {
            let mut b = [0u8; 1];
            let n = s
                .read(&mut b)
                .await
                .map_err(|e| Error::Conflict(format!("vsock CONNECT {port}: {e}")))?;
            if n == 0 {
                return Err(Error::Conflict(format!(
                    "nothing listens on guest vsock port {port}"
                )));
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > MAX_ANSWER {
                return Err(Error::Conflict("the vsock socket answered garbage".into()));
            }
        }
        let line = String::from_utf8_lossy(&line);
        if line.starts_with("OK ") {
            Ok(s)
        } else {
            Err(Error::Conflict(format!(
                "vsock CONNECT {port} was refused: {line}"
            )))
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| Error::Conflict(format!("vsock CONNECT {port} got no answer")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[tokio::test]
    async fn the_handshake_is_spoken_and_later_bytes_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            r.get_mut().write_all(b"OK 7\nhello").await.unwrap();
            // A second listener answer: refusal.
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        let mut s = connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        let e = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        server.await.unwrap();
    }
}
