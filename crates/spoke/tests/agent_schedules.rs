//! What the agent does on a schedule, against real servers:
//!
//! - the `scheduled` strategy's HTTP snapshot source against an axum owner
//!   on 127.0.0.1:0 (initial fill, then updates, inserts and deletes
//!   converge, fetching full records only for what changed; malformed pages
//!   fail the refresh and change nothing);
//! - its SQL source against the machine's PostgreSQL (same convergence);
//! - an agent refreshing a `scheduled` copy on its interval, with status;
//! - an agent reconciling an `events` copy every `reconcile_every`,
//!   repairing corruption nobody asked it to look for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use spoke::agent::{http as agent_http, Agent};
use spoke::clock::Clock;
use spoke::copy::memory::MemoryCopyStore;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{Advance, CopySpec, CopyStore};
use spoke::feed::memory::MemoryFeed;
use spoke::feed::{ChangeInput, Publisher};
use spoke::scheduled::http::HttpSnapshot;
use spoke::scheduled::postgres::PostgresSnapshot;
use spoke::scheduled::{RefreshOptions, Refresher, SnapshotSource};
use spoke::shutdown::shutdown_channel;
use spoke_core::digest::{Digest, DigestEntry};
use spoke_core::manifest::SnapshotUrl;
use spoke_core::{Change, Manifest, Op, Projection, Version};

const DEADLINE: Duration = Duration::from_secs(30);

/// The owner's schema: `secret` is never projected.
fn manifest(subscription_extra: &str) -> Manifest {
    manifest_with_budget("1m", subscription_extra)
}

fn manifest_with_budget(budget: &str, subscription_extra: &str) -> Manifest {
    Manifest::parse(
        "m.toml",
        &format!(
            r#"
[services.customer-service]
[services.order-service]

[datasets.customers]
owner = "customer-service"
key = "id"
fields = {{ name = "string", email = "string", secret = "string?" }}

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "email"]
staleness_budget = "{budget}"
{subscription_extra}
"#
        ),
    )
    .expect("manifest")
}

fn spec(m: &Manifest) -> CopySpec {
    let ds = &m.datasets["customers"];
    CopySpec {
        dataset: "customers".into(),
        owner: ds.owner.clone(),
        key_name: ds.key.clone(),
        projection: Projection::new(&ds.schema, &["name".into(), "email".into()])
            .expect("projection"),
    }
}

fn person(name: &str) -> Map<String, Value> {
    json!({ "name": name, "email": format!("{name}@example.com"), "secret": "owner only" })
        .as_object()
        .cloned()
        .unwrap_or_default()
}

type Dump = BTreeMap<String, (Version, bool, Map<String, Value>)>;

