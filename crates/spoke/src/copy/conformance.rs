//! The conformance suite every copy store must pass; see the contract at the
//! top of [`crate::copy`]. Backends call [`run`] with a constructor that
//! takes the clock the store must use for tombstone times.

use std::future::Future;

use serde_json::{json, Map, Value};
use spoke_core::{Change, Op, Projection, Schema, Version};

use spoke_core::digest::{Digest, DigestEntry, BUCKETS};

use super::{Advance, CopySpec, CopyStore, Cursor, Held, ReconcileRun, ReconcileStats, StoreError};
use crate::clock::Clock;

pub fn schema() -> Schema {
    let mut s = Schema::default();
    for (n, t) in [
        ("n", "int"),
        ("label", "string?"),
        ("flag", "bool?"),
        ("score", "float?"),
        ("at", "timestamp?"),
        ("meta", "json?"),
        ("secret", "string?"),
    ] {
        s.fields.insert(n.into(), t.parse().expect("type"));
    }
    s
}

/// The copy every rule uses: dataset `items` owned by `owner-svc`, projecting
/// everything but `secret`.
pub fn spec() -> CopySpec {
    let names: Vec<String> = ["n", "label", "flag", "score", "at", "meta"]
        .map(String::from)
        .to_vec();
    CopySpec {
        dataset: "items".into(),
        owner: "owner-svc".into(),
        key_name: "id".into(),
        projection: Projection::new(&schema(), &names).expect("projection"),
    }
}

pub fn upsert(key: &str, version: Version, n: i64) -> Change {
    let fields = spec()
        .projection
        .apply(json!({ "n": n }).as_object().expect("object"));
    Change {
        dataset: "items".into(),
        key: key.into(),
        version,
        op: Op::Upsert,
        fields,
        owner: "owner-svc".into(),
        ts: 1,
        schema_version: 1,
    }
}

pub fn delete(key: &str, version: Version) -> Change {
    Change {
        op: Op::Delete,
        fields: Map::new(),
        ..upsert(key, version, 0)
    }
}

pub fn feed_advance(position: u64, fresh_as_of_ms: u64) -> Advance {
    Advance {
        position: Some(position),
        fresh_as_of_ms: Some(fresh_as_of_ms),
        from_feed: true,
    }
}

const BOOTSTRAP: Advance = Advance {
    position: None,
    fresh_as_of_ms: None,
    from_feed: false,
};

/// Runs every rule against a fresh store from `make` (called once per rule).
pub async fn run<F, Fut, T>(make: F)
where
    F: Fn(Clock) -> Fut,
    Fut: Future<Output = T>,
    T: CopyStore,
{
    newer_versions_apply_and_others_are_ignored(make(Clock::manual(1_000)).await).await;
    tombstones_stop_resurrection(make(Clock::manual(1_000)).await).await;
    cursor_moves_with_the_batch(make(Clock::manual(1_000)).await).await;
    field_types_round_trip(make(Clock::manual(1_000)).await).await;
    tombstones_are_collected_after_the_horizon(make(Clock::manual(1_000)).await).await;
    unknown_copies_are_errors(make(Clock::manual(1_000)).await).await;
    digest_follows_every_write(make(Clock::manual(1_000)).await).await;
    remove_drops_only_the_state_it_names(make(Clock::manual(1_000)).await).await;
    reconcile_stats_accumulate(make(Clock::manual(1_000)).await).await;
    held_changes_are_kept_once_and_released(make(Clock::manual(1_000)).await).await;
    a_narrower_projection_applies_in_place(make(Clock::manual(1_000)).await).await;
}

async fn held_changes_are_kept_once_and_released<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    assert_eq!(store.held_count("items").await.unwrap(), 0);
    let held = |key: &str, version: Version, position: Option<u64>, at: u64| Held {
        change: upsert(key, version, 7),
        position,
        reason: format!("reason {key}"),
        held_at_ms: at,
    };
    let a = held("a", 2, Some(5), 10);
    let b = held("b", 1, None, 11);
    let c = held("c", 4, Some(6), 12);
    store
        .hold("items", &[a.clone(), b.clone()])
        .await
        .expect("hold");
    let mut a_again = a.clone();
    a_again.reason = "another reason".into();
    store
        .hold("items", &[a_again, c.clone()])
        .await
        .expect("hold again");
    assert_eq!(
        store.held_count("items").await.unwrap(),
        3,
        "once per key and version"
    );
    let all = store.held("items", 10).await.unwrap();
    assert_eq!(
        all,
        [a.clone(), b.clone(), c.clone()],
        "oldest first, the first reason kept, the change as it was held"
    );
    assert_eq!(
        store.held("items", 1).await.unwrap(),
        std::slice::from_ref(&a)
    );
    let gone = store
        .release("items", &[("a".into(), 2), ("b".into(), 9)])
        .await
        .unwrap();
    assert_eq!(gone, 1, "only a (key, version) that is held is released");
    assert_eq!(store.held("items", 10).await.unwrap(), [b, c]);
    assert!(
        store.dump("items").await.unwrap().is_empty(),
        "held changes are not in the copy"
    );
}

