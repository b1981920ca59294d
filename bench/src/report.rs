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

/// The baselines a row is compared with, by key: the program a user would
/// run (the `docker` CLI, plain `proot`) and the API a program would call
/// (Docker's Engine API on its Unix socket).
#[derive(Clone, Copy, Debug, Default)]
pub struct Vs<'a> {
    pub cli: Option<&'a str>,
    pub api: Option<&'a str>,
}

impl<'a> Vs<'a> {
    /// No baseline: a baseline row itself, or nothing to compare with.
    pub const NONE: Vs<'static> = Vs {
        cli: None,
        api: None,
    };

    pub fn cli(key: &'a str) -> Vs<'a> {
        Vs {
            cli: Some(key),
            api: None,
        }
    }

    pub fn both(cli: &'a str, api: &'a str) -> Vs<'a> {
        Vs {
            cli: Some(cli),
            api: Some(api),
        }
    }
}

/// A row's comparison with one baseline row.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// The key of the baseline row.
    pub baseline: String,
    /// How many times better than the baseline (by median): baseline/value
    /// for times, value/baseline for rates. Above 1 means StacyVM wins;
    /// absent when either median is missing.
    pub speedup: Option<f64>,
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
    /// Against the program a user would run instead.
    pub vs_cli: Option<Ratio>,
    /// Against Docker's Engine API.
    pub vs_api: Option<Ratio>,
    pub note: String,
    /// Every sample, in the order measured (6 significant digits).
    #[serde(serialize_with = "six_digits")]
    pub samples: Vec<f64>,
}

/// Samples to 6 significant digits: far below any run-to-run noise, and
/// about a third of the text of full precision.
fn six_digits<S: serde::Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for x in v {
        let r = format!("{x:.5e}").parse::<f64>().unwrap_or(*x);
        seq.serialize_element(&r)?;
    }
    seq.end()
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
    /// Headers of the printed table's two ratio columns (`vs_cli`,
    /// `vs_api`); an empty one is left out.
    #[serde(skip)]
    pub columns: [String; 2],
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
            columns: ["vs CLI".into(), "vs Engine API".into()],
        }
    }

    /// Adds a time measurement in milliseconds (lower is better).
    pub fn time_ms(&mut self, key: &str, label: &str, samples: &[f64], vs: Vs<'_>, note: &str) {
        self.push(key, label, "ms", false, samples, vs, note);
    }

    /// Adds a rate (higher is better).
    pub fn rate(
        &mut self,
        key: &str,
        label: &str,
        unit: &str,
        samples: &[f64],
        vs: Vs<'_>,
        note: &str,
    ) {
        self.push(key, label, unit, true, samples, vs, note);
    }

    /// Adds a quantity with no better direction (memory, counts).
    pub fn value(&mut self, key: &str, label: &str, unit: &str, value: f64, note: &str) {
        self.push(key, label, unit, false, &[value], Vs::NONE, note);
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        key: &str,
        label: &str,
        unit: &str,
        higher: bool,
        samples: &[f64],
        vs: Vs<'_>,
        note: &str,
    ) {
        let ratio = |k: Option<&str>| {
            k.map(|k| Ratio {
                baseline: k.to_owned(),
                speedup: None,
            })
        };
        self.rows.push(Row {
            key: key.to_owned(),
            label: label.to_owned(),
            unit: unit.to_owned(),
            higher_is_better: higher,
            stats: Stats::of(samples),
            vs_cli: ratio(vs.cli),
            vs_api: ratio(vs.api),
            note: note.to_owned(),
            samples: samples.to_vec(),
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
            let (v, higher) = (row.stats.median, row.higher_is_better);
            for ratio in [&mut row.vs_cli, &mut row.vs_api].into_iter().flatten() {
                let Some((_, base)) = medians.iter().find(|(k, _)| *k == ratio.baseline) else {
                    continue;
                };
                let s = if higher { v / base } else { base / v };
                ratio.speedup = s.is_finite().then_some(s);
            }
        }
    }

    /// The table as Markdown, so it reads in a terminal and pastes into the README.
    pub fn table(&self) -> String {
        let mut out = format!(
            "### suite `{}` ({} → {})\n\n",
            self.suite, self.started_at, self.finished_at
        );
        let shown: Vec<&String> = self.columns.iter().filter(|c| !c.is_empty()).collect();
        out.push_str("| metric | n | median | p95 | p99 | unit |");
        for c in &shown {
            out.push_str(&format!(" {c} |"));
        }
        out.push_str(" note |\n|---|---:|---:|---:|---:|---|");
        out.push_str(&"---:|".repeat(shown.len()));
        out.push_str("---|\n");
        let vs = |r: &Option<Ratio>| match r {
            Some(Ratio {
                speedup: Some(s), ..
            }) => format!("{}×", fmt_num(*s)),
            Some(_) => "n/a".to_owned(),
            None => String::new(),
        };
        for r in &self.rows {
            let one = r.stats.n <= 1;
            let mut ratios = String::new();
            for (c, ratio) in self.columns.iter().zip([&r.vs_cli, &r.vs_api]) {
                if !c.is_empty() {
                    ratios.push_str(&format!(" {} |", vs(ratio)));
                }
            }
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |{ratios} {} |\n",
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

/// The JSON file of a run.
#[derive(Serialize)]
pub struct Document<'a> {
    pub suite: &'a str,
    pub date: String,
    pub duration_s: f64,
    pub machine: &'a Machine,
    pub commit: &'a Commit,
    pub args: String,
    /// Exec inspects that found an Engine API exec still running after its
    /// output ended (each one asked again, inside the timing).
    pub engine_inspect_retries: u64,
    pub reports: &'a [Report],
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
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} cores ({}), {:.1} GiB RAM, Linux {}, Docker {}, {}",
            self.nproc,
            self.cpu,
            self.mem_total_mib / 1024.0,
            self.kernel,
            self.docker,
            self.proot,
        )
    }
}

