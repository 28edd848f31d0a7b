//! The read API for consumers: records from a copy with their freshness.
//!
//! This is the only view of a copy that Spoke gives a service's code, and it
//! has no write methods (rule 5: copies are read-only). The agent's HTTP API
//! answers through it too, so Rust and non-Rust consumers see the same thing.
//!
//! A `ttl` subscription has no stored copy: its reads go through its
//! [`TtlCache`] to the owner. Bounded-staleness reads
//! ([`Copy::get_within`]) answer from the copy when it is fresh enough,
//! else from the owner's `owner_url`, else fail with [`ReadError::TooStale`]
//! carrying the stale value:
//!
//! ```text
//!  get_within(key, max) ──▶ copy staleness ≤ max? ──yes──▶ local record
//!                             │ no
//!                             ▼
//!                   owner_url and an owner source? ──no──▶ TooStale { local value, staleness }
//!                             │ yes
//!                             ▼
//!                   owner.fetch(key) ──error──▶ TooStale { local value, staleness, owner error }
//!                             │ ok
//!                             ▼
//!        events copy and the owner gave a version? ──yes──▶ apply it as an upsert (apply rule decides)
//!                             ▼
//!                       the owner's record
//! ```
//!
//! The copy is refreshed only from `events` copies' owners that return a
//! `version`: that version is the one the feed carries, so the apply rule
//! keeps the copy convergent. A `cdc` copy's versions are commit LSNs that
//! an owner's endpoint cannot know, and a record without a version cannot
//! be ordered against the feed; both are returned without touching the copy.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spoke_core::change::validate_key;
use spoke_core::freshness::format_rfc3339_ms;
use spoke_core::manifest::{CacheSettings, Strategy};
use spoke_core::{Change, Duration, Freshness, Manifest, Op, Projection, Version};

use crate::clock::Clock;
use crate::copy::{Advance, CopyStore, ReconcileStats, StoreError};
use crate::owner::{OwnerError, OwnerRecord, OwnerSource};
use crate::ttl::{CacheMiss, CacheSource, CacheStats, CachedRead, TtlCache};

/// Where a read's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadSource {
    /// The local copy.
    #[default]
    Copy,
    /// The owner, just now (a bounded-staleness fallback or a cache miss).
    Owner,
    /// A `ttl` cache entry within its ttl.
    Cache,
    /// An expired `ttl` cache entry, served because the owner failed.
    StaleCache,
}

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
    /// Where the value came from; `version` is 0 when it came from an owner
    /// that gave none.
    #[serde(default)]
    pub source: ReadSource,
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
    /// A `ttl` subscription's cache counters (absent for stored copies, and
    /// when read from the store without a running agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStats>,
    /// Changes held in quarantine (see [`crate::quarantine`]); while any is
    /// held the copy is not fresh.
    #[serde(default)]
    pub quarantined: u64,
    /// Why the oldest held change was held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_reason: Option<String>,
    /// Fields the owner's newer schema offers that the subscription does not
    /// project (reported by a running agent; never copied until projected).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub new_fields: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0} is not a copy this consumer keeps")]
    NotACopy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("key '{key}': {reason}")]
    BadKey { key: String, reason: String },
    /// The owner could not be read and nothing local could stand in.
    #[error(transparent)]
    Owner(Box<OwnerError>),
    /// A `ttl` subscription read without an owner source to read through.
    #[error("{0} is a ttl subscription: reading it needs an owner source (Copies::with_owner)")]
    NoOwnerSource(String),
    /// The copy is staler than the caller allowed and the owner could not
    /// answer instead. `value` is what the copy (or cache) holds, so the
    /// caller can still decide to use it.
    #[error("{dataset}/{key}: {}", too_stale_message(.staleness_ms, *.max_staleness_ms, .fallback_error.as_deref()))]
    TooStale {
        dataset: String,
        key: String,
        value: Option<Box<Read>>,
        /// `None`: the copy was never fresh.
        staleness_ms: Option<u64>,
        max_staleness_ms: u64,
        /// Why the owner fallback failed; `None` when there is no `owner_url`.
        fallback_error: Option<Box<OwnerError>>,
    },
}

