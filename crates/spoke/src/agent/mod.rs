//! The agent: keeps one consumer's copies in sync and reports how fresh they are.
//!
//! One follower task per subscription that follows the feed:
//!
//! ```text
//!  cursor.position? ──none──▶ bootstrap: snapshot pages ─▶ apply (no position)
//!        │                       └─ then position := head of the first page
//!        ▼
//!  loop: t := now; read(after = position, wait) ─▶ project ─▶ apply(changes, position, fresh_as_of = t if caught up)
//!        └─ one transaction per batch: a kill -9 anywhere resumes after the last committed batch
//! ```
//!
//! Errors are classified: a transient feed or store error is retried with
//! exponential backoff; a definite one (feed reset behind the copy, layout
//! conflict) stops that copy and is shown in status and metrics, while the
//! other copies go on.
//!
//! `ttl` subscriptions have no follower and no copy table: the agent keeps
//! one read-through [`crate::ttl::TtlCache`] per such subscription, in
//! memory, filled from the subscription's `owner_url` as reads arrive.
//!
//! Two more kinds of owned background task, all stopped by the shutdown
//! signal and aborted with the followers:
//!
//! ```text
//!  scheduled subscription ─▶ refresher: refresh now, then every `interval`   (crate::scheduled)
//!  events/cdc with reconcile_every ─▶ reconciler: every `reconcile_every`,
//!                                     once bootstrapped, reconcile against the feed (crate::reconcile)
//! ```
//!
//! A failed refresh or reconcile is logged and shown as the copy's last
//! error, and tried again at the next interval; it never stops the follower.

pub mod http;
pub mod metrics;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spoke_core::manifest::{OwnerSnapshot, Strategy, Subscription};
use spoke_core::{Change, Manifest, Projection};
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::copy::{Advance, CopySpec, CopyStore, Held, StoreError};
use crate::feed::{Feed, FeedError, Position};
use crate::owner::{EndpointError, HttpOwnerSource, OwnerSource, DEFAULT_OWNER_TIMEOUT};
use crate::quarantine;
use crate::read::Copies;
use crate::reconcile::{ReconcileOptions, Reconciler};
use crate::scheduled::http::{HttpSnapshot, DEFAULT_SNAPSHOT_TIMEOUT};
use crate::scheduled::{Refresher, SnapshotSource};
use crate::shutdown::Shutdown;

/// Tunables with their defaults.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Most entries per feed read (and per apply transaction).
    pub batch: usize,
    /// How long a read waits at the head before answering empty.
    pub wait: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often tombstones past the horizon are collected.
    pub gc_every: Duration,
}

pub const DEFAULT_BATCH: usize = 1_000;
pub const DEFAULT_WAIT: Duration = Duration::from_secs(1);
/// Bootstrap logs its progress every this many records.
const BOOTSTRAP_PROGRESS_EVERY: usize = 50_000;
/// How often copies are checked against their staleness budgets.
pub const BUDGET_CHECK_EVERY: Duration = Duration::from_millis(500);

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            batch: DEFAULT_BATCH,
            wait: DEFAULT_WAIT,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            gc_every: Duration::from_secs(3600),
        }
    }
}

/// Live counters of one copy, read by status and metrics.
#[derive(Debug, Default)]
pub struct CopyProgress {
    pub head: AtomicU64,
    pub head_known: AtomicU64,
    pub applied: AtomicU64,
    pub received: AtomicU64,
    pub fresh_as_of_ms: AtomicU64,
    pub budget_breaches: AtomicU64,
    pub breaching: std::sync::atomic::AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// Changes held in quarantine, as last counted in the store.
    pub held: AtomicU64,
    /// Highest owner schema version seen on the feed.
    pub schema_seen: AtomicU64,
    /// Fields a newer owner schema offers that the projection leaves out.
    pub new_fields: Mutex<Vec<String>>,
}

