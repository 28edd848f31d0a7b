//! Drift: does a feed hold what its owner's database holds?
//!
//! Reconcile proves a copy matches its feed; this proves the feed matches
//! its owner, for owners whose rows live in PostgreSQL: a table captured by
//! CDC, or a `snapshot_sql` query. A row written around the capture (a
//! restore, a TRUNCATE, a replica promoted, a bug) shows up here and
//! nowhere else.
//!
//! ```text
//!  owner's table: SELECT key::text, version  (one consistent read, every row)
//!       │ live rows only: the table has no tombstones
//!       ▼
//!  owner digest (key, version, live), 4096 buckets
//!  root ───────────── equal? ─── feed root                ─▶ in sync
//!   │ differ: descend as reconcile does (crate::reconcile::descend)
//!  differing buckets ─▶ feed's (key, version, tombstone) of those buckets
//!   │ per key, tombstones in the feed counted as absent:
//!   │   owner has it, the feed has no live record  ─▶ missing from the feed
//!   │   both live, the owner's version is newer    ─▶ stale in the feed
//!   │   both live, the feed's version is newer     ─▶ feed ahead (the table went back: a restore?)
//!   │   the feed has a live record, the owner not  ─▶ gone from the owner
//!   ▼
//!  report (nothing is written anywhere: the owner decides how to repair)
//! ```
//!
//! # Versions
//! With a version column (outbox, CDC with `version = …`, `snapshot_sql`)
//! the feed's versions are the table's, so the digests compare and only
//! differing buckets are read. When the feed's versions are commit LSNs
//! (CDC without a version column), the table cannot say which version a
//! row was captured at: the check compares presence only, reads the
//! entries of every bucket (O(keys)) and says so in its report.
//!
//! # Cost and caveats
//! The owner side is always a full read of keys and versions (the table
//! keeps no digest). The feed side follows the differences — plus every
//! bucket holding a feed tombstone, since the table has none: those
//! buckets always differ, are read, and their tombstones counted as absent.
//! The listing is read before the feed, so a row committed meanwhile and
//! already captured may show as "feed ahead" or "gone from the owner" for
//! one run; a capture that lags shows as "missing" or "stale". Run it while
//! the capture is caught up, and rerun to confirm a difference.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use spoke_core::digest::{bucket_of, Digest, DigestEntry, BUCKETS};
use spoke_core::freshness::format_rfc3339_ms;
use spoke_core::{Projection, Version};

use crate::cdc::{ident, TableMapping};
use crate::clock::Clock;
use crate::feed::{Feed, MAX_DIGEST_BUCKETS};
use crate::reconcile::{descend, ReconcileError};
use crate::scheduled::postgres::PostgresSnapshot;
use crate::scheduled::{SnapshotError, SnapshotSource};

/// Most differences listed one by one in a report (all are counted).
pub const MAX_LISTED: usize = 1_000;

/// How the owner's rows are compared with the feed's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// The owner's versions are the feed's: compare versions, by digest.
    Versions,
    /// The feed's versions are commit LSNs the owner's table cannot show:
    /// compare which keys exist, bucket by bucket.
    PresenceOnly,
}

/// Where a drift check reads the owner's rows, and how it compares them.
pub struct OwnerRows {
    /// Lists every `(key, version)` (versions ignored in presence mode).
    pub source: Arc<dyn SnapshotSource>,
    pub compare: Compare,
}

impl OwnerRows {
    /// The rows of a CDC table mapping, over `conninfo` (`label` names
    /// where the connection is configured, for messages; credentials are
    /// never printed). With a version column the versions are compared;
    /// without one (commit LSNs) presence only.
    pub fn table(mapping: &TableMapping, conninfo: String, label: &str) -> OwnerRows {
        let (version, compare) = match &mapping.version {
            Some(v) => (ident(v), Compare::Versions),
            // Any positive constant: the listing requires a version.
            None => ("1".to_owned(), Compare::PresenceOnly),
        };
        let sql = format!(
            "SELECT {}::text AS key, {version} AS version FROM {}",
            ident(&mapping.key),
            mapping.sql_name()
        );
        OwnerRows {
            source: Arc::new(PostgresSnapshot::new(
                &mapping.dataset,
                conninfo,
                label,
                &sql,
                // Only keys and versions are read: no fields leave the owner.
                Projection::none(),
            )),
            compare,
        }
    }

