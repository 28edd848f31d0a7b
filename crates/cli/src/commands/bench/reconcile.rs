//! `spoke bench reconcile`: finding and repairing a few differences in a
//! large copy with maintained digests, against a full-snapshot compare of
//! the same data, in the same run.
//!
//! ```text
//!  setup (not timed): hub SqliteFeed with N records ── served over HTTP on 127.0.0.1:0
//!                     SqliteCopyStore with the same N records (projected)
//!  round r:  inject D differences (feed-only updates, deletes and new keys; copy-only keys)
//!    r = 1:  full compare, timed: every snapshot page over HTTP, each diffed with the copy's
//!            rows of the same key range (read from its table)
//!    every r: reconcile, timed: Reconciler over HTTP (digest levels, entries of the
//!             differing buckets, records) + the local copy, repairs applied
//!            ─▶ repairs by kind must equal the injected differences; digests equal after
//! ```
//!
//! Bytes are counted by the [`HubClient`] both paths use: request line,
//! headers and body each way. The copy is local on both paths (as for
//! `spoke reconcile`), so its reads cost time, not bytes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde::Serialize;
use serde_json::{Map, Value};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{Advance, CopySpec, CopyStore};
use spoke::feed::http::{HubClient, Traffic};
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Feed, Publisher, MAX_BATCH};
use spoke::hub::{self, Tokens};
use spoke::reconcile::{Progress, Reconciler, RepairCounts};
use spoke_core::{Change, Op, Version};

use super::{manifest, progress, thousands, Machine, Row, ScratchDir, DATASET, OWNER};

/// Targets from the issue: time with maintained digests, and bytes as a
/// share of the full compare's.
pub const TARGET_MS: f64 = 100.0;
pub const TARGET_BYTES_SHARE: f64 = 0.01;

