//! The agent's record endpoint with `max_staleness_ms`, and `ttl`
//! subscriptions served through their cache, over real HTTP.
//!
//! The agent is built and served but its followers are not started: the
//! test writes the copy itself and moves a manual clock, so "too stale" is
//! exact. The owner is an in-memory [`MemoryOwner`] that counts calls.

use std::sync::Arc;

use serde_json::{json, Value};
use spoke::agent::{http as agent_http, Agent};
use spoke::clock::Clock;
use spoke::copy::memory::MemoryCopyStore;
use spoke::copy::{Advance, CopyStore};
use spoke::feed::memory::MemoryFeed;
use spoke::hub::{self, Tokens};
use spoke::owner::memory::MemoryOwner;
use spoke_core::{Change, Manifest, Op};

const MANIFEST: &str = r#"
[services.customer-service]
[services.catalog-service]
[services.order-service]

[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string" }

[datasets.addresses]
owner = "customer-service"
key = "id"
fields = { city = "string" }

[datasets.products]
owner = "catalog-service"
key = "sku"
fields = { name = "string", unit_price_cents = "int" }

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name"]
strategy = "events"
staleness_budget = "1h"
owner_url = "http://customer-service.invalid/v1/customers/{key}"

[[subscriptions]]
consumer = "order-service"
dataset = "addresses"
fields = ["city"]
strategy = "events"
staleness_budget = "1h"

[[subscriptions]]
consumer = "order-service"
dataset = "products"
fields = ["name", "unit_price_cents"]
strategy = "ttl"
staleness_budget = "5m"
ttl = "1m"
negative_ttl = "10s"
owner_url = "http://catalog-service.invalid/v1/products/{key}"
"#;

const START: u64 = 1_700_000_000_000;

struct Running {
    base: String,
    http: reqwest::Client,
    clock: Clock,
    owner: Arc<MemoryOwner>,
    store: Arc<MemoryCopyStore>,
}

async fn start() -> Running {
    let manifest = Arc::new(Manifest::parse("m.toml", MANIFEST).expect("manifest"));
    let clock = Clock::manual(START);
    let store = Arc::new(MemoryCopyStore::with_clock(clock.clone()));
    let owner = Arc::new(MemoryOwner::new());
    let feed = Arc::new(MemoryFeed::with_clock(&manifest, clock.clone()));
    let agent = Arc::new(
        Agent::new(manifest, "order-service", feed, store.clone())
            .expect("agent with a ttl subscription")
            .with_clock(clock.clone())
            .with_owner_source(owner.clone()),
    );
    agent.ensure_copies().await.expect("copies");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(hub::serve(
        listener,
        agent_http::router(agent, Tokens::default()),
        std::future::pending(),
    ));
    Running {
        base,
        http: reqwest::Client::new(),
        clock,
        owner,
        store,
    }
}

impl Running {
    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let body = resp.text().await.expect("body");
        let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (status, v)
    }

    /// One upsert from "the feed", leaving the copy fresh as of now.
    async fn feed(&self, dataset: &str, key: &str, version: u64, fields: Value) {
        let change = Change {
            dataset: dataset.into(),
            key: key.into(),
            version,
            op: Op::Upsert,
            fields: fields.as_object().expect("object").clone(),
            owner: "customer-service".into(),
            ts: 1,
            schema_version: 1,
        };
        self.store
            .apply(
                dataset,
                &[change],
                Advance {
                    position: Some(version),
                    fresh_as_of_ms: Some(self.clock.now_ms()),
                    from_feed: true,
                },
            )
            .await
            .expect("apply");
    }
}

#[tokio::test]
async fn hostile_max_staleness_values_are_rejected_naming_the_parameter() {
    let a = start().await;
    a.feed("customers", "c1", 1, json!({"name": "Ada"})).await;
    let path = "/v1/copies/customers/records/c1";
    for q in [
        "max_staleness_ms=abc",
        "max_staleness_ms=-5",
        "max_staleness_ms=",
        "max_staleness_ms=1e3",
        "max_staleness_ms=+5",
        "max_staleness_ms=1.5",
        "max_staleness_ms=99999999999999999999999999",
        "max_staleness_ms=31536000001",
        "max_staleness_ms=%00",
        "max_staleness_ms=1&max_staleness_ms=2",
        "max_stale=5",
    ] {
        let (status, body) = a.get(&format!("{path}?{q}")).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert_eq!(body["kind"], "bad_request", "{q}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("max_staleness_ms") || msg.contains("max_stale"),
            "{q}: {msg}"
        );
    }
    let (status, body) = a.get(&format!("{path}?max_staleness_ms=31536000000")).await;
    assert_eq!(
        (status, body["source"].clone()),
        (200, json!("copy")),
        "the limit itself is accepted"
    );
    assert_eq!(a.owner.calls(), 0);
}

