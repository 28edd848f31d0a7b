//! Rule 2 with real processes: nothing lost, nothing doubled.
//!
//! `spoke hub` and `spoke agent` run as child processes. The test publishes
//! a stream of upserts and deletes over 200 keys through the hub's HTTP API
//! while killing the agent with SIGKILL at random instants, restarting it
//! each time. Once the agent caught up:
//! - the copy equals the hub's compacted state, key by key, with versions
//!   and tombstones, and the hub equals the owner's model;
//! - every feed entry was received exactly once: the agent bootstrapped from
//!   an empty hub (position 0), so `received_total == position == head`;
//!   a batch whose records committed without its cursor (or twice) would
//!   make `received_total` exceed the head, a cursor that moved without its
//!   records would leave the copy short;
//! - `applied_total` cannot detect doubling (a re-applied change is
//!   ignored by the apply rule) and, since a store applies only the newest
//!   change per key of a batch, depends on how the log was cut into batches;
//!   it is bounded: at least one per key the hub holds, at most `head`.

mod support;

use support::Proc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use spoke::feed::http::HubClient;
use spoke::feed::{ChangeInput, Feed, Publisher};
use spoke_core::{Op, Version};

const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int", label = "string?", secret = "string" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n", "label"]
strategy = "events"
staleness_budget = "1m"
"#;

const KEYS: usize = 200;
const CHANGES: usize = 6_000;
const MIN_KILLS: usize = 20;
const DEADLINE: Duration = Duration::from_secs(120);

/// The copy's cursor row, read through a read-only connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CursorRow {
    position: Option<u64>,
    received_total: u64,
    applied_total: u64,
}

fn read_cursor(db: &Path) -> Option<CursorRow> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.busy_timeout(Duration::from_secs(10)).ok()?;
    conn.query_row(
        "SELECT position, received_total, applied_total FROM _spoke_copies WHERE dataset = 'items'",
        [],
        |r| {
            Ok(CursorRow {
                position: r.get::<_, Option<i64>>(0)?.map(|p| p as u64),
                received_total: r.get::<_, i64>(1)? as u64,
                applied_total: r.get::<_, i64>(2)? as u64,
            })
        },
    )
    .ok()
}

type State = BTreeMap<String, (Version, bool, Map<String, Value>)>;

/// The hub's compacted state: key → (version, deleted, fields).
async fn hub_state(hub: &HubClient) -> State {
    let mut out = State::new();
    let mut after: Option<String> = None;
    loop {
        let page = hub
            .snapshot("items", after.as_deref(), 500)
            .await
            .expect("snapshot");
        for c in page.records {
            out.insert(c.key, (c.version, c.op == Op::Delete, c.fields));
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => return out,
        }
    }
}

