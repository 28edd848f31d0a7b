//! [`CdcSource`]: setup, snapshot and the replication stream, publishing
//! whole transactions and acknowledging only what the feed accepted.
//!
//! ```text
//!  run ─▶ session ─▶ setup (slot.rs) ─▶ snapshot (snapshot.rs) ─▶ stream
//!   ▲        │ transient error (network, restart, slot busy): back off, new session
//!   └────────┘ definite error (schema, identity, slot lost, rejected): stop
//!
//!  stream:  Begin ─▶ Txn { per table: key ─▶ last change }   (Relation: check shape)
//!           Insert / Update / Delete ─▶ coalesce into Txn
//!           Commit(end) ─▶ Group { per dataset: changes in commit order }
//!             more events already received and group < batch? ─▶ next event
//!             else, no publish in flight ─▶ launch the group's publish (own task, per dataset)
//!           publish done ─▶ update_applied_lsn(its last end) ─▶ launch what gathered meanwhile
//!           KeepAlive / heartbeat message, no Txn open, Group empty ─▶ update_applied_lsn(pos)
//! ```
//!
//! # Contract
//! - The applied position handed to pgwire-replication never passes a
//!   change the publisher has not accepted: it is raised to the last Commit
//!   of a group whose batches all returned `Ok`, or to a keepalive position
//!   while no transaction is open and no group waits (everything before it
//!   has been handled).
//! - Group commit: consecutive committed transactions are published
//!   together (one publish per dataset, so one feed transaction and one
//!   fsync) while more of the stream has already arrived, up to `batch`
//!   changes. The source never waits for more: when nothing else has
//!   arrived, the group is published at once, so a lone transaction is
//!   published as soon as it commits. Changes keep commit order per key
//!   (a key changed by several transactions of a group appears once per
//!   transaction, oldest first).
//! - Pipelining: one group is published on its own task while the stream
//!   is read on and the next group gathers; the next is launched only once
//!   the one in flight returned and was confirmed, so publishes (and
//!   confirmations) stay in commit order and a full group waits for the
//!   one in flight. Decoding overlaps the feed's commit instead of waiting
//!   for it.
//! - An error inside a transaction discards the whole transaction: nothing
//!   of it is published, nothing acknowledged; the complete transactions
//!   before it are published and acknowledged first.
//! - A new session (after a transient error) starts from the slot's
//!   confirmed position or the last published commit, whichever is later.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use serde_json::{Map, Value};
use spoke_core::Manifest;
use tokio_postgres::Client;

use super::metrics::CdcMetrics;
use super::pgoutput::{self, Message, OldKind};
use super::shape::Shape;
use super::slot::{self, SlotInfo, TableInfo};
use super::snapshot::{self, ProgressFn, SnapshotJob};
use super::{fmt_lsn, CdcConfig, CdcError, CdcOptions, CdcStats, DatasetCounts, SnapshotProgress};
use crate::feed::{ChangeInput, Feed, FeedError, Publisher};
use crate::shutdown::Shutdown;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

fn pg_time_ms(micros: i64) -> u64 {
    ((micros + PG_EPOCH_MICROS) / 1000).max(0) as u64
}

/// The CDC source of one slot: every mapped table of one database.
pub struct CdcSource {
    cfg: CdcConfig,
    manifest: Arc<Manifest>,
    publisher: Arc<dyn Publisher>,
    reader: Option<Arc<dyn Feed>>,
    progress: Option<ProgressFn>,
    stats: Arc<CdcStats>,
}

pub(crate) enum Published {
    Done,
    Stopped,
}

/// Publishes `changes` in batches, retrying transient failures until
/// shutdown; a rejected batch is a definite error naming a key.
pub(crate) async fn publish_all(
    publisher: &dyn Publisher,
    dataset: &str,
    changes: Vec<ChangeInput>,
    options: &CdcOptions,
    stats: &CdcStats,
    shutdown: &mut Shutdown,
) -> Result<Published, CdcError> {
    for chunk in changes.chunks(options.batch()) {
        let mut backoff = options.backoff_min;
        loop {
            match publisher.publish(dataset, chunk.to_vec()).await {
                Ok(receipt) => {
                    stats.count_publish(
                        dataset,
                        (chunk.len() - receipt.ignored) as u64,
                        receipt.ignored as u64,
                    );
                    break;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(
                        "cdc: publishing to {dataset} failed, retrying in {backoff:?}: {e}"
                    );
                    *stats.last_error.lock().expect("stats") = Some(e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => return Ok(Published::Stopped),
                    }
                    backoff = (backoff * 2).min(options.backoff_max);
                }
                Err(e) => {
                    let key = match &e {
                        FeedError::Invalid { index, .. } => chunk.get(*index).unwrap_or(&chunk[0]),
                        _ => &chunk[0],
                    }
                    .key
                    .clone();
                    return Err(CdcError::Rejected {
                        dataset: dataset.to_owned(),
                        key,
                        source: e,
                    });
                }
            }
        }
    }
    Ok(Published::Done)
}

