//! Control groups for sandboxes, on whatever layout the host has: pure
//! cgroup v2, cgroup v1 controllers, or both at once (v1 controllers for
//! `cpu`, `memory`, `pids` and `freezer` beside a v2 mount that only offers
//! `cgroup.kill` and `cgroup.freeze`, as on hosts where Docker still
//! reports cgroup v1).
//!
//! A sandbox's [`Group`] is one directory per hierarchy that serves it. A
//! process joins all of them before it execs (see [`Group::procs_files`]),
//! so everything it starts is counted, limited, frozen and killed together.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The v1 controllers StacyVM uses.
const V1_CONTROLLERS: [&str; 4] = ["pids", "memory", "cpu", "freezer"];
/// The v2 controllers StacyVM enables below its base.
const V2_CONTROLLERS: [&str; 3] = ["pids", "memory", "cpu"];
/// CFS period for CPU quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The limits of one sandbox; `None` leaves that resource unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub pids: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// CPUs' worth of time per period (1.5 = one and a half CPUs).
    pub cpu: Option<f64>,
}

/// Which limits and controls a [`Hierarchy`] can apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforced {
    pub pids: bool,
    pub memory: bool,
    pub cpu: bool,
    /// Pause and resume (a v2 `cgroup.freeze` or the v1 freezer).
    pub freeze: bool,
    /// Every process of a group can be found (and killed) through it.
    pub kill: bool,
}

impl Enforced {
    /// "pids, memory, cpu" or "none".
    pub fn limits_text(&self) -> String {
        let mut v = Vec::new();
        if self.pids {
            v.push("pids");
        }
        if self.memory {
            v.push("memory");
        }
        if self.cpu {
            v.push("cpu");
        }
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

/// The cgroup hierarchies of this host under StacyVM's own base directory.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    /// The base directory in the v2 hierarchy, with the controllers enabled
    /// for its children.
    v2: Option<(PathBuf, Vec<String>)>,
    /// The base directory per v1 controller.
    v1: BTreeMap<String, PathBuf>,
}

/// One sandbox's cgroups: a directory in each hierarchy that serves it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// The v2 directory, when the host has a usable v2 hierarchy.
    pub v2: Option<PathBuf>,
    /// The directory per v1 controller.
    pub v1: BTreeMap<String, PathBuf>,
}

fn unescape_mountinfo(s: &str) -> String {
    super::mounts::unescape_mountinfo(s)
}