    /// A `snapshot_sql` (or any snapshot) source: its versions are the owner's.
    pub fn snapshot(source: Arc<dyn SnapshotSource>) -> OwnerRows {
        OwnerRows {
            source,
            compare: Compare::Versions,
        }
    }
}

/// How one key differs between the owner's table and the feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// The owner has the row; the feed has no live record of it.
    MissingFromFeed,
    /// The owner's row has a newer version than the feed's record.
    StaleInFeed,
    /// The feed's record has a newer version than the owner's row.
    FeedAhead,
    /// The feed has a live record of a key the owner no longer has.
    GoneFromOwner,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::MissingFromFeed => "missing from the feed",
            DriftKind::StaleInFeed => "stale in the feed",
            DriftKind::FeedAhead => "feed ahead",
            DriftKind::GoneFromOwner => "gone from the owner",
        }
    }
}

/// One key that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub kind: DriftKind,
    pub key: String,
    /// The owner's version (`null`: no row, or versions not compared).
    pub owner_version: Option<Version>,
    /// The feed's version (`null`: no record); a tombstone's when the feed
    /// holds one for a key the owner has.
    pub feed_version: Option<Version>,
    pub feed_tombstone: bool,
}

/// Differences by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DriftCounts {
    pub missing_from_feed: u64,
    pub stale_in_feed: u64,
    pub feed_ahead: u64,
    pub gone_from_owner: u64,
}

impl DriftCounts {
    pub fn total(&self) -> u64 {
        self.missing_from_feed + self.stale_in_feed + self.feed_ahead + self.gone_from_owner
    }

    fn add(&mut self, kind: DriftKind) {
        match kind {
            DriftKind::MissingFromFeed => self.missing_from_feed += 1,
            DriftKind::StaleInFeed => self.stale_in_feed += 1,
            DriftKind::FeedAhead => self.feed_ahead += 1,
            DriftKind::GoneFromOwner => self.gone_from_owner += 1,
        }
    }
}

/// What one drift check found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    pub dataset: String,
    /// The owner's source (a config path, never credentials).
    pub owner: String,
    pub compare: Compare,
    pub started_at: String,
    pub duration_ms: f64,
    /// Rows the owner's table holds.
    pub owner_rows: usize,
    /// Buckets read from the feed (every bucket in presence mode).
    pub buckets_read: usize,
    pub buckets_total: usize,
    /// Feed entries read from those buckets, and how many were tombstones
    /// (counted as absent: the owner's table has none).
    pub feed_entries: usize,
    pub feed_tombstones: usize,
    pub counts: DriftCounts,
    /// The differences, key by key, up to [`MAX_LISTED`].
    pub differences: Vec<Drift>,
    pub differences_complete: bool,
    pub in_sync: bool,
}

/// A step of a check, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftProgress {
    /// `keys` rows of the owner's table listed so far.
    Listing { keys: usize },
    /// Comparing digest level `level` (0 root, 1 nodes, 2 buckets).
    Comparing { level: u8 },
    /// Entries of `done` of `total` buckets compared.
    Buckets { done: usize, total: usize },
}

