//! The DNS filter of a sandbox with an allow list: it answers on the
//! sandbox's loopback (UDP and TCP sockets opened inside its network
//! namespace),
//! refuses every name not on the list with NXDOMAIN, forwards listed names
//! to the upstream resolver from the host's namespace, and adds the
//! addresses of each answer to the sandbox's nftables sets before the answer
//! is passed on, so the address a client gets is reachable when it
//! connects.
//!
//! Only the question is read from a query and only the answer section from a
//! reply; both are otherwise forwarded unchanged.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use stacyvm_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::{ResolvedSets, RESOLVER_PORT};

/// The largest DNS message over UDP (with EDNS) StacyVM passes on.
const MAX_MESSAGE: usize = 65_535;
/// How long one upstream gets to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries handled at once per sandbox; more are dropped (the client
/// retries), so a sandbox cannot make the server hold unbounded work.
const MAX_IN_FLIGHT: usize = 64;
/// DNS-over-TCP connections served at once per sandbox, and how long one
/// may sit idle.
const MAX_TCP_CONNECTIONS: usize = 16;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// At most this many addresses of one answer are made reachable.
const MAX_ADDRESSES_PER_ANSWER: usize = 32;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// The question of a query.
#[derive(Debug, PartialEq, Eq)]
pub struct Question {
    /// The name, lower-case and without the root dot; `None` when a label
    /// holds bytes no host name has (such a name is never allowed).
    pub name: Option<String>,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question ends in the message.
    pub end: usize,
}

/// Why a message could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed DNS message: {0}")]
pub struct Malformed(&'static str);

fn u16_at(msg: &[u8], at: usize) -> std::result::Result<u16, Malformed> {
    match msg.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(Malformed("truncated")),
    }
}

/// Reads the single question of a standard query.
pub fn parse_query(msg: &[u8]) -> std::result::Result<Question, Malformed> {
    if msg.len() < 12 {
        return Err(Malformed("shorter than a header"));
    }
    if msg[2] & 0x80 != 0 {
        return Err(Malformed("a response, not a query"));
    }
    if u16_at(msg, 4)? != 1 {
        return Err(Malformed("not exactly one question"));
    }
    let mut pos = 12;
    let mut labels: Vec<String> = Vec::new();
    let mut plain = true;
    loop {
        let len = *msg.get(pos).ok_or(Malformed("truncated name"))? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            // Compression has no place in a question.
            return Err(Malformed("a compressed or oversized label in the question"));
        }
        let label = msg
            .get(pos..pos + len)
            .ok_or(Malformed("truncated label"))?;
        pos += len;
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            plain = false;
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        if pos > 12 + 255 {
            return Err(Malformed("a name longer than 255 bytes"));
        }
    }
    let qtype = u16_at(msg, pos)?;
    let qclass = u16_at(msg, pos + 2)?;
    Ok(Question {
        name: plain.then(|| labels.join(".")),
        qtype,
        qclass,
        end: pos + 4,
    })
}

/// An answer of our own to `query`: its ID, question and recursion-desired
/// bit, with `rcode` and no records.
pub fn refusal(query: &[u8], question_end: usize, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(question_end.max(12));
    out.extend_from_slice(query.get(0..2).unwrap_or(&[0, 0]));
    let opcode_rd = query.get(2).copied().unwrap_or(0) & 0x79;
    out.push(0x80 | opcode_rd);
    out.push(0x80 | (rcode & 0x0f));
    let has_question = question_end > 12 && question_end <= query.len();
    out.extend_from_slice(&[0, u8::from(has_question), 0, 0, 0, 0, 0, 0]);
    if has_question {
        out.extend_from_slice(&query[12..question_end]);
    }
    out
}

/// Skips a (possibly compressed) name starting at `pos`.
fn skip_name(msg: &[u8], mut pos: usize) -> std::result::Result<usize, Malformed> {
    loop {
        let len = *msg.get(pos).ok_or(Malformed("truncated name"))?;
        match len {
            0 => return Ok(pos + 1),
            l if l & 0xc0 == 0xc0 => return Ok(pos + 2),
            l if l & 0xc0 == 0 => pos += 1 + l as usize,
            _ => return Err(Malformed("a label of an unknown kind")),
        }
    }
}

