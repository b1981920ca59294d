//! The system calls a container may make: the allow-list of Docker's
//! default seccomp profile (moby's `profiles/seccomp/default.json`) as it
//! applies to a container with Docker's default capabilities, for the
//! host's ABI. Calls the profile grants only with capabilities outside that
//! set (`CAP_SYS_ADMIN`'s `mount`, `unshare`, `setns`, `bpf`, …;
//! `CAP_SYS_PTRACE`'s `kcmp`, …; `CAP_SYS_TIME`, `CAP_SYS_MODULE`,
//! `CAP_SYS_BOOT`, …) are not listed, and neither is anything the profile
//! leaves out (io_uring, keyrings, `userfaultfd`, `perf_event_open`,
//! `open_by_handle_at`, `kexec_*`, …).
//!
//! Everything not listed fails with `EPERM` as in Docker; calls newer than
//! the newest listed one fail with `ENOSYS` so C libraries fall back.

use super::seccomp::{Check, Filter, Syscall, Verdict, NAMESPACE_FLAGS};

/// `AF_ALG` (the kernel's crypto API) and `AF_VSOCK`: the socket families
/// Docker's profile refuses.
const REFUSED_SOCKET_FAMILIES: &[u32] = &[38, 40];
/// `personality` values Docker's profile allows: Linux, `PER_LINUX32`,
/// `UNAME26` with each, and the query `0xffffffff`.
const ALLOWED_PERSONALITIES: &[u32] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

#[cfg(target_arch = "x86_64")]
mod table {
    // Numbers the libc crate does not name yet (x86_64; from 424 on the
    // numbers are the same on every architecture).
    const SYS_IO_PGETEVENTS: u32 = 333;
    const SYS_URETPROBE: u32 = 335;
    const SYS_CACHESTAT: u32 = 451;
    const SYS_MAP_SHADOW_STACK: u32 = 453;
    const SYS_FUTEX_WAKE: u32 = 454;
    const SYS_FUTEX_WAIT: u32 = 455;
    const SYS_FUTEX_REQUEUE: u32 = 456;
    const SYS_STATMOUNT: u32 = 457;
    const SYS_LISTMOUNT: u32 = 458;
    const SYS_SETXATTRAT: u32 = 463;
    const SYS_GETXATTRAT: u32 = 464;
    const SYS_LISTXATTRAT: u32 = 465;
    const SYS_REMOVEXATTRAT: u32 = 466;

    macro_rules! numbers {
        ($($name:ident),* $(,)?) => { [$(libc::$name as u32),*] };
    }