/// The copy the owner's state should give: projected, no tombstones.
fn expected(owner: &BTreeMap<String, (Version, Map<String, Value>)>) -> Dump {
    owner
        .iter()
        .map(|(k, (v, f))| {
            let mut f = f.clone();
            f.remove("secret");
            (k.clone(), (*v, false, f))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// A stand-in owner serving the snapshot protocol.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehave {
    None,
    BadJson,
    MissingVersion,
    RepeatCursor,
    Oversized,
    DuplicateKey,
    BadLookup,
    Down,
}

/// The owner's records: key → (version, fields).
type OwnerRecords = BTreeMap<String, (Version, Map<String, Value>)>;

#[derive(Default)]
struct OwnerState {
    records: Mutex<OwnerRecords>,
    misbehave: Mutex<Option<Misbehave>>,
    listing_pages: AtomicU64,
    lookups: AtomicU64,
    looked_up_keys: Mutex<Vec<String>>,
}

impl OwnerState {
    fn put(&self, key: &str, version: Version, name: &str) {
        self.records
            .lock()
            .unwrap()
            .insert(key.into(), (version, person(name)));
    }
    fn delete(&self, key: &str) {
        self.records.lock().unwrap().remove(key);
    }
    fn set(&self, m: Misbehave) {
        *self.misbehave.lock().unwrap() = Some(m);
    }
    fn mode(&self) -> Misbehave {
        self.misbehave.lock().unwrap().unwrap_or(Misbehave::None)
    }
    fn take_looked_up(&self) -> Vec<String> {
        std::mem::take(&mut *self.looked_up_keys.lock().unwrap())
    }
    fn snapshot(&self) -> BTreeMap<String, (Version, Map<String, Value>)> {
        self.records.lock().unwrap().clone()
    }
}

async fn list(
    State(owner): State<Arc<OwnerState>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    owner.listing_pages.fetch_add(1, Ordering::SeqCst);
    assert_eq!(q.get("fields").map(String::as_str), Some("key,version"));
    let limit: usize = q["limit"].parse().expect("limit");
    let mode = owner.mode();
    match mode {
        Misbehave::BadJson => return (StatusCode::OK, "{\"records\": [").into_response(),
        Misbehave::Down => {
            return (StatusCode::SERVICE_UNAVAILABLE, "database is down").into_response()
        }
        _ => {}
    }
    let records = owner.snapshot();
    // A looping owner serves its first page again and again.
    let after = q
        .get("after")
        .cloned()
        .filter(|_| mode != Misbehave::RepeatCursor);
    let page: Vec<(String, Version)> = records
        .iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| k.as_str() > a.as_str()))
        .take(if mode == Misbehave::Oversized {
            limit + 1
        } else {
            limit
        })
        .map(|(k, (v, _))| (k.clone(), *v))
        .collect();
    let next = match (page.last(), mode) {
        (Some(_), Misbehave::RepeatCursor) => Some("same".to_owned()),
        (Some((k, _)), _) if page.len() >= limit => Some(k.clone()),
        _ => None,
    };
    let mut listed: Vec<Value> = page
        .iter()
        .map(|(k, v)| json!({ "key": k, "version": v }))
        .collect();
    if mode == Misbehave::MissingVersion {
        if let Some(Value::Object(last)) = listed.last_mut() {
            last.remove("version");
        }
    }
    if mode == Misbehave::DuplicateKey {
        if let (Some(first), Some(last)) = (listed.first().cloned(), listed.last_mut()) {
            *last = first;
        }
    }
    Json(json!({ "records": listed, "next": next })).into_response()
}

async fn lookup(State(owner): State<Arc<OwnerState>>, Json(body): Json<Value>) -> Response {
    owner.lookups.fetch_add(1, Ordering::SeqCst);
    let keys: Vec<String> = serde_json::from_value(body["keys"].clone()).expect("keys");
    owner
        .looked_up_keys
        .lock()
        .unwrap()
        .extend(keys.iter().cloned());
    let records = owner.snapshot();
    let bad = owner.mode() == Misbehave::BadLookup;
    let out: Vec<Value> = keys
        .iter()
        .filter_map(|k| {
            let (v, f) = records.get(k)?;
            let fields = if bad {
                json!({ "name": 42, "email": "x" })
            } else {
                Value::Object(f.clone())
            };
            Some(json!({ "key": k, "version": v, "fields": fields }))
        })
        .collect();
    Json(json!({ "records": out })).into_response()
}

/// Serves the owner on 127.0.0.1:0; returns its snapshot URL.
async fn serve_owner(owner: Arc<OwnerState>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = Router::new()
        .route("/v1/customers", get(list).post(lookup))
        .with_state(owner);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("{base}/v1/customers")
}

fn http_source(m: &Manifest, url: &str, page: usize) -> HttpSnapshot {
    HttpSnapshot::new(
        "customers",
        SnapshotUrl::parse(url).expect("url"),
        spec(m).projection,
        Duration::from_secs(5),
    )
    .expect("source")
    .with_page(page)
}

