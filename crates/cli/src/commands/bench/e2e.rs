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
//! rather than overlapping it (up to the relay's batch of 1,000 changes;
//! a transient publish failure is retried, as the relay retries). Latency of a change = the instant the observer
//! saw its apply commit − the instant the publish request carrying it
//! started. Because a change may wait for the publish ahead of it, the report
//! also gives p99 measured from the instant the change fell due.
//!
//! # `--feed jetstream`
//! ```text
//!  publisher (JetStreamFeed, own connection) ──▶ stream <PREFIX>_CUSTOMERS_LOG (──▶ _STATE) on NATS
//!  observer ◀── agent apply ◀── JetStreamFeed::read (own connection, ordered consumer)
//!  and, in the same run, at every rate: raw async-nats publish+ack ──▶ <PREFIX>_RAW ──▶ ordered consumer
//! ```
//! The streams get a unique prefix and are deleted at the end. The raw run
//! ([`super::jetstream_raw`]) is the ceiling: same server, subjects per key,
//! payload size and rates, with nothing of Spoke in between. The two runs of
//! a rate go one after the other, alternating which goes first.
//!
//! `--store postgres` keeps the copy in a fresh schema of `--postgres`
//! (dropped at the end) instead of an SQLite file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use indicatif::ProgressBar;
use serde::Serialize;
use spoke::agent::{Agent, AgentOptions};
use spoke::copy::postgres::{PostgresCopyStore, PostgresOptions};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::CopyStore;
use spoke::feed::http::HubClient;
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Feed, Publisher, MAX_BATCH};
use spoke::hub::{self, Tokens};
use spoke::outbox::relay::RelayOptions;
use spoke::shutdown::shutdown_channel;
use spoke_core::Change;

use super::jetstream_raw::{RawJetStream, RawRateResult};
use super::visibility::Visibility;
use super::{
    due, manifest, pg, progress, thousands, with_cleanup, Machine, Row, ScratchDir, StoreKind,
    Summary, CONSUMER, DATASET, OWNER,
};

/// The rate the latency targets are stated at, and the targets per feed.
pub const TARGET_RATE: u64 = 5_000;
pub const TARGET_P99_MS: f64 = 10.0;
pub const JETSTREAM_TARGET_P99_MS: f64 = 20.0;

/// Where the feed lives.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedKind {
    /// The embedded hub (SQLite log) over HTTP.
    Hub,
    /// NATS JetStream.
    Jetstream,
}

/// JetStream storage of the bench's streams.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsStorage {
    File,
    Memory,
}
/// How long to wait for the last changes of a rate to show up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const WARMUP_CHANGES: u64 = 200;
/// Retries of one publish after transient failures before the bench gives up.
const MAX_RETRIES: u32 = 10;

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
    /// Where the feed lives: the embedded hub over HTTP, or NATS JetStream
    /// (then a raw async-nats run at the same rates is the ceiling).
    #[arg(long, value_enum, default_value_t = FeedKind::Hub)]
    feed: FeedKind,
    /// The NATS server of `--feed jetstream`.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Storage of the JetStream streams (the target is stated for file storage).
    #[arg(long, value_enum, default_value_t = NatsStorage::File)]
    nats_storage: NatsStorage,
    /// Where the consumer's copy lives.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    store: StoreKind,
    /// The PostgreSQL of `--store postgres` (a fresh schema, dropped at the end).
    #[arg(long, default_value = pg::DEFAULT_POSTGRES)]
    postgres: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The `seq`-th published change is key `c{seq % keys}` at version `seq / keys + 1`.
pub fn key_version(seq: u64, keys: u64) -> (u64, u64) {
    (seq % keys, seq / keys + 1)
}

