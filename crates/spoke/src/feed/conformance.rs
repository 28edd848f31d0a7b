//! The conformance suite every feed backend must pass.
//!
//! A backend's tests call [`run`] with a constructor; the suite exercises the
//! contract written at the top of [`crate::feed`]. It panics on the first
//! violation, naming the rule.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use spoke_core::digest::{Digest, DigestEntry, DigestQuery, BUCKETS};
use spoke_core::{Manifest, MemoryCopy, Op};

use super::{
    ChangeInput, Feed, FeedEntry, FeedError, Position, Publisher, MAX_BATCH, MAX_DIGEST_BUCKETS,
};

/// The manifest every conformance run uses: one dataset `items`.
pub const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int", label = "string?" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n", "label"]
staleness_budget = "1m"
"#;

pub fn manifest() -> Manifest {
    Manifest::parse("conformance.toml", MANIFEST).expect("conformance manifest is valid")
}

fn fields(n: i64) -> Map<String, Value> {
    json!({ "n": n }).as_object().cloned().unwrap_or_default()
}

/// Runs every rule against a fresh feed from `make` (called once per rule).
pub async fn run<F, Fut, T>(make: F)
where
    F: Fn(Manifest) -> Fut,
    Fut: Future<Output = T>,
    T: Feed + Publisher + 'static,
{
    positions_start_at_one_and_are_dense(make(manifest()).await).await;
    the_largest_batch_is_taken_whole(make(manifest()).await).await;
    stale_and_duplicate_changes_are_ignored(make(manifest()).await).await;
    an_invalid_change_rejects_the_whole_batch(make(manifest()).await).await;
    unknown_dataset_is_an_error(make(manifest()).await).await;
    reads_are_ordered_limited_and_carry_the_head(make(manifest()).await).await;
    long_poll_wakes_on_publish(make(manifest()).await).await;
    snapshot_pages_hold_the_latest_state_with_tombstones(make(manifest()).await).await;
    digests_describe_the_compacted_state(make(manifest()).await).await;
}

async fn positions_start_at_one_and_are_dense<T: Feed + Publisher>(feed: T) {
    let r = feed
        .publish(
            "items",
            vec![
                ChangeInput::upsert("a", 1, fields(1)),
                ChangeInput::upsert("b", 1, fields(2)),
            ],
        )
        .await
        .expect("publish");
    assert_eq!(r.positions, vec![Some(1), Some(2)], "positions start at 1");
    assert_eq!(r.head, 2);
    let r = feed
        .publish("items", vec![ChangeInput::delete("a", 2)])
        .await
        .expect("publish");
    assert_eq!(r.positions, vec![Some(3)], "positions are dense");
}

/// A batch of [`MAX_BATCH`] changes, each to another key, is appended
/// whole: every change once, at the position its receipt names. (Order
/// across keys is not promised: a JetStream publish sends a batch's keys
/// at once, and they land in the order the server takes them.)
async fn the_largest_batch_is_taken_whole<T: Feed + Publisher>(feed: T) {
    let batch: Vec<ChangeInput> = (0..MAX_BATCH as i64)
        .map(|i| ChangeInput::upsert(format!("k{i}"), 1, fields(i)))
        .collect();
    let r = feed.publish("items", batch).await.expect("publish");
    assert_eq!(r.ignored, 0);
    assert_eq!(r.head, MAX_BATCH as Position);
    let (entries, _) = read_n(&feed, 0, MAX_BATCH, MAX_BATCH).await;
    for (i, p) in r.positions.iter().enumerate() {
        let p = p.expect("every change is appended");
        assert_eq!(
            entries[p as usize - 1].change.key,
            format!("k{i}"),
            "change {i} is at the position its receipt names"
        );
    }
    let too_many: Vec<ChangeInput> = (0..=MAX_BATCH as i64)
        .map(|i| ChangeInput::upsert(format!("k{i}"), 2, fields(i)))
        .collect();
    let e = feed
        .publish("items", too_many)
        .await
        .expect_err("one change more than the limit is refused");
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
}

