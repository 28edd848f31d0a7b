//! A PostgreSQL copy rides out its server restarting while the agent applies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use spoke::agent::{Agent, AgentOptions};
use spoke::copy::postgres::{PostgresCopyStore, PostgresOptions};
use spoke::copy::CopyStore;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Feed, Publisher};
use spoke::shutdown::shutdown_channel;
use spoke::testing::PrivatePostgres;
use spoke_core::{Change, Manifest, MemoryCopy};

const MANIFEST: &str = r#"
[services.customer-service]
[services.order-service]
[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string", tier = "int?" }
[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "tier"]
staleness_budget = "1m"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_postgres_restarts_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = PrivatePostgres::start(&dir.path().join("pg")) else {
        return;
    };
    let m = Arc::new(Manifest::parse("m.toml", MANIFEST).unwrap());
    let feed = Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &m).unwrap());
    let store = Arc::new(
        PostgresCopyStore::open(PostgresOptions {
            url: pg.url(),
            schema: "copies".into(),
            readers: vec![],
        })
        .await
        .unwrap(),
    );
    let agent = Arc::new(
        Agent::new(m.clone(), "order-service", feed.clone(), store.clone())
            .unwrap()
            .with_options(AgentOptions {
                batch: 50,
                wait: Duration::from_millis(100),
                backoff_max: Duration::from_millis(300),
                ..Default::default()
            }),
    );
    let (trigger, shutdown) = shutdown_channel();
    let running = tokio::spawn(agent.run(shutdown));
    // Publish only once the (empty) bootstrap is done, so every change
    // arrives through the log and the received count can be checked exactly.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(store.cursor("customers").await, Ok(c) if c.position.is_some()) {
        assert!(Instant::now() < deadline, "the agent never bootstrapped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut expected = MemoryCopy::new();
    let mut versions = [0u64; 40];
    for batch_no in 0..150u64 {
        let batch: Vec<ChangeInput> = (0..20u64)
            .map(|j| {
                let k = ((batch_no * 20 + j) * 7 % 40) as usize;
                versions[k] += 1;
                let v = versions[k];
                if v % 5 == 0 {
                    ChangeInput::delete(format!("c{k}"), v)
                } else {
                    ChangeInput::upsert(
                        format!("c{k}"),
                        v,
                        json!({"name": format!("n{k}v{v}"), "email": "e", "tier": v})
                            .as_object()
                            .cloned()
                            .unwrap(),
                    )
                }
            })
            .collect();
        feed.publish("customers", batch.clone()).await.unwrap();
        for c in batch {
            let fields = if c.fields.is_empty() {
                c.fields
            } else {
                json!({"name": c.fields["name"], "tier": c.fields["tier"]})
                    .as_object()
                    .cloned()
                    .unwrap()
            };
            expected.apply(
                &Change {
                    dataset: "customers".into(),
                    key: c.key,
                    version: c.version,
                    op: c.op,
                    fields,
                    owner: "customer-service".into(),
                    ts: 0,
                    schema_version: 1,
                },
                0,
            );
        }
        if batch_no == 60 {
            // The agent is mid-stream: take the server down hard and bring it back.
            pg.crash_restart(Duration::from_millis(800));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let head = feed
        .read("customers", 0, 1, Duration::ZERO)
        .await
        .unwrap()
        .head;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match store.cursor("customers").await {
            Ok(c) if c.position == Some(head) => break,
            other => assert!(
                Instant::now() < deadline,
                "copy never caught up to {head}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dump = store.dump("customers").await.unwrap();
    let live: std::collections::BTreeMap<&str, (u64, &serde_json::Map<String, serde_json::Value>)> =
        dump.iter()
            .filter(|(_, v)| !v.1)
            .map(|(k, v)| (k.as_str(), (v.0, &v.2)))
            .collect();
    assert_eq!(live, expected.live(), "the copy equals the owner's state");
    assert_eq!(
        store.cursor("customers").await.unwrap().received_total,
        head,
        "nothing lost or received twice across the restart"
    );
    trigger.fire();
    running.await.unwrap().unwrap();
}
