//! Schema drift end to end (DESIGN.md rule 7): the owner registers a schema
//! version that drops a field a consumer projects. The registry refuses it
//! until the owner acknowledges the break; then the consumer's agent
//! quarantines the changes its copy cannot hold, the copy stays at its last
//! good state, and status says why it stopped being fresh. After the
//! consumer narrows its projection and restarts, a replay applies the held
//! changes and the copy is fresh again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use spoke::agent::{http as agent_http, Agent, AgentOptions};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{CopySpec, CopyStore};
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Publisher};
use spoke::hub::{self, Tokens};
use spoke::registry::SchemaRegistry;
use spoke::shutdown::shutdown_channel;
use spoke_core::Manifest;

const V1: &str = r#"
[services.customer-service]
[services.order-service]

[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string", tier = "string?" }

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "email"]
strategy = "events"
staleness_budget = "2s"
"#;

/// The consumer's manifest after it learned of version 2: the schema without
/// `email` and a subscription that no longer projects it.
const V2: &str = r#"
[services.customer-service]
[services.order-service]

[datasets.customers]
owner = "customer-service"
key = "id"
schema_version = 2
fields = { name = "string", tier = "string?", loyalty = "int?" }

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name"]
strategy = "events"
staleness_budget = "2s"
"#;

const DEADLINE: Duration = Duration::from_secs(20);

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("object")
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

struct RunningAgent {
    base: String,
    stop: spoke::shutdown::ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<(), spoke::copy::StoreError>>,
}

async fn start_agent(manifest: &str, hub: &str, copies: &std::path::Path) -> RunningAgent {
    let manifest = Arc::new(Manifest::parse("consumer.toml", manifest).expect("manifest"));
    let agent = Arc::new(
        Agent::new(
            manifest,
            "order-service",
            Arc::new(HubClient::new(hub, None)),
            Arc::new(SqliteCopyStore::open(copies).expect("store")),
        )
        .expect("agent")
        .with_options(AgentOptions {
            wait: Duration::from_millis(100),
            ..AgentOptions::default()
        }),
    );
    agent.ensure_copies().await.expect("copies");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(hub::serve(
        listener,
        agent_http::router(agent.clone(), Tokens::default()),
        std::future::pending(),
    ));
    let (stop, shutdown) = shutdown_channel();
    let task = tokio::spawn(agent.run(shutdown));
    RunningAgent { base, stop, task }
}