#[tokio::test]
async fn http_snapshot_converges_fetching_only_what_changed() {
    let m = manifest("strategy = \"events\"");
    let owner = Arc::new(OwnerState::default());
    for i in 0..300 {
        owner.put(&format!("c{i:03}"), 1, &format!("n{i}"));
    }
    let url = serve_owner(owner.clone()).await;
    let source = http_source(&m, &url, 40);
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteCopyStore::open(&dir.path().join("copies.db")).unwrap();
    let spec = spec(&m);
    store.ensure_copy(&spec).await.unwrap();
    let clock = Clock::manual(1_000_000);
    let refresher = || {
        Refresher::new(&source, &store, &spec, 1)
            .with_clock(clock.clone())
            .with_options(RefreshOptions { batch: 64 })
    };

    // Initial fill: everything is missing, so everything is fetched.
    let r = refresher().run().await.expect("first refresh");
    assert_eq!((r.listed, r.fetched, r.inserted), (300, 300, 300));
    assert_eq!(
        owner.listing_pages.load(Ordering::SeqCst),
        8,
        "300 keys in pages of 40"
    );
    assert_eq!(
        owner.lookups.load(Ordering::SeqCst),
        5,
        "300 keys in lookups of 64"
    );
    assert_eq!(owner.take_looked_up().len(), 300);
    assert_eq!(
        store.dump("customers").await.unwrap(),
        expected(&owner.snapshot())
    );
    assert_eq!(
        store.cursor("customers").await.unwrap().fresh_as_of_ms,
        1_000_000
    );

    // Nothing changed: digests are equal, nothing is fetched.
    clock.advance(1_000);
    let r = refresher().run().await.unwrap();
    assert_eq!((r.buckets_differing, r.fetched, r.changed()), (0, 0, 0));
    assert!(owner.take_looked_up().is_empty());
    assert_eq!(
        store.cursor("customers").await.unwrap().fresh_as_of_ms,
        1_001_000
    );

    // An update, an insert and a delete: only the two changed records are fetched.
    owner.put("c005", 2, "renamed");
    owner.put("c900", 1, "new");
    owner.delete("c010");
    clock.advance(1_000);
    let r = refresher().run().await.unwrap();
    assert_eq!((r.inserted, r.updated, r.deleted), (1, 1, 1), "{r:?}");
    assert!(r.buckets_differing <= 3 && r.buckets_differing >= 1);
    let mut fetched = owner.take_looked_up();
    fetched.sort();
    assert_eq!(
        fetched,
        ["c005", "c900"],
        "only changed records travel in full"
    );
    assert_eq!(r.fetched, 2);
    let dump = store.dump("customers").await.unwrap();
    assert_eq!(
        dump,
        expected(&owner.snapshot()),
        "the copy equals the owner"
    );
    assert!(!dump.contains_key("c010"), "deleted without a tombstone");
    assert_eq!(dump["c005"].2["name"], json!("renamed"));
    assert!(
        !dump["c005"].2.contains_key("secret"),
        "only projected fields are stored"
    );
    let owner_digest = Digest::from_entries(
        owner
            .snapshot()
            .iter()
            .map(|(k, (v, _))| (k.as_str(), *v, false)),
    );
    assert_eq!(
        store.digest("customers").await.unwrap().root(),
        owner_digest.root()
    );
    let stats = store.reconcile_stats("customers").await.unwrap();
    assert_eq!(stats.runs_total, 3);
    assert_eq!(
        (
            stats.repaired_missing_total,
            stats.repaired_stale_total,
            stats.repaired_extra_total
        ),
        (301, 1, 1)
    );

    // A key the owner deleted and re-created with a lower version comes back.
    owner.delete("c020");
    refresher().run().await.unwrap();
    owner.put("c020", 1, "again");
    let r = refresher().run().await.unwrap();
    assert_eq!(r.inserted, 1);
    assert_eq!(
        store
            .get("customers", "c020")
            .await
            .unwrap()
            .unwrap()
            .fields["name"],
        json!("again")
    );
}

