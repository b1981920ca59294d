//! Starting a sandbox: a raw `clone3` (fork semantics, no `CLONE_VM`) into
//! new user, PID, network, UTS and IPC namespaces and straight into the
//! sandbox's v2 cgroup, so the child is PID 1 of its own PID namespace. It
//! joins its v1 cgroups itself and waits. The parent (root on the host)
//! writes the child's ID maps, mounts the sandbox's root with the lower
//! layer mapped through the child's own user namespace, and releases it
//! with one byte on a pipe. The child then enters mount and cgroup
//! namespaces of its own, becomes root of its user namespace, mounts its
//! `/proc`, `/dev` and `/sys` and the agent into the root, pivots into it,
//! names itself, brings `lo` up, narrows its capabilities to Docker's
//! default set, installs the seccomp filter and execs the agent as init.
//!
//! Both the cgroups and the ID mapping are arranged so that no spawn pays
//! for the kernel's global locks: writing another process's pid to a
//! `cgroup.procs` file waits for an RCU grace period (milliseconds), and a
//! helper process for an ID mapping is a second fork.
//!
//! Between clone and exec the child makes system calls only, on memory
//! prepared in a [`Plan`] before the clone: the server is multi-threaded,
//! and another thread may have held the allocator's lock at the clone.
//! Calls whose C library wrappers keep process-wide state (the set*id
//! family, which glibc broadcasts to every thread it believes exists) are
//! made as raw system calls.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::sandboxing::cgroups::Group;
use crate::sandboxing::seccomp::Filter;
use crate::sandboxing::{caps, loopback_up_from_child};

use super::state::IdBlock;

/// The namespaces the child is cloned into. The mount and cgroup namespaces
/// follow once it is released: by then the parent has mounted its root
/// (through the child's own user namespace) and it is in its cgroups.
const CLONE_FLAGS: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC;

/// Docker's masked paths: what a container must not read of the host's
/// kernel state (`/proc/kcore`, the keyrings, timers, firmware tables, …).
/// Files get `/dev/null` bound over them, directories an empty read-only
/// tmpfs. Paths the host lacks are left out.
const MASKED: [&str; 12] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// Docker's read-only paths: kernel settings a container may read but
/// never change.
const READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The host devices every sandbox gets, bound (a user namespace may not
/// make device nodes) onto files in its own `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Upper bound of a sandbox's `/dev/shm`.
const SHM_BYTES: u64 = 64 << 20;

/// The guest paths of the agent and its socket directory.
pub const GUEST_AGENT: &str = "/.stacyvm/agent";
pub const GUEST_RUN_DIR: &str = "/.stacyvm/run";
pub const GUEST_SOCKET: &str = "/.stacyvm/run/agent.sock";
pub const GUEST_ENV_FILE: &str = "/.stacyvm/run/env";

/// The mount points a sandbox's root must have as real directories (or,
/// for the agent, a file), never symbolic links: the child mounts onto
/// them by host path before it pivots, and a link would point it elsewhere.
pub const MOUNT_POINTS: [&str; 6] = [
    "/proc",
    "/dev",
    "/sys",
    "/.stacyvm",
    GUEST_RUN_DIR,
    GUEST_AGENT,
];

/// One step of the child's mount setup.
enum Op {
    /// `mount(2)`. An `optional` step whose target is missing is skipped.
    Mount {
        source: CString,
        target: CString,
        fstype: CString,
        flags: libc::c_ulong,
        data: Option<CString>,
        optional: bool,
    },
    /// Makes the bind mount at `target` read-only, keeping the nosuid,
    /// nodev and noexec it has (a user namespace may not drop them) and
    /// adding `flags`.
    ReadOnly {
        target: CString,
        flags: libc::c_ulong,
        optional: bool,
    },
    /// An empty file to bind a device onto.
    File {
        path: CString,
    },
    Dir {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
}

/// Everything the child needs, prepared before the clone.
pub struct Plan {
    root: CString,
    ops: Vec<Op>,
    workdir: CString,
    hostname: Vec<u8>,
    agent: CString,
    _argv: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp: Vec<*const libc::c_char>,
    log: OwnedFd,
    null: OwnedFd,
    filter: Filter,
    v1_tasks: Vec<CString>,
    /// Whether the child clears its supplementary groups: a rootless
    /// parent must deny `setgroups` in the child's namespace before it may
    /// map a group, so the child keeps the server's.
    drop_groups: bool,
    /// Directories the child makes after it pivots (rootless, where the
    /// host never sees the root): the working directory and its parents,
    /// resolved inside the sandbox's own root.
    late_dirs: Vec<CString>,
    all_signals: libc::sigset_t,
    no_signals: libc::sigset_t,
}

/// What the plan is made from.
pub struct PlanInput<'a> {
    /// The sandbox's root on the host (a mount point).
    pub root: &'a Path,
    /// The agent binary on the host.
    pub agent: &'a Path,
    /// The host directory that becomes the guest's `/.stacyvm/run`.
    pub socket_dir: &'a Path,
    /// Where the child's output goes (the runtime log).
    pub log: &'a Path,
    pub workdir: &'a str,
    pub hostname: &'a str,
    /// The agent's environment (the tenant's comes through the env file).
    pub env: &'a [(&'a str, &'a str)],
    pub filter: Filter,
    /// The sandbox's cgroups.
    pub cgroups: &'a Group,
    /// Who mounts the root: the host (root mode), or the child itself.
    pub root_source: RootSource<'a>,
}

/// Where the sandbox's root comes from.
#[derive(Clone, Copy, Debug)]
pub enum RootSource<'a> {
    /// The host mounted it on `root` before the release (root mode).
    Host,
    /// Rootless: the child mounts an overlay of `upper` over `lower` on
    /// `root` in its own user and mount namespaces; the host cannot.
    Overlay {
        lower: &'a Path,
        upper: &'a Path,
        work: &'a Path,
    },
    /// Rootless: the child binds a private copy on `root`.
    Copy(&'a Path),
}

impl RootSource<'_> {
    fn rootless(&self) -> bool {
        !matches!(self, RootSource::Host)
    }
}

