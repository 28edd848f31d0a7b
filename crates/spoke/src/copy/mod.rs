//! Copy stores: where a consumer keeps its read-only copies.
//!
//! # Contract (every backend: in-memory, SQLite, and later PostgreSQL)
//! - **Apply rule.** [`CopyStore::apply`] applies each change only when its
//!   version is newer than the key's local version (live record or
//!   tombstone), as [`spoke_core::decide`] says. Within one batch only the
//!   newest change per key can survive ([`newest_per_key`]); it counts as
//!   applied when it changed the copy, every other change as ignored.
//! - **Atomic cursor.** The records of a batch, the new feed position, the
//!   freshness mark and the counters commit in one transaction. A crash at
//!   any instant leaves either all of it or none of it, so a restarted agent
//!   resumes exactly after the last applied batch: nothing lost, nothing
//!   applied twice.
//! - **Delivery.** The agent delivers at least once; with the atomic cursor
//!   every change is *received* exactly once in position order, except during
//!   bootstrap, where snapshot records carry no position and may repeat.
//! - **Read-only.** The store is written only through this trait. Stores that
//!   other programs can open (SQLite, PostgreSQL) refuse their writes with a
//!   message naming the dataset and its owner.
//! - **Projection.** Only the fields of the [`CopySpec`]'s projection are
//!   stored; the agent projects before applying.
//! - **Concurrency.** One agent writes a store; reads may run concurrently.
//!   `spoke reconcile` may write beside a running agent: writes are
//!   serialised by the store (SQLite's write lock, a PostgreSQL advisory
//!   lock per copy), and both go through the apply rule.
//! - **Digest.** Every store keeps the copy's [`Digest`] of `(key, version,
//!   deleted)` per bucket, tombstones included, and updates it in the *same
//!   transaction* as the records it covers: `apply`, `remove` and
//!   `gc_tombstones` XOR out each key's old state and XOR in its new one
//!   (O(1) per change). At every commit, [`CopyStore::digest`] equals
//!   [`Digest::from_entries`] over every row of the copy, and
//!   [`CopyStore::bucket_entries`] lists those rows by bucket.
//! - **Removal, for reconciliation only.** [`CopyStore::remove`] drops a row
//!   outright — no tombstone — but only while it still holds exactly the
//!   state reconcile saw. Reconcile uses it for rows the source does not
//!   have at all ("extra": a tombstone at the copy's version would block the
//!   owner from ever creating that key with a lower version) and for a row
//!   whose version the source holds in the other state (a corrupt row, which
//!   the source's change then replaces). It does not weaken rule 1: rule 1
//!   is about applying the owner's changes, and `remove` applies none. A row
//!   the owner's feed produced is never removed, because the feed still
//!   holds that key at that version or newer, so reconcile never classifies
//!   it as extra; and a changed row fails the state check and is left alone.
//! - **Quarantine.** A change the copy cannot hold (its record does not fill
//!   the projection: a projected field missing or of another type) is kept
//!   with its reason by [`CopyStore::hold`], once per (key, version), and
//!   never applied until [`crate::quarantine::replay`] finds that it fits
//!   and applies it through the apply rule. Held changes keep only the
//!   projection's fields, like the copy itself.
//! - **Narrowing.** [`CopyStore::ensure_copy`] accepts a projection that
//!   only drops fields, or lets a required field be null, in place (see
//!   [`narrowing`]); any other change of the projection is a layout error
//!   that needs the copy rebuilt.

pub mod conformance;
pub mod memory;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spoke_core::digest::{Digest, DigestEntry};
use spoke_core::{Change, Projection, Version};

use crate::feed::Position;

/// What a copy is: which dataset, whose, which fields, and under what name.
#[derive(Debug, Clone)]
pub struct CopySpec {
    pub dataset: String,
    pub owner: String,
    /// The owner's key field name, used as the key column's name.
    pub key_name: String,
    pub projection: Projection,
}

impl CopySpec {
    /// The copy `subscription` makes of its dataset in `manifest`; `None`
    /// when the dataset is missing or the projection does not fit its
    /// schema (a manifest that passed `spoke check` has neither).
    pub fn of(
        manifest: &spoke_core::Manifest,
        subscription: &spoke_core::manifest::Subscription,
    ) -> Option<Self> {
        let ds = manifest.datasets.get(&subscription.dataset)?;
        Some(CopySpec {
            dataset: ds.name.clone(),
            owner: ds.owner.clone(),
            key_name: ds.key.clone(),
            projection: Projection::new(&ds.schema, &subscription.fields)?,
        })
    }