/// Checks that `reply` answers `query` (same ID, a response, the same
/// question) and returns the addresses of its answer section with their
/// TTLs.
pub fn reply_addresses(
    query: &[u8],
    question_end: usize,
    reply: &[u8],
) -> std::result::Result<Vec<(IpAddr, u32)>, Malformed> {
    if reply.len() < 12 || reply[0..2] != query[0..2] {
        return Err(Malformed("not the reply to this query"));
    }
    if reply[2] & 0x80 == 0 {
        return Err(Malformed("a query, not a reply"));
    }
    let qdcount = u16_at(reply, 4)?;
    let ancount = u16_at(reply, 6)?;
    if qdcount != 1
        || !reply
            .get(12..question_end)
            .is_some_and(|q| q.eq_ignore_ascii_case(&query[12..question_end]))
    {
        return Err(Malformed("a reply to another question"));
    }
    let mut pos = question_end;
    let mut out = Vec::new();
    for _ in 0..ancount {
        pos = skip_name(reply, pos)?;
        let rtype = u16_at(reply, pos)?;
        let rclass = u16_at(reply, pos + 2)?;
        let ttl = match reply.get(pos + 4..pos + 8) {
            Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            None => return Err(Malformed("truncated record")),
        };
        let rdlen = u16_at(reply, pos + 8)? as usize;
        let data = reply
            .get(pos + 10..pos + 10 + rdlen)
            .ok_or(Malformed("truncated record data"))?;
        pos += 10 + rdlen;
        if rclass != CLASS_IN {
            continue;
        }
        let addr = match (rtype, data.len()) {
            (TYPE_A, 4) => IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (TYPE_AAAA, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => continue,
        };
        // A negative TTL (top bit set) means zero (RFC 2181).
        let ttl = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
        out.push((addr, ttl));
        if out.len() == MAX_ADDRESSES_PER_ANSWER {
            break;
        }
    }
    Ok(out)
}

/// A running DNS filter; dropping it stops it and closes its socket.
pub struct DnsFilter {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DnsFilter {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Shared {
    sets: Arc<ResolvedSets>,
    names: HashSet<String>,
    upstreams: Vec<SocketAddr>,
    socket: UdpSocket,
}

impl DnsFilter {
    /// Opens the filter's sockets on its placement's resolver address
    /// inside the sandbox's namespace and starts serving.
    pub async fn start(
        sets: Arc<ResolvedSets>,
        names: Vec<String>,
        upstreams: Vec<SocketAddr>,
    ) -> Result<DnsFilter> {
        let at = sets.placement().resolver();
        let (std_socket, std_listener) = sets
            .netns()
            .run(|| {
                let s = std::net::UdpSocket::bind((at, RESOLVER_PORT))?;
                s.set_nonblocking(true)?;
                let l = std::net::TcpListener::bind((at, RESOLVER_PORT))?;
                l.set_nonblocking(true)?;
                Ok((s, l))
            })
            .map_err(|e| {
                Error::ProviderUnavailable(format!(
                    "opening the DNS filter's sockets {at}:{RESOLVER_PORT} in the \
                     sandbox's network namespace: {e}"
                ))
            })?;
        let socket = UdpSocket::from_std(std_socket)
            .map_err(|e| Error::internal("registering the DNS filter's socket", e))?;
        let listener = TcpListener::from_std(std_listener)
            .map_err(|e| Error::internal("registering the DNS filter's listener", e))?;
        let shared = Arc::new(Shared {
            sets,
            names: names.into_iter().collect(),
            upstreams,
            socket,
        });
        let tasks = vec![
            tokio::spawn(serve(shared.clone())),
            tokio::spawn(serve_tcp(shared, listener)),
        ];
        Ok(DnsFilter { tasks })
    }
}

async fn serve(shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, client) = match shared.socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier replies surface here; they concern
                // one client, not the socket.
                tracing::debug!(error = %e, "DNS filter receive");
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let shared = shared.clone();
        tokio::spawn(async move {
            let reply = answer(&shared, &query, Transport::Udp).await;
            let _ = shared.socket.send_to(&reply, client).await;
            drop(permit);
        });
    }
}

/// How a query reached the filter, and so how it is asked upstream: a
/// client that came over TCP (typically after a truncated answer) gets the
/// whole answer over TCP too.
#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// Serves DNS over TCP (RFC 7766: two-byte length, then the message), a
/// connection at a time per client, each closed when idle.
async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of descriptors, typically: wait rather than spin.
                tracing::debug!(error = %e, "DNS filter accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tcp_connection(&shared, conn).await;
            drop(permit);
        });
    }
}

async fn tcp_connection(shared: &Shared, mut conn: TcpStream) -> io::Result<()> {
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await {
            Ok(Ok(Some(q))) => q,
            _ => return Ok(()),
        };
        let reply = answer(shared, &query, Transport::Tcp).await;
        write_framed(&mut conn, &reply).await?;
    }
}