/// The overlay options of a rootless overlay: `userxattr` keeps its
/// bookkeeping in `user.overlay.*` attributes, the only ones a user
/// namespace may write. The caller checked the paths with
/// [`crate::sandboxing::mounts::overlay_option_safe`].
pub fn rootless_overlay_options(lower: &Path, upper: &Path, work: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        lower.display(),
        upper.display(),
        work.display()
    )
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// `root` followed by the absolute guest path `guest`.
fn in_root(root: &Path, guest: &str) -> io::Result<CString> {
    let mut b = root.as_os_str().as_bytes().to_vec();
    b.extend_from_slice(guest.as_bytes());
    cstring(&b)
}

fn c(s: &str) -> io::Result<CString> {
    cstring(s.as_bytes())
}

/// The per-CPU thermal throttling counters Docker masks as well.
fn thermal_throttle_paths() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/devices/system/cpu") else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let n = name.strip_prefix("cpu")?;
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(name)
        })
        .map(|cpu| format!("/sys/devices/system/cpu/{cpu}/thermal_throttle"))
        .filter(|p| Path::new(p).exists())
        .collect();
    out.sort();
    out
}

/// An empty read-only tmpfs over a directory, or `/dev/null` over a file.
fn mask(root: &Path, guest: &str, ops: &mut Vec<Op>) -> io::Result<()> {
    let Ok(meta) = std::fs::metadata(guest) else {
        return Ok(());
    };
    let target = in_root(root, guest)?;
    let (source, fstype, flags, data) = if meta.is_dir() {
        (
            c("tmpfs")?,
            c("tmpfs")?,
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(c("mode=555")?),
        )
    } else {
        (c("/dev/null")?, c("")?, libc::MS_BIND, None)
    };
    ops.push(Op::Mount {
        source,
        target,
        fstype,
        flags,
        data,
        optional: true,
    });
    Ok(())
}