#[tokio::test]
async fn malformed_snapshot_answers_change_nothing() {
    let m = manifest("strategy = \"events\"");
    let owner = Arc::new(OwnerState::default());
    for i in 0..30 {
        owner.put(&format!("c{i:03}"), 1, &format!("n{i}"));
    }
    let url = serve_owner(owner.clone()).await;
    let source = http_source(&m, &url, 10);
    let store = MemoryCopyStore::new();
    let spec = spec(&m);
    store.ensure_copy(&spec).await.unwrap();
    let clock = Clock::manual(5_000_000);
    Refresher::new(&source, &store, &spec, 1)
        .with_clock(clock.clone())
        .run()
        .await
        .expect("first refresh");
    // Changes are waiting, so any refresh that got through would move the copy.
    owner.put("c001", 2, "renamed");
    owner.put("c500", 1, "new");
    owner.delete("c002");
    let before = store.dump("customers").await.unwrap();
    clock.advance(60_000);
    let cases = [
        (Misbehave::BadJson, "listing page 1: not JSON"),
        (Misbehave::MissingVersion, "listing page 1: record 9: key 'c010' has no \"version\"; every key needs its owner's version"),
        (Misbehave::RepeatCursor, "listing page 2 names cursor 'same' again: the listing loops"),
        (Misbehave::Oversized, "listing page 1: the page has 11 records, more than the limit=10 asked for"),
        (Misbehave::DuplicateKey, "listing: key 'c000' is listed twice"),
        (Misbehave::BadLookup, "field 'name' must be string, got an int"),
        (Misbehave::Down, "answered HTTP 503: database is down"),
    ];
    for (mode, want) in cases {
        owner.set(mode);
        let e = Refresher::new(&source, &store, &spec, 1)
            .with_clock(clock.clone())
            .run()
            .await
            .expect_err("a malformed answer fails the refresh");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("snapshot of customers from {url}")),
            "{mode:?}: names the dataset and the URL: {msg}"
        );
        assert!(msg.contains(want), "{mode:?}: {msg}");
        assert_eq!(e.is_transient(), mode == Misbehave::Down, "{mode:?}");
        assert_eq!(
            store.dump("customers").await.unwrap(),
            before,
            "{mode:?}: copy unchanged"
        );
        assert_eq!(
            store.cursor("customers").await.unwrap().fresh_as_of_ms,
            5_000_000,
            "{mode:?}: a failed refresh leaves freshness alone"
        );
    }
    assert_eq!(
        store.reconcile_stats("customers").await.unwrap().runs_total,
        1
    );
    owner.set(Misbehave::None);
    let r = Refresher::new(&source, &store, &spec, 1)
        .with_clock(clock.clone())
        .run()
        .await
        .unwrap();
    assert_eq!(r.changed(), 3);
    assert_eq!(
        store.dump("customers").await.unwrap(),
        expected(&owner.snapshot())
    );
}

/// A scheduled copy that holds tombstones (left by an earlier strategy)
/// drops them, and a tombstoned key the owner has is restored.
#[tokio::test]
async fn tombstones_in_a_scheduled_copy_give_way_to_the_owner() {
    let m = manifest("strategy = \"events\"");
    let owner = Arc::new(OwnerState::default());
    owner.put("a", 3, "ada");
    let url = serve_owner(owner.clone()).await;
    let source = http_source(&m, &url, 10);
    let store = MemoryCopyStore::new();
    let spec = spec(&m);
    store.ensure_copy(&spec).await.unwrap();
    let tomb = |key: &str, version: Version| Change {
        dataset: "customers".into(),
        key: key.into(),
        version,
        op: Op::Delete,
        fields: Map::new(),
        owner: "customer-service".into(),
        ts: 1,
        schema_version: 1,
    };
    let advance = Advance {
        position: None,
        fresh_as_of_ms: None,
        from_feed: false,
    };
    store
        .apply("customers", &[tomb("a", 5), tomb("z", 2)], advance)
        .await
        .unwrap();
    let r = Refresher::new(&source, &store, &spec, 1)
        .run()
        .await
        .unwrap();
    assert_eq!((r.inserted, r.deleted), (1, 0), "{r:?}");
    assert_eq!(
        store.dump("customers").await.unwrap(),
        expected(&owner.snapshot())
    );
}

// ---------------------------------------------------------------------------
// The SQL source.

