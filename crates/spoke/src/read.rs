//! The read API for consumers: records from a copy with their freshness.
//!
//! This is the only view of a copy that Spoke gives a service's code, and it
//! has no write methods (rule 5: copies are read-only). The agent's HTTP API
//! answers through it too, so Rust and non-Rust consumers see the same thing.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spoke_core::freshness::format_rfc3339_ms;
use spoke_core::manifest::Strategy;
use spoke_core::{Duration, Freshness, Manifest, Version};

use crate::clock::Clock;
use crate::copy::{CopyStore, ReconcileStats, StoreError};

/// A record read from a copy, with how fresh the copy is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Read {
    pub dataset: String,
    pub key: String,
    pub fields: Map<String, Value>,
    pub version: Version,
    /// RFC 3339; `null` when the copy was never fresh.
    pub fresh_as_of: Option<String>,
    pub fresh_as_of_ms: u64,
    /// `null` when the copy was never fresh.
    pub staleness_ms: Option<u64>,
    pub within_budget: bool,
}

/// One copy's standing, as `spoke status` and `/v1/status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyStatus {
    pub dataset: String,
    pub owner: String,
    pub strategy: String,
    pub staleness_budget: String,
    pub position: Option<u64>,
    /// The feed's head as last seen by the agent; `null` when not known.
    pub head: Option<u64>,
    pub lag_positions: Option<u64>,
    pub fresh_as_of: Option<String>,
    pub staleness_ms: Option<u64>,
    pub within_budget: bool,
    pub records: u64,
    pub applied_total: u64,
    pub received_total: u64,
    pub last_error: Option<String>,
    /// Reconcile runs, the last one's start (`last_run_ms`, consumer clock)
    /// and duration, and repairs by kind.
    #[serde(default)]
    pub reconcile: ReconcileStats,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0} is not a copy this consumer keeps")]
    NotACopy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
struct CopyInfo {
    owner: String,
    strategy: Strategy,
    budget: Duration,
}

/// One copy, read-only.
#[derive(Clone)]
pub struct Copy {
    copies: Copies,
    dataset: String,
}

impl Copy {
    /// The record for `key` with the copy's freshness; `None` when absent.
    pub async fn get(&self, key: &str) -> Result<Option<Read>, ReadError> {
        self.copies.get(&self.dataset, key).await
    }

    pub fn dataset(&self) -> &str {
        &self.dataset
    }
}

/// Read access to one consumer's copies.
#[derive(Clone)]
pub struct Copies {
    store: Arc<dyn CopyStore>,
    copies: Arc<BTreeMap<String, CopyInfo>>,
    clock: Clock,
}

impl Copies {
    /// The copies `consumer` keeps according to `manifest`, read from `store`.
    pub fn new(
        manifest: &Manifest,
        consumer: &str,
        store: Arc<dyn CopyStore>,
        clock: Clock,
    ) -> Self {
        let copies = manifest
            .subscriptions_of(consumer)
            .filter(|s| s.strategy.follows_feed())
            .filter_map(|s| {
                let ds = manifest.datasets.get(&s.dataset)?;
                Some((
                    s.dataset.clone(),
                    CopyInfo {
                        owner: ds.owner.clone(),
                        strategy: s.strategy,
                        budget: s.staleness_budget,
                    },
                ))
            })
            .collect();
        Copies {
            store,
            copies: Arc::new(copies),
            clock,
        }
    }

    /// A handle on one copy, for `copy.get(key)`.
    pub fn copy(&self, dataset: &str) -> Result<Copy, ReadError> {
        self.info(dataset)?;
        Ok(Copy {
            copies: self.clone(),
            dataset: dataset.to_owned(),
        })
    }

    pub fn datasets(&self) -> impl Iterator<Item = &str> {
        self.copies.keys().map(String::as_str)
    }

    fn info(&self, dataset: &str) -> Result<&CopyInfo, ReadError> {
        self.copies
            .get(dataset)
            .ok_or_else(|| ReadError::NotACopy(dataset.to_owned()))
    }

