//! `spoke bench`: measurements on this machine.
//!
//! - [`apply`] — `spoke bench apply`: how fast the SQLite copy store applies
//!   batches of changes, against a raw rusqlite upsert of the same rows (the
//!   ceiling), in the same run.
//! - [`e2e`] — `spoke bench e2e`: owner publish → hub → agent → copy latency
//!   at fixed publish rates, with hub, agent and publisher in one process.
//!
//! Both print a table, or one JSON object with `--json`, and show a progress
//! bar on stderr when stderr is a terminal. `docs/BENCHMARKS.md` records the
//! figures and says what each number includes.

mod apply;
mod e2e;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(clap::Subcommand)]
enum BenchCommand {
    /// Apply N changes into an SQLite copy and compare with a raw rusqlite upsert (the ceiling).
    Apply(apply::ApplyArgs),
    /// Publish at fixed rates through an in-process hub and agent; report visibility latency.
    E2e(e2e::E2eArgs),
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        BenchCommand::Apply(a) => apply::run(a),
        BenchCommand::E2e(a) => e2e::run(a),
    }
}

/// The manifest both benchmarks use: one dataset, one consumer copying three
/// of its four fields (so projection does real work in the e2e run).
const MANIFEST: &str = r#"
[services.customer-service]
[services.order-service]

[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string", tier = "int", note = "string?" }

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "email", "tier"]
strategy = "events"
staleness_budget = "1m"
"#;
const DATASET: &str = "customers";
const OWNER: &str = "customer-service";
const CONSUMER: &str = "order-service";

fn manifest() -> anyhow::Result<spoke_core::Manifest> {
    spoke_core::Manifest::parse("<bench manifest>", MANIFEST).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The values of one generated change: key `c{key}`, its version, and fields.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    key: String,
    version: u64,
    name: String,
    email: String,
    tier: i64,
}

impl Row {
    fn new(key: u64, version: u64, rng: &mut fastrand::Rng) -> Self {
        Row {
            key: format!("c{key}"),
            version,
            name: format!("Customer {key} v{version}"),
            email: format!("c{key}.v{version}@example.com"),
            tier: rng.i64(0..5),
        }
    }

    /// The owner's full record (the projected fields plus `note`, which the
    /// consumer does not copy).
    fn fields(&self, with_note: bool) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("name".into(), self.name.clone().into());
        m.insert("email".into(), self.email.clone().into());
        m.insert("tier".into(), self.tier.into());
        if with_note {
            m.insert("note".into(), "not copied".into());
        }
        m
    }
}

/// Where and on what the figures were taken.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    os: String,
    sqlite: String,
    build: &'static str,
    dir: String,
}

impl Machine {
    fn probe(dir: &Path) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                })
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            os: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
            sqlite: rusqlite::version().to_owned(),
            build: if cfg!(debug_assertions) {
                "debug (figures are not representative; use --release)"
            } else {
                "release"
            },
            dir: dir.display().to_string(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), {}, SQLite {}, {} build, files in {}",
            self.cpus, self.cpu_model, self.os, self.sqlite, self.build, self.dir
        )
    }
}

/// A scratch directory removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(parent: Option<&Path>) -> anyhow::Result<Self> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_owned);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!("spoke-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        Ok(ScratchDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A progress bar on stderr, or a hidden one when stderr is not a terminal.
fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let template = format!("{what} [{{bar:40}}] {{pos}}/{{len}} ({{per_sec}}, {{eta}} left)");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The `p`-th percentile (0–100) of `sorted` by the nearest-rank method: the
/// smallest value such that at least `p`% of the values are ≤ it. `None` for
/// an empty slice. `sorted` must be in ascending order.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `1234567.8` → `1,234,568`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 99.5), Some(100.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        // Few samples: p99 of 10 values is the largest, not an interpolation.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 50.0), Some(5.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(-5.0), "0");
    }

    #[test]
    fn the_bench_manifest_is_valid_and_projects_three_fields() {
        let m = manifest().unwrap();
        let sub = m.subscriptions_of(CONSUMER).next().unwrap();
        assert_eq!(sub.dataset, DATASET);
        assert_eq!(sub.fields, ["name", "email", "tier"]);
        assert_eq!(m.datasets[DATASET].owner, OWNER);
    }
}
