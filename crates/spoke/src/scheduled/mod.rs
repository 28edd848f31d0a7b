//! The `scheduled` strategy: for owners that publish no events, the agent
//! refreshes the copy every `interval` from the owner's snapshot, moving
//! only what changed.
//!
//! ```text
//!  t := now
//!  owner listing: every (key, version) ─▶ owner digest (key, version, live), 4096 buckets
//!       │ whole listing read and checked before anything is written
//!  copy digest ──── differing buckets? ── none ─▶ fresh_as_of := t, done
//!       │ only those buckets
//!  copy entries of those buckets vs the owner's listed keys in them:
//!       owner newer / copy lacks it   ─▶ fetch the full record        (inserted / updated)
//!       copy holds a tombstone        ─▶ drop it, fetch the record    (inserted)
//!       owner no longer lists the key ─▶ remove the copy's row        (deleted)
//!       same version                  ─▶ nothing
//!       copy newer than the owner     ─▶ left alone, logged (the apply rule never rolls back)
//!       │ every full record fetched and checked before anything is written
//!  apply records (apply rule), remove deleted rows, fresh_as_of := t, bookkeeping
//! ```
//!
//! # Why the owner's version is required
//! Every write to a copy goes through the apply rule (`incoming.version >
//! local.version`), and the digest is a digest of `(key, version,
//! deleted)`. The version is what lets a refresh recognise an unchanged
//! record without transferring it (equal digests, equal versions), and what
//! keeps a record fetched a moment after the listing — already newer — from
//! being overwritten by anything older. Without it neither the digest nor
//! the apply rule could tell new from old, so a snapshot source must give a
//! positive integer version per key that grows with every change of that
//! key (a version column bumped in the same transaction, as for the outbox).
//!
//! # Deletions are removals, not tombstones
//! A key the owner no longer lists is removed from the copy with
//! [`CopyStore::remove`] (only while the row still holds the state the
//! refresh saw), not tombstoned. The owner's listing has no tombstones, so
//! a tombstone would leave its bucket's digest different from the owner's
//! on every later refresh, and it would block the owner from creating that
//! key again with a lower version (a recreated row). Rule 1's tombstones
//! exist to stop an *older change delivered late* from resurrecting a
//! deleted record; a scheduled copy has no stream of changes — each refresh
//! reads the owner's current state, and its one writer is the refresher —
//! so there is nothing late to stop. For the same reason a tombstone found
//! in a scheduled copy (left by an earlier strategy) is dropped.
//!
//! # All-or-nothing per refresh, as far as the owner's answers go
//! The whole listing, then every full record needed, is read and checked
//! before the first write: a bad page (not JSON, wrong types, a missing
//! version, duplicate keys, a cursor that repeats, an oversized page) fails
//! the refresh with an error naming the dataset, the source and what is
//! wrong, and the copy is unchanged. Writes then go in transactions of
//! `batch` records; a store failure midway leaves the batches already
//! committed (each is the owner's state, under the apply rule) and the next
//! refresh finishes the job.
//!
//! # Freshness
//! A refresh that succeeds marks the copy fresh as of the moment its
//! listing *started* (consumer clock), through the store's cursor, so
//! `staleness_ms` and `within_budget` mean the same as for `events` copies.
//! A failed refresh leaves freshness alone, so the budget check reports it.
//! Each successful refresh is also recorded in the copy's reconcile
//! bookkeeping (a refresh is a reconcile against the owner's snapshot):
//! inserted records count as `missing`, updated as `stale`, deleted as
//! `extra`.
//!
//! # Sources
//! - [`http::HttpSnapshot`]: `snapshot_url`, the paged protocol documented
//!   there and in the README.
//! - [`postgres::PostgresSnapshot`]: `snapshot_sql` against the owner's
//!   PostgreSQL, connection from the agent's deployment config.
//! - [`memory::MemorySnapshot`]: in-memory, for tests.

pub mod http;
pub mod memory;
pub mod postgres;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use serde_json::{Map, Value};
use spoke_core::change::validate_key;
use spoke_core::digest::{bucket_of, Digest, DigestEntry};
use spoke_core::{Change, Op, Version};