    /// Allowed whatever their arguments.
    pub fn always() -> Vec<u32> {
        let mut v = numbers![
            SYS_accept,
            SYS_accept4,
            SYS_access,
            SYS_adjtimex,
            SYS_alarm,
            SYS_bind,
            SYS_brk,
            SYS_capget,
            SYS_capset,
            SYS_chdir,
            SYS_chmod,
            SYS_chown,
            SYS_clock_adjtime,
            SYS_clock_getres,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_close,
            SYS_close_range,
            SYS_connect,
            SYS_copy_file_range,
            SYS_creat,
            SYS_dup,
            SYS_dup2,
            SYS_dup3,
            SYS_epoll_create,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_ctl_old,
            SYS_epoll_pwait,
            SYS_epoll_pwait2,
            SYS_epoll_wait,
            SYS_epoll_wait_old,
            SYS_eventfd,
            SYS_eventfd2,
            SYS_execve,
            SYS_execveat,
            SYS_exit,
            SYS_exit_group,
            SYS_faccessat,
            SYS_faccessat2,
            SYS_fadvise64,
            SYS_fallocate,
            SYS_fanotify_mark,
            SYS_fchdir,
            SYS_fchmod,
            SYS_fchmodat,
            SYS_fchmodat2,
            SYS_fchown,
            SYS_fchownat,
            SYS_fcntl,
            SYS_fdatasync,
            SYS_fgetxattr,
            SYS_flistxattr,
            SYS_flock,
            SYS_fork,
            SYS_fremovexattr,
            SYS_fsetxattr,
            SYS_fstat,
            SYS_fstatfs,
            SYS_fsync,
            SYS_ftruncate,
            SYS_futex,
            SYS_futex_waitv,
            SYS_futimesat,
            SYS_getcpu,
            SYS_getcwd,
            SYS_getdents,
            SYS_getdents64,
            SYS_getegid,
            SYS_geteuid,
            SYS_getgid,
            SYS_getgroups,
            SYS_getitimer,
            SYS_getpeername,
            SYS_getpgid,
            SYS_getpgrp,
            SYS_getpid,
            SYS_getppid,
            SYS_getpriority,
            SYS_getrandom,
            SYS_getresgid,
            SYS_getresuid,
            SYS_getrlimit,
            SYS_get_robust_list,
            SYS_getrusage,
            SYS_getsid,
            SYS_getsockname,
            SYS_getsockopt,
            SYS_get_thread_area,
            SYS_gettid,
            SYS_gettimeofday,
            SYS_getuid,
            SYS_getxattr,
            SYS_inotify_add_watch,
            SYS_inotify_init,
            SYS_inotify_init1,
            SYS_inotify_rm_watch,
            SYS_io_cancel,
            SYS_ioctl,
            SYS_io_destroy,
            SYS_io_getevents,
            SYS_ioprio_get,
            SYS_ioprio_set,
            SYS_io_setup,
            SYS_io_submit,
            SYS_kill,
            SYS_landlock_add_rule,
            SYS_landlock_create_ruleset,
            SYS_landlock_restrict_self,
            SYS_lchown,
            SYS_lgetxattr,
            SYS_link,
            SYS_linkat,
            SYS_listen,
            SYS_listxattr,
            SYS_llistxattr,
            SYS_lremovexattr,
            SYS_lseek,
            SYS_lsetxattr,
            SYS_lstat,
            SYS_madvise,
            SYS_membarrier,
            SYS_memfd_create,
            SYS_memfd_secret,
            SYS_mincore,
            SYS_mkdir,
            SYS_mkdirat,
            SYS_mknod,
            SYS_mknodat,
            SYS_mlock,
            SYS_mlock2,
            SYS_mlockall,
            SYS_mmap,
            SYS_mprotect,
            SYS_mq_getsetattr,
            SYS_mq_notify,
            SYS_mq_open,
            SYS_mq_timedreceive,
            SYS_mq_timedsend,
            SYS_mq_unlink,
            SYS_mremap,
            SYS_mseal,
            SYS_msgctl,
            SYS_msgget,
            SYS_msgrcv,
            SYS_msgsnd,
            SYS_msync,
            SYS_munlock,
            SYS_munlockall,
            SYS_munmap,
            SYS_name_to_handle_at,
            SYS_nanosleep,
            SYS_newfstatat,
            SYS_open,
            SYS_openat,
            SYS_openat2,
            SYS_pause,
            SYS_pidfd_open,
            SYS_pidfd_send_signal,
            SYS_pipe,
            SYS_pipe2,
            SYS_pkey_alloc,
            SYS_pkey_free,
            SYS_pkey_mprotect,
            SYS_poll,
            SYS_ppoll,
            SYS_prctl,
            SYS_pread64,
            SYS_preadv,
            SYS_preadv2,
            SYS_prlimit64,
            SYS_process_mrelease,
            SYS_pselect6,
            SYS_pwrite64,
            SYS_pwritev,
            SYS_pwritev2,
            SYS_read,
            SYS_readahead,
            SYS_readlink,
            SYS_readlinkat,
            SYS_readv,
            SYS_recvfrom,
            SYS_recvmmsg,
            SYS_recvmsg,
            SYS_remap_file_pages,
            SYS_removexattr,
            SYS_rename,
            SYS_renameat,
            SYS_renameat2,
            SYS_restart_syscall,
            SYS_rmdir,
            SYS_rseq,
            SYS_rt_sigaction,
            SYS_rt_sigpending,
            SYS_rt_sigprocmask,
            SYS_rt_sigqueueinfo,
            SYS_rt_sigreturn,
            SYS_rt_sigsuspend,
            SYS_rt_sigtimedwait,
            SYS_rt_tgsigqueueinfo,
            SYS_sched_getaffinity,
            SYS_sched_getattr,
            SYS_sched_getparam,
            SYS_sched_get_priority_max,
            SYS_sched_get_priority_min,
            SYS_sched_getscheduler,
            SYS_sched_rr_get_interval,
            SYS_sched_setaffinity,
            SYS_sched_setattr,
            SYS_sched_setparam,
            SYS_sched_setscheduler,
            SYS_sched_yield,
            SYS_seccomp,
            SYS_select,
            SYS_semctl,
            SYS_semget,
            SYS_semop,
            SYS_semtimedop,
            SYS_sendfile,
            SYS_sendmmsg,
            SYS_sendmsg,
            SYS_sendto,
            SYS_setfsgid,
            SYS_setfsuid,
            SYS_setgid,
            SYS_setgroups,
            SYS_setitimer,
            SYS_setpgid,
            SYS_setpriority,
            SYS_setregid,
            SYS_setresgid,
            SYS_setresuid,
            SYS_setreuid,
            SYS_setrlimit,
            SYS_set_robust_list,
            SYS_setsid,
            SYS_setsockopt,
            SYS_set_thread_area,
            SYS_set_tid_address,
            SYS_setuid,
            SYS_setxattr,
            SYS_shmat,
            SYS_shmctl,
            SYS_shmdt,
            SYS_shmget,
            SYS_shutdown,
            SYS_sigaltstack,
            SYS_signalfd,
            SYS_signalfd4,
            SYS_socketpair,
            SYS_splice,
            SYS_stat,
            SYS_statfs,
            SYS_statx,
            SYS_symlink,
            SYS_symlinkat,
            SYS_sync,
            SYS_sync_file_range,
            SYS_syncfs,
            SYS_sysinfo,
            SYS_tee,
            SYS_tgkill,
            SYS_time,
            SYS_timer_create,
            SYS_timer_delete,
            SYS_timer_getoverrun,
            SYS_timer_gettime,
            SYS_timer_settime,
            SYS_timerfd_create,
            SYS_timerfd_gettime,
            SYS_timerfd_settime,
            SYS_times,
            SYS_tkill,
            SYS_truncate,
            SYS_umask,
            SYS_uname,
            SYS_unlink,
            SYS_unlinkat,
            SYS_utime,
            SYS_utimensat,
            SYS_utimes,
            SYS_vfork,
            SYS_vmsplice,
            SYS_wait4,
            SYS_waitid,
            SYS_write,
            SYS_writev,
            // Granted from Linux 4.8 on, whose seccomp checks a traced call again.
            SYS_ptrace,
            SYS_process_vm_readv,
            SYS_process_vm_writev,
            // x86 only.
            SYS_arch_prctl,
            SYS_modify_ldt,
            // With CAP_SYS_CHROOT, which Docker's default capabilities hold.
            SYS_chroot,
        ]
        .to_vec();
        v.extend([
            SYS_IO_PGETEVENTS,
            SYS_URETPROBE,
            SYS_CACHESTAT,
            SYS_MAP_SHADOW_STACK,
            SYS_FUTEX_WAKE,
            SYS_FUTEX_WAIT,
            SYS_FUTEX_REQUEUE,
            SYS_STATMOUNT,
            SYS_LISTMOUNT,
            SYS_SETXATTRAT,
            SYS_GETXATTRAT,
            SYS_LISTXATTRAT,
            SYS_REMOVEXATTRAT,
        ]);
        v
    }