#[tokio::test]
async fn sql_snapshot_converges_with_deletes() {
    let Some(url) = spoke::testing::postgres_or_skip("sql_snapshot_converges_with_deletes").await
    else {
        return;
    };
    let schema = spoke::testing::unique_name("spoke_sched");
    spoke::testing::postgres_exec(
        &url,
        &format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.customers (id bigint PRIMARY KEY, row_version bigint NOT NULL, name text NOT NULL, email text NOT NULL, secret text);
             INSERT INTO {schema}.customers SELECT i, 1, 'n' || i, 'n' || i || '@example.com', 'owner only' FROM generate_series(1, 200) i;"
        ),
    )
    .await;
    let m = manifest("strategy = \"events\"");
    let spec = spec(&m);
    let source = PostgresSnapshot::new(
        "customers",
        url.clone(),
        "agent.owner_postgres.customers",
        &format!(
            "SELECT id AS key, row_version AS version, name, email, secret FROM {schema}.customers"
        ),
        spec.projection.clone(),
    );
    assert!(
        !format!("{source:?}").contains("host="),
        "the connection string is never printed"
    );
    let store = MemoryCopyStore::new();
    store.ensure_copy(&spec).await.unwrap();
    let result = async {
        let r = Refresher::new(&source, &store, &spec, 1)
            .run()
            .await
            .expect("fill");
        assert_eq!((r.listed, r.inserted), (200, 200));
        let dump = store.dump("customers").await.unwrap();
        assert_eq!(
            dump["7"].2,
            person("n7")
                .into_iter()
                .filter(|(k, _)| k != "secret")
                .collect::<Map<_, _>>()
        );

        spoke::testing::postgres_exec(
            &url,
            &format!(
                "UPDATE {schema}.customers SET name = 'renamed', row_version = 2 WHERE id = 5;
                 INSERT INTO {schema}.customers VALUES (900, 1, 'new', 'new@example.com', NULL);
                 DELETE FROM {schema}.customers WHERE id IN (10, 11);"
            ),
        )
        .await;
        let r = Refresher::new(&source, &store, &spec, 1)
            .run()
            .await
            .expect("refresh");
        assert_eq!(
            (r.inserted, r.updated, r.deleted, r.fetched),
            (1, 1, 2, 2),
            "{r:?}"
        );
        let dump = store.dump("customers").await.unwrap();
        assert_eq!(dump.len(), 199);
        assert_eq!(dump["5"].0, 2);
        assert_eq!(dump["5"].2["name"], json!("renamed"));
        assert_eq!(dump["900"].2["email"], json!("new@example.com"));
        assert!(!dump.contains_key("10") && !dump.contains_key("11"));
        let again = Refresher::new(&source, &store, &spec, 1)
            .run()
            .await
            .unwrap();
        assert_eq!((again.buckets_differing, again.fetched), (0, 0));

        // A query without a version column is a clear error, and changes nothing.
        let bad = PostgresSnapshot::new(
            "customers",
            url.clone(),
            "agent.owner_postgres.customers",
            &format!("SELECT id AS key, name, email FROM {schema}.customers"),
            spec.projection.clone(),
        );
        let e = Refresher::new(&bad, &store, &spec, 1)
            .run()
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("snapshot of customers from PostgreSQL (agent.owner_postgres.customers): listing keys and versions: column q.version does not exist"),
            "{msg}"
        );
        assert!(
            msg.contains("must return columns named key and version"),
            "{msg}"
        );
        assert!(!e.is_transient());
        // A NULL version is refused too.
        spoke::testing::postgres_exec(&url, &format!("ALTER TABLE {schema}.customers ALTER row_version DROP NOT NULL; UPDATE {schema}.customers SET row_version = NULL WHERE id = 3;")).await;
        let e = Refresher::new(&source, &store, &spec, 1)
            .run()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("key '3' has a NULL version"), "{e}");
        assert_eq!(
            store.dump("customers").await.unwrap(),
            dump,
            "copy unchanged"
        );
    };
    result.await;
    spoke::testing::postgres_exec(&url, &format!("DROP SCHEMA {schema} CASCADE")).await;
}

