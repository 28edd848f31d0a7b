//! An in-memory copy store built on [`spoke_core::MemoryCopy`], the reference
//! model of the apply rule. For tests and in-process wiring.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::{Map, Value};
use spoke_core::duration::Duration;
use spoke_core::{Change, MemoryCopy, Version};

use super::{
    newest_per_key, Advance, ApplyOutcome, CopyRecord, CopySpec, CopyStore, Cursor, StoreError,
};
use crate::clock::Clock;

#[derive(Default)]
pub struct MemoryCopyStore {
    clock: Clock,
    copies: Mutex<HashMap<String, (MemoryCopy, Cursor)>>,
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
}

#[async_trait]
impl CopyStore for MemoryCopyStore {
    async fn ensure_copy(&self, spec: &CopySpec) -> Result<(), StoreError> {
        self.copies
            .lock()
            .expect("memory store")
            .entry(spec.dataset.clone())
            .or_default();
        Ok(())
    }

    async fn cursor(&self, dataset: &str) -> Result<Cursor, StoreError> {
        let copies = self.copies.lock().expect("memory store");
        copies
            .get(dataset)
            .map(|c| c.1)
            .ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))
    }

    async fn apply(
        &self,
        dataset: &str,
        changes: &[Change],
        advance: Advance,
    ) -> Result<ApplyOutcome, StoreError> {
        let now = self.clock.now_ms();
        let mut copies = self.copies.lock().expect("memory store");
        let (copy, cursor) = copies
            .get_mut(dataset)
            .ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))?;
        let mut out = ApplyOutcome::default();
        for c in newest_per_key(changes) {
            if copy.apply(c, now) {
                out.applied += 1;
            }
        }
        out.ignored = changes.len() as u64 - out.applied;
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
        Ok(out)
    }

    async fn get(&self, dataset: &str, key: &str) -> Result<Option<CopyRecord>, StoreError> {
        let copies = self.copies.lock().expect("memory store");
        let (copy, _) = copies
            .get(dataset)
            .ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))?;
        Ok(copy.get(key).map(|r| CopyRecord {
            key: key.to_owned(),
            version: r.version,
            fields: r.fields.clone(),
        }))
    }

    async fn count(&self, dataset: &str) -> Result<u64, StoreError> {
        let copies = self.copies.lock().expect("memory store");
        let (copy, _) = copies
            .get(dataset)
            .ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))?;
        Ok(copy.live().len() as u64)
    }

    async fn gc_tombstones(
        &self,
        dataset: &str,
        now_ms: u64,
        horizon_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut copies = self.copies.lock().expect("memory store");
        let (copy, _) = copies
            .get_mut(dataset)
            .ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))?;
        Ok(copy.gc_tombstones(now_ms, Duration::from_millis(horizon_ms)) as u64)
    }

    async fn dump(
        &self,
        dataset: &str,
    ) -> Result<BTreeMap<String, (Version, bool, Map<String, Value>)>, StoreError> {
        let copies = self.copies.lock().expect("memory store");
        let (copy, _) = copies
            .get(dataset)
            .ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))?;
        Ok(copy
            .states()
            .iter()
            .map(|(k, r)| (k.clone(), (r.version, r.is_deleted(), r.fields.clone())))
            .collect())
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
