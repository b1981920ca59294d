//! Processes as `/proc` shows them: a pid together with its start time, so
//! a recycled pid is never mistaken for the process it replaced.

use std::path::Path;

/// A process identified by pid and start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

impl ProcId {
    /// `pid` and its start time (field 22 of `/proc/<pid>/stat`), if it
    /// runs and is not a zombie.
    pub fn of(pid: i32) -> Option<ProcId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields start
        // after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
            return None;
        }
        let start = fields.get(19)?.parse().ok()?;
        Some(ProcId { pid, start })
    }

    pub fn is_alive(self) -> bool {
        ProcId::of(self.pid) == Some(self)
    }

    /// Reads "<pid> <start>" from a pid file.
    pub fn read(path: &Path) -> Option<ProcId> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut it = text.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        Some(ProcId { pid, start })
    }

    /// Writes "<pid> <start>" to a pid file.
    pub fn write(self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, format!("{} {}\n", self.pid, self.start))
    }
}

pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

pub fn tracer_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The real uid a process runs as.
pub fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub fn has_env(pid: i32, entry: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|kv| kv == entry))
        .unwrap_or(false)
}

/// The children of `pid` (its main thread's), oldest first.
pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|t| {
            t.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_round_trips_through_a_pid_file() {
        let me = ProcId::of(std::process::id() as i32).expect("our own stat");
        assert!(me.is_alive());
        let t = tempfile::tempdir().expect("a temp dir");
        let f = t.path().join("pid");
        me.write(&f).expect("write");
        assert_eq!(ProcId::read(&f), Some(me));
        let recycled = ProcId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!recycled.is_alive());
    }
}
