//! `spoke bench`: measurements on this machine.
//!
//! - [`apply`] — `spoke bench apply`: how fast the SQLite copy store applies
//!   batches of changes, against a raw rusqlite upsert of the same rows (the
//!   ceiling), in the same run.
//!   With `--store postgres`: the PostgreSQL copy store against a raw `COPY`
//!   into a temp table + one `INSERT … ON CONFLICT` of the same rows.
//! - [`e2e`] — `spoke bench e2e`: owner publish → hub → agent → copy latency
//!   at fixed publish rates, with hub, agent and publisher in one process.
//!   With `--feed jetstream`: owner publish → JetStream → agent → copy, beside
//!   raw async-nats publish → ordered consumer latency (the ceiling).
//! - [`read`] — `spoke bench read`: a read from the consumer's local copy
//!   beside a synchronous HTTP call to the owner for the same record.
//! - [`cdc`] — `spoke bench cdc`: rows/s from owner commits through the CDC
//!   source into a feed, beside `pg_recvlogical` decoding the same WAL (the
//!   ceiling); and owner commit → visible in a copy latency at fixed rates.
//!
//! Each prints a table, or one JSON object with `--json`, and shows a
//! progress bar on stderr when stderr is a terminal. `docs/BENCHMARKS.md`
//! records the figures and says what each number includes. Every bench that
//! touches a server (PostgreSQL, NATS) uses names no one else uses
//! (`spoke::testing::unique_name`) and removes what it created, also when it
//! fails.

mod apply;
mod apply_pg;
mod cdc;
mod e2e;
mod jetstream_raw;
mod pg;
mod read;
mod reconcile;
mod visibility;

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
    /// Reconcile a large copy with a few differences by digest, against a full-snapshot compare.
    Reconcile(reconcile::ReconcileArgs),
    /// Apply N changes into an SQLite copy and compare with a raw rusqlite upsert (the ceiling).
    Apply(apply::ApplyArgs),
    /// Publish at fixed rates through an in-process hub and agent; report visibility latency.
    E2e(e2e::E2eArgs),
    /// CDC throughput (against pg_recvlogical) and owner commit → copy latency.
    Cdc(cdc::CdcArgs),
    /// Read a record from the local copy and from its owner over HTTP; compare latency.
    Read(read::ReadArgs),
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        BenchCommand::Reconcile(a) => reconcile::run(a),
        BenchCommand::Apply(a) => apply::run(a),
        BenchCommand::E2e(a) => e2e::run(a),
        BenchCommand::Cdc(a) => cdc::run(a),
        BenchCommand::Read(a) => read::run(a),
    }
}

/// Where a bench keeps the consumer's copy.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    /// An SQLite file (the embedded default).
    Sqlite,
    /// A fresh schema of a PostgreSQL database, dropped afterwards.
    Postgres,
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
    /// `/proc/loadavg`'s 1, 5 and 15 minute load averages when the run started.
    load_average: String,
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
            load_average: load_average(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), {}, SQLite {}, {} build, files in {}, load average {}",
            self.cpus,
            self.cpu_model,
            self.os,
            self.sqlite,
            self.build,
            self.dir,
            self.load_average
        )
    }
}

/// The 1, 5 and 15 minute load averages, e.g. `1.42 2.01 2.50`, or
/// `unknown` where `/proc/loadavg` cannot be read.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| parse_load_average(&s))
        .unwrap_or_else(|| "unknown".into())
}

/// The first three fields of a `/proc/loadavg` line.
fn parse_load_average(line: &str) -> Option<String> {
    let fields: Vec<&str> = line.split_whitespace().take(3).collect();
    (fields.len() == 3 && fields.iter().all(|f| f.parse::<f64>().is_ok())).then(|| fields.join(" "))
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

/// p50, p99 and max of a set of latencies (ms), nearest-rank.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Summary {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Summary {
    /// Sorts `samples` and summarises them; NaN everywhere when empty.
    fn of(samples: &mut [f64]) -> Self {
        samples.sort_by(f64::total_cmp);
        Summary {
            p50_ms: percentile(samples, 50.0).unwrap_or(f64::NAN),
            p99_ms: percentile(samples, 99.0).unwrap_or(f64::NAN),
            max_ms: percentile(samples, 100.0).unwrap_or(f64::NAN),
        }
    }

    fn cells(&self) -> [String; 3] {
        [
            format!("{:.2}", self.p50_ms),
            format!("{:.2}", self.p99_ms),
            format!("{:.2}", self.max_ms),
        ]
    }
}

