//! JetStream against nats-server processes this test starts itself: NATS's
//! own permissions refusing a non-owner, a server killed and restarted while
//! changes flow, and a three-node cluster losing a node mid-stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use spoke::agent::{Agent, AgentOptions};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::CopyStore;
use spoke::feed::jetstream::permissions::{authorization_block, ADMIN_USER};
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::feed::{ChangeInput, Feed, Publisher};
use spoke::shutdown::shutdown_channel;
use spoke::testing::{free_port, in_ci, nats_server_bin, NatsServer};
use spoke_core::{Manifest, MemoryCopy};

const MANIFEST: &str = r#"
[services.customer-service]
[services.order-service]
[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string" }
[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name"]
staleness_budget = "1m"
"#;

fn manifest() -> Manifest {
    Manifest::parse("m.toml", MANIFEST).unwrap()
}

fn have_server(test: &str) -> bool {
    if nats_server_bin().is_some() {
        return true;
    }
    assert!(!in_ci(), "{test}: nats-server is required under CI=true");
    eprintln!("SKIPPED {test}: nats-server not found");
    false
}

fn options(url: &str, user: Option<(&str, &str)>) -> JetStreamOptions {
    let mut o = JetStreamOptions::new(url);
    if let Some((u, p)) = user {
        o.user = Some(u.to_owned());
        o.password = Some(p.to_owned());
    }
    o
}

async fn connect_retrying(o: JetStreamOptions, m: &Manifest) -> JetStreamFeed {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        match JetStreamFeed::connect(o.clone(), m).await {
            Ok(f) => return f,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for JetStream: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("JetStream never became available: {e}"),
        }
    }
}

fn change(i: u64, version: u64) -> ChangeInput {
    let fields = json!({"name": format!("name {i} v{version}"), "email": format!("{i}@x")});
    ChangeInput::upsert(
        format!("c{i}"),
        version,
        fields.as_object().cloned().unwrap(),
    )
}

/// Publishes `total` changes over `keys` keys in batches, retrying each
/// batch until it is accepted, and returns the owner's final state.
async fn publish_stream(
    feed: Arc<JetStreamFeed>,
    keys: u64,
    total: u64,
    mut on_batch: impl FnMut(u64),
) -> MemoryCopy {
    let mut model = MemoryCopy::new();
    let mut versions = vec![0u64; keys as usize];
    let mut sent = 0;
    let mut batch_no = 0;
    while sent < total {
        let batch: Vec<ChangeInput> = (0..20.min(total - sent))
            .map(|j| {
                let k = (sent + j) % keys;
                versions[k as usize] += 1;
                change(k, versions[k as usize])
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match feed.publish("customers", batch.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        e.is_transient(),
                        "only transport failures are expected: {e}"
                    );
                    assert!(Instant::now() < deadline, "publishing never recovered: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        for c in &batch {
            model.apply(
                &spoke_core::Change {
                    dataset: "customers".into(),
                    key: c.key.clone(),
                    version: c.version,
                    op: c.op,
                    fields: json!({"name": c.fields["name"]})
                        .as_object()
                        .cloned()
                        .unwrap(),
                    owner: "customer-service".into(),
                    ts: 0,
                    schema_version: 1,
                },
                0,
            );
        }
        sent += batch.len() as u64;
        batch_no += 1;
        on_batch(batch_no);
    }
    model
}

/// Waits until the agent finished its (empty) bootstrap, so every change
/// arrives through the log and the received count can be checked exactly.
async fn wait_for_bootstrap(store: &SqliteCopyStore) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(store.cursor("customers").await, Ok(c) if c.position.is_some()) {
        assert!(Instant::now() < deadline, "the agent never bootstrapped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the copy holds `expected` and checks nothing was received twice.
async fn assert_converged(store: &SqliteCopyStore, expected: &MemoryCopy, feed: &JetStreamFeed) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let head = loop {
        let head = feed
            .read("customers", u64::MAX - 1, 1, Duration::ZERO)
            .await
            .map(|b| b.head);
        if let Ok(h) = head {
            break h;
        }
        assert!(Instant::now() < deadline, "feed never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        let cursor = store.cursor("customers").await.unwrap();
        if cursor.position == Some(head) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "copy stuck at {:?}, head {head}",
            cursor.position
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dump = store.dump("customers").await.unwrap();
    let got: BTreeMap<&str, (u64, &serde_json::Map<String, serde_json::Value>)> = dump
        .iter()
        .filter(|(_, v)| !v.1)
        .map(|(k, v)| (k.as_str(), (v.0, &v.2)))
        .collect();
    assert_eq!(got, expected.live(), "the copy equals the owner's state");
    let cursor = store.cursor("customers").await.unwrap();
    assert_eq!(
        cursor.received_total, head,
        "every log entry was received exactly once (none lost, none doubled)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_owner_publish_is_refused_by_nats_itself() {
    if !have_server("nats permissions") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = manifest();
    let opts = JetStreamOptions::new("nats://unused");
    let mut passwords = BTreeMap::new();
    for (u, p) in [
        (ADMIN_USER, "admin-pw"),
        ("customer-service", "cust-pw"),
        ("order-service", "order-pw"),
    ] {
        passwords.insert(u.to_owned(), p.to_owned());
    }
    let mut server = NatsServer::start(
        free_port(),
        dir.path(),
        "auth",
        &authorization_block(&m, &opts, &passwords),
        None,
    )
    .unwrap();
    server.ready().await;
    let url = server.url();
    let admin = connect_retrying(options(&url, Some((ADMIN_USER, "admin-pw"))), &m).await;
    let owner = JetStreamFeed::connect(options(&url, Some(("customer-service", "cust-pw"))), &m)
        .await
        .expect("the owner connects");
    let r = owner
        .publish("customers", vec![change(1, 1)])
        .await
        .expect("the owner may publish");
    assert_eq!(r.positions, vec![Some(1)]);

    let reader = JetStreamFeed::connect(options(&url, Some(("order-service", "order-pw"))), &m)
        .await
        .expect("the consumer connects");
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        reader.publish("customers", vec![change(2, 1)]),
    )
    .await
    .expect("the refusal arrives");
    assert!(e.is_err(), "a non-owner's publish must fail, got {e:?}");
    let b = reader
        .read("customers", 0, 10, Duration::from_secs(5))
        .await
        .expect("the consumer may read");
    assert_eq!(b.entries.len(), 1, "only the owner's change is in the log");
    assert_eq!(b.head, 1);
    assert!(
        server
            .log()
            .contains("Publish Violation - User \"order-service\""),
        "NATS itself refused it:\n{}",
        server.log()
    );
    drop(admin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_converges_across_a_nats_restart() {
    if !have_server("nats restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(manifest());
    let mut server = NatsServer::start(free_port(), dir.path(), "solo", "", None).unwrap();
    server.ready().await;
    let url = server.url();
    let owner = Arc::new(connect_retrying(options(&url, None), &m).await);
    let store = Arc::new(SqliteCopyStore::open(&dir.path().join("copy.db")).unwrap());
    let agent_feed = Arc::new(connect_retrying(options(&url, None), &m).await);
    let agent = Arc::new(
        Agent::new(
            m.clone(),
            "order-service",
            agent_feed.clone(),
            store.clone(),
        )
        .unwrap()
        .with_options(AgentOptions {
            wait: Duration::from_millis(200),
            backoff_max: Duration::from_millis(500),
            ..Default::default()
        }),
    );
    let (trigger, shutdown) = shutdown_channel();
    let running = tokio::spawn(agent.run(shutdown));
    wait_for_bootstrap(&store).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = tokio::spawn(publish_stream(owner.clone(), 50, 3_000, move |b| {
        let _ = tx.send(b);
    }));
    // Kill the server once a third of the stream is out, restart it shortly after.
    while let Some(b) = rx.recv().await {
        if b == 50 {
            server.kill();
            tokio::time::sleep(Duration::from_millis(700)).await;
            server.restart();
            server.ready().await;
            break;
        }
    }
    let expected = publisher.await.unwrap();
    assert_converged(&store, &expected, &agent_feed).await;
    trigger.fire();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_a_node_mid_stream_and_nothing_is_lost() {
    if !have_server("nats cluster") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(manifest());
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
        .collect();
    let mut nodes: Vec<NatsServer> = ports
        .iter()
        .enumerate()
        .map(|(i, (p, c))| {
            let cluster = format!(
                "cluster {{ name: spoke-test, listen: 127.0.0.1:{c}, routes: [{}] }}",
                routes.join(", ")
            );
            NatsServer::start(*p, dir.path(), &format!("n{i}"), &cluster, Some(*c)).unwrap()
        })
        .collect();
    for n in &mut nodes {
        n.ready().await;
    }
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let url = urls.join(",");
    let mut o = options(&url, None);
    o.replicas = 3;
    let owner = Arc::new(connect_retrying(o.clone(), &m).await);
    let store = Arc::new(SqliteCopyStore::open(&dir.path().join("copy.db")).unwrap());
    let agent_feed = Arc::new(connect_retrying(o, &m).await);
    let agent = Arc::new(
        Agent::new(
            m.clone(),
            "order-service",
            agent_feed.clone(),
            store.clone(),
        )
        .unwrap()
        .with_options(AgentOptions {
            wait: Duration::from_millis(200),
            backoff_max: Duration::from_millis(500),
            ..Default::default()
        }),
    );
    let (trigger, shutdown) = shutdown_channel();
    let running = tokio::spawn(agent.run(shutdown));
    wait_for_bootstrap(&store).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = tokio::spawn(publish_stream(owner.clone(), 50, 2_000, move |b| {
        let _ = tx.send(b);
    }));
    while let Some(b) = rx.recv().await {
        if b == 30 {
            nodes[2].kill();
            break;
        }
    }
    let expected = publisher.await.unwrap();
    assert_converged(&store, &expected, &agent_feed).await;
    trigger.fire();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_take_its_port_is_not_mistaken_for_the_one_there() {
    if !have_server("nats port taken") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Something else answers on the port: the server must be seen to fail,
    // not be reported ready because a connection to the port succeeds.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let mut server = NatsServer::start(port, dir.path(), "taken", "", None).unwrap();
    let waited = tokio::spawn(async move { server.ready().await }).await;
    let panic = waited.expect_err("ready() must fail").into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("exited"), "{message}");
    drop(squatter);
}