impl CopyProgress {
    pub fn head(&self) -> Option<u64> {
        (self.head_known.load(Ordering::Relaxed) == 1).then(|| self.head.load(Ordering::Relaxed))
    }
    /// Counts each move from within budget to over budget.
    pub fn check_budget(&self, budget: spoke_core::Duration, now_ms: u64) -> bool {
        let f = spoke_core::Freshness {
            fresh_as_of_ms: self.fresh_as_of_ms.load(Ordering::Relaxed),
        };
        let within = f.within(budget, now_ms);
        // A copy still starting up (never fresh) is reported as not within
        // budget, but only a copy that was fresh and fell behind is a breach.
        if f.fresh_as_of_ms == 0 {
            return within;
        }
        if !within && !self.breaching.swap(true, Ordering::Relaxed) {
            self.budget_breaches.fetch_add(1, Ordering::Relaxed);
        } else if within {
            self.breaching.store(false, Ordering::Relaxed);
        }
        within
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().expect("progress lock") = e;
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("progress lock").clone()
    }
    pub fn new_fields(&self) -> Vec<String> {
        self.new_fields.lock().expect("progress lock").clone()
    }
}

/// A hook called after each committed apply, e.g. to measure latency.
pub type ApplyObserver = Arc<dyn Fn(&str, &[Change]) + Send + Sync>;

/// One consumer's agent.
pub struct Agent {
    consumer: String,
    manifest: Arc<Manifest>,
    feed: Arc<dyn Feed>,
    store: Arc<dyn CopyStore>,
    clock: Clock,
    options: AgentOptions,
    progress: Arc<BTreeMap<String, Arc<CopyProgress>>>,
    observer: Option<ApplyObserver>,
    /// Reads owners for `ttl` caches and bounded-staleness fallbacks.
    owner: Arc<dyn OwnerSource>,
    /// Built once, so the `ttl` caches live as long as the agent.
    copies: Copies,
    /// The snapshot source of each `scheduled` subscription.
    snapshots: BTreeMap<String, Arc<dyn SnapshotSource>>,
}

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("consumer '{0}' is not a service in the manifest")]
    UnknownConsumer(String),
    /// The subscription projects fields the feed never carries.
    #[error("{consumer} projects {fields} of {dataset}, private field(s) this feed never carries (a JetStream feed keeps private fields off the bus, where every reader of the dataset could read them); read {dataset} through the hub's embedded feed, or stop projecting them")]
    Withheld {
        consumer: String,
        dataset: String,
        fields: String,
    },
    #[error(transparent)]
    OwnerEndpoint(#[from] EndpointError),
    /// A `snapshot_url` that cannot be used.
    #[error("{0}")]
    SnapshotEndpoint(String),
}

impl Agent {
    pub fn new(
        manifest: Arc<Manifest>,
        consumer: &str,
        feed: Arc<dyn Feed>,
        store: Arc<dyn CopyStore>,
    ) -> Result<Self, AgentError> {
        if !manifest.services.contains_key(consumer) {
            return Err(AgentError::UnknownConsumer(consumer.to_owned()));
        }
        for s in manifest
            .subscriptions_of(consumer)
            .filter(|s| s.strategy.follows_feed())
        {
            let withheld = feed.withheld_fields(&s.dataset);
            let hit: Vec<&str> = s
                .fields
                .iter()
                .filter(|f| withheld.contains(f))
                .map(String::as_str)
                .collect();
            if !hit.is_empty() {
                return Err(AgentError::Withheld {
                    consumer: consumer.to_owned(),
                    dataset: s.dataset.clone(),
                    fields: hit.join(", "),
                });
            }
        }
        let progress = manifest
            .subscriptions_of(consumer)
            .filter(|s| s.strategy.stores_copy())
            .map(|s| (s.dataset.clone(), Arc::new(CopyProgress::default())))
            .collect();
        // `snapshot_url` sources are built here; `snapshot_sql` ones need a
        // connection from the deployment config (`with_snapshot_source`).
        let mut snapshots: BTreeMap<String, Arc<dyn SnapshotSource>> = BTreeMap::new();
        for s in manifest.subscriptions_of(consumer) {
            let (Some(OwnerSnapshot::Url(url)), Some(ds)) =
                (&s.snapshot, manifest.datasets.get(&s.dataset))
            else {
                continue;
            };
            let Some(projection) = Projection::new(&ds.schema, &s.fields) else {
                continue;
            };
            let source = HttpSnapshot::new(
                &s.dataset,
                url.clone(),
                projection,
                DEFAULT_SNAPSHOT_TIMEOUT,
            )
            .map_err(AgentError::SnapshotEndpoint)?;
            snapshots.insert(s.dataset.clone(), Arc::new(source));
        }
        let owner: Arc<dyn OwnerSource> = Arc::new(HttpOwnerSource::from_manifest(
            &manifest,
            consumer,
            DEFAULT_OWNER_TIMEOUT,
        )?);
        let copies = Copies::new(&manifest, consumer, store.clone(), Clock::System)
            .with_owner(owner.clone());
        Ok(Agent {
            consumer: consumer.to_owned(),
            manifest,
            feed,
            store,
            clock: Clock::System,
            options: AgentOptions::default(),
            progress: Arc::new(progress),
            observer: None,
            owner,
            copies,
            snapshots,
        })
    }

