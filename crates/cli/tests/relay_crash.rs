//! Rule 3 with real processes: a change and its outbox entry commit in one
//! transaction, and a crash of the relay delays a change, never loses it.
//!
//! An owner's SQLite database has the outbox installed. A writer thread
//! commits business rows together with their outbox rows
//! (`spoke::outbox::sqlite::{upsert, delete}` in the same transaction), and
//! now and then rolls a transaction back. `spoke relay` forwards the outbox
//! to a `spoke hub` child and is killed with SIGKILL at random instants and
//! restarted. Once the writer stopped and the relay drained the outbox:
//! - the hub's log is exactly the committed changes, in commit order: no
//!   (key, version) twice (a relay killed between publish and ack re-sends,
//!   and the hub ignores what it holds), none missing, no rolled-back one;
//! - the hub's compacted state equals the owner's tables: per key the
//!   latest version, and the business row's fields or a tombstone;
//! - the outbox is empty.

mod support;

use support::Proc;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::{json, Map, Value};
use spoke::feed::http::HubClient;
use spoke::feed::Feed;
use spoke::outbox::sqlite as outbox;
use spoke_core::{Op, Version};

use support::ITEMS_MANIFEST as MANIFEST;

const KEYS: usize = 150;
const MIN_KILLS: usize = 12;
const MIN_COMMITS: usize = 1_500;
const DEADLINE: Duration = Duration::from_secs(120);

type Logged = (String, Version, Op, Map<String, Value>);

fn open_owner(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open owner db");
    conn.busy_timeout(Duration::from_secs(30))
        .expect("busy timeout");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("WAL");
    conn
}

/// The owner's service: commits business rows and outbox rows together
/// until `stop`, rolling back about one transaction in ten. Returns what
/// committed, in commit order.
fn owner_writer(path: &Path, seed: u64, stop: Arc<AtomicBool>) -> Vec<Logged> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut conn = open_owner(path);
    let mut committed = Vec::new();
    let mut rolled_back = 0;
    while !stop.load(Ordering::SeqCst) || committed.len() < MIN_COMMITS {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .expect("begin");
        let mut changes = Vec::new();
        for _ in 0..rng.usize(1..=4) {
            let key = format!("item-{:03}", rng.usize(..KEYS));
            let exists = tx
                .query_row("SELECT 1 FROM items WHERE id = ?1", [&key], |_| Ok(()))
                .optional()
                .expect("select")
                .is_some();
            if exists && rng.u8(..4) == 0 {
                tx.execute("DELETE FROM items WHERE id = ?1", [&key])
                    .expect("delete row");
                let v = outbox::delete(&tx, "items", &key).expect("outbox delete");
                changes.push((key, v, Op::Delete, Map::new()));
            } else {
                let n = rng.i64(..);
                let label = rng.bool().then(|| format!("label {}", rng.u32(..)));
                tx.execute(
                    "INSERT INTO items (id, n, label) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO UPDATE SET n = excluded.n, label = excluded.label",
                    params![key, n, label],
                )
                .expect("upsert row");
                let fields = json!({ "n": n, "label": label })
                    .as_object()
                    .cloned()
                    .expect("object");
                let v = outbox::upsert(&tx, "items", &key, &fields).expect("outbox upsert");
                changes.push((key, v, Op::Upsert, fields));
            }
        }
        if rng.u8(..10) == 0 {
            // The owner's transaction failed: neither the rows nor their outbox entries exist.
            tx.rollback().expect("rollback");
            rolled_back += 1;
        } else {
            tx.commit().expect("commit");
            committed.extend(changes);
        }
        if rng.u8(..4) == 0 {
            std::thread::sleep(Duration::from_millis(rng.u64(0..4)));
        }
    }
    assert!(
        rolled_back > 0,
        "the run rolled some owner transactions back"
    );
    committed
}

fn outbox_backlog(conn: &Connection) -> i64 {
    conn.query_row("SELECT COUNT(*) FROM spoke_outbox", [], |r| r.get(0))
        .expect("count outbox")
}

async fn hub_log(hub: &HubClient) -> Vec<Logged> {
    let mut out = Vec::new();
    loop {
        let b = hub
            .read("items", out.len() as u64, 5_000, Duration::ZERO)
            .await
            .expect("read log");
        if b.entries.is_empty() {
            return out;
        }
        for e in b.entries {
            assert_eq!(e.position, out.len() as u64 + 1, "positions are dense");
            out.push((e.change.key, e.change.version, e.change.op, e.change.fields));
        }
    }
}

