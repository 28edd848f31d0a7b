//! Reconciliation end to end, in-process: a hub (router over an SQLite
//! feed) on 127.0.0.1:0, an agent following it over HTTP into an SQLite
//! copy, and reconcile runs — over HTTP, through a *second* store handle on
//! the same file, as `spoke reconcile` does beside a running agent.
//!
//! - While changes keep flowing (publishes, updates, deletes, new keys),
//!   repeated reconciles repair a corrupted copy (rows lost, rolled back,
//!   foreign, flipped tombstones) and the whole converges: once the flow
//!   stops and the agent catches up, the digests are equal and the copy
//!   equals the hub's state.
//! - No record is ever rolled back: every write of either writer is
//!   followed by a look at the whole copy, and a key's version never drops
//!   below one it held before (corrupt rows aside, which reconcile removes).
//! - The hub and agent digest endpoints answer, by level and subtree.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use spoke::agent::{http as agent_http, Agent, AgentOptions};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{
    Advance, ApplyOutcome, CopyRecord, CopySpec, CopyStore, Cursor, Held, ReconcileRun,
    ReconcileStats, StoreError,
};
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Feed, Publisher};
use spoke::hub::{self, Tokens};
use spoke::reconcile::{Progress, Reconciler};
use spoke::shutdown::shutdown_channel;
use spoke_core::digest::{Digest, DigestEntry, DigestNodes};
use spoke_core::{Change, Manifest, Op, Projection, Version};

const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int", label = "string?", secret = "string?" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n", "label"]
staleness_budget = "1m"
"#;

const DEADLINE: Duration = Duration::from_secs(60);

type Dump = BTreeMap<String, (Version, bool, Map<String, Value>)>;

fn fields(n: u64) -> Map<String, Value> {
    json!({ "n": n, "label": format!("v{n}"), "secret": "not copied" })
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// Watches every write of every handle on the copy: after each one it reads
/// the whole copy and records any key whose version went down.
#[derive(Default)]
struct Watch {
    lock: tokio::sync::Mutex<()>,
    seen: std::sync::Mutex<BTreeMap<String, Version>>,
    rollbacks: std::sync::Mutex<Vec<String>>,
    writes: std::sync::atomic::AtomicU64,
}

struct Watched {
    inner: SqliteCopyStore,
    watch: Arc<Watch>,
    who: &'static str,
    /// Slows each apply down, so the agent lags the feed and reconcile
    /// keeps finding (and racing it on) keys the agent is about to apply.
    delay: Duration,
}

impl Watched {
    async fn after_write(&self, what: &str) {
        self.watch
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dump = self.inner.dump("items").await.expect("dump");
        let mut seen = self.watch.seen.lock().unwrap();
        for (k, (v, _, _)) in &dump {
            let before = seen.entry(k.clone()).or_insert(*v);
            if *v < *before {
                self.watch.rollbacks.lock().unwrap().push(format!(
                    "{} {what}: {k} went from version {before} to {v}",
                    self.who
                ));
            }
            *before = (*before).max(*v);
        }
    }
}

#[async_trait]
impl CopyStore for Watched {
    async fn ensure_copy(&self, spec: &CopySpec) -> Result<(), StoreError> {
        self.inner.ensure_copy(spec).await
    }
    async fn cursor(&self, dataset: &str) -> Result<Cursor, StoreError> {
        self.inner.cursor(dataset).await
    }
    async fn apply(
        &self,
        dataset: &str,
        changes: &[Change],
        advance: Advance,
    ) -> Result<ApplyOutcome, StoreError> {
        tokio::time::sleep(self.delay).await;
        let _g = self.watch.lock.lock().await;
        let out = self.inner.apply(dataset, changes, advance).await;
        self.after_write("apply").await;
        out
    }
    async fn get(&self, dataset: &str, key: &str) -> Result<Option<CopyRecord>, StoreError> {
        self.inner.get(dataset, key).await
    }
    async fn count(&self, dataset: &str) -> Result<u64, StoreError> {
        self.inner.count(dataset).await
    }
    async fn gc_tombstones(
        &self,
        dataset: &str,
        now_ms: u64,
        horizon_ms: u64,
    ) -> Result<u64, StoreError> {
        self.inner.gc_tombstones(dataset, now_ms, horizon_ms).await
    }
    async fn digest(&self, dataset: &str) -> Result<Digest, StoreError> {
        self.inner.digest(dataset).await
    }
    async fn bucket_entries(
        &self,
        dataset: &str,
        buckets: &[u16],
    ) -> Result<Vec<DigestEntry>, StoreError> {
        self.inner.bucket_entries(dataset, buckets).await
    }
    async fn remove(&self, dataset: &str, entries: &[DigestEntry]) -> Result<u64, StoreError> {
        // Removing a corrupt row is allowed; forget what it held, so the
        // source's state that replaces it is judged on its own.
        let _g = self.watch.lock.lock().await;
        let out = self.inner.remove(dataset, entries).await;
        if let Ok(n) = out {
            if n > 0 {
                let mut seen = self.watch.seen.lock().unwrap();
                for e in entries {
                    if seen.get(&e.key) == Some(&e.version) {
                        seen.remove(&e.key);
                    }
                }
            }
        }
        self.after_write("remove").await;
        out
    }
    async fn reconcile_stats(&self, dataset: &str) -> Result<ReconcileStats, StoreError> {
        self.inner.reconcile_stats(dataset).await
    }
    async fn record_reconcile(&self, dataset: &str, run: &ReconcileRun) -> Result<(), StoreError> {
        self.inner.record_reconcile(dataset, run).await
    }
    async fn hold(&self, dataset: &str, held: &[Held]) -> Result<(), StoreError> {
        self.inner.hold(dataset, held).await
    }
    async fn held(&self, dataset: &str, limit: usize) -> Result<Vec<Held>, StoreError> {
        self.inner.held(dataset, limit).await
    }
    async fn held_count(&self, dataset: &str) -> Result<u64, StoreError> {
        self.inner.held_count(dataset).await
    }
    async fn release(&self, dataset: &str, held: &[(String, Version)]) -> Result<u64, StoreError> {
        self.inner.release(dataset, held).await
    }
    async fn dump(&self, dataset: &str) -> Result<Dump, StoreError> {
        self.inner.dump(dataset).await
    }
}

async fn source_state(feed: &dyn Feed, projection: &Projection) -> Dump {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = feed
            .snapshot("items", after.as_deref(), 1000)
            .await
            .expect("snapshot");
        for c in page.records {
            let f = match c.op {
                Op::Upsert => projection.apply(&c.fields),
                Op::Delete => Map::new(),
            };
            out.insert(c.key.clone(), (c.version, c.op == Op::Delete, f));
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => return out,
        }
    }
}

