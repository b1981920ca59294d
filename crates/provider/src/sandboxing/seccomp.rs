//! Seccomp filters: a small rule set compiled to classic BPF and installed
//! between fork and exec, so every process of a sandbox inherits it.
//!
//! A filter answers each system call in order: a call of another ABI than
//! the host's (i386 or x32 calls on x86_64) fails with `ENOSYS`, then the
//! first matching rule decides, then everything else is allowed.

use std::io;

/// One classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_ALU_AND_K: u16 = 0x04 | 0x50;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_MODE_FILTER: libc::c_ulong = 2;
/// Offsets into `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// The low 32 bits of argument `i` (little-endian hosts).
const fn data_arg_low(i: u32) -> u32 {
    16 + 8 * i
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
/// x32 system calls carry this bit on x86_64.
#[cfg(target_arch = "x86_64")]
const X32_BIT: Option<u32> = Some(0x4000_0000);
#[cfg(not(target_arch = "x86_64"))]
const X32_BIT: Option<u32> = None;

/// Every architecture numbers the system calls added from Linux 5.1 on
/// alike, starting with `pidfd_send_signal` (424); `io_uring_setup`,
/// `io_uring_enter` and `io_uring_register` are 425 to 427.
pub const FIRST_UNIFIED_SYSCALL: u32 = 424;

/// The namespace flags of `clone`/`unshare` that make a new namespace.
pub const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// What to do with one system call (or a range of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// This call fails with `errno`.
    Deny { nr: u32, errno: i32 },
    /// Every call numbered `first` or above fails with `errno`.
    DenyFrom { first: u32, errno: i32 },
    /// This call fails with `errno` when its argument `arg` has any of
    /// `flags` set (low 32 bits), and is allowed otherwise.
    DenyFlags {
        nr: u32,
        arg: u32,
        flags: u32,
        errno: i32,
    },
}

/// A compiled filter, ready to install (also from a forked child, where
/// nothing may allocate).
#[derive(Clone, Debug)]
pub struct Filter {
    prog: Vec<SockFilter>,
}

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