/// The inverse of [`key_version`]; `None` for keys the publisher did not make.
fn seq_of(key: &str, version: u64, keys: u64) -> Option<u64> {
    let k: u64 = key.strip_prefix('c')?.parse().ok()?;
    (k < keys && version >= 1).then(|| (version - 1) * keys + k)
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
    /// Publishes retried after a transient failure (the round trip includes them).
    publish_retries: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    feed: FeedKind,
    nats_storage: Option<NatsStorage>,
    store: StoreKind,
    keys: u64,
    agent_batch: usize,
    agent_wait_ms: u64,
    rates: Vec<RateResult>,
    /// The ceiling at the same rates (`--feed jetstream` only).
    raw: Vec<RawRateResult>,
    target_rate: u64,
    target_p99_ms: f64,
    /// `None` when the target rate was not run.
    target_met: Option<bool>,
}

/// The bench's names on the servers it uses, removed at the end.
struct Names {
    /// Stream prefix (upper case) and subject prefix (lower case).
    streams: String,
    subjects: String,
    /// Schema of the PostgreSQL copy.
    schema: String,
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
    let manifest = Arc::new(manifest()?);
    let options = AgentOptions::default();
    let (agent_batch, agent_wait_ms) = (options.batch, options.wait.as_millis() as u64);

    let rt = super::super::runtime()?;
    let unique = pg::unique("spokebench");
    let names = Names {
        streams: unique.to_uppercase(),
        subjects: unique,
        schema: pg::unique("spoke_bench"),
    };
    let (results, raw) = rt.block_on(async {
        let cleanup = async {
            if args.feed == FeedKind::Jetstream {
                spoke::testing::nats_delete_streams(&args.nats, &names.streams).await;
            }
            if args.store == StoreKind::Postgres {
                pg::exec(
                    &args.postgres,
                    &format!("DROP SCHEMA IF EXISTS {} CASCADE", pg::ident(&names.schema)),
                )
                .await?;
            }
            Ok(())
        };
        with_cleanup(
            measure(&args, &names, &scratch, &manifest, &totals, options),
            cleanup,
        )
        .await
    })?;
    drop(rt);