    /// `change` as this copy stores it: an upsert keeps only the projected
    /// fields (absent optional ones as null); a delete is unchanged.
    pub fn project(&self, mut change: Change) -> Change {
        if change.op == spoke_core::Op::Upsert {
            change.fields = self.projection.apply(&change.fields);
        }
        change
    }
}

/// Where a copy stands in its feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Last applied feed position; `None` until the bootstrap completed.
    pub position: Option<Position>,
    /// Consumer-clock time the copy was last known to hold the whole feed (0 = never).
    pub fresh_as_of_ms: u64,
    /// Feed entries received after bootstrap (applied or ignored).
    pub received_total: u64,
    /// Changes that changed the copy, bootstrap included.
    pub applied_total: u64,
}

/// How to move the cursor together with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    /// New position; `None` leaves it (bootstrap pages).
    pub position: Option<Position>,
    /// New freshness mark; `None` leaves it.
    pub fresh_as_of_ms: Option<u64>,
    /// Whether these changes are feed entries (counted as received).
    pub from_feed: bool,
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    pub applied: u64,
    pub ignored: u64,
}

/// A live record in a copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyRecord {
    pub key: String,
    pub version: Version,
    pub fields: Map<String, Value>,
}

/// Reconciliation bookkeeping of one copy. It is kept in the store, so a
/// run made by `spoke reconcile` shows in the agent's status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReconcileStats {
    pub runs_total: u64,
    /// Consumer-clock start of the last run (0 = never).
    pub last_run_ms: u64,
    pub last_duration_ms: u64,
    /// Repairs made by the last run.
    pub last_repaired: u64,
    pub repaired_missing_total: u64,
    pub repaired_stale_total: u64,
    pub repaired_extra_total: u64,
}

/// One finished reconcile run, to add to the [`ReconcileStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReconcileRun {
    pub started_ms: u64,
    pub duration_ms: u64,
    pub missing: u64,
    pub stale: u64,
    pub extra: u64,
}

impl ReconcileStats {
    /// The stats after `run`.
    pub fn with_run(mut self, run: &ReconcileRun) -> Self {
        self.runs_total += 1;
        self.last_run_ms = run.started_ms;
        self.last_duration_ms = run.duration_ms;
        self.last_repaired = run.missing + run.stale + run.extra;
        self.repaired_missing_total += run.missing;
        self.repaired_stale_total += run.stale;
        self.repaired_extra_total += run.extra;
        self
    }
}

/// A change kept out of the copy, with why (see "Quarantine" above).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    /// As received, fields limited to the projection's names.
    pub change: Change,
    /// The feed position it came from; `None` for a bootstrap snapshot record.
    pub position: Option<Position>,
    pub reason: String,
    /// Consumer-clock time it was first held.
    pub held_at_ms: u64,
}

/// The columns to drop when the copy laid out as `existing` (the store's
/// JSON list of (name, spec)) can become `next` in place: every field of
/// `next` is in `existing` with the same type, and none that could hold
/// null becomes required. `None` when it cannot (a rebuild is needed);
/// `Some(empty)` when only optionality loosened.
pub fn narrowing(existing: &str, next: &[(String, spoke_core::FieldSpec)]) -> Option<Vec<String>> {
    let old: Vec<(String, spoke_core::FieldSpec)> = serde_json::from_str(existing).ok()?;
    let fits = next.iter().all(|(n, s)| {
        old.iter()
            .any(|(o, os)| o == n && os.ty == s.ty && (s.optional || !os.optional))
    });
    fits.then(|| {
        old.iter()
            .filter(|(o, _)| !next.iter().any(|(n, _)| n == o))
            .map(|(o, _)| o.clone())
            .collect()
    })
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no copy of dataset '{0}' in this store")]
    UnknownCopy(String),
    /// The store cannot be reached or failed: retry.
    #[error("copy store: {0}")]
    Unavailable(String),
    /// The store's existing layout conflicts with the spec: needs a person.
    #[error("copy store layout: {0}")]
    Layout(String),
}