async fn a_narrower_projection_applies_in_place<T: CopyStore>(store: T) {
    let wide = spec();
    store.ensure_copy(&wide).await.expect("ensure");
    let mut rec = upsert("a", 1, 1);
    rec.fields.insert("label".into(), json!("kept?"));
    store
        .apply(
            "items",
            &[rec, upsert("b", 2, 2), delete("c", 3)],
            feed_advance(3, 900),
        )
        .await
        .expect("apply");
    let digest = store.digest("items").await.unwrap();
    let names: Vec<String> = ["n", "flag", "score", "at", "meta"]
        .map(String::from)
        .to_vec();
    let mut narrow = wide.clone();
    narrow.projection = Projection::new(&schema(), &names).expect("projection");
    store
        .ensure_copy(&narrow)
        .await
        .expect("dropping a field is done in place");
    store.ensure_copy(&narrow).await.expect("idempotent");
    let dump = store.dump("items").await.unwrap();
    assert_eq!(dump.len(), 3, "records and tombstones stay");
    assert!(!dump["a"].2.contains_key("label"), "{:?}", dump["a"]);
    assert_eq!(dump["a"].2["n"], json!(1));
    assert_eq!(
        store.digest("items").await.unwrap(),
        digest,
        "the digest does not cover fields"
    );
    assert_eq!(store.cursor("items").await.unwrap().position, Some(3));
    let mut next = upsert("a", 5, 9);
    next.fields.remove("label");
    store
        .apply("items", &[next], feed_advance(4, 901))
        .await
        .expect("apply after narrowing");
    assert_eq!(
        store.get("items", "a").await.unwrap().unwrap().fields["n"],
        json!(9)
    );
    // Widening back, or adding a field, needs the records the copy never kept.
    let e = store
        .ensure_copy(&wide)
        .await
        .expect_err("widening needs a rebuild");
    assert!(
        matches!(e, StoreError::Layout(ref m) if m.contains("cannot become in place")),
        "{e:?}"
    );
}

/// The digest computed from scratch over every row (tombstones included).
pub async fn digest_from_scratch<T: CopyStore + ?Sized>(store: &T, dataset: &str) -> Digest {
    let dump = store.dump(dataset).await.expect("dump");
    Digest::from_entries(dump.iter().map(|(k, (v, d, _))| (k.as_str(), *v, *d)))
}

async fn assert_digest_matches<T: CopyStore>(store: &T, step: &str) {
    let maintained = store.digest("items").await.expect("digest");
    let scratch = digest_from_scratch(store, "items").await;
    assert_eq!(
        maintained, scratch,
        "{step}: the maintained digest equals the digest computed from scratch"
    );
    let all: Vec<u16> = (0..BUCKETS as u16).collect();
    let mut listed = store.bucket_entries("items", &all).await.expect("entries");
    listed.sort();
    let dump = store.dump("items").await.expect("dump");
    let want: Vec<DigestEntry> = dump
        .iter()
        .map(|(k, (v, d, _))| DigestEntry::new(k.clone(), *v, *d))
        .collect();
    assert_eq!(listed, want, "{step}: bucket entries list every row once");
}

/// A small deterministic generator (the suite runs outside test builds too).
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn digest_follows_every_write<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    assert_eq!(
        store.digest("items").await.expect("digest"),
        Digest::new(),
        "a new copy has the empty digest"
    );
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for round in 0..30u64 {
        // Random keys, versions (duplicates, older, newer), upserts and
        // deletes, in batches as the feed and bootstrap deliver them.
        let n = 1 + rng.below(25);
        let batch: Vec<Change> = (0..n)
            .map(|_| {
                let key = format!("k{}", rng.below(40));
                let version = 1 + rng.below(12);
                if rng.below(4) == 0 {
                    delete(&key, version)
                } else {
                    upsert(&key, version, rng.below(1000) as i64)
                }
            })
            .collect();
        let advance = if round % 3 == 0 {
            BOOTSTRAP
        } else {
            feed_advance(round, 1)
        };
        store.apply("items", &batch, advance).await.expect("apply");
        if round % 5 == 4 {
            assert_digest_matches(&store, &format!("after batch {round}")).await;
        }
    }
    // Removal and tombstone collection keep it too.
    let dump = store.dump("items").await.expect("dump");
    let some: Vec<DigestEntry> = dump
        .iter()
        .take(5)
        .map(|(k, (v, d, _))| DigestEntry::new(k.clone(), *v, *d))
        .collect();
    store.remove("items", &some).await.expect("remove");
    assert_digest_matches(&store, "after remove").await;
    // The clock read 1_000 when every tombstone was written.
    let collected = store
        .gc_tombstones("items", 5_000, 1_000)
        .await
        .expect("gc");
    assert!(
        collected > 0,
        "the random batches left tombstones to collect"
    );
    assert_digest_matches(&store, "after tombstone collection").await;
}

