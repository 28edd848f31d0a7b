//! `spoke bench apply`: the SQLite copy store's apply path against a raw
//! rusqlite upsert of the same rows (the ceiling), in the same run.
//!
//! ```text
//!  per batch (not timed): generate rows ─▶ Vec<Change> for Spoke, typed rows for raw
//!  timed, alternating which side goes first:
//!    Spoke: SqliteCopyStore::apply(changes, Advance{position, fresh_as_of, from_feed})
//!           (guard flag, upsert per change under the read-only triggers, cursor update, commit)
//!    raw:   BEGIN IMMEDIATE; INSERT … ON CONFLICT(key) DO UPDATE … WHERE excluded.version > version; COMMIT
//!  then (not timed): both tables must hold exactly the same rows.
//! ```
//!
//! Both databases use WAL with `synchronous=NORMAL` and SQLite's default page
//! cache. The raw side binds typed Rust values straight into a cached
//! statement, so it is the best this upsert can do on this machine. Batches
//! alternate between the two sides so that background load on the machine
//! hits both equally.
//!
//! `--store postgres` measures the PostgreSQL copy store the same way
//! ([`super::apply_pg`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use rusqlite::{params, Connection, TransactionBehavior};
use serde::Serialize;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{Advance, CopySpec, CopyStore};
use spoke_core::{Change, Op};

use super::{
    manifest, pg, progress, thousands, Machine, Row, ScratchDir, StoreKind, DATASET, OWNER,
};

/// The ratio spoke/raw the apply path should reach.
pub const TARGET_RATIO: f64 = 0.7;
/// The same for the PostgreSQL copy store.
pub const POSTGRES_TARGET_RATIO: f64 = 0.6;

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// Changes to apply.
    #[arg(long, default_value_t = 1_000_000)]
    n: u64,
    /// Changes per apply transaction.
    #[arg(long, default_value_t = 1_000)]
    batch: u64,
    /// Distinct keys the changes spread over (default: n/2, so about half of
    /// the changes update a key seen before).
    #[arg(long)]
    keys: Option<u64>,
    /// Seed of the generated changes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Directory for the scratch databases (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The copy store to measure.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    store: StoreKind,
    /// The PostgreSQL of `--store postgres` (a fresh schema, dropped at the end).
    #[arg(long, default_value = pg::DEFAULT_POSTGRES)]
    postgres: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

const RAW_TABLE: &str = "CREATE TABLE raw (key TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL, deleted_at INTEGER, name TEXT, email TEXT, tier INTEGER)";
const RAW_UPSERT: &str = "INSERT INTO raw (key, version, deleted_at, name, email, tier) VALUES (?1, ?2, NULL, ?3, ?4, ?5)
    ON CONFLICT (key) DO UPDATE SET version = excluded.version, deleted_at = NULL, name = excluded.name, email = excluded.email, tier = excluded.tier
    WHERE excluded.version > raw.version";

/// Generates changes: uniformly random keys, each key's version counting up.
pub(super) struct Generator {
    rng: fastrand::Rng,
    versions: Vec<u64>,
}

impl Generator {
    pub(super) fn new(seed: u64, keys: u64) -> Self {
        Generator {
            rng: fastrand::Rng::with_seed(seed),
            versions: vec![0; keys as usize],
        }
    }

    pub(super) fn batch(&mut self, n: u64) -> Vec<Row> {
        (0..n)
            .map(|_| {
                let k = self.rng.usize(0..self.versions.len());
                self.versions[k] += 1;
                Row::new(k as u64, self.versions[k], &mut self.rng)
            })
            .collect()
    }
}

/// A change as the agent hands it to the store: already projected.
pub(super) fn change(row: &Row) -> Change {
    Change {
        dataset: DATASET.into(),
        key: row.key.clone(),
        version: row.version,
        op: Op::Upsert,
        fields: row.fields(false),
        owner: OWNER.into(),
        ts: 0,
        schema_version: 1,
    }
}

fn open_raw(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(RAW_TABLE)?;
    Ok(conn)
}

/// One raw batch: one transaction, one cached statement, typed binds.
fn raw_batch(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut applied = 0;
    {
        let mut stmt = tx.prepare_cached(RAW_UPSERT)?;
        for r in rows {
            applied +=
                stmt.execute(params![r.key, r.version as i64, r.name, r.email, r.tier])? as u64;
        }
    }
    tx.commit()?;
    Ok(applied)
}

