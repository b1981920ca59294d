//! Firecracker's API: HTTP/1.1 with JSON bodies on a Unix socket
//! (`--api-sock`). One request a connection; the answer is read to its
//! `Content-Length`, so a server that keeps the connection open is fine.
//! The request bodies are built here, one function a call StacyVM makes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use stacyvm_core::{Error, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The guest CID; one guest a Firecracker process, so any CID above 2.
pub const GUEST_CID: u32 = 3;
/// The kernel command line: the console on the serial port (the runtime
/// log), no PCI (Firecracker's devices are virtio-mmio), and a panic
/// restarts, which ends the Firecracker process.
pub const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";
/// The longest answer accepted (Firecracker's are small JSON objects).
const MAX_BODY: usize = 1 << 20;
/// How long one API call may take (a snapshot writes the guest's memory).
const LIMIT: Duration = Duration::from_secs(120);

/// A client of one Firecracker API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: &Path) -> ApiClient {
        ApiClient {
            socket: socket.to_path_buf(),
        }
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.request("PUT", path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        self.request("PATCH", path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.request("GET", path, None).await
    }

    /// Sends one request; a 2xx answer's body (`null` when empty), or the
    /// error with Firecracker's `fault_message`.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        tokio::time::timeout(LIMIT, self.request_inner(method, path, body))
            .await
            .map_err(|_| {
                Error::Internal(format!(
                    "firecracker did not answer {method} {path} in time"
                ))
            })?
    }

    async fn request_inner(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let s = UnixStream::connect(&self.socket).await.map_err(|e| {
            Error::Conflict(format!(
                "cannot reach the firecracker API socket {}: {e}",
                self.socket.display()
            ))
        })?;
        let mut s = tokio::io::BufReader::new(s);
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        req.push_str(&body);
        let io = |e: std::io::Error| Error::internal(format!("firecracker API {method} {path}"), e);
        s.get_mut().write_all(req.as_bytes()).await.map_err(io)?;

        let mut status_line = String::new();
        s.read_line(&mut status_line).await.map_err(io)?;
        let status = parse_status(&status_line).ok_or_else(|| {
            Error::Internal(format!(
                "firecracker API {method} {path}: not an HTTP answer: {:?}",
                status_line.trim_end()
            ))
        })?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if s.read_line(&mut line).await.map_err(io)? == 0 {
                return Err(Error::Internal(format!(
                    "firecracker API {method} {path}: the answer ended in its headers"
                )));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().map_err(|_| {
                        Error::Internal(format!("firecracker API: bad Content-Length {v:?}"))
                    })?;
                }
            }
        }
        if length > MAX_BODY {
            return Err(Error::Internal(format!(
                "firecracker API {method} {path}: an answer of {length} bytes"
            )));
        }
        let mut data = vec![0u8; length];
        s.read_exact(&mut data).await.map_err(io)?;
        let value: Value = if data.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&data)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&data).into_owned()))
        };
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let why = value
                .get("fault_message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            Err(Error::Internal(format!(
                "firecracker refused {method} {path} ({status}): {why}"
            )))
        }
    }
}

fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// `PUT /boot-source`: the uncompressed kernel and the initramfs.
pub fn boot_source(kernel: &Path, initrd: &Path) -> Value {
    json!({
        "kernel_image_path": kernel,
        "initrd_path": initrd,
        "boot_args": BOOT_ARGS,
    })
}

/// `PUT /drives/{id}`. No drive is Firecracker's root device: the guest's
/// init (in the initramfs) mounts the first disk itself, so the disks
/// keep the order they were added in (`/dev/vda`, `/dev/vdb`).
pub fn drive(id: &str, path: &Path, read_only: bool) -> Value {
    json!({
        "drive_id": id,
        "path_on_host": path,
        "is_root_device": false,
        "is_read_only": read_only,
    })
}

/// `PUT /machine-config`.
pub fn machine_config(vcpus: u64, memory_mb: u64) -> Value {
    json!({ "vcpu_count": vcpus, "mem_size_mib": memory_mb, "smt": false })
}

/// `PUT /vsock`: the host end is the hybrid-vsock socket `uds`.
pub fn vsock(uds: &Path) -> Value {
    json!({ "guest_cid": GUEST_CID, "uds_path": uds })
}