impl Plan {
    pub fn new(input: PlanInput<'_>) -> io::Result<Plan> {
        let root = input.root;
        let mount = |source: &str,
                     target: CString,
                     fstype: &str,
                     flags: libc::c_ulong,
                     data: Option<&str>|
         -> io::Result<Op> {
            Ok(Op::Mount {
                source: c(source)?,
                target,
                fstype: c(fstype)?,
                flags,
                data: data.map(c).transpose()?,
                optional: false,
            })
        };
        let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let mut ops = Vec::new();

        match input.root_source {
            RootSource::Host => {}
            RootSource::Overlay { lower, upper, work } => ops.push(Op::Mount {
                source: c("overlay")?,
                target: cstring(root.as_os_str().as_bytes())?,
                fstype: c("overlay")?,
                flags: libc::MS_NODEV,
                data: Some(c(&rootless_overlay_options(lower, upper, work))?),
                optional: false,
            }),
            RootSource::Copy(copy) => ops.push(Op::Mount {
                source: cstring(copy.as_os_str().as_bytes())?,
                target: cstring(root.as_os_str().as_bytes())?,
                fstype: c("")?,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
                optional: false,
            }),
        }

        // The root as the host mounted it is locked in this less privileged
        // mount namespace, and pivot_root refuses a locked new root: a bind
        // of it made here is not.
        let root_c = cstring(root.as_os_str().as_bytes())?;
        ops.push(Op::Mount {
            source: root_c.clone(),
            target: root_c,
            fstype: c("")?,
            flags: libc::MS_BIND | libc::MS_REC,
            data: None,
            optional: false,
        });

        // /proc: the PID namespace's own, with Docker's masks.
        ops.push(mount(
            "proc",
            in_root(root, "/proc")?,
            "proc",
            hardened,
            None,
        )?);
        for p in MASKED.iter().filter(|p| p.starts_with("/proc/")) {
            mask(root, p, &mut ops)?;
        }
        for p in READ_ONLY {
            if !Path::new(p).exists() {
                continue;
            }
            let target = in_root(root, p)?;
            ops.push(Op::Mount {
                source: target.clone(),
                target: target.clone(),
                fstype: c("")?,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
                optional: true,
            });
            ops.push(Op::ReadOnly {
                target,
                flags: hardened,
                optional: true,
            });
        }

        // /dev: a small tmpfs with the harmless host devices bound in.
        ops.push(mount(
            "tmpfs",
            in_root(root, "/dev")?,
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("mode=755,size=65536k"),
        )?);
        for d in DEVICES {
            let target = in_root(root, &format!("/dev/{d}"))?;
            ops.push(Op::File {
                path: target.clone(),
            });
            ops.push(mount(
                &format!("/dev/{d}"),
                target,
                "",
                libc::MS_BIND,
                None,
            )?);
        }
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            ops.push(Op::Symlink {
                target: c(target)?,
                link: in_root(root, &format!("/dev/{link}"))?,
            });
        }
        for d in ["/dev/pts", "/dev/shm"] {
            ops.push(Op::Dir {
                path: in_root(root, d)?,
            });
        }
        ops.push(mount(
            "devpts",
            in_root(root, "/dev/pts")?,
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            // Rootless, group 5 (tty) is not mapped: terminals keep the
            // opener's group.
            Some(if input.root_source.rootless() {
                "newinstance,ptmxmode=0666,mode=0620"
            } else {
                "newinstance,ptmxmode=0666,mode=0620,gid=5"
            }),
        )?);
        ops.push(mount(
            "tmpfs",
            in_root(root, "/dev/shm")?,
            "tmpfs",
            hardened,
            Some(&format!("mode=1777,size={SHM_BYTES}")),
        )?);

        // /sys: read-only (its network part is the namespace's own).
        ops.push(mount(
            "sysfs",
            in_root(root, "/sys")?,
            "sysfs",
            libc::MS_RDONLY | hardened,
            None,
        )?);
        for p in MASKED.iter().filter(|p| p.starts_with("/sys/")) {
            mask(root, p, &mut ops)?;
        }
        for p in thermal_throttle_paths() {
            mask(root, &p, &mut ops)?;
        }

