//! What kind of KVM this host has, and whether it really runs a guest: the
//! checks every microVM launcher (QEMU with KVM, Firecracker) certifies on.
//!
//! Opening `/dev/kvm` proves little: on a PVM host (a software hypervisor
//! loaded as `kvm_pvm`, with no vmx/svm in the CPU flags) the device opens
//! and VMs are created, but only kernels built with `CONFIG_PVM_GUEST` run
//! in them; a stock kernel dies in its first instructions. So usability is
//! proven by booting a real kernel, without a root filesystem, and reading
//! its serial console up to the panic that says it ran as far as mounting
//! root.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::certify::Check;
use crate::microvm::{find_program, GuestAssets};

/// The hypervisor behind `/dev/kvm`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// `kvm_intel` or `kvm_amd` with vmx/svm in the CPU flags.
    Hardware { module: String },
    /// PVM (`/sys/module/kvm_pvm`, no vmx/svm): boots only
    /// `CONFIG_PVM_GUEST` kernels.
    Pvm,
    /// No usable KVM, and why.
    None { reason: String },
}

impl KvmKind {
    /// A short name for records and output: `hardware`, `pvm` or `none`.
    pub fn as_str(&self) -> &'static str {
        match self {
            KvmKind::Hardware { .. } => "hardware",
            KvmKind::Pvm => "pvm",
            KvmKind::None { .. } => "none",
        }
    }
}

/// Reads the host's KVM kind off `/sys/module`, `/proc/cpuinfo` and `/dev/kvm`.
pub fn detect() -> KvmKind {
    detect_in(Path::new("/"))
}

/// [`detect`] against another root (for tests of the decision itself).
pub fn detect_in(root: &Path) -> KvmKind {
    let module = |m: &str| root.join("sys/module").join(m).exists();
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let flags_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let dev = root.join("dev/kvm");
    if !dev.exists() {
        return KvmKind::None {
            reason: "there is no /dev/kvm (the kvm modules are not loaded, or this is a VM \
                     without nested virtualisation)"
                .into(),
        };
    }
    for m in ["kvm_intel", "kvm_amd"] {
        if module(m) && flags_virt {
            return KvmKind::Hardware { module: m.into() };
        }
    }
    if module("kvm_pvm") {
        return KvmKind::Pvm;
    }
    KvmKind::None {
        reason: format!(
            "/dev/kvm exists but neither kvm_intel/kvm_amd (with {} in the CPU flags) nor \
             kvm_pvm is loaded",
            if flags_virt { "vmx/svm" } else { "no vmx/svm" }
        ),
    }
}

/// The guest kernel a launcher boots: `explicit`, else `vmlinuz` in the
/// guest assets' directory ([`GuestAssets::default_dir`]).
pub fn guest_kernel(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| GuestAssets::default_dir().join("vmlinuz"))
}

/// How a probe boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootOutcome {
    /// The kernel ran up to mounting root (the console line is kept).
    Booted { line: String },
    /// It did not: why, with the end of what the console printed.
    Failed { reason: String },
}

/// The console line a kernel prints when it has run all the way to mounting
/// a root filesystem it was not given.
fn reached_root(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| {
            l.contains("VFS: Unable to mount root fs")
                || l.contains("Kernel panic - not syncing")
                || l.contains("No working init found")
        })
        .map(|l| l.trim().to_owned())
}

/// The last `n` lines of `s`, for failure reasons.
/// Terminal escape sequences (SeaBIOS clears the screen) and other
/// control characters are left out.
fn tail(s: &str, n: usize) -> String {
    let mut clean = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter; else one character.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\n' || !c.is_control() {
            clean.push(c);
        }
    }
    let lines: Vec<&str> = clean
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join(" | ")
}

