//! `spoke bench e2e`: how long a published change takes to become visible in
//! a consumer's copy, at fixed publish rates.
//!
//! ```text
//!  publisher (HubClient) ──POST /changes──▶ hub (SqliteFeed, synchronous=FULL)
//!      every 1 ms tick: the changes that fell due              │ commit wakes long-polls
//!                                                               ▼
//!  observer ◀── after commit ── agent apply (SqliteCopyStore) ◀── GET /changes?wait_ms (HubClient)
//! ```
//!
//! All three run in one process on one tokio runtime, over real HTTP on
//! 127.0.0.1. The publisher ticks every millisecond and publishes, in one
//! request, every change that has fallen due at the rate (on average
//! rate/1000 per tick); it waits for each publish to return before the next,
//! as an outbox relay does, so a slow publish makes the next batch bigger
//! rather than overlapping it. Latency of a change = the instant the observer
//! saw its apply commit − the instant the publish request carrying it
//! started. Because a change may wait for the publish ahead of it, the report
//! also gives p99 measured from the instant the change fell due.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use indicatif::ProgressBar;
use serde::Serialize;
use spoke::agent::{Agent, AgentOptions};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Publisher, MAX_BATCH};
use spoke::hub::{self, Tokens};
use spoke::shutdown::shutdown_channel;
use spoke_core::Change;

use super::{
    manifest, percentile, progress, thousands, Machine, Row, ScratchDir, CONSUMER, DATASET, OWNER,
};

/// The rate the latency target is stated at, and the target.
pub const TARGET_RATE: u64 = 5_000;
pub const TARGET_P99_MS: f64 = 10.0;
/// How long to wait for the last changes of a rate to show up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const WARMUP_CHANGES: u64 = 200;

