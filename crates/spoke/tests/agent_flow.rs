//! The agent end to end, in-process: a hub (router over an SQLite feed)
//! served on 127.0.0.1:0, an agent following it over HTTP into an SQLite
//! copy store, and the agent's own HTTP API on 127.0.0.1:0.
//!
//! - Data published before the agent starts arrives by bootstrap; later
//!   changes by tailing; deletes remove; only projected fields are stored
//!   or served (rule 6); reads carry freshness; status and metrics count.
//! - Convergence (rule 1) at system level: random batches with duplicates,
//!   re-sends and reordering, published while the agent bootstraps and tails,
//!   end in a copy equal to the hub's state and to the model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use spoke::agent::{http as agent_http, Agent, AgentOptions};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::CopyStore;
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Feed, Publisher};
use spoke::hub::{self, Tokens};
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke_core::{Manifest, Op, Projection, Version};

const MANIFEST: &str = r#"
[services.customer-service]
[services.catalog-service]
[services.order-service]

[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string", preferred_name = "string?", payment_method_id = "string" }

[datasets.products]
owner = "catalog-service"
key = "sku"
fields = { name = "string", unit_price_cents = "int" }

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "email"]
strategy = "events"
staleness_budget = "1h"

[[subscriptions]]
consumer = "order-service"
dataset = "products"
fields = ["name", "unit_price_cents"]
strategy = "none"
"#;

const DEADLINE: Duration = Duration::from_secs(60);

type Dump = BTreeMap<String, (Version, bool, Map<String, Value>)>;

struct Hub {
    client: HubClient,
    _dir: tempfile::TempDir,
}

async fn start_hub(manifest: &Manifest) -> Hub {
    let dir = tempfile::tempdir().expect("tempdir");
    let feed = Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), manifest).expect("hub store"));
    let router = hub::router(feed, Arc::new(manifest.clone()), Tokens::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(hub::serve(listener, router, std::future::pending()));
    Hub {
        client: HubClient::new(&base, None),
        _dir: dir,
    }
}

struct RunningAgent {
    base: String,
    store_path: std::path::PathBuf,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<(), spoke::copy::StoreError>>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start_agent(manifest: &Manifest, hub: &Hub, options: AgentOptions) -> RunningAgent {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_path = dir.path().join("copies.db");
    let store = Arc::new(SqliteCopyStore::open(&store_path).expect("copy store"));
    let feed = Arc::new(hub.client.clone());
    let agent = Arc::new(
        Agent::new(Arc::new(manifest.clone()), "order-service", feed, store)
            .expect("agent")
            .with_options(options),
    );
    let (trigger, shutdown) = shutdown_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(hub::serve(
        listener,
        agent_http::router(agent.clone(), Tokens::default()),
        shutdown.clone().signal(),
    ));
    let task = tokio::spawn(agent.run(shutdown));
    RunningAgent {
        base,
        store_path,
        trigger,
        task,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        _dir: dir,
    }
}

impl RunningAgent {
    async fn get(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    async fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path).await;
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        (status, v)
    }