/// The source tree a run measured: its commit and whether files it tracks
/// differ from that commit. Results under `bench/results/` do not count,
/// so one run's output does not mark the next run dirty.
#[derive(Clone, Debug, Serialize)]
pub struct Commit {
    /// The full commit id, or `unknown` outside a git checkout.
    pub id: String,
    /// None when git could not tell.
    pub dirty: Option<bool>,
    /// The changed paths (`git status --porcelain` lines), at most 50.
    pub changed: Vec<String>,
}

impl Commit {
    pub fn probe() -> Commit {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let git = |args: &[&str]| -> Option<String> {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(root)
                .args(args)
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let id = git(&["rev-parse", "HEAD"])
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let status = git(&[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)bench/results",
        ]);
        let changed: Vec<String> = status
            .as_deref()
            .unwrap_or("")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        Commit {
            id,
            dirty: status.is_some().then_some(!changed.is_empty()),
            changed: changed.into_iter().take(50).collect(),
        }
    }

    pub fn line(&self) -> String {
        let short = self.id.get(..12).unwrap_or(&self.id);
        match self.dirty {
            Some(true) => format!("commit {short} + uncommitted changes"),
            Some(false) => format!("commit {short}"),
            None => format!("commit {short} (state unknown)"),
        }
    }
}

/// JSON as people read it, fields in the order they are declared: objects
/// and arrays of objects indented, but arrays of plain values (the samples)
/// on one line each, so a file of thousands of samples stays a few hundred
/// lines long.
pub fn to_json_text<T: Serialize>(v: &T) -> serde_json::Result<String> {
    let compact = serde_json::to_string(v)?;
    let mut out = String::with_capacity(compact.len() + compact.len() / 4);
    // One entry per open bracket: whether its members go on lines of their own.
    let mut open: Vec<bool> = Vec::new();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    let mut chars = compact.chars().peekable();
    let (mut in_string, mut escaped) = (false, false);
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                let next = chars.peek().copied();
                if next == Some(if c == '{' { '}' } else { ']' }) {
                    out.push(chars.next().unwrap_or_default());
                    continue;
                }
                let lines = c == '{' || matches!(next, Some('{') | Some('['));
                open.push(lines);
                if lines {
                    newline(&mut out, open.len());
                }
            }
            '}' | ']' => {
                if open.pop().unwrap_or(true) {
                    newline(&mut out, open.len());
                }
                out.push(c);
            }
            ',' => {
                out.push(',');
                if open.last().copied().unwrap_or(true) {
                    newline(&mut out, open.len());
                } else {
                    out.push(' ');
                }
            }
            ':' => out.push_str(": "),
            c => out.push(c),
        }
    }
    out.push('\n');
    Ok(out)
}

/// A field of /proc/meminfo in KiB.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    status_field_kib(&text, field)
}

/// The 1-, 5- and 15-minute load averages (empty if unreadable): how busy
/// the host was around a suite.
pub fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| parse_loadavg(&t))
        .unwrap_or_default()
}

fn parse_loadavg(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .take(3)
        .map_while(|v| v.parse().ok())
        .collect()
}