async fn stale_and_duplicate_changes_are_ignored<T: Feed + Publisher>(feed: T) {
    feed.publish("items", vec![ChangeInput::upsert("a", 5, fields(5))])
        .await
        .expect("publish");
    let r = feed
        .publish(
            "items",
            vec![
                ChangeInput::upsert("a", 5, fields(50)),
                ChangeInput::upsert("a", 3, fields(3)),
                ChangeInput::upsert("a", 6, fields(6)),
                ChangeInput::upsert("a", 6, fields(60)),
            ],
        )
        .await
        .expect("a retried batch is not an error");
    assert_eq!(
        r.positions,
        vec![None, None, Some(2), None],
        "only the newer version is appended"
    );
    assert_eq!(r.ignored, 3);
    let (entries, head) = read_n(&feed, 0, 100, 2).await;
    assert_eq!(head, 2, "ignored changes are not in the log");
    assert_eq!(entries[1].change.fields["n"], json!(6));
}

async fn an_invalid_change_rejects_the_whole_batch<T: Feed + Publisher>(feed: T) {
    let bad_type = json!({ "n": "not a number" })
        .as_object()
        .cloned()
        .unwrap_or_default();
    let e = feed
        .publish(
            "items",
            vec![
                ChangeInput::upsert("ok", 1, fields(1)),
                ChangeInput::upsert("bad", 1, bad_type),
            ],
        )
        .await
        .expect_err("a wrongly typed field fails the batch");
    match e {
        FeedError::Invalid { index, message } => {
            assert_eq!(index, 1, "the error names the change");
            assert!(message.contains("field 'n' must be int"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let e = feed
        .publish("items", vec![ChangeInput::upsert("k", 0, fields(1))])
        .await
        .expect_err("version 0");
    assert!(matches!(e, FeedError::Invalid { index: 0, .. }), "{e:?}");
    let e = feed
        .publish("items", vec![ChangeInput::upsert("", 1, fields(1))])
        .await
        .expect_err("empty key");
    assert!(matches!(e, FeedError::Invalid { index: 0, .. }), "{e:?}");
    let b = feed
        .read("items", 0, 100, Duration::ZERO)
        .await
        .expect("read");
    assert!(b.entries.is_empty() && b.head == 0, "nothing was appended");
    let snap = feed.snapshot("items", None, 100).await.expect("snapshot");
    assert!(
        snap.records.is_empty(),
        "nothing reached the compacted state"
    );
}

async fn unknown_dataset_is_an_error<T: Feed + Publisher>(feed: T) {
    let e = feed
        .publish("nope", vec![])
        .await
        .expect_err("unknown dataset");
    assert_eq!(e, FeedError::UnknownDataset("nope".into()));
    let e = feed
        .read("nope", 0, 1, Duration::ZERO)
        .await
        .expect_err("unknown dataset");
    assert_eq!(e, FeedError::UnknownDataset("nope".into()));
}

async fn reads_are_ordered_limited_and_carry_the_head<T: Feed + Publisher>(feed: T) {
    let empty = feed
        .read("items", 0, 10, Duration::from_millis(20))
        .await
        .expect("read");
    assert!(empty.entries.is_empty());
    assert_eq!(empty.head, 0);
    assert!(
        empty.hub_time_ms > 0,
        "an empty answer carries the feed's clock"
    );
    let batch: Vec<_> = (1..=25)
        .map(|i| ChangeInput::upsert(format!("k{i:02}"), 1, fields(i)))
        .collect();
    feed.publish("items", batch).await.expect("publish");
    let (first, head) = read_n(&feed, 0, 10, 10).await;
    assert_eq!(
        first.iter().map(|e| e.position).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(head, 25, "head is the last appended position");
    let (tail, _) = read_n(&feed, 20, 10, 5).await;
    assert_eq!(
        tail.iter().map(|e| e.position).collect::<Vec<_>>(),
        (21..=25).collect::<Vec<_>>()
    );
    assert_eq!(tail[0].change.key, "k21");
    assert_eq!(tail[0].change.owner, "owner-svc");
    let b = feed
        .read("items", 25, 10, Duration::ZERO)
        .await
        .expect("read at head");
    assert!(b.entries.is_empty() && b.head == 25);
}

/// Reads from `after` until `n` entries came back, never asking for more
/// than `limit` at once and checking that no answer exceeds what was asked.
/// A streaming feed may answer with fewer entries than the limit while the
/// rest are still in flight to it; the contract allows that.
async fn read_n<T: Feed>(
    feed: &T,
    after: Position,
    limit: usize,
    n: usize,
) -> (Vec<FeedEntry>, Position) {
    let mut entries: Vec<FeedEntry> = Vec::new();
    let mut head = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while entries.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} entries arrived",
            entries.len()
        );
        let ask = limit.min(n - entries.len());
        let from = entries.last().map_or(after, |e| e.position);
        let b = feed
            .read("items", from, ask, Duration::from_millis(200))
            .await
            .expect("read");
        assert!(
            b.entries.len() <= ask,
            "asked for {ask}, got {}",
            b.entries.len()
        );
        head = b.head;
        entries.extend(b.entries);
    }
    (entries, head)
}

async fn long_poll_wakes_on_publish<T: Feed + Publisher + 'static>(feed: T) {
    let feed = std::sync::Arc::new(feed);
    let reader = {
        let feed = feed.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let b = feed
                .read("items", 0, 10, Duration::from_secs(20))
                .await
                .expect("read");
            (b, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    feed.publish("items", vec![ChangeInput::upsert("x", 1, fields(1))])
        .await
        .expect("publish");
    let (b, waited) = reader.await.expect("reader task");
    assert_eq!(b.entries.len(), 1, "the waiting read returns the new entry");
    assert!(
        waited < Duration::from_secs(10),
        "the read woke on publish instead of timing out ({waited:?})"
    );
}

async fn snapshot_pages_hold_the_latest_state_with_tombstones<T: Feed + Publisher>(feed: T) {
    let batch: Vec<_> = (0..30)
        .map(|i| ChangeInput::upsert(format!("k{i:02}"), 1, fields(i)))
        .collect();
    feed.publish("items", batch).await.expect("publish");
    feed.publish(
        "items",
        vec![
            ChangeInput::upsert("k05", 2, fields(500)),
            ChangeInput::delete("k07", 2),
        ],
    )
    .await
    .expect("publish");

    // The compacted state may trail the log (JetStream maintains it
    // asynchronously), but a snapshot plus a replay from its head converges
    // at every instant: that is the contract bootstrap relies on.
    let mut expected = MemoryCopy::new();
    for e in read_n(&feed, 0, 1000, 32).await.0 {
        expected.apply(&e.change, 0);
    }
    let (copy, head) = snapshot_then_replay(&feed).await;
    assert_eq!(
        copy.live(),
        expected.live(),
        "snapshot + replay from its head equals the log's result"
    );

    // And the compacted state catches up with the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut head = head;
    while head < 32 {
        assert!(
            Instant::now() < deadline,
            "the snapshot head never reached the log head (stuck at {head})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        head = feed
            .snapshot("items", None, 1)
            .await
            .expect("snapshot")
            .head;
    }
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = feed
            .snapshot("items", after.as_deref(), 7)
            .await
            .expect("snapshot");
        assert!(page.records.len() <= 7, "a page respects the limit");
        pages += 1;
        all.extend(page.records);
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => break,
        }
        assert!(pages < 100, "snapshot paging terminates");
    }
    assert!(
        pages >= 5,
        "30 records in pages of 7 take at least 5 pages, took {pages}"
    );
    let mut keys: Vec<_> = all.iter().map(|c| c.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(
        (keys.len(), all.len()),
        (30, 30),
        "exactly one record per key"
    );
    let k05 = all.iter().find(|c| c.key == "k05").expect("k05");
    assert_eq!(
        (k05.version, k05.fields["n"].clone()),
        (2, json!(500)),
        "latest version"
    );
    let k07 = all.iter().find(|c| c.key == "k07").expect("k07");
    assert_eq!(k07.op, Op::Delete, "tombstones are part of the snapshot");
    let schema = feed.schema("items").await.expect("schema");
    assert_eq!(schema.fields.len(), 2);
}

/// Every key's latest `(version, deleted)` by the log, as digests see it.
async fn expected_entries<T: Feed>(feed: &T, n: usize) -> Vec<DigestEntry> {
    let mut latest: std::collections::BTreeMap<String, (u64, bool)> = Default::default();
    for e in read_n(feed, 0, 1000, n).await.0 {
        let c = e.change;
        if latest.get(&c.key).is_none_or(|&(v, _)| v < c.version) {
            latest.insert(c.key, (c.version, c.op == Op::Delete));
        }
    }
    latest
        .into_iter()
        .map(|(k, (v, d))| DigestEntry::new(k, v, d))
        .collect()
}

async fn all_bucket_entries<T: Feed>(feed: &T) -> Vec<DigestEntry> {
    let all: Vec<u16> = (0..BUCKETS as u16).collect();
    let mut out = Vec::new();
    for chunk in all.chunks(MAX_DIGEST_BUCKETS) {
        out.extend(
            feed.bucket_entries("items", chunk)
                .await
                .expect("bucket entries"),
        );
    }
    out.sort();
    out
}

/// The feed's digest nodes and bucket entries equal those of `expected`.
async fn check_digests<T: Feed>(feed: &T, expected: Vec<DigestEntry>) {
    let scratch = Digest::from_entries(
        expected
            .iter()
            .map(|e| (e.key.as_str(), e.version, e.deleted)),
    );
    for q in [
        DigestQuery::root(),
        DigestQuery::level(1),
        DigestQuery::under(2, vec![0, 17, 63]),
    ] {
        assert_eq!(
            feed.digest("items", &q).await.expect("digest"),
            scratch.nodes(&q).expect("query"),
            "the digest ({q:?}) equals the one computed from the latest state"
        );
    }
    assert_eq!(
        all_bucket_entries(feed).await,
        expected,
        "bucket entries list every key's latest state, tombstones included"
    );
}

/// Digests, bucket entries and records describe the compacted state —
/// latest version per key, tombstones included — at the time of the call.
async fn digests_describe_the_compacted_state<T: Feed + Publisher>(feed: T) {
    let root = feed
        .digest("items", &DigestQuery::root())
        .await
        .expect("digest of an empty dataset");
    assert_eq!(root.nodes.len(), 1);
    assert_eq!(root.nodes[0].1 .0, 0, "an empty dataset's root is zero");
    let batch: Vec<_> = (0..40)
        .map(|i| ChangeInput::upsert(format!("d{i:02}"), 1, fields(i)))
        .collect();
    feed.publish("items", batch).await.expect("publish");
    feed.publish(
        "items",
        vec![
            ChangeInput::upsert("d03", 4, fields(3)),
            ChangeInput::delete("d09", 2),
            ChangeInput::upsert("d09", 1, fields(9)), // stale: ignored
        ],
    )
    .await
    .expect("publish");
    check_digests(&feed, expected_entries(&feed, 42).await).await;
    let keys: Vec<String> = ["d03", "d09", "never-published"].map(String::from).to_vec();
    let mut records = feed.records("items", &keys).await.expect("records");
    records.sort_by(|a, b| a.key.cmp(&b.key));
    let got: Vec<(String, u64, Op)> = records
        .into_iter()
        .map(|c| (c.key, c.version, c.op))
        .collect();
    assert_eq!(
        got,
        vec![("d03".into(), 4, Op::Upsert), ("d09".into(), 2, Op::Delete)],
        "records: latest state, tombstones included, absent keys left out"
    );
    // A later change shows in the next answer (no stale cached digest).
    feed.publish("items", vec![ChangeInput::upsert("d03", 5, fields(30))])
        .await
        .expect("publish");
    check_digests(&feed, expected_entries(&feed, 43).await).await;
    let e = feed
        .bucket_entries("items", &[BUCKETS as u16])
        .await
        .expect_err("bucket out of range");
    assert!(matches!(e, FeedError::BadRequest(_)), "{e:?}");
    let e = feed
        .digest("items", &DigestQuery::level(3))
        .await
        .expect_err("level out of range");
    assert!(matches!(e, FeedError::BadRequest(_)), "{e:?}");
    let e = feed
        .digest("nope", &DigestQuery::root())
        .await
        .expect_err("unknown dataset");
    assert_eq!(e, FeedError::UnknownDataset("nope".into()));
}

/// Bootstraps a model copy the way the agent does: every snapshot page, then
/// the log after the first page's head. Returns the copy and that head.
pub async fn snapshot_then_replay<T: Feed>(feed: &T) -> (MemoryCopy, u64) {
    let mut copy = MemoryCopy::new();
    let mut after: Option<String> = None;
    let mut head = None;
    loop {
        let page = feed
            .snapshot("items", after.as_deref(), 7)
            .await
            .expect("snapshot");
        head.get_or_insert(page.head);
        for c in &page.records {
            copy.apply(c, 0);
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    let head = head.unwrap_or(0);
    let mut position = head;
    loop {
        let b = feed
            .read("items", position, 1000, Duration::ZERO)
            .await
            .expect("replay");
        for e in &b.entries {
            copy.apply(&e.change, 0);
            position = e.position;
        }
        if position >= b.head {
            break;
        }
    }
    (copy, head)
}