    /// Reads `dataset`'s owner snapshot from `source` (a `snapshot_sql`
    /// source with its connection, or a custom one in tests).
    pub fn with_snapshot_source(mut self, dataset: &str, source: Arc<dyn SnapshotSource>) -> Self {
        self.snapshots.insert(dataset.to_owned(), source);
        self
    }

    /// The `scheduled` subscriptions that have no snapshot source yet
    /// (`snapshot_sql` without a connection): the agent cannot refresh them.
    pub fn missing_snapshot_sources(&self) -> Vec<String> {
        self.manifest
            .subscriptions_of(&self.consumer)
            .filter(|s| {
                s.strategy == Strategy::Scheduled && !self.snapshots.contains_key(&s.dataset)
            })
            .map(|s| s.dataset.clone())
            .collect()
    }

    /// Rebuilds the read side after the clock or the owner source changed
    /// (only while the agent is being built: it empties the ttl caches).
    fn rebuild_copies(&mut self) {
        self.copies = Copies::new(
            &self.manifest,
            &self.consumer,
            self.store.clone(),
            self.clock.clone(),
        )
        .with_owner(self.owner.clone());
    }

    /// Reads owners through `owner` instead of HTTP (tests, or a custom client).
    pub fn with_owner_source(mut self, owner: Arc<dyn OwnerSource>) -> Self {
        self.owner = owner;
        self.rebuild_copies();
        self
    }

    pub fn with_options(mut self, options: AgentOptions) -> Self {
        self.options = options;
        self
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self.rebuild_copies();
        self
    }

