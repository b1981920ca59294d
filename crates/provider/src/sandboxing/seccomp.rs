//! Seccomp filters compiled to classic BPF and installed between fork and
//! exec, so every process of a sandbox inherits them. Two modes:
//! - a deny-list ([`Filter::compile`]): the first matching [`Rule`]
//!   decides, everything else is allowed;
//! - an allow-list ([`Filter::compile_allow_list`]): only the listed system
//!   calls pass (some only with the arguments a [`Check`] accepts), every
//!   other call known to the list's era fails with one errno, and calls
//!   newer than the newest listed one fail with `ENOSYS`, so C libraries
//!   fall back to the calls they replace.
//!
//! Both first refuse a call of another ABI than the host's (i386 or x32
//! calls on x86_64) with `ENOSYS`.

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
const BPF_JMP_JA: u16 = 0x05;
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

/// What an allow-list does with one listed system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowed when the low 32 bits of argument `arg` pass `check`; refused
    /// with the list's errno otherwise. (Only for arguments the kernel reads
    /// as 32-bit values, or flags that all live in the low half.)
    AllowIf {
        arg: u32,
        check: Check,
    },
    /// Refused with this errno (e.g. `ENOSYS` for a call C libraries
    /// replace with an older one when it is missing).
    Errno(i32),
}

/// A test on one argument of a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The argument is one of these values.
    OneOf(&'static [u32]),
    /// The argument is none of these values.
    NoneOf(&'static [u32]),
    /// None of these bits is set in the argument.
    MaskClear(u32),
}

impl Check {
    /// Whether `value` passes (what the compiled filter decides).
    pub fn passes(&self, value: u32) -> bool {
        match *self {
            Check::OneOf(v) => v.contains(&value),
            Check::NoneOf(v) => !v.contains(&value),
            Check::MaskClear(m) => value & m == 0,
        }
    }
}

/// One entry of an allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syscall {
    pub nr: u32,
    pub verdict: Verdict,
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

fn ret_errno(errno: i32) -> SockFilter {
    ins(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno as u32)
}

fn ret_allow() -> SockFilter {
    ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)
}

/// A run of system call numbers `first..` (up to the next segment's first)
/// that share one verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    first: u32,
    verdict: Verdict,
}

/// The whole number line as runs of equal verdicts: unlisted calls get
/// `errno`, calls above the highest listed one `ENOSYS`. A later entry for
/// the same number wins.
fn segments(calls: &[Syscall], errno: i32) -> Vec<Segment> {
    let mut sorted: Vec<Syscall> = calls.to_vec();
    sorted.sort_by_key(|c| c.nr);
    let mut by_nr: Vec<Syscall> = Vec::with_capacity(sorted.len());
    for c in sorted {
        match by_nr.last_mut() {
            Some(last) if last.nr == c.nr => *last = c,
            _ => by_nr.push(c),
        }
    }
    let denied = Verdict::Errno(errno);
    let mut out: Vec<Segment> = Vec::new();
    let mut push = |first: u32, verdict: Verdict| match out.last() {
        Some(last) if last.verdict == verdict => {}
        _ => out.push(Segment { first, verdict }),
    };
    let mut next = 0u32;
    for c in &by_nr {
        if c.nr > next {
            push(next, denied);
        }
        push(c.nr, c.verdict);
        next = c.nr + 1;
    }
    push(next, Verdict::Errno(libc::ENOSYS));
    out
}

/// Code that finds the segment of the call number in the accumulator and
/// returns its verdict. Only forward jumps exist in classic BPF: the lower
/// half is laid out first, the upper half after it.
fn search(segs: &[Segment], errno: i32) -> Vec<SockFilter> {
    if let [only] = segs {
        return leaf(only.verdict, errno);
    }
    let mid = segs.len() / 2;
    let pivot = segs[mid].first;
    let low = search(&segs[..mid], errno);
    let high = search(&segs[mid..], errno);
    let mut out = Vec::with_capacity(low.len() + high.len() + 2);
    match u8::try_from(low.len()) {
        // nr >= pivot jumps over the lower half.
        Ok(skip) => out.push(ins(BPF_JMP_JGE_K, skip, 0, pivot)),
        // Too far for a conditional jump: through an unconditional one.
        Err(_) => {
            out.push(ins(BPF_JMP_JGE_K, 0, 1, pivot));
            out.push(ins(BPF_JMP_JA, 0, 0, low.len() as u32));
        }
    }
    out.extend(low);
    out.extend(high);
    out
}

/// The verdict of one segment (the accumulator holds the call number).
fn leaf(verdict: Verdict, errno: i32) -> Vec<SockFilter> {
    match verdict {
        Verdict::Allow => vec![ret_allow()],
        Verdict::Errno(e) => vec![ret_errno(e)],
        Verdict::AllowIf { arg, check } => {
            let mut out = vec![ins(BPF_LD_W_ABS, 0, 0, data_arg_low(arg))];
            match check {
                Check::OneOf(values) | Check::NoneOf(values) => {
                    // A match jumps past the remaining tests and the
                    // no-match return to the match return.
                    let n = values.len();
                    for (i, v) in values.iter().enumerate() {
                        let to_match = u8::try_from(n - i).expect("short value lists");
                        out.push(ins(BPF_JMP_JEQ_K, to_match, 0, *v));
                    }
                    if matches!(check, Check::OneOf(_)) {
                        out.push(ret_errno(errno));
                        out.push(ret_allow());
                    } else {
                        out.push(ret_allow());
                        out.push(ret_errno(errno));
                    }
                }
                Check::MaskClear(mask) => {
                    out.push(ins(BPF_ALU_AND_K, 0, 0, mask));
                    out.push(ins(BPF_JMP_JEQ_K, 0, 1, 0));
                    out.push(ret_allow());
                    out.push(ret_errno(errno));
                }
            }
            out
        }
    }
}