    /// The record for `key`, with the copy's freshness; `None` when absent.
    pub async fn get(&self, dataset: &str, key: &str) -> Result<Option<Read>, ReadError> {
        let info = self.info(dataset)?;
        let Some(rec) = self.store.get(dataset, key).await? else {
            return Ok(None);
        };
        let cursor = self.store.cursor(dataset).await?;
        let now = self.clock.now_ms();
        let f = Freshness {
            fresh_as_of_ms: cursor.fresh_as_of_ms,
        };
        Ok(Some(Read {
            dataset: dataset.to_owned(),
            key: rec.key,
            fields: rec.fields,
            version: rec.version,
            fresh_as_of: (f.fresh_as_of_ms != 0).then(|| format_rfc3339_ms(f.fresh_as_of_ms)),
            fresh_as_of_ms: f.fresh_as_of_ms,
            staleness_ms: f.staleness_ms(now),
            within_budget: f.within(info.budget, now),
        }))
    }

    /// The standing of one copy; `head` and `last_error` come from a running agent when there is one.
    pub async fn status(
        &self,
        dataset: &str,
        head: Option<u64>,
        last_error: Option<String>,
    ) -> Result<CopyStatus, ReadError> {
        let info = self.info(dataset)?;
        let cursor = self.store.cursor(dataset).await?;
        let records = self.store.count(dataset).await?;
        let reconcile = self.store.reconcile_stats(dataset).await?;
        // The head was seen before the cursor was read; the copy may have
        // moved past it meanwhile, and a head behind the position means nothing.
        let head = head.map(|h| h.max(cursor.position.unwrap_or(0)));
        let now = self.clock.now_ms();
        let f = Freshness {
            fresh_as_of_ms: cursor.fresh_as_of_ms,
        };
        Ok(CopyStatus {
            dataset: dataset.to_owned(),
            owner: info.owner.clone(),
            strategy: info.strategy.as_str().to_owned(),
            staleness_budget: info.budget.to_string(),
            position: cursor.position,
            head,
            lag_positions: head.map(|h| h.saturating_sub(cursor.position.unwrap_or(0))),
            fresh_as_of: (f.fresh_as_of_ms != 0).then(|| format_rfc3339_ms(f.fresh_as_of_ms)),
            staleness_ms: f.staleness_ms(now),
            within_budget: f.within(info.budget, now),
            records,
            applied_total: cursor.applied_total,
            received_total: cursor.received_total,
            last_error,
            reconcile,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::memory::MemoryCopyStore;
    use crate::copy::{conformance, Advance};

    #[tokio::test]
    async fn reads_carry_freshness_measured_on_the_consumers_clock() {
        let clock = Clock::manual(1_000_000);
        let store = Arc::new(MemoryCopyStore::with_clock(clock.clone()));
        store.ensure_copy(&conformance::spec()).await.unwrap();
        let manifest = crate::feed::conformance::manifest(); // reader-svc copies items, budget 1m
        let copies = Copies::new(&manifest, "reader-svc", store.clone(), clock.clone());
        let copy = copies.copy("items").unwrap();
        assert!(copy.get("a").await.unwrap().is_none());
        store
            .apply(
                "items",
                &[conformance::upsert("a", 3, 7)],
                Advance {
                    position: Some(1),
                    fresh_as_of_ms: Some(1_000_000),
                    from_feed: true,
                },
            )
            .await
            .unwrap();
        clock.advance(59_000);
        let r = copy.get("a").await.unwrap().unwrap();
        assert_eq!(
            (r.version, r.staleness_ms, r.within_budget),
            (3, Some(59_000), true)
        );
        assert_eq!(r.fields["n"], serde_json::json!(7));
        assert_eq!(r.fresh_as_of.as_deref(), Some("1970-01-01T00:16:40.000Z"));
        clock.advance(2_000);
        let r = copy.get("a").await.unwrap().unwrap();
        assert!(!r.within_budget, "61 s is over the 1m budget");
        assert!(matches!(copies.copy("nope"), Err(ReadError::NotACopy(_))));
    }
}