// ---------------------------------------------------------------------------
// The agent's schedules.

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_agent_refreshes_a_scheduled_copy_on_its_interval() {
    let owner = Arc::new(OwnerState::default());
    for i in 0..20 {
        owner.put(&format!("c{i:02}"), 1, &format!("n{i}"));
    }
    let url = serve_owner(owner.clone()).await;
    let m = Arc::new(manifest(&format!(
        "strategy = \"scheduled\"\ninterval = \"150ms\"\nsnapshot_url = \"{url}\""
    )));
    let store = Arc::new(MemoryCopyStore::new());
    let agent = Arc::new(
        Agent::new(
            m.clone(),
            "order-service",
            Arc::new(MemoryFeed::new(&m)),
            store.clone(),
        )
        .expect("an agent runs scheduled subscriptions"),
    );
    assert!(agent.missing_snapshot_sources().is_empty());
    agent.ensure_copies().await.unwrap();
    let (stop, shutdown) = shutdown_channel();
    let task = tokio::spawn(agent.clone().run(shutdown));

    eventually("the first refresh", || async {
        store.count("customers").await.unwrap_or(0) == 20
    })
    .await;
    let statuses = agent_http::statuses(&agent).await.unwrap();
    assert_eq!(statuses.len(), 1);
    let s = &statuses[0];
    assert_eq!(s.strategy, "scheduled");
    assert!(s.fresh_as_of.is_some() && s.within_budget, "{s:?}");
    assert!(
        s.reconcile.runs_total >= 1 && s.reconcile.last_run_ms > 0,
        "last refresh shown: {s:?}"
    );

    // The owner changes; nobody calls anything; the next refresh picks it up.
    owner.put("c03", 2, "renamed");
    owner.delete("c04");
    eventually("the next refresh", || async {
        let d = store.dump("customers").await.unwrap();
        d.get("c03").is_some_and(|r| r.0 == 2) && !d.contains_key("c04")
    })
    .await;
    let fresh_before = store.cursor("customers").await.unwrap().fresh_as_of_ms;
    eventually("freshness moving on", || async {
        store.cursor("customers").await.unwrap().fresh_as_of_ms > fresh_before
    })
    .await;

    // The owner fails: refreshes fail, freshness stops, status says why.
    owner.set(Misbehave::Down);
    eventually("the failure in status", || async {
        let s = agent_http::statuses(&agent).await.unwrap();
        s[0].last_error
            .as_deref()
            .is_some_and(|e| e.contains("answered HTTP 503"))
    })
    .await;
    let stuck = store.cursor("customers").await.unwrap().fresh_as_of_ms;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.cursor("customers").await.unwrap().fresh_as_of_ms,
        stuck
    );
    // It recovers by itself at a later interval.
    owner.set(Misbehave::None);
    eventually("recovery", || async {
        agent_http::statuses(&agent).await.unwrap()[0]
            .last_error
            .is_none()
            && store.cursor("customers").await.unwrap().fresh_as_of_ms > stuck
    })
    .await;
    stop.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the agent stops on shutdown")
        .unwrap()
        .unwrap();
}

/// The owner stays unreachable past the copy's budget: staleness rises
/// over it and status says so and why, while every record stays (an owner
/// that cannot be read is not an owner that deleted everything).
#[tokio::test]
async fn an_unreachable_owner_makes_the_copy_stale_never_empty() {
    let owner = Arc::new(OwnerState::default());
    for i in 0..20 {
        owner.put(&format!("c{i:02}"), 1, &format!("n{i}"));
    }
    let url = serve_owner(owner.clone()).await;
    let m = Arc::new(manifest_with_budget(
        "1s",
        &format!("strategy = \"scheduled\"\ninterval = \"100ms\"\nsnapshot_url = \"{url}\""),
    ));
    let store = Arc::new(MemoryCopyStore::new());
    let agent = Arc::new(
        Agent::new(
            m.clone(),
            "order-service",
            Arc::new(MemoryFeed::new(&m)),
            store.clone(),
        )
        .unwrap(),
    );
    agent.ensure_copies().await.unwrap();
    let (stop, shutdown) = shutdown_channel();
    let task = tokio::spawn(agent.clone().run(shutdown));
    eventually("the first refresh", || async {
        store.count("customers").await.unwrap_or(0) == 20
    })
    .await;
    assert!(agent_http::statuses(&agent).await.unwrap()[0].within_budget);

    owner.set(Misbehave::Down);
    eventually("staleness over the 1 s budget, reported", || async {
        let s = &agent_http::statuses(&agent).await.unwrap()[0];
        !s.within_budget
            && s.staleness_ms.is_some_and(|ms| ms > 1_000)
            && s.last_error.as_deref().is_some_and(|e| e.contains("503"))
    })
    .await;
    assert_eq!(
        store.count("customers").await.unwrap(),
        20,
        "nothing is deleted because the owner could not be read"
    );
    let copies = spoke::read::Copies::new(&m, "order-service", store.clone(), Clock::System);
    let read = copies
        .copy("customers")
        .unwrap()
        .get("c07")
        .await
        .unwrap()
        .unwrap();
    assert!(!read.within_budget && read.staleness_ms.is_some_and(|ms| ms > 1_000));
    assert_eq!(read.fields["name"], "n7");

    owner.set(Misbehave::None);
    eventually("back within budget", || async {
        agent_http::statuses(&agent).await.unwrap()[0].within_budget
    })
    .await;
    stop.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the agent stops on shutdown")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_scheduled_sql_subscription_without_a_connection_is_reported() {
    let m = Arc::new(manifest(
        "strategy = \"scheduled\"\ninterval = \"1m\"\nsnapshot_sql = \"SELECT id AS key, version, name, email FROM customers\"",
    ));
    let store = Arc::new(MemoryCopyStore::new());
    let agent = Agent::new(
        m.clone(),
        "order-service",
        Arc::new(MemoryFeed::new(&m)),
        store,
    )
    .unwrap();
    assert_eq!(agent.missing_snapshot_sources(), ["customers"]);
    let source = Arc::new(spoke::scheduled::memory::MemorySnapshot::new(
        "customers",
        spec(&m).projection,
    ));
    let agent = agent.with_snapshot_source("customers", source.clone() as Arc<dyn SnapshotSource>);
    assert!(agent.missing_snapshot_sources().is_empty());
}

