//! `spoke bench cdc`: the CDC source from PostgreSQL, measured two ways.
//!
//! ```text
//!  PostgreSQL (wal_level=logical: a private instance, or --postgres)
//!    table <u> (id, name, email, tier, note) ── publication <u>_pub
//!
//!  1. throughput, per round (not timed: write N rows in transactions of M; slot <u>_raw created before)
//!       timed, one after the other, the order rotating from round to round:
//!         pg_recvlogical --slot <u>_raw --start --endpos END -o proto_version=1 … -f /dev/null   (the ceiling)
//!         CdcSource (slot <u>_d) ─▶ publish every transaction ─▶ a discarding publisher  (the source alone)
//!         CdcSource (slot <u>)   ─▶ publish every transaction ─▶ the feed (--feed)      (source + feed)
//!       (consecutive transactions already received share a publish, up to 1,000 rows)
//!       a CdcSource run ends when the feed has accepted all N rows
//!
//!  2. latency at fixed commit rates
//!       owner INSERT … ON CONFLICT (1 ms ticks) ─▶ WAL ─▶ CdcSource ─▶ feed ─▶ agent ─▶ SQLite copy ─▶ observer
//! ```
//!
//! Both decoders start from a stopped state with the same WAL behind their
//! slot, use the same output plugin with the same options (`pgoutput`,
//! `proto_version 1`, `messages true`), and their wall clock includes
//! connecting and starting replication. pg_recvlogical writes the stream to
//! /dev/null; the CDC source parses every message, converts rows to changes
//! and publishes every transaction (those already received together, in
//! publishes of up to 1,000 rows): once into a publisher that validates the
//! batch as every feed does and keeps nothing (the closest match to
//! /dev/null), once into the feed (`--feed memory`: the in-process
//! `MemoryFeed`; `--feed sqlite`: the embedded hub's SQLite log with
//! `synchronous=FULL`, one fsync per publish).
//!
//! In the latency part the owner's commit carries the row's sequence number
//! in its `tier` column; the agent's observer reads it back, because the
//! change's version is the commit LSN, which the bench cannot know in advance.
//!
//! Names (table, slots, publication, state table) are unique per run and
//! dropped at the end; a private instance is stopped and its directory removed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use indicatif::ProgressBar;
use serde::Serialize;
use spoke::agent::{Agent, AgentOptions};
use spoke::cdc::{CdcConfig, CdcError, CdcSource, CdcStats, TableMapping};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::feed::memory::MemoryFeed;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{Catalog, ChangeInput, Feed, FeedError, PublishReceipt, Publisher};
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke::testing::PrivatePostgres;
use spoke_core::{Change, Manifest};
use tokio_postgres::Client;

use super::visibility::Visibility;
use super::{
    due, pg, progress, thousands, with_cleanup, Machine, ScratchDir, Summary, CONSUMER, DATASET,
    MANIFEST,
};

/// spoke/pg_recvlogical rows/s the source should reach.
pub const TARGET_RATIO: f64 = 0.8;
/// Owner commit → visible in the copy, p99, at every rate of the latency part.
pub const TARGET_P99_MS: f64 = 50.0;
const WAIT: Duration = Duration::from_secs(60);
const WARMUP_ROWS: u64 = 200;

/// The feed the CDC source publishes into.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CdcFeed {
    /// spoke::feed::memory::MemoryFeed, in process.
    Memory,
    /// spoke::feed::sqlite::SqliteFeed (WAL, synchronous=FULL), in process.
    Sqlite,
}

/// Which parts to run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    All,
    Throughput,
    Latency,
}

