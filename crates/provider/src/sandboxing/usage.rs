//! A sandbox's resource use read off the host: its cgroup's CPU and memory
//! counters (v2 files where the v2 hierarchy has them, v1 controllers
//! otherwise, so a hybrid host that accounts CPU in v2 and memory in v1 is
//! read right) and the filesystem its root lives on.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::cgroups::Group;
use crate::RuntimeStats;

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// The value of `key` in a `key value` file (`cpu.stat`, `memory.stat`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The host's memory, from `/proc/meminfo`.
pub fn host_memory() -> Option<u64> {
    let info = read(Path::new("/proc/meminfo"))?;
    info.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// The CPUs this host can run a sandbox on.
pub fn host_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// Used and total bytes of the filesystem holding `path`.
pub fn filesystem_use(path: &Path) -> Option<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is writable memory
    // of the type statvfs fills; it is read only when the call succeeds.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    let total = st.f_blocks.saturating_mul(frsize);
    let free = st.f_bfree.saturating_mul(frsize);
    Some((total.saturating_sub(free), total))
}

/// CPU time the group used, in nanoseconds: v2 `cpu.stat` (present in every
/// v2 group, with or without the cpu controller), else v1 `cpuacct.usage`
/// (in the `cpu` directory where cpu and cpuacct share a mount).
fn cpu_time_ns(g: &Group) -> Option<u64> {
    if let Some(usec) =
        g.v2.as_ref()
            .and_then(|d| read(&d.join("cpu.stat")))
            .and_then(|t| keyed(&t, "usage_usec"))
    {
        return Some(usec.saturating_mul(1000));
    }
    ["cpuacct", "cpu"]
        .iter()
        .filter_map(|c| g.v1.get(*c))
        .find_map(|d| read_u64(&d.join("cpuacct.usage")))
}

/// The group's CPU quota in CPUs, when it has one.
fn cpu_quota(g: &Group) -> Option<f64> {
    if let Some(t) = g.v2.as_ref().and_then(|d| read(&d.join("cpu.max"))) {
        let mut it = t.split_whitespace();
        if let (Some(q), Some(p)) = (it.next(), it.next()) {
            if let (Ok(q), Ok(p)) = (q.parse::<f64>(), p.parse::<f64>()) {
                if p > 0.0 {
                    return Some(q / p);
                }
            }
        }
    }
    let d = g.v1.get("cpu")?;
    let q = read(&d.join("cpu.cfs_quota_us"))?
        .trim()
        .parse::<i64>()
        .ok()?;
    let p = read_u64(&d.join("cpu.cfs_period_us"))?;
    (q > 0 && p > 0).then(|| q as f64 / p as f64)
}

/// (usage, limit, cache, inactive file pages) of the group's memory.
fn memory(g: &Group) -> Option<(u64, Option<u64>, u64, u64)> {
    if let Some(d) = &g.v2 {
        if let Some(usage) = read_u64(&d.join("memory.current")) {
            let limit = read_u64(&d.join("memory.max"));
            let stat = read(&d.join("memory.stat")).unwrap_or_default();
            return Some((
                usage,
                limit,
                keyed(&stat, "file").unwrap_or(0),
                keyed(&stat, "inactive_file").unwrap_or(0),
            ));
        }
    }
    let d = g.v1.get("memory")?;
    let usage = read_u64(&d.join("memory.usage_in_bytes"))?;
    let limit = read_u64(&d.join("memory.limit_in_bytes"));
    let stat = read(&d.join("memory.stat")).unwrap_or_default();
    let pick = |k: &str| {
        keyed(&stat, &format!("total_{k}"))
            .or_else(|| keyed(&stat, k))
            .unwrap_or(0)
    };
    Some((usage, limit, pick("cache"), pick("inactive_file")))
}

/// What the host knows of a sandbox whose processes live in `group` and
/// whose root is the directory `root`. Memory in use leaves out inactive
/// page cache (as `docker stats` does); an unlimited group's total is the
/// host's memory.
pub fn group_stats(group: &Group, root: &Path) -> RuntimeStats {
    let host_mem = host_memory();
    let mut s = RuntimeStats {
        cpu_count: Some(cpu_quota(group).map_or_else(host_cpus, |q| q.min(host_cpus()))),
        cpu_time_ns: cpu_time_ns(group),
        ..RuntimeStats::default()
    };
    if let Some((usage, limit, cache, inactive)) = memory(group) {
        s.mem_used = Some(usage.saturating_sub(inactive));
        s.mem_cache = Some(cache);
        // v1 says "unlimited" with a huge number, v2 with `max` (no number).
        s.mem_total = match (limit, host_mem) {
            (Some(l), Some(h)) => Some(l.min(h)),
            (l, h) => l.or(h),
        };
    } else {
        s.mem_total = host_mem;
    }
    if let Some((used, total)) = filesystem_use(root) {
        s.disk_used = Some(used);
        s.disk_total = Some(total);
    }
    s
}