async fn remove_drops_only_the_state_it_names<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    store
        .apply(
            "items",
            &[upsert("a", 2, 2), delete("b", 1), upsert("c", 1, 1)],
            BOOTSTRAP,
        )
        .await
        .expect("apply");
    let n = store
        .remove(
            "items",
            &[
                DigestEntry::new("a", 1, false),   // wrong version
                DigestEntry::new("b", 1, false),   // wrong state
                DigestEntry::new("zzz", 1, false), // absent
                DigestEntry::new("a", 2, false),
                DigestEntry::new("b", 1, true),
            ],
        )
        .await
        .expect("remove");
    assert_eq!(
        n, 2,
        "only rows holding exactly the named state are removed"
    );
    let dump = store.dump("items").await.expect("dump");
    assert_eq!(
        dump.keys().collect::<Vec<_>>(),
        vec!["c"],
        "removed rows leave no tombstone"
    );
    assert_digest_matches(&store, "after remove").await;
    let out = store
        .apply("items", &[upsert("a", 1, 1)], BOOTSTRAP)
        .await
        .expect("apply");
    assert_eq!(
        out.applied, 1,
        "nothing blocks the owner's own (lower) version after a removal"
    );
    assert_digest_matches(&store, "after re-apply").await;
}

async fn reconcile_stats_accumulate<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    assert_eq!(
        store.reconcile_stats("items").await.expect("stats"),
        ReconcileStats::default()
    );
    for (t, m, s, e) in [(100, 1, 2, 3), (200, 0, 1, 0)] {
        store
            .record_reconcile(
                "items",
                &ReconcileRun {
                    started_ms: t,
                    duration_ms: t / 10,
                    missing: m,
                    stale: s,
                    extra: e,
                },
            )
            .await
            .expect("record");
    }
    assert_eq!(
        store.reconcile_stats("items").await.expect("stats"),
        ReconcileStats {
            runs_total: 2,
            last_run_ms: 200,
            last_duration_ms: 20,
            last_repaired: 1,
            repaired_missing_total: 1,
            repaired_stale_total: 3,
            repaired_extra_total: 3,
        }
    );
}

async fn newer_versions_apply_and_others_are_ignored<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    let out = store
        .apply(
            "items",
            &[
                upsert("a", 2, 20),
                upsert("a", 1, 10),
                upsert("a", 2, 99),
                upsert("b", 1, 1),
                upsert("a", 3, 30),
            ],
            feed_advance(5, 7),
        )
        .await
        .expect("apply");
    // Only the newest change per key can survive a batch: a3 and b1 apply;
    // a2 (superseded in the batch), a1 (older) and the duplicate a2 do not.
    assert_eq!(
        (out.applied, out.ignored),
        (2, 3),
        "older, equal and superseded versions are ignored"
    );
    let a = store
        .get("items", "a")
        .await
        .expect("get")
        .expect("a exists");
    assert_eq!((a.version, a.fields["n"].clone()), (3, json!(30)));
    assert_eq!(store.count("items").await.expect("count"), 2);
    assert!(store.get("items", "zzz").await.expect("get").is_none());
}

async fn tombstones_stop_resurrection<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    store
        .apply("items", &[upsert("a", 1, 1), delete("a", 3)], BOOTSTRAP)
        .await
        .expect("apply");
    let out = store
        .apply("items", &[upsert("a", 2, 2)], BOOTSTRAP)
        .await
        .expect("apply");
    assert_eq!(
        out.ignored, 1,
        "an upsert older than the tombstone is ignored"
    );
    assert!(
        store.get("items", "a").await.expect("get").is_none(),
        "the record stays deleted"
    );
    let dump = store.dump("items").await.expect("dump");
    assert_eq!(dump["a"].0, 3);
    assert!(dump["a"].1, "the tombstone is kept");
    assert_eq!(
        store.count("items").await.expect("count"),
        0,
        "tombstones are not counted as records"
    );
    store
        .apply("items", &[upsert("a", 4, 4)], BOOTSTRAP)
        .await
        .expect("apply");
    assert_eq!(
        store
            .get("items", "a")
            .await
            .expect("get")
            .expect("back")
            .version,
        4,
        "a newer upsert revives it"
    );
}