    pub const SOCKET: u32 = libc::SYS_socket as u32;
    pub const PERSONALITY: u32 = libc::SYS_personality as u32;
    pub const CLONE: u32 = libc::SYS_clone as u32;
    pub const CLONE3: u32 = libc::SYS_clone3 as u32;
}

/// The allow-list of Docker's default profile for this architecture, or
/// `None` where StacyVM has no table for it.
pub fn docker_default() -> Option<Vec<Syscall>> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut calls: Vec<Syscall> = table::always()
            .into_iter()
            .map(|nr| Syscall {
                nr,
                verdict: Verdict::Allow,
            })
            .collect();
        calls.extend([
            Syscall {
                nr: table::SOCKET,
                verdict: Verdict::AllowIf {
                    arg: 0,
                    check: Check::NoneOf(REFUSED_SOCKET_FAMILIES),
                },
            },
            Syscall {
                nr: table::PERSONALITY,
                verdict: Verdict::AllowIf {
                    arg: 0,
                    check: Check::OneOf(ALLOWED_PERSONALITIES),
                },
            },
            // Threads and processes, never new namespaces.
            Syscall {
                nr: table::CLONE,
                verdict: Verdict::AllowIf {
                    arg: 0,
                    check: Check::MaskClear(NAMESPACE_FLAGS),
                },
            },
            // Its flags live in memory a filter cannot read: C libraries
            // fall back to clone on ENOSYS.
            Syscall {
                nr: table::CLONE3,
                verdict: Verdict::Errno(libc::ENOSYS),
            },
        ]);
        Some(calls)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Docker's default profile compiled: refused calls fail with `EPERM`.