/// Mount points of cgroup file systems: (v2 mount, v1 controller → mount).
fn find_mounts() -> io::Result<(Option<PathBuf>, BTreeMap<String, PathBuf>)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut v2 = None;
    let mut v1 = BTreeMap::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount) = left.split_whitespace().nth(4) else {
            continue;
        };
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or_default();
        let _source = r.next();
        let options = r.next().unwrap_or_default();
        match fstype {
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(unescape_mountinfo(mount))),
            "cgroup" => {
                for opt in options.split(',') {
                    if V1_CONTROLLERS.contains(&opt) && !v1.contains_key(opt) {
                        v1.insert(opt.to_owned(), PathBuf::from(unescape_mountinfo(mount)));
                    }
                }
            }
            _ => {}
        }
    }
    Ok((v2, v1))
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Hierarchy {
    /// Finds the host's hierarchies and makes `base` (e.g. `stacyvm-proot`)
    /// in each usable one. Fails only when no hierarchy at all is usable.
    pub fn detect(base: &str) -> Result<Hierarchy, String> {
        let (v2_mount, v1_mounts) =
            find_mounts().map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let mut problems = Vec::new();
        let v2 = match v2_mount {
            Some(m) => match Self::prepare_v2(&m, base) {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            None => None,
        };
        let mut v1 = BTreeMap::new();
        for (ctrl, mount) in v1_mounts {
            // A v1 controller is only used where v2 does not already offer it.
            if v2.as_ref().is_some_and(|(_, c)| c.contains(&ctrl)) {
                continue;
            }
            let dir = mount.join(base);
            match std::fs::create_dir_all(&dir) {
                Ok(()) => {
                    v1.insert(ctrl, dir);
                }
                Err(e) => problems.push(format!("cannot create {}: {e}", dir.display())),
            }
        }
        let h = Hierarchy { v2, v1 };
        if h.v2.is_none() && h.v1.is_empty() {
            return Err(if problems.is_empty() {
                "no cgroup hierarchy is mounted".into()
            } else {
                problems.join("; ")
            });
        }
        Ok(h)
    }

    /// Makes the v2 base and enables what it can of pids, memory and cpu for
    /// its children. A v2 hierarchy without `cgroup.kill` (Linux < 5.14) is
    /// not used.
    fn prepare_v2(mount: &Path, base: &str) -> Result<(PathBuf, Vec<String>), String> {
        let dir = mount.join(base);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if !mount.join("cgroup.kill").exists() && !dir.join("cgroup.kill").exists() {
            return Err(
                "the cgroup v2 hierarchy has no cgroup.kill (Linux 5.14 or later needed)".into(),
            );
        }
        let available = |p: &Path| -> Vec<String> {
            read(&p.join("cgroup.controllers"))
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        let mut enabled = Vec::new();
        for ctrl in V2_CONTROLLERS {
            if !available(mount).iter().any(|c| c == ctrl) {
                continue;
            }
            // Enabled at the top, then in the base for its children. A
            // cgroup with processes of its own cannot pass controllers down
            // (the top is exempt); such a host simply gets fewer limits.
            let top_ok = read(&mount.join("cgroup.subtree_control"))
                .split_whitespace()
                .any(|c| c == ctrl)
                || write(&mount.join("cgroup.subtree_control"), &format!("+{ctrl}")).is_ok();
            if top_ok && write(&dir.join("cgroup.subtree_control"), &format!("+{ctrl}")).is_ok() {
                enabled.push(ctrl.to_owned());
            }
        }
        Ok((dir, enabled))
    }

    pub fn enforced(&self) -> Enforced {
        let has = |c: &str| {
            self.v1.contains_key(c)
                || self
                    .v2
                    .as_ref()
                    .is_some_and(|(_, e)| e.iter().any(|x| x == c))
        };
        Enforced {
            pids: has("pids"),
            memory: has("memory"),
            cpu: has("cpu"),
            freeze: self.v2.is_some() || self.v1.contains_key("freezer"),
            kill: self.v2.is_some() || !self.v1.is_empty(),
        }
    }

    /// "cgroup v2 (…); cgroup v1 (…)", for health details.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some((dir, enabled)) = &self.v2 {
            parts.push(format!(
                "cgroup v2 at {} (kill, freeze{}{})",
                dir.display(),
                if enabled.is_empty() { "" } else { ", " },
                enabled.join(", ")
            ));
        }
        if !self.v1.is_empty() {
            parts.push(format!(
                "cgroup v1 ({})",
                self.v1.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        parts.join(" + ")
    }

    /// The paths of the group `name` (nothing is created yet).
    pub fn group(&self, name: &str) -> Group {
        Group {
            v2: self.v2.as_ref().map(|(d, _)| d.join(name)),
            v1: self
                .v1
                .iter()
                .map(|(c, d)| (c.clone(), d.join(name)))
                .collect(),
        }
    }
}

impl Group {
    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.v2.iter().chain(self.v1.values())
    }

    pub fn is_empty(&self) -> bool {
        self.v2.is_none() && self.v1.is_empty()
    }

    /// Whether any of its directories exists.
    pub fn exists(&self) -> bool {
        self.dirs().any(|d| d.is_dir())
    }

    /// Creates the directories and applies `limits` where a controller
    /// serves them.
    pub fn create(&self, limits: &Limits) -> io::Result<()> {
        for d in self.dirs() {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("creating the cgroup {}: {e}", d.display()),
                    ))
                }
            }
        }
        if let Some(v2) = &self.v2 {
            let has = |f: &str| v2.join(f).exists();
            if let (Some(p), true) = (limits.pids, has("pids.max")) {
                write(&v2.join("pids.max"), &p.to_string())?;
            }
            if let (Some(m), true) = (limits.memory_bytes, has("memory.max")) {
                write(&v2.join("memory.max"), &m.to_string())?;
                if has("memory.swap.max") {
                    write(&v2.join("memory.swap.max"), "0")?;
                }
            }
            if let (Some(c), true) = (limits.cpu, has("cpu.max")) {
                write(
                    &v2.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", cpu_quota_us(c)),
                )?;
            }
        }
        if let (Some(p), Some(d)) = (limits.pids, self.v1.get("pids")) {
            write(&d.join("pids.max"), &p.to_string())?;
        }
        if let (Some(m), Some(d)) = (limits.memory_bytes, self.v1.get("memory")) {
            write(&d.join("memory.limit_in_bytes"), &m.to_string())?;
            // Swap counts against the same limit where the kernel accounts it.
            let memsw = d.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &m.to_string())?;
            }
        }
        if let (Some(c), Some(d)) = (limits.cpu, self.v1.get("cpu")) {
            write(&d.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&d.join("cpu.cfs_quota_us"), &cpu_quota_us(c).to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes `0` to, to join the group
    /// (prepared before a fork: the child may not allocate).
    pub fn procs_files(&self) -> io::Result<Vec<CString>> {
        self.dirs()
            .map(|d| {
                CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "NUL in a cgroup path")
                })
            })
            .collect()
    }

    /// The v1 `tasks` files a single-threaded process writes `0` to (with
    /// [`join_from_child`]) to join the group's v1 hierarchies. Moving the
    /// caller's own single thread skips the kernel's global threadgroup
    /// lock that writing any pid to `cgroup.procs` takes for writing (an RCU
    /// grace period: milliseconds per spawn).
    pub fn v1_task_files(&self) -> io::Result<Vec<CString>> {
        self.v1
            .values()
            .map(|d| {
                CString::new(d.join("tasks").as_os_str().as_bytes()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "NUL in a cgroup path")
                })
            })
            .collect()
    }

    /// Moves process `pid` into the group (a child that cannot join by
    /// itself, e.g. one waiting to be released into a new namespace).
    pub fn attach(&self, pid: i32) -> io::Result<()> {
        for d in self.dirs() {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Every process in the group.
    pub fn pids(&self) -> Vec<i32> {
        let mut out: Vec<i32> = Vec::new();
        for d in self.dirs() {
            for pid in read(&d.join("cgroup.procs"))
                .lines()
                .filter_map(|l| l.trim().parse().ok())
            {
                if !out.contains(&pid) {
                    out.push(pid);
                }
            }
        }
        out
    }

    /// Whether the group is paused.
    pub fn is_frozen(&self) -> bool {
        if let Some(v2) = &self.v2 {
            return read(&v2.join("cgroup.freeze")).trim() == "1";
        }
        match self.v1.get("freezer") {
            Some(d) => matches!(read(&d.join("freezer.state")).trim(), "FROZEN" | "FREEZING"),
            None => false,
        }
    }

    /// Whether the group can be frozen at all.
    pub fn can_freeze(&self) -> bool {
        self.v2.is_some() || self.v1.contains_key("freezer")
    }

    /// Freezes or thaws every process and waits until it took effect.
    pub fn set_frozen(&self, frozen: bool, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        if let Some(v2) = &self.v2 {
            let value = if frozen { "1" } else { "0" };
            write(&v2.join("cgroup.freeze"), value)?;
            // The freeze is asynchronous: cgroup.events says when it held.
            let want = format!("frozen {value}");
            while !read(&v2.join("cgroup.events"))
                .lines()
                .any(|l| l.trim() == want)
            {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the cgroup {} did not reach \"{want}\"", v2.display()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            return Ok(());
        }
        let Some(d) = self.v1.get("freezer") else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no freezer is available on this host",
            ));
        };
        let want = if frozen { "FROZEN" } else { "THAWED" };
        write(&d.join("freezer.state"), want)?;
        while read(&d.join("freezer.state")).trim() != want {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the freezer {} did not reach {want}", d.display()),
                ));
            }
            // A v1 freeze can stall half-way; asking again moves it on.
            let _ = write(&d.join("freezer.state"), want);
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Kills every process of the group and waits until none is left; then
    /// removes the directories. Succeeds when the group does not exist.
    pub fn kill_and_remove(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            match self.v2.as_ref().filter(|d| d.join("cgroup.kill").exists()) {
                Some(v2) => {
                    // A frozen group still dies from cgroup.kill; thawing
                    // first lets its tasks leave the kernel promptly.
                    let _ = write(&v2.join("cgroup.freeze"), "0");
                    write(&v2.join("cgroup.kill"), "1")?;
                }
                None => {
                    // Without cgroup.kill, freeze first so nothing forks
                    // while the list is killed, then thaw so SIGKILL lands.
                    let frozen =
                        self.can_freeze() && self.set_frozen(true, Duration::from_secs(2)).is_ok();
                    for pid in self.pids() {
                        // SAFETY: kill has no memory preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    if frozen || self.is_frozen() {
                        let _ = self.set_frozen(false, Duration::from_secs(2));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("processes {pids:?} of the sandbox's cgroup survived SIGKILL"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in self.dirs() {
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("removing the cgroup {}: {e}", d.display()),
                        ))
                    }
                    // The last task may still be on its way out.
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Ok(())
    }
}

fn cpu_quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1_000)
}

