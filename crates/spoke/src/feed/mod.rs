//! Feeds: an owner's ordered change log per dataset plus its compacted latest state.
//!
//! Two traits split the two sides of a feed:
//! - [`Publisher`] — the owner's side: append a batch of changes.
//! - [`Feed`] — the consumer's side: read after a position, long-polling at
//!   the head, and page through the compacted state to bootstrap a copy.
//!
//! # Contract (every backend: in-memory, embedded SQLite, HTTP hub, and later JetStream)
//! - **Positions** are per dataset, start at 1 and increase by one per
//!   appended change. Position 0 means "before the first change".
//! - **Publish is all-or-nothing.** Every change in a batch is validated
//!   (key, version, schema) before any is appended; one invalid change fails
//!   the batch and appends nothing.
//! - **Stale changes are ignored, not errors.** A change whose version is not
//!   newer than the version the feed holds for its key is reported as ignored
//!   and not appended, so relay retries and reordering never fail a batch and
//!   never double an entry. A backend may also compact a batch: a change
//!   superseded by a newer change of the same key *in the same batch* may be
//!   reported as ignored instead of appended (JetStream does; the embedded log
//!   appends both). Under the apply rule such a change could never survive in
//!   a copy, so consumers see the same result either way.
//! - **Durability.** Once `publish` returns, the appended entries survive a
//!   crash of the feed (for the SQLite log: committed in WAL mode with
//!   `synchronous=FULL`).
//! - **Reads** return entries in position order and always carry the `head`
//!   (the last appended position, read after the request arrived) and the
//!   feed's clock, also when empty. A consumer whose position reaches `head`
//!   has everything the feed held when it sent the request.
//! - **Snapshots** are paged by key. Pages are not one atomic view: the
//!   `head` of the *first* page is a position from which replaying the log
//!   after bootstrap, under the apply rule, converges to the owner's state.
//!   Tombstones are included so a bootstrapped copy cannot be resurrected by
//!   an old replayed upsert.
//! - **Concurrency.** Implementations are `Send + Sync`; concurrent publishes
//!   to one dataset are serialised.
//! - **Digests** (for reconciliation, optional per backend). A feed that
//!   serves them keeps a [`Digest`] of its compacted state — `(key, version,
//!   deleted)` per bucket, tombstones included — updated in the same commit
//!   as the state, so every answer equals the digest computed from scratch
//!   over the state at some commit. [`Feed::digest`] answers by tree level
//!   (root, 64 nodes, 4096 buckets, or only the children of given nodes),
//!   [`Feed::bucket_entries`] lists a bucket's keys with version and
//!   tombstone flag, and [`Feed::records`] returns the latest state of given
//!   keys (tombstones included) for repairs. Every backend here serves
//!   them (JetStream from an in-memory digest of the log's last message per
//!   key); a backend that does not answers [`FeedError::BadRequest`] saying
//!   so (the defaults below).

pub mod conformance;
pub mod http;
pub mod jetstream;
pub mod memory;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spoke_core::change::validate_key;
use spoke_core::digest::{DigestEntry, DigestNodes, DigestQuery};
use spoke_core::manifest::Dataset;
use spoke_core::{Change, Manifest, Op, Schema, Version};

/// A position in one dataset's log.
pub type Position = u64;

/// Most changes accepted in one publish.
pub const MAX_BATCH: usize = 10_000;

/// [`Publisher::preferred_batch`] unless a publisher says otherwise.
pub const DEFAULT_GROUP: usize = 1_000;

/// [`Publisher::preferred_batch`] of the hub's embedded store and of a hub
/// client: each publish is one fsynced commit there, so larger groups cost
/// less per change.
pub const STORE_GROUP: usize = 5_000;

/// A change as an owner publishes it (the body of `POST …/changes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeInput {
    pub key: String,
    pub version: Version,
    pub op: Op,
    #[serde(default)]
    pub fields: Map<String, Value>,
    /// Owner commit time (ms since epoch); the feed's clock when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
}

