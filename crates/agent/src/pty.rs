//! Pseudo-terminals for interactive execs: the pty pair, the child's session
//! and controlling terminal, and the input stream that carries keystrokes
//! and window-size changes.
//!
//! An exec with `pty` set runs with the terminal's slave side as its stdin,
//! stdout and stderr, in a new session whose controlling terminal it is.
//! Everything it writes comes back as `Stdout` chunks. The client's `Data`
//! frames each start with a tag byte: [`INPUT`] followed by bytes to type,
//! or [`RESIZE`] followed by the new size (u16 BE columns, u16 BE rows).
//! Setting the size on the master makes the kernel send `SIGWINCH` to the
//! terminal's foreground process group.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use stacyvm_core::{Error, Result};

use crate::flow::Out;
use crate::protocol::PtySize;
use crate::upload::{Upload, UploadRx};

/// Tag of a `Data` frame carrying keystrokes.
pub const INPUT: u8 = 0;

/// Tag of a `Data` frame carrying a new window size.
pub const RESIZE: u8 = 1;

/// The master side of a terminal, for reading output and writing input.
pub struct Master {
    pub reader: std::fs::File,
    pub writer: std::fs::File,
}

/// Opens a terminal of `size`, wires its slave side into `cmd` (stdio, a new
/// session, controlling terminal) and returns the master side.
pub fn attach(cmd: &mut Command, size: PtySize) -> Result<Master> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = winsize(size);
    // SAFETY: both out-pointers are valid writable ints; name and termios
    // may be null; `ws` is a valid winsize that openpty only reads.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(Error::internal(
            "opening a pseudo-terminal",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: openpty succeeded, so both fds are open and owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on an fd we own; F_SETFD takes an int flag.
        unsafe {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    let dup = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| Error::internal("duplicating the terminal", e))
    };
    cmd.stdin(Stdio::from(dup(&slave)?));
    cmd.stdout(Stdio::from(dup(&slave)?));
    cmd.stderr(Stdio::from(slave));
    // SAFETY: signal, sigprocmask, setsid and ioctl are async-signal-safe
    // and touch no memory of the parent (the sigset is a local); stdin is
    // the slave side by the time this runs.
    unsafe {
        cmd.pre_exec(|| {
            // A terminal's job-control signals must work even where the
            // agent was started with them ignored or blocked (both survive
            // exec, and a shell keeps signals ignored at its start ignored).
            for sig in [
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGTSTP,
                libc::SIGTTIN,
                libc::SIGTTOU,
                libc::SIGHUP,
                libc::SIGPIPE,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let writer = std::fs::File::from(dup(&master)?);
    Ok(Master {
        reader: std::fs::File::from(master),
        writer,
    })
}

fn winsize(size: PtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_size(fd: RawFd, size: PtySize) {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one winsize from the valid pointer.
    unsafe {
        libc::ioctl(fd, libc::TIOCSWINSZ as _, &ws);
    }
}

/// Feeds the client's input frames into the terminal until the client ends
/// or cancels. On cancel, the terminal's foreground process group (a job
/// the shell started in a group of its own) is killed too.
pub fn pump_input(mut up: UploadRx, mut master: std::fs::File, out: &Out) {
    while let Some(Upload::Data(d)) = up.next(out) {
        match d.split_first() {
            Some((&INPUT, bytes)) => {
                // A terminal that stopped reading is the command's business;
                // keep consuming so the credit keeps flowing.
                let _ = master.write_all(bytes);
            }
            Some((&RESIZE, rest)) if rest.len() == 4 => {
                let cols = u16::from_be_bytes([rest[0], rest[1]]);
                let rows = u16::from_be_bytes([rest[2], rest[3]]);
                set_size(master.as_raw_fd(), PtySize { cols, rows });
            }
            // Unknown tags are dropped: the command must not see them.
            _ => {}
        }
    }
    if out.flow.is_cancelled() {
        // SAFETY: tcgetpgrp on an open terminal fd has no memory effects.
        let pgrp = unsafe { libc::tcgetpgrp(master.as_raw_fd()) };
        if pgrp > 1 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(-pgrp, libc::SIGKILL);
            }
        }
    }
}