#[tokio::test]
async fn reconcile_every_repairs_a_corrupted_copy_unasked() {
    let m = Arc::new(manifest(
        "strategy = \"events\"\nreconcile_every = \"200ms\"",
    ));
    let feed = Arc::new(MemoryFeed::new(&m));
    let batch: Vec<ChangeInput> = (0..50)
        .map(|i| ChangeInput::upsert(format!("c{i:02}"), 1, person(&format!("n{i}"))))
        .collect();
    feed.publish("customers", batch).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copies.db");
    let store = Arc::new(SqliteCopyStore::open(&path).unwrap());
    let agent =
        Arc::new(Agent::new(m.clone(), "order-service", feed.clone(), store.clone()).unwrap());
    agent.ensure_copies().await.unwrap();
    let (stop, shutdown) = shutdown_channel();
    let task = tokio::spawn(agent.clone().run(shutdown));
    eventually("bootstrap", || async {
        store.count("customers").await.unwrap_or(0) == 50
    })
    .await;
    let good = store.dump("customers").await.unwrap();

    // Corrupt the copy through the store's own API: lose a row, add a foreign one.
    assert_eq!(
        store
            .remove("customers", &[DigestEntry::new("c07", 1, false)])
            .await
            .unwrap(),
        1
    );
    let foreign = Change {
        dataset: "customers".into(),
        key: "intruder".into(),
        version: 9,
        op: Op::Upsert,
        fields: spec(&m).projection.apply(&person("x")),
        owner: "customer-service".into(),
        ts: 1,
        schema_version: 1,
    };
    store
        .apply(
            "customers",
            &[foreign],
            Advance {
                position: None,
                fresh_as_of_ms: None,
                from_feed: false,
            },
        )
        .await
        .unwrap();
    assert_ne!(store.dump("customers").await.unwrap(), good);

    eventually("the scheduled reconcile to repair the copy", || async {
        store.dump("customers").await.unwrap() == good
    })
    .await;
    eventually("the bookkeeping", || async {
        let s = store.reconcile_stats("customers").await.unwrap();
        s.repaired_missing_total == 1 && s.repaired_extra_total == 1
    })
    .await;
    let status = &agent_http::statuses(&agent).await.unwrap()[0];
    assert!(
        status.reconcile.runs_total >= 1 && status.reconcile.last_run_ms > 0,
        "{status:?}"
    );
    assert_eq!(
        status.reconcile.repaired_missing_total + status.reconcile.repaired_extra_total,
        2
    );
    // The follower kept going: a new change still arrives.
    feed.publish(
        "customers",
        vec![ChangeInput::upsert("c99", 1, person("late"))],
    )
    .await
    .unwrap();
    eventually("the follower", || async {
        store.get("customers", "c99").await.ok().flatten().is_some()
    })
    .await;
    stop.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the agent stops on shutdown")
        .unwrap()
        .unwrap();
}