async fn status(agent: &str) -> Value {
    let s: Value = reqwest::get(format!("{agent}/v1/status"))
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    s["copies"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_projected_field_is_quarantined_then_replayed_after_the_consumer_adapts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let owner_manifest = Arc::new(Manifest::parse("owner.toml", V1).expect("manifest"));
    let feed =
        Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &owner_manifest).expect("hub"));
    let registry = SchemaRegistry::open(Some(&dir.path().join("hub")), owner_manifest.clone(), 1)
        .expect("registry")
        .with_catalog(feed.catalog().expect("catalog").clone())
        .expect("catalog");
    let router = hub::router_with_registry(
        feed,
        owner_manifest.clone(),
        Tokens::default(),
        Arc::new(registry),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hub_base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(hub::serve(listener, router, std::future::pending()));
    let owner = HubClient::new(&hub_base, None);
    let http = reqwest::Client::new();

    // Version 1: two customers reach the copy.
    owner
        .publish(
            "customers",
            vec![
                ChangeInput::upsert("c1", 1, fields(json!({"name": "Ada", "email": "ada@x"}))),
                ChangeInput::upsert("c2", 1, fields(json!({"name": "Bob", "email": "bob@x"}))),
            ],
        )
        .await
        .expect("publish v1");
    let copies = dir.path().join("copies.db");
    let agent = start_agent(V1, &hub_base, &copies).await;
    wait_for("the copy to hold version 1", async || {
        let s = status(&agent.base).await;
        s["records"] == 2 && s["within_budget"] == true
    })
    .await;

    // The owner drops email. The registry names the subscription it breaks
    // and stores nothing...
    let v2 =
        json!({"version": 2, "fields": {"name": "string", "tier": "string?", "loyalty": "int?"}});
    let r = http
        .post(format!("{hub_base}/v1/datasets/customers/schema"))
        .json(&v2)
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["kind"], "incompatible_schema");
    assert_eq!(body["breaks"][0]["consumer"], "order-service");
    assert_eq!(body["breaks"][0]["field"], "email");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("field 'email' is removed, but order-service projects it"),
        "{body}"
    );
    let no_email = fields(json!({"name": "Ada Lovelace"}));
    owner
        .publish(
            "customers",
            vec![ChangeInput::upsert("c1", 2, no_email.clone())],
        )
        .await
        .expect_err("version 1 still requires email");

    // ...until the owner acknowledges the break.
    let mut ack = v2.clone();
    ack["accept_breaking"] = json!(true);
    let r = http
        .post(format!("{hub_base}/v1/datasets/customers/schema"))
        .json(&ack)
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["added"], json!(["loyalty"]));
    let versions: Value = http
        .get(format!("{hub_base}/v1/datasets/customers/schema/versions"))
        .send()
        .await
        .expect("versions")
        .json()
        .await
        .expect("json");
    assert_eq!(versions["versions"].as_array().map(Vec::len), Some(2));

    // Changes under version 2: c1 updated without email, c3 new without
    // email, c2 deleted (a delete fits any projection).
    owner
        .publish(
            "customers",
            vec![
                ChangeInput::upsert("c1", 2, no_email),
                ChangeInput::upsert("c3", 1, fields(json!({"name": "Cy", "loyalty": 3}))),
                ChangeInput::delete("c2", 2),
            ],
        )
        .await
        .expect("publish v2");
    // Held first, then the batch (and its position) applied.
    wait_for(
        "the changes to be quarantined and the batch applied",
        async || {
            let s = status(&agent.base).await;
            s["quarantined"] == 2 && s["position"] == 5
        },
    )
    .await;
    let s = status(&agent.base).await;
    let reason = s["quarantine_reason"].as_str().expect("reason");
    assert!(
        reason.contains(
            "key 'c1' version 2 (owner schema v2, while this consumer's manifest has v1)"
        ) && reason.contains("required field 'email' is missing"),
        "{reason}"
    );
    assert_eq!(s["new_fields"], json!(["loyalty", "tier"]), "{s}");
    // The copy is intact: c1 at its last good version, no half-applied c3;
    // the delete of c2, which fits, went through.
    let store = SqliteCopyStore::open(&copies).expect("store");
    let dump = store.dump("customers").await.expect("dump");
    assert_eq!(dump["c1"].0, 1);
    assert_eq!(dump["c1"].2["email"], "ada@x");
    assert!(!dump.contains_key("c3"));
    assert!(dump["c2"].1, "c2 is a tombstone");
    // Staleness shows it: freshness stopped advancing, so the copy falls
    // out of its 2 s budget even though the feed is fully read.
    wait_for("the copy to fall out of budget", async || {
        status(&agent.base).await["within_budget"] == false
    })
    .await;
    let metrics = reqwest::get(format!("{}/metrics", agent.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("spoke_quarantined_changes{dataset=\"customers\"} 2"),
        "{metrics}"
    );

    // Replay with the old projection changes nothing.
    let v1_manifest = Manifest::parse("consumer.toml", V1).expect("manifest");
    let v1_spec = CopySpec::of(&v1_manifest, &v1_manifest.subscriptions[0]).expect("spec");
    let r = spoke::quarantine::replay(&store, &v1_spec, 1)
        .await
        .expect("replay");
    assert_eq!((r.applied, r.still_held.len()), (0, 2));

    // The consumer adapts: manifest version 2, email no longer projected.
    // The restarted agent narrows the copy in place; replay applies the
    // held changes; the copy is fresh again.
    agent.stop.fire();
    agent.task.await.expect("join").expect("agent");
    let agent = start_agent(V2, &hub_base, &copies).await;
    let v2_manifest = Manifest::parse("consumer.toml", V2).expect("manifest");
    let v2_spec = CopySpec::of(&v2_manifest, &v2_manifest.subscriptions[0]).expect("spec");
    let store = SqliteCopyStore::open(&copies).expect("store");
    let r = spoke::quarantine::replay(&store, &v2_spec, 2)
        .await
        .expect("replay");
    assert_eq!((r.applied, r.superseded, r.still_held.len()), (2, 0, 0));
    wait_for("the copy to be fresh again", async || {
        let s = status(&agent.base).await;
        s["quarantined"] == 0 && s["within_budget"] == true
    })
    .await;
    let dump = store.dump("customers").await.expect("dump");
    let got: BTreeMap<&str, (u64, Value)> = dump
        .iter()
        .filter(|(_, (_, deleted, _))| !deleted)
        .map(|(k, (v, _, f))| (k.as_str(), (*v, Value::Object(f.clone()))))
        .collect();
    assert_eq!(
        got,
        BTreeMap::from([
            ("c1", (2, json!({"name": "Ada Lovelace"}))),
            ("c3", (1, json!({"name": "Cy"}))),
        ])
    );
    agent.stop.fire();
    agent.task.await.expect("join").expect("agent");
}