use crate::clock::Clock;
use crate::copy::{Advance, CopySpec, CopyStore, ReconcileRun, StoreError};

/// Keys per full-records request and per apply transaction.
pub const DEFAULT_BATCH: usize = 500;
/// Buckets per `bucket_entries` read of the copy.
const BUCKETS_PER_READ: usize = 256;
/// A refresh logs its progress every this many listed keys or fetched records.
pub const PROGRESS_EVERY: usize = 50_000;

/// One key as the owner lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub version: Version,
}

/// One full record as the owner returns it, fields already projected and
/// checked against the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    pub key: String,
    pub version: Version,
    pub fields: Map<String, Value>,
}

/// Why a refresh failed. Messages name the dataset and the source.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The owner's source failed or answered something unusable.
    #[error("snapshot of {dataset} from {from}: {reason}")]
    Source {
        dataset: String,
        /// The URL asked, or the PostgreSQL source's config path (never credentials).
        from: String,
        reason: String,
        /// Whether asking again later may succeed (timeouts, 5xx, a
        /// connection refused); a bad answer needs the owner fixed.
        transient: bool,
    },
    #[error("snapshot of {dataset}: {error}")]
    Store {
        dataset: String,
        #[source]
        error: StoreError,
    },
}

impl SnapshotError {
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Source { transient, .. } => *transient,
            SnapshotError::Store { error, .. } => matches!(error, StoreError::Unavailable(_)),
        }
    }
}

/// Where a `scheduled` copy reads its owner's state: one source per
/// subscription.
///
/// # Contract
/// - [`SnapshotSource::list`] returns every key the owner holds with its
///   current version, each key once, versions positive; it checks the whole
///   listing before returning, so an error means nothing usable was read.
/// - [`SnapshotSource::records`] returns the full records of the keys
///   asked for that the owner still has (a key deleted since the listing is
///   simply absent), each at most once, fields projected to the
///   subscription and checked against the schema; never a key not asked for.
/// - No retries inside: the refresher retries on its next interval.
/// - Credentials never appear in [`SnapshotSource::describe`] or in errors.
#[async_trait]
pub trait SnapshotSource: Send + Sync {
    /// The source for messages: a URL, or a config path for PostgreSQL.
    fn describe(&self) -> String;

    /// Every `(key, version)` the owner holds; `progress` is called with
    /// the number of keys listed so far, after each page or chunk.
    async fn list(
        &self,
        progress: &(dyn Fn(usize) + Send + Sync),
    ) -> Result<Vec<Listed>, SnapshotError>;

    /// The full records of `keys` (at most [`DEFAULT_BATCH`] per call by
    /// default; the refresher decides).
    async fn records(&self, keys: &[String]) -> Result<Vec<SnapshotRecord>, SnapshotError>;
}

/// Checks a listing as a whole: keys valid and unique, versions positive.
pub(crate) fn check_listing(listed: &[Listed]) -> Result<(), String> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(listed.len());
    for l in listed {
        validate_key(&l.key).map_err(|e| format!("key '{}': {e}", shown(&l.key)))?;
        if l.version == 0 {
            return Err(format!(
                "key '{}' has version 0; versions are positive integers",
                shown(&l.key)
            ));
        }
        if !seen.insert(&l.key) {
            return Err(format!(
                "key '{}' is listed twice; each key must appear once",
                shown(&l.key)
            ));
        }
    }
    Ok(())
}

/// Checks full records against the keys asked for.
pub(crate) fn check_records(asked: &[String], records: &[SnapshotRecord]) -> Result<(), String> {
    let asked: HashSet<&str> = asked.iter().map(String::as_str).collect();
    let mut seen: HashSet<&str> = HashSet::with_capacity(records.len());
    for r in records {
        if !asked.contains(r.key.as_str()) {
            return Err(format!(
                "returned key '{}', which was not asked for",
                shown(&r.key)
            ));
        }
        if !seen.insert(&r.key) {
            return Err(format!("returned key '{}' twice", shown(&r.key)));
        }
        if r.version == 0 {
            return Err(format!(
                "key '{}' has version 0; versions are positive integers",
                shown(&r.key)
            ));
        }
    }
    Ok(())
}