/// Boots `kernel` under `qemu` (`qemu-system-x86_64`) with `accel` (`kvm` or
/// `tcg`) and no root filesystem, and waits up to `limit` for the console
/// to show the kernel reached mounting root. QEMU is killed on every path.
pub async fn probe_boot(qemu: &Path, kernel: &Path, accel: &str, limit: Duration) -> BootOutcome {
    if !kernel.is_file() {
        return BootOutcome::Failed {
            reason: format!("no guest kernel at {}", kernel.display()),
        };
    }
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args([
        "-accel",
        accel,
        "-M",
        "q35",
        "-m",
        "256",
        "-nographic",
        "-no-reboot",
    ])
    .args(["-nodefaults", "-serial", "stdio", "-monitor", "none"])
    .arg("-kernel")
    .arg(kernel)
    .args(["-append", "console=ttyS0 panic=-1"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return BootOutcome::Failed {
                reason: format!("cannot run {}: {e}", qemu.display()),
            }
        }
    };
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill().await;
        return BootOutcome::Failed {
            reason: "QEMU's console pipes were not set up".into(),
        };
    };
    let mut console = String::new();
    let mut errors = Vec::new();
    let watch = async {
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    console.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if let Some(line) = reached_root(&console) {
                        return Some(line);
                    }
                }
            }
        }
    };
    let found = tokio::time::timeout(limit, watch).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), err.read_to_end(&mut errors)).await;
    let errors = String::from_utf8_lossy(&errors).into_owned();
    match found {
        Ok(Some(line)) => BootOutcome::Booted { line },
        Ok(None) => BootOutcome::Failed {
            reason: format!(
                "QEMU exited before the kernel reached mounting root{}{}",
                if errors.trim().is_empty() {
                    String::new()
                } else {
                    format!("; QEMU said: {}", tail(&errors, 4))
                },
                if console.trim().is_empty() {
                    "; the console stayed empty".to_owned()
                } else {
                    format!("; console ended: {}", tail(&console, 3))
                }
            ),
        },
        Err(_) => BootOutcome::Failed {
            reason: format!(
                "the kernel did not reach mounting root within {} s{}",
                limit.as_secs(),
                if console.trim().is_empty() {
                    "; the console stayed empty".to_owned()
                } else {
                    format!("; console ended: {}", tail(&console, 3))
                }
            ),
        },
    }
}

/// How long a kernel gets to reach mounting root under KVM. A kernel that
/// runs at all gets there in seconds; under PVM a stock kernel spins
/// without output until this ends.
pub const KVM_PROBE_LIMIT: Duration = Duration::from_secs(30);

/// The host-level checks of a microVM launcher, and what they found.
#[derive(Clone, Debug)]
pub struct KvmReport {
    pub kind: KvmKind,
    /// Whether KVM booted the guest kernel here.
    pub boots: bool,
    /// `kvm-device`, `qemu-binary`, `guest-kernel` and `kvm-boots-guest`.
    pub checks: Vec<Check>,
}

/// The fix for a guest that does not boot under PVM.
pub const PVM_FIX: &str = "boot a guest kernel built with CONFIG_PVM_GUEST (PVM's own kernel \
     tree; no Debian kernel is) by passing --guest-kernel PATH, and run a PVM-capable \
     firecracker build";

