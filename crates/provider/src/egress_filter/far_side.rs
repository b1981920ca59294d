//! Test support for allow lists: machines beyond the host, in a network
//! namespace the test creates behind a veth pair, with TCP servers and a DNS
//! server of its own. Only addresses of the benchmarking block 198.18.0.0/15
//! are used, a /29 per instance chosen at random; dropping the value
//! removes the namespace, the veth pair and the servers.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::NetNs;

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Machines beyond the host for allow-list tests: a network namespace
/// behind a veth pair, with addresses of the benchmarking block
/// 198.18.0.0/15 that this test alone uses, and servers in it run by the
/// test: TCP servers that greet with their address, and a DNS server that
/// knows `allowed.test` and `denied.test` and records what it was asked.
pub struct FarSide {
    pub netns: String,
    /// `.2` (allowed by network), `.3` (denied), `.4` (the DNS upstream),
    /// `.5` (the address of `allowed.test`).
    pub allowed: String,
    pub denied: String,
    pub dns: String,
    pub named: String,
    pub port: u16,
    asked: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FarSide {
    /// Creates the namespace, its veth pair and addresses, and starts the
    /// servers (as tasks of the calling runtime).
    pub async fn start() -> Result<FarSide> {
        let id = stacyvm_core::SandboxId::generate().to_string();
        let tag = &id[id.len() - 8..];
        let seed = u32::from_str_radix(tag, 16)?;
        let (b2, b3, b4) = (18 + (seed >> 13) % 2, (seed >> 5) % 256, (seed % 32) * 8);
        let at = |n: u32| format!("198.{b2}.{b3}.{}", b4 + n);
        let mut far = FarSide {
            netns: format!("svme-{tag}"),
            allowed: at(2),
            denied: at(3),
            dns: at(4),
            named: at(5),
            port: 9100,
            asked: Arc::new(Mutex::new(Vec::new())),
            tasks: Vec::new(),
        };
        let (host_end, far_end) = (format!("sve{tag}h"), format!("sve{tag}n"));
        let ns = far.netns.clone();
        ip(&["netns", "add", &ns])?;
        let host_addr = format!("{}/29", at(1));
        let mut steps: Vec<Vec<String>> = vec![
            vec![
                "link".into(),
                "add".into(),
                host_end.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                far_end.clone(),
                "netns".into(),
                ns.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                host_addr,
                "dev".into(),
                host_end.clone(),
            ],
            vec!["link".into(), "set".into(), host_end.clone(), "up".into()],
        ];
        for n in 2..=5 {
            steps.push(vec![
                "-n".into(),
                ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/29", at(n)),
                "dev".into(),
                far_end.clone(),
            ]);
        }
        steps.push(vec![
            "-n".into(),
            ns.clone(),
            "link".into(),
            "set".into(),
            far_end.clone(),
            "up".into(),
        ]);
        steps.push(vec![
            "-n".into(),
            ns.clone(),
            "link".into(),
            "set".into(),
            "lo".into(),
            "up".into(),
        ]);
        steps.push(vec![
            "-n".into(),
            ns.clone(),
            "route".into(),
            "add".into(),
            "default".into(),
            "via".into(),
            at(1),
        ]);
        for args in &steps {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ip(&args)?;
        }
        let netns = NetNs::open(&format!("/run/netns/{ns}"))?;
        for addr in [&far.allowed, &far.denied, &far.named] {
            let bind = format!("{addr}:{}", far.port);
            let listener = netns.run(move || {
                let l = std::net::TcpListener::bind(&bind)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let greeting = format!("hello-from-{addr}\n");
            far.tasks.push(tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let _ = conn.write_all(greeting.as_bytes()).await;
                }
            }));
        }
        let bind = format!("{}:53", far.dns);
        let (socket, listener) = netns.run(move || {
            let s = std::net::UdpSocket::bind(&bind)?;
            s.set_nonblocking(true)?;
            let l = std::net::TcpListener::bind(&bind)?;
            l.set_nonblocking(true)?;
            Ok((s, l))
        })?;
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let names = [
            ("allowed.test", far.named.clone()),
            ("denied.test", far.denied.clone()),
        ];
        let (tcp_names, tcp_asked) = (names.clone(), far.asked.clone());
        far.tasks.push(tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut len = [0u8; 2];
                if conn.read_exact(&mut len).await.is_err() {
                    continue;
                }
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if conn.read_exact(&mut q).await.is_err() {
                    continue;
                }
                let (name, reply) = stub_dns_reply(&q, &tcp_names);
                if let Ok(mut a) = tcp_asked.lock() {
                    a.push(name);
                }
                let mut out = (reply.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&reply);
                let _ = conn.write_all(&out).await;
            }
        }));
        let asked = far.asked.clone();
        far.tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let (name, reply) = stub_dns_reply(&buf[..n], &names);
                if let Ok(mut a) = asked.lock() {
                    a.push(name);
                }
                let _ = socket.send_to(&reply, peer).await;
            }
        }));
        Ok(far)
    }

    /// The names the DNS server was asked for, in order.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl Drop for FarSide {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Takes the veth pair, its addresses and the servers' sockets along.
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// A standard query for the A record of `name`, with ID `id`.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// Asks `server` for `name`'s A record over TCP from inside `netns`;
/// returns the reply's rcode and its addresses.
pub fn ask_over_tcp(
    netns: &NetNs,
    server: std::net::SocketAddr,
    name: &str,
) -> Result<(u8, Vec<std::net::IpAddr>)> {
    use std::io::{Read, Write};
    let query = a_query(0x5eed, name);
    let reply = netns.run(|| {
        let mut conn =
            std::net::TcpStream::connect_timeout(&server, std::time::Duration::from_secs(5))?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let mut out = (query.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&query);
        conn.write_all(&out)?;
        let mut len = [0u8; 2];
        conn.read_exact(&mut len)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut reply)?;
        Ok(reply)
    })?;
    if reply.len() < 12 {
        bail!("a short reply: {reply:?}");
    }
    let addrs = super::dns::reply_addresses(&query, query.len(), &reply)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((reply[3] & 0x0f, addrs.into_iter().map(|(a, _)| a).collect()))
}

/// A DNS server's answer: the A record of a known name (TTL 5 s, shorter
/// than the filter keeps addresses), NXDOMAIN otherwise. Returns the name
/// asked for too.
fn stub_dns_reply(q: &[u8], names: &[(&str, String)]) -> (String, Vec<u8>) {
    let mut labels = Vec::new();
    let mut pos = 12;
    while let Some(&len) = q.get(pos) {
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(
            String::from_utf8_lossy(q.get(pos..pos + len as usize).unwrap_or(b"?")).into_owned(),
        );
        pos += len as usize;
    }
    let name = labels.join(".").to_ascii_lowercase();
    let qtype = q
        .get(pos..pos + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .unwrap_or(0);
    let end = (pos + 4).min(q.len());
    let mut r = q[..end].to_vec();
    if r.len() < 12 {
        return (name, r);
    }
    r[2] = 0x81;
    r[3] = 0x80;
    r[6..12].copy_from_slice(&[0; 6]);
    match names.iter().find(|(n, _)| *n == name) {
        Some((_, addr)) if qtype == 1 => {
            r[7] = 1;
            let ip: std::net::Ipv4Addr = addr.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
            r.extend_from_slice(&ip.octets());
        }
        // Known, but no record of that type.
        Some(_) => {}
        None => r[3] = 0x83,
    }
    (name, r)
}