/// `Pss` of a process in KiB: its private pages plus its share of pages
/// it shares (a static binary's text, mapped by every agent).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    status_field_kib(&text, "Pss")
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
        r.time_ms("a", "a", &[1.0], Vs::cli("b"), "");
        r.time_ms("b", "b", &[20.0], Vs::NONE, "");
        let api_only = Vs {
            cli: None,
            api: Some("d"),
        };
        r.rate("c", "c", "MiB/s", &[50.0], api_only, "");
        r.rate("d", "d", "MiB/s", &[100.0], Vs::NONE, "");
        r.finish();
        assert_eq!(
            r.rows[0].vs_cli.as_ref().and_then(|v| v.speedup),
            Some(20.0)
        );
        assert_eq!(r.rows[2].vs_api.as_ref().and_then(|v| v.speedup), Some(0.5));
        assert!(r.rows[2].vs_cli.is_none());
    }

    #[test]
    fn each_ratio_is_against_its_own_baseline() {
        let mut r = Report::new("t");
        r.time_ms("ours", "ours", &[2.0, 2.0, 2.0], Vs::both("cli", "api"), "");
        r.time_ms("cli", "cli", &[60.0], Vs::NONE, "");
        r.time_ms("api", "api", &[20.0], Vs::NONE, "");
        r.time_ms("only", "only", &[4.0], Vs::cli("cli"), "");
        r.finish();
        let speed = |row: usize| {
            let row = &r.rows[row];
            (
                row.vs_cli.as_ref().and_then(|v| v.speedup),
                row.vs_api.as_ref().and_then(|v| v.speedup),
            )
        };
        assert_eq!(speed(0), (Some(30.0), Some(10.0)));
        assert_eq!(speed(3), (Some(15.0), None));
        let table = r.table();
        assert!(table.contains("| vs CLI | vs Engine API |"), "{table}");
        assert!(table.contains("| 30.00× | 10.00× |"), "{table}");
        assert!(table.contains("| 15.00× |  |"), "{table}");
    }

    #[test]
    fn load_averages_are_read() {
        assert_eq!(
            parse_loadavg("2.14 1.98 1.64 3/812 12345\n"),
            vec![2.14, 1.98, 1.64]
        );
        assert!(parse_loadavg("").is_empty());
        assert_eq!(parse_loadavg("1.5 x 2"), vec![1.5]);
    }

    #[test]
    fn one_ratio_column_with_its_own_header() {
        let mut r = Report::new("multi");
        r.columns = ["vs single-node".into(), String::new()];
        r.rate("single", "single", "MiB/s", &[200.0], Vs::NONE, "");
        r.rate("multi", "multi", "MiB/s", &[180.0], Vs::cli("single"), "n");
        r.time_ms("t1", "t1", &[1.0], Vs::NONE, "");
        r.time_ms("t2", "t2", &[1.25], Vs::cli("t1"), "");
        r.finish();
        let table = r.table();
        assert!(
            table.contains(
                "| unit | vs single-node | note |\n|---|---:|---:|---:|---:|---|---:|---|\n"
            ),
            "{table}"
        );
        assert!(!table.contains("Engine API"), "{table}");
        // Rates: multi ÷ single; times: single ÷ multi.
        assert!(table.contains("| MiB/s | 0.900× | n |"), "{table}");
        assert!(table.contains("| ms | 0.800× |  |"), "{table}");
        assert!(table
            .lines()
            .all(|l| !l.starts_with('|') || l.matches('|').count() == 9));
    }

    #[test]
    fn every_sample_is_kept_in_the_json() {
        let mut r = Report::new("t");
        let samples = [3.0, 1.234_567_89, 2.0, 1e-4];
        // Brackets, commas, colons and escapes inside strings stay as they are.
        let note = r#"a "d, [b] {c}: e" \ f"#;
        r.time_ms("a", "a", &samples, Vs::NONE, note);
        r.detail("empty", serde_json::json!({"list": [], "map": {}}));
        r.finish();
        let v = serde_json::to_value(&r).expect("serializes");
        assert_eq!(
            v["rows"][0]["samples"],
            serde_json::json!([3.0, 1.23457, 2.0, 1e-4])
        );
        assert_eq!(v["rows"][0]["stats"]["n"], 4);
        let text = to_json_text(&r).expect("serializes");
        assert!(
            text.contains("\"samples\": [3.0, 1.23457, 2.0, 0.0001]"),
            "{text}"
        );
        let back: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(back, v);
        // Declared order, not alphabetical: the summary before the samples.
        let at = |k: &str| text.find(&format!("\"{k}\":")).expect(k);
        assert!(
            at("key") < at("stats") && at("stats") < at("samples"),
            "{text}"
        );
        assert!(text.contains("\n      \"key\": \"a\",\n"), "{text}");
    }

    #[test]
    fn the_commit_is_found() {
        // The bench is built from a git checkout; a tarball build would
        // answer `unknown` here, which this test reports as a failure.
        let c = Commit::probe();
        assert_eq!(c.id.len(), 40, "{c:?}");
        assert!(c.id.bytes().all(|b| b.is_ascii_hexdigit()), "{c:?}");
        assert!(c.dirty.is_some(), "{c:?}");
    }
}
