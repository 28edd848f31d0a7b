//! Reconciliation against a JetStream feed (real NATS): a copy built from
//! the feed's log is damaged — rows lost, rolled back, a tombstone flipped,
//! a foreign row added — and one reconcile repairs exactly that damage,
//! reading the feed's digest from the last message per key subject. A
//! change published afterwards is found by the next run, which reads only
//! what was appended since (the digest cache catches up).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{conformance as copy_conformance, Advance, CopySpec, CopyStore};
use spoke::feed::conformance::manifest;
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::feed::{ChangeInput, Feed, Publisher};
use spoke::reconcile::{Progress, Reconciler, RepairCounts, RepairKind};
use spoke::testing::{nats_delete_streams, nats_or_skip, unique_name};
use spoke_core::digest::{DigestEntry, DigestQuery};
use spoke_core::Change;

fn fields(n: i64) -> serde_json::Map<String, serde_json::Value> {
    json!({ "n": n }).as_object().cloned().unwrap_or_default()
}

const LOCAL: Advance = Advance {
    position: None,
    fresh_as_of_ms: None,
    from_feed: false,
};

/// Applies the whole log to the copy, as an agent following the feed would.
async fn follow(feed: &JetStreamFeed, store: &dyn CopyStore, spec: &CopySpec, from: u64) -> u64 {
    let mut position = from;
    loop {
        let b = feed
            .read("items", position, 1000, Duration::from_millis(200))
            .await
            .expect("read the log");
        if let Some(last) = b.entries.last() {
            position = last.position;
        }
        let changes: Vec<Change> = b
            .entries
            .into_iter()
            .map(|e| {
                let mut c = e.change;
                c.fields = spec.projection.apply(&c.fields);
                c
            })
            .collect();
        store
            .apply(
                "items",
                &changes,
                copy_conformance::feed_advance(position, 1),
            )
            .await
            .expect("apply");
        if position >= b.head {
            return position;
        }
    }
}

async fn root(feed: &dyn Feed) -> u128 {
    feed.digest("items", &DigestQuery::root())
        .await
        .expect("feed digest")
        .nodes[0]
        .1
         .0
}