/// A key cut short for messages.
pub(crate) fn shown(key: &str) -> String {
    let mut s: String = key.chars().take(64).collect();
    if s.len() < key.len() {
        s.push('…');
    }
    s
}

/// Tunables with their defaults.
#[derive(Debug, Clone)]
pub struct RefreshOptions {
    /// Keys per full-records request and per apply transaction.
    pub batch: usize,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        RefreshOptions {
            batch: DEFAULT_BATCH,
        }
    }
}

/// What one refresh did.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct RefreshReport {
    pub dataset: String,
    /// Consumer-clock start; the copy is fresh as of this moment.
    pub started_ms: u64,
    pub duration_ms: u64,
    /// Keys the owner listed.
    pub listed: usize,
    /// Buckets whose digests differed, of 4096.
    pub buckets_differing: usize,
    /// Full records asked for (only keys in differing buckets).
    pub fetched: usize,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Keys the copy holds newer than the owner lists them, left alone.
    pub ahead: Vec<String>,
}

impl RefreshReport {
    pub fn changed(&self) -> u64 {
        self.inserted + self.updated + self.deleted
    }
}

/// Refreshes one `scheduled` copy from its owner's snapshot.
pub struct Refresher<'a> {
    source: &'a dyn SnapshotSource,
    store: &'a dyn CopyStore,
    spec: &'a CopySpec,
    schema_version: u32,
    clock: Clock,
    options: RefreshOptions,
}

