//! A feed in NATS JetStream, for deployments beyond one machine.
//!
//! # Layout in JetStream (per dataset `d`, with configurable prefixes)
//! ```text
//!  subject  spoke.d.log.<key as base64url>        one subject per key
//!  stream   SPOKE_D_LOG    subjects spoke.d.log.*  the ordered log; stream sequence = feed position
//!  stream   SPOKE_D_STATE  sources SPOKE_D_LOG, max 1 message per subject
//!                          the compacted latest state, maintained by the server
//! ```
//!
//! # Publish
//! ```text
//!  for the newest change of each key in the batch (concurrently, pipelined on one connection):
//!    the key's last (version, subject sequence): from this publisher's cache,
//!        else assumed absent for a key the cache has never seen
//!          │ version ≥ incoming ──▶ ignored
//!          ▼ older or none
//!    publish with Nats-Msg-Id = d/key/version              (a retried publish is deduplicated)
//!             and Nats-Expected-Last-Subject-Sequence = seq (wrong ⇒ the server refuses it)
//!          │ refused: another publisher wrote the key, or the cache never saw it
//!          ▼
//!    ask the server for the key's last message, and go round again
//! ```
//! The cache only holds what this publisher saw on the log, and every
//! publish carries the subject sequence it expects, so a stale or missing
//! cache entry costs one refused publish and one look-up, never a wrong
//! answer. In the steady state a batch is one round trip: the publishes go
//! out back to back and the acks come back together; the head of the
//! receipt is the highest sequence acknowledged (a look-up of the stream
//! only when the whole batch was ignored).
//!
//! Validation is all-or-nothing, as for every feed. A transport failure in
//! the middle of a batch can leave part of it appended; retrying the batch
//! appends the rest and nothing twice, because of the version check and the
//! message ids.
//!
//! # Read
//! A background ordered pull consumer per dataset streams the log from the
//! reader's position into a buffer; a read drains it and, after the request
//! arrived, asks the server for the log's last sequence, which is the head
//! (so an idle feed still answers with a head a consumer can be fresh
//! against). Consumers keep their position in their own copy; no durable
//! JetStream consumer state is used.
//!
//! # Snapshot
//! Pages through the state stream by its sequence (the cursor is opaque).
//! The head is the log sequence the state stream had sourced up to when the
//! first page was taken (from the `Nats-Stream-Source` header of its last
//! message), so replaying the log after it converges.
//!
//! # Digests
//! Built from the last message of each key subject and cached in memory
//! by the log's last sequence, then kept up by reading only what was
//! appended since: see [`digest`]. `records` reads each key's last message.
//!
//! # Durability
//! JetStream acknowledges a publish once the message is in the stream's
//! store on a quorum of replicas, *before* it is fsynced (the server syncs
//! periodically, every 2 minutes by default). A machine that loses power can
//! lose acknowledged messages unless the server runs with `sync_interval:
//! always` (supported by current servers) or the stream has replicas on other
//! machines. Use `replicas = 3` in clusters.

pub mod digest;
pub mod permissions;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{
    Config as StreamConfig, LastRawMessageErrorKind, Source, StorageType,
};
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use async_trait::async_trait;
use futures_util::StreamExt;
use spoke_core::manifest::Dataset;
use spoke_core::{Change, Manifest, Schema, Version};
use tokio::sync::{mpsc, Mutex};

use spoke_core::digest::{DigestEntry, DigestNodes, DigestQuery};

use self::digest::Compacted;
use super::{
    check_after_key, check_digest_request, Catalog, ChangeInput, Feed, FeedBatch, FeedEntry,
    FeedError, Position, PublishReceipt, Publisher, SnapshotPage, MAX_PAGE,
};
use crate::clock::Clock;
use crate::copy::newest_per_key;

/// Header carrying the change's version, so version checks need no payload parsing.
const VERSION_HEADER: &str = "Spoke-Version";
/// How long a starting feed waits for JetStream (e.g. a forming cluster).
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);
/// Longest a read waits for entries the log is known to hold.
const DELIVERY_GRACE: Duration = Duration::from_secs(5);
/// Header JetStream adds to sourced messages: `<origin stream> <origin sequence> …`.
const SOURCE_HEADER: &str = "Nats-Stream-Source";
/// Keys whose last message `records` asks for at once.
const RECORDS_IN_FLIGHT: usize = 64;
/// Keys per dataset whose last (version, subject sequence) a publisher
/// remembers; past this the memory is dropped and rebuilt from the server.
const KNOWN_KEYS_MAX: usize = 1_000_000;