fn too_stale_message(
    staleness_ms: &Option<u64>,
    max_staleness_ms: u64,
    fallback_error: Option<&OwnerError>,
) -> String {
    let how = match staleness_ms {
        Some(s) => format!("the copy is {s} ms stale, over the {max_staleness_ms} ms asked for"),
        None => format!("the copy was never fresh (asked for at most {max_staleness_ms} ms)"),
    };
    match fallback_error {
        None => format!("{how}, and the subscription has no owner_url to read from instead"),
        Some(e) => format!("{how}, and reading the owner instead failed: {e}"),
    }
}

#[derive(Debug, Clone)]
struct CopyInfo {
    owner: String,
    strategy: Strategy,
    budget: Duration,
    schema_version: u32,
    /// The subscription names an `owner_url`.
    has_owner_url: bool,
    cache: Option<CacheSettings>,
    /// Applied again to every owner record, whatever the source promised:
    /// only projected fields are served or stored (rule 6).
    projection: Projection,
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

    /// The record for `key`, at most `max_staleness` stale: from the copy
    /// when it is fresh enough, else from the owner (see the module docs);
    /// [`ReadError::TooStale`] with the stale value when neither can.
    pub async fn get_within(
        &self,
        key: &str,
        max_staleness: std::time::Duration,
    ) -> Result<Option<Read>, ReadError> {
        self.copies
            .get_within(&self.dataset, key, max_staleness)
            .await
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
    owner: Option<Arc<dyn OwnerSource>>,
    caches: Arc<BTreeMap<String, TtlCache>>,
}

impl Copies {
    /// The copies `consumer` keeps according to `manifest`, read from
    /// `store`. `ttl` subscriptions are listed too; reading them needs
    /// [`Copies::with_owner`].
    pub fn new(
        manifest: &Manifest,
        consumer: &str,
        store: Arc<dyn CopyStore>,
        clock: Clock,
    ) -> Self {
        let copies = manifest
            .subscriptions_of(consumer)
            .filter(|s| s.strategy.stores_copy() || s.strategy == Strategy::Ttl)
            .filter_map(|s| {
                let ds = manifest.datasets.get(&s.dataset)?;
                let projection = Projection::new(&ds.schema, &s.fields)?;
                Some((
                    s.dataset.clone(),
                    CopyInfo {
                        owner: ds.owner.clone(),
                        strategy: s.strategy,
                        budget: s.staleness_budget,
                        schema_version: ds.schema.version,
                        has_owner_url: s.owner_url.is_some(),
                        cache: s.cache,
                        projection,
                    },
                ))
            })
            .collect();
        Copies {
            store,
            copies: Arc::new(copies),
            clock,
            owner: None,
            caches: Arc::new(BTreeMap::new()),
        }
    }