impl<'a> Refresher<'a> {
    pub fn new(
        source: &'a dyn SnapshotSource,
        store: &'a dyn CopyStore,
        spec: &'a CopySpec,
        schema_version: u32,
    ) -> Self {
        Refresher {
            source,
            store,
            spec,
            schema_version,
            clock: Clock::System,
            options: RefreshOptions::default(),
        }
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn with_options(mut self, options: RefreshOptions) -> Self {
        self.options = options;
        self
    }

    fn store_error(&self, error: StoreError) -> SnapshotError {
        SnapshotError::Store {
            dataset: self.spec.dataset.clone(),
            error,
        }
    }

    /// Runs one refresh; see the module docs for what it guarantees.
    pub async fn run(&self) -> Result<RefreshReport, SnapshotError> {
        let ds = self.spec.dataset.as_str();
        let started_ms = self.clock.now_ms();
        let t0 = Instant::now();
        let from = self.source.describe();
        let logged = AtomicUsize::new(0);
        let progress = |n: usize| {
            let step = n / PROGRESS_EVERY;
            if step > 0 && logged.fetch_max(step, Ordering::Relaxed) < step {
                tracing::info!(dataset = ds, "listing {ds} from {from}: {n} keys so far");
            }
        };
        let listing = self.source.list(&progress).await?;
        let mut report = RefreshReport {
            dataset: ds.to_owned(),
            started_ms,
            listed: listing.len(),
            ..RefreshReport::default()
        };

        // Compare digests; descend only into differing buckets.
        let owner =
            Digest::from_entries(listing.iter().map(|l| (l.key.as_str(), l.version, false)));
        let copy = self
            .store
            .digest(ds)
            .await
            .map_err(|e| self.store_error(e))?;
        let buckets = copy.differing_buckets(&owner);
        report.buckets_differing = buckets.len();
        let differing: HashSet<u16> = buckets.iter().copied().collect();
        let mut copy_rows: HashMap<String, DigestEntry> = HashMap::new();
        for chunk in buckets.chunks(BUCKETS_PER_READ) {
            for e in self
                .store
                .bucket_entries(ds, chunk)
                .await
                .map_err(|e| self.store_error(e))?
            {
                copy_rows.insert(e.key.clone(), e);
            }
        }

        // Classify. BTreeMaps keep the order (and so the logs) stable.
        let mut fetch: BTreeMap<String, bool> = BTreeMap::new(); // key → the copy has an older live row
        let mut tombstones: Vec<DigestEntry> = Vec::new();
        for l in listing
            .iter()
            .filter(|l| differing.contains(&bucket_of(&l.key)))
        {
            match copy_rows.remove(&l.key) {
                None => {
                    fetch.insert(l.key.clone(), false);
                }
                Some(c) if c.deleted => {
                    tombstones.push(c);
                    fetch.insert(l.key.clone(), false);
                }
                Some(c) if c.version < l.version => {
                    fetch.insert(l.key.clone(), true);
                }
                Some(c) if c.version == l.version => {}
                Some(c) => report.ahead.push(format!(
                    "{} (copy v{}, owner v{})",
                    shown(&c.key),
                    c.version,
                    l.version
                )),
            }
        }
        // What is left of the copy's rows in those buckets, the owner no longer lists.
        let mut gone: Vec<DigestEntry> = copy_rows.into_values().collect();
        gone.sort();

        // Fetch every record needed, checking each answer, before writing.
        let keys: Vec<String> = fetch.keys().cloned().collect();
        report.fetched = keys.len();
        let mut records: Vec<SnapshotRecord> = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.options.batch.max(1)) {
            let got = self.source.records(chunk).await?;
            check_records(chunk, &got).map_err(|reason| SnapshotError::Source {
                dataset: ds.to_owned(),
                from: from.clone(),
                reason,
                transient: false,
            })?;
            records.extend(got);
            if keys.len() >= PROGRESS_EVERY
                && records.len() / PROGRESS_EVERY != (records.len() - chunk.len()) / PROGRESS_EVERY
            {
                tracing::info!(
                    dataset = ds,
                    "refreshing {ds}: fetched {} of {} changed records",
                    records.len(),
                    keys.len()
                );
            }
        }

        // Write: tombstones the owner's records replace, then the records
        // (inserts and updates apart, to count them), then deletions.
        let advance = Advance {
            position: None,
            fresh_as_of_ms: None,
            from_feed: false,
        };
        for chunk in tombstones.chunks(self.options.batch.max(1)) {
            self.store
                .remove(ds, chunk)
                .await
                .map_err(|e| self.store_error(e))?;
        }
        for update in [false, true] {
            let changes: Vec<Change> = records
                .iter()
                .filter(|r| fetch.get(&r.key) == Some(&update))
                .map(|r| Change {
                    dataset: ds.to_owned(),
                    key: r.key.clone(),
                    version: r.version,
                    op: Op::Upsert,
                    fields: self.spec.projection.apply(&r.fields),
                    owner: self.spec.owner.clone(),
                    ts: started_ms,
                    schema_version: self.schema_version,
                })
                .collect();
            for chunk in changes.chunks(self.options.batch.max(1)) {
                let out = self
                    .store
                    .apply(ds, chunk, advance)
                    .await
                    .map_err(|e| self.store_error(e))?;
                if update {
                    report.updated += out.applied;
                } else {
                    report.inserted += out.applied;
                }
            }
        }
        let live_gone: BTreeSet<&str> = gone
            .iter()
            .filter(|e| !e.deleted)
            .map(|e| e.key.as_str())
            .collect();
        for chunk in gone.chunks(self.options.batch.max(1)) {
            let live = chunk
                .iter()
                .filter(|e| live_gone.contains(e.key.as_str()))
                .count() as u64;
            let removed = self
                .store
                .remove(ds, chunk)
                .await
                .map_err(|e| self.store_error(e))?;
            // Dropped tombstones are housekeeping, not deletions.
            report.deleted += removed.min(live);
        }

        // Fresh as of the listing's start; then the bookkeeping.
        self.store
            .apply(
                ds,
                &[],
                Advance {
                    position: None,
                    fresh_as_of_ms: Some(started_ms),
                    from_feed: false,
                },
            )
            .await
            .map_err(|e| self.store_error(e))?;
        report.duration_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.store
            .record_reconcile(
                ds,
                &ReconcileRun {
                    started_ms,
                    duration_ms: report.duration_ms,
                    missing: report.inserted,
                    stale: report.updated,
                    extra: report.deleted,
                },
            )
            .await
            .map_err(|e| self.store_error(e))?;
        Ok(report)
    }
}
