//! Relays a TCP port of the sandbox's own loopback over the agent's
//! connection, so the control plane can reach a server inside a sandbox
//! that has no network interface at all.
//!
//! The agent only ever dials `127.0.0.1`: the request carries a port and
//! no host, so a relay can never be aimed at another machine or sandbox.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use stacyvm_core::Error;

use crate::flow::{Out, Sent};
use crate::protocol::{Kind, CHUNK_SIZE};
use crate::upload::{Upload, UploadRx};

/// How long dialling the port may take: it is on loopback, so a listener
/// answers at once and only a full backlog makes it wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the relay ends with, for the connection's answer.
pub enum Relayed {
    /// The server closed its side: the request ends with `End`.
    Closed,
    /// Cancelled or the connection is gone.
    Stopped,
}

/// Dials `127.0.0.1:port`, acknowledges with `Ok`, then copies the server's
/// bytes out as `Data` chunks while a second thread writes the client's
/// `Data` into the socket (its `End` half-closes the socket).
pub fn relay(port: u16, out: &Out, upload: UploadRx) -> Result<Relayed, Error> {
    if port == 0 {
        return Err(Error::InvalidRequest(
            "port 0 cannot be connected to".into(),
        ));
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
        Error::ProviderUnavailable(format!(
            "nothing accepts connections on port {port} inside the sandbox: {e}"
        ))
    })?;
    let _ = sock.set_nodelay(true);
    let writer = sock
        .try_clone()
        .map_err(|e| Error::internal("sharing the relay socket", e))?;
    if !out.send(Kind::Ok, b"null") {
        return Ok(Relayed::Stopped);
    }
    let pump_out = out.clone();
    let pump = std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || pump_in(writer, upload, &pump_out))
        .map_err(|e| Error::from_spawn("starting the relay's writer", &e))?;
    let end = pump_out_loop(&sock, out);
    // Whatever ended the relay, the socket goes: the writer thread then
    // fails its next write, and the upload queue closes with the request.
    let _ = sock.shutdown(Shutdown::Both);
    drop(pump);
    Ok(end)
}

fn pump_out_loop(sock: &TcpStream, out: &Out) -> Relayed {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut reader = sock;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A reset is the server's way of closing too.
            Err(_) => 0,
        };
        if n == 0 {
            return Relayed::Closed;
        }
        if out.chunk(Kind::Data, &buf[..n], None) != Sent::Sent {
            return Relayed::Stopped;
        }
    }
}

fn pump_in(mut sock: TcpStream, mut upload: UploadRx, out: &Out) {
    loop {
        match upload.next(out) {
            Some(Upload::Data(d)) => {
                if sock.write_all(&d).is_err() {
                    return;
                }
            }
            Some(Upload::End) => {
                let _ = sock.shutdown(Shutdown::Write);
                return;
            }
            None => {
                let _ = sock.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}