impl Filter {
    /// Compiles `rules`, checked in order after the ABI check.
    pub fn compile(rules: &[Rule]) -> Filter {
        let ret_errno = |errno: i32| ins(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno as u32);
        let mut prog = vec![
            ins(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
            ins(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH),
            ret_errno(libc::ENOSYS),
            ins(BPF_LD_W_ABS, 0, 0, DATA_NR),
        ];
        if let Some(bit) = X32_BIT {
            prog.push(ins(BPF_JMP_JGE_K, 0, 1, bit));
            prog.push(ret_errno(libc::ENOSYS));
        }
        for rule in rules {
            match *rule {
                Rule::Deny { nr, errno } => {
                    prog.push(ins(BPF_JMP_JEQ_K, 0, 1, nr));
                    prog.push(ret_errno(errno));
                }
                Rule::DenyFrom { first, errno } => {
                    prog.push(ins(BPF_JMP_JGE_K, 0, 1, first));
                    prog.push(ret_errno(errno));
                }
                Rule::DenyFlags {
                    nr,
                    arg,
                    flags,
                    errno,
                } => {
                    // Not this call: skip the five instructions of the check.
                    prog.push(ins(BPF_JMP_JEQ_K, 0, 5, nr));
                    prog.push(ins(BPF_LD_W_ABS, 0, 0, data_arg_low(arg)));
                    prog.push(ins(BPF_ALU_AND_K, 0, 0, flags));
                    prog.push(ins(BPF_JMP_JEQ_K, 0, 1, 0));
                    prog.push(ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
                    prog.push(ret_errno(errno));
                }
            }
        }
        prog.push(ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
        Filter { prog }
    }

    /// The number of BPF instructions (the kernel takes at most 4096).
    pub fn len(&self) -> usize {
        self.prog.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prog.is_empty()
    }

    /// Sets `no_new_privs` and installs the filter on the calling thread
    /// (inherited by everything it starts). Only system calls: safe between
    /// fork and exec.
    pub fn install(&self) -> io::Result<()> {
        let fprog = SockFprog {
            len: self.prog.len() as u16,
            filter: self.prog.as_ptr(),
        };
        // SAFETY: prctl with integer arguments; no memory is passed.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fprog` points at `self.prog`, a valid BPF program that
        // outlives the call; the kernel copies it.
        if unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                SECCOMP_MODE_FILTER,
                &fprog as *const SockFprog,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// System calls an unprivileged sandbox never needs and that widen the
/// kernel surface it can reach: namespaces (a new user namespace hands out
/// capabilities over it), mounts, kernel modules and keyrings, BPF, perf,
/// userfaultfd, file handles (a classic way out of a chroot), and the
/// clock, swap and reboot calls.
pub fn unprivileged_denials() -> Vec<Rule> {
    let eperm = |nr: libc::c_long| Rule::Deny {
        nr: nr as u32,
        errno: libc::EPERM,
    };
    let mut rules: Vec<Rule> = [
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_acct,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_vhangup,
    ]
    .into_iter()
    .map(eperm)
    .collect();
    #[cfg(target_arch = "x86_64")]
    rules.extend(
        [libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_lookup_dcookie]
            .into_iter()
            .map(eperm),
    );
    rules.push(Rule::DenyFlags {
        nr: libc::SYS_clone as u32,
        arg: 0,
        flags: NAMESPACE_FLAGS,
        errno: libc::EPERM,
    });
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with `filter` installed and returns what
    /// it exits with.
    fn in_child(filter: &Filter, f: fn() -> i32) -> i32 {
        // SAFETY: the child only installs the filter (system calls on memory
        // prepared before the fork), runs `f` (system calls only) and exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let code = match filter.install() {
                    Ok(()) => f(),
                    Err(_) => 100,
                };
                libc::_exit(code);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(libc::WIFEXITED(status), "the child died: {status}");
            libc::WEXITSTATUS(status)
        }
    }

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc >= 0 {
            0
        } else {
            io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }

    #[test]
    fn io_uring_and_everything_newer_fail_with_enosys() {
        let f = Filter::compile(&[Rule::DenyFrom {
            first: FIRST_UNIFIED_SYSCALL,
            errno: libc::ENOSYS,
        }]);
        let code = in_child(&f, || {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup reads and writes `params` (120 bytes).
            let rc = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            errno_of(rc)
        });
        assert_eq!(code, libc::ENOSYS);
        // getpid is older than the threshold and passes.
        let code = in_child(&f, || {
            // SAFETY: getpid takes no arguments.
            let rc = unsafe { libc::syscall(libc::SYS_getpid) };
            errno_of(rc)
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn clone_with_namespace_flags_is_refused_and_plain_clone_allowed() {
        let f = Filter::compile(&unprivileged_denials());
        let code = in_child(&f, || {
            // SAFETY: unshare takes flags only.
            let rc = unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) };
            errno_of(rc)
        });
        assert_eq!(code, libc::EPERM);
        let code = in_child(&f, || {
            // SAFETY: a raw clone with CLONE_NEWUSER and no stack behaves like
            // fork; the child, if any, exits at once.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                    0,
                    0,
                    0,
                    0,
                )
            };
            if rc == 0 {
                // SAFETY: exiting the cloned child.
                unsafe { libc::_exit(0) };
            }
            errno_of(rc)
        });
        assert_eq!(code, libc::EPERM);
        let code = in_child(&f, || {
            // SAFETY: as above, without namespace flags: an ordinary fork.
            let rc = unsafe {
                libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0)
            };
            if rc == 0 {
                // SAFETY: exiting the cloned child.
                unsafe { libc::_exit(0) };
            }
            if rc > 0 {
                // SAFETY: reaping the child just made.
                unsafe { libc::waitpid(rc as i32, std::ptr::null_mut(), 0) };
            }
            errno_of(rc)
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn a_foreign_abi_is_refused() {
        let f = Filter::compile(&[]);
        // The first instructions check the architecture and refuse others.
        assert_eq!(f.prog[1].k, AUDIT_ARCH);
        assert_eq!(f.prog[2].k, SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
        assert!(!f.is_empty());
    }
}