/// `PUT /network-interfaces/eth0`: the tap device in the sandbox's
/// network namespace, where Firecracker runs.
pub fn network_interface(tap: &str, mac: &str) -> Value {
    json!({ "iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac })
}

/// `PUT /actions` starting the guest.
pub fn instance_start() -> Value {
    json!({ "action_type": "InstanceStart" })
}

/// `PATCH /vm`: pause or resume the guest's vCPUs.
pub fn vm_state(paused: bool) -> Value {
    json!({ "state": if paused { "Paused" } else { "Resumed" } })
}

/// `PUT /snapshot/create` of a paused guest: its device state and memory.
pub fn snapshot_create(state: &Path, memory: &Path) -> Value {
    json!({ "snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory })
}

/// `PUT /snapshot/load` into a fresh Firecracker, running it at once.
pub fn snapshot_load(state: &Path, memory: &Path) -> Value {
    json!({
        "snapshot_path": state,
        "mem_backend": { "backend_type": "File", "backend_path": memory },
        "resume_vm": true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn bodies_carry_what_firecracker_expects() {
        let b = boot_source(Path::new("/g/vmlinux"), Path::new("/c/initrd"));
        assert_eq!(b["kernel_image_path"], "/g/vmlinux");
        assert_eq!(b["initrd_path"], "/c/initrd");
        assert!(b["boot_args"].as_str().unwrap().contains("console=ttyS0"));
        let d = drive("settings", Path::new("/s/settings.tar"), true);
        assert_eq!(
            d,
            json!({"drive_id": "settings", "path_on_host": "/s/settings.tar",
                   "is_root_device": false, "is_read_only": true})
        );
        assert_eq!(
            machine_config(2, 512),
            json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false})
        );
        assert_eq!(
            vsock(Path::new("/s/v.sock")),
            json!({"guest_cid": 3, "uds_path": "/s/v.sock"})
        );
        assert_eq!(
            network_interface("tap0", "02:00:00:00:00:01"),
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01"})
        );
        assert_eq!(instance_start(), json!({"action_type": "InstanceStart"}));
        assert_eq!(vm_state(true), json!({"state": "Paused"}));
        assert_eq!(vm_state(false), json!({"state": "Resumed"}));
        assert_eq!(
            snapshot_create(Path::new("/s/state"), Path::new("/s/mem")),
            json!({"snapshot_type": "Full", "snapshot_path": "/s/state", "mem_file_path": "/s/mem"})
        );
        let l = snapshot_load(Path::new("/s/state"), Path::new("/s/mem"));
        assert_eq!(l["mem_backend"]["backend_type"], "File");
        assert_eq!(l["mem_backend"]["backend_path"], "/s/mem");
        assert_eq!(l["resume_vm"], true);
    }

    /// A fake API server: answers each connection with `answer` and sends
    /// back the request it read.
    async fn serve_once(
        l: &UnixListener,
        answer: &'static str,
    ) -> tokio::task::JoinHandle<(String, String)> {
        let (s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let mut r = tokio::io::BufReader::new(s);
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            r.read_exact(&mut body).await.unwrap();
            r.get_mut().write_all(answer.as_bytes()).await.unwrap();
            // Kept open, like a keep-alive server.
            tokio::time::sleep(Duration::from_millis(200)).await;
            (head, String::from_utf8(body).unwrap())
        })
    }

    #[tokio::test]
    async fn the_client_speaks_http_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let c = ApiClient::new(&sock);

        let call = tokio::spawn({
            let c = c.clone();
            async move { c.put("/actions", &instance_start()).await }
        });
        let seen = serve_once(
            &l,
            "HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n",
        )
        .await
        .await
        .unwrap();
        assert_eq!(call.await.unwrap().unwrap(), Value::Null);
        assert!(
            seen.0.starts_with("PUT /actions HTTP/1.1\r\n"),
            "{}",
            seen.0
        );
        assert!(seen.0.contains("Content-Type: application/json"));
        assert_eq!(
            serde_json::from_str::<Value>(&seen.1).unwrap(),
            instance_start()
        );

        let call = tokio::spawn({
            let c = c.clone();
            async move { c.get("/").await }
        });
        let body = r#"{"id":"anonymous-instance","state":"Running"}"#;
        let answer: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let seen = serve_once(&l, answer).await.await.unwrap();
        assert!(seen.0.starts_with("GET / HTTP/1.1\r\n"));
        assert_eq!(call.await.unwrap().unwrap()["state"], "Running");

        let call = tokio::spawn({
            let c = c.clone();
            async move { c.patch("/vm", &vm_state(true)).await }
        });
        let body = r#"{"fault_message":"The requested operation is not supported"}"#;
        let answer: &'static str = Box::leak(
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        serve_once(&l, answer).await.await.unwrap();
        let e = call.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("not supported"), "{e}");

        // Garbage is an error, not a hang or a panic.
        let call = tokio::spawn({
            let c = c.clone();
            async move { c.get("/").await }
        });
        serve_once(&l, "SSH-2.0-nope\r\n\r\n").await.await.unwrap();
        assert!(call.await.unwrap().is_err());

        // No server: a clear error.
        drop(l);
        let _ = std::fs::remove_file(&sock);
        assert!(matches!(c.get("/").await, Err(Error::Conflict(_))));
    }
}