        // The agent (read-only) and its socket directory.
        let agent_target = in_root(root, GUEST_AGENT)?;
        ops.push(Op::Mount {
            source: cstring(input.agent.as_os_str().as_bytes())?,
            target: agent_target.clone(),
            fstype: c("")?,
            flags: libc::MS_BIND,
            data: None,
            optional: false,
        });
        ops.push(Op::ReadOnly {
            target: agent_target,
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            optional: false,
        });
        ops.push(Op::Mount {
            source: cstring(input.socket_dir.as_os_str().as_bytes())?,
            target: in_root(root, GUEST_RUN_DIR)?,
            fstype: c("")?,
            flags: libc::MS_BIND,
            data: None,
            optional: false,
        });

        let argv_owned: Vec<CString> = [
            GUEST_AGENT,
            "--init",
            "--listen",
            GUEST_SOCKET,
            "--env-file",
            GUEST_ENV_FILE,
        ]
        .into_iter()
        .map(c)
        .collect::<io::Result<_>>()?;
        let envp_owned: Vec<CString> = input
            .env
            .iter()
            .map(|(k, v)| c(&format!("{k}={v}")))
            .collect::<io::Result<_>>()?;
        let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(input.log)?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        // SAFETY: sigset_t is plain data; sigfillset and sigemptyset
        // initialise it fully.
        let (all_signals, no_signals) = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::sigemptyset(&mut none);
            (all, none)
        };
        Ok(Plan {
            root: cstring(root.as_os_str().as_bytes())?,
            ops,
            workdir: c(input.workdir)?,
            hostname: input.hostname.as_bytes().to_vec(),
            agent: c(GUEST_AGENT)?,
            argv: ptrs(&argv_owned),
            _argv: argv_owned,
            envp: ptrs(&envp_owned),
            _envp: envp_owned,
            log: OwnedFd::from(log),
            null: OwnedFd::from(null),
            filter: input.filter,
            v1_tasks: input.cgroups.v1_task_files()?,
            drop_groups: !input.root_source.rootless(),
            late_dirs: if input.root_source.rootless() {
                let parts: Vec<&str> = input.workdir.split('/').filter(|p| !p.is_empty()).collect();
                (1..=parts.len())
                    .map(|i| c(&format!("/{}", parts[..i].join("/"))))
                    .collect::<io::Result<_>>()?
            } else {
                Vec::new()
            },
            all_signals,
            no_signals,
        })
    }
}

/// `struct clone_args` of `clone3` (the fields up to `cgroup`, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// A cloned init waiting to be released. Dropping it unreleased kills and
/// reaps the child.
pub struct Pending {
    pid: i32,
    /// A pidfd of the child, when the kernel gave one.
    pidfd: Option<OwnedFd>,
    release: Option<OwnedFd>,
}

/// The sandbox's init, released.
pub struct Started {
    pub pid: i32,
    pub pidfd: Option<OwnedFd>,
}

/// Clones the sandbox's init into its namespaces, waiting for
/// [`Pending::release`]. It starts in the group's v2 cgroup (`clone3` with
/// `CLONE_INTO_CGROUP`) and joins the v1 ones itself; where `clone3` is
/// refused, a plain `clone` follows and the parent moves it into the v2
/// group (slower: that takes the kernel's global threadgroup lock).
pub fn clone_init(plan: &Plan, cgroups: &Group) -> io::Result<Pending> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned by nothing else.
    let (release_r, release_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let v2 = match &cgroups.v2 {
        Some(dir) => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(dir)?,
        ),
        None => None,
    };
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_FLAGS as u64 | CLONE_PIDFD,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(dir) = &v2 {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    // SAFETY: clone3 without CLONE_VM behaves like fork: the child gets a
    // copy of this address space, including `plan`, and runs only
    // `child`, which makes system calls on that memory and never returns.
    // `args` is valid for the call.
    let mut pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let mut attach_v2 = false;
    if pid < 0 {
        let e = io::Error::last_os_error();
        // Older kernels, or a seccomp profile around the server that
        // refuses clone3 (Docker's answers ENOSYS).
        if !matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::E2BIG) | Some(libc::EPERM)
        ) {
            return Err(e);
        }
        pidfd = -1;
        attach_v2 = v2.is_some();
        // SAFETY: as above, with clone.
        pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (CLONE_FLAGS | libc::SIGCHLD) as libc::c_ulong,
                0,
                0,
                0,
                0,
            )
        };
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: this is the child; see above.
        unsafe { child(plan, release_r.as_raw_fd(), release_w.as_raw_fd()) }
    }
    let pending = Pending {
        pid: pid as i32,
        // SAFETY: the kernel stored a fresh pidfd there for us alone.
        pidfd: (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) }),
        release: Some(release_w),
    };
    if attach_v2 {
        if let Some(dir) = &cgroups.v2 {
            std::fs::write(dir.join("cgroup.procs"), pending.pid.to_string())?;
        }
    }
    Ok(pending)
}