async fn cursor_moves_with_the_batch<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    assert_eq!(
        store.cursor("items").await.expect("cursor"),
        Cursor::default(),
        "a new copy has no position"
    );
    store
        .apply("items", &[upsert("a", 1, 1), upsert("b", 1, 1)], BOOTSTRAP)
        .await
        .expect("bootstrap");
    let c = store.cursor("items").await.expect("cursor");
    assert_eq!(
        (c.position, c.received_total, c.applied_total),
        (None, 0, 2),
        "bootstrap pages do not move the position"
    );
    store
        .apply(
            "items",
            &[],
            Advance {
                position: Some(10),
                fresh_as_of_ms: Some(500),
                from_feed: true,
            },
        )
        .await
        .expect("finish bootstrap");
    store
        .apply(
            "items",
            &[upsert("a", 2, 2), upsert("a", 1, 1)],
            feed_advance(12, 900),
        )
        .await
        .expect("apply");
    let c = store.cursor("items").await.expect("cursor");
    assert_eq!(
        c,
        Cursor {
            position: Some(12),
            fresh_as_of_ms: 900,
            received_total: 2,
            applied_total: 3
        }
    );
    store
        .apply(
            "items",
            &[],
            Advance {
                position: None,
                fresh_as_of_ms: Some(950),
                from_feed: true,
            },
        )
        .await
        .expect("mark fresh");
    assert_eq!(
        store.cursor("items").await.expect("cursor").fresh_as_of_ms,
        950
    );
    assert_eq!(
        store.cursor("items").await.expect("cursor").position,
        Some(12)
    );
}

async fn field_types_round_trip<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    let full = json!({"n": -7, "label": "Zoë 'quoted'", "flag": true, "score": 2.5, "at": "2026-11-28T14:00:00Z", "meta": {"tags": ["a", 1]}, "secret": "x"});
    let fields = spec().projection.apply(full.as_object().expect("object"));
    let c = Change {
        fields,
        ..upsert("k", 1, 0)
    };
    store.apply("items", &[c], BOOTSTRAP).await.expect("apply");
    let got = store.get("items", "k").await.expect("get").expect("k");
    let mut want = full.as_object().cloned().unwrap_or_default();
    want.remove("secret");
    assert_eq!(
        Value::Object(got.fields),
        Value::Object(want),
        "every type round-trips and unprojected fields are absent"
    );
    let sparse = store.get("items", "k").await.expect("get");
    assert!(sparse.is_some());
    store
        .apply("items", &[upsert("s", 1, 1)], BOOTSTRAP)
        .await
        .expect("apply");
    let s = store.get("items", "s").await.expect("get").expect("s");
    assert_eq!(
        s.fields["label"],
        Value::Null,
        "absent optional fields read as null"
    );
}

async fn tombstones_are_collected_after_the_horizon<T: CopyStore>(store: T) {
    store.ensure_copy(&spec()).await.expect("ensure");
    // The store's clock reads 1_000 when the delete is applied.
    store
        .apply(
            "items",
            &[delete("gone", 1), upsert("kept", 1, 1)],
            BOOTSTRAP,
        )
        .await
        .expect("apply");
    assert_eq!(
        store
            .gc_tombstones("items", 1_500, 1_000)
            .await
            .expect("gc"),
        0,
        "within the horizon"
    );
    assert_eq!(
        store
            .gc_tombstones("items", 2_500, 1_000)
            .await
            .expect("gc"),
        1,
        "past the horizon"
    );
    let dump = store.dump("items").await.expect("dump");
    assert_eq!(dump.keys().collect::<Vec<_>>(), vec!["kept"]);
}

async fn unknown_copies_are_errors<T: CopyStore>(store: T) {
    let e = store.cursor("nope").await.expect_err("unknown copy");
    assert!(
        matches!(e, StoreError::UnknownCopy(ref d) if d == "nope"),
        "{e:?}"
    );
    let e = store.get("nope", "k").await.expect_err("unknown copy");
    assert!(matches!(e, StoreError::UnknownCopy(_)), "{e:?}");
}