    /// Polls until the copy's position reaches `head` and it has been fresh.
    async fn wait_caught_up(&self, head: u64) -> Value {
        let start = Instant::now();
        loop {
            // Until the agent has created its copies, status answers 503.
            let (status, v) = self.get_json("/v1/status").await;
            let s = v["copies"][0].clone();
            // `head` is sampled apart from the cursor, so one answer can
            // show a position past the head; wait for both.
            if status == 200
                && s["position"] == head
                && s["head"] == head
                && s["fresh_as_of"].is_string()
            {
                return s;
            }
            assert!(
                status == 200 || status == 503,
                "status answered {status}: {v}"
            );
            assert!(
                start.elapsed() < DEADLINE,
                "the copy did not catch up to {head} within {DEADLINE:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn dump(&self) -> Dump {
        SqliteCopyStore::open_read_only(&self.store_path)
            .expect("read-only store")
            .dump("customers")
            .await
            .expect("dump")
    }

    async fn stop(self) {
        self.trigger.fire();
        self.task
            .await
            .expect("agent task")
            .expect("agent run ends cleanly");
    }
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("object")
}

fn customer(name: &str, email: &str, pm: &str) -> Map<String, Value> {
    obj(
        json!({ "name": name, "email": email, "preferred_name": format!("{name}-pref"), "payment_method_id": pm }),
    )
}

fn projection(manifest: &Manifest) -> Projection {
    Projection::new(
        &manifest.datasets["customers"].schema,
        &["name".to_owned(), "email".to_owned()],
    )
    .expect("projection")
}

/// The hub's compacted state, as the copy should hold it: projected fields
/// for live records, tombstones with their versions.
async fn hub_state(hub: &Hub, projection: &Projection) -> Dump {
    let mut out = Dump::new();
    let mut after: Option<String> = None;
    loop {
        let page = hub
            .client
            .snapshot("customers", after.as_deref(), 1_000)
            .await
            .expect("snapshot");
        for c in page.records {
            let deleted = c.op == Op::Delete;
            let fields = if deleted {
                Map::new()
            } else {
                projection.apply(&c.fields)
            };
            out.insert(c.key, (c.version, deleted, fields));
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => return out,
        }
    }
}

async fn head(hub: &Hub) -> u64 {
    hub.client
        .read("customers", 0, 1, Duration::ZERO)
        .await
        .expect("read")
        .head
}

fn metric(metrics: &str, name: &str) -> String {
    let prefix = format!("{name}{{dataset=\"customers\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} for customers in:\n{metrics}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bootstrap_tail_projection_freshness_status_and_metrics() {
    let manifest = Manifest::parse("agent_flow.toml", MANIFEST).expect("manifest");
    let projection = projection(&manifest);
    let hub = start_hub(&manifest).await;

    // Before the agent exists: 30 customers, a rename and a delete.
    let batch: Vec<ChangeInput> = (1..=30)
        .map(|i| {
            ChangeInput::upsert(
                format!("c{i:02}"),
                1,
                customer(
                    &format!("Customer {i}"),
                    &format!("c{i}@shop.test"),
                    &format!("pm_secret_{i}"),
                ),
            )
        })
        .collect();
    hub.client
        .publish("customers", batch)
        .await
        .expect("publish");
    let r = hub
        .client
        .publish(
            "customers",
            vec![
                ChangeInput::upsert(
                    "c01",
                    2,
                    customer("Ada Lovelace", "ada@shop.test", "pm_secret_1"),
                ),
                ChangeInput::delete("c05", 2),
            ],
        )
        .await
        .expect("publish");
    assert_eq!(r.head, 32);

    // Small pages, so the bootstrap takes several snapshot pages.
    let agent = start_agent(
        &manifest,
        &hub,
        AgentOptions {
            batch: 7,
            wait: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    let s = agent.wait_caught_up(32).await;
    assert_eq!(
        s["received_total"], 0,
        "bootstrap records are not feed entries: {s}"
    );
    assert_eq!(
        s["applied_total"], 30,
        "29 live records and 1 tombstone were applied by bootstrap: {s}"
    );
    assert_eq!(
        s["records"], 29,
        "the record deleted before the agent started is not there: {s}"
    );
    assert_eq!(
        agent.dump().await,
        hub_state(&hub, &projection).await,
        "bootstrapped copy equals the hub"
    );

    // A record: projected fields only, version, freshness.
    let (status, body) = agent.get("/v1/copies/customers/records/c01").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains("payment_method_id") && !body.contains("pm_secret"),
        "a field not projected never leaves the owner: {body}"
    );
    assert!(
        !body.contains("preferred_name"),
        "only declared fields: {body}"
    );
    let rec: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        rec["fields"],
        json!({ "name": "Ada Lovelace", "email": "ada@shop.test" })
    );
    assert_eq!(rec["version"], 2);
    assert_eq!(rec["key"], "c01");
    let fresh = rec["fresh_as_of"]
        .as_str()
        .expect("fresh_as_of is RFC 3339 text");
    assert!(
        fresh.len() == 24 && fresh.ends_with('Z') && fresh.as_bytes()[10] == b'T',
        "{fresh}"
    );
    assert!(rec["staleness_ms"].is_u64(), "{rec}");
    assert!(rec["staleness_ms"].as_u64() < Some(3_600_000));
    assert_eq!(rec["within_budget"], true);

    // The copy on disk has no column for the unprojected fields either.
    {
        let conn = rusqlite::Connection::open_with_flags(
            &agent.store_path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open copy");
        let mut stmt = conn
            .prepare("SELECT name FROM pragma_table_info('_spoke_copy_customers')")
            .expect("pragma");
        let cols: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert!(
            cols.contains(&"name".to_owned()) && cols.contains(&"email".to_owned()),
            "{cols:?}"
        );
        assert!(
            !cols
                .iter()
                .any(|c| c == "payment_method_id" || c == "preferred_name"),
            "{cols:?}"
        );
    }

    // Misses and bad requests.
    for (path, want, kind) in [
        ("/v1/copies/customers/records/c05", 404, "not_found"),
        ("/v1/copies/customers/records/nobody", 404, "not_found"),
        ("/v1/copies/products/records/sku1", 404, "unknown_copy"),
        ("/v1/copies/nope/records/x", 404, "unknown_copy"),
        ("/v1/copies/customers/records/a%01b", 400, "bad_request"),
        ("/v1/copies/customers/records/a%0Ab", 400, "bad_request"),
    ] {
        let (status, v) = agent.get_json(path).await;
        assert_eq!(status, want, "{path}: {v}");
        assert_eq!(v["kind"], kind, "{path}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {v}"
        );
    }
    let (status, v) = agent
        .get_json(&format!("/v1/copies/customers/records/{}", "k".repeat(513)))
        .await;
    assert_eq!(
        (status, v["kind"].as_str()),
        (400, Some("bad_request")),
        "513-byte key: {v}"
    );

    // Tailing: a rename, a new record, a delete, a re-creation after delete,
    // and a stale change the hub ignores.
    let r = hub
        .client
        .publish(
            "customers",
            vec![
                ChangeInput::upsert(
                    "c01",
                    3,
                    customer("Ada King", "ada@shop.test", "pm_secret_1"),
                ),
                ChangeInput::upsert(
                    "c40",
                    1,
                    customer("Newcomer", "new@shop.test", "pm_secret_40"),
                ),
                ChangeInput::delete("c02", 2),
                ChangeInput::upsert(
                    "c05",
                    3,
                    customer("Back Again", "back@shop.test", "pm_secret_5"),
                ),
                ChangeInput::upsert("c03", 1, customer("Stale", "stale@shop.test", "pm_x")),
            ],
        )
        .await
        .expect("publish");
    assert_eq!((r.head, r.ignored), (36, 1));
    let s = agent.wait_caught_up(36).await;
    let (_, rec) = agent.get_json("/v1/copies/customers/records/c01").await;
    assert_eq!(
        (rec["fields"]["name"].as_str(), rec["version"].as_u64()),
        (Some("Ada King"), Some(3))
    );
    let (_, rec) = agent.get_json("/v1/copies/customers/records/c40").await;
    assert_eq!(
        rec["fields"],
        json!({ "name": "Newcomer", "email": "new@shop.test" })
    );
    let (status, _) = agent.get("/v1/copies/customers/records/c02").await;
    assert_eq!(status, 404, "a delete removes the record");
    let (_, rec) = agent.get_json("/v1/copies/customers/records/c05").await;
    assert_eq!(
        (rec["fields"]["name"].as_str(), rec["version"].as_u64()),
        (Some("Back Again"), Some(3)),
        "re-created after its tombstone"
    );
    let (_, rec) = agent.get_json("/v1/copies/customers/records/c03").await;
    assert_eq!(
        rec["fields"]["name"], "Customer 3",
        "the stale change never reached the copy"
    );
    assert_eq!(
        agent.dump().await,
        hub_state(&hub, &projection).await,
        "tailed copy equals the hub"
    );

    // Status: one copy (the `none` subscription is not a copy), every number.
    let (_, full) = agent.get_json("/v1/status").await;
    assert_eq!(full["consumer"], "order-service");
    assert_eq!(full["copies"].as_array().map(Vec::len), Some(1), "{full}");
    for (field, want) in [
        ("dataset", json!("customers")),
        ("owner", json!("customer-service")),
        ("strategy", json!("events")),
        ("staleness_budget", json!("1h")),
        ("position", json!(36)),
        ("head", json!(36)),
        ("lag_positions", json!(0)),
        ("records", json!(30)),
        ("applied_total", json!(34)),
        ("received_total", json!(4)),
        ("within_budget", json!(true)),
        ("last_error", Value::Null),
    ] {
        assert_eq!(s[field], want, "status.{field}: {s}");
    }

    // Metrics: the same numbers in Prometheus text format.
    let resp = agent
        .http
        .get(format!("{}/metrics", agent.base))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let metrics = resp.text().await.expect("text");
    for (name, want) in [
        ("spoke_applied_changes_total", "34"),
        ("spoke_received_changes_total", "4"),
        ("spoke_feed_lag_positions", "0"),
        ("spoke_copy_records", "30"),
        ("spoke_within_budget", "1"),
        ("spoke_staleness_budget_seconds", "3600"),
        ("spoke_budget_breaches_total", "0"),
        ("spoke_copy_error", "0"),
    ] {
        assert_eq!(metric(&metrics, name), want, "{name}");
    }
    let staleness: f64 = metric(&metrics, "spoke_staleness_seconds")
        .parse()
        .expect("staleness is a number");
    assert!((0.0..3600.0).contains(&staleness), "{staleness}");
    assert!(
        metrics.contains("# TYPE spoke_applied_changes_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE spoke_feed_lag_positions gauge"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("products"),
        "only copies are reported: {metrics}"
    );

    agent.stop().await;
}

/// One change of the model's history.
#[derive(Clone, Debug)]
struct Step {
    key: String,
    version: Version,
    fields: Option<Map<String, Value>>,
}

impl Step {
    fn input(&self) -> ChangeInput {
        match &self.fields {
            Some(f) => ChangeInput::upsert(self.key.clone(), self.version, f.clone()),
            None => ChangeInput::delete(self.key.clone(), self.version),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_duplicated_reordered_batches_converge_to_the_hub_state() {
    let seed = std::env::var("SPOKE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let manifest = Manifest::parse("agent_flow.toml", MANIFEST).expect("manifest");
    let projection = projection(&manifest);
    let hub = start_hub(&manifest).await;

    // Every key's full history; the owner's truth is each key's last step.
    let mut history: Vec<Step> = Vec::new();
    let mut truth: BTreeMap<String, Step> = BTreeMap::new();
    for k in 0..80 {
        let key = format!("k{k:03}");
        for version in 1..=rng.u64(1..=8) {
            let fields = (rng.u8(..4) != 0).then(|| {
                customer(
                    &format!("{key} v{version}"),
                    &format!("{key}.{version}@shop.test"),
                    &format!("pm_{version}"),
                )
            });
            let step = Step {
                key: key.clone(),
                version,
                fields,
            };
            truth.insert(key.clone(), step.clone());
            history.push(step);
        }
    }

    // Batches drawn out of order, with duplicates inside a batch and whole
    // batches re-sent; every step goes out at least once.
    rng.shuffle(&mut history);
    let mut batches: Vec<Vec<ChangeInput>> = Vec::new();
    let mut sent: Vec<ChangeInput> = Vec::new();
    let mut rest = history.as_slice();
    while !rest.is_empty() {
        let take = rng.usize(1..=25).min(rest.len());
        let mut batch: Vec<ChangeInput> = rest[..take].iter().map(Step::input).collect();
        rest = &rest[take..];
        for _ in 0..rng.usize(0..5) {
            if !sent.is_empty() {
                batch.insert(
                    rng.usize(..=batch.len()),
                    sent[rng.usize(..sent.len())].clone(),
                );
            }
        }
        if let Some(dup) = batch.first().cloned() {
            batch.push(dup);
        }
        sent.extend(batch.iter().cloned());
        batches.push(batch.clone());
        if rng.u8(..5) == 0 {
            let again = batches[rng.usize(..batches.len())].clone();
            batches.push(again);
        }
    }
    let total = batches.len();

    // A third goes out before the agent starts; the rest while it
    // bootstraps (in small pages) and tails.
    let mut ignored = 0;
    let mut it = batches.into_iter();
    for batch in it.by_ref().take(total / 3) {
        ignored += hub
            .client
            .publish("customers", batch)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: publish: {e}"))
            .ignored;
    }
    let agent = start_agent(
        &manifest,
        &hub,
        AgentOptions {
            batch: 5,
            wait: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .await;
    for batch in it {
        ignored += hub
            .client
            .publish("customers", batch)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: publish: {e}"))
            .ignored;
        if rng.bool() {
            tokio::time::sleep(Duration::from_millis(rng.u64(0..5))).await;
        }
    }
    assert!(
        ignored > 0,
        "seed {seed}: the run exercised duplicates and stale re-sends"
    );

    let head = head(&hub).await;
    let s = agent.wait_caught_up(head).await;
    let hub_now = hub_state(&hub, &projection).await;
    let expected: Dump = truth
        .values()
        .map(|s| {
            let fields = s
                .fields
                .as_ref()
                .map(|f| projection.apply(f))
                .unwrap_or_default();
            (s.key.clone(), (s.version, s.fields.is_none(), fields))
        })
        .collect();
    assert_eq!(
        hub_now, expected,
        "seed {seed}: the hub holds each key's latest version"
    );
    assert_eq!(
        agent.dump().await,
        hub_now,
        "seed {seed}: the copy equals the hub state, key by key with versions and tombstones"
    );
    let live = expected.values().filter(|(_, deleted, _)| !deleted).count();
    assert_eq!(s["records"], live, "seed {seed}: {s}");
    assert_eq!(s["last_error"], Value::Null, "seed {seed}: {s}");
    agent.stop().await;
}