/// Writes `0` to every file in `procs`: the calling process joins the
/// group. Only system calls on memory prepared before the fork.
pub fn join_from_child(procs: &[CString]) -> io::Result<()> {
    for p in procs {
        // SAFETY: `p` is a valid NUL-terminated path; the descriptor is closed below.
        let fd = unsafe { libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: writes one byte from a static buffer to the descriptor just opened.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = io::Error::last_os_error();
        // SAFETY: closes the descriptor opened above, once.
        unsafe { libc::close(fd) };
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quotas_are_whole_microseconds_with_a_floor() {
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(2.25), 225_000);
        assert_eq!(cpu_quota_us(0.000_1), 1_000);
    }

    #[test]
    fn limits_text_names_what_is_enforced() {
        let e = Enforced {
            pids: true,
            memory: false,
            cpu: true,
            ..Default::default()
        };
        assert_eq!(e.limits_text(), "pids, cpu");
        assert_eq!(Enforced::default().limits_text(), "none");
    }

    /// On the real host: a group limits pids, freezes, and kill empties it.
    #[test]
    fn a_group_limits_freezes_and_kills_on_this_host() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root to create cgroups (CI runs as root)");
        }
        let h = Hierarchy::detect("stacyvm-test").expect("a usable cgroup hierarchy");
        let name = format!("group-{}", std::process::id());
        let g = h.group(&name);
        g.create(&Limits {
            pids: Some(8),
            memory_bytes: Some(64 << 20),
            cpu: Some(0.5),
        })
        .expect("creating the group");
        let procs = g.procs_files().expect("paths");
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 100 & done",
        ]);
        // SAFETY: the closure only writes to cgroup files (system calls).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || join_from_child(&procs));
        }
        // The shell ends after its loop, or at the first fork the limit
        // refuses; the sleeps it started stay in the group.
        let status = cmd.status().expect("running sh");
        // Every host kind StacyVM runs on has pids controllers and freezers.
        assert!(h.enforced().pids, "no pids controller: {}", h.describe());
        let n = g.pids().len();
        assert!(
            (2..=8).contains(&n),
            "the pids limit of 8 held: {n} processes"
        );
        assert!(g.can_freeze(), "no freezer: {}", h.describe());
        g.set_frozen(true, Duration::from_secs(5)).expect("freeze");
        assert!(g.is_frozen());
        g.set_frozen(false, Duration::from_secs(5)).expect("thaw");
        g.kill_and_remove(Duration::from_secs(10)).expect("kill");
        assert!(!g.exists());
        assert!(!status.success(), "a fork past the limit failed the shell");
        // The base directories may still serve a concurrent test: best effort.
        for d in h.group("").dirs() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
