//! Serving the agent protocol on a vsock port: how the agent is reached
//! inside a microVM, where the host has no socket file to share.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::conn;
use crate::flow::ConnWriter;
use crate::root::Root;

/// One accepted vsock connection.
struct VsockStream(OwnedFd);

impl VsockStream {
    fn try_clone(&self) -> io::Result<VsockStream> {
        Ok(VsockStream(self.0.try_clone()?))
    }

    fn shutdown(&self) {
        // SAFETY: shutdown(2) on a descriptor this value owns.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for `buf.len()` writable bytes.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for `buf.len()` readable bytes.
            let n = unsafe {
                libc::send(
                    self.0.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Listens on vsock `port` (any CID: the guest has one) and serves every
/// connection on its own thread. Returns only on a listener error.
pub fn serve_vsock(port: u32, root: Root) -> io::Result<()> {
    // SAFETY: socket(2) has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is a valid value to fill in.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and the length says so.
    let rc = unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a bound socket this function owns.
    if unsafe { libc::listen(listener.as_raw_fd(), 64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    eprintln!("stacyvm-agent: listening on vsock port {port}");
    loop {
        // SAFETY: accept4(2) with no address out-parameters.
        let c = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("stacyvm-agent: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: `c` was just returned by accept4(2) and is owned by nothing else.
        let stream = VsockStream(unsafe { OwnedFd::from_raw_fd(c) });
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                eprintln!("stacyvm-agent: cannot share a connection: {e}");
                continue;
            }
        };
        let root = root.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(crate::server::CONN_STACK)
            .spawn(move || {
                let closer = writer.try_clone().ok();
                conn::serve(stream, ConnWriter::new(Box::new(writer)), root);
                if let Some(c) = closer {
                    c.shutdown();
                }
            });
        if let Err(e) = spawned {
            eprintln!("stacyvm-agent: cannot start a connection thread: {e}");
        }
    }
}