    /// Reads owners through `source`: the fallback of bounded-staleness
    /// reads, and one new [`TtlCache`] per `ttl` subscription.
    pub fn with_owner(mut self, source: Arc<dyn OwnerSource>) -> Self {
        let caches = self
            .copies
            .iter()
            .filter_map(|(d, info)| {
                let settings = info.cache?;
                Some((
                    d.clone(),
                    TtlCache::new(d, settings, source.clone(), self.clock.clone()),
                ))
            })
            .collect();
        self.caches = Arc::new(caches);
        self.owner = Some(source);
        self
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

    /// The strategy of `dataset`'s subscription.
    pub fn strategy(&self, dataset: &str) -> Result<Strategy, ReadError> {
        Ok(self.info(dataset)?.strategy)
    }

    /// The cache of a `ttl` subscription, when these copies have an owner source.
    pub fn cache(&self, dataset: &str) -> Option<&TtlCache> {
        self.caches.get(dataset)
    }

    fn info(&self, dataset: &str) -> Result<&CopyInfo, ReadError> {
        self.copies
            .get(dataset)
            .ok_or_else(|| ReadError::NotACopy(dataset.to_owned()))
    }

    /// The record for `key`, with the copy's freshness; `None` when absent.
    pub async fn get(&self, dataset: &str, key: &str) -> Result<Option<Read>, ReadError> {
        let info = self.info(dataset)?;
        if info.strategy == Strategy::Ttl {
            let cache = self.ttl_cache(dataset, key)?;
            return match cache.get(key).await {
                Ok(c) => Ok(self.cached_read(dataset, key, info, c)),
                Err(miss) => Err(ReadError::Owner(Box::new(miss.error))),
            };
        }
        let (cursor, record) = self.store.get_with_cursor(dataset, key).await?;
        Ok(record.map(|r| self.stored_read(dataset, info, &cursor, r)))
    }

    /// The record for `key`, at most `max_staleness` stale; see [`Copy::get_within`].
    pub async fn get_within(
        &self,
        dataset: &str,
        key: &str,
        max_staleness: std::time::Duration,
    ) -> Result<Option<Read>, ReadError> {
        let info = self.info(dataset)?;
        let max_ms = u64::try_from(max_staleness.as_millis()).unwrap_or(u64::MAX);
        if info.strategy == Strategy::Ttl {
            let cache = self.ttl_cache(dataset, key)?;
            return match cache.get_within(key, max_ms).await {
                Ok(c) => Ok(self.cached_read(dataset, key, info, c)),
                Err(CacheMiss {
                    error,
                    stale: Some(stale),
                }) => Err(ReadError::TooStale {
                    dataset: dataset.to_owned(),
                    key: key.to_owned(),
                    staleness_ms: Some(stale.age_ms),
                    value: self.cached_read(dataset, key, info, stale).map(Box::new),
                    max_staleness_ms: max_ms,
                    fallback_error: Some(Box::new(error)),
                }),
                Err(CacheMiss { error, stale: None }) => Err(ReadError::Owner(Box::new(error))),
            };
        }
        // One trip for both: the local value is the answer when fresh
        // enough, and the stale value a TooStale error carries otherwise.
        let (cursor, record) = self.store.get_with_cursor(dataset, key).await?;
        let local = record.map(|r| self.stored_read(dataset, info, &cursor, r));
        let staleness = Freshness {
            fresh_as_of_ms: cursor.fresh_as_of_ms,
        }
        .staleness_ms(self.clock.now_ms());
        if staleness.is_some_and(|s| s <= max_ms) {
            return Ok(local);
        }
        let too_stale = |value: Option<Read>, fallback_error| ReadError::TooStale {
            dataset: dataset.to_owned(),
            key: key.to_owned(),
            value: value.map(Box::new),
            staleness_ms: staleness,
            max_staleness_ms: max_ms,
            fallback_error,
        };
        let owner = match (&self.owner, info.has_owner_url) {
            (Some(owner), true) => owner,
            _ => return Err(too_stale(local, None)),
        };
        check_key(key)?;
        let sent_at = self.clock.now_ms();
        match owner.fetch(dataset, key).await {
            Ok(None) => Ok(None),
            Ok(Some(mut record)) => {
                record.fields = info.projection.apply(&record.fields);
                self.refresh(dataset, key, info, &record, sent_at).await;
                let age = self.clock.now_ms().saturating_sub(sent_at);
                Ok(Some(self.read_of(
                    dataset,
                    key,
                    info,
                    record,
                    sent_at,
                    age,
                    ReadSource::Owner,
                )))
            }
            Err(e) => Err(too_stale(local, Some(Box::new(e)))),
        }
    }

    /// Applies a record read from the owner to an `events` copy, when the
    /// owner gave its version, through the same apply rule as the feed.
    /// Best effort: the read already succeeded, so a failed write is logged.
    async fn refresh(
        &self,
        dataset: &str,
        key: &str,
        info: &CopyInfo,
        record: &OwnerRecord,
        sent_at: u64,
    ) {
        let (Some(version), Strategy::Events) = (record.version, info.strategy) else {
            return;
        };
        let change = Change {
            dataset: dataset.to_owned(),
            key: key.to_owned(),
            version,
            op: Op::Upsert,
            fields: record.fields.clone(),
            owner: info.owner.clone(),
            ts: sent_at,
            schema_version: info.schema_version,
        };
        // No position and no freshness mark: one record read from the owner
        // says nothing about the rest of the copy.
        let advance = Advance {
            position: None,
            fresh_as_of_ms: None,
            from_feed: false,
        };
        if let Err(e) = self.store.apply(dataset, &[change], advance).await {
            tracing::warn!(
                dataset,
                key,
                "could not refresh the copy from its owner: {e}"
            );
        }
    }

    fn ttl_cache(&self, dataset: &str, key: &str) -> Result<&TtlCache, ReadError> {
        check_key(key)?;
        self.caches
            .get(dataset)
            .ok_or_else(|| ReadError::NoOwnerSource(dataset.to_owned()))
    }

    #[allow(clippy::too_many_arguments)]
    fn read_of(
        &self,
        dataset: &str,
        key: &str,
        info: &CopyInfo,
        record: OwnerRecord,
        fetched_at_ms: u64,
        age_ms: u64,
        source: ReadSource,
    ) -> Read {
        Read {
            dataset: dataset.to_owned(),
            key: key.to_owned(),
            fields: info.projection.apply(&record.fields),
            version: record.version.unwrap_or(0),
            fresh_as_of: Some(format_rfc3339_ms(fetched_at_ms)),
            fresh_as_of_ms: fetched_at_ms,
            staleness_ms: Some(age_ms),
            within_budget: age_ms <= info.budget.as_millis(),
            source,
        }
    }

    /// A cache answer as a read; `None` when the owner has no such key.
    fn cached_read(
        &self,
        dataset: &str,
        key: &str,
        info: &CopyInfo,
        c: CachedRead,
    ) -> Option<Read> {
        let source = match c.source {
            CacheSource::Hit => ReadSource::Cache,
            CacheSource::Owner => ReadSource::Owner,
            CacheSource::StaleOnError => ReadSource::StaleCache,
        };
        let record = c.record?;
        Some(self.read_of(
            dataset,
            key,
            info,
            record,
            c.fetched_at_ms,
            c.age_ms,
            source,
        ))
    }

    /// A stored record as a read, with the copy's freshness.
    fn stored_read(
        &self,
        dataset: &str,
        info: &CopyInfo,
        cursor: &crate::copy::Cursor,
        rec: crate::copy::CopyRecord,
    ) -> Read {
        let now = self.clock.now_ms();
        let f = Freshness {
            fresh_as_of_ms: cursor.fresh_as_of_ms,
        };
        Read {
            dataset: dataset.to_owned(),
            key: rec.key,
            fields: rec.fields,
            version: rec.version,
            fresh_as_of: (f.fresh_as_of_ms != 0).then(|| format_rfc3339_ms(f.fresh_as_of_ms)),
            fresh_as_of_ms: f.fresh_as_of_ms,
            staleness_ms: f.staleness_ms(now),
            within_budget: f.within(info.budget, now),
            source: ReadSource::Copy,
        }
    }

    /// The standing of one copy; `head` and `last_error` come from a running agent when there is one.
    pub async fn status(
        &self,
        dataset: &str,
        head: Option<u64>,
        last_error: Option<String>,
    ) -> Result<CopyStatus, ReadError> {
        let info = self.info(dataset)?;
        if info.strategy == Strategy::Ttl {
            // A cache has no feed position and no copy-wide freshness: each
            // entry carries its own age, kept within the ttl (≤ the budget).
            let cache = self.caches.get(dataset).map(TtlCache::stats);
            return Ok(CopyStatus {
                dataset: dataset.to_owned(),
                owner: info.owner.clone(),
                strategy: info.strategy.as_str().to_owned(),
                staleness_budget: info.budget.to_string(),
                position: None,
                head: None,
                lag_positions: None,
                fresh_as_of: None,
                staleness_ms: None,
                within_budget: true,
                records: cache.map_or(0, |c| c.entries),
                applied_total: 0,
                received_total: 0,
                last_error,
                reconcile: ReconcileStats::default(),
                cache,
                quarantined: 0,
                quarantine_reason: None,
                new_fields: Vec::new(),
            });
        }
        let cursor = self.store.cursor(dataset).await?;
        let records = self.store.count(dataset).await?;
        let reconcile = self.store.reconcile_stats(dataset).await?;
        let quarantined = self.store.held_count(dataset).await?;
        let quarantine_reason = if quarantined > 0 {
            self.store
                .held(dataset, 1)
                .await?
                .into_iter()
                .next()
                .map(|h| h.reason)
        } else {
            None
        };
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
            cache: None,
            quarantined,
            quarantine_reason,
            new_fields: Vec::new(),
        })
    }
}

