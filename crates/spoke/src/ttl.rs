//! The `ttl` strategy: a read-through cache in front of the owner's read
//! endpoint, one [`TtlCache`] per `ttl` subscription.
//!
//! ```text
//!  get(key) ──▶ entry younger than ttl (negative_ttl for a 404)? ──yes──▶ hit
//!                 │ no
//!                 ▼
//!          fetch in flight for key? ──yes──▶ wait for it   (coalescing: one owner call per key)
//!                 │ no
//!                 ▼
//!          spawn fetch: t := now; owner.fetch(key) ──▶ store entry (fetched_at = t), evict LRU
//!                 │                                     over max_entries, wake every waiter
//!                 ▼
//!          owner failed? ──▶ expired entry at most ttl + stale_if_error old? ──▶ serve it, flagged stale
//!                                      └─ else the owner's error
//! ```
//!
//! Time comes from a [`Clock`], so tests move it by hand. An entry's age is
//! measured from the moment its request left (on this process's clock), so
//! a slow owner never makes an entry look fresher than it is. The fetch
//! runs in its own task: a caller that gives up (a dropped HTTP request)
//! neither cancels it for the other waiters nor makes a second owner call.
//! The task ends when the owner answers or the source's timeout fires.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use spoke_core::manifest::CacheSettings;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::owner::{OwnerError, OwnerRecord, OwnerSource};

/// Where a cached read came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheSource {
    /// An entry within its ttl.
    Hit,
    /// Just read from the owner (this caller's miss, or one it waited on).
    Owner,
    /// An expired entry, served because the owner failed.
    StaleOnError,
}

/// One answer of the cache: the record (`None`: the owner has no such key)
/// and how old that knowledge is.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRead {
    pub record: Option<OwnerRecord>,
    /// When the owner read that produced it was sent (cache clock, ms).
    pub fetched_at_ms: u64,
    pub age_ms: u64,
    pub source: CacheSource,
}

/// The owner failed and no entry could stand in for its answer. `stale` is
/// the expired entry, if there is one, for callers that degrade gracefully.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheMiss {
    pub error: OwnerError,
    pub stale: Option<CachedRead>,
}

/// Counters of one cache, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CacheStats {
    pub entries: u64,
    pub max_entries: u64,
    pub hits_total: u64,
    pub misses_total: u64,
    pub owner_calls_total: u64,
    pub owner_errors_total: u64,
    pub stale_served_total: u64,
    pub evictions_total: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    owner_calls: AtomicU64,
    owner_errors: AtomicU64,
    stale_served: AtomicU64,
    evictions: AtomicU64,
}

struct Entry {
    record: Option<OwnerRecord>,
    fetched_at_ms: u64,
    /// Its place in `State::recency`.
    used: u64,
}

/// What a fetch task hands its waiters.
type Fetched = Result<(Option<OwnerRecord>, u64), OwnerError>;

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Use tick → key, least recently used first.
    recency: BTreeMap<u64, String>,
    tick: u64,
    /// Keys with an owner call under way, and where its answer will appear.
    inflight: HashMap<String, watch::Receiver<Option<Fetched>>>,
}

impl State {
    fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(key) {
            self.recency.remove(&e.used);
            e.used = tick;
            self.recency.insert(tick, key.to_owned());
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            self.recency.remove(&e.used);
        }
    }
}

struct Inner {
    dataset: String,
    settings: CacheSettings,
    source: Arc<dyn OwnerSource>,
    clock: Clock,
    state: Mutex<State>,
    counters: Counters,
}