    pub fn with_observer(mut self, observer: ApplyObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The read API over this agent's store and `ttl` caches.
    pub fn copies(&self) -> Copies {
        self.copies.clone()
    }

    pub fn progress(&self) -> Arc<BTreeMap<String, Arc<CopyProgress>>> {
        self.progress.clone()
    }

    fn spec(&self, sub: &Subscription) -> Option<CopySpec> {
        CopySpec::of(&self.manifest, sub)
    }

    /// Creates every copy, then follows the feed until `shutdown` fires.
    /// Creates every copy this agent keeps (idempotent). Call it before
    /// serving reads so the API never answers for a copy that does not exist yet.
    pub async fn ensure_copies(&self) -> Result<(), StoreError> {
        for sub in self
            .manifest
            .subscriptions_of(&self.consumer)
            .filter(|s| s.strategy.stores_copy())
        {
            if let Some(spec) = self.spec(sub) {
                self.store.ensure_copy(&spec).await?;
            }
        }
        Ok(())
    }

    pub async fn run(self: Arc<Self>, shutdown: Shutdown) -> Result<(), StoreError> {
        let mut tasks = JoinSet::new();
        for sub in self
            .manifest
            .subscriptions_of(&self.consumer)
            .filter(|s| s.strategy.follows_feed())
        {
            let Some(spec) = self.spec(sub) else { continue };
            self.store.ensure_copy(&spec).await?;
            let horizon_ms = self
                .manifest
                .datasets
                .get(&sub.dataset)
                .map_or(0, |d| d.tombstone_horizon.as_millis());
            let progress = self.progress[&sub.dataset].clone();
            if let Some(every) = sub.reconcile_every {
                let reconciler = Reconcile {
                    agent: self.clone(),
                    spec: spec.clone(),
                    every: every.as_std(),
                    horizon_ms,
                    progress: progress.clone(),
                };
                let shutdown = shutdown.clone();
                tasks.spawn(async move { reconciler.run(shutdown).await });
            }
            let follower = Follower {
                agent: self.clone(),
                spec,
                horizon_ms,
                progress,
                known_version: self
                    .manifest
                    .datasets
                    .get(&sub.dataset)
                    .map_or(0, |d| d.schema.version),
            };
            let stop = shutdown.clone();
            tasks.spawn(async move { follower.run(stop).await });
        }
        for sub in self
            .manifest
            .subscriptions_of(&self.consumer)
            .filter(|s| s.strategy == Strategy::Scheduled)
        {
            let (Some(spec), Some(interval), Some(ds)) = (
                self.spec(sub),
                sub.interval,
                self.manifest.datasets.get(&sub.dataset),
            ) else {
                continue;
            };
            self.store.ensure_copy(&spec).await?;
            let progress = self.progress[&sub.dataset].clone();
            let Some(source) = self.snapshots.get(&sub.dataset).cloned() else {
                let msg = format!(
                    "no snapshot source: {} reads its owner with snapshot_sql, which needs [agent.owner_postgres.{}] in the deployment config",
                    sub.dataset, sub.dataset
                );
                tracing::error!(dataset = %sub.dataset, "{msg}");
                progress.set_error(Some(msg));
                continue;
            };
            let refresher = Refresh {
                agent: self.clone(),
                spec,
                schema_version: ds.schema.version,
                interval: interval.as_std(),
                source,
                progress,
            };
            let shutdown = shutdown.clone();
            tasks.spawn(async move { refresher.run(shutdown).await });
        }
        let mut shutdown = shutdown;
        let budgets: Vec<(Arc<CopyProgress>, spoke_core::Duration)> = self
            .manifest
            .subscriptions_of(&self.consumer)
            .filter_map(|s| Some((self.progress.get(&s.dataset)?.clone(), s.staleness_budget)))
            .collect();
        let clock = self.clock.clone();
        let mut tick = tokio::time::interval(BUDGET_CHECK_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {
                    let now = clock.now_ms();
                    for (p, budget) in &budgets {
                        p.check_budget(*budget, now);
                    }
                }
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

/// Refreshes one `scheduled` copy: now, then every `interval` after the
/// start of the previous refresh.
struct Refresh {
    agent: Arc<Agent>,
    spec: CopySpec,
    schema_version: u32,
    interval: Duration,
    source: Arc<dyn SnapshotSource>,
    progress: Arc<CopyProgress>,
}

impl Refresh {
    async fn run(self, mut shutdown: Shutdown) {
        let ds = self.spec.dataset.clone();
        // Status shows the freshness the store holds from earlier runs.
        if let Ok(c) = self.agent.store.cursor(&ds).await {
            self.progress
                .fresh_as_of_ms
                .store(c.fresh_as_of_ms, Ordering::Relaxed);
        }
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = shutdown.wait() => return,
            }
            next = tokio::time::Instant::now() + self.interval;
            let refresher = Refresher::new(
                self.source.as_ref(),
                self.agent.store.as_ref(),
                &self.spec,
                self.schema_version,
            )
            .with_clock(self.agent.clock.clone());
            let outcome = tokio::select! {
                r = refresher.run() => r,
                _ = shutdown.wait() => return,
            };
            match outcome {
                Ok(r) => {
                    self.progress
                        .fresh_as_of_ms
                        .store(r.started_ms, Ordering::Relaxed);
                    self.progress
                        .applied
                        .fetch_add(r.inserted + r.updated, Ordering::Relaxed);
                    self.progress.set_error(None);
                    if r.changed() > 0 {
                        tracing::info!(
                            dataset = %ds,
                            "refreshed {ds} from {}: {} inserted, {} updated, {} deleted ({} keys listed, {} buckets differed, {} records fetched) in {} ms",
                            self.source.describe(), r.inserted, r.updated, r.deleted, r.listed, r.buckets_differing, r.fetched, r.duration_ms
                        );
                    } else {
                        tracing::debug!(dataset = %ds, "refreshed {ds}: unchanged ({} keys) in {} ms", r.listed, r.duration_ms);
                    }
                    if !r.ahead.is_empty() {
                        tracing::warn!(
                            dataset = %ds,
                            "{} keys of {ds} are newer in the copy than the owner lists them, left alone (the apply rule never rolls back; an owner whose versions went backwards needs the copy rebuilt): {}",
                            r.ahead.len(),
                            r.ahead.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(dataset = %ds, "refresh failed, trying again in {:?}: {e}", self.interval);
                    self.progress
                        .set_error(Some(format!("refresh failed: {e}")));
                }
            }
        }
    }
}

/// Most repaired keys named in one log line.
const REPAIRS_LOGGED: usize = 20;

/// Reconciles one `events`/`cdc` copy against its feed every `every`.
struct Reconcile {
    agent: Arc<Agent>,
    spec: CopySpec,
    every: Duration,
    horizon_ms: u64,
    progress: Arc<CopyProgress>,
}

impl Reconcile {
    async fn run(self, mut shutdown: Shutdown) {
        let ds = self.spec.dataset.clone();
        let start = tokio::time::Instant::now() + self.every;
        let mut tick = tokio::time::interval_at(start, self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            // Until the bootstrap finished, every record would count as missing.
            match self.agent.store.cursor(&ds).await {
                Ok(c) if c.position.is_none() => {
                    tracing::debug!(dataset = %ds, "scheduled reconcile skipped: the copy is still bootstrapping");
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(dataset = %ds, "scheduled reconcile failed, trying again in {:?}: {e}", self.every);
                    continue;
                }
            }
            let reconciler = Reconciler::new(
                self.agent.feed.as_ref(),
                self.agent.store.as_ref(),
                &self.spec,
            )
            .with_clock(self.agent.clock.clone())
            .with_options(ReconcileOptions {
                tombstone_horizon_ms: self.horizon_ms,
                max_listed: REPAIRS_LOGGED,
                ..ReconcileOptions::default()
            });
            let outcome = tokio::select! {
                r = reconciler.run(&|_| {}) => r,
                _ = shutdown.wait() => return,
            };
            match &outcome {
                Ok(r) if r.repaired.total() > 0 => {
                    let keys: Vec<String> = r
                        .repairs
                        .iter()
                        .map(|x| format!("{} ({})", x.key, x.kind.as_str()))
                        .collect();
                    tracing::warn!(
                        dataset = %ds,
                        "reconcile repaired {} keys of {ds} ({} missing, {} stale, {} extra) in {:.0} ms: {}{}",
                        r.repaired.total(),
                        r.repaired.missing,
                        r.repaired.stale,
                        r.repaired.extra,
                        r.duration_ms,
                        keys.join(", "),
                        if r.repairs_complete { "" } else { ", …" }
                    );
                }
                Ok(r) => {
                    tracing::debug!(dataset = %ds, "reconcile: {ds} in sync ({} buckets compared) in {:.0} ms", r.buckets_differing, r.duration_ms);
                }
                Err(ref e) => {
                    tracing::warn!(dataset = %ds, "scheduled reconcile failed, trying again in {:?}: {e}", self.every);
                    self.progress
                        .set_error(Some(format!("reconcile failed: {e}")));
                }
            }
            if let Ok(r) = &outcome {
                if !r.ahead.is_empty() {
                    tracing::warn!(dataset = %ds, "{} keys of {ds} are newer in the copy than in the feed, left alone", r.ahead.len());
                }
            }
        }
    }
}

/// Follows one subscription.
struct Follower {
    agent: Arc<Agent>,
    spec: CopySpec,
    horizon_ms: u64,
    progress: Arc<CopyProgress>,
    /// The dataset's schema version in this consumer's manifest.
    known_version: u32,
}

/// Why following stopped.
#[derive(Debug)]
enum Failure {
    /// Worth retrying with backoff.
    Transient(String),
    /// Stops this copy until a person acts.
    Definite(String),
}

impl Follower {
    fn dataset(&self) -> &str {
        &self.spec.dataset
    }

    async fn run(self, mut shutdown: Shutdown) {
        let mut backoff = self.agent.options.backoff_min;
        loop {
            let failure = tokio::select! {
                f = self.follow() => f,
                _ = shutdown.wait() => return,
            };
            match failure {
                Failure::Definite(msg) => {
                    tracing::error!(dataset = self.dataset(), "copy stopped: {msg}");
                    self.progress.set_error(Some(format!("stopped: {msg}")));
                    shutdown.wait().await;
                    return;
                }
                Failure::Transient(msg) => {
                    tracing::warn!(dataset = self.dataset(), "retrying in {backoff:?}: {msg}");
                    self.progress.set_error(Some(msg));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => return,
                    }
                    backoff = (backoff * 2).min(self.agent.options.backoff_max);
                }
            }
        }
    }

    fn feed_failure(&self, e: FeedError) -> Failure {
        if e.is_transient() {
            Failure::Transient(e.to_string())
        } else {
            Failure::Definite(format!("feed refused {}: {e}", self.dataset()))
        }
    }

    fn store_failure(&self, e: StoreError) -> Failure {
        match e {
            StoreError::Unavailable(m) => Failure::Transient(m),
            other => Failure::Definite(other.to_string()),
        }
    }

    /// Splits entries into projected changes that fit the copy and held
    /// ones that do not (see [`crate::quarantine`]), learning newer owner
    /// schemas on the way.
    async fn sort(&self, entries: Vec<(Option<Position>, Change)>) -> (Vec<Change>, Vec<Held>) {
        let now = self.agent.clock.now_ms();
        let mut fit = Vec::with_capacity(entries.len());
        let mut held = Vec::new();
        for (position, c) in entries {
            if u64::from(c.schema_version) > self.progress.schema_seen.load(Ordering::Relaxed) {
                self.learn_schema(c.schema_version).await;
            }
            match quarantine::misfit(&self.spec, self.known_version, &c) {
                None => fit.push(self.spec.project(c)),
                Some(reason) => held.push(quarantine::held(&self.spec, c, position, reason, now)),
            }
        }
        (fit, held)
    }

    /// A change carries a schema version above any seen: asks the feed for
    /// the schema (as this consumer may see it) and reports the fields the
    /// projection leaves out as available. Never projects them.
    async fn learn_schema(&self, version: u32) {
        let seen = self
            .progress
            .schema_seen
            .swap(u64::from(version), Ordering::Relaxed);
        if seen == 0 && version <= self.known_version {
            return;
        }
        let ds = self.dataset();
        match self.agent.feed.schema(ds).await {
            Ok(schema) => {
                let new: Vec<String> = schema
                    .fields
                    .keys()
                    .filter(|f| !self.spec.projection.names().any(|p| p == f.as_str()))
                    .cloned()
                    .collect();
                if !new.is_empty() {
                    tracing::info!(dataset = ds, version = schema.version, fields = ?new, "the owner's schema offers fields this copy does not project; add them to the subscription's fields to copy them");
                }
                *self.progress.new_fields.lock().expect("progress lock") = new;
            }
            Err(e) => {
                tracing::debug!(dataset = ds, "could not read schema version {version}: {e}")
            }
        }
    }

    /// Holds changes the copy cannot take, then counts what is held.
    async fn hold(&self, held: &[Held]) -> Result<(), Failure> {
        let ds = self.dataset();
        if !held.is_empty() {
            self.agent
                .store
                .hold(ds, held)
                .await
                .map_err(|e| self.store_failure(e))?;
            tracing::warn!(
                dataset = ds,
                "quarantined {} change(s) the copy cannot hold; the copy stops being fresh until `spoke quarantine replay` applies them: {}",
                held.len(),
                held[0].reason
            );
        }
        if !held.is_empty() || self.progress.held.load(Ordering::Relaxed) > 0 {
            let n = self
                .agent
                .store
                .held_count(ds)
                .await
                .map_err(|e| self.store_failure(e))?;
            if n == 0 && self.progress.held.load(Ordering::Relaxed) > 0 {
                tracing::info!(
                    dataset = ds,
                    "quarantine is empty: the copy can be fresh again"
                );
            }
            self.progress.held.store(n, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn apply(&self, changes: &[Change], advance: Advance) -> Result<(), Failure> {
        let out = self
            .agent
            .store
            .apply(self.dataset(), changes, advance)
            .await
            .map_err(|e| self.store_failure(e))?;
        self.progress
            .applied
            .fetch_add(out.applied, Ordering::Relaxed);
        if advance.from_feed {
            self.progress
                .received
                .fetch_add(changes.len() as u64, Ordering::Relaxed);
        }
        if let (Some(obs), false) = (&self.agent.observer, changes.is_empty()) {
            obs(self.dataset(), changes);
        }
        Ok(())
    }

    /// Bootstraps if needed, then tails the feed; returns only on failure.
    async fn follow(&self) -> Failure {
        match self.follow_inner().await {
            Ok(never) => match never {},
            Err(f) => f,
        }
    }

    async fn follow_inner(&self) -> Result<std::convert::Infallible, Failure> {
        let ds = self.dataset().to_owned();
        let opts = &self.agent.options;
        let feed = &self.agent.feed;
        let cursor = self
            .agent
            .store
            .cursor(&ds)
            .await
            .map_err(|e| self.store_failure(e))?;
        self.progress
            .fresh_as_of_ms
            .store(cursor.fresh_as_of_ms, Ordering::Relaxed);
        let held = self
            .agent
            .store
            .held_count(&ds)
            .await
            .map_err(|e| self.store_failure(e))?;
        self.progress.held.store(held, Ordering::Relaxed);
        let mut position = match cursor.position {
            Some(p) => p,
            None => self.bootstrap().await?,
        };
        let mut last_gc = std::time::Instant::now();
        loop {
            let sent_at = self.agent.clock.now_ms();
            let batch = feed
                .read(&ds, position, opts.batch, opts.wait)
                .await
                .map_err(|e| self.feed_failure(e))?;
            if batch.head < position {
                return Err(Failure::Definite(format!(
                    "the feed's head ({}) is behind this copy's position ({position}): the hub's log was reset or replaced; delete the copy so the agent bootstraps it again",
                    batch.head
                )));
            }
            if let Some(first) = batch.entries.first() {
                if first.position != position + 1 {
                    return Err(Failure::Definite(format!(
                        "the feed skipped from position {position} to {}: changes are missing; delete the copy so the agent bootstraps it again",
                        first.position
                    )));
                }
            }
            self.progress.head.store(batch.head, Ordering::Relaxed);
            self.progress.head_known.store(1, Ordering::Relaxed);
            let new_position = batch.entries.last().map_or(position, |e| e.position);
            let (changes, held) = self
                .sort(
                    batch
                        .entries
                        .into_iter()
                        .map(|e| (Some(e.position), e.change))
                        .collect(),
                )
                .await;
            // Held before the position moves past them (see crate::quarantine).
            self.hold(&held).await?;
            let quarantined = self.progress.held.load(Ordering::Relaxed) > 0;
            let fresh = (new_position >= batch.head && !quarantined).then_some(sent_at);
            if !changes.is_empty() || fresh.is_some() {
                self.apply(
                    &changes,
                    Advance {
                        position: Some(new_position),
                        fresh_as_of_ms: fresh,
                        from_feed: true,
                    },
                )
                .await?;
            }
            if let Some(t) = fresh {
                self.progress.fresh_as_of_ms.store(t, Ordering::Relaxed);
            }
            position = new_position;
            self.progress.set_error(None);
            if last_gc.elapsed() >= opts.gc_every {
                last_gc = std::time::Instant::now();
                let now = self.agent.clock.now_ms();
                match self
                    .agent
                    .store
                    .gc_tombstones(&ds, now, self.horizon_ms)
                    .await
                {
                    Ok(n) if n > 0 => tracing::info!(dataset = %ds, "collected {n} tombstones"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(dataset = %ds, "tombstone collection failed: {e}"),
                }
            }
        }
    }

    /// Copies the compacted state page by page; returns the position to tail from.
    async fn bootstrap(&self) -> Result<Position, Failure> {
        let ds = self.dataset().to_owned();
        let mut after: Option<String> = None;
        let mut start: Option<Position> = None;
        let mut copied = 0usize;
        loop {
            let page = self
                .agent
                .feed
                .snapshot(&ds, after.as_deref(), self.agent.options.batch)
                .await
                .map_err(|e| self.feed_failure(e))?;
            start.get_or_insert(page.head);
            copied += page.records.len();
            if copied / BOOTSTRAP_PROGRESS_EVERY
                != (copied - page.records.len()) / BOOTSTRAP_PROGRESS_EVERY
            {
                tracing::info!(dataset = %ds, records = copied, "bootstrapping from snapshot");
            }
            let (changes, held) = self
                .sort(page.records.into_iter().map(|c| (None, c)).collect())
                .await;
            self.hold(&held).await?;
            self.apply(
                &changes,
                Advance {
                    position: None,
                    fresh_as_of_ms: None,
                    from_feed: false,
                },
            )
            .await?;
            match page.next_after_key {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        let start = start.unwrap_or(0);
        self.apply(
            &[],
            Advance {
                position: Some(start),
                fresh_as_of_ms: None,
                from_feed: false,
            },
        )
        .await?;
        tracing::info!(dataset = %ds, records = copied, position = start, "bootstrapped from snapshot");
        Ok(start)
    }
}