impl Pending {
    /// Writes the child's uid and gid maps: its ids 0.. are the host's
    /// `ids.first`...
    pub fn map_ids(&self, ids: IdBlock) -> io::Result<()> {
        let map = ids.map_line();
        std::fs::write(format!("/proc/{}/uid_map", self.pid), &map)?;
        std::fs::write(format!("/proc/{}/gid_map", self.pid), &map)
    }

    /// Rootless: maps the child's root to the server's own uid and gid,
    /// the only ids an unprivileged process may map. The kernel requires
    /// `setgroups` to be denied in the child's namespace before a group map.
    pub fn map_own_ids(&self, uid: u32, gid: u32) -> io::Result<()> {
        std::fs::write(
            format!("/proc/{}/uid_map", self.pid),
            format!("0 {uid} 1\n"),
        )?;
        std::fs::write(format!("/proc/{}/setgroups", self.pid), "deny")?;
        std::fs::write(
            format!("/proc/{}/gid_map", self.pid),
            format!("0 {gid} 1\n"),
        )
    }

    /// The child's user namespace (after [`Pending::map_ids`]), to map a
    /// mount through.
    pub fn user_namespace(&self) -> io::Result<OwnedFd> {
        Ok(OwnedFd::from(std::fs::File::open(format!(
            "/proc/{}/ns/user",
            self.pid
        ))?))
    }