#[derive(clap::Args)]
pub struct ReconcileArgs {
    /// Records in the dataset (feed and copy).
    #[arg(long, default_value_t = 1_000_000)]
    n: u64,
    /// Random differences injected before each reconcile.
    #[arg(long, default_value_t = 100)]
    diffs: u64,
    /// Reconcile rounds (each with fresh differences); the full compare runs once, in round 1.
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Seed of the generated data and differences.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Directory for the scratch databases (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Measured {
    path: &'static str,
    round: u64,
    differences_found: u64,
    ms: f64,
    requests: u64,
    bytes_sent: u64,
    bytes_received: u64,
}

impl Measured {
    fn bytes(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    load_average: String,
    records: u64,
    differences_per_round: u64,
    setup_seconds: f64,
    full_compare: Measured,
    reconciles: Vec<Measured>,
    reconcile_ms_median: f64,
    reconcile_ms_max: f64,
    bytes_share_max: f64,
    target_ms: f64,
    target_bytes_share: f64,
    target_met: bool,
    verified: bool,
}

fn delta(before: Traffic, after: Traffic) -> (u64, u64, u64) {
    (
        after.requests - before.requests,
        after.bytes_sent - before.bytes_sent,
        after.bytes_received - before.bytes_received,
    )
}

fn change(row: &Row, spec: &CopySpec) -> Change {
    Change {
        dataset: DATASET.into(),
        key: row.key.clone(),
        version: row.version,
        op: Op::Upsert,
        fields: spec.projection.apply(&row.fields(true)),
        owner: OWNER.into(),
        ts: 0,
        schema_version: 1,
    }
}

const BOOTSTRAP: Advance = Advance {
    position: None,
    fresh_as_of_ms: None,
    from_feed: false,
};

/// Makes the differences of each round.
struct Injector {
    /// Records set up (keys `c0` … `c{n-1}`).
    n: u64,
    /// The next new key.
    next_key: u64,
    /// Versions of the keys changed so far (the others are at 1).
    versions: BTreeMap<u64, Version>,
    rng: fastrand::Rng,
}

impl Injector {
    /// Injects `d` differences, a quarter of each kind; returns the repairs
    /// a reconcile must make.
    async fn inject(
        &mut self,
        d: u64,
        feed: &SqliteFeed,
        store: &SqliteCopyStore,
        spec: &CopySpec,
    ) -> anyhow::Result<RepairCounts> {
        let (n, rng) = (self.n, &mut self.rng);
        let mut expected = RepairCounts::default();
        let mut feed_only: Vec<ChangeInput> = Vec::new();
        let mut copy_only: Vec<Change> = Vec::new();
        let mut touched = std::collections::HashSet::new();
        for i in 0..d {
            match i % 4 {
                // The copy missed an update.
                0 | 1 => {
                    let k = loop {
                        let k = rng.u64(0..n);
                        if touched.insert(k) {
                            break k;
                        }
                    };
                    let v = self.versions.entry(k).or_insert(1);
                    *v += 1;
                    if i % 4 == 0 {
                        let row = Row::new(k, *v, rng);
                        feed_only.push(ChangeInput::upsert(row.key.clone(), *v, row.fields(true)));
                    } else {
                        // … or a delete.
                        feed_only.push(ChangeInput::delete(format!("c{k}"), *v));
                    }
                    expected.stale += 1;
                }
                // The copy missed a new record.
                2 => {
                    let row = Row::new(self.next_key, 1, rng);
                    self.next_key += 1;
                    feed_only.push(ChangeInput::upsert(row.key.clone(), 1, row.fields(true)));
                    expected.missing += 1;
                }
                // The copy holds a record the source never had.
                _ => {
                    let mut row = Row::new(rng.u64(0..u64::MAX / 2), 3, rng);
                    row.key = format!("foreign-{}", row.key);
                    copy_only.push(change(&row, spec));
                    expected.extra += 1;
                }
            }
        }
        feed.publish(DATASET, feed_only).await?;
        store.apply(DATASET, &copy_only, BOOTSTRAP).await?;
        Ok(expected)
    }
}

type State = BTreeMap<String, (Version, bool, Map<String, Value>)>;

/// The copy's rows with keys in `(after, until]` (`until` `None`: to the
/// end), read straight from its table in key order.
fn copy_range(
    conn: &rusqlite::Connection,
    after: &str,
    until: Option<&str>,
) -> anyhow::Result<State> {
    let mut stmt = conn.prepare_cached(
        "SELECT _spoke_key, _spoke_version, _spoke_deleted_at IS NOT NULL, name, email, tier
         FROM _spoke_copy_customers WHERE _spoke_key > ?1 AND (?2 IS NULL OR _spoke_key <= ?2)",
    )?;
    let rows = stmt.query_map(rusqlite::params![after, until], |r| {
        let deleted: bool = r.get(2)?;
        let mut fields = Map::new();
        if !deleted {
            fields.insert("name".into(), r.get::<_, Option<String>>(3)?.into());
            fields.insert("email".into(), r.get::<_, Option<String>>(4)?.into());
            fields.insert("tier".into(), r.get::<_, Option<i64>>(5)?.into());
        }
        Ok((
            r.get::<_, String>(0)?,
            (r.get::<_, i64>(1)? as Version, deleted, fields),
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The whole snapshot over HTTP, page by page, each page compared with the
/// copy's rows of the same key range (version, tombstone, projected
/// fields), as a tool without digests would; returns the differences.
/// Memory stays at one page per side.
async fn full_compare(
    client: &HubClient,
    copy_path: &std::path::Path,
    spec: &CopySpec,
) -> anyhow::Result<u64> {
    let conn = rusqlite::Connection::open_with_flags(
        copy_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let mut differences = 0u64;
    let mut after = String::new();
    loop {
        let page = client
            .snapshot(
                DATASET,
                (!after.is_empty()).then_some(after.as_str()),
                spoke::feed::MAX_PAGE,
            )
            .await?;
        let source: State = page
            .records
            .into_iter()
            .map(|c| {
                let fields = match c.op {
                    Op::Upsert => spec.projection.apply(&c.fields),
                    Op::Delete => Map::new(),
                };
                (c.key, (c.version, c.op == Op::Delete, fields))
            })
            .collect();
        let until = page.next_after_key.clone();
        let copy = tokio::task::block_in_place(|| copy_range(&conn, &after, until.as_deref()))?;
        for (k, s) in &source {
            if copy.get(k) != Some(s) {
                differences += 1;
            }
        }
        differences += copy.keys().filter(|k| !source.contains_key(*k)).count() as u64;
        match until {
            Some(k) => after = k,
            None => return Ok(differences),
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub fn run(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    if args.n == 0 || args.rounds == 0 {
        bail!("--n and --rounds must be at least 1");
    }
    if args.diffs > args.n {
        bail!("--diffs must not exceed --n");
    }
    let load = load_average();
    let scratch = ScratchDir::new(args.dir.as_deref())?;
    let machine = Machine::probe(scratch.path());
    let m = manifest()?;
    let spec = super::apply::copy_spec()?;
    let rt = super::super::runtime()?;
    rt.block_on(async {
        // Setup, not timed: the same N records in the hub's feed and the copy.
        let setup = Instant::now();
        let feed = Arc::new(SqliteFeed::open(&scratch.path().join("hub.db"), &m)?);
        let store = SqliteCopyStore::open(&scratch.path().join("copy.db"))?;
        store.ensure_copy(&spec).await?;
        let mut rng = fastrand::Rng::with_seed(args.seed);
        let bar = progress(args.n, "setup");
        let mut k = 0u64;
        while k < args.n {
            let rows: Vec<Row> = (k..(k + MAX_BATCH as u64).min(args.n))
                .map(|i| Row::new(i, 1, &mut rng))
                .collect();
            let inputs = rows
                .iter()
                .map(|r| ChangeInput::upsert(r.key.clone(), 1, r.fields(true)))
                .collect();
            feed.publish(DATASET, inputs).await?;
            let changes: Vec<Change> = rows.iter().map(|r| change(r, &spec)).collect();
            store.apply(DATASET, &changes, BOOTSTRAP).await?;
            k += rows.len() as u64;
            bar.inc(rows.len() as u64);
        }
        bar.finish_and_clear();
        let setup_seconds = setup.elapsed().as_secs_f64();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(hub::serve(
            listener,
            hub::router(feed.clone(), Arc::new(m.clone()), Tokens::default()),
            std::future::pending(),
        ));
        let client = HubClient::new(&base, None);
        let root = client
            .digest(DATASET, &spoke_core::digest::DigestQuery::root())
            .await?;
        let copy_root = store.digest(DATASET).await?.root();
        if root.nodes[0].1 .0 != copy_root {
            bail!("setup: the copy's digest differs from the hub's before any difference was injected");
        }

        let mut injector = Injector {
            n: args.n,
            next_key: args.n,
            versions: BTreeMap::new(),
            rng,
        };
        let mut full: Option<Measured> = None;
        let mut reconciles = Vec::new();
        let mut verified = true;
        for round in 1..=args.rounds {
            let expected = injector.inject(args.diffs, &feed, &store, &spec).await?;
            if round == 1 {
                let before = client.traffic();
                let t = Instant::now();
                let found =
                    full_compare(&client, &scratch.path().join("copy.db"), &spec).await?;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let (requests, bytes_sent, bytes_received) = delta(before, client.traffic());
                if found != args.diffs {
                    verified = false;
                    eprintln!("full compare found {found} differences, {} injected", args.diffs);
                }
                full = Some(Measured {
                    path: "full-snapshot compare",
                    round,
                    differences_found: found,
                    ms,
                    requests,
                    bytes_sent,
                    bytes_received,
                });
            }
            let before = client.traffic();
            let t = Instant::now();
            let report = Reconciler::new(&client, &store, &spec)
                .run(&|_: Progress| {})
                .await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let (requests, bytes_sent, bytes_received) = delta(before, client.traffic());
            if report.repaired != expected || !report.in_sync_after {
                verified = false;
                eprintln!(
                    "round {round}: repaired {:?}, expected {expected:?}, in sync after: {}",
                    report.repaired, report.in_sync_after
                );
            }
            reconciles.push(Measured {
                path: "reconcile (digests)",
                round,
                differences_found: report.repaired.total() + report.ahead.len() as u64,
                ms,
                requests,
                bytes_sent,
                bytes_received,
            });
        }
        let full = full.context("round 1 ran the full compare")?;
        let mut times: Vec<f64> = reconciles.iter().map(|r| r.ms).collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let max = times[times.len() - 1];
        let share = reconciles
            .iter()
            .map(|r| r.bytes() as f64 / full.bytes().max(1) as f64)
            .fold(0.0, f64::max);
        let report = Report {
            bench: "reconcile",
            machine,
            load_average: load,
            records: args.n,
            differences_per_round: args.diffs,
            setup_seconds,
            full_compare: full,
            reconciles,
            reconcile_ms_median: median,
            reconcile_ms_max: max,
            bytes_share_max: share,
            target_ms: TARGET_MS,
            target_bytes_share: TARGET_BYTES_SHARE,
            target_met: median <= TARGET_MS && share <= TARGET_BYTES_SHARE && verified,
            verified,
        };
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_table(&report);
        }
        Ok(if verified {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

fn print_table(r: &Report) {
    println!(
        "spoke bench reconcile: {} records, {} random differences per round (¼ missed updates, ¼ missed deletes, ¼ missing records, ¼ foreign records), {} rounds",
        thousands(r.records as f64),
        r.differences_per_round,
        r.reconciles.len()
    );
    println!("machine: {}", r.machine.describe());
    println!(
        "load average at start: {}; setup (not timed): {:.1} s",
        r.load_average, r.setup_seconds
    );
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header([
        "path",
        "round",
        "differences",
        "ms",
        "requests",
        "bytes sent",
        "bytes received",
        "bytes total",
        "share of full",
    ]);
    let full_bytes = r.full_compare.bytes().max(1) as f64;
    for m in std::iter::once(&r.full_compare).chain(&r.reconciles) {
        t.add_row([
            m.path.to_owned(),
            m.round.to_string(),
            m.differences_found.to_string(),
            format!("{:.1}", m.ms),
            m.requests.to_string(),
            thousands(m.bytes_sent as f64),
            thousands(m.bytes_received as f64),
            thousands(m.bytes() as f64),
            format!("{:.3}%", m.bytes() as f64 / full_bytes * 100.0),
        ]);
    }
    println!("{t}");
    println!(
        "reconcile: median {:.1} ms, max {:.1} ms (target ≤ {TARGET_MS} ms); bytes at most {:.3}% of the full compare (target ≤ {:.0}%): {}; {}",
        r.reconcile_ms_median,
        r.reconcile_ms_max,
        r.bytes_share_max * 100.0,
        TARGET_BYTES_SHARE * 100.0,
        if r.target_met { "met" } else { "MISSED" },
        if r.verified {
            "every round repaired exactly the injected differences and ended with equal digests"
        } else {
            "VERIFICATION FAILED (see above)"
        }
    );
}