/// How many changes are due after `elapsed` seconds at `rate`/s, capped at `total`.
fn due(elapsed_s: f64, rate: u64, total: u64) -> u64 {
    ((elapsed_s * rate as f64) as u64).min(total)
}

/// Runs `body`, then `cleanup` whatever `body` returned; `body`'s error
/// wins. Ctrl-C or SIGTERM stops `body` (dropping it) and still runs
/// `cleanup`, so an interrupted run leaves no streams, schemas or slots.
async fn with_cleanup<T>(
    body: impl std::future::Future<Output = anyhow::Result<T>>,
    cleanup: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<T> {
    // Boxed: the benches' futures are large, and this one holds both.
    let (body, cleanup) = (Box::pin(body), Box::pin(cleanup));
    let out = tokio::select! {
        r = body => r,
        by = interrupted() => {
            eprintln!("interrupted by {by}: cleaning up");
            Err(anyhow::anyhow!("interrupted by {by}"))
        }
    };
    let cleaned = cleanup.await;
    match (out, cleaned) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) => Err(e.context("cleaning up after the benchmark")),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(c)) => Err(e.context(format!("(cleaning up also failed: {c:#})"))),
    }
}

/// Resolves when the process gets SIGINT (Ctrl-C) or SIGTERM; never when
/// the handlers cannot be installed.
#[cfg(unix)]
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    async fn next(s: Option<Signal>) {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
    let int = signal(SignalKind::interrupt()).ok();
    let term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        () = next(int) => "Ctrl-C",
        () = next(term) => "SIGTERM",
    }
}

#[cfg(not(unix))]
async fn interrupted() -> &'static str {
    match tokio::signal::ctrl_c().await {
        Ok(()) => "Ctrl-C",
        Err(_) => std::future::pending().await,
    }
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
    fn summary_sorts_and_takes_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = Summary::of(&mut v);
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (50.0, 99.0, 100.0));
        assert_eq!(v[0], 1.0, "sorted in place");
        assert!(Summary::of(&mut []).p99_ms.is_nan());
        assert_eq!(s.cells(), ["50.00", "99.00", "100.00"]);
    }

    #[test]
    fn due_counts_whole_changes_and_caps_at_the_total() {
        assert_eq!(due(0.0, 5_000, 100), 0);
        assert_eq!(due(0.0009, 1_000, 100), 0);
        assert_eq!(due(0.001, 1_000, 100), 1);
        assert_eq!(due(0.0105, 5_000, 1_000), 52);
        assert_eq!(due(10.0, 5_000, 1_000), 1_000);
    }

    #[test]
    fn load_average_takes_the_first_three_fields() {
        assert_eq!(
            parse_load_average("0.86 2.12 3.08 1/144 30646\n").as_deref(),
            Some("0.86 2.12 3.08")
        );
        assert_eq!(parse_load_average("0.86 2.12"), None);
        assert_eq!(parse_load_average("a b c d"), None);
    }

    #[tokio::test]
    async fn cleanup_runs_whatever_the_body_did() {
        let ran = std::sync::atomic::AtomicU32::new(0);
        let cleanup = || async {
            ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            anyhow::Ok(())
        };
        assert_eq!(with_cleanup(async { Ok(5) }, cleanup()).await.unwrap(), 5);
        let e = with_cleanup::<()>(async { anyhow::bail!("body") }, cleanup())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "body");
        let e = with_cleanup(async { Ok(1) }, async { anyhow::bail!("drop failed") })
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("drop failed"), "{e:#}");
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 2);
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
