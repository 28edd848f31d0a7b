//! The hub's durability with real processes: `spoke hub` is killed with
//! SIGKILL at random instants while an owner publishes to it, and
//! restarted on the same data directory.
//!
//! The hub's store appends each publish to its log and folds the log into
//! the compacted state on a thread, later; a kill lands before, during or
//! after a fold. The owner re-sends a batch whose answer it did not get (as
//! the relay does), so every change is acknowledged in the end. Then:
//! - every acknowledged change is in the log at the position the hub
//!   answered, the log has no (key, version) twice, and its positions are
//!   dense;
//! - the compacted state (snapshot) holds per key exactly the owner's last
//!   change;
//! - the digest and bucket entries equal those of a feed that replayed the
//!   hub's log from scratch, so the fold never lost or doubled a change.

mod support;

use support::Proc;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use spoke::feed::http::HubClient;
use spoke::feed::memory::MemoryFeed;
use spoke::feed::{ChangeInput, Feed, Publisher};
use spoke_core::digest::DigestQuery;
use spoke_core::{Manifest, Op, Version};

use support::ITEMS_MANIFEST as MANIFEST;

const KEYS: u64 = 300;
const MIN_KILLS: usize = 15;
const MIN_ACKED: usize = 2_000;
const DEADLINE: Duration = Duration::from_secs(180);

/// What the owner saw acknowledged: (position, key, version).
type Acked = Vec<(u64, String, Version)>;

