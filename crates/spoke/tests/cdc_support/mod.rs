//! Shared helpers of the CDC integration tests: a private PostgreSQL with
//! `wal_level=logical`, an owner table, a SqliteFeed, and comparisons of the
//! feed with the table.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use spoke::cdc::{CdcConfig, CdcError, CdcOptions, CdcSource, TableMapping};
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{Feed, FeedEntry};
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke::testing::PrivatePostgres;
use spoke_core::{Manifest, Op};
use tokio::task::JoinHandle;

pub const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]
[services.audit-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { name = "string", qty = "int?", price = "float?", active = "bool?", at = "timestamp?", doc = "json?", body = "string?" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["name", "qty", "price"]
staleness_budget = "1m"

[[subscriptions]]
consumer = "audit-svc"
dataset = "items"
fields = ["name", "at"]
staleness_budget = "1h"
"#;

pub const TABLE_SQL: &str = "CREATE TABLE items (
    id text PRIMARY KEY,
    name text NOT NULL,
    qty integer,
    price numeric(10,2),
    active boolean,
    at timestamptz,
    doc jsonb,
    body text,
    owner_note text
)";

pub struct Env {
    pub dir: tempfile::TempDir,
    pub pg: PrivatePostgres,
    pub manifest: Arc<Manifest>,
    pub feed: Arc<SqliteFeed>,
    pub db: tokio_postgres::Client,
}

impl Env {
    /// A private PostgreSQL with the items table, and an empty feed; `None`
    /// when the server binaries are missing (skipped outside CI).
    pub async fn start() -> Option<Env> {
        Self::start_with(MANIFEST, TABLE_SQL).await
    }

    pub async fn start_with(manifest: &str, table_sql: &str) -> Option<Env> {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = PrivatePostgres::start(&dir.path().join("pg"))?;
        let manifest = Arc::new(Manifest::parse("m.toml", manifest).expect("manifest"));
        let feed = Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &manifest).expect("feed"));
        let db = connect(&pg.url()).await;
        db.batch_execute(table_sql).await.expect("create table");
        Some(Env {
            dir,
            pg,
            manifest,
            feed,
            db,
        })
    }

    pub fn config(&self, slot: &str) -> CdcConfig {
        let mut cfg = CdcConfig::new(
            &self.pg.url(),
            &format!("{slot}_pub"),
            slot,
            vec![TableMapping::parse_flag("items=public.items:id").unwrap()],
        );
        cfg.options = CdcOptions {
            batch: Some(100),
            snapshot_chunk: 50,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(300),
            ack_interval: Duration::from_millis(50),
            status_every: Duration::from_secs(1),
            heartbeat: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        cfg
    }

    /// Starts a source; returns its trigger and task.
    pub fn spawn(&self, cfg: CdcConfig) -> Running {
        let source = CdcSource::new(cfg, self.manifest.clone(), self.feed.clone())
            .expect("source")
            .with_reader(self.feed.clone());
        let (trigger, shutdown) = shutdown_channel();
        Running {
            trigger,
            task: tokio::spawn(source.run(shutdown)),
        }
    }

    /// Starts a source and serves its `GET /metrics` on a free port; the
    /// server outlives the source, so a stopped source can still be scraped.
    pub async fn spawn_with_metrics(&self, cfg: CdcConfig) -> (Running, MetricsServer) {
        let source = CdcSource::new(cfg, self.manifest.clone(), self.feed.clone())
            .expect("source")
            .with_reader(self.feed.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let (server_trigger, server_shutdown) = shutdown_channel();
        let server = tokio::spawn(spoke::tls::serve(
            listener,
            None,
            spoke::cdc::metrics::router(source.metrics()),
            server_shutdown.signal(),
        ));
        let (trigger, shutdown) = shutdown_channel();
        let running = Running {
            trigger,
            task: tokio::spawn(source.run(shutdown)),
        };
        (
            running,
            MetricsServer {
                url,
                trigger: server_trigger,
                task: server,
            },
        )
    }

    /// Waits until the feed's compacted state equals the table (or panics).
    pub async fn converge(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let table = table_state(&self.db).await;
            let feed = feed_state(self.feed.as_ref()).await;
            if table == feed {
                return;
            }
            if Instant::now() > deadline {
                let missing: Vec<_> = table
                    .iter()
                    .filter(|(k, v)| feed.get(*k) != Some(v))
                    .take(5)
                    .collect();
                let extra: Vec<_> = feed
                    .iter()
                    .filter(|(k, v)| table.get(*k) != Some(v))
                    .take(5)
                    .collect();
                panic!(
                    "the feed never equalled the table: {} rows vs {} live records; table rows not in the feed (first 5): {missing:?}; feed records not in the table: {extra:?}",
                    table.len(),
                    feed.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub struct Running {
    pub trigger: ShutdownTrigger,
    pub task: JoinHandle<Result<(), CdcError>>,
}

impl Running {
    pub async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the source stops")
            .expect("no panic")
            .expect("the source stops cleanly");
    }

    /// Waits for the source to stop by itself with an error.
    pub async fn error(self, within: Duration) -> CdcError {
        match tokio::time::timeout(within, self.task).await {
            Ok(Ok(Err(e))) => e,
            Ok(Ok(Ok(()))) => panic!("the source stopped without an error"),
            Ok(Err(e)) => panic!("the source panicked: {e}"),
            Err(_) => panic!("the source did not stop within {within:?}"),
        }
    }
}

/// A CDC source's metrics endpoint, served apart from the source.
pub struct MetricsServer {
    pub url: String,
    trigger: ShutdownTrigger,
    task: JoinHandle<std::io::Result<()>>,
}

impl MetricsServer {
    /// The scrape's text (panics unless it is a 200 in the Prometheus format).
    pub async fn scrape(&self) -> String {
        let resp = reqwest::get(&self.url).await.expect("scrape /metrics");
        assert_eq!(resp.status(), 200, "GET {}", self.url);
        assert_eq!(
            resp.headers()["content-type"],
            "text/plain; version=0.0.4",
            "the Prometheus text format"
        );
        resp.text().await.expect("metrics body")
    }

    /// The value of one series (`name{labels}`) in a scrape, if present.
    pub async fn value(&self, series: &str) -> Option<f64> {
        metric_value(&self.scrape().await, series)
    }

    pub async fn stop(self) {
        self.trigger.fire();
        self.task
            .await
            .expect("no panic")
            .expect("the metrics server stops cleanly");
    }
}

/// The value of `series` (`name{labels}`) in a Prometheus text scrape.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("session");
    client
}

/// The table as the dataset sees it: key → fields, converted the way the
/// test expects (independently of the source's converter).
pub async fn table_state(db: &tokio_postgres::Client) -> BTreeMap<String, Map<String, Value>> {
    db.query(
        "SELECT id, json_build_object('name', name, 'qty', qty, 'price', price::float8, 'active', active,
                'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), 'doc', doc, 'body', body)::text
         FROM items ORDER BY id",
        &[],
    )
    .await
    .expect("read table")
    .iter()
    .map(|r| {
        let fields: Map<String, Value> = serde_json::from_str(&r.get::<_, String>(1)).unwrap();
        (r.get(0), normalise(fields))
    })
    .collect()
}

/// Compares instants and numbers, not their spellings.
fn normalise(mut fields: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::String(s)) = fields.get("at").cloned() {
        fields.insert("at".into(), Value::String(normalise_ts(&s)));
    }
    if let Some(Value::Number(n)) = fields.get("price").cloned() {
        fields.insert("price".into(), serde_json::json!(n.as_f64().unwrap()));
    }
    fields
}

fn normalise_ts(s: &str) -> String {
    // 2026-01-02T03:04:05.120000Z / 2026-01-02T03:04:05.12Z → seconds + micros.
    let (main, frac) = match s.trim_end_matches('Z').split_once('.') {
        Some((m, f)) => (m.to_owned(), f.to_owned()),
        None => (s.trim_end_matches('Z').to_owned(), String::new()),
    };
    format!("{main}.{:0<6}Z", frac)
}

/// Live records of the feed's compacted state, with fields normalised like [`table_state`].
pub async fn feed_state(feed: &dyn Feed) -> BTreeMap<String, Map<String, Value>> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = feed
            .snapshot("items", after.as_deref(), 1000)
            .await
            .expect("snapshot");
        for c in page.records {
            if c.op == Op::Upsert {
                let mut fields = c.fields.clone();
                for f in ["qty", "price", "active", "at", "doc", "body"] {
                    fields.entry(f.to_owned()).or_insert(Value::Null);
                }
                out.insert(c.key, normalise(fields));
            }
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => return out,
        }
    }
}