impl ChangeInput {
    pub fn upsert(key: impl Into<String>, version: Version, fields: Map<String, Value>) -> Self {
        ChangeInput {
            key: key.into(),
            version,
            op: Op::Upsert,
            fields,
            ts: None,
        }
    }
    pub fn delete(key: impl Into<String>, version: Version) -> Self {
        ChangeInput {
            key: key.into(),
            version,
            op: Op::Delete,
            fields: Map::new(),
            ts: None,
        }
    }
}

/// One appended change and its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedEntry {
    pub position: Position,
    #[serde(flatten)]
    pub change: Change,
}

/// An answer to a feed read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedBatch {
    pub entries: Vec<FeedEntry>,
    pub head: Position,
    pub hub_time_ms: u64,
}

/// One page of a dataset's compacted state, ordered by key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotPage {
    /// Latest change per key (upserts and tombstones).
    pub records: Vec<Change>,
    /// Pass as `after_key` to get the next page; `None` on the last page.
    pub next_after_key: Option<String>,
    pub head: Position,
    pub hub_time_ms: u64,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishReceipt {
    /// Per input change, its new position, or `None` when it was ignored as stale.
    pub positions: Vec<Option<Position>>,
    pub ignored: usize,
    pub head: Position,
}

/// Why a feed operation failed, classified by what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// No such dataset in the manifest: fix the name.
    #[error("unknown dataset '{0}'")]
    UnknownDataset(String),
    /// The batch was rejected and nothing was appended: fix the input.
    #[error("change {index} rejected: {message}")]
    Invalid { index: usize, message: String },
    /// The request itself is malformed (body, query, size).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No valid credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Valid credentials, but not allowed (e.g. not the dataset's owner).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Could not reach the feed or it failed: retry with backoff.
    #[error("feed unavailable: {0}")]
    Unavailable(String),
    /// The feed holds an entry that is not a valid change (written around
    /// Spoke, e.g. straight onto the bus): stop and let a person look.
    #[error("corrupt feed: {0}")]
    Corrupt(String),
}

impl FeedError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, FeedError::Unavailable(_))
    }
}

/// The owner's side of a feed.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Appends a batch to `dataset` (all-or-nothing; stale changes ignored).
    async fn publish(
        &self,
        dataset: &str,
        changes: Vec<ChangeInput>,
    ) -> Result<PublishReceipt, FeedError>;

    /// How many changes a caller that groups its input (the CDC source)
    /// should put in one publish unless told otherwise. A store that syncs
    /// each publish to disk spreads that cost over larger groups; a bus
    /// that acknowledges change by change answers a smaller group sooner.
    fn preferred_batch(&self) -> usize {
        DEFAULT_GROUP
    }

    /// The catalog this publisher validates against, when it validates
    /// locally (a hub's registry installs new schema versions there); `None`
    /// for a client of a remote hub, which validates on its side.
    fn catalog(&self) -> Option<&Catalog> {
        None
    }
}