/// Measures the slot into `stats` (retained WAL, lag, confirmed position,
/// `wal_status`) and logs it, with a warning above the alarm threshold. A
/// slot that is gone or lost its WAL is [`CdcError::SlotLost`].
pub(crate) async fn measure_slot(
    client: &Client,
    cfg: &CdcConfig,
    stats: &CdcStats,
) -> Result<(), CdcError> {
    let slot = &cfg.slot;
    let info = slot::slot_info(client, slot).await?;
    stats
        .slot_measured_ms
        .store(crate::clock::now_ms().max(1), Ordering::Relaxed);
    *stats.wal_status.lock().expect("cdc stats") = info.as_ref().and_then(|i| i.wal_status.clone());
    let Some(info) = info else {
        return Err(CdcError::SlotLost {
            slot: slot.clone(),
            reason: "it was dropped while Spoke used it".into(),
        });
    };
    let retained = info.retained_bytes.unwrap_or(0);
    let lag = info.lag_bytes.unwrap_or(0);
    stats.retained_wal_bytes.store(retained, Ordering::Relaxed);
    stats.lag_bytes.store(lag, Ordering::Relaxed);
    if let Some(c) = info.confirmed_flush {
        stats.confirmed_flush_lsn.store(c, Ordering::Relaxed);
    }
    tracing::info!(
        "cdc slot {slot}: retained WAL {retained} bytes, lag {lag} bytes, wal_status {}, confirmed {}, published {} changes in {} transactions",
        info.wal_status.as_deref().unwrap_or("?"),
        info.confirmed_flush.map(fmt_lsn).unwrap_or_default(),
        CdcStats::get(&stats.published),
        CdcStats::get(&stats.transactions),
    );
    if info.wal_status.as_deref() == Some("lost") {
        return Err(CdcError::SlotLost {
            slot: slot.clone(),
            reason: "wal_status = 'lost': PostgreSQL removed WAL it still needed (max_slot_wal_keep_size)".into(),
        });
    }
    if retained > cfg.options.wal_alarm_bytes {
        tracing::warn!(
            "cdc slot {slot} retains {retained} bytes of WAL, above the alarm threshold of {} bytes",
            cfg.options.wal_alarm_bytes
        );
    }
    Ok(())
}

fn need_txn(txn: Option<&mut Txn>) -> Result<&mut Txn, CdcError> {
    txn.ok_or_else(|| CdcError::Stream("a row change outside a transaction".into()))
}

/// One mapped table, as setup found it.
struct Table {
    info: TableInfo,
    shape: Shape,
}

/// A change waiting for its transaction's commit.
#[derive(Debug, Clone)]
enum Pending {
    Upsert {
        version: Option<u64>,
        fields: Map<String, Value>,
        missing: Vec<String>,
    },
    Delete {
        version: Option<u64>,
    },
}

/// The open transaction: per table, per key, the last change.
struct Txn {
    commit_ms: u64,
    tables: BTreeMap<usize, BTreeMap<String, Pending>>,
}

impl Txn {
    fn keys(&mut self, table: usize) -> &mut BTreeMap<String, Pending> {
        self.tables.entry(table).or_default()
    }

    /// Records an upsert, filling unchanged TOAST values from `old` (a full
    /// old image) or an earlier change of the key in this transaction.
    fn upsert(&mut self, table: usize, mut row: super::shape::Row, old: Option<super::shape::Row>) {
        let keys = self.keys(table);
        if !row.missing.is_empty() {
            let earlier = match keys.get(&row.key) {
                Some(Pending::Upsert { fields, .. }) => Some(fields),
                _ => None,
            };
            row.missing.retain(|name| {
                let found = old
                    .as_ref()
                    .and_then(|o| o.fields.get(name))
                    .or_else(|| earlier.and_then(|f| f.get(name)))
                    .cloned();
                match found {
                    Some(v) => {
                        row.fields.insert(name.clone(), v);
                        false
                    }
                    None => true,
                }
            });
        }
        keys.insert(
            row.key,
            Pending::Upsert {
                version: row.version,
                fields: row.fields,
                missing: row.missing,
            },
        );
    }

    fn delete(&mut self, table: usize, key: String, version: Option<u64>) {
        self.keys(table).insert(key, Pending::Delete { version });
    }
}

impl CdcSource {
    pub fn new(
        mut cfg: CdcConfig,
        manifest: Arc<Manifest>,
        publisher: Arc<dyn Publisher>,
    ) -> Result<CdcSource, CdcError> {
        cfg.validate()?;
        if cfg.options.batch.is_none() {
            cfg.options.batch = Some(publisher.preferred_batch().clamp(1, crate::feed::MAX_BATCH));
        }
        for t in &cfg.tables {
            if !manifest.datasets.contains_key(&t.dataset) {
                return Err(CdcError::Config(format!(
                    "dataset '{}' (table {}) is not in the manifest",
                    t.dataset,
                    t.qualified()
                )));
            }
        }
        let stats = Arc::new(CdcStats::default());
        stats.datasets.lock().expect("cdc stats").extend(
            cfg.tables
                .iter()
                .map(|t| (t.dataset.clone(), DatasetCounts::default())),
        );
        Ok(CdcSource {
            cfg,
            manifest,
            publisher,
            reader: None,
            progress: None,
            stats,
        })
    }

