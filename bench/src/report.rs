//! Samples, percentiles, the printed table and the JSON document of a run.

use serde::Serialize;

/// Summary of a set of samples (nearest-rank percentiles).
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Stats {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        if n == 0 {
            return Stats {
                n,
                median: f64::NAN,
                p95: f64::NAN,
                p99: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
            };
        }
        let rank = |p: f64| -> f64 {
            let idx = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            s[idx]
        };
        Stats {
            n,
            median: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            min: s[0],
            max: s[n - 1],
            mean: s.iter().sum::<f64>() / n as f64,
        }
    }
}

/// One measured quantity.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Stable machine-readable name, e.g. `api.exec.docker`.
    pub key: String,
    pub label: String,
    pub unit: String,
    pub higher_is_better: bool,
    pub stats: Stats,
    /// The key of the row this one is compared with.
    pub baseline: Option<String>,
    /// How many times better than the baseline (by median): baseline/value
    /// for times, value/baseline for rates. Above 1 means StacyVM wins.
    pub speedup: Option<f64>,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub suite: String,
    pub started_at: String,
    pub finished_at: String,
    pub rows: Vec<Row>,
    /// Structured details that do not fit a row (density steps, errors).
    pub details: serde_json::Map<String, serde_json::Value>,
    /// Whether the suite stopped early (error or interrupt).
    pub incomplete: Option<String>,
}

impl Report {
    pub fn new(suite: &str) -> Report {
        Report {
            suite: suite.to_owned(),
            started_at: now_rfc3339(),
            finished_at: String::new(),
            rows: Vec::new(),
            details: serde_json::Map::new(),
            incomplete: None,
        }
    }

    /// Adds a time measurement in milliseconds (lower is better).
    pub fn time_ms(
        &mut self,
        key: &str,
        label: &str,
        samples: &[f64],
        baseline: Option<&str>,
        note: &str,
    ) {
        self.push(key, label, "ms", false, samples, baseline, note);
    }

    /// Adds a rate (higher is better).
    pub fn rate(
        &mut self,
        key: &str,
        label: &str,
        unit: &str,
        samples: &[f64],
        baseline: Option<&str>,
        note: &str,
    ) {
        self.push(key, label, unit, true, samples, baseline, note);
    }

    /// Adds a quantity with no better direction (memory, counts).
    pub fn value(&mut self, key: &str, label: &str, unit: &str, value: f64, note: &str) {
        self.push(key, label, unit, false, &[value], None, note);
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        key: &str,
        label: &str,
        unit: &str,
        higher: bool,
        samples: &[f64],
        baseline: Option<&str>,
        note: &str,
    ) {
        self.rows.push(Row {
            key: key.to_owned(),
            label: label.to_owned(),
            unit: unit.to_owned(),
            higher_is_better: higher,
            stats: Stats::of(samples),
            baseline: baseline.map(str::to_owned),
            speedup: None,
            note: note.to_owned(),
        });
    }

    pub fn detail(&mut self, key: &str, value: serde_json::Value) {
        self.details.insert(key.to_owned(), value);
    }

    /// Fills in the ratios; baselines may have been measured after the row.
    pub fn finish(&mut self) {
        self.finished_at = now_rfc3339();
        let medians: Vec<(String, f64)> = self
            .rows
            .iter()
            .map(|r| (r.key.clone(), r.stats.median))
            .collect();
        for row in &mut self.rows {
            let Some(b) = &row.baseline else { continue };
            let Some((_, base)) = medians.iter().find(|(k, _)| k == b) else {
                continue;
            };
            let v = row.stats.median;
            let s = if row.higher_is_better {
                v / base
            } else {
                base / v
            };
            row.speedup = s.is_finite().then_some(s);
        }
    }

    /// The table as Markdown, so it reads in a terminal and pastes into the README.
    pub fn table(&self) -> String {
        let mut out = format!(
            "### suite `{}` ({} → {})\n\n",
            self.suite, self.started_at, self.finished_at
        );
        out.push_str("| metric | n | median | p95 | p99 | unit | vs baseline | note |\n");
        out.push_str("|---|---:|---:|---:|---:|---|---:|---|\n");
        for r in &self.rows {
            let one = r.stats.n <= 1;
            let vs = match (r.speedup, &r.baseline) {
                (Some(s), Some(_)) => format!("{}×", fmt_num(s)),
                (None, Some(_)) => "n/a".to_owned(),
                _ => String::new(),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.label,
                r.stats.n,
                fmt_num(r.stats.median),
                if one {
                    "–".to_owned()
                } else {
                    fmt_num(r.stats.p95)
                },
                if one {
                    "–".to_owned()
                } else {
                    fmt_num(r.stats.p99)
                },
                r.unit,
                vs,
                r.note
            ));
        }
        if let Some(why) = &self.incomplete {
            out.push_str(&format!("\n**incomplete:** {why}\n"));
        }
        out
    }
}

pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "–".to_owned();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The machine a run happened on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: f64,
    pub kernel: String,
    pub docker: String,
    pub proot: String,
    pub cpu: String,
    pub git_commit: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cmd = |c: &str, args: &[&str]| -> String {
            std::process::Command::new(c)
                .args(args)
                .output()
                .ok()
                .map(|o| {
                    String::from_utf8_lossy(if o.stdout.is_empty() {
                        &o.stderr
                    } else {
                        &o.stdout
                    })
                    .trim()
                    .to_owned()
                })
                .unwrap_or_else(|| "unknown".to_owned())
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            mem_total_mib: meminfo_kib("MemTotal").unwrap_or(0) as f64 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            docker: cmd("docker", &["version", "--format", "{{.Server.Version}}"]),
            // The version is the last word of the banner's fourth line.
            proot: format!(
                "proot {}",
                cmd("proot", &["--version"])
                    .lines()
                    .nth(3)
                    .and_then(|l| l.split_whitespace().last())
                    .unwrap_or("unknown")
            ),
            cpu,
            git_commit: cmd(
                "git",
                &[
                    "-C",
                    env!("CARGO_MANIFEST_DIR"),
                    "rev-parse",
                    "--short",
                    "HEAD",
                ],
            ),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} cores ({}), {:.1} GiB RAM, Linux {}, Docker {}, {}, commit {}",
            self.nproc,
            self.cpu,
            self.mem_total_mib / 1024.0,
            self.kernel,
            self.docker,
            self.proot,
            self.git_commit
        )
    }
}

/// A field of /proc/meminfo in KiB.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    status_field_kib(&text, field)
}

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&text, "VmRSS")
}

fn status_field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.split(':').next() == Some(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&v);
        assert_eq!((s.median, s.p95, s.p99, s.n), (50.0, 95.0, 99.0, 100));
        let s = Stats::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.p99), (2.0, 3.0));
    }

    #[test]
    fn speedup_reads_the_right_way_for_times_and_rates() {
        let mut r = Report::new("t");
        r.time_ms("a", "a", &[1.0], Some("b"), "");
        r.time_ms("b", "b", &[20.0], None, "");
        r.rate("c", "c", "MiB/s", &[50.0], Some("d"), "");
        r.rate("d", "d", "MiB/s", &[100.0], None, "");
        r.finish();
        assert_eq!(r.rows[0].speedup, Some(20.0));
        assert_eq!(r.rows[2].speedup, Some(0.5));
    }
}
