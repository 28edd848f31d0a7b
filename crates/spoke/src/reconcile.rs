//! Reconciliation: prove a copy matches its source and repair exactly what
//! differs, at a cost that follows the differences, not the dataset.
//!
//! ```text
//!  copy digest (local)            feed digest (hub: GET …/digest)
//!  root ───────────── equal? ──── root                         ─▶ done: in sync
//!   │ differ
//!  64 level-1 nodes ─ compare ─── 64 level-1 nodes
//!   │ only the differing ones
//!  their 64 leaves ── compare ─── their 64 leaves (?level=2&under=…)
//!   │ differing buckets
//!  (key, version, deleted) of those buckets, copy first, then the feed's
//!   │
//!  classify per key:   missing  the feed has it, the copy does not        ─▶ fetch, apply
//!                      stale    the feed's version is newer              ─▶ fetch, apply
//!                      conflict same version, one side a tombstone       ─▶ remove the copy's row, fetch, apply (counted stale)
//!                      extra    the feed has never held the key          ─▶ remove the copy's row
//!                      ahead    the copy's version is newer              ─▶ left alone: the apply rule never rolls back
//! ```
//!
//! # Repairs go through the store
//! Fetched records are projected like the agent's and applied with
//! [`CopyStore::apply`] (no position, not counted as received), so the apply
//! rule decides and the digest and counters move with them. Extra rows are
//! dropped with [`CopyStore::remove`], which removes a row only while it
//! still holds the state reconcile saw; why that does not weaken rule 1 is
//! written in the contract of [`crate::copy`]. A repair counts only when it
//! changed the copy, so a record that the agent updated meanwhile is not
//! counted twice.
//!
//! # Races with a running agent
//! Reconcile may run while the agent applies changes. For each batch of
//! buckets it reads the copy's entries *before* the feed's. A copy row the
//! feed delivered was in the feed's state before the copy had it, and feed
//! state only moves forward, so such a row is never seen as extra or ahead:
//! only rows the feed never produced are. Seen the other way round — the
//! copy behind the feed — the repair applies the feed's newer record, which
//! is what the agent would do anyway. After dropping extra rows, reconcile
//! fetches those keys once more and applies whatever the feed holds now: an
//! owner that created such a key meanwhile, whose change the agent's apply
//! ignored against the foreign row, is not lost.
//!
//! # Tombstones
//! Tombstones are in both digests, so a missing or wrong tombstone is found
//! and repaired. A copy collects its tombstones after the dataset's
//! horizon while the hub keeps them; a source tombstone older than the
//! horizon that the copy lacks is counted as collected, not repaired.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use futures_util::StreamExt;

use serde::{Deserialize, Serialize};
use spoke_core::digest::{
    compare_entries, Difference, Digest, DigestEntry, DigestError, DigestQuery, BUCKETS,
};
use spoke_core::freshness::format_rfc3339_ms;
use spoke_core::{Change, Op, Version};

use crate::clock::Clock;
use crate::copy::{Advance, CopySpec, CopyStore, ReconcileRun, StoreError};
use crate::feed::{Feed, FeedError, MAX_DIGEST_BUCKETS};

/// Tunables with their defaults.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// The dataset's tombstone horizon (0: every missing tombstone is repaired).
    pub tombstone_horizon_ms: u64,
    /// Most repairs listed one by one in the report (all are counted).
    pub max_listed: usize,
    /// Keys per records request and per apply transaction.
    pub batch: usize,
    /// Buckets per entries request (at most [`MAX_DIGEST_BUCKETS`]).
    pub buckets_per_request: usize,
    /// Entries requests in flight at once (each reads the copy's entries of
    /// its buckets before the feed's).
    pub requests_in_flight: usize,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            tombstone_horizon_ms: 0,
            max_listed: 1_000,
            batch: 1_000,
            buckets_per_request: 16,
            requests_in_flight: 4,
        }
    }
}

/// What a repair fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairKind {
    /// The source had the record (or tombstone); the copy had nothing.
    Missing,
    /// The copy held an older version, or the same version in the other
    /// state (a tombstone where the source has a record, or the reverse).
    Stale,
    /// The copy held a key the source does not have; it was removed.
    Extra,
}