    let target_p99_ms = match args.feed {
        FeedKind::Hub => TARGET_P99_MS,
        FeedKind::Jetstream => JETSTREAM_TARGET_P99_MS,
    };
    let target_met = results
        .iter()
        .find(|r| r.target_rate == TARGET_RATE)
        .map(|r| r.visible == r.published && r.p99_ms <= target_p99_ms);
    let report = Report {
        bench: "e2e",
        machine,
        feed: args.feed,
        nats_storage: (args.feed == FeedKind::Jetstream).then_some(args.nats_storage),
        store: args.store,
        keys: args.keys,
        agent_batch,
        agent_wait_ms,
        rates: results,
        raw,
        target_rate: TARGET_RATE,
        target_p99_ms,
        target_met,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts the feed, the copy store, the agent and (JetStream) the raw
/// ceiling, then runs every rate.
async fn measure(
    args: &E2eArgs,
    names: &Names,
    scratch: &ScratchDir,
    manifest: &Arc<spoke_core::Manifest>,
    totals: &[u64],
    options: AgentOptions,
) -> anyhow::Result<(Vec<RateResult>, Vec<RawRateResult>)> {
    let grand_total: u64 = totals.iter().sum();
    let (trigger, shutdown) = shutdown_channel();
    let mut server = None;
    let (publisher, feed): (Arc<dyn Publisher>, Arc<dyn Feed>) = match args.feed {
        FeedKind::Hub => {
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
            let log = Arc::new(SqliteFeed::open(&scratch.path().join("hub.db"), manifest)?);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding the hub")?;
            let url = format!("http://{}", listener.local_addr()?);
            server = Some(tokio::spawn(hub::serve(
                listener,
                hub::router(log, manifest.clone(), tokens),
                shutdown.clone().signal(),
            )));
            (
                Arc::new(HubClient::new(&url, Some(owner_token))),
                Arc::new(HubClient::new(&url, Some(consumer_token))),
            )
        }
        FeedKind::Jetstream => {
            let mut o = JetStreamOptions::new(&args.nats);
            o.stream_prefix = names.streams.clone();
            o.subject_prefix = names.subjects.clone();
            o.memory_storage = args.nats_storage == NatsStorage::Memory;
            // Owner and consumer are separate clients, as separate processes would be.
            (
                Arc::new(JetStreamFeed::connect(o.clone(), manifest).await?),
                Arc::new(JetStreamFeed::connect(o, manifest).await?),
            )
        }
    };
    let store: Arc<dyn CopyStore> = match args.store {
        StoreKind::Sqlite => Arc::new(SqliteCopyStore::open(&scratch.path().join("copies.db"))?),
        StoreKind::Postgres => Arc::new(
            PostgresCopyStore::open(PostgresOptions {
                url: args.postgres.clone(),
                schema: names.schema.clone(),
                readers: vec![],
            })
            .await?,
        ),
    };

    // The agent, with an observer that timestamps each committed apply.
    let keys = args.keys;
    let vis = Arc::new(Visibility::new(
        grand_total,
        Box::new(move |c: &Change| seq_of(&c.key, c.version, keys)),
    ));
    let observer = {
        let vis = vis.clone();
        Arc::new(move |dataset: &str, changes: &[Change]| vis.observe(dataset, changes))
    };
    let agent = Agent::new(manifest.clone(), CONSUMER, feed, store)?
        .with_options(options)
        .with_observer(observer);
    let agent_task = tokio::spawn(Arc::new(agent).run(shutdown.clone()));

    let raw = match args.feed {
        FeedKind::Hub => None,
        FeedKind::Jetstream => Some(
            RawJetStream::start(
                &args.nats,
                &names.streams,
                &names.subjects,
                args.nats_storage == NatsStorage::Memory,
                grand_total,
            )
            .await?,
        ),
    };
    warm_up(publisher.as_ref(), &vis).await?;

    let bar = progress(grand_total * (1 + u64::from(raw.is_some())), "e2e");
    let mut results = Vec::new();
    let mut raw_results = Vec::new();
    let mut base = 0;
    for (i, (&rate, &total)) in args.rates.iter().zip(totals).enumerate() {
        let raw_first = i % 2 == 0;
        if let (Some(r), true) = (&raw, raw_first) {
            raw_results.push(r.run_rate(base, rate, total, args.keys, &bar).await?);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        results.push(run_rate(publisher.as_ref(), &vis, args.keys, base, rate, total, &bar).await?);
        if let (Some(r), false) = (&raw, raw_first) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            raw_results.push(r.run_rate(base, rate, total, args.keys, &bar).await?);
        }
        base += total;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    drop(raw);

    trigger.fire();
    let _ = tokio::time::timeout(Duration::from_secs(5), agent_task).await;
    if let Some(server) = server {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    Ok((results, raw_results))
}

/// Opens the connections and lets the agent finish its bootstrap.
async fn warm_up(publisher: &dyn Publisher, vis: &Visibility) -> anyhow::Result<()> {
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
    if !vis.wait_for_other(WARMUP_CHANGES, DRAIN_TIMEOUT).await {
        bail!("the agent did not apply the warm-up changes within {DRAIN_TIMEOUT:?}");
    }
    Ok(())
}

/// Publishes `total` changes at `rate`, numbered from `base`, and measures them.
async fn run_rate(
    publisher: &dyn Publisher,
    vis: &Visibility,
    keys: u64,
    base: u64,
    rate: u64,
    total: u64,
    bar: &ProgressBar,
) -> anyhow::Result<RateResult> {
    let mut rng = fastrand::Rng::with_seed(base);
    let mut started: Vec<Instant> = Vec::with_capacity(total as usize);
    let mut publishes = 0u64;
    let mut retries = 0u64;
    let mut round_trips: Vec<f64> = Vec::new();
    let applies_before = vis.applies();
    // At most what the outbox relay forwards in one publish.
    let relay_batch = RelayOptions::default().batch.min(MAX_BATCH) as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let n = due(start.elapsed().as_secs_f64(), rate, total)
            .saturating_sub(sent)
            .min(relay_batch);
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
        // Like a relay, retry what the feed calls transient; the retry then
        // finds part of the batch appended already and ignores that part.
        let mut attempts = 0;
        let receipt = loop {
            match publisher.publish(DATASET, inputs.clone()).await {
                Ok(r) => break r,
                Err(e) if e.is_transient() && attempts < MAX_RETRIES => {
                    attempts += 1;
                    tracing::warn!("publish failed ({e}); retry {attempts} of {MAX_RETRIES}");
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempts))).await;
                }
                Err(e) => return Err(e).context("publish"),
            }
        };
        retries += u64::from(attempts);
        if receipt.ignored > 0 && attempts == 0 {
            bail!(
                "the feed ignored {} changes as stale; the bench's versions must always be new",
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

    vis.wait_for(base + total, DRAIN_TIMEOUT).await;
    let agent_applies = vis.applies() - applies_before;
    let (visible, lat, from_due) = vis.latencies(base, &started, start, rate);
    let publish = Summary::of(&mut round_trips);
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
        p50_ms: lat.p50_ms,
        p99_ms: lat.p99_ms,
        max_ms: lat.max_ms,
        p99_from_due_ms: from_due.p99_ms,
        max_from_due_ms: from_due.max_ms,
        publish_p50_ms: publish.p50_ms,
        publish_p99_ms: publish.p99_ms,
        publish_retries: retries,
    })
}

fn print_table(r: &Report) {
    let feed = match r.feed {
        FeedKind::Hub => "hub (HTTP, SQLite synchronous=FULL)".to_owned(),
        FeedKind::Jetstream => format!(
            "JetStream ({} storage)",
            match r.nats_storage {
                Some(NatsStorage::Memory) => "memory",
                _ => "file",
            }
        ),
    };
    let store = match r.store {
        StoreKind::Sqlite => "SQLite",
        StoreKind::Postgres => "PostgreSQL",
    };
    println!(
        "spoke bench e2e: publish → {feed} → agent read (batch {}, wait {} ms) → {store} copy apply; {} keys",
        r.agent_batch,
        r.agent_wait_ms,
        thousands(r.keys as f64)
    );
    println!("machine: {}", r.machine.describe());
    let with_raw = !r.raw.is_empty();
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    let mut header = vec![
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
    ];
    if with_raw {
        header.insert(0, "path");
    }
    t.set_header(header);
    for x in &r.rates {
        let mut row = vec![
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
        ];
        if with_raw {
            row.insert(0, "spoke".to_owned());
        }
        t.add_row(row);
        if let Some(raw) = r.raw.iter().find(|y| y.target_rate == x.target_rate) {
            let [p50, p99, max] = raw.latency.cells();
            t.add_row([
                "raw async-nats (ceiling)".to_owned(),
                thousands(raw.target_rate as f64),
                thousands(raw.achieved_rate),
                thousands(raw.published as f64),
                thousands(raw.received as f64),
                format!("{:.1}", raw.changes_per_publish),
                "-".to_owned(),
                p50,
                p99,
                max,
                format!("{:.2}", raw.from_due.p99_ms),
                format!("{:.2} / {:.2}", raw.publish.p50_ms, raw.publish.p99_ms),
            ]);
        }
    }
    println!("{t}");
    for x in r.rates.iter().filter(|x| x.publish_retries > 0) {
        println!(
            "{}/s: {} publishes were retried after a transient failure (their round trip includes the retries)",
            thousands(x.target_rate as f64),
            x.publish_retries
        );
    }
    for x in &r.rates {
        if let Some(raw) = r.raw.iter().find(|y| y.target_rate == x.target_rate) {
            println!(
                "{}/s: spoke p50 {:.2} ms vs raw {:.2} ms (+{:.2} ms), p99 {:.2} ms vs raw {:.2} ms ({:.1}× the ceiling)",
                thousands(x.target_rate as f64),
                x.p50_ms,
                raw.latency.p50_ms,
                x.p50_ms - raw.latency.p50_ms,
                x.p99_ms,
                raw.latency.p99_ms,
                x.p99_ms / raw.latency.p99_ms
            );
        }
    }
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
