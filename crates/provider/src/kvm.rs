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
    if module("kvm_pvm") && !flags_virt {
        return KvmKind::Pvm;
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

/// The directory of the guest kernel and initramfs: `$STACYVM_GUEST_DIR`,
/// else `/var/lib/stacyvm/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("STACYVM_GUEST_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/stacyvm/guest"))
}

/// The guest kernel a launcher boots: `explicit`, else `GUEST_DIR/vmlinuz`.
pub fn guest_kernel(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| guest_dir().join("vmlinuz"))
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
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
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

/// Finds `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
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
    fn the_root_mount_panic_counts_as_booted() {
        let console =
            "[    0.5] Run /init\n[    1.2] VFS: Unable to mount root fs on unknown-block(0,0)\n";
        assert!(reached_root(console).is_some_and(|l| l.contains("VFS")));
        assert_eq!(reached_root("SeaBIOS\nBooting from ROM..\n"), None);
    }
}