/// Tells the host's KVM kind and proves KVM usable by booting `kernel`
/// under `qemu-system-x86_64 -accel kvm` up to its root-mount panic,
/// bounded by [`KVM_PROBE_LIMIT`]. Opening `/dev/kvm` is never taken as
/// proof: a PVM host opens it and still runs no stock kernel.
pub async fn kvm_checks(kernel: &Path) -> KvmReport {
    let kind = detect();
    let mut checks = Vec::new();
    match &kind {
        KvmKind::Hardware { module } => checks.push(Check::pass(
            "kvm-device",
            format!("hardware KVM: /dev/kvm from {module}, vmx/svm in the CPU flags"),
        )),
        KvmKind::Pvm => checks.push(Check::pass(
            "kvm-device",
            "software KVM (PVM): /dev/kvm from kvm_pvm, no vmx/svm in the CPU flags",
        )),
        KvmKind::None { reason } => checks.push(Check::fail(
            "kvm-device",
            format!("no KVM: {reason}"),
            "run on a host with vmx/svm (or nested virtualisation) and kvm_intel/kvm_amd \
             loaded",
        )),
    }
    let qemu = find_program("qemu-system-x86_64");
    match &qemu {
        Some(q) => checks.push(Check::pass("qemu-binary", q.display().to_string())),
        None => checks.push(Check::fail(
            "qemu-binary",
            "qemu-system-x86_64 was not found",
            "install Debian's qemu-system-x86 (apt-get install qemu-system-x86)",
        )),
    }
    let has_kernel = kernel.is_file();
    if has_kernel {
        checks.push(Check::pass("guest-kernel", kernel.display().to_string()));
    } else {
        checks.push(Check::fail(
            "guest-kernel",
            format!("no guest kernel at {}", kernel.display()),
            "build the guest assets with scripts/build-guest.sh, or pass --guest-kernel PATH",
        ));
    }
    let mut boots = false;
    let boot = match (&kind, &qemu) {
        (KvmKind::None { .. }, _) => Check::fail(
            "kvm-boots-guest",
            "not tried: there is no KVM",
            "see kvm-device",
        ),
        (_, None) => Check::fail(
            "kvm-boots-guest",
            "not tried: QEMU is missing",
            "see qemu-binary",
        ),
        (_, Some(_)) if !has_kernel => Check::fail(
            "kvm-boots-guest",
            "not tried: there is no guest kernel",
            "see guest-kernel",
        ),
        (_, Some(q)) => match probe_boot(q, kernel, "kvm", KVM_PROBE_LIMIT).await {
            BootOutcome::Booted { line } => {
                boots = true;
                Check::pass(
                    "kvm-boots-guest",
                    format!("the guest kernel ran under KVM up to mounting root ({line})"),
                )
            }
            BootOutcome::Failed { reason } if kind == KvmKind::Pvm => Check::fail(
                "kvm-boots-guest",
                format!("software KVM (PVM): a stock guest kernel does not boot ({reason})"),
                PVM_FIX,
            ),
            BootOutcome::Failed { reason } => Check::fail(
                "kvm-boots-guest",
                format!("KVM did not boot the guest kernel: {reason}"),
                format!(
                    "check that {} is a bootable x86-64 kernel and read the host's dmesg for \
                     KVM errors",
                    kernel.display()
                ),
            ),
        },
    };
    checks.push(boot);
    KvmReport {
        kind,
        boots,
        checks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(modules: &[&str], flags: &str, kvm: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        for m in modules {
            std::fs::create_dir_all(d.path().join("sys/module").join(m)).expect("mkdir");
        }
        std::fs::create_dir_all(d.path().join("proc")).expect("mkdir");
        std::fs::create_dir_all(d.path().join("dev")).expect("mkdir");
        std::fs::write(
            d.path().join("proc/cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu sse2 {flags}\n"),
        )
        .expect("write");
        if kvm {
            std::fs::write(d.path().join("dev/kvm"), "").expect("write");
        }
        d
    }

    #[test]
    fn hardware_pvm_and_none_are_told_apart() {
        let hw = fake_root(&["kvm", "kvm_intel"], "vmx", true);
        assert_eq!(
            detect_in(hw.path()),
            KvmKind::Hardware {
                module: "kvm_intel".into()
            }
        );
        let pvm = fake_root(&["kvm", "kvm_pvm"], "", true);
        assert_eq!(detect_in(pvm.path()), KvmKind::Pvm);
        let none = fake_root(&["kvm_intel"], "vmx", false);
        assert_eq!(detect_in(none.path()).as_str(), "none");
        let no_module = fake_root(&["kvm"], "", true);
        assert_eq!(detect_in(no_module.path()).as_str(), "none");
    }

    #[test]
    fn console_tails_leave_out_escape_sequences() {
        let console = "SeaBIOS\r\nBooting from ROM...\r\n\u{1b}c\u{1b}[?7l\u{1b}[2J\r\n";
        assert_eq!(tail(console, 3), "SeaBIOS | Booting from ROM...");
    }

    #[test]
    fn the_root_mount_panic_counts_as_booted() {
        let console =
            "[    0.5] Run /init\n[    1.2] VFS: Unable to mount root fs on unknown-block(0,0)\n";
        assert!(reached_root(console).is_some_and(|l| l.contains("VFS")));
        assert_eq!(reached_root("SeaBIOS\nBooting from ROM..\n"), None);
    }
}
