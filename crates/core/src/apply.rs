//! The apply rule, shared by every copy store.
//!
//! ```text
//!   incoming change (key, version, op)
//!            │
//!            ▼
//!   local version of key (live record or tombstone), 0 if never seen
//!            │
//!   incoming.version > local? ──no──▶ ignore (duplicate, reordered, or stale)
//!            │yes
//!            ▼
//!   upsert → write record, drop tombstone;  delete → remove record, keep tombstone
//! ```
//!
//! Because the decision depends only on versions, applying any set of changes
//! in any order, with any duplicates, converges to the state of applying them
//! once in version order. Tombstones are what stop an old upsert arriving
//! after a delete from resurrecting the record; they are garbage-collected
//! after a horizon that bounds how late a reordered change may arrive.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::change::{Change, Op, Version};
use crate::duration::Duration;

/// What to do with an incoming change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Apply,
    Ignore,
}

/// The rule itself: apply only when the incoming version is newer.
pub fn decide(local: Option<Version>, incoming: Version) -> Decision {
    if incoming > local.unwrap_or(0) {
        Decision::Apply
    } else {
        Decision::Ignore
    }
}

/// A record's state in a copy: live with fields, or a tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordState {
    pub version: Version,
    /// `Some(t)` for a tombstone, with the copy-side time it was written.
    pub deleted_at_ms: Option<u64>,
    pub fields: Map<String, Value>,
}

impl RecordState {
    pub fn is_deleted(&self) -> bool {
        self.deleted_at_ms.is_some()
    }
}

/// A pure in-memory copy: the reference model for the apply rule, used by
/// the in-memory copy store and by property tests of the real stores.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryCopy {
    records: BTreeMap<String, RecordState>,
}