    /// Lets the child go on to set itself up and exec the agent.
    pub fn release(mut self) -> io::Result<Started> {
        let Some(w) = self.release.take() else {
            return Err(io::Error::other("released twice"));
        };
        // SAFETY: writes one byte from a static buffer to our pipe end.
        if unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) } != 1 {
            let e = io::Error::last_os_error();
            self.release = Some(w);
            return Err(e);
        }
        Ok(Started {
            pid: self.pid,
            pidfd: self.pidfd.take(),
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.release.is_some() {
            // SAFETY: kills and reaps our own unreleased, unreaped child
            // (so the pid is still its).
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// The child's side, up to the exec of the agent. System calls only.
///
/// # Safety
/// Only in the child of [`start`]'s clone.
unsafe fn child(plan: &Plan, release: RawFd, release_w: RawFd) -> ! {
    // SAFETY: every call below is a system call (or a C library wrapper
    // that is one) on memory the plan prepared before the clone, which
    // this copy of the address space keeps valid until exec.
    unsafe {
        // The server's signal handlers must never run here.
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &plan.all_signals as *const libc::sigset_t,
            std::ptr::null_mut::<libc::sigset_t>(),
            8,
        );
        // Our copy of the write end would keep the read below from ever
        // seeing the end of a parent that died.
        libc::close(release_w);
        // Until released, die with the server (its thread that cloned us).
        // Should it be gone already, the read below sees the pipe's end
        // (getppid cannot tell: it is 0 in a new PID namespace).
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::dup2(plan.null.as_raw_fd(), 0) < 0
            || libc::dup2(plan.log.as_raw_fd(), 1) < 0
            || libc::dup2(plan.log.as_raw_fd(), 2) < 0
        {
            libc::_exit(1);
        }
        // The v1 hierarchies: our own single thread moves cheaply.
        for f in plan.v1_tasks.iter() {
            let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(c"joining the cgroup", Some(f));
            }
            libc::close(fd);
        }
        let mut byte = 0u8;
        // One byte, not end-of-file: other threads' children may hold the
        // write end for a while, and the parent writes before it lets go.
        if libc::read(release, (&mut byte as *mut u8).cast(), 1) != 1 {
            libc::_exit(1);
        }
        libc::close(release);
        // From here the sandbox lives on its own, whatever happens to the server.
        libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0);

        // The mount namespace copies the root the parent mounted while we
        // waited; the cgroup namespace is rooted in the sandbox's cgroups.
        if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP) != 0 {
            fail(c"unshare(CLONE_NEWNS | CLONE_NEWCGROUP)", None);
        }
        // Root of the user namespace: host ids `first` (and no host group).
        if plan.drop_groups
            && libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
        {
            fail(c"setgroups", None);
        }
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0 {
            fail(c"setresgid", None);
        }
        if libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0 {
            fail(c"setresuid", None);
        }
        // Nothing we mount travels back to the host, nor the host's to us.
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(c"making mounts private", None);
        }
        for op in plan.ops.iter() {
            run(op);
        }
        if libc::chdir(plan.root.as_ptr()) != 0 {
            fail(c"chdir", Some(&plan.root));
        }
        // The old root lands on top of the new one and is detached at once.
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
            fail(c"pivot_root", Some(&plan.root));
        }
        if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
            fail(c"detaching the old root", None);
        }
        // Past the pivot, symbolic links resolve inside the sandbox's root.
        for d in plan.late_dirs.iter() {
            if libc::mkdir(d.as_ptr(), 0o755) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                fail(c"mkdir", Some(d));
            }
        }
        if libc::chdir(plan.workdir.as_ptr()) != 0 {
            fail(c"chdir", Some(&plan.workdir));
        }
        if libc::sethostname(plan.hostname.as_ptr().cast(), plan.hostname.len()) != 0 {
            fail(c"sethostname", None);
        }
        if let Err(e) = loopback_up_from_child() {
            die(c"bringing lo up", None, e.raw_os_error().unwrap_or(0));
        }
        if let Err(e) = caps::limit_from_child(caps::DOCKER_DEFAULT) {
            die(
                c"narrowing capabilities",
                None,
                e.raw_os_error().unwrap_or(0),
            );
        }
        // Whatever descriptor the server did not mark close-on-exec.
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            fail(c"close_range", None);
        }
        if let Err(e) = plan.filter.install() {
            die(
                c"installing the seccomp filter",
                None,
                e.raw_os_error().unwrap_or(0),
            );
        }
        // Default dispositions (the server ignores SIGPIPE, and ignored signals
        // survive exec), then nothing blocked.
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                let dfl = KernelSigaction::default();
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8,
                );
            }
        }
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &plan.no_signals as *const libc::sigset_t,
            std::ptr::null_mut::<libc::sigset_t>(),
            8,
        );
        libc::execve(plan.agent.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(c"exec", Some(&plan.agent))
    }
}

/// The kernel's `struct sigaction` (not the C library's): all zero is
/// `SIG_DFL` with no flags and an empty mask.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Runs one mount step; fails the child on error.
///
/// # Safety
/// Only in the child, before exec.
unsafe fn run(op: &Op) {
    // SAFETY: as in `child`: system calls on the plan's memory; `st` is a
    // valid, writable statfs for the call that fills it.
    unsafe {
        let missing = || io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT);
        match op {
            Op::Mount {
                source,
                target,
                fstype,
                flags,
                data,
                optional,
            } => {
                let fstype = if fstype.is_empty() {
                    std::ptr::null()
                } else {
                    fstype.as_ptr()
                };
                let data = data
                    .as_ref()
                    .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
                if libc::mount(source.as_ptr(), target.as_ptr(), fstype, *flags, data) != 0
                    && !(*optional && missing())
                {
                    fail(c"mount", Some(target));
                }
            }
            Op::ReadOnly {
                target,
                flags,
                optional,
            } => {
                let mut st: libc::statfs64 = std::mem::zeroed();
                if libc::statfs64(target.as_ptr(), &mut st) != 0 {
                    if *optional && missing() {
                        return;
                    }
                    fail(c"statfs", Some(target));
                }
                // ST_NOSUID, ST_NODEV and ST_NOEXEC are MS_NOSUID, MS_NODEV and
                // MS_NOEXEC; locked flags must be repeated in a remount.
                let kept = st.f_flags as libc::c_ulong
                    & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
                let remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept | flags;
                if libc::mount(
                    std::ptr::null(),
                    target.as_ptr(),
                    std::ptr::null(),
                    remount,
                    std::ptr::null(),
                ) != 0
                {
                    fail(c"remounting read-only", Some(target));
                }
            }
            Op::File { path } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o666,
                );
                if fd < 0 {
                    fail(c"creating", Some(path));
                }
                libc::close(fd);
            }
            Op::Dir { path } => {
                if libc::mkdir(path.as_ptr(), 0o755) != 0 {
                    fail(c"mkdir", Some(path));
                }
            }
            Op::Symlink { target, link } => {
                if libc::symlink(target.as_ptr(), link.as_ptr()) != 0 {
                    fail(c"symlink", Some(link));
                }
            }
        }
    }
}