async fn hub_state(hub: &HubClient) -> BTreeMap<String, (Version, bool, Map<String, Value>)> {
    let mut out = BTreeMap::new();
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

/// The owner's final state: per key its latest version, and its row or a tombstone.
fn owner_state(conn: &Connection) -> BTreeMap<String, (Version, bool, Map<String, Value>)> {
    let mut stmt = conn
        .prepare("SELECT v.key, v.version, i.id IS NULL, i.n, i.label FROM spoke_versions v LEFT JOIN items i ON i.id = v.key WHERE v.dataset = 'items'")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            let deleted: bool = r.get(2)?;
            let fields = if deleted {
                Map::new()
            } else {
                json!({ "n": r.get::<_, i64>(3)?, "label": r.get::<_, Option<String>>(4)? })
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            };
            Ok((
                r.get::<_, String>(0)?,
                (r.get::<_, i64>(1)? as Version, deleted, fields),
            ))
        })
        .expect("query");
    rows.collect::<Result<_, _>>().expect("rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_relay_at_random_instants_delays_but_never_loses_or_doubles() {
    let seed = support::seed();
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("manifest.toml");
    std::fs::write(&manifest, MANIFEST).expect("write manifest");
    let hub_dir = dir.path().join("hub");
    let owner_db = dir.path().join("owner.db");
    {
        let conn = open_owner(&owner_db);
        conn.execute_batch(
            "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER NOT NULL, label TEXT)",
        )
        .expect("business table");
        outbox::install(&conn).expect("install outbox");
    }

    let hub_proc = Proc::spawn(&[
        "hub",
        "--manifest",
        manifest.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--data",
        hub_dir.to_str().expect("utf-8"),
    ]);
    let line = hub_proc.wait_line("listening on http://");
    let addr = line
        .split("listening on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address");
    let hub_url = format!("http://{addr}");
    let hub = HubClient::new(&hub_url, None);
    let relay_args = [
        "relay",
        "--outbox",
        owner_db.to_str().expect("utf-8"),
        "--hub",
        &hub_url,
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, stop) = (owner_db.clone(), stop.clone());
        std::thread::spawn(move || owner_writer(&path, seed, stop))
    };

    let mut relay = Proc::spawn(&relay_args);
    let mut kills = 0;
    let mut progressed = 0;
    let mut last_head = 0;
    while kills < MIN_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.u64(0..=300))).await;
        relay.kill();
        kills += 1;
        let head = hub
            .read("items", 0, 1, Duration::ZERO)
            .await
            .expect("head")
            .head;
        if head > last_head {
            progressed += 1;
            last_head = head;
        }
        relay = Proc::spawn(&relay_args);
    }
    stop.store(true, Ordering::SeqCst);
    let committed = tokio::task::spawn_blocking(move || writer.join().expect("writer thread"))
        .await
        .expect("join");
    println!(
        "{kills} kills; the hub moved forward between {progressed} of them; {} changes committed",
        committed.len()
    );
    assert!(
        progressed >= 1,
        "the relay made progress while being killed, so the kills landed on a working relay"
    );

    // The last relay drains the outbox.
    let owner = open_owner(&owner_db);
    let start = Instant::now();
    while outbox_backlog(&owner) > 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "seed {seed}: the outbox still holds {} rows; relay stderr:\n{}",
            outbox_backlog(&owner),
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.kill();

    // The hub's log is exactly what committed, in commit order.
    let log = hub_log(&hub).await;
    let mut seen = HashSet::new();
    let dups: Vec<_> = log
        .iter()
        .filter(|(k, v, _, _)| !seen.insert((k.clone(), *v)))
        .map(|(k, v, _, _)| (k.clone(), *v))
        .take(5)
        .collect();
    assert!(
        dups.is_empty(),
        "seed {seed}: (key, version) appended twice: {dups:?}"
    );
    assert_eq!(
        log.len(),
        committed.len(),
        "seed {seed}: every committed change reached the hub once"
    );
    if let Some(i) = (0..log.len()).find(|&i| log[i] != committed[i]) {
        panic!(
            "seed {seed}: the hub's log departs from the commit order at {i}: hub {:?}, owner {:?}",
            log[i], committed[i]
        );
    }

    // The hub's compacted state is the owner's state.
    let owner_now = owner_state(&owner);
    let hub_now = hub_state(&hub).await;
    assert_eq!(
        hub_now.len(),
        owner_now.len(),
        "seed {seed}: one record per key the owner ever wrote"
    );
    let diffs: Vec<_> = owner_now
        .iter()
        .filter(|(k, want)| hub_now.get(*k) != Some(want))
        .map(|(k, want)| (k, want, hub_now.get(k)))
        .take(5)
        .collect();
    assert!(
        diffs.is_empty(),
        "seed {seed}: hub differs from the owner at (key, owner, hub): {diffs:?}"
    );
    assert_eq!(outbox_backlog(&owner), 0, "the outbox is empty");
}