#[derive(clap::Args)]
pub struct CdcArgs {
    /// Rows the owner writes per throughput round.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Rows per owner transaction in the throughput rounds.
    #[arg(long, default_value_t = 100)]
    txn_rows: u64,
    /// Throughput rounds; each writes --rows and decodes them with all three
    /// decoders, in an order that rotates from round to round.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Owner commit rates of the latency part, rows/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<u64>,
    /// How long to commit at each rate.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Distinct keys the latency part's owner cycles through (inserts, then updates).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// The feed the CDC source publishes into.
    #[arg(long, value_enum, default_value_t = CdcFeed::Memory)]
    feed: CdcFeed,
    /// Most changes the CDC source groups into one publish (its `batch`
    /// option; default: the source's default).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: Option<u64>,
    /// A PostgreSQL with wal_level=logical to use (default: start a private
    /// instance with initdb in the scratch directory).
    #[arg(long)]
    postgres: Option<String>,
    /// The pg_recvlogical binary (default: next to the PostgreSQL server binaries).
    #[arg(long)]
    pg_recvlogical: Option<PathBuf>,
    /// Run only one part.
    #[arg(long, value_enum, default_value_t = Part::All)]
    only: Part,
    /// Directory for the scratch files (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// The bench's objects in the owner's database.
#[derive(Debug, Clone)]
struct Names {
    table: String,
    /// The source publishing into the feed (throughput and latency).
    slot: String,
    /// The source publishing into the discarding publisher (throughput).
    discard_slot: String,
    raw_slot: String,
    publication: String,
    state_table: String,
}

impl Names {
    fn new(base: &str) -> Self {
        Names {
            table: base.to_owned(),
            slot: base.to_owned(),
            discard_slot: format!("{base}_d"),
            raw_slot: format!("{base}_raw"),
            publication: format!("{base}_pub"),
            state_table: format!("public.{base}_state"),
        }
    }
}

/// A publisher that checks every batch as every feed does
/// ([`Catalog::prepare`]: keys, versions, schema) and keeps nothing: the
/// CDC source's counterpart of pg_recvlogical's `-f /dev/null`.
struct DiscardFeed {
    catalog: Catalog,
    appended: std::sync::atomic::AtomicU64,
}

impl DiscardFeed {
    fn new(manifest: &Manifest) -> Self {
        DiscardFeed {
            catalog: Catalog::new(manifest),
            appended: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Publisher for DiscardFeed {
    async fn publish(
        &self,
        dataset: &str,
        changes: Vec<ChangeInput>,
    ) -> Result<PublishReceipt, FeedError> {
        let changes = self
            .catalog
            .prepare(dataset, changes, spoke::clock::now_ms())?;
        let n = changes.len() as u64;
        let first = self
            .appended
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(PublishReceipt {
            positions: (first + 1..=first + n).map(Some).collect(),
            ignored: 0,
            head: first + n,
        })
    }
}

/// The three decoders of a throughput round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Decoder {
    PgRecvlogical,
    SpokeDiscard,
    SpokeFeed,
}

/// The order of the decoders in round `round` (rotating, so each goes
/// first, second and third equally often).
fn decoder_order(round: u32) -> [Decoder; 3] {
    let all = [
        Decoder::PgRecvlogical,
        Decoder::SpokeDiscard,
        Decoder::SpokeFeed,
    ];
    let r = round as usize % 3;
    [all[r], all[(r + 1) % 3], all[(r + 2) % 3]]
}

/// What `pg_recvlogical` needs to decode the bench's slot.
fn recvlogical_args(conninfo: &str, slot: &str, publication: &str, end: &str) -> Vec<String> {
    [
        "-d",
        conninfo,
        "--slot",
        slot,
        "--start",
        "--endpos",
        end,
        "-o",
        "proto_version=1",
        "-o",
        &format!("publication_names={publication}"),
        "-o",
        "messages=true",
        "--no-loop",
        "-F",
        "0",
        "-f",
        "/dev/null",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The manifest of the bench with the subscription following CDC.
fn cdc_manifest() -> anyhow::Result<Manifest> {
    let text = MANIFEST.replace("strategy = \"events\"", "strategy = \"cdc\"");
    Manifest::parse("<bench cdc manifest>", &text).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The sequence number a latency-run change carries in `tier`; `None` for
/// warm-up rows (keys not starting with `c`).
fn seq_of(c: &Change) -> Option<u64> {
    if !c.key.starts_with('c') {
        return None;
    }
    c.fields.get("tier")?.as_u64()
}

/// One decoder's run over a round's WAL.
#[derive(Debug, Serialize)]
struct Decode {
    decoder: Decoder,
    seconds: f64,
    rows_per_s: f64,
    /// CdcSource only: from starting the source to its first accepted publish
    /// (connect, checks, replication start) …
    first_publish_ms: Option<f64>,
    /// … and the rate after it.
    rows_per_s_after_first: Option<f64>,
    /// CdcSource only: changes the feed accepted / ignored (replays).
    published: u64,
    ignored: u64,
    /// CdcSource only: publishes it took (consecutive transactions share one).
    publishes: u64,
    /// CdcSource into a SqliteFeed only: from the last accepted publish
    /// until the feed's compacted state was folded through it (not part of
    /// `seconds`; snapshots and reconciliation wait for it).
    state_folded_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Round {
    round: u32,
    rows: u64,
    txn_rows: u64,
    /// How fast the owner wrote the rows (not part of any measurement).
    owner_rows_per_s: f64,
    /// WAL between the slot's start and the end of the writes, bytes.
    wal_bytes: u64,
    /// How far the CDC slots' restart_lsn still lagged the round's start
    /// (the most of both, after fast-forwarding them): WAL the CDC source
    /// decodes and pg_recvlogical does not.
    restart_lag_bytes: u64,
    /// In the order they ran.
    decodes: Vec<Decode>,
    /// spoke (into the feed) / pg_recvlogical rows/s.
    ratio: f64,
    /// spoke (discarding) / pg_recvlogical rows/s.
    ratio_discard: f64,
}

impl Round {
    fn decode(&self, d: Decoder) -> Option<&Decode> {
        self.decodes.iter().find(|x| x.decoder == d)
    }
    fn seconds(&self, d: Decoder) -> f64 {
        self.decode(d).map_or(f64::NAN, |x| x.seconds)
    }
}

#[derive(Debug, Serialize)]
struct LatencyRate {
    target_rate: u64,
    achieved_rate: f64,
    rows: u64,
    visible: u64,
    transactions: u64,
    rows_per_txn: f64,
    agent_applies: u64,
    rows_per_apply: f64,
    latency: Summary,
    from_due: Summary,
    /// Round trip of the owner's INSERT (an implicit transaction, committed).
    commit: Summary,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    postgres: String,
    feed: CdcFeed,
    rounds: Vec<Round>,
    /// Σ rows / Σ seconds over the rounds, spoke (into the feed) over raw.
    ratio: Option<f64>,
    /// The same for the source publishing into the discarding publisher.
    ratio_discard: Option<f64>,
    target_ratio: f64,
    throughput_target_met: Option<bool>,
    agent_batch: usize,
    agent_wait_ms: u64,
    latency: Vec<LatencyRate>,
    target_p99_ms: f64,
    latency_target_met: Option<bool>,
}

/// What the run needs from its surroundings.
struct Ctx<'a> {
    args: &'a CdcArgs,
    conninfo: String,
    names: Names,
    manifest: Arc<Manifest>,
    recvlogical: PathBuf,
    scratch: &'a ScratchDir,
}

pub fn run(args: CdcArgs) -> anyhow::Result<ExitCode> {
    if args.rows == 0 || args.txn_rows == 0 || args.rounds == 0 {
        bail!("--rows, --txn-rows and --rounds must be at least 1");
    }
    if args.rates.is_empty() || args.rates.contains(&0) {
        bail!("--rates must be a comma-separated list of positive rows/s, e.g. 1000,5000");
    }
    if !(args.seconds > 0.0 && args.seconds <= 3600.0) {
        bail!("--seconds must be between 0 and 3600");
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    let scratch = ScratchDir::new(args.dir.as_deref())?;
    let machine = Machine::probe(scratch.path());
    let recvlogical = match &args.pg_recvlogical {
        Some(p) => p.clone(),
        None => spoke::testing::postgres_bin_dir()
            .map(|d| d.join("pg_recvlogical"))
            .context("PostgreSQL binaries not found under /usr/lib/postgresql; give --pg-recvlogical (and --postgres)")?,
    };
    if args.only != Part::Latency && !recvlogical.is_file() {
        bail!(
            "{} does not exist; give --pg-recvlogical",
            recvlogical.display()
        );
    }
    // Dropped after everything that uses it (declared after `scratch`, so
    // stopped before the directory is removed).
    let private;
    let (conninfo, described) = match &args.postgres {
        Some(c) => (c.clone(), c.clone()),
        None => {
            eprintln!("spoke bench cdc: starting a private PostgreSQL (wal_level=logical) …");
            private = PrivatePostgres::start(&scratch.path().join("pg"))
                .context("PostgreSQL server binaries not found; give --postgres CONNINFO of a server with wal_level=logical")?;
            let url = private.url();
            (
                url.clone(),
                format!("private instance ({url}; initdb, fsync=off, wal_level=logical)"),
            )
        }
    };
    let ctx = Ctx {
        args: &args,
        conninfo,
        names: Names::new(&pg::unique("spoke_bench_cdc")),
        manifest: Arc::new(cdc_manifest()?),
        recvlogical,
        scratch: &scratch,
    };
    let agent_options = AgentOptions::default();
    let (agent_batch, agent_wait_ms) = (agent_options.batch, agent_options.wait.as_millis() as u64);

    let rt = super::super::runtime()?;
    let (rounds, latency) =
        rt.block_on(async { with_cleanup(measure(&ctx, agent_options), cleanup(&ctx)).await })?;
    drop(rt);

    let overall = |d: Decoder| {
        (!rounds.is_empty()).then(|| {
            let raw: f64 = rounds
                .iter()
                .map(|r| r.seconds(Decoder::PgRecvlogical))
                .sum();
            let spoke: f64 = rounds.iter().map(|r| r.seconds(d)).sum();
            raw / spoke
        })
    };
    let ratio = overall(Decoder::SpokeFeed);
    let ratio_discard = overall(Decoder::SpokeDiscard);
    let latency_target_met = (!latency.is_empty()).then(|| {
        latency
            .iter()
            .all(|l| l.visible == l.rows && l.latency.p99_ms <= TARGET_P99_MS)
    });
    let report = Report {
        bench: "cdc",
        machine,
        postgres: described,
        feed: args.feed,
        throughput_target_met: ratio.map(|r| r >= TARGET_RATIO),
        ratio,
        ratio_discard,
        target_ratio: TARGET_RATIO,
        rounds,
        agent_batch,
        agent_wait_ms,
        latency,
        target_p99_ms: TARGET_P99_MS,
        latency_target_met,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_tables(&report, &args);
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure(
    ctx: &Ctx<'_>,
    agent_options: AgentOptions,
) -> anyhow::Result<(Vec<Round>, Vec<LatencyRate>)> {
    let owner = pg::connect(&ctx.conninfo).await?;
    let level: String = owner.query_one("SHOW wal_level", &[]).await?.get(0);
    if level != "logical" {
        bail!("the PostgreSQL at '{}' runs with wal_level={level}; CDC needs wal_level=logical (leave out --postgres to start a private instance)", ctx.conninfo);
    }
    owner
        .batch_execute(&format!(
            "CREATE TABLE public.{} (id text PRIMARY KEY, name text NOT NULL, email text NOT NULL, tier bigint NOT NULL, note text)",
            pg::ident(&ctx.names.table)
        ))
        .await
        .context("creating the owner table")?;
    let rounds = if ctx.args.only == Part::Latency {
        Vec::new()
    } else {
        throughput(ctx, &owner).await?
    };
    let latency = if ctx.args.only == Part::Throughput {
        Vec::new()
    } else {
        latency(ctx, &owner, agent_options).await?
    };
    Ok((rounds, latency))
}

/// Drops what the bench created in the owner's database.
async fn cleanup(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let n = &ctx.names;
    let client = pg::connect(&ctx.conninfo).await?;
    for slot in [&n.slot, &n.discard_slot, &n.raw_slot] {
        // A slot still in use (a source that did not stop) is released when
        // its session ends; try for a few seconds.
        for _ in 0..50 {
            let r = client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                    &[slot],
                )
                .await;
            match r {
                Ok(_) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {pubname}; DROP TABLE IF EXISTS public.{table}; DROP TABLE IF EXISTS {state}",
            pubname = pg::ident(&n.publication),
            table = pg::ident(&n.table),
            state = n.state_table,
        ))
        .await
        .map_err(|e| anyhow::anyhow!("dropping the bench's table and publication: {}", pg::db_message(&e)))?;
    Ok(())
}

/// The in-process feed, as the publisher (CDC side) and the reader (agent
/// side), and as itself when it is a SqliteFeed (to wait for its fold).
type Opened = (Arc<dyn Publisher>, Arc<dyn Feed>, Option<Arc<SqliteFeed>>);

fn open_feed(ctx: &Ctx<'_>, name: &str) -> anyhow::Result<Opened> {
    Ok(match ctx.args.feed {
        CdcFeed::Memory => {
            let f = Arc::new(MemoryFeed::new(&ctx.manifest));
            (f.clone(), f, None)
        }
        CdcFeed::Sqlite => {
            let f = Arc::new(SqliteFeed::open(
                &ctx.scratch.path().join(format!("{name}.db")),
                &ctx.manifest,
            )?);
            (f.clone(), f.clone(), Some(f))
        }
    })
}

/// A running CDC source.
struct Source {
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<(), CdcError>>,
    stats: Arc<CdcStats>,
}

impl Drop for Source {
    /// An interrupted run: the source must let go of its slot so that the
    /// cleanup can drop it.
    fn drop(&mut self) {
        self.trigger.fire();
        self.task.abort();
    }
}

impl Source {
    fn start(ctx: &Ctx<'_>, slot: &str, publisher: Arc<dyn Publisher>) -> anyhow::Result<Source> {
        let n = &ctx.names;
        let mapping = TableMapping::new(DATASET, &format!("public.{}", n.table), "id", None)?;
        let mut cfg = CdcConfig::new(&ctx.conninfo, &n.publication, slot, vec![mapping]);
        cfg.state_table = n.state_table.clone();
        if let Some(b) = ctx.args.batch {
            cfg.options.batch = Some(b as usize);
        }
        let source = CdcSource::new(cfg, ctx.manifest.clone(), publisher)?;
        let stats = source.stats();
        let (trigger, shutdown) = shutdown_channel();
        Ok(Source {
            trigger,
            task: tokio::spawn(source.run(shutdown)),
            stats,
        })
    }

    fn published(&self) -> u64 {
        CdcStats::get(&self.stats.published)
    }

    fn ignored(&self) -> u64 {
        CdcStats::get(&self.stats.ignored)
    }

    /// Fails when the source stopped on its own (with its error).
    async fn check_running(&mut self) -> anyhow::Result<()> {
        if self.task.is_finished() {
            let r = (&mut self.task).await;
            bail!("the CDC source stopped: {:?}", r);
        }
        Ok(())
    }

    /// Waits until the feed accepted or ignored `n` changes; moves `bar`
    /// (by the changes seen, from `offset`) meanwhile.
    async fn wait_for(&mut self, n: u64, bar: Option<(&ProgressBar, u64)>) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        while self.published() + self.ignored() < n {
            self.check_running().await?;
            if Instant::now() > deadline {
                bail!(
                    "the CDC source published {} of {n} changes within {WAIT:?}",
                    self.published() + self.ignored()
                );
            }
            if let Some((b, offset)) = bar {
                b.set_position(offset + self.published() + self.ignored());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Waits until the slot confirms the last published commit, then stops.
    async fn stop(mut self, admin: &Client, slot: &str) -> anyhow::Result<()> {
        let last = CdcStats::get(&self.stats.last_commit_lsn);
        let deadline = Instant::now() + WAIT;
        loop {
            self.check_running().await?;
            let confirmed: Option<String> = admin
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?
                .get(0);
            if confirmed
                .as_deref()
                .and_then(spoke::cdc::parse_lsn)
                .is_some_and(|c| c >= last)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "slot {slot} did not confirm {} within {WAIT:?}",
                    spoke::cdc::fmt_lsn(last)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.trigger.fire();
        match tokio::time::timeout(WAIT, &mut self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(e)) => Err(anyhow::anyhow!("the CDC source panicked: {e}")),
            Err(_) => bail!("the CDC source did not stop within {WAIT:?}"),
        }
    }
}

async fn flush_lsn(client: &Client) -> anyhow::Result<String> {
    Ok(client
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?
        .get(0))
}

/// The throughput rounds.
async fn throughput(ctx: &Ctx<'_>, owner: &Client) -> anyhow::Result<Vec<Round>> {
    let args = ctx.args;
    let n = &ctx.names;
    let (mut publisher, _, _) = open_feed(ctx, "throughput-setup")?;
    let discard: Arc<dyn Publisher> = Arc::new(DiscardFeed::new(&ctx.manifest));

    // Set up publication, slots and state, snapshot the table (one row) and
    // stream, so that every round starts from sources at rest.
    owner
        .execute(
            &format!(
                "INSERT INTO public.{} VALUES ('warm', 'warm', 'warm@example.com', 0, NULL)",
                pg::ident(&n.table)
            ),
            &[],
        )
        .await?;
    for (slot, p) in [(&n.discard_slot, &discard), (&n.slot, &publisher)] {
        let mut source = Source::start(ctx, slot, p.clone())?;
        source
            .wait_for(1, None)
            .await
            .context("starting the CDC source")?;
        source.stop(owner, slot).await?;
    }

    let insert = owner
        .prepare(&format!(
            "INSERT INTO public.{} (id, name, email, tier, note)
             SELECT $1 || g, 'Customer ' || g || ' v1', 'c' || g || '.v1@example.com', g % 5, 'not copied'
             FROM generate_series($2::int8, $3::int8) g",
            pg::ident(&n.table)
        ))
        .await?;
    let bar = progress(
        u64::from(args.rounds) * args.rows * 3,
        "cdc throughput (write + 2 CDC decodes)",
    );
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        // Not timed. A fresh feed per round, so that every round appends to
        // a feed of the same size (the MemoryFeed keeps every entry in memory).
        let (fresh, _, sqlite) = open_feed(ctx, &format!("throughput-{round}"))?;
        publisher = fresh;
        // The CDC slots are at rest after the last round, but their
        // restart_lsn may still lie before it (it moves only at
        // running-transactions records, logged every 15 s or at
        // checkpoints), and a restarting walsender decodes from there. A
        // fresh pg_recvlogical slot would not pay for that, so log such a
        // record and fast-forward the CDC slots over it: every decoder then
        // starts at this round's WAL.
        let skipped_before = advance_slots(owner, &[&n.discard_slot, &n.slot]).await?;
        // A slot for pg_recvlogical, then the owner's writes.
        let start_lsn: String = owner
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&n.raw_slot],
            )
            .await
            .context("creating the pg_recvlogical slot")?
            .get(0);
        let prefix = format!("r{round}_");
        let t = Instant::now();
        let mut written = 0u64;
        while written < args.rows {
            let m = args.txn_rows.min(args.rows - written);
            let (a, b) = (written as i64, (written + m - 1) as i64);
            owner.execute(&insert, &[&prefix, &a, &b]).await?;
            written += m;
            bar.inc(m);
        }
        let owner_rows_per_s = args.rows as f64 / t.elapsed().as_secs_f64().max(1e-9);
        let end = flush_lsn(owner).await?;
        let wal_bytes: f64 = owner
            .query_one(
                "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8",
                &[&end, &start_lsn],
            )
            .await?
            .get(0);

        let mut decodes = Vec::new();
        for d in decoder_order(round) {
            decodes.push(match d {
                Decoder::PgRecvlogical => {
                    let t = recvlogical(ctx, owner, &end).await?;
                    Decode {
                        decoder: d,
                        seconds: t.as_secs_f64(),
                        rows_per_s: args.rows as f64 / t.as_secs_f64().max(1e-9),
                        first_publish_ms: None,
                        rows_per_s_after_first: None,
                        published: 0,
                        ignored: 0,
                        publishes: 0,
                        state_folded_ms: None,
                    }
                }
                Decoder::SpokeDiscard => {
                    cdc_decode(ctx, owner, d, &n.discard_slot, &discard, None, &bar).await?
                }
                Decoder::SpokeFeed => {
                    cdc_decode(ctx, owner, d, &n.slot, &publisher, sqlite.as_deref(), &bar).await?
                }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        owner
            .execute("SELECT pg_drop_replication_slot($1)", &[&n.raw_slot])
            .await?;
        let rate = |d: Decoder| {
            decodes
                .iter()
                .find(|x| x.decoder == d)
                .map_or(f64::NAN, |x| x.rows_per_s)
        };
        rounds.push(Round {
            round: round + 1,
            restart_lag_bytes: skipped_before,
            rows: args.rows,
            txn_rows: args.txn_rows,
            owner_rows_per_s,
            wal_bytes: wal_bytes.max(0.0) as u64,
            ratio: rate(Decoder::SpokeFeed) / rate(Decoder::PgRecvlogical),
            ratio_discard: rate(Decoder::SpokeDiscard) / rate(Decoder::PgRecvlogical),
            decodes,
        });
    }
    bar.finish_and_clear();
    Ok(rounds)
}

/// Logs a running-transactions record (CHECKPOINT) and fast-forwards
/// `slots` (inactive) to the current WAL position, so their restart_lsn
/// moves up to here; returns how far the furthest-behind restart_lsn still
/// lags the current position, in bytes.
async fn advance_slots(owner: &Client, slots: &[&str]) -> anyhow::Result<u64> {
    owner.batch_execute("CHECKPOINT").await?;
    for slot in slots {
        owner
            .execute(
                "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
                &[slot],
            )
            .await
            .with_context(|| format!("fast-forwarding slot {slot}"))?;
    }
    let slots: Vec<String> = slots.iter().map(|s| (*s).to_owned()).collect();
    let lag: Option<f64> = owner
        .query_one(
            "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn))::float8 FROM pg_replication_slots WHERE slot_name = ANY($1)",
            &[&slots],
        )
        .await?
        .get(0);
    Ok(lag.unwrap_or(0.0).max(0.0) as u64)
}

/// Starts a CDC source on `slot` (at rest, with the round's rows behind it)
/// and times it until `publisher` accepted all of them; then waits for the
/// slot to confirm (not timed) and stops it.
async fn cdc_decode(
    ctx: &Ctx<'_>,
    owner: &Client,
    decoder: Decoder,
    slot: &str,
    publisher: &Arc<dyn Publisher>,
    folds: Option<&SqliteFeed>,
    bar: &ProgressBar,
) -> anyhow::Result<Decode> {
    let rows = ctx.args.rows;
    let t = Instant::now();
    let mut source = Source::start(ctx, slot, publisher.clone())?;
    let first = loop {
        source.check_running().await?;
        if source.published() + source.ignored() > 0 {
            break t.elapsed();
        }
        if t.elapsed() > WAIT {
            bail!("the CDC source published nothing within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    source.wait_for(rows, Some((bar, bar.position()))).await?;
    let elapsed = t.elapsed();
    let state_folded_ms = match folds {
        Some(f) => {
            let t = Instant::now();
            f.wait_folded(DATASET).await?;
            Some(t.elapsed().as_secs_f64() * 1e3)
        }
        None => None,
    };
    let (published, ignored) = (source.published(), source.ignored());
    let publishes = CdcStats::get(&source.stats.publishes);
    source.stop(owner, slot).await?;
    let after_first = elapsed.saturating_sub(first).as_secs_f64();
    Ok(Decode {
        decoder,
        seconds: elapsed.as_secs_f64(),
        rows_per_s: rows as f64 / elapsed.as_secs_f64().max(1e-9),
        first_publish_ms: Some(first.as_secs_f64() * 1e3),
        rows_per_s_after_first: Some(rows as f64 / after_first.max(1e-9)),
        published,
        ignored,
        publishes,
        state_folded_ms,
    })
}

/// Decodes the raw slot up to `end` with pg_recvlogical; returns its wall time.
async fn recvlogical(ctx: &Ctx<'_>, admin: &Client, end: &str) -> anyhow::Result<Duration> {
    let n = &ctx.names;
    let args = recvlogical_args(&ctx.conninfo, &n.raw_slot, &n.publication, end);
    let mut cmd = tokio::process::Command::new(&ctx.recvlogical);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let t = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", ctx.recvlogical.display()))?;
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .with_context(|| format!("pg_recvlogical did not reach {end} within {WAIT:?}"))??;
    let elapsed = t.elapsed();
    if !out.status.success() {
        bail!(
            "pg_recvlogical failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // It must have read the whole range: its slot confirms the end.
    let confirmed: Option<String> = admin
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&n.raw_slot],
        )
        .await?
        .get(0);
    let (c, e) = (
        confirmed.as_deref().and_then(spoke::cdc::parse_lsn),
        spoke::cdc::parse_lsn(end),
    );
    if c.is_none() || c < e {
        bail!(
            "pg_recvlogical exited but slot {} confirms only {:?}, not {end}",
            n.raw_slot,
            confirmed
        );
    }
    Ok(elapsed)
}

/// Owner commit → visible in the copy, at each rate.
async fn latency(
    ctx: &Ctx<'_>,
    owner: &Client,
    agent_options: AgentOptions,
) -> anyhow::Result<Vec<LatencyRate>> {
    let args = ctx.args;
    let n = &ctx.names;
    let totals: Vec<u64> = args
        .rates
        .iter()
        .map(|r| (*r as f64 * args.seconds).round().max(1.0) as u64)
        .collect();
    let grand_total: u64 = totals.iter().sum();
    let (publisher, reader, _) = open_feed(ctx, "latency")?;
    let mut source = Source::start(ctx, &n.slot, publisher)?;

    let vis = Arc::new(Visibility::new(grand_total, Box::new(seq_of)));
    let observer = {
        let vis = vis.clone();
        Arc::new(move |dataset: &str, changes: &[Change]| vis.observe(dataset, changes))
    };
    let store = Arc::new(SqliteCopyStore::open(
        &ctx.scratch.path().join("copies.db"),
    )?);
    let agent = Agent::new(ctx.manifest.clone(), CONSUMER, reader, store)?
        .with_options(agent_options)
        .with_observer(observer);
    let (trigger, shutdown) = shutdown_channel();
    let agent_task = tokio::spawn(Arc::new(agent).run(shutdown));

    let upsert = owner
        .prepare(&format!(
            "INSERT INTO public.{} AS t (id, name, email, tier, note)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[])
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email, tier = excluded.tier, note = excluded.note",
            pg::ident(&n.table)
        ))
        .await?;

    // Warm-up: the source streams, the agent bootstraps and applies.
    for chunk in 0..WARMUP_ROWS / 10 {
        let ids: Vec<String> = (0..10).map(|i| format!("w{}", chunk * 10 + i)).collect();
        let names: Vec<String> = ids.iter().map(|i| format!("Warm {i}")).collect();
        let emails: Vec<String> = ids.iter().map(|i| format!("{i}@example.com")).collect();
        let tiers: Vec<i64> = vec![0; ids.len()];
        let notes: Vec<Option<String>> = vec![None; ids.len()];
        owner
            .execute(&upsert, &[&ids, &names, &emails, &tiers, &notes])
            .await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if !vis.wait_for_other(WARMUP_ROWS, WAIT).await {
        source.check_running().await?;
        bail!("the warm-up rows did not reach the copy within {WAIT:?}");
    }

    let bar = progress(grand_total, "cdc latency");
    let mut results = Vec::new();
    let mut base = 0;
    for (&rate, &total) in args.rates.iter().zip(&totals) {
        results.push(commit_rate(owner, &upsert, &vis, args.keys, base, rate, total, &bar).await?);
        source.check_running().await?;
        base += total;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    trigger.fire();
    let _ = tokio::time::timeout(Duration::from_secs(5), agent_task).await;
    source.stop(owner, &n.slot).await?;
    Ok(results)
}

/// Commits `total` rows at `rate`, numbered from `base`, and measures them.
#[allow(clippy::too_many_arguments)]
async fn commit_rate(
    owner: &Client,
    upsert: &tokio_postgres::Statement,
    vis: &Visibility,
    keys: u64,
    base: u64,
    rate: u64,
    total: u64,
    bar: &ProgressBar,
) -> anyhow::Result<LatencyRate> {
    let mut rng = fastrand::Rng::with_seed(base);
    let mut started: Vec<Instant> = Vec::with_capacity(total as usize);
    let mut transactions = 0u64;
    let mut round_trips = Vec::new();
    let applies_before = vis.applies();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        // At most one change per key per statement (ON CONFLICT may touch a row once).
        let n = due(start.elapsed().as_secs_f64(), rate, total)
            .saturating_sub(sent)
            .min(keys);
        if n == 0 {
            continue;
        }
        let seqs = base + sent..base + sent + n;
        let ids: Vec<String> = seqs.clone().map(|s| format!("c{}", s % keys)).collect();
        let names: Vec<String> = seqs
            .clone()
            .map(|s| format!("Customer {} s{s}", s % keys))
            .collect();
        let emails: Vec<String> = seqs
            .clone()
            .map(|s| format!("c{}.s{s}@example.com", s % keys))
            .collect();
        let tiers: Vec<i64> = seqs.map(|s| s as i64).collect();
        let notes: Vec<Option<String>> = (0..n)
            .map(|_| rng.bool().then(|| "not copied".to_owned()))
            .collect();
        let t0 = Instant::now();
        owner
            .execute(upsert, &[&ids, &names, &emails, &tiers, &notes])
            .await
            .context("owner commit")?;
        round_trips.push(t0.elapsed().as_secs_f64() * 1e3);
        started.extend(std::iter::repeat_n(t0, n as usize));
        sent += n;
        transactions += 1;
        bar.inc(n);
    }
    let commit_time = start.elapsed();
    vis.wait_for(base + total, WAIT).await;
    let agent_applies = vis.applies() - applies_before;
    let (visible, latency, from_due) = vis.latencies(base, &started, start, rate);
    Ok(LatencyRate {
        target_rate: rate,
        achieved_rate: total as f64 / commit_time.as_secs_f64().max(1e-9),
        rows: total,
        visible,
        transactions,
        rows_per_txn: total as f64 / transactions.max(1) as f64,
        agent_applies,
        rows_per_apply: visible as f64 / agent_applies.max(1) as f64,
        latency,
        from_due,
        commit: Summary::of(&mut round_trips),
    })
}

fn feed_name(f: CdcFeed) -> &'static str {
    match f {
        CdcFeed::Memory => "MemoryFeed",
        CdcFeed::Sqlite => "SqliteFeed",
    }
}

fn print_tables(r: &Report, args: &CdcArgs) {
    let feed = match r.feed {
        CdcFeed::Memory => "an in-process MemoryFeed",
        CdcFeed::Sqlite => "an in-process SqliteFeed (synchronous=FULL)",
    };
    println!(
        "spoke bench cdc: PostgreSQL {} → pgoutput → CdcSource → {feed}",
        r.postgres
    );
    println!("machine: {}", r.machine.describe());
    if !r.rounds.is_empty() {
        println!(
            "throughput: {} rows per round in transactions of {}, each round decoded from slots at rest by pg_recvlogical and twice by the CDC source",
            thousands(args.rows as f64),
            args.txn_rows
        );
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY);
        t.set_header([
            "round",
            "decoder (in run order)",
            "seconds",
            "rows/s",
            "first publish ms",
            "rows/s after it",
            "rows per publish",
            "state folded +ms",
            "vs pg_recvlogical",
        ]);
        for x in &r.rounds {
            let raw = x
                .decode(Decoder::PgRecvlogical)
                .map_or(f64::NAN, |d| d.rows_per_s);
            for (i, d) in x.decodes.iter().enumerate() {
                t.add_row([
                    if i == 0 {
                        format!(
                            "{} ({:.1} MB WAL, +{:.1} kB behind the CDC slots; owner wrote {} rows/s)",
                            x.round,
                            x.wal_bytes as f64 / 1e6,
                            x.restart_lag_bytes as f64 / 1e3,
                            thousands(x.owner_rows_per_s)
                        )
                    } else {
                        String::new()
                    },
                    match d.decoder {
                        Decoder::PgRecvlogical => "pg_recvlogical → /dev/null (ceiling)".to_owned(),
                        Decoder::SpokeDiscard => "CdcSource → discard".to_owned(),
                        Decoder::SpokeFeed => format!("CdcSource → {}", feed_name(r.feed)),
                    },
                    format!("{:.3}", d.seconds),
                    thousands(d.rows_per_s),
                    d.first_publish_ms
                        .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}")),
                    d.rows_per_s_after_first
                        .map_or_else(|| "-".to_owned(), thousands),
                    if d.publishes == 0 {
                        "-".to_owned()
                    } else {
                        format!("{:.0}", (d.published + d.ignored) as f64 / d.publishes as f64)
                    },
                    d.state_folded_ms
                        .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
                    format!("{:.2}", d.rows_per_s / raw),
                ]);
            }
        }
        println!("{t}");
        if let (Some(ratio), Some(met), Some(discard)) =
            (r.ratio, r.throughput_target_met, r.ratio_discard)
        {
            let replays: u64 = r
                .rounds
                .iter()
                .flat_map(|x| &x.decodes)
                .map(|d| d.ignored)
                .sum();
            println!(
                "ratio over all rounds, CdcSource → {} / pg_recvlogical: {ratio:.2} (target ≥ {:.2}: {}); CdcSource → discard / pg_recvlogical: {discard:.2}; replayed changes: {replays}",
                feed_name(r.feed),
                r.target_ratio,
                if met { "met" } else { "MISSED" }
            );
        }
    }
    if !r.latency.is_empty() {
        println!(
            "latency: owner INSERT … ON CONFLICT committed every 1 ms tick → CDC → feed → agent (batch {}, wait {} ms) → SQLite copy; {} keys",
            r.agent_batch,
            r.agent_wait_ms,
            thousands(args.keys as f64)
        );
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY);
        t.set_header([
            "rate/s",
            "achieved/s",
            "rows",
            "visible",
            "per txn",
            "per apply",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p99 from due ms",
            "commit p50/p99 ms",
        ]);
        for x in &r.latency {
            let [p50, p99, max] = x.latency.cells();
            t.add_row([
                thousands(x.target_rate as f64),
                thousands(x.achieved_rate),
                thousands(x.rows as f64),
                thousands(x.visible as f64),
                format!("{:.1}", x.rows_per_txn),
                format!("{:.1}", x.rows_per_apply),
                p50,
                p99,
                max,
                format!("{:.2}", x.from_due.p99_ms),
                format!("{:.2} / {:.2}", x.commit.p50_ms, x.commit.p99_ms),
            ]);
        }
        println!("{t}");
        if let Some(met) = r.latency_target_met {
            println!(
                "target: p99 ≤ {} ms at every rate, every row visible: {}",
                r.target_p99_ms,
                if met { "met" } else { "MISSED" }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_cdc_names() {
        let n = Names::new(&pg::unique("spoke_bench_cdc"));
        let mapping =
            TableMapping::new(DATASET, &format!("public.{}", n.table), "id", None).unwrap();
        let mut cfg = CdcConfig::new("host=x", &n.publication, &n.slot, vec![mapping]);
        cfg.state_table = n.state_table.clone();
        cfg.validate().unwrap();
        for slot in [&n.discard_slot, &n.raw_slot] {
            assert_ne!(&n.slot, slot);
            assert!(slot.len() <= 63, "{slot}");
        }
    }

    #[test]
    fn every_decoder_runs_once_per_round_and_each_goes_first_in_turn() {
        let firsts: Vec<Decoder> = (0..3).map(|r| decoder_order(r)[0]).collect();
        assert_eq!(
            firsts,
            [
                Decoder::PgRecvlogical,
                Decoder::SpokeDiscard,
                Decoder::SpokeFeed
            ]
        );
        for r in 0..6 {
            let mut o = decoder_order(r).to_vec();
            o.sort_by_key(|d| *d as u8);
            assert_eq!(
                o,
                [
                    Decoder::PgRecvlogical,
                    Decoder::SpokeDiscard,
                    Decoder::SpokeFeed
                ]
            );
        }
        assert_eq!(decoder_order(4), decoder_order(1));
    }

    #[tokio::test]
    async fn the_discarding_publisher_validates_like_a_feed() {
        let m = cdc_manifest().unwrap();
        let d = DiscardFeed::new(&m);
        let fields = |tier: serde_json::Value| {
            serde_json::json!({"name": "n", "email": "e", "tier": tier})
                .as_object()
                .cloned()
                .unwrap()
        };
        let r = d
            .publish(
                DATASET,
                vec![
                    ChangeInput::upsert("a", 1, fields(1.into())),
                    ChangeInput::delete("b", 2),
                ],
            )
            .await
            .unwrap();
        assert_eq!((r.positions, r.head), (vec![Some(1), Some(2)], 2));
        let e = d
            .publish(
                DATASET,
                vec![ChangeInput::upsert("a", 2, fields("x".into()))],
            )
            .await
            .unwrap_err();
        assert!(matches!(e, FeedError::Invalid { .. }), "{e:?}");
        assert!(d.publish("nope", vec![]).await.is_err());
    }

    #[test]
    fn the_cdc_manifest_follows_cdc() {
        let m = cdc_manifest().unwrap();
        let sub = m.subscriptions_of(CONSUMER).next().unwrap();
        assert_eq!(sub.strategy, spoke_core::manifest::Strategy::Cdc);
        assert_eq!(sub.fields, ["name", "email", "tier"]);
    }

    #[test]
    fn latency_rows_carry_their_sequence_number_in_tier() {
        let mut c = Change {
            dataset: DATASET.into(),
            key: "c17".into(),
            version: 123_456_789,
            op: spoke_core::Op::Upsert,
            fields: serde_json::json!({"name": "n", "email": "e", "tier": 40_017})
                .as_object()
                .cloned()
                .unwrap(),
            owner: "o".into(),
            ts: 0,
            schema_version: 1,
        };
        assert_eq!(seq_of(&c), Some(40_017));
        c.key = "w3".into();
        assert_eq!(seq_of(&c), None, "warm-up rows are not numbered");
        c.key = "c1".into();
        c.fields.remove("tier");
        assert_eq!(seq_of(&c), None);
    }

    #[test]
    fn pg_recvlogical_decodes_like_the_source() {
        let a = recvlogical_args("host=h port=1", "s_raw", "p", "0/1A2B");
        let joined = a.join(" ");
        assert!(joined.starts_with("-d host=h port=1 --slot s_raw --start --endpos 0/1A2B"));
        // The options pgwire-replication sends with START_REPLICATION.
        for o in ["proto_version=1", "publication_names=p", "messages=true"] {
            assert!(a.iter().any(|x| x == o), "{o} in {joined}");
        }
        assert_eq!(a.last().map(String::as_str), Some("/dev/null"));
    }
}