/// A bounded read-through cache of one `ttl` subscription. Cheap to clone.
#[derive(Clone)]
pub struct TtlCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TtlCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlCache")
            .field("dataset", &self.inner.dataset)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// How long an entry is served without asking the owner.
    fn window_ms(&self, e: &Entry) -> u64 {
        match e.record {
            Some(_) => self.settings.ttl.as_millis(),
            None => self.settings.negative_ttl.as_millis(),
        }
    }

    fn read_of(&self, e: &Entry, now: u64, source: CacheSource) -> CachedRead {
        CachedRead {
            record: e.record.clone(),
            fetched_at_ms: e.fetched_at_ms,
            age_ms: now.saturating_sub(e.fetched_at_ms),
            source,
        }
    }

    /// Stores an owner's answer and evicts the least recently used entries
    /// over the bound.
    fn store(&self, st: &mut State, key: &str, record: Option<OwnerRecord>, fetched_at_ms: u64) {
        st.remove(key);
        // A 404 with negative caching off leaves no entry: an older positive
        // entry must not be served stale for a key the owner no longer has.
        if record.is_none() && self.settings.negative_ttl.as_millis() == 0 {
            return;
        }
        st.tick += 1;
        let used = st.tick;
        st.entries.insert(
            key.to_owned(),
            Entry {
                record,
                fetched_at_ms,
                used,
            },
        );
        st.recency.insert(used, key.to_owned());
        while st.entries.len() > self.settings.max_entries {
            let Some((_, oldest)) = st.recency.pop_first() else {
                break;
            };
            st.entries.remove(&oldest);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl TtlCache {
    pub fn new(
        dataset: &str,
        settings: CacheSettings,
        source: Arc<dyn OwnerSource>,
        clock: Clock,
    ) -> Self {
        TtlCache {
            inner: Arc::new(Inner {
                dataset: dataset.to_owned(),
                settings,
                source,
                clock,
                state: Mutex::new(State::default()),
                counters: Counters::default(),
            }),
        }
    }

    /// The record for `key`: from the cache within its ttl, else from the
    /// owner; when the owner fails, an expired entry at most
    /// `ttl + stale_if_error` old, flagged [`CacheSource::StaleOnError`].
    pub async fn get(&self, key: &str) -> Result<CachedRead, CacheMiss> {
        self.read(key, None).await
    }

    /// Like [`TtlCache::get`], but an entry older than `max_age_ms` is not a
    /// hit either; when the owner fails, an expired entry is served only if
    /// it is at most `max_age_ms` old (the caller's bound replaces
    /// `stale_if_error`).
    pub async fn get_within(&self, key: &str, max_age_ms: u64) -> Result<CachedRead, CacheMiss> {
        self.read(key, Some(max_age_ms)).await
    }

    async fn read(&self, key: &str, max_age_ms: Option<u64>) -> Result<CachedRead, CacheMiss> {
        let inner = &self.inner;
        let mut rx = {
            let now = inner.clock.now_ms();
            let mut st = inner.state.lock().expect("cache lock");
            if let Some(e) = st.entries.get(key) {
                let age = now.saturating_sub(e.fetched_at_ms);
                if age < inner.window_ms(e) && max_age_ms.is_none_or(|m| age <= m) {
                    let read = inner.read_of(e, now, CacheSource::Hit);
                    st.touch(key);
                    inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(read);
                }
            }
            inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            match st.inflight.get(key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    st.inflight.insert(key.to_owned(), rx.clone());
                    self.spawn_fetch(key.to_owned(), tx);
                    rx
                }
            }
        };
        let fetched = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().expect("waited for Some"),
            // The task ended without an answer: it panicked.
            Err(_) => Err(OwnerError::Unreachable {
                dataset: inner.dataset.clone(),
                key: key.to_owned(),
                url: "(owner source)".into(),
                reason: "the owner read stopped without an answer".into(),
            }),
        };
        let now = inner.clock.now_ms();
        match fetched {
            Ok((record, fetched_at_ms)) => Ok(CachedRead {
                record,
                fetched_at_ms,
                age_ms: now.saturating_sub(fetched_at_ms),
                source: CacheSource::Owner,
            }),
            Err(error) => {
                let st = inner.state.lock().expect("cache lock");
                let Some(e) = st.entries.get(key) else {
                    return Err(CacheMiss { error, stale: None });
                };
                let stale = inner.read_of(e, now, CacheSource::StaleOnError);
                let bound = match max_age_ms {
                    Some(m) => Some(m),
                    None => inner
                        .settings
                        .stale_if_error
                        .map(|s| inner.window_ms(e).saturating_add(s.as_millis())),
                };
                if bound.is_some_and(|b| stale.age_ms <= b) {
                    inner.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                    Ok(stale)
                } else {
                    Err(CacheMiss {
                        error,
                        stale: Some(stale),
                    })
                }
            }
        }
    }

    fn spawn_fetch(&self, key: String, tx: watch::Sender<Option<Fetched>>) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let sent_at = inner.clock.now_ms();
            inner.counters.owner_calls.fetch_add(1, Ordering::Relaxed);
            let result = inner.source.fetch(&inner.dataset, &key).await;
            {
                let mut st = inner.state.lock().expect("cache lock");
                match &result {
                    Ok(record) => inner.store(&mut st, &key, record.clone(), sent_at),
                    Err(e) => {
                        inner.counters.owner_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(dataset = %inner.dataset, "ttl cache: {e}");
                    }
                }
                // In the same critical section as the store: a caller that
                // finds no fetch in flight finds the new entry instead.
                st.inflight.remove(&key);
            }
            let _ = tx.send(Some(result.map(|r| (r, sent_at))));
        });
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let entries = self.inner.state.lock().expect("cache lock").entries.len() as u64;
        CacheStats {
            entries,
            max_entries: self.inner.settings.max_entries as u64,
            hits_total: c.hits.load(Ordering::Relaxed),
            misses_total: c.misses.load(Ordering::Relaxed),
            owner_calls_total: c.owner_calls.load(Ordering::Relaxed),
            owner_errors_total: c.owner_errors.load(Ordering::Relaxed),
            stale_served_total: c.stale_served.load(Ordering::Relaxed),
            evictions_total: c.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use spoke_core::Duration as Dur;

    use super::*;
    use crate::owner::memory::MemoryOwner;

    const DS: &str = "customers";

    fn settings() -> CacheSettings {
        CacheSettings {
            ttl: Dur::from_secs(60),
            negative_ttl: Dur::from_secs(10),
            stale_if_error: None,
            max_entries: 100,
        }
    }

    fn cache(settings: CacheSettings) -> (TtlCache, Arc<MemoryOwner>, Clock) {
        let owner = Arc::new(MemoryOwner::new());
        let clock = Clock::manual(1_000_000);
        let cache = TtlCache::new(DS, settings, owner.clone(), clock.clone());
        (cache, owner, clock)
    }

    fn name(r: &CachedRead) -> Option<&str> {
        r.record.as_ref().and_then(|r| r.fields["name"].as_str())
    }

    #[tokio::test]
    async fn entries_are_served_within_ttl_and_refetched_once_after() {
        let (cache, owner, clock) = cache(settings());
        owner.put(DS, "c1", json!({"name": "Ada"}), Some(1));
        let first = cache.get("c1").await.unwrap();
        assert_eq!(
            (name(&first), first.source, first.age_ms),
            (Some("Ada"), CacheSource::Owner, 0)
        );
        owner.put(DS, "c1", json!({"name": "Ada L."}), Some(2));
        clock.advance(59_999);
        let hit = cache.get("c1").await.unwrap();
        assert_eq!(
            (name(&hit), hit.source, hit.age_ms, hit.fetched_at_ms),
            (Some("Ada"), CacheSource::Hit, 59_999, 1_000_000)
        );
        assert_eq!(owner.calls(), 1, "a hit makes no owner call");
        clock.advance(1);
        let refreshed = cache.get("c1").await.unwrap();
        assert_eq!(
            (name(&refreshed), refreshed.source),
            (Some("Ada L."), CacheSource::Owner)
        );
        assert_eq!(
            refreshed.record.as_ref().unwrap().version,
            Some(2),
            "the owner's version travels with the entry"
        );
        for _ in 0..5 {
            assert_eq!(cache.get("c1").await.unwrap().source, CacheSource::Hit);
        }
        assert_eq!(owner.calls(), 2, "exactly one refetch after expiry");
        let s = cache.stats();
        assert_eq!(
            (s.hits_total, s.misses_total, s.owner_calls_total),
            (6, 2, 2)
        );
    }

    #[tokio::test]
    async fn concurrent_misses_on_one_key_make_one_owner_call() {
        let (cache, owner, _clock) = cache(settings());
        owner.put(DS, "cold", json!({"name": "Grace"}), None);
        owner.set_delay(Duration::from_millis(200));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let cache = cache.clone();
            tasks.spawn(async move { cache.get("cold").await });
        }
        let mut served = 0;
        while let Some(r) = tasks.join_next().await {
            let r = r.expect("task").expect("read");
            assert_eq!(name(&r), Some("Grace"));
            served += 1;
        }
        assert_eq!(served, 50);
        assert_eq!(
            owner.calls_for("cold"),
            1,
            "50 concurrent misses, one owner call"
        );
        // Other keys are not held up by, or folded into, that call.
        owner.set_delay(Duration::ZERO);
        owner.put(DS, "warm", json!({"name": "Alan"}), None);
        assert_eq!(name(&cache.get("warm").await.unwrap()), Some("Alan"));
        assert_eq!(owner.calls(), 2);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_cancel_the_shared_fetch() {
        let (cache, owner, _clock) = cache(settings());
        owner.put(DS, "k", json!({"name": "Edsger"}), None);
        owner.set_delay(Duration::from_millis(200));
        let impatient = tokio::time::timeout(Duration::from_millis(20), cache.get("k")).await;
        assert!(impatient.is_err(), "the first caller gave up");
        let patient = cache.get("k").await.unwrap();
        assert_eq!(name(&patient), Some("Edsger"));
        assert_eq!(owner.calls(), 1, "the second caller joined the first call");
    }

    #[tokio::test]
    async fn stale_entries_are_served_on_owner_errors_within_the_bound() {
        let (cache, owner, clock) = cache(CacheSettings {
            stale_if_error: Some(Dur::from_secs(30)),
            ..settings()
        });
        owner.put(DS, "c1", json!({"name": "Ada"}), None);
        cache.get("c1").await.unwrap();
        owner.set_failing(true);
        clock.advance(60_000 + 30_000);
        let stale = cache.get("c1").await.unwrap();
        assert_eq!(
            (name(&stale), stale.source, stale.age_ms),
            (Some("Ada"), CacheSource::StaleOnError, 90_000)
        );
        clock.advance(1);
        let miss = cache.get("c1").await.unwrap_err();
        assert!(
            miss.error.to_string().contains("HTTP 503"),
            "{}",
            miss.error
        );
        assert_eq!(
            miss.stale.as_ref().map(|s| (name(s), s.age_ms)),
            Some((Some("Ada"), 90_001)),
            "the expired entry travels with the error"
        );
        // A key never read has nothing to fall back to.
        assert_eq!(cache.get("c2").await.unwrap_err().stale, None);
        // Once the owner is back, the entry is fresh again.
        owner.set_failing(false);
        assert_eq!(cache.get("c1").await.unwrap().source, CacheSource::Owner);
        let s = cache.stats();
        assert_eq!((s.stale_served_total, s.owner_errors_total), (1, 3));
    }

    #[tokio::test]
    async fn without_stale_if_error_an_expired_entry_is_not_served() {
        let (cache, owner, clock) = cache(settings());
        owner.put(DS, "c1", json!({"name": "Ada"}), None);
        cache.get("c1").await.unwrap();
        owner.set_failing(true);
        clock.advance(60_000);
        assert!(cache.get("c1").await.is_err());
        // A caller's own bound may accept it, flagged stale.
        let within = cache.get_within("c1", 120_000).await.unwrap();
        assert_eq!(within.source, CacheSource::StaleOnError);
        assert!(cache.get_within("c1", 30_000).await.is_err());
    }

    #[tokio::test]
    async fn get_within_refetches_entries_older_than_asked() {
        let (cache, owner, clock) = cache(settings());
        owner.put(DS, "c1", json!({"name": "Ada"}), None);
        cache.get("c1").await.unwrap();
        clock.advance(20_000);
        assert_eq!(
            cache.get_within("c1", 20_000).await.unwrap().source,
            CacheSource::Hit
        );
        let fresh = cache.get_within("c1", 5_000).await.unwrap();
        assert_eq!((fresh.source, fresh.age_ms), (CacheSource::Owner, 0));
        assert_eq!(owner.calls(), 2);
    }

    #[tokio::test]
    async fn missing_keys_are_cached_for_negative_ttl() {
        let (cache, owner, clock) = cache(settings());
        let absent = cache.get("ghost").await.unwrap();
        assert_eq!((absent.record, absent.source), (None, CacheSource::Owner));
        clock.advance(9_999);
        owner.put(DS, "ghost", json!({"name": "Casper"}), None);
        let remembered = cache.get("ghost").await.unwrap();
        assert_eq!(
            (remembered.record, remembered.source),
            (None, CacheSource::Hit)
        );
        assert_eq!(owner.calls(), 1);
        clock.advance(1);
        assert_eq!(name(&cache.get("ghost").await.unwrap()), Some("Casper"));
        assert_eq!(owner.calls(), 2, "refetched once negative_ttl passed");
    }

    #[tokio::test]
    async fn a_404_with_negative_caching_off_drops_the_old_entry() {
        let (cache, owner, clock) = cache(CacheSettings {
            negative_ttl: Dur::from_secs(0),
            stale_if_error: Some(Dur::from_secs(3600)),
            ..settings()
        });
        owner.put(DS, "c1", json!({"name": "Ada"}), None);
        cache.get("c1").await.unwrap();
        clock.advance(60_000);
        owner.remove(DS, "c1");
        assert_eq!(cache.get("c1").await.unwrap().record, None);
        assert_eq!(cache.get("c1").await.unwrap().source, CacheSource::Owner);
        owner.set_failing(true);
        assert_eq!(
            cache.get("c1").await.unwrap_err().stale,
            None,
            "a deleted key is never served stale"
        );
    }

    #[tokio::test]
    async fn the_cache_keeps_at_most_max_entries_evicting_the_least_recently_used() {
        let (cache, owner, _clock) = cache(CacheSettings {
            max_entries: 3,
            ..settings()
        });
        for k in ["a", "b", "c", "d"] {
            owner.put(DS, k, json!({"name": k}), None);
        }
        for k in ["a", "b", "c"] {
            cache.get(k).await.unwrap();
        }
        // Use "a" so that "b" is now the least recently used.
        assert_eq!(cache.get("a").await.unwrap().source, CacheSource::Hit);
        cache.get("d").await.unwrap();
        let s = cache.stats();
        assert_eq!((s.entries, s.evictions_total), (3, 1));
        assert_eq!(cache.get("a").await.unwrap().source, CacheSource::Hit);
        assert_eq!(cache.get("c").await.unwrap().source, CacheSource::Hit);
        assert_eq!(cache.get("d").await.unwrap().source, CacheSource::Hit);
        assert_eq!(owner.calls(), 4);
        assert_eq!(
            cache.get("b").await.unwrap().source,
            CacheSource::Owner,
            "b was evicted"
        );
        assert_eq!(cache.stats().entries, 3);
        for i in 0..100 {
            let k = format!("k{i}");
            owner.put(DS, &k, json!({"name": "x"}), None);
            cache.get(&k).await.unwrap();
            assert!(cache.stats().entries <= 3);
        }
    }
}