fn check_key(key: &str) -> Result<(), ReadError> {
    validate_key(key).map_err(|e| ReadError::BadKey {
        key: key.chars().take(64).collect(),
        reason: e.to_string(),
    })
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

#[cfg(test)]
mod bounded_staleness_tests {
    use std::time::Duration as StdDuration;

    use serde_json::json;

    use super::*;
    use crate::copy::memory::MemoryCopyStore;
    use crate::copy::CopySpec;
    use crate::owner::memory::MemoryOwner;

    const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int", label = "string?" }

[datasets.people]
owner = "owner-svc"
key = "id"
fields = { name = "string" }

[datasets.prices]
owner = "owner-svc"
key = "id"
fields = { cents = "int" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n"]
strategy = "events"
staleness_budget = "1m"
owner_url = "http://owner.invalid/items/{key}"

[[subscriptions]]
consumer = "reader-svc"
dataset = "people"
fields = ["name"]
strategy = "events"
staleness_budget = "1m"

[[subscriptions]]
consumer = "reader-svc"
dataset = "prices"
fields = ["cents"]
strategy = "ttl"
staleness_budget = "5m"
ttl = "1m"
owner_url = "http://owner.invalid/prices/{key}"
"#;

    const START: u64 = 1_000_000;

    struct Fixture {
        clock: Clock,
        store: Arc<MemoryCopyStore>,
        owner: Arc<MemoryOwner>,
        copies: Copies,
    }

    async fn fixture() -> Fixture {
        let manifest = Manifest::parse("m.toml", MANIFEST).unwrap();
        let clock = Clock::manual(START);
        let store = Arc::new(MemoryCopyStore::with_clock(clock.clone()));
        for sub in manifest.subscriptions_of("reader-svc") {
            if !sub.strategy.follows_feed() {
                continue;
            }
            let ds = &manifest.datasets[&sub.dataset];
            store
                .ensure_copy(&CopySpec {
                    dataset: ds.name.clone(),
                    owner: ds.owner.clone(),
                    key_name: ds.key.clone(),
                    projection: Projection::new(&ds.schema, &sub.fields).unwrap(),
                })
                .await
                .unwrap();
        }
        let owner = Arc::new(MemoryOwner::new());
        let copies = Copies::new(&manifest, "reader-svc", store.clone(), clock.clone())
            .with_owner(owner.clone());
        Fixture {
            clock,
            store,
            owner,
            copies,
        }
    }

    impl Fixture {
        /// Applies one upsert from the feed and marks the copy fresh now.
        async fn feed(&self, dataset: &str, key: &str, version: u64, fields: serde_json::Value) {
            let change = Change {
                dataset: dataset.into(),
                key: key.into(),
                version,
                op: Op::Upsert,
                fields: fields.as_object().unwrap().clone(),
                owner: "owner-svc".into(),
                ts: 1,
                schema_version: 1,
            };
            self.store
                .apply(
                    dataset,
                    &[change],
                    Advance {
                        position: Some(version),
                        fresh_as_of_ms: Some(self.clock.now_ms()),
                        from_feed: true,
                    },
                )
                .await
                .unwrap();
        }
    }

    const SECS_30: StdDuration = StdDuration::from_secs(30);

    #[tokio::test]
    async fn a_fresh_enough_copy_answers_locally() {
        let f = fixture().await;
        f.feed("items", "a", 3, json!({"n": 7})).await;
        f.owner.put("items", "a", json!({"n": 99}), Some(9));
        f.clock.advance(30_000);
        let r = f
            .copies
            .copy("items")
            .unwrap()
            .get_within("a", SECS_30)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.source, r.version, r.fields["n"].clone(), r.staleness_ms),
            (ReadSource::Copy, 3, json!(7), Some(30_000))
        );
        assert_eq!(f.owner.calls(), 0);
    }

    #[tokio::test]
    async fn a_too_stale_copy_reads_the_owner_and_applies_a_versioned_record() {
        let f = fixture().await;
        f.feed("items", "a", 3, json!({"n": 7})).await;
        f.feed("items", "b", 4, json!({"n": 1})).await;
        f.owner.put("items", "a", json!({"n": 8}), Some(5));
        f.owner.put("items", "b", json!({"n": 2}), None);
        f.clock.advance(120_000);
        let copy = f.copies.copy("items").unwrap();
        let r = copy.get_within("a", SECS_30).await.unwrap().unwrap();
        assert_eq!(
            (
                r.source,
                r.version,
                r.fields["n"].clone(),
                r.staleness_ms,
                r.within_budget
            ),
            (ReadSource::Owner, 5, json!(8), Some(0), true)
        );
        let stored = f.store.get("items", "a").await.unwrap().unwrap();
        assert_eq!(
            (stored.version, stored.fields["n"].clone()),
            (5, json!(8)),
            "the copy was refreshed through the apply rule"
        );
        assert_eq!(
            f.store.cursor("items").await.unwrap().fresh_as_of_ms,
            START,
            "one record from the owner does not make the whole copy fresh"
        );
        // Without a version the owner's value is served but never written.
        let r = copy.get_within("b", SECS_30).await.unwrap().unwrap();
        assert_eq!(
            (r.source, r.version, r.fields["n"].clone()),
            (ReadSource::Owner, 0, json!(2))
        );
        let stored = f.store.get("items", "b").await.unwrap().unwrap();
        assert_eq!((stored.version, stored.fields["n"].clone()), (4, json!(1)));
        // The owner says the key is gone: absent, and the copy is untouched.
        assert_eq!(copy.get_within("c", SECS_30).await.unwrap(), None);
        assert_eq!(f.owner.calls(), 3);
    }

    #[tokio::test]
    async fn a_too_stale_copy_without_owner_url_fails_carrying_the_stale_value() {
        let f = fixture().await;
        f.feed("people", "p1", 2, json!({"name": "Ada"})).await;
        f.clock.advance(90_000);
        let err = f
            .copies
            .copy("people")
            .unwrap()
            .get_within("p1", SECS_30)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "people/p1: the copy is 90000 ms stale, over the 30000 ms asked for, and the subscription has no owner_url to read from instead"
        );
        let ReadError::TooStale {
            value,
            staleness_ms,
            max_staleness_ms,
            fallback_error,
            ..
        } = err
        else {
            panic!("expected TooStale, got {err:?}");
        };
        let value = value.expect("the stale value travels with the error");
        assert_eq!(
            (value.fields["name"].clone(), value.version, value.source),
            (json!("Ada"), 2, ReadSource::Copy)
        );
        assert_eq!(
            (staleness_ms, max_staleness_ms, fallback_error),
            (Some(90_000), 30_000, None)
        );
        assert_eq!(f.owner.calls(), 0);
        // A bound the copy meets reads it normally.
        let ok = f
            .copies
            .get_within("people", "p1", StdDuration::from_secs(90))
            .await
            .unwrap();
        assert_eq!(ok.map(|r| r.version), Some(2));
    }

    #[tokio::test]
    async fn an_owner_failure_on_fallback_fails_with_the_stale_value_and_the_reason() {
        let f = fixture().await;
        f.feed("items", "a", 3, json!({"n": 7})).await;
        f.owner.set_failing(true);
        f.clock.advance(45_000);
        let err = f
            .copies
            .get_within("items", "a", SECS_30)
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("items/a: the copy is 45000 ms stale, over the 30000 ms asked for, and reading the owner instead failed: owner of items, key 'a':"),
            "{err}"
        );
        let ReadError::TooStale {
            value,
            fallback_error,
            ..
        } = err
        else {
            panic!("expected TooStale");
        };
        assert_eq!(value.map(|v| v.version), Some(3));
        assert!(fallback_error.is_some_and(|e| e.is_transient()));
    }

    #[tokio::test]
    async fn a_copy_that_was_never_fresh_is_too_stale_for_any_bound() {
        let f = fixture().await;
        let err = f
            .copies
            .get_within("people", "p1", StdDuration::from_secs(3600))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::TooStale {
                    staleness_ms: None,
                    value: None,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("never fresh"), "{err}");
    }

    #[tokio::test]
    async fn ttl_subscriptions_read_through_their_cache() {
        let f = fixture().await;
        f.owner.put("prices", "p", json!({"cents": 250}), Some(4));
        let first = f.copies.get("prices", "p").await.unwrap().unwrap();
        assert_eq!(
            (first.source, first.fields["cents"].clone(), first.version),
            (ReadSource::Owner, json!(250), 4)
        );
        f.clock.advance(10_000);
        let hit = f.copies.get("prices", "p").await.unwrap().unwrap();
        assert_eq!(
            (hit.source, hit.staleness_ms, hit.within_budget),
            (ReadSource::Cache, Some(10_000), true)
        );
        // A tighter bound than the entry's age goes back to the owner.
        let within = f
            .copies
            .get_within("prices", "p", StdDuration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (within.source, within.staleness_ms),
            (ReadSource::Owner, Some(0))
        );
        assert_eq!(f.owner.calls(), 2);
        // The owner down and the entry over the caller's bound: TooStale with it.
        f.owner.set_failing(true);
        f.clock.advance(20_000);
        let err = f
            .copies
            .get_within("prices", "p", StdDuration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ReadError::TooStale {
                    staleness_ms: Some(20_000),
                    value: Some(_),
                    ..
                }
            ),
            "{err:?}"
        );
        let status = f.copies.status("prices", None, None).await.unwrap();
        let cache = status.cache.expect("cache stats");
        assert_eq!(
            (
                status.strategy.as_str(),
                cache.entries,
                cache.owner_calls_total
            ),
            ("ttl", 1, 3)
        );
        assert!(matches!(
            f.copies.get("prices", "").await,
            Err(ReadError::BadKey { .. })
        ));
        // Without an owner source a ttl subscription cannot be read.
        let bare = Copies::new(
            &Manifest::parse("m.toml", MANIFEST).unwrap(),
            "reader-svc",
            f.store.clone(),
            f.clock.clone(),
        );
        assert!(matches!(
            bare.get("prices", "p").await,
            Err(ReadError::NoOwnerSource(_))
        ));
    }
}