    /// The feed's read side: after a snapshot (LSN versions), records the
    /// table no longer has are deleted from the feed — what makes
    /// `--resnapshot` after a lost slot complete.
    pub fn with_reader(mut self, feed: Arc<dyn Feed>) -> Self {
        self.reader = Some(feed);
        self
    }

    /// Calls `f` after every snapshot chunk.
    pub fn on_progress(mut self, f: impl Fn(&SnapshotProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    pub fn stats(&self) -> Arc<CdcStats> {
        self.stats.clone()
    }

    /// What `GET /metrics` shows of this source ([`super::metrics`]).
    pub fn metrics(&self) -> CdcMetrics {
        CdcMetrics::new(&self.cfg, self.stats.clone())
    }

    /// Runs until `shutdown`, or until a definite error.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), CdcError> {
        let mut backoff = self.cfg.options.backoff_min;
        let mut resnapshot = self.cfg.options.resnapshot;
        let mut published_upto = 0u64;
        loop {
            if shutdown.is_fired() {
                return Ok(());
            }
            let result = self
                .session(
                    &mut shutdown,
                    &mut resnapshot,
                    &mut published_upto,
                    &mut backoff,
                )
                .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    tracing::warn!("cdc: {e}; retrying in {backoff:?}");
                    *self.stats.last_error.lock().expect("stats") = Some(e.to_string());
                    CdcStats::add(&self.stats.reconnects, 1);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(self.cfg.options.backoff_max);
                }
                Err(e) => {
                    *self.stats.last_error.lock().expect("stats") = Some(e.to_string());
                    if matches!(e, CdcError::SlotLost { .. }) {
                        self.stats.slot_lost.store(true, Ordering::Relaxed);
                    }
                    self.stats.stopped.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    async fn session(
        &self,
        shutdown: &mut Shutdown,
        resnapshot: &mut bool,
        published_upto: &mut u64,
        backoff: &mut Duration,
    ) -> Result<(), CdcError> {
        let cfg = &self.cfg;
        let client = slot::connect(&cfg.postgres).await?;
        slot::lock(&client, &cfg.slot).await?;
        let mut tables = Vec::new();
        for t in &cfg.tables {
            let info = slot::inspect(&client, t).await?;
            let shape = Shape::build(
                t,
                &self.manifest.datasets[&t.dataset],
                &self.manifest,
                &info.name_types(),
            )?;
            let dataset = &self.manifest.datasets[&t.dataset];
            let large: Vec<&String> = info
                .toastable
                .iter()
                .filter(|c| dataset.schema.fields.contains_key(*c))
                .collect();
            if info.identity != "f" && !large.is_empty() {
                tracing::warn!(
                    "table {}: columns {large:?} can hold out-of-line (TOAST) values; an UPDATE that leaves such a value unchanged does not carry it, and the source stops on it. Consider: ALTER TABLE {} REPLICA IDENTITY FULL",
                    t.qualified(),
                    t.sql_name()
                );
            }
            tables.push(Table { info, shape });
        }
        slot::ensure_state_table(&client, cfg).await?;
        slot::ensure_publication(&client, cfg).await?;
        if *resnapshot {
            if let Some(SlotInfo {
                active_pid: Some(pid),
                ..
            }) = slot::slot_info(&client, &cfg.slot).await?
            {
                return Err(CdcError::Busy(format!(
                    "slot '{}' is in use by process {pid}; stop it before --resnapshot",
                    cfg.slot
                )));
            }
            slot::drop_slot(&client, &cfg.slot).await?;
            slot::delete_state(&client, cfg).await?;
            *resnapshot = false;
            *published_upto = 0;
            tracing::warn!(
                "cdc --resnapshot: dropped slot {} and its state; taking a new snapshot",
                cfg.slot
            );
        }
        let consistent = self.prepare_slot(&client).await?;
        measure_slot(&client, cfg, &self.stats).await?;
        let state = slot::load_state(&client, cfg).await?;
        for table in &tables {
            let ds = &table.info.mapping.dataset;
            let row = state.get(ds).ok_or_else(|| CdcError::NewDataset {
                dataset: ds.clone(),
                slot: cfg.slot.clone(),
            })?;
            if row.snapshot_done {
                continue;
            }
            let job = SnapshotJob {
                client: &client,
                cfg,
                info: &table.info,
                shape: &table.shape,
                publisher: self.publisher.as_ref(),
                reader: self.reader.as_deref(),
                stats: &self.stats,
                progress: self.progress.as_ref(),
                shutdown,
            };
            if !snapshot::run(job, row, consistent).await? {
                return Ok(());
            }
        }
        *backoff = cfg.options.backoff_min;
        self.stream(&client, &tables, published_upto, shutdown, backoff)
            .await
    }

    /// Reconciles the state table with the slot; returns the consistent point.
    async fn prepare_slot(&self, client: &Client) -> Result<u64, CdcError> {
        let cfg = &self.cfg;
        let state = slot::load_state(client, cfg).await?;
        let info = slot::slot_info(client, &cfg.slot).await?;
        let creating = state.values().any(|r| r.consistent_lsn.is_none());
        if state.is_empty() || creating {
            match (&info, creating) {
                (Some(_), false) => {
                    return Err(CdcError::SlotUnknown {
                        slot: cfg.slot.clone(),
                        state_table: cfg.state_table.clone(),
                    })
                }
                (Some(i), true) => {
                    if let Some(pid) = i.active_pid {
                        return Err(CdcError::Busy(format!(
                            "slot '{}' is in use by process {pid}",
                            cfg.slot
                        )));
                    }
                    // Created by a run that crashed before recording it: nothing was published from it.
                    slot::drop_slot(client, &cfg.slot).await?;
                }
                (None, _) => {}
            }
            slot::insert_creating(client, cfg).await?;
            let c = slot::create_slot(client, &cfg.slot).await?;
            slot::set_consistent(client, cfg, c).await?;
            slot::wait_for_running_transactions(client).await?;
            return Ok(c);
        }
        let lost = |reason: String| CdcError::SlotLost {
            slot: cfg.slot.clone(),
            reason,
        };
        match &info {
            None => return Err(lost("it no longer exists".into())),
            Some(i) if i.wal_status.as_deref() == Some("lost") => {
                return Err(lost(
                    "wal_status = 'lost': PostgreSQL removed WAL it still needed (max_slot_wal_keep_size)".into(),
                ))
            }
            Some(i) if i.plugin.as_deref() != Some("pgoutput") => {
                return Err(CdcError::Config(format!(
                    "slot '{}' uses plugin {:?}, not pgoutput",
                    cfg.slot, i.plugin
                )))
            }
            Some(_) => {}
        }
        Ok(state
            .values()
            .filter_map(|r| r.consistent_lsn)
            .max()
            .unwrap_or(0))
    }

    fn replication_config(&self, start: u64) -> Result<ReplicationConfig, CdcError> {
        let pc: tokio_postgres::Config = self
            .cfg
            .postgres
            .parse()
            .map_err(|e| CdcError::Config(format!("postgres connection string: {e}")))?;
        if matches!(pc.get_ssl_mode(), tokio_postgres::config::SslMode::Require) {
            return Err(CdcError::Config(
                "sslmode=require: this build connects without TLS".into(),
            ));
        }
        let host = match pc.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
            None => "localhost".to_owned(),
        };
        let port = pc.get_ports().first().copied().unwrap_or(5432);
        let user = pc.get_user().unwrap_or("postgres").to_owned();
        let password = pc
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = pc.get_dbname().unwrap_or(&user).to_owned();
        Ok(ReplicationConfig::new(
            host,
            user,
            password,
            database,
            self.cfg.slot.clone(),
            self.cfg.publication.clone(),
        )
        .with_port(port)
        .with_tls(TlsConfig::disabled())
        .with_start_lsn(Lsn(start))
        .with_ack_lsn(Lsn(start))
        .with_status_interval(self.cfg.options.ack_interval)
        .with_wakeup_interval(Duration::from_secs(5))
        .with_options(slot::REPLICATION_OPTIONS)
        .with_application_name(format!("spoke-cdc-{}", self.cfg.slot)))
    }

    fn wire_error(&self, e: PgWireError) -> CdcError {
        let slot = &self.cfg.slot;
        match e {
            PgWireError::Server(msg) => {
                if msg.contains("SQLSTATE 55006") {
                    CdcError::Busy(format!("slot '{slot}': {msg}"))
                } else if msg.contains("invalidated")
                    || msg.contains("cannot read from logical replication slot")
                    || msg.contains("has already been removed")
                    || (msg.contains("does not exist") && msg.contains("SQLSTATE 42704"))
                {
                    CdcError::SlotLost {
                        slot: slot.clone(),
                        reason: msg,
                    }
                } else if ["SQLSTATE 57P", "SQLSTATE 08", "SQLSTATE 53"]
                    .iter()
                    .any(|c| msg.contains(c))
                {
                    CdcError::Unavailable(format!("replication: {msg}"))
                } else {
                    CdcError::Postgres(format!("replication: {msg}"))
                }
            }
            PgWireError::Auth(m) => CdcError::Postgres(format!("replication authentication: {m}")),
            e if e.is_transient() => CdcError::Unavailable(format!("replication: {e}")),
            e => CdcError::Stream(e.to_string()),
        }
    }

    async fn stream(
        &self,
        admin: &Client,
        tables: &[Table],
        published_upto: &mut u64,
        shutdown: &mut Shutdown,
        backoff: &mut Duration,
    ) -> Result<(), CdcError> {
        let cfg = &self.cfg;
        let info = slot::slot_info(admin, &cfg.slot)
            .await?
            .ok_or_else(|| CdcError::SlotLost {
                slot: cfg.slot.clone(),
                reason: "it no longer exists".into(),
            })?;
        if let Some(pid) = info.active_pid {
            return Err(CdcError::Busy(format!(
                "slot '{}' is in use by process {pid}",
                cfg.slot
            )));
        }
        let start = info.confirmed_flush.unwrap_or(0).max(*published_upto);
        let mut client = ReplicationClient::connect(self.replication_config(start)?)
            .await
            .map_err(|e| self.wire_error(e))?;
        tokio::select! {
            r = client.wait_started() => r.map_err(|e| self.wire_error(e))?,
            _ = shutdown.wait() => { client.stop(); return Ok(()); }
        }
        tracing::info!(
            "cdc streaming slot {} (publication {}) from {}",
            cfg.slot,
            cfg.publication,
            fmt_lsn(start)
        );
        *backoff = cfg.options.backoff_min;
        // Events the client has received from the server so far, against
        // those this loop took: the difference is what is already waiting.
        let wire = client.metrics();
        let mut taken = 0u64;
        let mut relations: HashMap<u32, Option<(usize, Shape)>> = HashMap::new();
        let mut txn: Option<Txn> = None;
        let mut group = Group::default();
        // The group being published while the stream is read on (at most one).
        let mut inflight: Option<InFlight> = None;
        let mut progress = Progress {
            acked: start,
            published_upto,
        };
        let mut status = tokio::time::interval(cfg.options.status_every);
        let mut heartbeat =
            tokio::time::interval(cfg.options.heartbeat.unwrap_or(Duration::from_secs(3600)));
        let mut heartbeat_on = cfg.options.heartbeat.is_some();
        loop {
            let event = tokio::select! {
                _ = shutdown.wait() => {
                    // A publish already sent is seen through (a retry stops
                    // at once on shutdown) and confirmed if it succeeded.
                    self.settle(&mut inflight, &client, &mut progress).await?;
                    client.stop();
                    return Ok(());
                }
                done = in_flight(&mut inflight) => {
                    let f = inflight.take().expect("a publish in flight");
                    if !self.confirm(f.group, done, &client, &mut progress)? {
                        client.stop();
                        return Ok(());
                    }
                    // What gathered meanwhile goes next, without waiting for more.
                    if !group.is_empty() {
                        inflight = Some(self.launch(&mut group, shutdown));
                    }
                    continue;
                }
                _ = status.tick() => {
                    measure_slot(admin, cfg, &self.stats).await?;
                    continue;
                }
                _ = heartbeat.tick(), if heartbeat_on => {
                    if let Err(e) = admin
                        .execute("SELECT pg_logical_emit_message(false, 'spoke.heartbeat', '')", &[])
                        .await
                    {
                        if e.as_db_error().is_some() {
                            tracing::warn!("cdc heartbeat disabled: {e}");
                            heartbeat_on = false;
                        } else {
                            return Err(super::pg_error("heartbeat", e));
                        }
                    }
                    continue;
                }
                ev = client.recv() => match ev {
                    Ok(Some(ev)) => {
                        taken += 1;
                        ev
                    }
                    Ok(None) => return Err(CdcError::Unavailable("the replication stream ended".into())),
                    Err(e) => return Err(self.wire_error(e)),
                },
            };
            let handled = match event {
                ReplicationEvent::Begin {
                    commit_time_micros, ..
                } => {
                    if txn.is_some() {
                        Err(CdcError::Stream("Begin inside a transaction".into()))
                    } else {
                        txn = Some(Txn {
                            commit_ms: pg_time_ms(commit_time_micros),
                            tables: BTreeMap::new(),
                        });
                        Ok(())
                    }
                }
                ReplicationEvent::XLogData { data, .. } => pgoutput::decode(&data)
                    .map_err(|e| CdcError::Stream(e.to_string()))
                    .and_then(|msg| self.apply(msg, tables, &mut relations, txn.as_mut())),
                ReplicationEvent::Commit {
                    end_lsn,
                    commit_time_micros,
                    ..
                } => match txn.take() {
                    None => Err(CdcError::Stream("Commit without Begin".into())),
                    Some(mut t) => {
                        t.commit_ms = pg_time_ms(commit_time_micros);
                        match committed_changes(t, end_lsn.0, tables) {
                            Err(e) => Err(e),
                            Ok(changes) => {
                                // One publish per dataset holds at most `batch`
                                // changes: publish what waits before it would
                                // overflow (a larger transaction alone is
                                // split by `publish_all`).
                                let rows: usize = changes.iter().map(|(_, c)| c.len()).sum();
                                let overflows =
                                    !group.is_empty() && group.rows + rows > cfg.options.batch();
                                if overflows {
                                    if !self.settle(&mut inflight, &client, &mut progress).await? {
                                        client.stop();
                                        return Ok(());
                                    }
                                    inflight = Some(self.launch(&mut group, shutdown));
                                }
                                group.add(changes, rows, end_lsn.0);
                                Ok(())
                            }
                        }
                    }
                },
                ReplicationEvent::KeepAlive { wal_end: lsn, .. }
                | ReplicationEvent::Message {
                    transactional: false,
                    lsn,
                    ..
                } => {
                    // Everything before it has been handled: nothing open,
                    // nothing waiting to be published.
                    if txn.is_none()
                        && group.is_empty()
                        && inflight.is_none()
                        && lsn.0 > progress.acked
                    {
                        client.update_applied_lsn(lsn);
                        progress.acked = lsn.0;
                        self.stats.acked_lsn.store(lsn.0, Ordering::Relaxed);
                    }
                    Ok(())
                }
                ReplicationEvent::Message { .. } => Ok(()),
                ReplicationEvent::StoppedAt { .. } => {
                    self.flush(&mut inflight, &mut group, &client, &mut progress, shutdown)
                        .await?;
                    return Ok(());
                }
            };
            if let Err(e) = handled {
                // The transactions before the bad one are complete: publish
                // and acknowledge them, as if each had been published alone.
                self.flush(&mut inflight, &mut group, &client, &mut progress, shutdown)
                    .await?;
                return Err(e);
            }
            // Group commit: publish when the group is full, or when nothing
            // more is waiting in the stream (never wait for more to come).
            // While a publish is in flight the group keeps gathering; a full
            // group waits for it (one publish at a time keeps commit order).
            if !group.is_empty()
                && (group.rows >= cfg.options.batch() || wire.events_forwarded() <= taken)
            {
                if group.rows >= cfg.options.batch()
                    && !self.settle(&mut inflight, &client, &mut progress).await?
                {
                    client.stop();
                    return Ok(());
                }
                if inflight.is_none() {
                    inflight = Some(self.launch(&mut group, shutdown));
                }
            }
        }
    }

    /// Starts publishing the group (per dataset, in order) on its own task,
    /// so the stream is read on meanwhile; [`Self::confirm`] takes its result.
    fn launch(&self, group: &mut Group, shutdown: &Shutdown) -> InFlight {
        let Group {
            datasets,
            transactions,
            end_lsn,
            ..
        } = std::mem::take(group);
        let publisher = self.publisher.clone();
        let options = self.cfg.options.clone();
        let stats = self.stats.clone();
        let mut shutdown = shutdown.clone();
        let task = tokio::spawn(async move {
            for (dataset, changes) in datasets {
                match publish_all(
                    publisher.as_ref(),
                    &dataset,
                    changes,
                    &options,
                    &stats,
                    &mut shutdown,
                )
                .await?
                {
                    Published::Done => {}
                    Published::Stopped => return Ok(Published::Stopped),
                }
            }
            Ok(Published::Done)
        });
        InFlight {
            task,
            group: Sent {
                transactions,
                end_lsn,
            },
        }
    }

    /// Takes a launched publish's result: on success confirms the group's
    /// last commit to the server. `Ok(false)`: stopped by shutdown (nothing
    /// confirmed).
    fn confirm(
        &self,
        sent: Sent,
        done: Result<Result<Published, CdcError>, tokio::task::JoinError>,
        client: &ReplicationClient,
        progress: &mut Progress<'_>,
    ) -> Result<bool, CdcError> {
        match done.map_err(|e| CdcError::Stream(format!("the publishing task failed: {e}")))?? {
            Published::Done => {}
            Published::Stopped => return Ok(false),
        }
        client.update_applied_lsn(Lsn(sent.end_lsn));
        *progress.published_upto = (*progress.published_upto).max(sent.end_lsn);
        progress.acked = progress.acked.max(sent.end_lsn);
        CdcStats::add(&self.stats.transactions, sent.transactions);
        self.stats
            .last_commit_lsn
            .store(sent.end_lsn, Ordering::Relaxed);
        self.stats
            .acked_lsn
            .store(progress.acked, Ordering::Relaxed);
        Ok(true)
    }

    /// Publishes and confirms everything: the publish in flight, then the
    /// group. `Ok(false)`: stopped by shutdown.
    async fn flush(
        &self,
        inflight: &mut Option<InFlight>,
        group: &mut Group,
        client: &ReplicationClient,
        progress: &mut Progress<'_>,
        shutdown: &mut Shutdown,
    ) -> Result<bool, CdcError> {
        if !self.settle(inflight, client, progress).await? {
            return Ok(false);
        }
        if group.is_empty() {
            return Ok(true);
        }
        let mut next = Some(self.launch(group, shutdown));
        self.settle(&mut next, client, progress).await
    }

    /// Waits for the publish in flight, if any, and confirms it
    /// ([`Self::confirm`]); `Ok(true)` when none was in flight.
    async fn settle(
        &self,
        inflight: &mut Option<InFlight>,
        client: &ReplicationClient,
        progress: &mut Progress<'_>,
    ) -> Result<bool, CdcError> {
        match inflight.take() {
            Some(f) => {
                let done = f.task.await;
                self.confirm(f.group, done, client, progress)
            }
            None => Ok(true),
        }
    }

    /// Applies one decoded message to the open transaction.
    fn apply(
        &self,
        msg: Message,
        tables: &[Table],
        relations: &mut HashMap<u32, Option<(usize, Shape)>>,
        txn: Option<&mut Txn>,
    ) -> Result<(), CdcError> {
        let rel_of = |relations: &HashMap<u32, Option<(usize, Shape)>>,
                      rel: u32|
         -> Result<Option<(usize, Shape)>, CdcError> {
            match relations.get(&rel) {
                Some(r) => Ok(r.clone()),
                None => Err(CdcError::Stream(format!(
                    "a change of relation {rel} arrived before its Relation message"
                ))),
            }
        };
        match msg {
            Message::Relation(r) => {
                let mapped = match tables.iter().position(|t| t.info.oid == r.oid) {
                    Some(i) => {
                        let m = &tables[i].info.mapping;
                        if r.namespace != m.schema || r.name != m.table {
                            return Err(CdcError::Config(format!(
                                "table {} was renamed to {}: update dataset '{}''s table mapping, then restart (with --resnapshot if rows changed meanwhile)",
                                m.qualified(),
                                r.qualified(),
                                m.dataset
                            )));
                        }
                        let columns: Vec<(String, u32)> =
                            r.columns.iter().map(|c| (c.name.clone(), c.type_oid)).collect();
                        let shape = Shape::build(
                            m,
                            &self.manifest.datasets[&m.dataset],
                            &self.manifest,
                            &columns,
                        )?;
                        Some((i, shape))
                    }
                    None => {
                        if let Some(t) = tables.iter().find(|t| t.info.mapping.qualified() == r.qualified()) {
                            return Err(CdcError::Config(format!(
                                "table {} (dataset '{}') was dropped and created again (new oid {}): its rows must be snapshotted again; run with --resnapshot",
                                r.qualified(),
                                t.info.mapping.dataset,
                                r.oid
                            )));
                        }
                        tracing::debug!("cdc ignores changes of unmapped table {}", r.qualified());
                        None
                    }
                };
                relations.insert(r.oid, mapped);
            }
            Message::Insert { rel, new } => {
                if let Some((i, shape)) = rel_of(relations, rel)? {
                    let row = shape.row(&new)?;
                    need_txn(txn)?.upsert(i, row, None);
                }
            }
            Message::Update { rel, old, new } => {
                if let Some((i, shape)) = rel_of(relations, rel)? {
                    let row = shape.row(&new)?;
                    let txn = need_txn(txn)?;
                    let mut full_old = None;
                    if let Some((kind, old)) = &old {
                        if let Some(old_key) = shape.key_of(old) {
                            if old_key != row.key {
                                txn.delete(i, old_key, row.version);
                            }
                        }
                        if *kind == OldKind::Full {
                            full_old = shape.row(old).ok();
                        }
                    }
                    txn.upsert(i, row, full_old);
                }
            }
            Message::Delete { rel, old: (_, old) } => {
                if let Some((i, shape)) = rel_of(relations, rel)? {
                    let table = &tables[i].info.mapping;
                    let key = shape.key_of(&old).ok_or_else(|| CdcError::ReplicaIdentity {
                        table: table.qualified(),
                        message: format!(
                            "a DELETE arrived without a value for key column '{}' in its old row (the table's REPLICA IDENTITY does not cover it). Run: ALTER TABLE {} REPLICA IDENTITY FULL",
                            table.key,
                            table.sql_name()
                        ),
                    })?;
                    let version = match &table.version {
                        None => None,
                        Some(v) => {
                            let old_version = shape.version_of(&key, &old)?.ok_or_else(|| {
                                CdcError::ReplicaIdentity {
                                    table: table.qualified(),
                                    message: format!(
                                        "a DELETE of key '{key}' arrived without version column '{v}' in its old row. Run: ALTER TABLE {} REPLICA IDENTITY FULL",
                                        table.sql_name()
                                    ),
                                }
                            })?;
                            Some(old_version + 1)
                        }
                    };
                    need_txn(txn)?.delete(i, key, version);
                }
            }
            Message::Truncate { rels, .. } => {
                for rel in rels {
                    if let Some(Some((i, _))) = relations.get(&rel) {
                        return Err(CdcError::Truncate {
                            table: tables[*i].info.mapping.qualified(),
                        });
                    }
                    if let Some(t) = tables.iter().find(|t| t.info.oid == rel) {
                        return Err(CdcError::Truncate {
                            table: t.info.mapping.qualified(),
                        });
                    }
                }
            }
            Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => {}
            Message::Begin { .. } | Message::Commit { .. } => {
                return Err(CdcError::Stream(
                    "a raw Begin/Commit reached the decoder; pgwire-replication should have turned it into an event".into(),
                ))
            }
        }
        Ok(())
    }
}

/// Where the stream stands: the position confirmed to the server, and the
/// last commit the feed holds (a new session starts at or after it).
struct Progress<'a> {
    acked: u64,
    published_upto: &'a mut u64,
}

/// What a launched publish will confirm once it succeeds.
struct Sent {
    transactions: u64,
    /// End LSN of the group's last transaction.
    end_lsn: u64,
}

/// A group being published on its own task.
struct InFlight {
    task: tokio::task::JoinHandle<Result<Published, CdcError>>,
    group: Sent,
}

/// Waits for the publish in flight, if any (forever otherwise), for a
/// branch of the stream's `select!`.
async fn in_flight(
    f: &mut Option<InFlight>,
) -> Result<Result<Published, CdcError>, tokio::task::JoinError> {
    match f {
        Some(f) => (&mut f.task).await,
        None => std::future::pending().await,
    }
}

/// Committed transactions not yet published: per dataset, their changes
/// in commit order (a key changed by several of them appears once per
/// transaction, oldest first, so the feed keeps commit order per key).
#[derive(Default)]
struct Group {
    datasets: BTreeMap<String, Vec<ChangeInput>>,
    rows: usize,
    transactions: u64,
    /// End LSN of the last transaction: what to confirm once published.
    end_lsn: u64,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    fn add(&mut self, changes: Vec<(String, Vec<ChangeInput>)>, rows: usize, end_lsn: u64) {
        for (dataset, c) in changes {
            self.datasets.entry(dataset).or_default().extend(c);
        }
        self.rows += rows;
        self.transactions += 1;
        self.end_lsn = end_lsn;
    }
}

/// A committed transaction's changes per dataset, versioned by `end_lsn`
/// where the table has no version column.
fn committed_changes(
    txn: Txn,
    end_lsn: u64,
    tables: &[Table],
) -> Result<Vec<(String, Vec<ChangeInput>)>, CdcError> {
    let mut out = Vec::with_capacity(txn.tables.len());
    for (i, keys) in txn.tables {
        let table = &tables[i].info.mapping;
        let mut changes = Vec::with_capacity(keys.len());
        for (key, p) in keys {
            let mut change = match p {
                Pending::Upsert {
                    version,
                    fields,
                    missing,
                } => {
                    if let Some(column) = missing.into_iter().next() {
                        return Err(CdcError::Toast {
                            table: table.qualified(),
                            key,
                            column,
                        });
                    }
                    ChangeInput::upsert(key, version.unwrap_or(end_lsn), fields)
                }
                Pending::Delete { version } => ChangeInput::delete(key, version.unwrap_or(end_lsn)),
            };
            change.ts = Some(txn.commit_ms);
            changes.push(change);
        }
        out.push((table.dataset.clone(), changes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::TableMapping;
    use crate::feed::memory::MemoryFeed;
    use crate::feed::sqlite::SqliteFeed;

    const MANIFEST: &str = r#"
[services.catalog]
[datasets.products]
owner = "catalog"
key = "id"
fields = { name = "string" }
"#;

    fn config(batch: Option<usize>) -> CdcConfig {
        let table = TableMapping::new("products", "public.products", "id", None).unwrap();
        let mut cfg = CdcConfig::new("host=unused", "p", "s", vec![table]);
        cfg.options.batch = batch;
        cfg
    }

    #[test]
    fn the_group_limit_is_the_configured_one_else_the_publishers_preference() {
        let m = Arc::new(Manifest::parse("m.toml", MANIFEST).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let sqlite: Arc<dyn Publisher> =
            Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &m).unwrap());
        let memory: Arc<dyn Publisher> = Arc::new(MemoryFeed::new(&m));
        let limit = |batch, publisher: &Arc<dyn Publisher>| {
            CdcSource::new(config(batch), m.clone(), publisher.clone())
                .unwrap()
                .cfg
                .options
                .batch()
        };
        assert_eq!(limit(None, &sqlite), crate::feed::STORE_GROUP);
        assert_eq!(limit(None, &memory), crate::feed::DEFAULT_GROUP);
        assert_eq!(limit(Some(700), &sqlite), 700);
        for bad in [0, crate::feed::MAX_BATCH + 1] {
            let e = CdcSource::new(config(Some(bad)), m.clone(), sqlite.clone())
                .err()
                .expect("out of range");
            assert!(e.to_string().contains("batch must be 1..="), "{e}");
        }
    }
}