/// [`die`] with the error of the system call that just failed.
///
/// # Safety
/// Only in the child, before exec.
unsafe fn fail(what: &CStr, path: Option<&CStr>) -> ! {
    // SAFETY: forwarded from the caller.
    unsafe {
        die(
            what,
            path,
            io::Error::last_os_error().raw_os_error().unwrap_or(0),
        )
    }
}

/// Writes `stacyvm-namespaces: <what> <path>: <errno name> (<n>)` to the
/// runtime log and ends the child. No allocation.
///
/// # Safety
/// Only in the child, before exec.
unsafe fn die(what: &CStr, path: Option<&CStr>, errno: i32) -> ! {
    let out = |b: &[u8]| {
        // SAFETY: writes `b`, valid for its length, to the runtime log.
        unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
    };
    out(b"stacyvm-namespaces: ");
    out(what.to_bytes());
    if let Some(p) = path {
        out(b" ");
        out(p.to_bytes());
    }
    out(b": ");
    out(errno_name(errno));
    out(b" (");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut n = errno.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    out(&digits[i..]);
    out(b")\n");
    // SAFETY: ends the child without running anything of the server's.
    unsafe { libc::_exit(125) }
}

fn errno_name(errno: i32) -> &'static [u8] {
    match errno {
        libc::EPERM => b"operation not permitted",
        libc::ENOENT => b"no such file or directory",
        libc::EACCES => b"permission denied",
        libc::EEXIST => b"file exists",
        libc::ENOTDIR => b"not a directory",
        libc::EINVAL => b"invalid argument",
        libc::EBUSY => b"busy",
        libc::ENOSPC => b"no space left",
        libc::ENOMEM => b"out of memory",
        libc::ENOSYS => b"not implemented",
        libc::ELOOP => b"too many symbolic links",
        libc::ENODEV => b"no such device",
        _ => b"error",
    }
}

/// Whether this host lets root clone a child into every namespace a
/// sandbox needs; `Err` says why not. The child exits at once.
pub fn probe_namespaces() -> Result<(), String> {
    // SAFETY: a raw clone without CLONE_VM behaves like fork; the child
    // only calls _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (CLONE_FLAGS | libc::SIGCHLD) as libc::c_ulong,
            0,
            0,
            0,
            0,
        )
    };
    if pid < 0 {
        let e = io::Error::last_os_error();
        let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
        return Err(format!(
            "cloning into new user, mount, PID, network, UTS and IPC namespaces failed: {e} \
             (user.max_user_namespaces is {}; a container or seccomp profile around StacyVM may \
             forbid namespaces)",
            max.trim()
        ));
    }
    if pid == 0 {
        // SAFETY: the child ends at once.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: reaps the child just made.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
    Ok(())
}