impl RepairKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairKind::Missing => "missing",
            RepairKind::Stale => "stale",
            RepairKind::Extra => "extra",
        }
    }
}

/// One key's state on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    pub version: Version,
    pub deleted: bool,
}

impl From<&DigestEntry> for KeyState {
    fn from(e: &DigestEntry) -> Self {
        KeyState {
            version: e.version,
            deleted: e.deleted,
        }
    }
}

/// One repaired (or, for `ahead`, noticed) key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repair {
    pub kind: RepairKind,
    pub key: String,
    /// What the copy held before (`null`: nothing).
    pub copy: Option<KeyState>,
    /// What the source holds (`null`: nothing, the row was removed).
    pub source: Option<KeyState>,
}

/// A key the copy holds in a newer version than the source, left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ahead {
    pub key: String,
    pub copy: KeyState,
    pub source: KeyState,
}

/// Repairs by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RepairCounts {
    pub missing: u64,
    pub stale: u64,
    pub extra: u64,
}

impl RepairCounts {
    pub fn total(&self) -> u64 {
        self.missing + self.stale + self.extra
    }
}

/// What one reconcile run found and did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub dataset: String,
    /// Start, on the consumer's clock.
    pub started_at: String,
    pub started_ms: u64,
    pub duration_ms: f64,
    /// The roots were equal at the start: nothing else was read.
    pub in_sync_before: bool,
    /// Buckets whose digests differed, out of [`BUCKETS`].
    pub buckets_differing: usize,
    pub buckets_total: usize,
    /// Entries read from the differing buckets on each side.
    pub entries_copy: usize,
    pub entries_source: usize,
    pub repaired: RepairCounts,
    /// Keys the copy holds newer than the source (never rolled back).
    pub ahead: Vec<Ahead>,
    /// Source tombstones past the horizon that the copy had collected.
    pub collected_tombstones: u64,
    /// The repairs, key by key, up to the `max_listed` option.
    pub repairs: Vec<Repair>,
    /// Whether `repairs` lists every repair.
    pub repairs_complete: bool,
    /// The roots compared equal after the repairs (false while changes
    /// keep flowing, or when keys are ahead).
    pub in_sync_after: bool,
}

/// A step of a run, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Comparing digest level `level` (0 root, 1 nodes, 2 buckets).
    Comparing { level: u8 },
    /// Entries of `done` of `total` differing buckets compared.
    Buckets { done: usize, total: usize },
    /// `done` of `total` repairs applied.
    Repairing { done: usize, total: usize },
}

/// Why a run stopped. Repairs made before the failure stay (each is
/// committed with the apply rule, so a rerun simply continues).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("digest: {0}")]
    Digest(#[from] DigestError),
}

/// Reconciles one copy against its feed.
pub struct Reconciler<'a> {
    feed: &'a dyn Feed,
    store: &'a dyn CopyStore,
    spec: &'a CopySpec,
    clock: Clock,
    options: ReconcileOptions,
}