/// Every entry of the feed's log, in order.
pub async fn log(feed: &dyn Feed, dataset: &str) -> Vec<FeedEntry> {
    let mut out = Vec::new();
    loop {
        let batch = feed
            .read(dataset, out.len() as u64, 10_000, Duration::ZERO)
            .await
            .expect("read log");
        if batch.entries.is_empty() {
            return out;
        }
        out.extend(batch.entries);
    }
}

/// Asserts that no (key, version) appears twice in the log.
pub fn assert_no_doubles(entries: &[FeedEntry]) {
    let mut seen = HashSet::new();
    for e in entries {
        assert!(
            seen.insert((e.change.key.clone(), e.change.version)),
            "({}, {}) is in the log twice",
            e.change.key,
            e.change.version
        );
    }
}

/// Slot row: (confirmed_flush_lsn as u64, wal_status).
pub async fn slot_row(db: &tokio_postgres::Client, slot: &str) -> Option<(u64, Option<String>)> {
    db.query_opt(
        "SELECT (confirmed_flush_lsn - '0/0')::text, wal_status FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .expect("slot")
    .map(|r| (r.get::<_, String>(0).parse::<f64>().unwrap() as u64, r.get(1)))
}

/// Waits until `cond` holds (polling), or panics with `what`.
pub async fn wait_for<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the source finished its snapshot (the state table says so).
pub async fn wait_snapshot_done(db: &tokio_postgres::Client, slot: &str) {
    wait_for("the snapshot to finish", Duration::from_secs(60), || async {
        matches!(
            db.query_one(
                "SELECT coalesce(bool_and(snapshot_done), false) FROM spoke_cdc_state WHERE slot_name = $1",
                &[&slot],
            )
            .await,
            Ok(r) if r.get::<_, bool>(0)
        )
    })
    .await;
}

/// Drops a slot, retrying while its walsender is still going away.
pub async fn drop_slot(db: &tokio_postgres::Client, slot: &str) {
    wait_for(
        "the slot to be dropped",
        Duration::from_secs(30),
        || async {
            db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .is_ok()
        },
    )
    .await;
}
