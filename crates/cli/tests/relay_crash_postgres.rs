//! Rule 3 with real processes, for the PostgreSQL outbox: a change and its
//! outbox entry commit in one transaction, and a crash of the relay delays a
//! change, never loses or doubles it.
//!
//! The owner's PostgreSQL has the outbox installed in a schema of its own.
//! Two writer tasks commit business rows together with their outbox rows
//! (`spoke::outbox::postgres::Outbox::{upsert, delete}` in the same
//! transaction) on overlapping keys, and now and then roll a transaction
//! back. `spoke relay --outbox-postgres` forwards the outbox to a
//! `spoke hub` child and is killed with SIGKILL at random instants and
//! restarted. Once the writers stopped and the relay drained the outbox:
//! - the hub's log is exactly the committed changes: no (key, version) twice
//!   (a relay killed between publish and ack re-sends, and the hub ignores
//!   what it holds), none missing, no rolled-back one, and per key in commit
//!   order;
//! - the hub's compacted state equals the owner's tables: per key the
//!   latest version, and the business row's fields or a tombstone;
//! - the outbox is empty.

mod support;

use support::Proc;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use spoke::feed::http::HubClient;
use spoke::feed::Feed;
use spoke::outbox::postgres::tokio_postgres::{self, Client, NoTls};
use spoke::outbox::postgres::Outbox;
use spoke::testing::{postgres_exec, postgres_or_skip, unique_name};
use spoke_core::{Op, Version};

const TEST: &str = "relay_crash_postgres";

use support::ITEMS_MANIFEST as MANIFEST;

const KEYS: usize = 150;
const WRITERS: u64 = 2;
const MIN_KILLS: usize = 12;
const MIN_COMMITS: usize = 1_500;
const DEADLINE: Duration = Duration::from_secs(120);

type Logged = (String, Version, Op, Map<String, Value>);
type State = BTreeMap<String, (Version, bool, Map<String, Value>)>;

/// Drops the run's schema when dropped, on success and on failure alike.
/// Declared before the relay, so the relay is killed first and cannot
/// recreate the outbox that was just removed.
struct Cleanup {
    url: String,
    schema: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let url = self.url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        // Drop cannot await and runs inside the test's runtime: clean up on
        // a thread with a runtime of its own, where a panic stays contained.
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime")
                .block_on(postgres_exec(&url, &sql));
        })
        .join();
        if done.is_err() {
            eprintln!(
                "{TEST}: cleanup failed; drop schema {} by hand",
                self.schema
            );
        }
    }
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to the owner's PostgreSQL");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// One owner service: commits business rows and outbox rows together until
/// `stop` (and at least its share of MIN_COMMITS), rolling back about one
/// transaction in ten; counts committed changes in `progress`. Returns what
/// committed, in its commit order.
async fn owner_writer(
    url: String,
    outbox: Outbox,
    seed: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
) -> Vec<Logged> {
    let s = outbox.schema().to_owned();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut client = connect(&url).await;
    let mut committed = Vec::new();
    let mut rolled_back = 0;
    while !stop.load(Ordering::SeqCst) || committed.len() < MIN_COMMITS / WRITERS as usize {
        // Keys in a fixed order, so two writers never deadlock.
        let mut keys: Vec<String> = (0..rng.usize(1..=4))
            .map(|_| format!("item-{:03}", rng.usize(..KEYS)))
            .collect();
        keys.sort();
        keys.dedup();
        let tx = client.transaction().await.expect("begin");
        let mut changes = Vec::new();
        for key in keys {
            let deleted = rng.u8(..4) == 0
                && tx
                    .execute(&format!("DELETE FROM \"{s}\".items WHERE id = $1"), &[&key])
                    .await
                    .expect("delete row")
                    == 1;
            if deleted {
                let v = outbox
                    .delete(&tx, "items", &key)
                    .await
                    .expect("outbox delete");
                changes.push((key, v, Op::Delete, Map::new()));
            } else {
                let n = rng.i64(..);
                let label = rng.bool().then(|| format!("label {}", rng.u32(..)));
                tx.execute(
                    &format!(
                        "INSERT INTO \"{s}\".items (id, n, label) VALUES ($1, $2, $3) \
                         ON CONFLICT (id) DO UPDATE SET n = excluded.n, label = excluded.label"
                    ),
                    &[&key, &n, &label],
                )
                .await
                .expect("upsert row");
                let fields = json!({ "n": n, "label": label })
                    .as_object()
                    .cloned()
                    .expect("object");
                let v = outbox
                    .upsert(&tx, "items", &key, &fields)
                    .await
                    .expect("outbox upsert");
                changes.push((key, v, Op::Upsert, fields));
            }
        }
        if rng.u8(..10) == 0 {
            // The owner's transaction failed: neither the rows nor their outbox entries exist.
            tx.rollback().await.expect("rollback");
            rolled_back += 1;
        } else {
            tx.commit().await.expect("commit");
            progress.fetch_add(changes.len(), Ordering::SeqCst);
            committed.extend(changes);
        }
        if rng.u8(..4) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.u64(0..4))).await;
        }
    }
    assert!(
        rolled_back > 0,
        "the run rolled some owner transactions back"
    );
    committed
}

async fn outbox_backlog(client: &Client, schema: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".spoke_outbox"),
            &[],
        )
        .await
        .expect("count outbox")
        .get(0)
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