#[derive(clap::Args)]
pub struct E2eArgs {
    /// Publish rates to run one after another, in changes per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
    rates: Vec<u64>,
    /// How long to publish at each rate.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Distinct keys the publisher cycles through; each pass bumps their versions.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Directory for the hub's and the agent's databases (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The `seq`-th published change is key `c{seq % keys}` at version `seq / keys + 1`.
fn key_version(seq: u64, keys: u64) -> (u64, u64) {
    (seq % keys, seq / keys + 1)
}

/// The inverse of [`key_version`]; `None` for keys the publisher did not make.
fn seq_of(key: &str, version: u64, keys: u64) -> Option<u64> {
    let k: u64 = key.strip_prefix('c')?.parse().ok()?;
    (k < keys && version >= 1).then(|| (version - 1) * keys + k)
}

/// What the agent's observer saw.
struct Visibility {
    keys: u64,
    /// Per sequence number, when its apply committed (first time only).
    seen: Mutex<Vec<Option<Instant>>>,
    /// Sequence numbers seen, and all changes seen (warm-up included).
    count: AtomicU64,
    other: AtomicU64,
    applies: AtomicU64,
}

impl Visibility {
    fn observe(&self, changes: &[Change]) {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("visibility");
        let mut n = 0;
        for c in changes {
            match seq_of(&c.key, c.version, self.keys) {
                Some(s) => {
                    if let Some(slot @ None) = seen.get_mut(s as usize) {
                        *slot = Some(now);
                        n += 1;
                    }
                }
                None => {
                    self.other.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        drop(seen);
        self.count.fetch_add(n, Ordering::Release);
        self.applies.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Serialize)]
struct RateResult {
    target_rate: u64,
    seconds: f64,
    published: u64,
    visible: u64,
    achieved_rate: f64,
    publishes: u64,
    changes_per_publish: f64,
    agent_applies: u64,
    changes_per_apply: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Measured from when each change fell due, so waiting behind a slow publish counts.
    p99_from_due_ms: f64,
    max_from_due_ms: f64,
    /// Round trip of one publish request (HTTP + hub commit with fsync).
    publish_p50_ms: f64,
    publish_p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    keys: u64,
    agent_batch: usize,
    agent_wait_ms: u64,
    rates: Vec<RateResult>,
    target_rate: u64,
    target_p99_ms: f64,
    /// `None` when the target rate was not run.
    target_met: Option<bool>,
}

pub fn run(args: E2eArgs) -> anyhow::Result<ExitCode> {
    if args.rates.is_empty() || args.rates.contains(&0) {
        bail!("--rates must be a comma-separated list of positive changes/s, e.g. 1000,5000,20000");
    }
    if !(args.seconds > 0.0 && args.seconds <= 3600.0) {
        bail!("--seconds must be between 0 and 3600");
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    let scratch = ScratchDir::new(args.dir.as_deref())?;
    let machine = Machine::probe(scratch.path());
    let totals: Vec<u64> = args
        .rates
        .iter()
        .map(|r| (*r as f64 * args.seconds).round().max(1.0) as u64)
        .collect();
    let grand_total: u64 = totals.iter().sum();
    let manifest = Arc::new(manifest()?);
    let options = AgentOptions::default();
    let (agent_batch, agent_wait_ms) = (options.batch, options.wait.as_millis() as u64);

    let rt = super::super::runtime()?;
    let results = rt.block_on(async {
        // The hub, with the owner's and the consumer's tokens as in production.
        let owner_token = format!("owner-{:016x}", fastrand::u64(..));
        let consumer_token = format!("consumer-{:016x}", fastrand::u64(..));
        let tokens = Tokens::new(
            &[
                (OWNER.to_owned(), owner_token.clone()),
                (CONSUMER.to_owned(), consumer_token.clone()),
            ]
            .into_iter()
            .collect(),
        );
        let feed = Arc::new(SqliteFeed::open(&scratch.path().join("hub.db"), &manifest)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the hub")?;
        let url = format!("http://{}", listener.local_addr()?);
        let (trigger, shutdown) = shutdown_channel();
        let server = tokio::spawn(hub::serve(
            listener,
            hub::router(feed, manifest.clone(), tokens),
            shutdown.clone().signal(),
        ));

        // The agent, with an observer that timestamps each committed apply.
        let vis = Arc::new(Visibility {
            keys: args.keys,
            seen: Mutex::new(vec![None; grand_total as usize]),
            count: AtomicU64::new(0),
            other: AtomicU64::new(0),
            applies: AtomicU64::new(0),
        });
        let observer = {
            let vis = vis.clone();
            Arc::new(move |_dataset: &str, changes: &[Change]| vis.observe(changes))
        };
        let store = Arc::new(SqliteCopyStore::open(&scratch.path().join("copies.db"))?);
        let agent = Agent::new(
            manifest.clone(),
            CONSUMER,
            Arc::new(HubClient::new(&url, Some(consumer_token))),
            store,
        )?
        .with_options(options)
        .with_observer(observer);
        let agent_task = tokio::spawn(Arc::new(agent).run(shutdown.clone()));

        let publisher = HubClient::new(&url, Some(owner_token));
        warm_up(&publisher, &vis).await?;

        let bar = progress(grand_total, "e2e");
        let mut results = Vec::new();
        let mut base = 0;
        for (&rate, &total) in args.rates.iter().zip(&totals) {
            results.push(run_rate(&publisher, &vis, base, rate, total, &bar).await?);
            base += total;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bar.finish_and_clear();

        trigger.fire();
        let _ = tokio::time::timeout(Duration::from_secs(5), agent_task).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        anyhow::Ok(results)
    })?;
    drop(rt);

    let target_met = results
        .iter()
        .find(|r| r.target_rate == TARGET_RATE)
        .map(|r| r.visible == r.published && r.p99_ms <= TARGET_P99_MS);
    let report = Report {
        bench: "e2e",
        machine,
        keys: args.keys,
        agent_batch,
        agent_wait_ms,
        rates: results,
        target_rate: TARGET_RATE,
        target_p99_ms: TARGET_P99_MS,
        target_met,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the HTTP connections and lets the agent finish its bootstrap.
async fn warm_up(publisher: &HubClient, vis: &Visibility) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(0);
    for chunk in 0..WARMUP_CHANGES / 10 {
        let inputs: Vec<ChangeInput> = (0..10)
            .map(|i| {
                let row = Row::new(chunk * 10 + i, 1, &mut rng);
                ChangeInput::upsert(format!("w{}", chunk * 10 + i), 1, row.fields(true))
            })
            .collect();
        publisher
            .publish(DATASET, inputs)
            .await
            .context("warm-up publish")?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while vis.other.load(Ordering::Relaxed) < WARMUP_CHANGES {
        if Instant::now() > deadline {
            bail!("the agent did not apply the warm-up changes within {DRAIN_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Publishes `total` changes at `rate`, numbered from `base`, and measures them.
async fn run_rate(
    publisher: &HubClient,
    vis: &Visibility,
    base: u64,
    rate: u64,
    total: u64,
    bar: &ProgressBar,
) -> anyhow::Result<RateResult> {
    let keys = vis.keys;
    let mut rng = fastrand::Rng::with_seed(base);
    let mut started: Vec<Instant> = Vec::with_capacity(total as usize);
    let mut publishes = 0u64;
    let mut round_trips: Vec<f64> = Vec::new();
    let applies_before = vis.applies.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        let n = due.saturating_sub(sent).min(MAX_BATCH as u64);
        if n == 0 {
            continue;
        }
        let inputs: Vec<ChangeInput> = (base + sent..base + sent + n)
            .map(|seq| {
                let (k, v) = key_version(seq, keys);
                let row = Row::new(k, v, &mut rng);
                ChangeInput::upsert(row.key.clone(), v, row.fields(true))
            })
            .collect();
        let t0 = Instant::now();
        let receipt = publisher
            .publish(DATASET, inputs)
            .await
            .context("publish")?;
        if receipt.ignored > 0 {
            bail!(
                "the hub ignored {} changes as stale; the bench's versions must always be new",
                receipt.ignored
            );
        }
        round_trips.push(t0.elapsed().as_secs_f64() * 1e3);
        started.extend(std::iter::repeat_n(t0, n as usize));
        sent += n;
        publishes += 1;
        bar.inc(n);
    }
    let publish_time = start.elapsed();

    let want = base + total;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while vis.count.load(Ordering::Acquire) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let agent_applies = vis.applies.load(Ordering::Relaxed) - applies_before;

    let seen = vis.seen.lock().expect("visibility");
    let mut lat = Vec::with_capacity(total as usize);
    let mut from_due = Vec::with_capacity(total as usize);
    for (i, t0) in started.iter().enumerate() {
        if let Some(t) = seen[(base + i as u64) as usize] {
            lat.push(t.saturating_duration_since(*t0).as_secs_f64() * 1e3);
            let due = start + Duration::from_secs_f64((i as u64 + 1) as f64 / rate as f64);
            from_due.push(t.saturating_duration_since(due).as_secs_f64() * 1e3);
        }
    }
    drop(seen);
    lat.sort_by(f64::total_cmp);
    from_due.sort_by(f64::total_cmp);
    round_trips.sort_by(f64::total_cmp);
    let visible = lat.len() as u64;
    Ok(RateResult {
        target_rate: rate,
        seconds: publish_time.as_secs_f64(),
        published: total,
        visible,
        achieved_rate: total as f64 / publish_time.as_secs_f64().max(1e-9),
        publishes,
        changes_per_publish: total as f64 / publishes.max(1) as f64,
        agent_applies,
        changes_per_apply: visible as f64 / agent_applies.max(1) as f64,
        p50_ms: percentile(&lat, 50.0).unwrap_or(f64::NAN),
        p99_ms: percentile(&lat, 99.0).unwrap_or(f64::NAN),
        max_ms: percentile(&lat, 100.0).unwrap_or(f64::NAN),
        p99_from_due_ms: percentile(&from_due, 99.0).unwrap_or(f64::NAN),
        max_from_due_ms: percentile(&from_due, 100.0).unwrap_or(f64::NAN),
        publish_p50_ms: percentile(&round_trips, 50.0).unwrap_or(f64::NAN),
        publish_p99_ms: percentile(&round_trips, 99.0).unwrap_or(f64::NAN),
    })
}

fn print_table(r: &Report) {
    println!(
        "spoke bench e2e: publish → hub (HTTP, SQLite synchronous=FULL) → agent long-poll (batch {}, wait {} ms) → copy apply; {} keys",
        r.agent_batch,
        r.agent_wait_ms,
        thousands(r.keys as f64)
    );
    println!("machine: {}", r.machine.describe());
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header([
        "rate/s",
        "achieved/s",
        "changes",
        "visible",
        "per publish",
        "per apply",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p99 from due ms",
        "publish p50/p99 ms",
    ]);
    for x in &r.rates {
        t.add_row([
            thousands(x.target_rate as f64),
            thousands(x.achieved_rate),
            thousands(x.published as f64),
            thousands(x.visible as f64),
            format!("{:.1}", x.changes_per_publish),
            format!("{:.1}", x.changes_per_apply),
            format!("{:.2}", x.p50_ms),
            format!("{:.2}", x.p99_ms),
            format!("{:.2}", x.max_ms),
            format!("{:.2}", x.p99_from_due_ms),
            format!("{:.2} / {:.2}", x.publish_p50_ms, x.publish_p99_ms),
        ]);
    }
    println!("{t}");
    match r.target_met {
        Some(met) => println!(
            "target: p99 ≤ {} ms at {} changes/s, every change visible: {}",
            r.target_p99_ms,
            thousands(r.target_rate as f64),
            if met { "met" } else { "MISSED" }
        ),
        None => println!(
            "target: p99 ≤ {} ms at {} changes/s: not run (add {} to --rates)",
            r.target_p99_ms,
            thousands(r.target_rate as f64),
            r.target_rate
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_round_trip_through_key_and_version() {
        for keys in [1, 7, 10_000] {
            for seq in [0, 1, 6, 7, 9_999, 10_000, 123_456] {
                let (k, v) = key_version(seq, keys);
                assert_eq!(
                    seq_of(&format!("c{k}"), v, keys),
                    Some(seq),
                    "keys {keys} seq {seq}"
                );
            }
        }
        // Consecutive passes over the keys bump the version, so nothing is stale.
        assert_eq!(key_version(3, 10), (3, 1));
        assert_eq!(key_version(13, 10), (3, 2));
        assert_eq!(seq_of("w3", 1, 10), None);
        assert_eq!(seq_of("c10", 1, 10), None);
        assert_eq!(seq_of("c3", 0, 10), None);
    }
}