/// The consumer's side of a feed.
#[async_trait]
pub trait Feed: Send + Sync {
    /// Entries after `after`, at most `limit`; when there are none yet, waits
    /// up to `wait` for one before answering (empty, with the head).
    async fn read(
        &self,
        dataset: &str,
        after: Position,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<FeedBatch, FeedError>;

    /// A page of the compacted state with keys greater than `after_key`.
    async fn snapshot(
        &self,
        dataset: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, FeedError>;

    /// The dataset's current schema.
    async fn schema(&self, dataset: &str) -> Result<Schema, FeedError>;

    /// Nodes of the compacted state's digest (see "Digests" above).
    async fn digest(&self, dataset: &str, query: &DigestQuery) -> Result<DigestNodes, FeedError> {
        let _ = query;
        Err(digests_not_supported(dataset))
    }

    /// Every key of the compacted state in `buckets` (at most
    /// [`MAX_DIGEST_BUCKETS`] per call), with version and tombstone flag.
    async fn bucket_entries(
        &self,
        dataset: &str,
        buckets: &[u16],
    ) -> Result<Vec<DigestEntry>, FeedError> {
        let _ = buckets;
        Err(digests_not_supported(dataset))
    }

    /// The latest state of each of `keys` that the feed holds (tombstones
    /// included; absent keys are left out), at most [`MAX_PAGE`] per call.
    async fn records(&self, dataset: &str, keys: &[String]) -> Result<Vec<Change>, FeedError> {
        let _ = keys;
        Err(digests_not_supported(dataset))
    }

    /// Fields of `dataset` this feed never carries, so no copy can be kept
    /// of them through it (JetStream keeps private fields off the bus).
    fn withheld_fields(&self, dataset: &str) -> Vec<String> {
        let _ = dataset;
        Vec::new()
    }

    /// Adds the backend's own figures to a hub's `GET /metrics` (the
    /// embedded store's fold lag); nothing by default.
    fn write_metrics(&self, out: &mut crate::metrics::Exposition) {
        let _ = out;
    }
}

/// Most buckets one [`Feed::bucket_entries`] call may ask for.
pub const MAX_DIGEST_BUCKETS: usize = 256;

/// The answer of a feed that keeps no digests.
pub fn digests_not_supported(dataset: &str) -> FeedError {
    FeedError::BadRequest(format!(
        "this feed does not serve digests, bucket entries or records for reconciliation yet (dataset {dataset}); reconcile against the embedded hub"
    ))
}

/// Checks the size of a [`Feed::bucket_entries`] or [`Feed::records`] request.
pub fn check_digest_request(buckets: &[u16], keys: usize) -> Result<(), FeedError> {
    if buckets.len() > MAX_DIGEST_BUCKETS {
        return Err(FeedError::BadRequest(format!(
            "{} buckets asked for; at most {MAX_DIGEST_BUCKETS} per request",
            buckets.len()
        )));
    }
    if let Some(b) = buckets
        .iter()
        .find(|&&b| b as usize >= spoke_core::digest::BUCKETS)
    {
        return Err(FeedError::BadRequest(format!(
            "bucket {b} is out of range (0..{})",
            spoke_core::digest::BUCKETS
        )));
    }
    if keys > MAX_PAGE {
        return Err(FeedError::BadRequest(format!(
            "{keys} keys asked for; at most {MAX_PAGE} per request"
        )));
    }
    Ok(())
}

/// Datasets a feed backend serves, resolved from the manifest once, and the
/// schema each is validated against now: the manifest's, until a hub's
/// schema registry installs a newer version ([`crate::registry`]).
#[derive(Debug, Clone)]
pub struct Catalog {
    datasets: Arc<HashMap<String, Dataset>>,
    current: Arc<RwLock<HashMap<String, Arc<Schema>>>>,
}

impl Catalog {
    pub fn new(manifest: &Manifest) -> Self {
        let current = manifest
            .datasets
            .iter()
            .map(|(name, ds)| (name.clone(), Arc::new(ds.schema.clone())))
            .collect();
        Catalog {
            datasets: Arc::new(manifest.datasets.clone().into_iter().collect()),
            current: Arc::new(RwLock::new(current)),
        }
    }

    /// The schema published changes of `dataset` are validated against.
    pub fn schema(&self, dataset: &str) -> Result<Arc<Schema>, FeedError> {
        self.get(dataset)?;
        Ok(self.current.read().expect("catalog schemas")[dataset].clone())
    }

    /// Validates later publishes of `dataset` against `schema` (the hub's
    /// registry calls this once it accepted a version).
    pub fn install(&self, dataset: &str, schema: Schema) -> Result<(), FeedError> {
        self.get(dataset)?;
        self.current
            .write()
            .expect("catalog schemas")
            .insert(dataset.to_owned(), Arc::new(schema));
        Ok(())
    }

    pub fn get(&self, dataset: &str) -> Result<&Dataset, FeedError> {
        self.datasets
            .get(dataset)
            .ok_or_else(|| FeedError::UnknownDataset(dataset.to_owned()))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.datasets.keys().map(String::as_str)
    }

    /// Validates a whole batch and turns it into changes, or fails on the
    /// first bad change without side effects. Shared by every backend so they
    /// reject exactly the same input.
    pub fn prepare(
        &self,
        dataset: &str,
        inputs: Vec<ChangeInput>,
        now_ms: u64,
    ) -> Result<Vec<Change>, FeedError> {
        let ds = self.get(dataset)?;
        let schema = self.schema(dataset)?;
        if inputs.len() > MAX_BATCH {
            return Err(FeedError::BadRequest(format!(
                "batch of {} changes exceeds the limit of {MAX_BATCH}",
                inputs.len()
            )));
        }
        inputs
            .into_iter()
            .enumerate()
            .map(|(index, input)| {
                let change = Change {
                    dataset: dataset.to_owned(),
                    key: input.key,
                    version: input.version,
                    op: input.op,
                    fields: input.fields,
                    owner: ds.owner.clone(),
                    ts: input.ts.unwrap_or(now_ms),
                    schema_version: schema.version,
                };
                change.validate(&schema).map_err(|e| FeedError::Invalid {
                    index,
                    message: e.to_string(),
                })?;
                Ok(change)
            })
            .collect()
    }
}

/// Validates a snapshot cursor before it reaches a store.
pub fn check_after_key(after_key: Option<&str>) -> Result<(), FeedError> {
    match after_key {
        Some(k) => validate_key(k).map_err(|e| FeedError::BadRequest(format!("after_key: {e}"))),
        None => Ok(()),
    }
}

/// Largest page a read or snapshot returns, whatever the caller asks for.
pub const MAX_PAGE: usize = 10_000;

#[cfg(test)]
pub(crate) mod props {
    //! Hostile input on the way in: whatever bytes arrive as a publish body,
    //! decoding and validation answer with a value or an error, never a
    //! panic, and what passes is a change the schema accepts.

    use super::*;
    use proptest::prelude::*;

    /// Any JSON value, nested a few levels.
    pub fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
            prop_oneof![Just("n"), Just("label"), Just("upsert"), Just("delete")]
                .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("key".to_owned()),
                        Just("version".to_owned()),
                        Just("op".to_owned()),
                        Just("fields".to_owned()),
                        Just("n".to_owned()),
                        Just("label".to_owned()),
                        ".{0,8}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn catalog() -> Catalog {
        Catalog::new(&conformance::manifest())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_publish_body_is_decoded_or_refused_never_a_panic(
            body in json_value(),
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let c = catalog();
            for raw in [serde_json::to_vec(&body).expect("json"), bytes] {
                if let Ok(inputs) = serde_json::from_slice::<Vec<ChangeInput>>(&raw) {
                    if let Ok(changes) = c.prepare("items", inputs, 1) {
                        let schema = c.schema("items").expect("items");
                        for ch in &changes {
                            prop_assert!(ch.validate(&schema).is_ok());
                        }
                    }
                }
            }
        }

        #[test]
        fn changes_with_random_fields_are_validated_by_name(
            key in ".{0,40}",
            version in any::<u64>(),
            fields in proptest::collection::btree_map(".{0,6}|n|label", json_value(), 0..4),
            delete in any::<bool>(),
        ) {
            let input = serde_json::json!({
                "key": key,
                "version": version,
                "op": if delete { "delete" } else { "upsert" },
                "fields": fields,
            });
            if let Ok(i) = serde_json::from_value::<ChangeInput>(input) {
                match catalog().prepare("items", vec![i], 1) {
                    Ok(changes) => prop_assert_eq!(changes.len(), 1),
                    Err(FeedError::Invalid { index, message }) => {
                        prop_assert_eq!(index, 0);
                        prop_assert!(!message.is_empty());
                    }
                    Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
                }
            }
        }
    }
}