/// How to reach JetStream and lay out the streams.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// e.g. `nats://127.0.0.1:4222` (several separated by commas for a cluster).
    pub url: String,
    /// Replicas per stream (1, or 3 in a cluster).
    pub replicas: usize,
    /// File storage (durable) unless set to memory.
    pub memory_storage: bool,
    /// Prefix of stream names (`SPOKE`).
    pub stream_prefix: String,
    /// Prefix of subjects (`spoke`).
    pub subject_prefix: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// How long JetStream remembers message ids for deduplication.
    pub duplicate_window: Duration,
}

impl JetStreamOptions {
    pub fn new(url: &str) -> Self {
        JetStreamOptions {
            url: url.to_owned(),
            replicas: 1,
            memory_storage: false,
            stream_prefix: "SPOKE".into(),
            subject_prefix: "spoke".into(),
            user: None,
            password: None,
            duplicate_window: Duration::from_secs(120),
        }
    }

    pub fn log_stream(&self, dataset: &str) -> String {
        format!("{}_{}_LOG", self.stream_prefix, dataset.to_uppercase())
    }
    pub fn state_stream(&self, dataset: &str) -> String {
        format!("{}_{}_STATE", self.stream_prefix, dataset.to_uppercase())
    }
    /// The wildcard subject of a dataset's log (what an owner may publish to).
    pub fn log_subjects(&self, dataset: &str) -> String {
        format!("{}.{dataset}.log.*", self.subject_prefix)
    }
    pub fn key_subject(&self, dataset: &str, key: &str) -> String {
        format!(
            "{}.{dataset}.log.{}",
            self.subject_prefix,
            base64url(key.as_bytes())
        )
    }
}

/// Unpadded base64url: keys may hold characters that are not valid in subjects.
fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn unavailable(e: impl std::fmt::Display) -> FeedError {
    FeedError::Unavailable(format!("jetstream: {e}"))
}