/// The owner: batches of changes to random keys, each key's versions
/// counting up, every batch re-sent until the hub answers it.
async fn owner(
    url: Arc<Mutex<String>>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (Acked, BTreeMap<String, ChangeInput>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut versions: BTreeMap<String, Version> = BTreeMap::new();
    let mut last: BTreeMap<String, ChangeInput> = BTreeMap::new();
    let mut acked = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let batch: Vec<ChangeInput> = (0..rng.usize(1..=40))
            .map(|_| {
                let key = format!("k{}", rng.u64(0..KEYS));
                let v = versions.entry(key.clone()).or_insert(0);
                *v += 1;
                let change = if rng.u8(0..100) < 15 {
                    ChangeInput::delete(key.clone(), *v)
                } else {
                    let fields = json!({ "n": *v as i64, "label": format!("{key} v{v}") });
                    ChangeInput::upsert(key.clone(), *v, fields.as_object().cloned().unwrap())
                };
                last.insert(key, change.clone());
                change
            })
            .collect();
        let started = Instant::now();
        let receipt = loop {
            let hub = HubClient::new(&url.lock().unwrap().clone(), None);
            match hub.publish("items", batch.clone()).await {
                Ok(r) => break r,
                Err(e) => {
                    assert!(
                        e.is_transient(),
                        "seed {seed}: the hub refused a valid batch: {e}"
                    );
                    assert!(
                        started.elapsed() < DEADLINE,
                        "seed {seed}: a batch went unanswered for {DEADLINE:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        for (c, pos) in batch.iter().zip(&receipt.positions) {
            if let Some(p) = pos {
                acked.push((*p, c.key.clone(), c.version));
            }
        }
    }
    (acked, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_hub_at_random_instants_loses_no_acknowledged_change_and_folds_every_one() {
    let seed = support::seed();
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest_path = dir.path().join("manifest.toml");
    std::fs::write(&manifest_path, MANIFEST).expect("write manifest");
    let hub_dir = dir.path().join("hub");
    let listen = format!("127.0.0.1:{}", spoke::testing::free_port());
    let hub_args = [
        "hub",
        "--manifest",
        manifest_path.to_str().expect("utf-8"),
        "--listen",
        &listen,
        "--data",
        hub_dir.to_str().expect("utf-8"),
    ];
    let start_hub = || {
        let mut p = Proc::spawn(&hub_args);
        let addr = p.wait_addr();
        (p, format!("http://{addr}"))
    };

    let (mut hub, first_url) = start_hub();
    let url = Arc::new(Mutex::new(first_url));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(owner(url.clone(), seed, stop.clone()));

    let started = Instant::now();
    let mut kills = 0;
    while kills < MIN_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.u64(50..=400))).await;
        hub.kill();
        kills += 1;
        let (h, u) = start_hub();
        hub = h;
        *url.lock().unwrap() = u;
        assert!(
            started.elapsed() < DEADLINE,
            "seed {seed}: {kills} kills took longer than {DEADLINE:?}"
        );
    }
    // A last stretch of publishing to a hub that stays up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, last) = writer.await.expect("owner task");
    println!(
        "{kills} kills; {} changes acknowledged over {} keys",
        acked.len(),
        last.len()
    );
    assert!(
        acked.len() >= MIN_ACKED.min(kills * 50),
        "seed {seed}: only {} changes were acknowledged; the owner was mostly waiting; hub stderr:\n{}",
        acked.len(),
        hub.log()
    );

    let client = HubClient::new(&url.lock().unwrap().clone(), None);
    // The log: dense, nothing twice, every acknowledged change where the hub said.
    let mut log = Vec::new();
    loop {
        let b = client
            .read("items", log.len() as u64, 5_000, Duration::ZERO)
            .await
            .expect("read log");
        if b.entries.is_empty() {
            break;
        }
        for e in b.entries {
            assert_eq!(e.position, log.len() as u64 + 1, "positions are dense");
            log.push(e.change);
        }
    }
    let mut seen = HashSet::new();
    for c in &log {
        assert!(
            seen.insert((c.key.clone(), c.version)),
            "seed {seed}: ({}, {}) is in the log twice",
            c.key,
            c.version
        );
    }
    for (pos, key, version) in &acked {
        let at = log.get(*pos as usize - 1).unwrap_or_else(|| {
            panic!(
                "seed {seed}: acknowledged position {pos} is past the log's end {}",
                log.len()
            )
        });
        assert_eq!(
            (&at.key, at.version),
            (key, *version),
            "seed {seed}: position {pos} holds another change than the one acknowledged there"
        );
    }

    // The compacted state: per key the owner's last change.
    let mut state: BTreeMap<String, (Version, Op, Map<String, Value>)> = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = client
            .snapshot("items", after.as_deref(), 500)
            .await
            .expect("snapshot");
        for c in page.records {
            state.insert(c.key, (c.version, c.op, c.fields));
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    let expected: BTreeMap<String, (Version, Op, Map<String, Value>)> = last
        .into_iter()
        .map(|(k, c)| (k, (c.version, c.op, c.fields)))
        .collect();
    assert_eq!(
        state, expected,
        "seed {seed}: the hub's compacted state is not the owner's last change per key"
    );

    // The digest and bucket entries: as if the log had been folded at once.
    let manifest = Manifest::parse("hub_crash", MANIFEST).expect("manifest");
    let replay = MemoryFeed::new(&manifest);
    for chunk in log.chunks(1_000) {
        let inputs = chunk
            .iter()
            .map(|c| ChangeInput {
                key: c.key.clone(),
                version: c.version,
                op: c.op,
                fields: c.fields.clone(),
                ts: Some(c.ts),
            })
            .collect();
        replay.publish("items", inputs).await.expect("replay");
    }
    for q in [DigestQuery::root(), DigestQuery::level(2)] {
        assert_eq!(
            client.digest("items", &q).await.expect("hub digest"),
            replay.digest("items", &q).await.expect("replayed digest"),
            "seed {seed}: the hub's digest differs from the replayed log's"
        );
    }
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for first in (0..4096u16).step_by(256) {
        let buckets: Vec<u16> = (first..first + 256).collect();
        ours.extend(
            client
                .bucket_entries("items", &buckets)
                .await
                .expect("entries"),
        );
        theirs.extend(
            replay
                .bucket_entries("items", &buckets)
                .await
                .expect("entries"),
        );
    }
    ours.sort_by(|a, b| a.key.cmp(&b.key));
    theirs.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(ours, theirs, "seed {seed}: bucket entries differ");
    hub.kill();
}