#[derive(Debug, Serialize)]
pub(super) struct Side {
    applied: u64,
    seconds: f64,
    changes_per_s: f64,
    us_per_change: f64,
}

impl Side {
    pub(super) fn new(n: u64, applied: u64, time: Duration) -> Self {
        let s = time.as_secs_f64().max(1e-9);
        Side {
            applied,
            seconds: s,
            changes_per_s: n as f64 / s,
            us_per_change: s * 1e6 / n.max(1) as f64,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    store: StoreKind,
    changes: u64,
    batch: u64,
    keys: u64,
    /// Keys that ended up in the copy; the rest of the changes were updates.
    distinct_keys: u64,
    spoke: Side,
    raw: Side,
    ratio: f64,
    target_ratio: f64,
    target_met: bool,
    /// Both tables hold the same rows and the copy's cursor is at the last batch.
    verified: bool,
}

pub fn run(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    if args.n == 0 || args.batch == 0 {
        bail!("--n and --batch must be at least 1");
    }
    let keys = args.keys.unwrap_or(args.n / 2).max(1);
    if args.store == StoreKind::Postgres {
        return run_postgres(&args, keys);
    }
    let scratch = ScratchDir::new(args.dir.as_deref())?;
    let machine = Machine::probe(scratch.path());
    let spec = copy_spec()?;

    let rt = super::super::runtime()?;
    let copy_path = scratch.path().join("copy.db");
    let raw_path = scratch.path().join("raw.db");
    let store = SqliteCopyStore::open(&copy_path)?;
    rt.block_on(store.ensure_copy(&spec))?;
    let mut raw = open_raw(&raw_path).context("raw ceiling database")?;

    let bar = progress(args.n, "apply");
    let mut gen = Generator::new(args.seed, keys);
    let (mut spoke_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
    let (mut spoke_applied, mut raw_applied) = (0u64, 0u64);
    let mut done = 0u64;
    let mut batch_no = 0u64;
    while done < args.n {
        let n = args.batch.min(args.n - done);
        // Not timed: building the inputs of both sides.
        let rows = gen.batch(n);
        let changes: Vec<Change> = rows.iter().map(change).collect();
        let advance = Advance {
            position: Some(done + n),
            fresh_as_of_ms: Some(spoke::clock::now_ms()),
            from_feed: true,
        };

        let spoke_first = batch_no % 2 == 1;
        if !spoke_first {
            let t = Instant::now();
            raw_applied += raw_batch(&mut raw, &rows)?;
            raw_time += t.elapsed();
        }
        let t = Instant::now();
        let out = rt.block_on(store.apply(DATASET, &changes, advance))?;
        spoke_time += t.elapsed();
        spoke_applied += out.applied;
        if spoke_first {
            let t = Instant::now();
            raw_applied += raw_batch(&mut raw, &rows)?;
            raw_time += t.elapsed();
        }
        done += n;
        batch_no += 1;
        bar.inc(n);
    }
    bar.finish_and_clear();

    let distinct_keys = verify(
        &rt,
        &store,
        &copy_path,
        &raw_path,
        args.n,
        spoke_applied,
        raw_applied,
    )?;
    let spoke = Side::new(args.n, spoke_applied, spoke_time);
    let raw = Side::new(args.n, raw_applied, raw_time);
    let ratio = spoke.changes_per_s / raw.changes_per_s;
    let report = Report {
        bench: "apply",
        machine,
        store: StoreKind::Sqlite,
        changes: args.n,
        batch: args.batch,
        keys,
        distinct_keys,
        spoke,
        raw,
        ratio,
        target_ratio: TARGET_RATIO,
        target_met: ratio >= TARGET_RATIO,
        verified: true,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The copy the bench applies into: the bench manifest's projection.
pub(super) fn copy_spec() -> anyhow::Result<CopySpec> {
    let m = manifest()?;
    let sub = m
        .subscriptions_of(super::CONSUMER)
        .next()
        .context("bench manifest has a subscription")?;
    CopySpec::of(&m, sub).context("bench projection")
}

/// `--store postgres`: the same workload against [`super::apply_pg`].
fn run_postgres(args: &ApplyArgs, keys: u64) -> anyhow::Result<ExitCode> {
    let scratch = ScratchDir::new(args.dir.as_deref())?;
    let mut machine = Machine::probe(scratch.path());
    machine.dir = format!("PostgreSQL at '{}'", args.postgres);
    let spec = copy_spec()?;
    let rt = super::super::runtime()?;
    let out = rt.block_on(super::apply_pg::measure(
        &args.postgres,
        &spec,
        args.n,
        args.batch,
        keys,
        args.seed,
    ))?;
    drop(rt);
    let ratio = out.spoke.changes_per_s / out.raw.changes_per_s;
    let report = Report {
        bench: "apply",
        machine,
        store: StoreKind::Postgres,
        changes: args.n,
        batch: args.batch,
        keys,
        distinct_keys: out.distinct_keys,
        spoke: out.spoke,
        raw: out.raw,
        ratio,
        target_ratio: POSTGRES_TARGET_RATIO,
        target_met: ratio >= POSTGRES_TARGET_RATIO,
        verified: true,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks both sides did the same work; returns the number of rows.
fn verify(
    rt: &tokio::runtime::Runtime,
    store: &SqliteCopyStore,
    copy_path: &Path,
    raw_path: &Path,
    n: u64,
    spoke_applied: u64,
    raw_applied: u64,
) -> anyhow::Result<u64> {
    let cursor = rt.block_on(store.cursor(DATASET))?;
    if cursor.position != Some(n)
        || cursor.received_total != n
        || cursor.applied_total != spoke_applied
    {
        bail!("copy cursor {cursor:?} does not match {n} changes applied in order");
    }
    // The raw side writes every change (each is newer than the row before
    // it); the store writes only the newest change per key of a batch, so
    // it may count a few changes as ignored. What must agree is the result.
    if spoke_applied > raw_applied {
        bail!("spoke applied {spoke_applied} changes but the raw upsert only {raw_applied}");
    }
    let conn = Connection::open(copy_path)?;
    conn.execute(
        "ATTACH DATABASE ?1 AS ceiling",
        [raw_path.display().to_string()],
    )?;
    let (copy_rows, raw_rows, same): (i64, i64, i64) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM _spoke_copy_customers WHERE _spoke_deleted_at IS NULL),
                (SELECT COUNT(*) FROM ceiling.raw),
                (SELECT COUNT(*) FROM _spoke_copy_customers s JOIN ceiling.raw r ON r.key = s._spoke_key
                  WHERE s._spoke_deleted_at IS NULL AND r.version = s._spoke_version AND r.name IS s.name AND r.email IS s.email AND r.tier IS s.tier)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if copy_rows != raw_rows || same != raw_rows {
        bail!(
            "the copy holds {copy_rows} rows and the raw table {raw_rows}, of which {same} agree"
        );
    }
    Ok(copy_rows as u64)
}

fn print_table(r: &Report) {
    println!("spoke bench apply: {} changes over {} keys ({} distinct keys written, so {} updates), batches of {}", thousands(r.changes as f64), thousands(r.keys as f64), thousands(r.distinct_keys as f64), thousands((r.changes - r.distinct_keys) as f64), r.batch);
    println!("machine: {}", r.machine.describe());
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(["path", "rows written", "seconds", "changes/s", "µs/change"]);
    let names = match r.store {
        StoreKind::Sqlite => [
            "spoke SqliteCopyStore::apply",
            "raw rusqlite upsert (ceiling)",
        ],
        StoreKind::Postgres => [
            "spoke PostgresCopyStore::apply",
            "raw COPY + INSERT … ON CONFLICT (ceiling)",
        ],
    };
    for (name, s) in [(names[0], &r.spoke), (names[1], &r.raw)] {
        t.add_row([
            name.to_owned(),
            thousands(s.applied as f64),
            format!("{:.3}", s.seconds),
            thousands(s.changes_per_s),
            format!("{:.2}", s.us_per_change),
        ]);
    }
    println!("{t}");
    println!(
        "ratio spoke/raw: {:.2} (target ≥ {:.2}: {}); both tables verified identical",
        r.ratio,
        r.target_ratio,
        if r.target_met { "met" } else { "MISSED" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_versions_count_up_per_key() {
        let mut g = Generator::new(7, 5);
        let rows = g.batch(200);
        let mut last = [0u64; 5];
        for r in &rows {
            let k: usize = r.key[1..].parse().unwrap();
            assert_eq!(r.version, last[k] + 1, "{r:?}");
            last[k] = r.version;
        }
        assert_eq!(last.iter().sum::<u64>(), 200);
        // The same seed gives the same rows, so both sides see identical input.
        assert_eq!(Generator::new(7, 5).batch(200), rows);
    }
}