pub fn docker_default_filter() -> Option<Filter> {
    docker_default().map(|calls| Filter::compile_allow_list(&calls, libc::EPERM))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc >= 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }

    /// Runs `f` in a forked child under the filter; returns its exit code.
    fn in_child(filter: &Filter, f: fn() -> i32) -> i32 {
        // SAFETY: the child installs the filter (system calls on memory
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

    #[test]
    fn the_table_has_no_duplicates_and_fits_a_filter() {
        let calls = docker_default().expect("a table for this architecture");
        let mut nrs: Vec<u32> = calls.iter().map(|c| c.nr).collect();
        nrs.sort_unstable();
        let before = nrs.len();
        nrs.dedup();
        assert_eq!(before, nrs.len(), "a call is listed twice");
        let f = docker_default_filter().expect("a filter");
        assert!(f.len() < 1024, "{} instructions", f.len());
        for refused in [
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_keyctl,
            libc::SYS_userfaultfd,
            libc::SYS_perf_event_open,
            libc::SYS_open_by_handle_at,
            libc::SYS_io_uring_setup,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_reboot,
            libc::SYS_pivot_root,
            libc::SYS_sethostname,
            libc::SYS_clock_settime,
        ] {
            assert!(!nrs.contains(&(refused as u32)), "{refused} is listed");
        }
    }

    #[test]
    fn a_process_under_the_default_profile_runs_but_cannot_leave() {
        let f = docker_default_filter().expect("a filter");
        // Ordinary work passes, forks included.
        assert_eq!(
            in_child(&f, || {
                // SAFETY: a fork-like clone whose child exits at once.
                let rc = unsafe {
                    libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0)
                };
                if rc == 0 {
                    // SAFETY: exiting the cloned child.
                    unsafe { libc::_exit(0) };
                }
                // SAFETY: reaping the child just made.
                unsafe { libc::waitpid(rc as i32, std::ptr::null_mut(), 0) };
                // SAFETY: socket takes integers; the descriptor is closed.
                let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                if fd < 0 {
                    return 2;
                }
                // SAFETY: closes the descriptor just opened.
                unsafe { libc::close(fd) };
                errno_of(rc)
            }),
            0
        );
        // Namespaces, mounts, the crypto and vsock sockets, io_uring: refused.
        let refused: [(fn() -> i32, i32); 6] = [
            (
                // SAFETY: unshare takes flags only.
                || errno_of(unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) }),
                libc::EPERM,
            ),
            (
                || {
                    // SAFETY: a clone into a new user namespace; a child, if
                    // any, exits at once.
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
                },
                libc::EPERM,
            ),
            (
                // SAFETY: clone3 with a null argument is refused before use.
                || errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) }),
                libc::ENOSYS,
            ),
            (
                // SAFETY: socket takes integers; nothing is opened.
                || errno_of(unsafe { libc::syscall(libc::SYS_socket, 40, 1, 0) }),
                libc::EPERM,
            ),
            (
                || {
                    let mut params = [0u8; 120];
                    // SAFETY: io_uring_setup reads and writes `params`.
                    errno_of(unsafe {
                        libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr())
                    })
                },
                libc::EPERM,
            ),
            (
                // SAFETY: a number past every listed call; no memory used.
                || errno_of(unsafe { libc::syscall(1000) }),
                libc::ENOSYS,
            ),
        ];
        for (i, (f2, want)) in refused.into_iter().enumerate() {
            assert_eq!(in_child(&f, f2), want, "refusal {i}");
        }
    }
}