impl Filter {
    /// Compiles `rules`, checked in order after the ABI check.
    pub fn compile(rules: &[Rule]) -> Filter {
        let mut prog = Self::prelude();
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

    /// Compiles an allow-list: the listed calls get their [`Verdict`],
    /// every other call up to the highest listed number fails with
    /// `errno`, and every call above it with `ENOSYS`. The calls are found
    /// by binary search over runs of equal verdicts, so a call costs a
    /// handful of instructions however long the list.
    pub fn compile_allow_list(calls: &[Syscall], errno: i32) -> Filter {
        let mut prog = Self::prelude();
        let segments = segments(calls, errno);
        prog.extend(search(&segments, errno));
        Filter { prog }
    }

    /// The ABI checks every filter starts with; leaves the call's number in
    /// the accumulator.
    fn prelude() -> Vec<SockFilter> {
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
        prog
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

    /// Runs a compiled filter the way the kernel would, for one call made
    /// with the host's ABI.
    fn evaluate(f: &Filter, nr: u32, args: [u64; 6]) -> u32 {
        let load = |off: u32| -> u32 {
            match off {
                DATA_NR => nr,
                DATA_ARCH => AUDIT_ARCH,
                o if (16..64).contains(&o) && o % 8 == 0 => args[((o - 16) / 8) as usize] as u32,
                o => panic!("a load from offset {o}"),
            }
        };
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = f.prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => a = load(i.k),
                BPF_ALU_AND_K => a &= i.k,
                BPF_JMP_JA => pc += i.k as usize,
                BPF_JMP_JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                BPF_JMP_JGE_K => pc += usize::from(if a >= i.k { i.jt } else { i.jf }),
                BPF_RET_K => return i.k,
                c => panic!("an unexpected instruction {c:#x}"),
            }
        }
    }

    const ALLOW: u32 = SECCOMP_RET_ALLOW;
    const fn errno(e: i32) -> u32 {
        SECCOMP_RET_ERRNO | e as u32
    }

    #[test]
    fn an_allow_list_decides_every_call_number_as_listed() {
        // Scattered entries, adjacent runs, argument checks, a duplicate.
        let mut calls = vec![];
        for nr in [0u32, 1, 2, 5, 6, 7, 40, 41, 300] {
            calls.push(Syscall {
                nr,
                verdict: Verdict::Allow,
            });
        }
        for nr in 100..400u32 {
            if nr % 3 == 0 {
                calls.push(Syscall {
                    nr,
                    verdict: Verdict::Allow,
                });
            }
        }
        calls.push(Syscall {
            nr: 10,
            verdict: Verdict::AllowIf {
                arg: 0,
                check: Check::OneOf(&[0, 8, 0xffff_ffff]),
            },
        });
        calls.push(Syscall {
            nr: 11,
            verdict: Verdict::AllowIf {
                arg: 1,
                check: Check::NoneOf(&[38, 40]),
            },
        });
        calls.push(Syscall {
            nr: 12,
            verdict: Verdict::AllowIf {
                arg: 0,
                check: Check::MaskClear(0x7e02_0000),
            },
        });
        calls.push(Syscall {
            nr: 13,
            verdict: Verdict::Errno(libc::ENOSYS),
        });
        calls.push(Syscall {
            nr: 41,
            verdict: Verdict::Errno(libc::EACCES),
        });
        let f = Filter::compile_allow_list(&calls, libc::EPERM);
        assert!(f.len() < 4096);
        let expected = |nr: u32, args: [u64; 6]| -> u32 {
            // The last entry for a number wins.
            match calls.iter().rev().find(|c| c.nr == nr) {
                Some(c) => match c.verdict {
                    Verdict::Allow => ALLOW,
                    Verdict::Errno(e) => errno(e),
                    Verdict::AllowIf { arg, check } => {
                        if check.passes(args[arg as usize] as u32) {
                            ALLOW
                        } else {
                            errno(libc::EPERM)
                        }
                    }
                },
                None if nr > 399 => errno(libc::ENOSYS),
                None => errno(libc::EPERM),
            }
        };
        for nr in 0..600u32 {
            for args in [
                [0u64; 6],
                [8, 38, 0, 0, 0, 0],
                [0xffff_ffff, 40, 0, 0, 0, 0],
                [0x1000_0000, 39, 0, 0, 0, 0],
                [0x0001_0011, 1, 0, 0, 0, 0],
                // High halves are not looked at.
                [0xffff_ffff_0000_0000, 0xffff_ffff_0000_0001, 0, 0, 0, 0],
            ] {
                assert_eq!(
                    evaluate(&f, nr, args),
                    expected(nr, args),
                    "call {nr} with {args:x?}"
                );
            }
        }
    }

    #[test]
    fn a_long_allow_list_jumps_farther_than_a_conditional_jump_reaches() {
        let calls: Vec<Syscall> = (0..2000u32)
            .filter(|n| n % 2 == 0)
            .map(|nr| Syscall {
                nr,
                verdict: Verdict::Allow,
            })
            .collect();
        let f = Filter::compile_allow_list(&calls, libc::EPERM);
        assert!(f.prog.iter().any(|i| i.code == BPF_JMP_JA));
        for nr in 0..2100u32 {
            let want = if nr >= 1999 {
                errno(libc::ENOSYS)
            } else if nr % 2 == 0 {
                ALLOW
            } else {
                errno(libc::EPERM)
            };
            assert_eq!(evaluate(&f, nr, [0; 6]), want, "call {nr}");
        }
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