#[tokio::test]
async fn a_damaged_copy_is_repaired_exactly_against_a_jetstream_feed() {
    let Some(url) = nats_or_skip("reconcile against jetstream").await else {
        return;
    };
    let prefix = unique_name("spokerecjs");
    let mut o = JetStreamOptions::new(&url);
    o.stream_prefix = prefix.to_uppercase();
    o.subject_prefix = prefix.clone();
    let m = manifest();
    let feed = JetStreamFeed::connect(o, &m).await.expect("connect");

    // The owner's history: 200 keys; a few updated to v3, a few deleted at v2.
    let batch: Vec<_> = (0..200)
        .map(|i| ChangeInput::upsert(format!("k{i:03}"), 1, fields(i)))
        .collect();
    feed.publish("items", batch).await.expect("publish");
    let mut more: Vec<_> = (0..10)
        .map(|i| ChangeInput::upsert(format!("k{i:03}"), 3, fields(1000 + i)))
        .collect();
    more.extend((10..15).map(|i| ChangeInput::delete(format!("k{i:03}"), 2)));
    feed.publish("items", more).await.expect("publish");

    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteCopyStore::open(&dir.path().join("copy.db")).expect("open copy");
    let sub = m.subscription("reader-svc", "items").expect("subscription");
    let spec = CopySpec::of(&m, sub).expect("spec");
    store.ensure_copy(&spec).await.expect("ensure copy");
    let position = follow(&feed, &store, &spec, 0).await;
    assert_eq!(position, 215);
    assert_eq!(
        store.digest("items").await.expect("copy digest").root(),
        root(&feed).await,
        "a copy that followed the whole log matches the feed's digest"
    );

    // Damage: 3 rows lost, 2 rolled back, 1 tombstone flipped to a live
    // row at the same version, 1 foreign row.
    let lost = ["k100", "k101", "k102"];
    let before = store.dump("items").await.expect("dump");
    let entries = |keys: &[&str]| -> Vec<DigestEntry> {
        keys.iter()
            .map(|k| {
                let (v, d, _) = &before[*k];
                DigestEntry::new(*k, *v, *d)
            })
            .collect()
    };
    let gone = entries(&lost);
    assert_eq!(store.remove("items", &gone).await.expect("remove"), 3);
    let rolled = entries(&["k000", "k001"]);
    store.remove("items", &rolled).await.expect("remove");
    let flipped = entries(&["k010"]);
    store.remove("items", &flipped).await.expect("remove");
    let older = |key: &str, version: u64| Change {
        fields: spec.projection.apply(&fields(-1)),
        ..copy_conformance::upsert(key, version, -1)
    };
    store
        .apply(
            "items",
            &[
                older("k000", 1),
                older("k001", 2),
                older("k010", 2),
                older("zz-foreign", 7),
            ],
            LOCAL,
        )
        .await
        .expect("damage");
    assert_ne!(
        store.digest("items").await.expect("copy digest").root(),
        root(&feed).await
    );

    let no_progress = |_: Progress| {};
    let report = Reconciler::new(&feed, &store, &spec)
        .run(&no_progress)
        .await
        .expect("reconcile");
    assert_eq!(
        report.repaired,
        RepairCounts {
            missing: 3,
            stale: 3,
            extra: 1
        },
        "exactly the damage is repaired: {:?}",
        report.repairs
    );
    let by_kind = |kind: RepairKind| -> BTreeSet<&str> {
        report
            .repairs
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.key.as_str())
            .collect()
    };
    assert_eq!(by_kind(RepairKind::Missing), BTreeSet::from(lost));
    assert_eq!(
        by_kind(RepairKind::Stale),
        BTreeSet::from(["k000", "k001", "k010"])
    );
    assert_eq!(by_kind(RepairKind::Extra), BTreeSet::from(["zz-foreign"]));
    assert!(report.ahead.is_empty());
    assert!(report.in_sync_after, "digests equal after the repair");
    assert!(
        report.buckets_differing <= 7,
        "only the damaged buckets are read ({} differed)",
        report.buckets_differing
    );
    let dump = store.dump("items").await.expect("dump");
    assert_eq!(
        dump.len(),
        200,
        "200 keys, tombstones included, no foreign row"
    );
    assert_eq!(dump["k000"].0, 3);
    assert!(dump["k010"].1, "k010 is a tombstone again");
    assert_eq!(
        dump["k100"].2["n"],
        json!(100),
        "lost rows are back with their fields"
    );

    // A change the copy has not seen: the next run finds just that one,
    // after the feed's cached digest caught up with the new message.
    feed.publish("items", vec![ChangeInput::upsert("k150", 2, fields(1500))])
        .await
        .expect("publish");
    let again = Reconciler::new(&feed, &store, &spec)
        .run(&no_progress)
        .await
        .expect("reconcile");
    assert_eq!(
        again.repaired,
        RepairCounts {
            missing: 0,
            stale: 1,
            extra: 0
        }
    );
    assert_eq!(again.repairs[0].key, "k150");
    let got = store
        .get("items", "k150")
        .await
        .expect("get")
        .expect("k150");
    assert_eq!((got.version, got.fields["n"].clone()), (2, json!(1500)));

    // A fresh process (empty cache) computes the same digest from scratch.
    let mut o = JetStreamOptions::new(&url);
    o.stream_prefix = prefix.to_uppercase();
    o.subject_prefix = prefix.clone();
    let fresh = JetStreamFeed::connect(o, &m).await.expect("connect");
    assert_eq!(root(&fresh).await, root(&feed).await);
    assert_eq!(
        store.digest("items").await.expect("copy digest").root(),
        root(&fresh).await
    );
    nats_delete_streams(&url, &prefix.to_uppercase()).await;
}