/// The newest change per key of a batch, in first-seen key order.
///
/// Under the apply rule only the newest version of a key in a batch can
/// survive, so stores apply just these (one row per key also lets a store
/// use one set-based statement); the others count as ignored.
pub fn newest_per_key(changes: &[Change]) -> Vec<&Change> {
    let mut index: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(changes.len());
    let mut out: Vec<&Change> = Vec::with_capacity(changes.len());
    for c in changes {
        match index.get(c.key.as_str()) {
            Some(&i) if out[i].version >= c.version => {}
            Some(&i) => out[i] = c,
            None => {
                index.insert(&c.key, out.len());
                out.push(c);
            }
        }
    }
    out
}

/// A consumer's copy store.
#[async_trait]
pub trait CopyStore: Send + Sync {
    /// Creates the copy for `spec` if missing; idempotent.
    async fn ensure_copy(&self, spec: &CopySpec) -> Result<(), StoreError>;

    /// The copy's cursor.
    async fn cursor(&self, dataset: &str) -> Result<Cursor, StoreError>;

    /// Applies projected changes and moves the cursor, atomically.
    async fn apply(
        &self,
        dataset: &str,
        changes: &[Change],
        advance: Advance,
    ) -> Result<ApplyOutcome, StoreError>;

    /// Reads one live record.
    async fn get(&self, dataset: &str, key: &str) -> Result<Option<CopyRecord>, StoreError>;

    /// The cursor and one live record, the cursor read first (so the
    /// freshness it carries never overstates the record's). A store may
    /// read both in one snapshot and one trip to its database; the default
    /// makes two calls.
    async fn get_with_cursor(
        &self,
        dataset: &str,
        key: &str,
    ) -> Result<(Cursor, Option<CopyRecord>), StoreError> {
        let cursor = self.cursor(dataset).await?;
        let record = self.get(dataset, key).await?;
        Ok((cursor, record))
    }

    /// Live records in the copy.
    async fn count(&self, dataset: &str) -> Result<u64, StoreError>;

    /// Drops tombstones written before `now_ms - horizon_ms`; returns how many.
    async fn gc_tombstones(
        &self,
        dataset: &str,
        now_ms: u64,
        horizon_ms: u64,
    ) -> Result<u64, StoreError>;

    /// The copy's digest, as of the last commit (see "Digest" above).
    async fn digest(&self, dataset: &str) -> Result<Digest, StoreError>;

    /// Every row (live record or tombstone) whose key falls in `buckets`.
    async fn bucket_entries(
        &self,
        dataset: &str,
        buckets: &[u16],
    ) -> Result<Vec<DigestEntry>, StoreError>;

    /// Drops the rows that still hold exactly these states, updating the
    /// digest; returns how many it dropped. Only reconcile calls this (see
    /// "Removal" above).
    async fn remove(&self, dataset: &str, entries: &[DigestEntry]) -> Result<u64, StoreError>;

    /// The copy's reconciliation bookkeeping.
    async fn reconcile_stats(&self, dataset: &str) -> Result<ReconcileStats, StoreError>;

    /// Adds a finished run to the bookkeeping.
    async fn record_reconcile(&self, dataset: &str, run: &ReconcileRun) -> Result<(), StoreError>;

    /// Keeps changes out of the copy with their reasons; a (key, version)
    /// already held is left as it is.
    async fn hold(&self, dataset: &str, held: &[Held]) -> Result<(), StoreError>;

    /// Held changes, oldest first, at most `limit`.
    async fn held(&self, dataset: &str, limit: usize) -> Result<Vec<Held>, StoreError>;

    /// How many changes are held.
    async fn held_count(&self, dataset: &str) -> Result<u64, StoreError>;

    /// Forgets these held (key, version) pairs; returns how many it forgot.
    async fn release(&self, dataset: &str, held: &[(String, Version)]) -> Result<u64, StoreError>;

    /// Every live record and tombstone, for tests and small comparisons:
    /// key → (version, deleted, fields).
    async fn dump(
        &self,
        dataset: &str,
    ) -> Result<std::collections::BTreeMap<String, (Version, bool, Map<String, Value>)>, StoreError>;
}