/// One length-prefixed message; `None` at a clean end of the stream.
async fn read_framed(conn: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match conn.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn write_framed(conn: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out).await
}

/// The reply the sandbox gets to `query`.
async fn answer(shared: &Shared, query: &[u8], transport: Transport) -> Vec<u8> {
    let q = match parse_query(query) {
        Ok(q) => q,
        Err(_) => return refusal(query, 0, RCODE_FORMERR),
    };
    // Only standard queries (opcode 0) of class IN.
    if (query[2] >> 3) & 0x0f != 0 || q.qclass != CLASS_IN {
        return refusal(query, q.end, RCODE_NOTIMP);
    }
    let allowed = q.name.as_ref().is_some_and(|n| shared.names.contains(n));
    if !allowed {
        return refusal(query, q.end, RCODE_NXDOMAIN);
    }
    for upstream in &shared.upstreams {
        let asked = match transport {
            Transport::Udp => ask(*upstream, query).await,
            Transport::Tcp => ask_tcp(*upstream, query).await,
        };
        let reply = match asked {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%upstream, error = %e, "DNS filter upstream");
                continue;
            }
        };
        let addrs = match reply_addresses(query, q.end, &reply) {
            Ok(a) => a,
            Err(_) => continue,
        };
        return match shared.sets.add(&addrs).await {
            Ok(()) => reply,
            Err(e) => {
                tracing::warn!(error = %e.message(), "adding resolved addresses to a sandbox's allow list");
                refusal(query, q.end, RCODE_SERVFAIL)
            }
        };
    }
    refusal(query, q.end, RCODE_SERVFAIL)
}

/// One exchange with an upstream over UDP from a fresh socket (a fresh
/// source port per query), skipping datagrams that are not its reply.
async fn ask(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            if n >= 12 && buf[0..2] == query[0..2] {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
}

/// One exchange with an upstream over TCP.
async fn ask_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        let mut conn = TcpStream::connect(upstream).await?;
        write_framed(&mut conn, query).await?;
        read_framed(&mut conn)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no reply"))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m
    }

    #[test]
    fn a_query_yields_its_lower_case_name() {
        let q = query(7, "Pypi.ORG", TYPE_A);
        let parsed = parse_query(&q).unwrap();
        assert_eq!(parsed.name.as_deref(), Some("pypi.org"));
        assert_eq!(parsed.qtype, TYPE_A);
        assert_eq!(parsed.end, q.len());
        let odd = query(7, "a\u{1}b.org", TYPE_A);
        assert_eq!(parse_query(&odd).unwrap().name, None);
        assert!(parse_query(&q[..14]).is_err());
        assert!(parse_query(&[0; 5]).is_err());
    }

    #[test]
    fn a_refusal_keeps_id_and_question() {
        let q = query(0xabcd, "denied.test", TYPE_A);
        let end = parse_query(&q).unwrap().end;
        let r = refusal(&q, end, RCODE_NXDOMAIN);
        assert_eq!(&r[0..2], &[0xab, 0xcd]);
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        assert_eq!(&r[12..], &q[12..]);
        // Garbage still gets a header-only FORMERR.
        assert_eq!(refusal(&[1, 2, 3], 0, RCODE_FORMERR).len(), 12);
    }

    #[test]
    fn addresses_are_read_from_the_answer_section() {
        let q = query(9, "allowed.test", TYPE_A);
        let end = q.len();
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 3; // three answers
                  // A CNAME (skipped), then an A record and an AAAA, names compressed.
        r.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 10, 0, 2, 0xc0, 12]);
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 192, 0, 2, 9]);
        r.extend_from_slice(&[0xc0, 12, 0, 28, 0, 1, 0x80, 0, 0, 0, 0, 16]);
        r.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        let got = reply_addresses(&q, end, &r).unwrap();
        assert_eq!(
            got,
            vec![
                ("192.0.2.9".parse().unwrap(), 256),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 0)
            ]
        );
        // Another ID or question is not this query's reply.
        let mut other = r.clone();
        other[1] ^= 1;
        assert!(reply_addresses(&q, end, &other).is_err());
        let mut other = r.clone();
        other[14] = b'x';
        assert!(reply_addresses(&q, end, &other).is_err());
        // A truncated record is refused, not read past.
        assert!(reply_addresses(&q, end, &r[..r.len() - 3]).is_err());
    }
}