impl<'a> Reconciler<'a> {
    pub fn new(feed: &'a dyn Feed, store: &'a dyn CopyStore, spec: &'a CopySpec) -> Self {
        Reconciler {
            feed,
            store,
            spec,
            clock: Clock::System,
            options: ReconcileOptions::default(),
        }
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn with_options(mut self, options: ReconcileOptions) -> Self {
        self.options = options;
        self
    }

    /// Runs once and records the run in the store's bookkeeping.
    pub async fn run(
        &self,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<ReconcileReport, ReconcileError> {
        let started_ms = self.clock.now_ms();
        let t0 = Instant::now();
        let mut report = self.compare_and_repair(started_ms, progress).await?;
        report.duration_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let run = ReconcileRun {
            started_ms,
            duration_ms: report.duration_ms.round() as u64,
            missing: report.repaired.missing,
            stale: report.repaired.stale,
            extra: report.repaired.extra,
        };
        self.store
            .record_reconcile(&self.spec.dataset, &run)
            .await?;
        Ok(report)
    }

    /// The buckets whose digests differ, descending the tree from the root.
    async fn differing_buckets(
        &self,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Vec<u16>, ReconcileError> {
        let ds = &self.spec.dataset;
        // Copy first, then the feed (see "Races").
        let copy = self.store.digest(ds).await?;
        descend(self.feed, ds, &copy, &|level| {
            progress(Progress::Comparing { level })
        })
        .await
    }

    async fn compare_and_repair(
        &self,
        started_ms: u64,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<ReconcileReport, ReconcileError> {
        let ds = self.spec.dataset.as_str();
        let opts = &self.options;
        let buckets = self.differing_buckets(progress).await?;
        let mut report = ReconcileReport {
            dataset: ds.to_owned(),
            started_at: format_rfc3339_ms(started_ms),
            started_ms,
            duration_ms: 0.0,
            in_sync_before: buckets.is_empty(),
            buckets_differing: buckets.len(),
            buckets_total: BUCKETS,
            entries_copy: 0,
            entries_source: 0,
            repaired: RepairCounts::default(),
            ahead: Vec::new(),
            collected_tombstones: 0,
            repairs: Vec::new(),
            repairs_complete: true,
            in_sync_after: false,
        };
        if buckets.is_empty() {
            report.in_sync_after = true;
            return Ok(report);
        }

        // Entries of the differing buckets: for each group of buckets the
        // copy's first, then the feed's; a few groups in flight at once.
        let mut differences = Vec::new();
        let per = opts.buckets_per_request.clamp(1, MAX_DIGEST_BUCKETS);
        let mut done = 0;
        progress(Progress::Buckets {
            done,
            total: buckets.len(),
        });
        // Owned chunks: a stream over borrowed slices makes this future
        // too general for the compiler to prove `Send`, and the agent
        // spawns reconcile runs as tasks (`reconcile_every`).
        let chunks: Vec<Vec<u16>> = buckets.chunks(per).map(<[u16]>::to_vec).collect();
        let mut groups = futures_util::stream::iter(chunks)
            .map(|chunk: Vec<u16>| async move {
                let copy = self.store.bucket_entries(ds, &chunk).await?;
                let source = self.feed.bucket_entries(ds, &chunk).await?;
                Ok::<_, ReconcileError>((chunk.len(), copy, source))
            })
            .buffer_unordered(opts.requests_in_flight.max(1));
        while let Some(group) = groups.next().await {
            let (n, copy, source) = group?;
            report.entries_copy += copy.len();
            report.entries_source += source.len();
            differences.extend(compare_entries(copy, source));
            done += n;
            progress(Progress::Buckets {
                done,
                total: buckets.len(),
            });
        }
        drop(groups);
        differences.sort_by(|a, b| a.key().cmp(b.key()));

        // Sort the differences into what to remove and what to fetch.
        let mut extra: Vec<DigestEntry> = Vec::new();
        let mut conflicts: Vec<DigestEntry> = Vec::new();
        // key → (kind, what the copy held)
        let mut wanted: BTreeMap<String, (RepairKind, Option<KeyState>)> = BTreeMap::new();
        for d in differences {
            match d {
                Difference::Missing { source } => {
                    wanted.insert(source.key, (RepairKind::Missing, None));
                }
                Difference::Stale { copy, .. } => {
                    let state = KeyState::from(&copy);
                    wanted.insert(copy.key, (RepairKind::Stale, Some(state)));
                }
                Difference::Conflict { copy, .. } => {
                    let state = KeyState::from(&copy);
                    wanted.insert(copy.key.clone(), (RepairKind::Stale, Some(state)));
                    conflicts.push(copy);
                }
                Difference::Extra { copy } => extra.push(copy),
                Difference::Ahead { copy, source } => report.ahead.push(Ahead {
                    key: copy.key.clone(),
                    copy: KeyState::from(&copy),
                    source: KeyState::from(&source),
                }),
            }
        }
        let total = wanted.len() + extra.len();
        let mut repaired_so_far = 0;
        progress(Progress::Repairing { done: 0, total });

        // 1. Drop extra rows, and rows in conflict with the source's state
        //    at the same version (the source's record replaces them below).
        for chunk in extra.chunks(opts.batch.max(1)) {
            report.repaired.extra += self.store.remove(ds, chunk).await?;
            repaired_so_far += chunk.len();
            progress(Progress::Repairing {
                done: repaired_so_far,
                total,
            });
        }
        for chunk in conflicts.chunks(opts.batch.max(1)) {
            self.store.remove(ds, chunk).await?;
        }
        let listed = |report: &mut ReconcileReport, r: Repair| {
            if report.repairs.len() < opts.max_listed {
                report.repairs.push(r);
            } else {
                report.repairs_complete = false;
            }
        };
        for e in &extra {
            listed(
                &mut report,
                Repair {
                    kind: RepairKind::Extra,
                    key: e.key.clone(),
                    copy: Some(KeyState::from(e)),
                    source: None,
                },
            );
        }

        // 2. Fetch the source's records: missing, stale and conflicting
        //    keys, and the removed extra keys once more (see "Races").
        let mut keys: Vec<String> = wanted.keys().cloned().collect();
        keys.extend(extra.iter().map(|e| e.key.clone()));
        let mut records: HashMap<String, Change> = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(opts.batch.clamp(1, crate::feed::MAX_PAGE)) {
            for c in self.feed.records(ds, chunk).await? {
                records.insert(c.key.clone(), c);
            }
        }

        // 3. Apply them through the apply rule, one kind per transaction
        //    batch so every repair is counted by kind.
        let now = self.clock.now_ms();
        let repair_advance = Advance {
            position: None,
            fresh_as_of_ms: None,
            from_feed: false,
        };
        for kind in [RepairKind::Missing, RepairKind::Stale] {
            let mut batch: Vec<Change> = Vec::new();
            for (key, (k, copy_state)) in &wanted {
                if *k != kind {
                    continue;
                }
                let Some(c) = records.get(key) else { continue };
                let collected = c.op == Op::Delete
                    && kind == RepairKind::Missing
                    && opts.tombstone_horizon_ms > 0
                    && now.saturating_sub(c.ts) >= opts.tombstone_horizon_ms;
                if collected {
                    report.collected_tombstones += 1;
                    continue;
                }
                listed(
                    &mut report,
                    Repair {
                        kind,
                        key: key.clone(),
                        copy: *copy_state,
                        source: Some(KeyState {
                            version: c.version,
                            deleted: c.op == Op::Delete,
                        }),
                    },
                );
                batch.push(self.spec.project(c.clone()));
            }
            for chunk in batch.chunks(opts.batch.max(1)) {
                let out = self.store.apply(ds, chunk, repair_advance).await?;
                match kind {
                    RepairKind::Missing => report.repaired.missing += out.applied,
                    _ => report.repaired.stale += out.applied,
                }
                repaired_so_far += chunk.len();
                progress(Progress::Repairing {
                    done: repaired_so_far.min(total),
                    total,
                });
            }
        }
        let recreated: Vec<Change> = extra
            .iter()
            .filter_map(|e| records.get(&e.key))
            .map(|c| self.spec.project(c.clone()))
            .collect();
        if !recreated.is_empty() {
            self.store.apply(ds, &recreated, repair_advance).await?;
        }

        // 4. Check: equal roots now (unless changes flowed meanwhile).
        let copy_root = self.store.digest(ds).await?.root();
        let source_root = self.feed.digest(ds, &DigestQuery::root()).await?;
        report.in_sync_after = source_root
            .nodes
            .first()
            .is_some_and(|n| n.1 .0 == copy_root);
        Ok(report)
    }
}

/// The buckets where `local` and the feed's digest of `dataset` differ,
/// read from the root down: the feed answers only for the children of
/// nodes that differed. `level` is told each level before it is compared.
/// Shared by reconcile (local: the copy's digest) and the drift check
/// (local: the owner table's digest, [`crate::drift`]).
pub async fn descend(
    feed: &dyn Feed,
    dataset: &str,
    local: &Digest,
    level: &(dyn Fn(u8) + Send + Sync),
) -> Result<Vec<u16>, ReconcileError> {
    level(0);
    let root = feed.digest(dataset, &DigestQuery::root()).await?;
    if local
        .nodes(&DigestQuery::root())?
        .differing(&root)
        .is_empty()
    {
        return Ok(Vec::new());
    }
    let mut parents: Option<Vec<u32>> = None;
    for l in 1..=spoke_core::digest::LEAF_LEVEL {
        level(l);
        let query = match parents.take() {
            None => DigestQuery::level(l),
            Some(p) => DigestQuery::under(l, p),
        };
        let source = feed.digest(dataset, &query).await?;
        parents = Some(local.nodes(&query)?.differing(&source));
    }
    Ok(parents
        .unwrap_or_default()
        .into_iter()
        .map(|b| b as u16)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::memory::MemoryCopyStore;
    use crate::copy::sqlite::SqliteCopyStore;
    use crate::copy::{conformance, CopyStore};
    use crate::feed::conformance::manifest;
    use crate::feed::memory::MemoryFeed;
    use crate::feed::sqlite::SqliteFeed;
    use crate::feed::{ChangeInput, Publisher};
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::BTreeSet;

    fn fields(n: i64) -> serde_json::Map<String, serde_json::Value> {
        json!({ "n": n }).as_object().cloned().unwrap_or_default()
    }

    fn no_progress(_: Progress) {}

    /// What a key looks like in the source, and how the copy diverges from it.
    #[derive(Debug, Clone)]
    enum Case {
        /// The copy matches the source.
        Same,
        /// The copy lacks the key.
        Missing,
        /// The copy holds an older version (`back` versions behind), live or tombstone.
        Older { back: u64, deleted: bool },
        /// The copy holds the source's version in the other state.
        Flipped,
    }

    #[derive(Debug, Clone)]
    struct World {
        /// key → (source version, source is a tombstone, divergence)
        keys: Vec<(u64, bool, Case)>,
        /// Keys only the copy has: (version, tombstone)
        extra: Vec<(u64, bool)>,
    }

    fn world() -> impl Strategy<Value = World> {
        let case = prop_oneof![
            6 => Just(Case::Same),
            1 => Just(Case::Missing),
            1 => (1u64..3, any::<bool>()).prop_map(|(back, deleted)| Case::Older { back, deleted }),
            1 => Just(Case::Flipped),
        ];
        (
            prop::collection::vec((1u64..6, prop::bool::weighted(0.2), case), 0..60),
            prop::collection::vec((1u64..9, prop::bool::weighted(0.3)), 0..8),
        )
            .prop_map(|(keys, extra)| World { keys, extra })
    }

    /// Builds the source in `feed` and a diverging copy in `store`; returns
    /// the expected repair counts.
    async fn build(world: &World, feed: &MemoryFeed, store: &dyn CopyStore) -> RepairCounts {
        let spec = conformance::spec();
        store.ensure_copy(&spec).await.unwrap();
        let mut expected = RepairCounts::default();
        let mut copy_changes = Vec::new();
        for (i, (version, deleted, case)) in world.keys.iter().enumerate() {
            let key = format!("k{i}");
            // The owner's history: versions 1..=version, the last one a delete or not.
            let history: Vec<ChangeInput> = (1..=*version)
                .map(|v| {
                    if v == *version && *deleted {
                        ChangeInput::delete(key.clone(), v)
                    } else {
                        ChangeInput::upsert(key.clone(), v, fields(v as i64))
                    }
                })
                .collect();
            feed.publish("items", history).await.unwrap();
            let copy_state = match case {
                Case::Same => Some((*version, *deleted)),
                Case::Missing => {
                    expected.missing += 1;
                    None
                }
                Case::Older { back, deleted: d } if *back < *version => {
                    expected.stale += 1;
                    Some((version - back, *d))
                }
                // Nothing older to hold: the copy just lacks it.
                Case::Older { .. } => {
                    expected.missing += 1;
                    None
                }
                Case::Flipped => {
                    expected.stale += 1;
                    Some((*version, !*deleted))
                }
            };
            if let Some((v, d)) = copy_state {
                copy_changes.push(if d {
                    conformance::delete(&key, v)
                } else {
                    conformance::upsert(&key, v, v as i64)
                });
            }
        }
        for (i, (v, d)) in world.extra.iter().enumerate() {
            let key = format!("x{i}");
            expected.extra += 1;
            copy_changes.push(if *d {
                conformance::delete(&key, *v)
            } else {
                conformance::upsert(&key, *v, 7)
            });
        }
        store
            .apply(
                "items",
                &copy_changes,
                Advance {
                    position: None,
                    fresh_as_of_ms: None,
                    from_feed: false,
                },
            )
            .await
            .unwrap();
        expected
    }

    /// The copy equals the source: same keys, versions, tombstones, and
    /// projected fields for live records.
    async fn assert_equal(feed: &MemoryFeed, store: &dyn CopyStore) {
        let mut source = BTreeMap::new();
        let mut after = None;
        loop {
            let page = feed
                .snapshot("items", after.as_deref(), 1000)
                .await
                .unwrap();
            for c in page.records {
                let f = if c.op == Op::Delete {
                    serde_json::Map::new()
                } else {
                    conformance::spec().projection.apply(&c.fields)
                };
                source.insert(c.key.clone(), (c.version, c.op == Op::Delete, f));
            }
            match page.next_after_key {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        let copy = store.dump("items").await.unwrap();
        assert_eq!(copy, source, "the copy equals the source");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any divergence — missing, extra, older, tombstone mismatches — is
        /// repaired by one reconcile to equality, and the repair counts
        /// equal the injected differences.
        #[test]
        fn one_reconcile_repairs_any_divergence(world in world(), sqlite in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let feed = MemoryFeed::new(&manifest());
                let store: Box<dyn CopyStore> = if sqlite {
                    Box::new(SqliteCopyStore::open(&dir.path().join("c.db")).unwrap())
                } else {
                    Box::new(MemoryCopyStore::new())
                };
                let expected = build(&world, &feed, store.as_ref()).await;
                let spec = conformance::spec();
                let report = Reconciler::new(&feed, store.as_ref(), &spec)
                    .run(&no_progress)
                    .await
                    .unwrap();
                assert_eq!(report.repaired, expected, "repair counts equal the injected differences");
                assert!(report.ahead.is_empty());
                assert_eq!(report.in_sync_before, expected.total() == 0);
                assert!(report.in_sync_after, "roots equal after one run");
                assert_eq!(report.repairs.len() as u64, expected.total());
                assert_equal(&feed, store.as_ref()).await;
                let stats = store.reconcile_stats("items").await.unwrap();
                assert_eq!(stats.runs_total, 1);
                assert_eq!(
                    (stats.repaired_missing_total, stats.repaired_stale_total, stats.repaired_extra_total),
                    (expected.missing, expected.stale, expected.extra)
                );
                // A second run finds nothing.
                let again = Reconciler::new(&feed, store.as_ref(), &spec)
                    .run(&no_progress)
                    .await
                    .unwrap();
                assert!(again.in_sync_before);
                assert_eq!(again.repaired.total(), 0);
            });
        }
    }

    #[tokio::test]
    async fn a_newer_copy_is_left_alone_and_reported() {
        let feed = MemoryFeed::new(&manifest());
        let store = MemoryCopyStore::new();
        let spec = conformance::spec();
        store.ensure_copy(&spec).await.unwrap();
        feed.publish("items", vec![ChangeInput::upsert("a", 2, fields(2))])
            .await
            .unwrap();
        let advance = Advance {
            position: None,
            fresh_as_of_ms: None,
            from_feed: false,
        };
        store
            .apply("items", &[conformance::upsert("a", 5, 5)], advance)
            .await
            .unwrap();
        let report = Reconciler::new(&feed, &store, &spec)
            .run(&no_progress)
            .await
            .unwrap();
        assert_eq!(
            report.repaired.total(),
            0,
            "the apply rule never rolls back"
        );
        assert_eq!(report.ahead.len(), 1);
        assert_eq!(report.ahead[0].copy.version, 5);
        assert!(!report.in_sync_after);
        assert_eq!(store.get("items", "a").await.unwrap().unwrap().version, 5);
    }

    #[tokio::test]
    async fn collected_tombstones_are_not_resurrected() {
        let clock = Clock::manual(10 * 86_400_000);
        let feed = MemoryFeed::with_clock(&manifest(), clock.clone());
        let store = MemoryCopyStore::with_clock(clock.clone());
        let spec = conformance::spec();
        store.ensure_copy(&spec).await.unwrap();
        let mut old = ChangeInput::delete("gone", 3);
        old.ts = Some(86_400_000); // day 1: past a 7-day horizon on day 10
        feed.publish("items", vec![old, ChangeInput::delete("fresh", 2)])
            .await
            .unwrap();
        let report = Reconciler::new(&feed, &store, &spec)
            .with_clock(clock)
            .with_options(ReconcileOptions {
                tombstone_horizon_ms: 7 * 86_400_000,
                ..ReconcileOptions::default()
            })
            .run(&no_progress)
            .await
            .unwrap();
        assert_eq!(report.collected_tombstones, 1);
        assert_eq!(
            report.repaired.missing, 1,
            "the recent tombstone is repaired"
        );
        let dump = store.dump("items").await.unwrap();
        assert_eq!(dump.keys().collect::<Vec<_>>(), vec!["fresh"]);
    }

    #[tokio::test]
    async fn sqlite_feed_digests_match_the_memory_feed() {
        // The embedded log and the reference feed keep the same digest and
        // serve the same entries and records for the same history.
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteFeed::open(&dir.path().join("hub.db"), &manifest()).unwrap();
        let memory = MemoryFeed::new(&manifest());
        let mut rng = 7u64;
        for round in 0..20 {
            let batch: Vec<ChangeInput> = (0..20)
                .map(|i| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let key = format!("k{}", rng % 50);
                    let v = 1 + (rng >> 8) % 30;
                    if (rng >> 20).is_multiple_of(4) {
                        ChangeInput::delete(key, v)
                    } else {
                        let mut c = ChangeInput::upsert(key, v, fields(i));
                        c.ts = Some(round);
                        c
                    }
                })
                .collect();
            sqlite.publish("items", batch.clone()).await.unwrap();
            memory.publish("items", batch).await.unwrap();
        }
        for q in [
            DigestQuery::root(),
            DigestQuery::level(1),
            DigestQuery::under(2, vec![0, 5, 63]),
        ] {
            assert_eq!(
                sqlite.digest("items", &q).await.unwrap(),
                memory.digest("items", &q).await.unwrap()
            );
        }
        let all: Vec<u16> = (0..BUCKETS as u16).collect();
        let mut a = Vec::new();
        let mut b = Vec::new();
        for chunk in all.chunks(MAX_DIGEST_BUCKETS) {
            a.extend(sqlite.bucket_entries("items", chunk).await.unwrap());
            b.extend(memory.bucket_entries("items", chunk).await.unwrap());
        }
        a.sort();
        b.sort();
        assert_eq!(a, b);
        let keys: BTreeSet<String> = a.iter().map(|e| e.key.clone()).collect();
        assert!(keys.len() > 10);
        let from_scratch = spoke_core::digest::Digest::from_entries(
            a.iter().map(|e| (e.key.as_str(), e.version, e.deleted)),
        );
        let root = sqlite.digest("items", &DigestQuery::root()).await.unwrap();
        assert_eq!(
            root.nodes[0].1 .0,
            from_scratch.root(),
            "incremental equals from scratch"
        );
        let mut wanted: Vec<String> = keys.into_iter().collect();
        wanted.push("never-seen".into());
        let ra = sqlite.records("items", &wanted).await.unwrap();
        let rb = memory.records("items", &wanted).await.unwrap();
        assert_eq!(ra.len(), wanted.len() - 1, "absent keys are left out");
        let strip = |v: Vec<Change>| -> Vec<(String, Version, Op)> {
            v.into_iter().map(|c| (c.key, c.version, c.op)).collect()
        };
        assert_eq!(strip(ra), strip(rb));
        assert!(sqlite.bucket_entries("items", &[4096]).await.is_err());
        assert!(matches!(
            sqlite.digest("nope", &DigestQuery::root()).await,
            Err(FeedError::UnknownDataset(_))
        ));
    }
}
