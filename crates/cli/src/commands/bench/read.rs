//! `spoke bench read`: the case for copying, measured. Reading a record from
//! the consumer's local copy, beside reading the same record from its owner
//! with a synchronous HTTP call, in the same run.
//!
//! ```text
//!  setup (not timed): the shop's Customer Service (axum + SQLite, on 127.0.0.1:0)
//!                     with N customers created through its HTTP API;
//!                     Order Service's SQLite copy of `customers` (name, email)
//!                     holding the same customers at the same versions
//!  timed, M rounds, a random key each, which side goes first alternating:
//!    copy:  Copies::copy("customers").get(key)      (Spoke's library read: record + freshness)
//!    owner: GET /customers/{key} on Customer Service (reqwest, keep-alive connection)
//!  every round (not timed): both answers must carry the same name and email
//! ```
//!
//! The owner call is the best case for calling: same machine, loopback, a
//! warm connection, an owner doing nothing else. Across hosts, add the
//! network round trip to the owner's figures, and its availability to the
//! caller's (which a local copy does not inherit).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde::Serialize;
use spoke::clock::Clock;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{Advance, CopySpec, CopyStore};
use spoke::read::Copies;
use spoke::shutdown::shutdown_channel;
use spoke_core::{Change, Op};
use spoke_shop::customer::{self, Customer, Publish};

use super::{progress, thousands, Machine, ScratchDir, Summary};

const DATASET: &str = "customers";
const CONSUMER: &str = "order-service";
/// Concurrent creates while filling the owner (not timed).
const FILL_CONCURRENCY: usize = 8;

#[derive(clap::Args)]
pub struct ReadArgs {
    /// Customers the owner holds (and the copy copies).
    #[arg(long, default_value_t = 10_000)]
    n: u64,
    /// Timed reads per side.
    #[arg(long, default_value_t = 20_000)]
    reads: u64,
    /// Seed of the keys read.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Directory for the scratch databases (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Side {
    path: &'static str,
    reads: u64,
    latency: Summary,
    reads_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    records: u64,
    copy: Side,
    owner: Side,
    /// Owner p50 over copy p50: how many times faster the local read is.
    speedup_p50: f64,
    speedup_p99: f64,
    verified: bool,
}

