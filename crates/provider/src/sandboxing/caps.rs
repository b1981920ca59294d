//! Capabilities: narrowing a process (and whatever it execs) to a set, as
//! container runtimes do with Docker's default set.

use std::io;

/// Docker's default capabilities: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL,
/// SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD,
/// AUDIT_WRITE, SETFCAP (`CapEff: 00000000a80425fb`). In a user namespace
/// they act only on what that namespace owns.
pub const DOCKER_DEFAULT: u64 = (1 << 0) // CHOWN
    | (1 << 1) // DAC_OVERRIDE
    | (1 << 3) // FOWNER
    | (1 << 4) // FSETID
    | (1 << 5) // KILL
    | (1 << 6) // SETGID
    | (1 << 7) // SETUID
    | (1 << 8) // SETPCAP
    | (1 << 10) // NET_BIND_SERVICE
    | (1 << 13) // NET_RAW
    | (1 << 18) // SYS_CHROOT
    | (1 << 27) // MKNOD
    | (1 << 29) // AUDIT_WRITE
    | (1 << 31); // SETFCAP

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Narrows the calling process to `keep`: every other capability leaves
/// the bounding set (so no exec brings it back), the permitted and
/// effective sets become `keep`, the inheritable and ambient sets empty.
/// Needs CAP_SETPCAP. Between fork and exec: system calls only.
pub fn limit_from_child(keep: u64) -> io::Result<()> {
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            // Past the kernel's last capability.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| CapData {
        effective: (keep >> shift) as u32,
        permitted: (keep >> shift) as u32,
        inheritable: 0,
    };
    let data = [half(0), half(32)];
    // SAFETY: `header` and `data` are valid for the call (version 3 takes
    // two data structs).
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_dockers() {
        assert_eq!(DOCKER_DEFAULT, 0xa804_25fb);
    }

    #[test]
    fn a_limited_child_keeps_only_the_set_across_exec() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root to hold capabilities (CI runs as root)");
        }
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "grep -E '^Cap(Eff|Bnd|Inh|Amb)' /proc/self/status"]);
        // SAFETY: the closure only makes system calls (prctl, capset).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                limit_from_child(DOCKER_DEFAULT)
            });
        }
        let out = cmd.output().expect("running sh");
        let text = String::from_utf8_lossy(&out.stdout);
        for want in [
            "CapInh:\t0000000000000000",
            "CapEff:\t00000000a80425fb",
            "CapBnd:\t00000000a80425fb",
            "CapAmb:\t0000000000000000",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
    }
}