/// Whether an unprivileged server can run sandboxes here: clones a child
/// into the sandbox's namespaces plus a mount namespace, maps its root to
/// `uid`/`gid`, and has it mount an overlay in `scratch` (a fresh
/// directory on the file system sandboxes live on). The outer `Err` says
/// why no sandbox can run rootless; the inner one why sandboxes get a copy
/// of the image instead of an overlay.
pub fn probe_rootless(scratch: &Path, uid: u32, gid: u32) -> Result<Result<(), String>, String> {
    let prepared = (|| -> io::Result<(CString, CString, CString)> {
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir_all(scratch.join(d))?;
        }
        std::fs::write(scratch.join("lower/f"), "x")?;
        let data = rootless_overlay_options(
            &scratch.join("lower"),
            &scratch.join("upper"),
            &scratch.join("work"),
        );
        Ok((
            cstring(scratch.join("merged").as_os_str().as_bytes())?,
            c(&data)?,
            cstring(scratch.join("merged/f").as_os_str().as_bytes())?,
        ))
    })();
    let overlay = match &prepared {
        Ok((target, data, file)) => Some((target.as_c_str(), data.as_c_str(), file.as_c_str())),
        Err(_) => None,
    };
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot make a pipe: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: fresh descriptors owned by nothing else.
    let (release_r, release_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: a raw clone without CLONE_VM behaves like fork; the child
    // runs only `probe_child`, system calls on memory prepared above.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (CLONE_FLAGS | libc::CLONE_NEWNS | libc::SIGCHLD) as libc::c_ulong,
            0,
            0,
            0,
            0,
        )
    };
    if pid < 0 {
        let e = io::Error::last_os_error();
        let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
        return Err(format!(
            "an unprivileged process may not clone into new user, mount, PID, network, UTS and \
             IPC namespaces here: {e} (user.max_user_namespaces is {}; \
             kernel.unprivileged_userns_clone, an AppArmor or seccomp policy, or a container \
             around StacyVM may forbid them)",
            max.trim()
        ));
    }
    if pid == 0 {
        // SAFETY: this is the child; see above.
        unsafe { probe_child(release_r.as_raw_fd(), release_w.as_raw_fd(), overlay) }
    }
    let pid = pid as i32;
    drop(release_r);
    let mapped = (|| -> io::Result<()> {
        std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {uid} 1\n"))?;
        std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
        std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {gid} 1\n"))
    })();
    if mapped.is_ok() {
        // SAFETY: writes one byte from a static buffer to our pipe end.
        unsafe { libc::write(release_w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
    }
    drop(release_w);
    let mut status = 0;
    // SAFETY: reaps the child just made; `status` is valid for the call.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if let Err(e) = mapped {
        return Err(format!(
            "cannot map the server's own uid {uid} and gid {gid} into a new user namespace: {e}"
        ));
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    match code {
        0 => Ok(match prepared {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("cannot prepare the overlay probe: {e}")),
        }),
        2 => Ok(Err(
            "an overlay mounted inside a user namespace failed (Linux 5.11 or later, and user \
             extended attributes on the data dir's file system, are needed)"
                .into(),
        )),
        5 => Ok(Err(
            "an overlay mounted inside a user namespace cannot be written".into(),
        )),
        3 => Err("the child cannot become root of its user namespace".into()),
        4 => Err("the child cannot make its mounts private".into()),
        _ => Err(format!(
            "the namespace probe child ended with status {status:#x}"
        )),
    }
}

/// The probe's child: waits for its map, becomes root of its namespace and
/// tries the overlay. The exit code tells the parent what failed.
///
/// # Safety
/// Only in the child of [`probe_rootless`]'s clone.
unsafe fn probe_child(
    release: RawFd,
    release_w: RawFd,
    overlay: Option<(&CStr, &CStr, &CStr)>,
) -> ! {
    // SAFETY: system calls on memory prepared before the clone.
    unsafe {
        libc::close(release_w);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let mut byte = 0u8;
        if libc::read(release, (&mut byte as *mut u8).cast(), 1) != 1 {
            libc::_exit(1);
        }
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
        {
            libc::_exit(3);
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            libc::_exit(4);
        }
        if let Some((target, data, file)) = overlay {
            if libc::mount(
                c"overlay".as_ptr(),
                target.as_ptr(),
                c"overlay".as_ptr(),
                libc::MS_NODEV,
                data.as_ptr().cast(),
            ) != 0
            {
                libc::_exit(2);
            }
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_APPEND);
            if fd < 0 || libc::write(fd, b"y".as_ptr().cast(), 1) != 1 {
                libc::_exit(5);
            }
        }
        libc::_exit(0)
    }
}