pub fn run(args: ReadArgs) -> anyhow::Result<ExitCode> {
    if args.n == 0 || args.reads == 0 {
        bail!("--n and --reads must be at least 1");
    }
    let scratch = ScratchDir::new(args.dir.as_deref())?;
    let machine = Machine::probe(scratch.path());
    let rt = super::super::runtime()?;
    let report = rt.block_on(measure(&args, scratch.path().to_owned(), machine))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure(args: &ReadArgs, dir: PathBuf, machine: Machine) -> anyhow::Result<Report> {
    let manifest = spoke_shop::manifest()?;
    // The owner: Customer Service, no relay (nothing is published here).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let owner_url = format!("http://{}", listener.local_addr()?);
    let (trigger, shutdown) = shutdown_channel();
    let config = customer::Config {
        db: dir.join("customer.db"),
        publish: Publish::External,
        relay: Default::default(),
    };
    let server = tokio::spawn(customer::serve(listener, config, shutdown));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    let customers = fill_owner(&http, &owner_url, args.n).await?;

    // The consumer's copy, holding what the owner holds.
    let store = Arc::new(SqliteCopyStore::open(&dir.join("order-copy.db"))?);
    let ds = &manifest.datasets[DATASET];
    let sub = manifest
        .subscriptions_of(CONSUMER)
        .find(|s| s.dataset == DATASET)
        .context("the shop manifest has order-service → customers")?;
    let spec = CopySpec::of(&manifest, sub).context("projection")?;
    store.ensure_copy(&spec).await?;
    for chunk in customers.chunks(1_000) {
        let changes: Vec<Change> = chunk
            .iter()
            .map(|(c, version)| Change {
                dataset: DATASET.into(),
                key: c.id.clone(),
                version: *version,
                op: Op::Upsert,
                fields: spec.projection.apply(&c.fields()),
                owner: ds.owner.clone(),
                ts: 0,
                schema_version: ds.schema.version,
            })
            .collect();
        store
            .apply(
                DATASET,
                &changes,
                Advance {
                    position: Some(0),
                    fresh_as_of_ms: Some(spoke::clock::now_ms()),
                    from_feed: true,
                },
            )
            .await?;
    }
    let copies = Copies::new(&manifest, CONSUMER, store.clone(), Clock::System);
    let copy = copies.copy(DATASET)?;

    let bar = progress(args.reads, "read");
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    let (mut local_total, mut remote_total) = (Duration::ZERO, Duration::ZERO);
    for round in 0..args.reads {
        let (c, _) = &customers[rng.usize(..customers.len())];
        let copy_first = round % 2 == 0;
        let mut from_copy = None;
        let mut from_owner = None;
        for side in [copy_first, !copy_first] {
            let t = Instant::now();
            if side {
                from_copy = Some(copy.get(&c.id).await?);
                let e = t.elapsed();
                local_total += e;
                local.push(e.as_secs_f64() * 1e3);
            } else {
                let got: Customer = http
                    .get(format!("{owner_url}/customers/{}", c.id))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let e = t.elapsed();
                remote_total += e;
                remote.push(e.as_secs_f64() * 1e3);
                from_owner = Some(got);
            }
        }
        let read = from_copy
            .flatten()
            .with_context(|| format!("the copy has no customer {}", c.id))?;
        let owner = from_owner.context("owner answer")?;
        if read.fields.get("name").and_then(|v| v.as_str()) != Some(owner.name.as_str())
            || read.fields.get("email").and_then(|v| v.as_str()) != Some(owner.email.as_str())
        {
            bail!(
                "customer {}: the copy says {:?}, the owner {:?}",
                c.id,
                read.fields,
                owner
            );
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    trigger.fire();
    server.await??;

    let side = |path, samples: &mut Vec<f64>, total: Duration| Side {
        path,
        reads: args.reads,
        latency: Summary::of(samples),
        reads_per_s: args.reads as f64 / total.as_secs_f64().max(1e-9),
    };
    let copy = side("copy", &mut local, local_total);
    let owner = side("owner", &mut remote, remote_total);
    Ok(Report {
        bench: "read",
        machine,
        records: args.n,
        speedup_p50: owner.latency.p50_ms / copy.latency.p50_ms,
        speedup_p99: owner.latency.p99_ms / copy.latency.p99_ms,
        copy,
        owner,
        verified: true,
    })
}

/// Creates `n` customers through Customer Service's API; returns each with
/// the version its outbox gave it.
async fn fill_owner(
    http: &reqwest::Client,
    url: &str,
    n: u64,
) -> anyhow::Result<Vec<(Customer, u64)>> {
    use futures_util::StreamExt;
    let bar = progress(n, "creating customers");
    let created = futures_util::stream::iter(0..n)
        .map(|i| {
            let c = Customer {
                id: format!("c{i:07}"),
                name: format!("Customer {i}"),
                email: format!("c{i}@example.com"),
                preferred_name: None,
                payment_method_id: format!("pm_{i}"),
            };
            async move {
                let written: serde_json::Value = http
                    .post(format!("{url}/customers"))
                    .json(&c)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let version = written["version"]
                    .as_u64()
                    .context("Customer Service answered without a version")?;
                anyhow::Ok((c, version))
            }
        })
        .buffer_unordered(FILL_CONCURRENCY)
        .inspect(|_| bar.inc(1))
        .collect::<Vec<_>>()
        .await;
    bar.finish_and_clear();
    created.into_iter().collect()
}

fn print_table(r: &Report) {
    println!(
        "spoke bench read: {} customers, {} reads per side, a random key each, alternating sides",
        thousands(r.records as f64),
        thousands(r.copy.reads as f64)
    );
    println!("machine: {}", r.machine.describe());
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header([
        "path",
        "p50 ms",
        "p99 ms",
        "max ms",
        "reads/s (one at a time)",
    ]);
    for (name, s) in [
        ("local copy: Copies::get (SQLite)", &r.copy),
        ("owner: GET /customers/{id} (HTTP, loopback)", &r.owner),
    ] {
        let [p50, p99, max] = [s.latency.p50_ms, s.latency.p99_ms, s.latency.max_ms];
        t.add_row([
            name.to_owned(),
            format!("{p50:.3}"),
            format!("{p99:.3}"),
            format!("{max:.3}"),
            thousands(s.reads_per_s),
        ]);
    }
    println!("{t}");
    println!(
        "the local read is {:.1}× faster at p50 and {:.1}× at p99; every read returned the same name and email from both",
        r.speedup_p50, r.speedup_p99
    );
}