impl MemoryCopy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one change at copy time `now_ms`; returns whether it changed the copy.
    pub fn apply(&mut self, change: &Change, now_ms: u64) -> bool {
        let local = self.records.get(&change.key).map(|r| r.version);
        if decide(local, change.version) == Decision::Ignore {
            return false;
        }
        let state = match change.op {
            Op::Upsert => RecordState {
                version: change.version,
                deleted_at_ms: None,
                fields: change.fields.clone(),
            },
            Op::Delete => RecordState {
                version: change.version,
                deleted_at_ms: Some(now_ms),
                fields: Map::new(),
            },
        };
        self.records.insert(change.key.clone(), state);
        true
    }

    /// Drops `key`'s state outright (no tombstone) and returns it. This is
    /// not a change and bypasses the rule: only reconciliation uses it, for
    /// rows the source does not hold (see `CopyStore::remove` in `spoke`).
    pub fn remove(&mut self, key: &str) -> Option<RecordState> {
        self.records.remove(key)
    }

    /// Removes `names` from every record's fields (a copy whose projection
    /// narrowed). Versions and tombstones stay as they are.
    pub fn drop_fields(&mut self, names: &[String]) {
        for r in self.records.values_mut() {
            r.fields.retain(|k, _| !names.contains(k));
        }
    }

    /// Drops tombstones older than `horizon` at `now_ms`; returns how many.
    pub fn gc_tombstones(&mut self, now_ms: u64, horizon: Duration) -> usize {
        let before = self.records.len();
        self.records.retain(|_, r| match r.deleted_at_ms {
            Some(t) => now_ms.saturating_sub(t) < horizon.as_millis(),
            None => true,
        });
        before - self.records.len()
    }

    /// The live record for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&RecordState> {
        self.records.get(key).filter(|r| !r.is_deleted())
    }

    /// Every state including tombstones.
    pub fn states(&self) -> &BTreeMap<String, RecordState> {
        &self.records
    }

    /// Live records only: key → (version, fields). Tombstone timestamps are
    /// copy-local, so comparisons between copies use this view plus
    /// [`MemoryCopy::tombstones`].
    pub fn live(&self) -> BTreeMap<&str, (Version, &Map<String, Value>)> {
        self.records
            .iter()
            .filter(|(_, r)| !r.is_deleted())
            .map(|(k, r)| (k.as_str(), (r.version, &r.fields)))
            .collect()
    }

    /// Tombstones only: key → version.
    pub fn tombstones(&self) -> BTreeMap<&str, Version> {
        self.records
            .iter()
            .filter(|(_, r)| r.is_deleted())
            .map(|(k, r)| (k.as_str(), r.version))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn change(key: &str, version: Version, op: Op, n: i64) -> Change {
        let mut fields = Map::new();
        if op == Op::Upsert {
            fields.insert("n".into(), json!(n));
        }
        Change {
            dataset: "d".into(),
            key: key.into(),
            version,
            op,
            fields,
            owner: "o".into(),
            ts: 0,
            schema_version: 1,
        }
    }

    #[test]
    fn old_upsert_cannot_resurrect_a_delete() {
        let mut c = MemoryCopy::new();
        assert!(c.apply(&change("a", 2, Op::Delete, 0), 10));
        assert!(!c.apply(&change("a", 1, Op::Upsert, 1), 11));
        assert!(c.get("a").is_none());
        assert!(c.apply(&change("a", 3, Op::Upsert, 3), 12));
        assert_eq!(c.get("a").unwrap().version, 3);
    }

    #[test]
    fn equal_version_is_ignored() {
        let mut c = MemoryCopy::new();
        assert!(c.apply(&change("a", 1, Op::Upsert, 1), 0));
        assert!(!c.apply(&change("a", 1, Op::Upsert, 99), 0));
        assert_eq!(c.get("a").unwrap().fields["n"], json!(1));
    }

    #[test]
    fn tombstones_are_collected_after_the_horizon() {
        let mut c = MemoryCopy::new();
        c.apply(&change("a", 1, Op::Delete, 0), 1_000);
        c.apply(&change("b", 1, Op::Upsert, 0), 1_000);
        assert_eq!(c.gc_tombstones(1_500, Duration::from_secs(1)), 0);
        assert_eq!(c.gc_tombstones(2_000, Duration::from_secs(1)), 1);
        assert_eq!(c.states().len(), 1);
    }

    /// Per key, a history of ops with strictly increasing versions, as an
    /// owner would commit them.
    fn histories() -> impl Strategy<Value = Vec<Change>> {
        prop::collection::vec(
            (
                0u8..12,
                prop::collection::vec((1u64..4, any::<bool>(), any::<i64>()), 1..8),
            ),
            0..20,
        )
        .prop_map(|keys| {
            let mut out = Vec::new();
            for (k, ops) in keys {
                let key = format!("k{k}");
                let mut v = out
                    .iter()
                    .filter(|c: &&Change| c.key == key)
                    .map(|c| c.version)
                    .max()
                    .unwrap_or(0);
                for (step, del, n) in ops {
                    v += step;
                    let op = if del { Op::Delete } else { Op::Upsert };
                    out.push(change(&key, v, op, n));
                }
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Rule 1 (convergence): any order, any duplicates, same copy.
        #[test]
        fn any_order_with_duplicates_converges(
            changes in histories(),
            seed in any::<u64>(),
            dup_mask in prop::collection::vec(0u8..3, 0..200),
        ) {
            let mut in_order = changes.clone();
            in_order.sort_by_key(|c| c.version);
            let mut expected = MemoryCopy::new();
            for c in &in_order {
                expected.apply(c, 0);
            }

            let mut shuffled: Vec<Change> = Vec::new();
            for (i, c) in changes.iter().enumerate() {
                let copies = 1 + dup_mask.get(i).copied().unwrap_or(0) as usize;
                shuffled.extend(std::iter::repeat_n(c.clone(), copies));
            }
            // Deterministic Fisher–Yates from the seed.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut got = MemoryCopy::new();
            for c in &shuffled {
                got.apply(c, 0);
            }
            prop_assert_eq!(got.live(), expected.live());
            prop_assert_eq!(got.tombstones(), expected.tombstones());
        }
    }
}