async fn caught_up(store: &dyn CopyStore, hub: &HubClient) {
    let start = Instant::now();
    loop {
        let head = hub
            .read("items", u64::MAX - 1, 1, Duration::ZERO)
            .await
            .expect("head")
            .head;
        let cursor = store.cursor("items").await.expect("cursor");
        if cursor.position == Some(head) {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "the agent did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_while_changes_keep_flowing_converges_and_never_rolls_back() {
    let manifest = Manifest::parse("reconcile.toml", MANIFEST).expect("manifest");
    let dir = tempfile::tempdir().expect("tempdir");
    let feed = Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &manifest).expect("hub"));
    let router = hub::router(feed, Arc::new(manifest.clone()), Tokens::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(hub::serve(listener, router, std::future::pending()));
    let owner = HubClient::new(&base, None);

    // 500 keys before the agent starts.
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    for chunk in (0..500u64).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<ChangeInput> = chunk
            .iter()
            .map(|i| {
                versions.insert(format!("k{i}"), 1);
                ChangeInput::upsert(format!("k{i}"), 1, fields(1))
            })
            .collect();
        owner.publish("items", batch).await.expect("publish");
    }

    let path = dir.path().join("copies.db");
    let watch = Arc::new(Watch::default());
    let agent_store = Arc::new(Watched {
        inner: SqliteCopyStore::open(&path).expect("store"),
        watch: watch.clone(),
        who: "agent",
        delay: Duration::from_millis(15),
    });
    let agent = Arc::new(
        Agent::new(
            Arc::new(manifest.clone()),
            "reader-svc",
            Arc::new(HubClient::new(&base, None)),
            agent_store.clone(),
        )
        .expect("agent")
        .with_options(AgentOptions {
            batch: 40,
            wait: Duration::from_millis(200),
            ..AgentOptions::default()
        }),
    );
    agent.ensure_copies().await.expect("copies");
    let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let agent_base = format!("http://{}", agent_listener.local_addr().expect("addr"));
    tokio::spawn(hub::serve(
        agent_listener,
        agent_http::router(agent.clone(), Tokens::default()),
        std::future::pending(),
    ));
    let (stop_agent, shutdown) = shutdown_channel();
    let agent_task = tokio::spawn(agent.clone().run(shutdown));
    caught_up(agent_store.as_ref(), &owner).await;

    // Corrupt the copy through a second handle, as a bad restore or a bug
    // would: lose rows, roll rows back, add foreign rows, flip tombstones.
    let raw = SqliteCopyStore::open(&path).expect("second handle");
    let ds = manifest.datasets.get("items").expect("dataset");
    let spec = CopySpec {
        dataset: "items".into(),
        owner: "owner-svc".into(),
        key_name: "id".into(),
        projection: Projection::new(&ds.schema, &["n".to_owned(), "label".to_owned()])
            .expect("projection"),
    };
    let bootstrap = Advance {
        position: None,
        fresh_as_of_ms: None,
        from_feed: false,
    };
    let change = |key: &str, version: Version, op: Op| Change {
        dataset: "items".into(),
        key: key.into(),
        version,
        op,
        fields: if op == Op::Upsert {
            spec.projection.apply(&fields(version))
        } else {
            Map::new()
        },
        owner: "owner-svc".into(),
        ts: 1,
        schema_version: 1,
    };
    // Versions 2–3 for k0..k99 first, so there is something to roll back.
    for v in 2..=3u64 {
        let batch: Vec<ChangeInput> = (0..100)
            .map(|i| ChangeInput::upsert(format!("k{i}"), v, fields(v)))
            .collect();
        owner.publish("items", batch).await.expect("publish");
    }
    for i in 0..100 {
        versions.insert(format!("k{i}"), 3);
    }
    caught_up(agent_store.as_ref(), &owner).await;
    let lost: Vec<DigestEntry> = (100..120)
        .map(|i| DigestEntry::new(format!("k{i}"), 1, false))
        .collect();
    assert_eq!(raw.remove("items", &lost).await.expect("lose"), 20);
    let rolled: Vec<DigestEntry> = (0..20)
        .map(|i| DigestEntry::new(format!("k{i}"), 3, false))
        .collect();
    assert_eq!(raw.remove("items", &rolled).await.expect("roll back"), 20);
    let older: Vec<Change> = (0..20)
        .map(|i| change(&format!("k{i}"), 1 + i % 2, Op::Upsert))
        .collect();
    raw.apply("items", &older, bootstrap)
        .await
        .expect("old rows");
    let foreign: Vec<Change> = (0..10)
        .map(|i| {
            change(
                &format!("x{i}"),
                5,
                if i % 3 == 0 { Op::Delete } else { Op::Upsert },
            )
        })
        .collect();
    raw.apply("items", &foreign, bootstrap)
        .await
        .expect("foreign rows");
    let flipped: Vec<DigestEntry> = (200..210)
        .map(|i| DigestEntry::new(format!("k{i}"), 1, false))
        .collect();
    assert_eq!(raw.remove("items", &flipped).await.expect("flip"), 10);
    let tombs: Vec<Change> = (200..210)
        .map(|i| change(&format!("k{i}"), 1, Op::Delete))
        .collect();
    raw.apply("items", &tombs, bootstrap)
        .await
        .expect("tombstones");
    drop(raw);
    // The watch starts from the corrupted copy.
    {
        let dump = agent_store.inner.dump("items").await.expect("dump");
        let mut seen = watch.seen.lock().unwrap();
        seen.clear();
        seen.extend(dump.into_iter().map(|(k, (v, _, _))| (k, v)));
    }

    // The hub and agent digest endpoints disagree now, by subtree.
    let http = reqwest::Client::new();
    let get = |url: String| {
        let http = http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .expect("get")
                .json::<DigestNodes>()
                .await
                .expect("digest json")
        }
    };
    let hub_root = get(format!("{base}/v1/datasets/items/digest")).await;
    let agent_root = get(format!("{agent_base}/v1/copies/items/digest?level=0")).await;
    assert_eq!(hub_root.nodes.len(), 1);
    assert_ne!(
        hub_root.nodes[0].1, agent_root.nodes[0].1,
        "the roots differ"
    );
    let hub_l1 = get(format!("{base}/v1/datasets/items/digest?level=1")).await;
    let agent_l1 = get(format!("{agent_base}/v1/copies/items/digest?level=1")).await;
    let under = hub_l1.differing(&agent_l1);
    assert!(!under.is_empty());
    let list: Vec<String> = under.iter().map(u32::to_string).collect();
    let leaves = get(format!(
        "{base}/v1/datasets/items/digest?level=2&under={}",
        list.join(",")
    ))
    .await;
    assert_eq!(
        leaves.nodes.len(),
        under.len() * 64,
        "only the subtrees asked for"
    );
    let bad = http
        .get(format!("{base}/v1/datasets/items/digest?level=2&under=64"))
        .send()
        .await
        .expect("get");
    assert_eq!(bad.status().as_u16(), 400);
    let bad = http
        .get(format!(
            "{agent_base}/v1/copies/items/digest/entries?buckets=9999"
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(bad.status().as_u16(), 400);

    // Changes keep flowing: updates, deletes, re-creations and new keys.
    let publisher = {
        let owner = owner.clone();
        let mut versions = versions.clone();
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(11);
            let until = Instant::now() + Duration::from_millis(2_500);
            let mut published = 0u64;
            while Instant::now() < until {
                let batch: Vec<ChangeInput> = (0..10)
                    .map(|_| {
                        // Half on 20 hot keys, so reconcile keeps racing the agent.
                        let key = if rng.bool() {
                            format!("k{}", 300 + rng.u64(0..20))
                        } else {
                            format!("k{}", rng.u64(0..600))
                        };
                        let v = versions.entry(key.clone()).or_insert(0);
                        *v += 1;
                        if rng.u8(0..5) == 0 {
                            ChangeInput::delete(key, *v)
                        } else {
                            ChangeInput::upsert(key, *v, fields(*v))
                        }
                    })
                    .collect();
                owner.publish("items", batch).await.expect("publish");
                published += 10;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            published
        })
    };

    // Reconcile repeatedly meanwhile, through its own handle and client.
    let rec_store = Watched {
        inner: SqliteCopyStore::open(&path).expect("reconcile handle"),
        watch: watch.clone(),
        who: "reconcile",
        delay: Duration::ZERO,
    };
    let rec_feed = HubClient::new(&base, None);
    let mut rounds: u64 = 0;
    let mut repaired = 0;
    let mut kinds_seen: HashSet<&'static str> = HashSet::new();
    while !publisher.is_finished() || rounds < 3 {
        let report = Reconciler::new(&rec_feed, &rec_store, &spec)
            .run(&|_: Progress| {})
            .await
            .expect("reconcile");
        rounds += 1;
        repaired += report.repaired.total();
        for (kind, n) in [
            ("missing", report.repaired.missing),
            ("stale", report.repaired.stale),
            ("extra", report.repaired.extra),
        ] {
            if n > 0 {
                kinds_seen.insert(kind);
            }
        }
        assert!(
            report.ahead.is_empty(),
            "nothing in the copy is newer than the source: {:?}",
            report.ahead
        );
    }
    let published = publisher.await.expect("publisher");
    assert!(published > 500, "changes kept flowing ({published})");
    assert!(rounds >= 3, "reconciled {rounds} times during the flow");
    // Every corruption was repaired by the reconciles during the flow (the
    // flow may also have overwritten some of it first).
    assert!(
        repaired >= 10,
        "repaired {repaired} records during the flow"
    );
    assert!(kinds_seen.contains("extra"), "foreign rows were removed");

    // Converged: after the flow stops and the agent catches up, the
    // digests are equal, and the copy equals the hub's state.
    caught_up(agent_store.as_ref(), &owner).await;
    let last = Reconciler::new(&rec_feed, &rec_store, &spec)
        .run(&|_: Progress| {})
        .await
        .expect("reconcile");
    assert!(
        last.in_sync_before,
        "nothing left to repair once the flow stopped: {:?}",
        last.repaired
    );
    assert_eq!(
        agent_store.inner.dump("items").await.expect("dump"),
        source_state(&owner, &spec.projection).await,
        "the copy equals the hub's state"
    );
    let stats = rec_store.reconcile_stats("items").await.expect("stats");
    assert_eq!(stats.runs_total, rounds + 1);

    let rollbacks = watch.rollbacks.lock().unwrap().clone();
    assert!(rollbacks.is_empty(), "records rolled back: {rollbacks:#?}");
    assert!(
        watch.writes.load(std::sync::atomic::Ordering::Relaxed) > 50,
        "both writers wrote"
    );

    // Status and metrics show the reconcile bookkeeping.
    let status: Value = http
        .get(format!("{agent_base}/v1/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(
        status["copies"][0]["reconcile"]["runs_total"],
        json!(rounds + 1)
    );
    let metrics = http
        .get(format!("{agent_base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(&format!(
            "spoke_reconcile_runs_total{{dataset=\"items\"}} {}",
            rounds + 1
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("spoke_reconcile_repaired_total{dataset=\"items\",kind=\"extra\"}"),
        "{metrics}"
    );
    stop_agent.fire();
    agent_task.await.expect("agent").expect("agent run");
}