/// A reader's position in one dataset's log and the buffer feeding it.
struct Tail {
    next: Position,
    rx: mpsc::Receiver<Result<FeedEntry, FeedError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct JetStreamFeed {
    catalog: Catalog,
    options: JetStreamOptions,
    js: Context,
    clock: Clock,
    tails: Mutex<HashMap<String, Tail>>,
    /// Per dataset, per key: the last (version, subject sequence) this
    /// publisher saw on the log. A hint: publishes state the sequence they
    /// expect, so the server refuses any that a stale hint would misplace.
    known: std::sync::Mutex<HashMap<String, KnownKeys>>,
    /// Per dataset, the compacted state's digest at some log sequence
    /// (see [`digest`]); a request waits while another brings it up to date.
    compacted: HashMap<String, Mutex<Compacted>>,
    /// Each dataset as the bus carries it: its schema without the private
    /// fields, which the publisher keeps off the bus (see `publish`).
    on_bus: HashMap<String, Dataset>,
}

/// Per key, the last (version, subject sequence) a publisher saw on the log.
type KnownKeys = HashMap<String, (Version, u64)>;

impl JetStreamFeed {
    /// Connects and creates (or checks) the streams of every dataset.
    pub async fn connect(
        options: JetStreamOptions,
        manifest: &Manifest,
    ) -> Result<Self, FeedError> {
        let mut connect = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5));
        if let (Some(u), Some(p)) = (&options.user, &options.password) {
            connect = connect.user_and_password(u.clone(), p.clone());
        }
        let servers: Vec<async_nats::ServerAddr> = options
            .url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| unavailable(format!("invalid NATS URL '{}': {e}", options.url)))?;
        let client = tokio::time::timeout(Duration::from_secs(10), connect.connect(servers))
            .await
            .map_err(|_| unavailable(format!("could not connect to {} within 10s", options.url)))?
            .map_err(|e| unavailable(format!("{}: {e}", options.url)))?;
        let js = async_nats::jetstream::new(client);
        let catalog = Catalog::new(manifest);
        let compacted = catalog
            .names()
            .map(|n| (n.to_owned(), Mutex::new(Compacted::default())))
            .collect();
        let on_bus = manifest
            .datasets
            .iter()
            .map(|(name, ds)| {
                let mut ds = ds.clone();
                let private = ds.private.clone();
                ds.schema.fields.retain(|f, _| !private.contains(f));
                (name.clone(), ds)
            })
            .collect();
        let feed = JetStreamFeed {
            catalog,
            options,
            js,
            clock: Clock::System,
            tails: Mutex::new(HashMap::new()),
            known: std::sync::Mutex::new(HashMap::new()),
            compacted,
            on_bus,
        };
        // A cluster that is still electing its leader refuses stream
        // operations for a few seconds; keep trying rather than fail a start.
        let deadline = std::time::Instant::now() + STARTUP_PATIENCE;
        for ds in feed.catalog.names().map(str::to_owned).collect::<Vec<_>>() {
            loop {
                match feed.ensure_streams(&ds).await {
                    Ok(()) => break,
                    Err(e) if std::time::Instant::now() < deadline => {
                        tracing::info!("JetStream not ready yet ({e}); retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(feed)
    }

    /// A feed that only publishes (an owner): streams must already exist.
    pub fn options(&self) -> &JetStreamOptions {
        &self.options
    }

    async fn ensure_streams(&self, dataset: &str) -> Result<(), FeedError> {
        let o = &self.options;
        let storage = if o.memory_storage {
            StorageType::Memory
        } else {
            StorageType::File
        };
        let log = StreamConfig {
            name: o.log_stream(dataset),
            subjects: vec![o.log_subjects(dataset)],
            storage,
            num_replicas: o.replicas,
            duplicate_window: o.duplicate_window,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(log)
            .await
            .map_err(|e| unavailable(format!("creating stream {}: {e}", o.log_stream(dataset))))?;
        let state = StreamConfig {
            name: o.state_stream(dataset),
            storage,
            num_replicas: o.replicas,
            max_messages_per_subject: 1,
            duplicate_window: o.duplicate_window,
            sources: Some(vec![Source {
                name: o.log_stream(dataset),
                ..Default::default()
            }]),
            ..Default::default()
        };
        self.js.get_or_create_stream(state).await.map_err(|e| {
            unavailable(format!("creating stream {}: {e}", o.state_stream(dataset)))
        })?;
        Ok(())
    }

    async fn last_sequence(&self, stream: &str) -> Result<u64, FeedError> {
        let s = self.js.get_stream(stream).await.map_err(unavailable)?;
        Ok(s.cached_info().state.last_sequence)
    }

    /// Version and subject sequence of the latest change for `subject`.
    async fn latest(
        &self,
        log: &async_nats::jetstream::stream::Stream<()>,
        subject: &str,
    ) -> Result<Option<(Version, u64)>, FeedError> {
        match log.get_last_raw_message_by_subject(subject).await {
            Ok(m) => {
                let v = m
                    .headers
                    .get(VERSION_HEADER)
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(0);
                Ok(Some((v, m.sequence)))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// `dataset` as its log messages are checked: see [`JetStreamFeed::on_bus`].
    fn on_bus(&self, dataset: &str) -> Result<&Dataset, FeedError> {
        self.on_bus
            .get(dataset)
            .ok_or_else(|| FeedError::UnknownDataset(dataset.to_owned()))
    }

    /// The compacted state of `dataset` as digests see it, brought up to
    /// the log's last sequence as of this call.
    async fn compacted(
        &self,
        dataset: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, Compacted>, FeedError> {
        let ds = self.on_bus(dataset)?;
        let slot = self
            .compacted
            .get(dataset)
            .ok_or_else(|| FeedError::UnknownDataset(dataset.to_owned()))?;
        let log = self.options.log_stream(dataset);
        let last = self.last_sequence(&log).await?;
        let mut state = slot.lock().await;
        state
            .catch_up(
                &self.js,
                ds,
                &log,
                &self.options.log_subjects(dataset),
                last,
            )
            .await?;
        Ok(state)
    }

    fn known(&self, dataset: &str, key: &str) -> Option<(Version, u64)> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.get(dataset).and_then(|m| m.get(key)).copied()
    }

    fn remember(&self, dataset: &str, key: &str, last: Option<(Version, u64)>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let m = known.entry(dataset.to_owned()).or_default();
        match last {
            Some(l) => {
                if m.len() >= KNOWN_KEYS_MAX && !m.contains_key(key) {
                    m.clear();
                }
                m.insert(key.to_owned(), l);
            }
            None => {
                m.remove(key);
            }
        }
    }

    /// Appends one change unless the log already holds its version or newer.
    async fn publish_one(
        &self,
        log: &async_nats::jetstream::stream::Stream<()>,
        c: &Change,
    ) -> Result<Option<Position>, FeedError> {
        let subject = self.options.key_subject(&c.dataset, &c.key);
        let payload = serde_json::to_vec(c).map_err(unavailable)?;
        // First from memory (a key never seen is tried as new); after a
        // refusal, from the server.
        let mut last = self.known(&c.dataset, &c.key);
        for attempt in 0..16 {
            if attempt > 0 {
                last = self.latest(log, &subject).await?;
                self.remember(&c.dataset, &c.key, last);
            }
            if last.is_some_and(|(v, _)| v >= c.version) {
                return Ok(None);
            }
            let mut headers = HeaderMap::new();
            headers.insert(
                NATS_MESSAGE_ID,
                format!("{}/{}/{}", c.dataset, c.key, c.version).as_str(),
            );
            headers.insert(
                NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                last.map_or(0, |(_, s)| s).to_string().as_str(),
            );
            headers.insert(VERSION_HEADER, c.version.to_string().as_str());
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone().into())
                .await
                .map_err(unavailable)?
                .await;
            match ack {
                Ok(a) if a.duplicate => {
                    // Appended before (a retry): what the key's last is now,
                    // the server says on the next publish.
                    self.remember(&c.dataset, &c.key, None);
                    return Ok(None);
                }
                Ok(a) => {
                    self.remember(&c.dataset, &c.key, Some((c.version, a.sequence)));
                    return Ok(Some(a.sequence));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(unavailable(format!(
            "key '{}' kept changing under concurrent publishers",
            c.key
        )))
    }

    fn start_tail(&self, dataset: &str, next: Position) -> Result<Tail, FeedError> {
        let (tx, rx) = mpsc::channel(4 * MAX_PAGE);
        let js = self.js.clone();
        let stream = self.options.log_stream(dataset);
        let ds = self.on_bus(dataset)?.clone();
        let task = tokio::spawn(async move {
            let run = async {
                let s = js.get_stream(&stream).await.map_err(unavailable)?;
                let consumer = s
                    .create_consumer(pull::OrderedConfig {
                        deliver_policy: DeliverPolicy::ByStartSequence {
                            start_sequence: next,
                        },
                        ..Default::default()
                    })
                    .await
                    .map_err(unavailable)?;
                let mut messages = consumer.messages().await.map_err(unavailable)?;
                while let Some(m) = messages.next().await {
                    let m = m.map_err(unavailable)?;
                    let position = m.info().map_err(unavailable)?.stream_sequence;
                    let change = decode_entry(&ds, position, &m.payload)?;
                    if tx.send(Ok(FeedEntry { position, change })).await.is_err() {
                        return Ok(());
                    }
                }
                Err(unavailable("the log consumer ended"))
            };
            if let Err(e) = run.await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Tail { next, rx, task })
    }
}

/// Decodes and checks one log message. Anyone with publish rights on the
/// subject can put bytes there, so the reader trusts nothing: the message
/// must be a change of this dataset that fits its schema. `ds` is the
/// dataset as the bus carries it ([`JetStreamFeed::on_bus`]), so a message
/// carrying a private field is refused.
fn decode_entry(ds: &Dataset, position: Position, payload: &[u8]) -> Result<Change, FeedError> {
    let corrupt = |why: String| {
        FeedError::Corrupt(format!(
            "log message {position} of dataset {} {why}; fix or remove it, then restart the agent",
            ds.name
        ))
    };
    let change: Change =
        serde_json::from_slice(payload).map_err(|e| corrupt(format!("is not a change ({e})")))?;
    if change.dataset != ds.name || change.owner != ds.owner {
        return Err(corrupt(format!(
            "claims dataset {} owned by {}",
            change.dataset, change.owner
        )));
    }
    // Fields are checked against the schema version the reader knows; a
    // change written under another version (a hub's registry accepted it) is
    // checked for shape here and against the consumer's projection by the
    // agent, which quarantines what its copy cannot hold.
    let checked = if change.schema_version == ds.schema.version {
        change.validate(&ds.schema)
    } else {
        change.validate_shape()
    };
    checked.map_err(|e| corrupt(format!("is invalid: {e}")))?;
    Ok(change)
}

/// Moves one buffered entry into `entries` if it is the next position;
/// records why not otherwise. Returns whether to keep draining.
fn take(
    item: Option<Result<FeedEntry, FeedError>>,
    tail: &mut Tail,
    entries: &mut Vec<FeedEntry>,
    failure: &mut Option<FeedError>,
) -> bool {
    match item {
        Some(Ok(e)) if e.position == tail.next => {
            tail.next += 1;
            entries.push(e);
            true
        }
        Some(Ok(e)) => {
            *failure = Some(unavailable(format!(
                "log consumer skipped from {} to {}",
                tail.next, e.position
            )));
            false
        }
        Some(Err(e)) => {
            *failure = Some(e);
            false
        }
        None => false,
    }
}

#[async_trait]
impl Publisher for JetStreamFeed {
    fn catalog(&self) -> Option<&Catalog> {
        Some(&self.catalog)
    }

    async fn publish(
        &self,
        dataset: &str,
        changes: Vec<ChangeInput>,
    ) -> Result<PublishReceipt, FeedError> {
        let mut changes = self
            .catalog
            .prepare(dataset, changes, self.clock.now_ms())?;
        // Private fields never go onto the bus: NATS permissions work per
        // subject, so every reader of the dataset could read them there.
        let private = &self.catalog.get(dataset)?.private;
        if !private.is_empty() {
            for c in &mut changes {
                c.fields.retain(|name, _| !private.contains(name));
            }
        }
        // A handle only: no round trip (the streams exist since `connect`).
        let log = self
            .js
            .get_stream_no_info(self.options.log_stream(dataset))
            .await
            .map_err(unavailable)?;
        let newest = newest_per_key(&changes);
        let results =
            futures_util::future::join_all(newest.iter().map(|c| self.publish_one(&log, c))).await;
        let mut by_key: HashMap<(&str, Version), Position> = HashMap::new();
        for (c, r) in newest.iter().zip(results) {
            if let Some(p) = r? {
                by_key.insert((c.key.as_str(), c.version), p);
            }
        }
        let mut positions = Vec::with_capacity(changes.len());
        for c in &changes {
            // Only one of equal (key, version) pairs counts as appended.
            positions.push(by_key.remove(&(c.key.as_str(), c.version)));
        }
        let ignored = positions.iter().filter(|p| p.is_none()).count();
        let head = match positions.iter().flatten().max() {
            Some(&p) => p,
            None => {
                self.last_sequence(&self.options.log_stream(dataset))
                    .await?
            }
        };
        Ok(PublishReceipt {
            positions,
            ignored,
            head,
        })
    }
}

#[async_trait]
impl Feed for JetStreamFeed {
    async fn read(
        &self,
        dataset: &str,
        after: Position,
        limit: usize,
        wait: Duration,
    ) -> Result<FeedBatch, FeedError> {
        self.catalog.get(dataset)?;
        let limit = limit.clamp(1, MAX_PAGE);
        let mut tails = self.tails.lock().await;
        let restart = tails
            .get(dataset)
            .is_none_or(|t| t.next != after + 1 || t.task.is_finished());
        if restart {
            tails.insert(dataset.to_owned(), self.start_tail(dataset, after + 1)?);
        }
        let tail = tails
            .get_mut(dataset)
            .ok_or_else(|| unavailable("tail vanished"))?;
        let mut entries = Vec::new();
        let mut failure = None;
        while entries.len() < limit
            && take(tail.rx.try_recv().ok(), tail, &mut entries, &mut failure)
        {}
        if entries.is_empty() && failure.is_none() {
            // When the log already holds entries past `after`, the consumer
            // only needs a moment to deliver them: wait for that even if the
            // caller asked not to wait at the head.
            let behind = self
                .last_sequence(&self.options.log_stream(dataset))
                .await?
                > after;
            let wait = if behind {
                wait.max(DELIVERY_GRACE)
            } else {
                wait
            };
            if let Ok(item) = tokio::time::timeout(wait, tail.rx.recv()).await {
                if take(item, tail, &mut entries, &mut failure) {
                    while entries.len() < limit
                        && take(tail.rx.try_recv().ok(), tail, &mut entries, &mut failure)
                    {
                    }
                }
            }
        }
        let head = self
            .last_sequence(&self.options.log_stream(dataset))
            .await?;
        if let Some(f) = failure {
            tails.remove(dataset);
            if entries.is_empty() {
                return Err(f);
            }
        }
        drop(tails);
        Ok(FeedBatch {
            entries,
            head,
            hub_time_ms: self.clock.now_ms(),
        })
    }

    async fn snapshot(
        &self,
        dataset: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, FeedError> {
        let ds = self.on_bus(dataset)?;
        check_after_key(after)?;
        let start = match after {
            None => 1,
            Some(c) => {
                c.parse::<u64>().map_err(|_| {
                    FeedError::BadRequest(format!(
                        "snapshot cursor '{c}' is not one this feed issued"
                    ))
                })? + 1
            }
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let stream_name = self.options.state_stream(dataset);
        let (state, last, head) = loop {
            let state = self
                .js
                .get_stream(&stream_name)
                .await
                .map_err(unavailable)?;
            let last = state.cached_info().state.last_sequence;
            if last == 0 {
                break (state, 0, 0);
            }
            match state.get_raw_message(last).await {
                Ok(m) => {
                    let origin = m
                        .headers
                        .get(SOURCE_HEADER)
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default();
                    let head = origin.split_whitespace().skip(1).find_map(|t| t.parse::<u64>().ok()).ok_or_else(|| unavailable(format!("state message {last} lacks a readable {SOURCE_HEADER} header ('{origin}')")))?;
                    break (state, last, head);
                }
                // Replaced by a newer message for the same key meanwhile: look again.
                Err(_) => continue,
            }
        };
        let mut records = Vec::new();
        let mut last_seen = start.saturating_sub(1);
        if last >= start {
            let consumer = state
                .create_consumer(pull::Config {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    ack_policy: AckPolicy::None,
                    inactive_threshold: Duration::from_secs(30),
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?;
            'pages: while records.len() < limit && last_seen < last {
                let mut batch = consumer
                    .fetch()
                    .max_messages(limit - records.len())
                    .messages()
                    .await
                    .map_err(unavailable)?;
                let mut got = 0;
                while let Some(m) = batch.next().await {
                    let m = m.map_err(unavailable)?;
                    let info = m.info().map_err(unavailable)?;
                    last_seen = info.stream_sequence;
                    got += 1;
                    if last_seen > last {
                        break 'pages;
                    }
                    records.push(decode_entry(ds, last_seen, &m.payload)?);
                }
                if got == 0 {
                    break;
                }
            }
            let _ = state.delete_consumer(&consumer.cached_info().name).await;
        }
        let next_after_key =
            (last_seen < last && !records.is_empty()).then(|| last_seen.to_string());
        Ok(SnapshotPage {
            records,
            next_after_key,
            head,
            hub_time_ms: self.clock.now_ms(),
        })
    }

    async fn schema(&self, dataset: &str) -> Result<Schema, FeedError> {
        Ok((*self.catalog.schema(dataset)?).clone())
    }

    fn withheld_fields(&self, dataset: &str) -> Vec<String> {
        self.catalog
            .get(dataset)
            .map(|ds| ds.private.iter().cloned().collect())
            .unwrap_or_default()
    }

    async fn digest(&self, dataset: &str, query: &DigestQuery) -> Result<DigestNodes, FeedError> {
        self.compacted(dataset)
            .await?
            .digest
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
        Ok(self.compacted(dataset).await?.entries(buckets))
    }

    async fn records(&self, dataset: &str, keys: &[String]) -> Result<Vec<Change>, FeedError> {
        let ds = self.on_bus(dataset)?;
        check_digest_request(&[], keys.len())?;
        let log = self
            .js
            .get_stream_no_info(self.options.log_stream(dataset))
            .await
            .map_err(unavailable)?;
        let log = &log;
        // Owned keys: a stream over borrowed ones makes this future too
        // general for the compiler to prove `Send` (as in the reconciler).
        let found: Vec<Option<Change>> = futures_util::stream::iter(keys.to_vec())
            .map(|key: String| async move {
                let subject = self.options.key_subject(dataset, &key);
                match log.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => {
                        let change = decode_entry(ds, m.sequence, &m.payload)?;
                        if change.key != key {
                            return Err(FeedError::Corrupt(format!(
                                "log message {} of dataset {dataset} is on the subject of key '{key}' but carries key '{}'; fix or remove it",
                                m.sequence, change.key
                            )));
                        }
                        Ok(Some(change))
                    }
                    Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(e) => Err(unavailable(e)),
                }
            })
            .buffered(RECORDS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        Ok(found.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_encodes_any_key_into_a_subject_token() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"a.b *>"), "YS5iICo-");
        assert!(!base64url("ключ.*>".as_bytes()).contains(['.', '*', '>', ' ']));
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Whatever another publisher puts on a log subject, the reader
        /// answers with a well-formed change of this dataset or a corrupt
        /// entry naming its position; it never panics.
        #[test]
        fn any_bytes_on_the_bus_decode_or_are_refused(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            fields in crate::feed::props::json_value(),
            version in any::<u64>(),
            schema_version in 0u32..4,
            cut in 0usize..300,
        ) {
            let m = crate::feed::conformance::manifest();
            let ds = &m.datasets["items"];
            let change = serde_json::json!({
                "dataset": "items", "key": "k", "version": version, "op": "upsert",
                "fields": fields, "owner": "owner-svc", "ts": 1, "schema_version": schema_version,
            });
            let whole = serde_json::to_vec(&change).expect("json");
            let cut_short = whole[..cut.min(whole.len())].to_vec();
            for payload in [bytes, whole, cut_short] {
                match decode_entry(ds, 9, &payload) {
                    Ok(c) => {
                        prop_assert!(c.validate_shape().is_ok());
                        if c.schema_version == ds.schema.version {
                            prop_assert!(c.validate(&ds.schema).is_ok());
                        }
                    }
                    Err(FeedError::Corrupt(m)) => prop_assert!(m.contains("log message 9 of dataset items")),
                    Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use crate::testing::{nats_delete_streams, nats_or_skip, unique_name};

    pub fn options(url: &str, prefix: &str) -> JetStreamOptions {
        let mut o = JetStreamOptions::new(url);
        o.stream_prefix = prefix.to_uppercase();
        o.subject_prefix = prefix.to_owned();
        o
    }

    #[tokio::test]
    async fn passes_the_feed_conformance_suite() {
        let Some(url) = nats_or_skip("jetstream conformance").await else {
            return;
        };
        let prefix = unique_name("spokefc");
        let n = std::sync::atomic::AtomicUsize::new(0);
        super::super::conformance::run(|m| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let o = options(&url, &format!("{prefix}_{i}"));
            async move { JetStreamFeed::connect(o, &m).await.expect("connect") }
        })
        .await;
        nats_delete_streams(&url, &prefix.to_uppercase()).await;
    }

    /// Two publishers on one dataset: each one's memory of a key's last
    /// version goes stale when the other writes it. A stale memory costs a
    /// refused publish and a look-up, never an older version appended after
    /// a newer one or a newer one dropped.
    #[tokio::test]
    async fn a_publishers_stale_memory_never_appends_out_of_order() {
        let Some(url) = nats_or_skip("jetstream two publishers").await else {
            return;
        };
        let prefix = unique_name("spoketwo");
        let m = super::super::conformance::manifest();
        let o = options(&url, &prefix);
        let a = JetStreamFeed::connect(o.clone(), &m)
            .await
            .expect("connect a");
        let b = JetStreamFeed::connect(o.clone(), &m)
            .await
            .expect("connect b");
        let up = |key: &str, v: u64| {
            let fields = serde_json::json!({"n": v}).as_object().cloned().unwrap();
            vec![ChangeInput::upsert(key, v, fields)]
        };
        let pos = |r: PublishReceipt| r.positions[0];
        assert_eq!(pos(a.publish("items", up("k", 1)).await.unwrap()), Some(1));
        // b has never seen k: it tries it as new, is refused, looks it up.
        assert_eq!(pos(b.publish("items", up("k", 1)).await.unwrap()), None);
        assert_eq!(pos(b.publish("items", up("k", 3)).await.unwrap()), Some(2));
        // a remembers version 1 at sequence 1: stale. Version 2 must be
        // ignored (3 is on the log), version 4 appended after 3.
        assert_eq!(pos(a.publish("items", up("k", 2)).await.unwrap()), None);
        let r = a.publish("items", up("k", 4)).await.unwrap();
        assert_eq!((r.positions[0], r.head), (Some(3), 3));
        // b now remembers 3 at sequence 2; 4 is on the log.
        let r = b.publish("items", up("k", 4)).await.unwrap();
        assert_eq!((r.positions[0], r.ignored), (None, 1));
        assert_eq!(r.head, 3, "an all-ignored publish still reports the head");
        let got = a
            .read("items", 0, 10, Duration::from_secs(5))
            .await
            .unwrap();
        let mut entries = got.entries;
        while entries.len() < 3 {
            let more = a
                .read(
                    "items",
                    entries.last().map_or(0, |e| e.position),
                    10,
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            assert!(!more.entries.is_empty(), "the log holds 3 entries");
            entries.extend(more.entries);
        }
        let versions: Vec<u64> = entries.iter().map(|e| e.change.version).collect();
        assert_eq!(versions, [1, 3, 4]);
        nats_delete_streams(&url, &prefix.to_uppercase()).await;
    }

    /// Private fields never go onto the bus: NATS permissions are per
    /// subject, so any reader of the dataset could read them there. The
    /// publisher drops them, a message carrying one is refused as corrupt,
    /// and an agent that projects one refuses to start over JetStream.
    #[tokio::test]
    async fn private_fields_stay_off_the_bus() {
        let Some(url) = nats_or_skip("jetstream private fields").await else {
            return;
        };
        let m = Manifest::parse(
            "private.toml",
            r#"
[services.owner-svc]
[services.reader-svc]
[services.payer-svc]
[datasets.customers]
owner = "owner-svc"
key = "id"
fields = { name = "string", card = "string" }
private = ["card"]
grants = { "payer-svc" = ["card"] }
[[subscriptions]]
consumer = "reader-svc"
dataset = "customers"
fields = ["name"]
staleness_budget = "1m"
[[subscriptions]]
consumer = "payer-svc"
dataset = "customers"
fields = ["name", "card"]
staleness_budget = "1m"
"#,
        )
        .expect("manifest");
        let prefix = unique_name("spokepriv");
        let o = options(&url, &prefix);
        let feed = JetStreamFeed::connect(o.clone(), &m)
            .await
            .expect("connect");
        let fields = serde_json::json!({"name": "Ada", "card": "4242"})
            .as_object()
            .cloned()
            .unwrap();
        feed.publish("customers", vec![ChangeInput::upsert("c1", 1, fields)])
            .await
            .expect("a full record validates and publishes");
        let raw = async_nats::connect(url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(raw);
        let log = js.get_stream(o.log_stream("customers")).await.unwrap();
        let msg = log
            .get_last_raw_message_by_subject(&o.key_subject("customers", "c1"))
            .await
            .unwrap();
        let on_bus = String::from_utf8_lossy(&msg.payload).into_owned();
        assert!(
            on_bus.contains("Ada") && !on_bus.contains("card") && !on_bus.contains("4242"),
            "{on_bus}"
        );
        let b = feed
            .read("customers", 0, 10, Duration::from_secs(5))
            .await
            .expect("read");
        assert_eq!(
            b.entries[0].change.fields.keys().collect::<Vec<_>>(),
            ["name"]
        );

        // Written around Spoke with the private field: refused by name.
        let leaky = br#"{"dataset":"customers","key":"c2","version":1,"op":"upsert","fields":{"name":"Bob","card":"1111"},"owner":"owner-svc","ts":1,"schema_version":1}"#;
        js.publish(o.key_subject("customers", "c2"), leaky.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
        let e = feed
            .read("customers", 1, 10, Duration::from_secs(5))
            .await
            .expect_err("a private field on the bus");
        assert!(
            matches!(&e, FeedError::Corrupt(m) if m.contains("log message 2") && m.contains("'card' is not in the schema")),
            "{e:?}"
        );

        // An agent that would copy the private field cannot use this feed.
        let feed = std::sync::Arc::new(feed);
        let store = std::sync::Arc::new(crate::copy::memory::MemoryCopyStore::new());
        let e = crate::agent::Agent::new(
            std::sync::Arc::new(m.clone()),
            "payer-svc",
            feed.clone(),
            store.clone(),
        )
        .err()
        .expect("payer-svc projects card");
        assert!(
            e.to_string().starts_with(
                "payer-svc projects card of customers, private field(s) this feed never carries"
            ),
            "{e}"
        );
        crate::agent::Agent::new(std::sync::Arc::new(m), "reader-svc", feed, store)
            .expect("reader-svc copies public fields only");
        nats_delete_streams(&url, &prefix.to_uppercase()).await;
    }

    /// Hostile input on the bus: bytes published straight to a log subject,
    /// around Spoke's validation. The reader refuses them by name.
    #[tokio::test]
    async fn garbage_on_the_bus_is_a_corrupt_feed_not_a_change() {
        let Some(url) = nats_or_skip("jetstream garbage").await else {
            return;
        };
        let prefix = unique_name("spokebad");
        let m = super::super::conformance::manifest();
        let o = options(&url, &prefix);
        let feed = JetStreamFeed::connect(o.clone(), &m)
            .await
            .expect("connect");
        let fields = serde_json::json!({"n": 1}).as_object().cloned().unwrap();
        feed.publish("items", vec![ChangeInput::upsert("a", 1, fields)])
            .await
            .expect("publish");
        let raw = async_nats::connect(url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(raw);
        let wrong_type = br#"{"dataset":"items","key":"b","version":1,"op":"upsert","fields":{"n":"x"},"owner":"owner-svc","ts":1,"schema_version":1}"#;
        for payload in [&b"not json"[..], wrong_type] {
            js.publish(o.key_subject("items", "b"), payload.to_vec().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let first = feed
            .read("items", 0, 10, Duration::from_secs(5))
            .await
            .expect("the valid entry comes first");
        assert_eq!(first.entries.len(), 1);
        let e = feed
            .read("items", 1, 10, Duration::from_secs(5))
            .await
            .expect_err("garbage is refused");
        assert!(
            matches!(&e, FeedError::Corrupt(m) if m.contains("log message 2 of dataset items is not a change")),
            "{e:?}"
        );
        assert!(!e.is_transient(), "retrying cannot fix a corrupt entry");
        let e = feed
            .read("items", 2, 10, Duration::from_secs(5))
            .await
            .expect_err("invalid change is refused");
        assert!(
            matches!(&e, FeedError::Corrupt(m) if m.contains("log message 3") && m.contains("field 'n' must be int")),
            "{e:?}"
        );
        nats_delete_streams(&url, &prefix.to_uppercase()).await;
    }
}