#[tokio::test]
async fn max_staleness_reads_locally_then_from_the_owner_then_fails_with_the_stale_value() {
    let a = start().await;
    a.feed("customers", "c1", 1, json!({"name": "Ada"})).await;
    a.feed("addresses", "c1", 1, json!({"city": "London"}))
        .await;
    a.owner.put(
        "customers",
        "c1",
        json!({"name": "Ada L.", "email": "x@y"}),
        Some(2),
    );
    a.clock.advance(5_000);
    let (status, body) = a
        .get("/v1/copies/customers/records/c1?max_staleness_ms=10000")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["source"].clone(), body["fields"].clone()),
        (json!("copy"), json!({"name": "Ada"}))
    );
    let (status, body) = a
        .get("/v1/copies/customers/records/c1?max_staleness_ms=1000")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["source"].clone(),
            body["version"].clone(),
            body["fields"].clone()
        ),
        (json!("owner"), json!(2), json!({"name": "Ada L."})),
        "only projected fields are served from the owner too"
    );
    // The copy was refreshed: a plain read now shows version 2.
    let (_, body) = a.get("/v1/copies/customers/records/c1").await;
    assert_eq!(body["version"], json!(2));
    // No owner_url: 503 with the stale value and its age.
    let (status, body) = a
        .get("/v1/copies/addresses/records/c1?max_staleness_ms=1000")
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["kind"], "too_stale");
    assert_eq!(body["staleness_ms"], json!(5_000));
    assert_eq!(body["max_staleness_ms"], json!(1_000));
    assert_eq!(body["value"]["fields"], json!({"city": "London"}));
    assert_eq!(body["owner_error"], Value::Null);
    assert!(
        body["error"].as_str().unwrap().contains("no owner_url"),
        "{body}"
    );
    // The owner down: 503 with the stale value and the owner's error.
    a.owner.set_failing(true);
    let (status, body) = a
        .get("/v1/copies/customers/records/c1?max_staleness_ms=1000")
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["value"]["version"], json!(2));
    assert!(
        body["owner_error"].as_str().unwrap().contains("HTTP 503"),
        "{body}"
    );
}

#[tokio::test]
async fn a_ttl_subscription_is_served_through_its_cache() {
    let a = start().await;
    a.owner.put(
        "products",
        "sku-1",
        json!({"name": "Pen", "unit_price_cents": 150, "stock": 4}),
        Some(3),
    );
    let path = "/v1/copies/products/records/sku-1";
    let (status, body) = a.get(path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["source"].clone(),
            body["fields"].clone(),
            body["version"].clone()
        ),
        (
            json!("owner"),
            json!({"name": "Pen", "unit_price_cents": 150}),
            json!(3)
        )
    );
    a.clock.advance(30_000);
    let (_, body) = a.get(path).await;
    assert_eq!(
        (body["source"].clone(), body["staleness_ms"].clone()),
        (json!("cache"), json!(30_000))
    );
    assert_eq!(a.owner.calls(), 1);
    let (_, body) = a.get(&format!("{path}?max_staleness_ms=10000")).await;
    assert_eq!(body["source"], json!("owner"), "{body}");
    assert_eq!(a.owner.calls(), 2);
    // A missing key is a 404 that names the owner, remembered for negative_ttl.
    let (status, body) = a.get("/v1/copies/products/records/ghost").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("at the owner of products"),
        "{body}"
    );
    a.get("/v1/copies/products/records/ghost").await;
    assert_eq!(a.owner.calls_for("ghost"), 1);
    // Owner down and nothing cached: 502 naming the owner's failure.
    a.owner.set_failing(true);
    let (status, body) = a.get("/v1/copies/products/records/sku-2").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["kind"], "owner_unavailable");
    // A cache has no digest.
    let (status, body) = a.get("/v1/copies/products/digest").await;
    assert_eq!((status, body["kind"].clone()), (404, json!("not_stored")));
    // Status and metrics show the cache.
    let (status, body) = a.get("/v1/status").await;
    assert_eq!(status, 200, "{body}");
    let products = body["copies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["dataset"] == "products")
        .expect("products in status")
        .clone();
    assert_eq!(products["strategy"], "ttl");
    assert_eq!(products["cache"]["hits_total"], json!(2), "{products}");
    assert_eq!(
        products["cache"]["owner_calls_total"],
        json!(4),
        "{products}"
    );
    let metrics = a
        .http
        .get(format!("{}/metrics", a.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("spoke_cache_hits_total{dataset=\"products\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spoke_cache_owner_errors_total{dataset=\"products\"} 1"),
        "{metrics}"
    );
}
