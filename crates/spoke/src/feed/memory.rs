//! An in-memory feed: the reference backend for tests and for wiring an
//! owner and a consumer inside one process. Nothing survives a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use spoke_core::digest::{bucket_of, Digest, DigestEntry, DigestNodes, DigestQuery};
use spoke_core::{decide, Change, Decision, Manifest, Op, Schema};
use tokio::sync::watch;

use super::{
    check_after_key, check_digest_request, Catalog, ChangeInput, Feed, FeedBatch, FeedEntry,
    FeedError, Position, PublishReceipt, Publisher, SnapshotPage, MAX_PAGE,
};
use crate::clock::Clock;

/// A dataset's log and compacted state share each change (an `Arc`), so a
/// publish stores it once; readers get their own copies.
#[derive(Default)]
struct Log {
    entries: Vec<Arc<Change>>,
    state: BTreeMap<String, Arc<Change>>,
    /// The digest of `state`, updated with every change to it.
    digest: Digest,
}

pub struct MemoryFeed {
    catalog: Catalog,
    clock: Clock,
    logs: Mutex<HashMap<String, Log>>,
    heads: HashMap<String, watch::Sender<Position>>,
}

impl MemoryFeed {
    pub fn new(manifest: &Manifest) -> Self {
        Self::with_clock(manifest, Clock::System)
    }

    pub fn with_clock(manifest: &Manifest, clock: Clock) -> Self {
        let catalog = Catalog::new(manifest);
        let heads = catalog
            .names()
            .map(|n| (n.to_owned(), watch::channel(0).0))
            .collect();
        MemoryFeed {
            catalog,
            clock,
            logs: Mutex::new(HashMap::new()),
            heads,
        }
    }

    fn head_tx(&self, dataset: &str) -> Result<&watch::Sender<Position>, FeedError> {
        self.heads
            .get(dataset)
            .ok_or_else(|| FeedError::UnknownDataset(dataset.to_owned()))
    }
}

#[async_trait]
impl Publisher for MemoryFeed {
    fn catalog(&self) -> Option<&Catalog> {
        Some(&self.catalog)
    }

    async fn publish(
        &self,
        dataset: &str,
        changes: Vec<ChangeInput>,
    ) -> Result<PublishReceipt, FeedError> {
        let changes = self
            .catalog
            .prepare(dataset, changes, self.clock.now_ms())?;
        let head_tx = self.head_tx(dataset)?;
        let mut logs = self.logs.lock().expect("memory feed lock");
        let log = logs.entry(dataset.to_owned()).or_default();
        let mut positions = Vec::with_capacity(changes.len());
        let mut ignored = 0;
        for change in changes {
            let local = log.state.get(&change.key).map(|c| c.version);
            if decide(local, change.version) == Decision::Ignore {
                positions.push(None);
                ignored += 1;
                continue;
            }
            let change = Arc::new(change);
            log.entries.push(Arc::clone(&change));
            positions.push(Some(log.entries.len() as Position));
            if let Some(old) = log.state.get(&change.key) {
                log.digest
                    .toggle(&old.key, old.version, old.op == Op::Delete);
            }
            log.digest
                .toggle(&change.key, change.version, change.op == Op::Delete);
            log.state.insert(change.key.clone(), change);
        }
        let head = log.entries.len() as Position;
        head_tx.send_replace(head);
        Ok(PublishReceipt {
            positions,
            ignored,
            head,
        })
    }
}

#[async_trait]
impl Feed for MemoryFeed {
    async fn read(
        &self,
        dataset: &str,
        after: Position,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<FeedBatch, FeedError> {
        let mut rx = self.head_tx(dataset)?.subscribe();
        if *rx.borrow_and_update() <= after {
            // Wait for a newer head or the timeout; either way answer below.
            let _ = tokio::time::timeout(wait, rx.wait_for(|h| *h > after)).await;
        }
        let logs = self.logs.lock().expect("memory feed lock");
        let (entries, head) = match logs.get(dataset) {
            None => (Vec::new(), 0),
            Some(log) => {
                let start = usize::try_from(after)
                    .unwrap_or(usize::MAX)
                    .min(log.entries.len());
                let end = start
                    .saturating_add(limit.min(MAX_PAGE))
                    .min(log.entries.len());
                let entries = log.entries[start..end]
                    .iter()
                    .enumerate()
                    .map(|(i, c)| FeedEntry {
                        position: (start + i + 1) as Position,
                        change: Change::clone(c),
                    })
                    .collect();
                (entries, log.entries.len() as Position)
            }
        };
        Ok(FeedBatch {
            entries,
            head,
            hub_time_ms: self.clock.now_ms(),
        })
    }

    async fn snapshot(
        &self,
        dataset: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, FeedError> {
        self.catalog.get(dataset)?;
        check_after_key(after_key)?;
        let limit = limit.clamp(1, MAX_PAGE);
        let logs = self.logs.lock().expect("memory feed lock");
        let Some(log) = logs.get(dataset) else {
            return Ok(SnapshotPage {
                records: Vec::new(),
                next_after_key: None,
                head: 0,
                hub_time_ms: self.clock.now_ms(),
            });
        };
        let range = match after_key {
            Some(k) => log
                .state
                .range::<str, _>((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded)),
            None => log.state.range::<str, _>(..),
        };
        let records: Vec<Change> = range
            .take(limit + 1)
            .map(|(_, c)| Change::clone(c))
            .collect();
        let (records, next_after_key) = if records.len() > limit {
            let page = records[..limit].to_vec();
            let next = page.last().map(|c| c.key.clone());
            (page, next)
        } else {
            (records, None)
        };
        Ok(SnapshotPage {
            records,
            next_after_key,
            head: log.entries.len() as Position,
            hub_time_ms: self.clock.now_ms(),
        })
    }

    async fn schema(&self, dataset: &str) -> Result<Schema, FeedError> {
        Ok((*self.catalog.schema(dataset)?).clone())
    }

    async fn digest(&self, dataset: &str, query: &DigestQuery) -> Result<DigestNodes, FeedError> {
        self.catalog.get(dataset)?;
        let logs = self.logs.lock().expect("memory feed lock");
        let empty = Digest::new();
        let digest = logs.get(dataset).map_or(&empty, |l| &l.digest);
        digest
            .nodes(query)
            .map_err(|e| FeedError::BadRequest(e.to_string()))
    }

    async fn bucket_entries(
        &self,
        dataset: &str,
        buckets: &[u16],
    ) -> Result<Vec<DigestEntry>, FeedError> {
        self.catalog.get(dataset)?;
        check_digest_request(buckets, 0)?;
        let wanted: std::collections::HashSet<u16> = buckets.iter().copied().collect();
        let logs = self.logs.lock().expect("memory feed lock");
        Ok(logs.get(dataset).map_or_else(Vec::new, |log| {
            log.state
                .values()
                .filter(|c| wanted.contains(&bucket_of(&c.key)))
                .map(|c| DigestEntry::new(c.key.clone(), c.version, c.op == Op::Delete))
                .collect()
        }))
    }

    async fn records(&self, dataset: &str, keys: &[String]) -> Result<Vec<Change>, FeedError> {
        self.catalog.get(dataset)?;
        check_digest_request(&[], keys.len())?;
        let logs = self.logs.lock().expect("memory feed lock");
        Ok(logs.get(dataset).map_or_else(Vec::new, |log| {
            keys.iter()
                .filter_map(|k| log.state.get(k).map(|c| Change::clone(c)))
                .collect()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_feed_conformance_suite() {
        super::super::conformance::run(|m| async move { MemoryFeed::new(&m) }).await;
    }
}