fn project(fields: &Map<String, Value>) -> Map<String, Value> {
    ["n", "label"]
        .iter()
        .map(|f| {
            (
                (*f).to_owned(),
                fields.get(*f).cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Publishes `CHANGES` changes in random batches; returns the owner's model.
async fn publish_stream(hub: HubClient, seed: u64) -> State {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = State::new();
    let mut sent = 0;
    while sent < CHANGES {
        let size = rng.usize(1..=60).min(CHANGES - sent);
        let mut batch = Vec::with_capacity(size);
        for _ in 0..size {
            let key = format!("key-{:03}", rng.usize(..KEYS));
            let version = model.get(&key).map_or(0, |s| s.0) + 1;
            if rng.u8(..5) == 0 {
                batch.push(ChangeInput::delete(key.clone(), version));
                model.insert(key, (version, true, Map::new()));
            } else {
                let label = if rng.bool() {
                    json!(format!("label {version}"))
                } else {
                    Value::Null
                };
                let fields = json!({ "n": rng.i64(-1_000_000..1_000_000), "label": label, "secret": "not for the consumer" });
                let fields = fields.as_object().cloned().expect("object");
                batch.push(ChangeInput::upsert(key.clone(), version, fields.clone()));
                model.insert(key, (version, false, fields));
            }
        }
        let receipt = hub
            .publish("items", batch)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: publish: {e}"));
        assert_eq!(
            receipt.ignored, 0,
            "seed {seed}: fresh versions are never ignored"
        );
        sent += size;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..25))).await;
    }
    model
}

fn data_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_agent_at_random_instants_loses_and_doubles_nothing() {
    let seed = support::seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = data_path(dir.path(), "manifest.toml");
    std::fs::write(&manifest, MANIFEST).expect("write manifest");
    let manifest = manifest.to_str().expect("utf-8 path").to_owned();
    let hub_dir = data_path(dir.path(), "hub");
    let agent_dir = data_path(dir.path(), "agent");
    let copies = agent_dir.join("copies.db");

    let mut hub_proc = Proc::spawn(&[
        "hub",
        "--manifest",
        &manifest,
        "--listen",
        "127.0.0.1:0",
        "--data",
        hub_dir.to_str().expect("utf-8"),
    ]);
    let hub_url = format!("http://{}", hub_proc.wait_addr());
    let hub = HubClient::new(&hub_url, None);
    let agent_args = [
        "agent",
        "--manifest",
        &manifest,
        "--consumer",
        "reader-svc",
        "--hub",
        &hub_url,
        "--listen",
        "127.0.0.1:0",
        "--data",
        agent_dir.to_str().expect("utf-8"),
    ];

    // Start the agent before anything is published, and let it finish its
    // (empty) bootstrap, so every change reaches it through the feed.
    let mut agent = Proc::spawn(&agent_args);
    agent.wait_addr();
    let start = Instant::now();
    while read_cursor(&copies).and_then(|c| c.position).is_none() {
        assert!(
            start.elapsed() < DEADLINE,
            "the agent never bootstrapped; stderr:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        read_cursor(&copies).and_then(|c| c.position),
        Some(0),
        "bootstrapped from an empty hub"
    );

    let publisher = tokio::spawn(publish_stream(hub.clone(), seed));
    let mut kills = 0;
    let mut progressed = 0;
    let mut last_position = 0;
    while kills < MIN_KILLS || !publisher.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.u64(0..=300))).await;
        if let Some(p) = read_cursor(&copies).and_then(|c| c.position) {
            if p > last_position {
                progressed += 1;
                last_position = p;
            }
        }
        agent.kill();
        kills += 1;
        agent = Proc::spawn(&agent_args);
    }
    let model = publisher.await.expect("publisher");
    println!("{kills} kills; the copy moved forward between {progressed} of them");
    assert!(kills >= MIN_KILLS);
    assert!(
        progressed >= 1,
        "the agent made progress while being killed, so the kills landed on a working agent"
    );

    // Let the last agent catch up.
    let agent_url = format!("http://{}", agent.wait_addr());
    let head = hub
        .read("items", 0, 1, Duration::ZERO)
        .await
        .expect("head")
        .head;
    let start = Instant::now();
    loop {
        let c = read_cursor(&copies);
        if c.and_then(|c| c.position) == Some(head) {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "seed {seed}: the copy did not catch up to {head}: {c:?}; stderr:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The hub holds the owner's state...
    let hub_now = hub_state(&hub).await;
    assert_eq!(
        hub_now, model,
        "seed {seed}: the hub's compacted state is the owner's"
    );
    // ...and the copy holds the hub's, projected, key by key with versions.
    let store =
        spoke::copy::sqlite::SqliteCopyStore::open_read_only(&copies).expect("open copy read-only");
    let copy = spoke::copy::CopyStore::dump(&store, "items")
        .await
        .expect("dump");
    let expected: State = hub_now
        .iter()
        .map(|(k, (v, deleted, f))| {
            (
                k.clone(),
                (*v, *deleted, if *deleted { Map::new() } else { project(f) }),
            )
        })
        .collect();
    let diffs: Vec<_> = expected
        .iter()
        .filter(|(k, want)| copy.get(*k) != Some(want))
        .map(|(k, want)| (k, want, copy.get(k)))
        .take(5)
        .collect();
    assert!(
        diffs.is_empty(),
        "seed {seed}: copy differs from the hub at (key, hub, copy): {diffs:?}"
    );
    assert_eq!(
        copy.len(),
        expected.len(),
        "seed {seed}: the copy has no keys the hub lacks"
    );

    // Nothing doubled: every feed entry received exactly once, each applied once.
    let c = read_cursor(&copies).expect("cursor");
    assert_eq!(c.position, Some(head), "seed {seed}");
    assert_eq!(
        c.received_total, head,
        "seed {seed}: received_total counts each feed entry once ({c:?}, head {head})"
    );
    assert!(
        (expected.len() as u64..=head).contains(&c.applied_total),
        "seed {seed}: applied_total is at least one per key and at most one per entry ({c:?}, {} keys, head {head})",
        expected.len()
    );
    assert!(
        head as usize >= CHANGES,
        "every published change is in the log"
    );

    // The agent reports no error and no lag.
    let status: Value = reqwest::get(format!("{agent_url}/v1/status"))
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    let s = &status["copies"][0];
    assert_eq!(s["last_error"], Value::Null, "{status}");
    assert_eq!(s["position"], head, "{status}");
    assert_eq!(s["received_total"], head, "{status}");
}
