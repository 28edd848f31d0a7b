//! An in-memory copy store built on [`spoke_core::MemoryCopy`], the reference
//! model of the apply rule. For tests and in-process wiring.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::{Map, Value};
use spoke_core::digest::{bucket_of, Digest, DigestEntry};
use spoke_core::duration::Duration;
use spoke_core::{Change, MemoryCopy, Op, Version};

use super::{
    narrowing, newest_per_key, Advance, ApplyOutcome, CopyRecord, CopySpec, CopyStore, Cursor,
    Held, ReconcileRun, ReconcileStats, StoreError,
};
use crate::clock::Clock;

/// One copy: its records, cursor, digest and reconcile bookkeeping.
#[derive(Default)]
struct Slot {
    copy: MemoryCopy,
    cursor: Cursor,
    digest: Digest,
    stats: ReconcileStats,
    /// Quarantined changes, oldest first.
    held: Vec<Held>,
    /// The projection's (name, spec) list as JSON, like the SQL stores keep it.
    fields: String,
}

#[derive(Default)]
pub struct MemoryCopyStore {
    clock: Clock,
    copies: Mutex<HashMap<String, Slot>>,
}

impl MemoryCopyStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_clock(clock: Clock) -> Self {
        MemoryCopyStore {
            clock,
            copies: Mutex::default(),
        }
    }

    fn with_slot<R>(&self, dataset: &str, f: impl FnOnce(&mut Slot) -> R) -> Result<R, StoreError> {
        let mut copies = self.copies.lock().expect("memory store");
        copies
            .get_mut(dataset)
            .map(f)
            .ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))
    }
}

#[async_trait]
impl CopyStore for MemoryCopyStore {
    async fn ensure_copy(&self, spec: &CopySpec) -> Result<(), StoreError> {
        let fields = serde_json::to_string(spec.projection.fields())
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut copies = self.copies.lock().expect("memory store");
        let slot = copies.entry(spec.dataset.clone()).or_insert_with(|| Slot {
            fields: fields.clone(),
            ..Slot::default()
        });
        if slot.fields != fields {
            let dropped = narrowing(&slot.fields, spec.projection.fields()).ok_or_else(|| {
                StoreError::Layout(format!(
                    "the copy of {} holds fields {}, but the subscription now projects {fields}, which it cannot become in place",
                    spec.dataset, slot.fields
                ))
            })?;
            slot.copy.drop_fields(&dropped);
            slot.fields = fields;
        }
        Ok(())
    }

    async fn cursor(&self, dataset: &str) -> Result<Cursor, StoreError> {
        self.with_slot(dataset, |s| s.cursor)
    }

    async fn apply(
        &self,
        dataset: &str,
        changes: &[Change],
        advance: Advance,
    ) -> Result<ApplyOutcome, StoreError> {
        let now = self.clock.now_ms();
        self.with_slot(dataset, |slot| {
            let mut out = ApplyOutcome::default();
            for c in newest_per_key(changes) {
                let old = slot
                    .copy
                    .states()
                    .get(&c.key)
                    .map(|r| (r.version, r.is_deleted()));
                if slot.copy.apply(c, now) {
                    out.applied += 1;
                    if let Some((v, d)) = old {
                        slot.digest.toggle(&c.key, v, d);
                    }
                    slot.digest.toggle(&c.key, c.version, c.op == Op::Delete);
                }
            }
            out.ignored = changes.len() as u64 - out.applied;
            let cursor = &mut slot.cursor;
            cursor.applied_total += out.applied;
            if advance.from_feed {
                cursor.received_total += changes.len() as u64;
            }
            if let Some(p) = advance.position {
                cursor.position = Some(p);
            }
            if let Some(f) = advance.fresh_as_of_ms {
                cursor.fresh_as_of_ms = f;
            }
            out
        })
    }

    async fn get(&self, dataset: &str, key: &str) -> Result<Option<CopyRecord>, StoreError> {
        self.with_slot(dataset, |s| {
            s.copy.get(key).map(|r| CopyRecord {
                key: key.to_owned(),
                version: r.version,
                fields: r.fields.clone(),
            })
        })
    }