/// Why a check stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error(transparent)]
    Owner(#[from] SnapshotError),
    #[error(transparent)]
    Feed(#[from] ReconcileError),
}

impl From<crate::feed::FeedError> for DriftError {
    fn from(e: crate::feed::FeedError) -> Self {
        DriftError::Feed(e.into())
    }
}

/// Compares `dataset`'s feed with its owner's rows; reads only.
pub async fn check(
    feed: &dyn Feed,
    dataset: &str,
    owner: &OwnerRows,
    progress: &(dyn Fn(DriftProgress) + Send + Sync),
) -> Result<DriftReport, DriftError> {
    let started_ms = Clock::System.now_ms();
    let t0 = Instant::now();
    let listed = owner
        .source
        .list(&|keys| progress(DriftProgress::Listing { keys }))
        .await?;
    let versions = owner.compare == Compare::Versions;
    // Per bucket: key → the owner's version.
    let mut rows: HashMap<u16, BTreeMap<String, Version>> = HashMap::new();
    for l in &listed {
        rows.entry(bucket_of(&l.key))
            .or_default()
            .insert(l.key.clone(), l.version);
    }
    let buckets: Vec<u16> = if versions {
        let digest =
            Digest::from_entries(listed.iter().map(|l| (l.key.as_str(), l.version, false)));
        descend(feed, dataset, &digest, &|level| {
            progress(DriftProgress::Comparing { level })
        })
        .await?
    } else {
        (0..BUCKETS as u16).collect()
    };
    let mut report = DriftReport {
        dataset: dataset.to_owned(),
        owner: owner.source.describe(),
        compare: owner.compare,
        started_at: format_rfc3339_ms(started_ms),
        duration_ms: 0.0,
        owner_rows: listed.len(),
        buckets_read: buckets.len(),
        buckets_total: BUCKETS,
        feed_entries: 0,
        feed_tombstones: 0,
        counts: DriftCounts::default(),
        differences: Vec::new(),
        differences_complete: true,
        in_sync: false,
    };
    drop(listed);
    let empty = BTreeMap::new();
    let mut done = 0;
    progress(DriftProgress::Buckets {
        done,
        total: buckets.len(),
    });
    for chunk in buckets.chunks(MAX_DIGEST_BUCKETS) {
        let entries = feed.bucket_entries(dataset, chunk).await?;
        report.feed_entries += entries.len();
        report.feed_tombstones += entries.iter().filter(|e| e.deleted).count();
        let mut by_bucket: HashMap<u16, Vec<DigestEntry>> = HashMap::new();
        for e in entries {
            by_bucket.entry(e.bucket()).or_default().push(e);
        }
        for b in chunk {
            let owner_keys = rows.get(b).unwrap_or(&empty);
            let feed_entries = by_bucket.remove(b).unwrap_or_default();
            for d in compare_bucket(owner_keys, feed_entries, versions) {
                report.counts.add(d.kind);
                if report.differences.len() < MAX_LISTED {
                    report.differences.push(d);
                } else {
                    report.differences_complete = false;
                }
            }
        }
        done += chunk.len();
        progress(DriftProgress::Buckets {
            done,
            total: buckets.len(),
        });
    }
    report.differences.sort_by(|a, b| a.key.cmp(&b.key));
    report.in_sync = report.counts.total() == 0;
    report.duration_ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(report)
}

/// The differences in one bucket: the owner's rows (key → version) against
/// the feed's entries (tombstones included), in key order.
fn compare_bucket(
    owner: &BTreeMap<String, Version>,
    feed: Vec<DigestEntry>,
    versions: bool,
) -> Vec<Drift> {
    let feed: BTreeMap<String, DigestEntry> =
        feed.into_iter().map(|e| (e.key.clone(), e)).collect();
    let mut out = Vec::new();
    let shown = |v: Version| versions.then_some(v);
    for (key, &v) in owner {
        let kind = match feed.get(key) {
            None => Some(DriftKind::MissingFromFeed),
            Some(f) if f.deleted => Some(DriftKind::MissingFromFeed),
            Some(f) if versions && v > f.version => Some(DriftKind::StaleInFeed),
            Some(f) if versions && v < f.version => Some(DriftKind::FeedAhead),
            Some(_) => None,
        };
        if let Some(kind) = kind {
            let f = feed.get(key);
            out.push(Drift {
                kind,
                key: key.clone(),
                owner_version: shown(v),
                feed_version: f.map(|f| f.version),
                feed_tombstone: f.is_some_and(|f| f.deleted),
            });
        }
    }
    for (key, f) in &feed {
        if !f.deleted && !owner.contains_key(key) {
            out.push(Drift {
                kind: DriftKind::GoneFromOwner,
                key: key.clone(),
                owner_version: None,
                feed_version: Some(f.version),
                feed_tombstone: false,
            });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::conformance::manifest;
    use crate::feed::memory::MemoryFeed;
    use crate::feed::{ChangeInput, Publisher};
    use crate::scheduled::memory::MemorySnapshot;

    fn fields(n: i64) -> serde_json::Map<String, serde_json::Value> {
        serde_json::json!({ "n": n })
            .as_object()
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn a_bucket_compares_live_records_and_counts_tombstones_as_absent() {
        let owner: BTreeMap<String, Version> = [("a", 2), ("b", 5), ("c", 1), ("d", 3), ("e", 1)]
            .map(|(k, v)| (k.to_owned(), v))
            .into_iter()
            .collect();
        let feed = vec![
            DigestEntry::new("a", 2, false), // same
            DigestEntry::new("b", 4, false), // stale
            DigestEntry::new("c", 2, true),  // tombstone: missing
            DigestEntry::new("d", 4, false), // ahead
            DigestEntry::new("x", 1, false), // gone
            DigestEntry::new("y", 3, true),  // deleted on both sides
        ];
        let kinds = |versions| -> Vec<(String, DriftKind)> {
            compare_bucket(&owner, feed.clone(), versions)
                .into_iter()
                .map(|d| (d.key, d.kind))
                .collect()
        };
        use DriftKind::*;
        assert_eq!(
            kinds(true),
            [
                ("b", StaleInFeed),
                ("c", MissingFromFeed),
                ("d", FeedAhead),
                ("e", MissingFromFeed),
                ("x", GoneFromOwner)
            ]
            .map(|(k, d)| (k.to_owned(), d))
        );
        assert_eq!(
            kinds(false),
            [
                ("c", MissingFromFeed),
                ("e", MissingFromFeed),
                ("x", GoneFromOwner)
            ]
            .map(|(k, d)| (k.to_owned(), d)),
            "presence only: versions are not compared"
        );
    }

    #[tokio::test]
    async fn only_differing_buckets_are_read_when_versions_compare() {
        let feed = MemoryFeed::new(&manifest());
        let batch: Vec<_> = (0..500)
            .map(|i| ChangeInput::upsert(format!("k{i}"), 1, fields(i)))
            .collect();
        feed.publish("items", batch).await.unwrap();
        let owner = Arc::new(MemorySnapshot::new("items", Projection::none()));
        for i in 0..500 {
            owner.put(&format!("k{i}"), 1, fields(i).into());
        }
        let rows = OwnerRows::snapshot(owner.clone());
        let report = check(&feed, "items", &rows, &|_| {}).await.unwrap();
        assert!(report.in_sync);
        assert_eq!((report.buckets_read, report.feed_entries), (0, 0));
        owner.put("k7", 2, fields(7).into());
        owner.remove("k8");
        let report = check(&feed, "items", &rows, &|_| {}).await.unwrap();
        assert_eq!(
            (report.counts.stale_in_feed, report.counts.gone_from_owner),
            (1, 1)
        );
        assert!(report.buckets_read <= 2, "{}", report.buckets_read);
        let presence = OwnerRows {
            source: owner,
            compare: Compare::PresenceOnly,
        };
        let report = check(&feed, "items", &presence, &|_| {}).await.unwrap();
        assert_eq!(
            report.buckets_read, BUCKETS,
            "presence mode reads every bucket"
        );
        assert_eq!(report.counts.total(), 1, "only k8 differs by presence");
    }
}