/// CPU time and CPU count from a kernel's `/proc/stat`: every state but
/// idle and iowait counts as used (guest time is already inside user), in
/// clock ticks of `USER_HZ` (100 on Linux).
fn proc_stat(text: &str) -> (Option<u64>, Option<f64>) {
    const NS_PER_TICK: u64 = 10_000_000;
    let mut cpus = 0u32;
    let mut used = None;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("cpu") => {
                let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal …
                if v.len() >= 4 {
                    let busy = v
                        .iter()
                        .take(8)
                        .enumerate()
                        .filter(|(i, _)| *i != 3 && *i != 4);
                    used = Some(
                        busy.map(|(_, t)| *t)
                            .sum::<u64>()
                            .saturating_mul(NS_PER_TICK),
                    );
                }
            }
            Some(c) if c.starts_with("cpu") => cpus += 1,
            _ => {}
        }
    }
    (used, (cpus > 0).then_some(f64::from(cpus)))
}

/// (total, used, cache) from a kernel's `/proc/meminfo`: used is what is
/// not available, as `free` counts it.
fn proc_meminfo(text: &str) -> (Option<u64>, Option<u64>, Option<u64>) {
    let get = |key: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    let total = get("MemTotal");
    let used = total
        .zip(get("MemAvailable"))
        .map(|(t, a)| t.saturating_sub(a));
    (total, used, get("Cached"))
}

async fn read_guest_file(agent: &crate::AgentClient, path: &str) -> crate::Result<String> {
    use futures_util::StreamExt;
    let mut stream = agent.file_read(path).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| crate::Error::internal(format!("reading {path}"), e))?;
        out.extend_from_slice(&chunk);
        // /proc/stat grows with the CPUs, never to this.
        if out.len() > 1024 * 1024 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A microVM's use as its own kernel reports it, read through its agent:
/// CPU from `/proc/stat`, memory from `/proc/meminfo`. The guest's disk is
/// not measured (the agent has no call for its filesystem's size).
pub async fn guest_stats(agent: &crate::AgentClient) -> crate::Result<RuntimeStats> {
    let (cpu_time_ns, cpu_count) = proc_stat(&read_guest_file(agent, "/proc/stat").await?);
    let (mem_total, mem_used, mem_cache) =
        proc_meminfo(&read_guest_file(agent, "/proc/meminfo").await?);
    Ok(RuntimeStats {
        cpu_count,
        cpu_time_ns,
        mem_used,
        mem_total,
        mem_cache,
        ..RuntimeStats::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_proc_files_are_read() {
        let stat = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 50 2 25 500 10 0 1 1 0 0\ncpu1 50 3 25 500 10 1 1 2 0 0\nintr 1\n";
        let (used, cpus) = proc_stat(stat);
        assert_eq!(used, Some((100 + 5 + 50 + 1 + 2 + 3) * 10_000_000));
        assert_eq!(cpus, Some(2.0));
        let mem = "MemTotal:        2000 kB\nMemFree:  100 kB\nMemAvailable:   1500 kB\nBuffers: 1 kB\nCached:  300 kB\nSwapCached: 0 kB\n";
        assert_eq!(
            proc_meminfo(mem),
            (Some(2_048_000), Some(512_000), Some(307_200))
        );
    }

    #[test]
    fn groups_are_read_in_v2_and_v1_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = dir.path().join("v2");
        let mem = dir.path().join("memory");
        let cpu = dir.path().join("cpu");
        for d in [&v2, &mem, &cpu] {
            std::fs::create_dir(d).unwrap();
        }
        // Hybrid: CPU time in v2, memory and the quota in v1.
        std::fs::write(v2.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(mem.join("memory.usage_in_bytes"), "10485760\n").unwrap();
        std::fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        std::fs::write(
            mem.join("memory.stat"),
            "cache 100\ninactive_file 7\ntotal_cache 4096\ntotal_inactive_file 1024\n",
        )
        .unwrap();
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "50000\n").unwrap();
        std::fs::write(cpu.join("cpu.cfs_period_us"), "100000\n").unwrap();
        let g = Group {
            v2: Some(v2.clone()),
            v1: [("memory".into(), mem.clone()), ("cpu".into(), cpu.clone())].into(),
        };
        let s = group_stats(&g, dir.path());
        assert_eq!(s.cpu_time_ns, Some(1_500_000));
        assert_eq!(s.cpu_count, Some(0.5f64.min(host_cpus())));
        assert_eq!(s.mem_used, Some(10485760 - 1024));
        assert_eq!(s.mem_cache, Some(4096));
        // Unlimited: the host's memory.
        assert_eq!(s.mem_total, host_memory());
        assert!(s.disk_total.unwrap() > 0);

        // Pure v2 with the memory controller and a limit.
        std::fs::write(v2.join("memory.current"), "2048\n").unwrap();
        std::fs::write(v2.join("memory.max"), "1048576\n").unwrap();
        std::fs::write(v2.join("memory.stat"), "file 512\ninactive_file 48\n").unwrap();
        std::fs::write(v2.join("cpu.max"), "max 100000\n").unwrap();
        let g = Group {
            v2: Some(v2),
            v1: Default::default(),
        };
        let s = group_stats(&g, dir.path());
        assert_eq!(s.mem_used, Some(2000));
        assert_eq!(s.mem_total, Some(1048576));
        assert_eq!(s.mem_cache, Some(512));
        assert_eq!(s.cpu_count, Some(host_cpus()));

        // Pure v1, cpu and cpuacct on one mount, no CPU time in v2.
        std::fs::write(cpu.join("cpuacct.usage"), "123456789\n").unwrap();
        let g = Group {
            v2: None,
            v1: [("cpu".into(), cpu)].into(),
        };
        let s = group_stats(&g, dir.path());
        assert_eq!(s.cpu_time_ns, Some(123456789));
        assert_eq!(s.mem_used, None);
    }
}