    async fn count(&self, dataset: &str) -> Result<u64, StoreError> {
        self.with_slot(dataset, |s| s.copy.live().len() as u64)
    }

    async fn gc_tombstones(
        &self,
        dataset: &str,
        now_ms: u64,
        horizon_ms: u64,
    ) -> Result<u64, StoreError> {
        self.with_slot(dataset, |s| {
            let before: Vec<(String, Version)> = s
                .copy
                .tombstones()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            let n = s
                .copy
                .gc_tombstones(now_ms, Duration::from_millis(horizon_ms));
            for (k, v) in before {
                if !s.copy.states().contains_key(&k) {
                    s.digest.toggle(&k, v, true);
                }
            }
            n as u64
        })
    }

    async fn digest(&self, dataset: &str) -> Result<Digest, StoreError> {
        self.with_slot(dataset, |s| s.digest.clone())
    }

    async fn bucket_entries(
        &self,
        dataset: &str,
        buckets: &[u16],
    ) -> Result<Vec<DigestEntry>, StoreError> {
        let wanted: std::collections::HashSet<u16> = buckets.iter().copied().collect();
        self.with_slot(dataset, |s| {
            s.copy
                .states()
                .iter()
                .filter(|(k, _)| wanted.contains(&bucket_of(k)))
                .map(|(k, r)| DigestEntry::new(k.clone(), r.version, r.is_deleted()))
                .collect()
        })
    }

    async fn remove(&self, dataset: &str, entries: &[DigestEntry]) -> Result<u64, StoreError> {
        self.with_slot(dataset, |s| {
            let mut n = 0;
            for e in entries {
                let holds = s
                    .copy
                    .states()
                    .get(&e.key)
                    .is_some_and(|r| r.version == e.version && r.is_deleted() == e.deleted);
                if holds {
                    s.copy.remove(&e.key);
                    s.digest.toggle(&e.key, e.version, e.deleted);
                    n += 1;
                }
            }
            n
        })
    }

    async fn reconcile_stats(&self, dataset: &str) -> Result<ReconcileStats, StoreError> {
        self.with_slot(dataset, |s| s.stats)
    }

    async fn record_reconcile(&self, dataset: &str, run: &ReconcileRun) -> Result<(), StoreError> {
        self.with_slot(dataset, |s| s.stats = s.stats.with_run(run))
    }

    async fn hold(&self, dataset: &str, held: &[Held]) -> Result<(), StoreError> {
        self.with_slot(dataset, |s| {
            for h in held {
                let known = s
                    .held
                    .iter()
                    .any(|x| x.change.key == h.change.key && x.change.version == h.change.version);
                if !known {
                    s.held.push(h.clone());
                }
            }
        })
    }

    async fn held(&self, dataset: &str, limit: usize) -> Result<Vec<Held>, StoreError> {
        self.with_slot(dataset, |s| s.held.iter().take(limit).cloned().collect())
    }

    async fn held_count(&self, dataset: &str) -> Result<u64, StoreError> {
        self.with_slot(dataset, |s| s.held.len() as u64)
    }

    async fn release(&self, dataset: &str, held: &[(String, Version)]) -> Result<u64, StoreError> {
        self.with_slot(dataset, |s| {
            let before = s.held.len();
            s.held.retain(|x| {
                !held
                    .iter()
                    .any(|(k, v)| *k == x.change.key && *v == x.change.version)
            });
            (before - s.held.len()) as u64
        })
    }

    async fn dump(
        &self,
        dataset: &str,
    ) -> Result<BTreeMap<String, (Version, bool, Map<String, Value>)>, StoreError> {
        self.with_slot(dataset, |s| {
            s.copy
                .states()
                .iter()
                .map(|(k, r)| (k.clone(), (r.version, r.is_deleted(), r.fields.clone())))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_copy_store_conformance_suite() {
        super::super::conformance::run(|clock| async move { MemoryCopyStore::with_clock(clock) })
            .await;
    }
}