async fn hub_state(hub: &HubClient) -> State {
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
async fn owner_state(client: &Client, schema: &str) -> State {
    client
        .query(
            &format!(
                "SELECT v.key, v.version, i.id IS NULL, i.n, i.label \
                 FROM \"{schema}\".spoke_versions v LEFT JOIN \"{schema}\".items i ON i.id = v.key \
                 WHERE v.dataset = 'items'"
            ),
            &[],
        )
        .await
        .expect("owner state")
        .iter()
        .map(|r| {
            let deleted: bool = r.get(2);
            let fields = if deleted {
                Map::new()
            } else {
                json!({ "n": r.get::<_, i64>(3), "label": r.get::<_, Option<String>>(4) })
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            };
            (r.get(0), (r.get::<_, i64>(1) as Version, deleted, fields))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_postgres_outbox_relay_at_random_instants_delays_but_never_loses_or_doubles() {
    let Some(url) = postgres_or_skip(TEST).await else {
        return;
    };
    let seed = support::seed();
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(1_000));
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("manifest.toml");
    std::fs::write(&manifest, MANIFEST).expect("write manifest");
    let hub_dir = dir.path().join("hub");

    let schema = unique_name("spoke_relaycrash");
    let _cleanup = Cleanup {
        url: url.clone(),
        schema: schema.clone(),
    };
    let outbox = Outbox::new(&schema).expect("schema name");
    let owner = connect(&url).await;
    outbox.install(&owner).await.expect("install outbox");
    owner
        .batch_execute(&format!(
            "CREATE TABLE \"{schema}\".items (id text PRIMARY KEY, n bigint NOT NULL, label text)"
        ))
        .await
        .expect("business table");

    let mut hub_proc = Proc::spawn(&[
        "hub",
        "--manifest",
        manifest.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--data",
        hub_dir.to_str().expect("utf-8"),
    ]);
    let hub_url = format!("http://{}", hub_proc.wait_addr());
    let hub = HubClient::new(&hub_url, None);
    let relay_args = [
        "relay",
        "--outbox-postgres",
        url.as_str(),
        "--outbox-schema",
        schema.as_str(),
        "--hub",
        &hub_url,
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(owner_writer(
                url.clone(),
                outbox.clone(),
                seed.wrapping_add(w),
                stop.clone(),
                progress.clone(),
            ))
        })
        .collect();

    let mut relay = Proc::spawn(&relay_args);
    let mut kills = 0;
    let mut progressed = 0;
    let mut last_head = 0;
    // Kill for as long as the writers write, at least MIN_KILLS times.
    while kills < MIN_KILLS || progress.load(Ordering::SeqCst) < MIN_COMMITS {
        tokio::time::sleep(Duration::from_millis(rng.u64(0..=300))).await;
        assert!(
            !relay.exited(),
            "the relay exited by itself; stderr:\n{}",
            relay.log()
        );
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
    let mut committed: Vec<Logged> = Vec::new();
    for w in writers {
        committed.extend(w.await.expect("writer task"));
    }
    println!(
        "{kills} kills; the hub moved forward between {progressed} of them; {} changes committed",
        committed.len()
    );
    assert!(
        progressed >= 1,
        "the relay made progress while being killed, so the kills landed on a working relay"
    );

    // The last relay drains the outbox.
    let start = Instant::now();
    while outbox_backlog(&owner, &schema).await > 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "seed {seed}: the outbox still holds {} rows; relay stderr:\n{}",
            outbox_backlog(&owner, &schema).await,
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.kill();

    // The hub's log is exactly what committed: once each, per key in commit order.
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
    let mut want: BTreeMap<(String, Version), (Op, Map<String, Value>)> = BTreeMap::new();
    for (k, v, op, f) in &committed {
        assert!(
            want.insert((k.clone(), *v), (*op, f.clone())).is_none(),
            "seed {seed}: two writers committed {k} version {v}"
        );
    }
    let got: BTreeMap<(String, Version), (Op, Map<String, Value>)> = log
        .iter()
        .map(|(k, v, op, f)| ((k.clone(), *v), (*op, f.clone())))
        .collect();
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "seed {seed}: the hub's log differs from the commits: missing {missing:?}, never committed {extra:?}"
    );
    let differ: Vec<_> = want
        .iter()
        .filter(|(k, w)| got.get(*k) != Some(*w))
        .map(|(k, _)| k)
        .take(5)
        .collect();
    assert!(
        differ.is_empty(),
        "seed {seed}: the hub holds other fields than were committed for {differ:?}"
    );
    let mut per_key: BTreeMap<&str, Vec<Version>> = BTreeMap::new();
    for (k, v, _, _) in &log {
        per_key.entry(k.as_str()).or_default().push(*v);
    }
    for (k, versions) in &per_key {
        let in_order: Vec<Version> = (1..=versions.len() as Version).collect();
        assert_eq!(
            versions, &in_order,
            "seed {seed}: key {k}: the hub's log (left) is not every version once in commit order"
        );
    }

    // The hub's compacted state is the owner's state.
    let owner_now = owner_state(&owner, &schema).await;
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
    assert_eq!(
        outbox_backlog(&owner, &schema).await,
        0,
        "the outbox is empty"
    );
    hub_proc.kill();
}
