//! CDC: an owner's PostgreSQL tables become dataset changes, read from the
//! write-ahead log through logical replication (`pgoutput`), for owners who
//! will not touch their write path (the `cdc` strategy).
//!
//! ```text
//!  owner's PostgreSQL                                    spoke cdc                        feed
//!  ┌─────────────────────────────┐  setup   ┌───────────────────────────────────┐
//!  │ tables  ─▶ publication P    │◀─────────│ check tables, identity, types     │
//!  │ slot S (pgoutput)           │          │ create P, S; spoke_cdc_state      │
//!  │ spoke_cdc_state (progress)  │          └───────────────┬───────────────────┘
//!  │                             │ snapshot                 ▼
//!  │  SELECT … WHERE key > last  │─────────▶ chunk ─▶ publish(version = C) ─▶ state.last_key ──▶ Publisher
//!  │  ORDER BY key LIMIT n       │                                                            (hub or
//!  │                             │ stream (from S's confirmed position)                        JetStream)
//!  │  WAL ─▶ walsender ─▶ pgoutput│─────────▶ Begin … Relation/Insert/Update/Delete … Commit
//!  └─────────────────────────────┘           coalesce per key ─▶ group ─▶ publish(version = commit end LSN)
//!             ▲                                                   │ every batch accepted
//!             └──────────── ack (confirmed_flush_lsn) ◀───────────┘
//! ```
//!
//! # Contract
//! - **Never lose, never skip.** The slot's confirmed position advances only
//!   to the end of a transaction whose changes the publisher accepted (every
//!   batch), or to a keepalive / heartbeat position while no transaction is
//!   in flight. A crash at any instant replays from the confirmed position;
//!   the feed ignores versions it already holds, so nothing doubles.
//! - **Versions.** From the dataset's version column when configured (an
//!   integer the owner bumps in the same transaction; a delete gets the old
//!   row's version + 1, so the table needs REPLICA IDENTITY FULL), else the
//!   LSN of the end of the transaction's commit record. That LSN is unique per
//!   transaction and increases in commit order; several changes to one key in
//!   one transaction are coalesced (the last wins) so each (key, version) is
//!   published once.
//! - **Transactions.** A transaction is buffered until its Commit, then
//!   published per dataset in batches of at most `batch` changes, in order.
//!   A very large transaction is therefore several batches: a crash between
//!   them leaves a prefix in the feed that the replay completes. Consecutive
//!   committed transactions that have already arrived are published
//!   together (group commit, up to `batch` changes: one feed transaction,
//!   one fsync) and acknowledged at the last one's end; the source never
//!   waits for more to arrive (see [`source`]).
//! - **Initial snapshot consistent with the stream** (decided here):
//!   the slot is created first; its consistent point `C` is stored in
//!   `spoke_cdc_state`. Then each table is read in key-ordered chunks
//!   (`WHERE key > last ORDER BY key LIMIT n`, one short READ COMMITTED
//!   statement each: no long transaction, no lock beyond a statement),
//!   published with version `C` (or the row's version column), and the last
//!   key of each finished chunk is stored, so a crash resumes at the next
//!   chunk. Only then does streaming start, from `C`. Every transaction
//!   that commits after `C` is streamed with a version (commit end LSN)
//!   strictly greater than `C`, so a snapshot value never overwrites a
//!   streamed one, and rows written during the snapshot are never lost.
//!   Trade-off, in LSN mode: a chunk read after `C` may show a row in a state
//!   newer than `C` (at version `C`); the stream then replays that row's later
//!   changes, so the copy converges, but during the first snapshot a reader
//!   may briefly see such a row step back and forward again. With a version
//!   column there is no such effect. Before reading, the snapshot waits for
//!   the transactions that were in progress when the slot was created, so a
//!   transaction that committed just before `C` is visible to every chunk.
//! - **Slot lost or dropped** behind Spoke's back (the state says the slot
//!   existed, but it is gone or `wal_status = 'lost'`): [`CdcError::SlotLost`]
//!   with the recovery path (`spoke cdc --resnapshot`), never a silent resume
//!   with a gap. A slot Spoke has no state for is never adopted.
//! - **Schema changes.** Every Relation message is compared with the dataset:
//!   added columns pass; a declared field whose column was dropped or retyped
//!   to an incompatible type stops the source with [`CdcError::Schema`]
//!   naming table, column and the consumers projecting it. The transaction
//!   carrying it is neither published nor acknowledged.
//! - **Row images.** An unchanged TOASTed column (`u`) takes its value from
//!   the old image (REPLICA IDENTITY FULL) or an earlier change of the same
//!   key in the same transaction; otherwise [`CdcError::Toast`] tells the user
//!   to set REPLICA IDENTITY FULL. A delete whose old image lacks the key
//!   column is [`CdcError::ReplicaIdentity`]. TRUNCATE is [`CdcError::Truncate`]
//!   (it has no per-key form; resnapshot).
//! - **Idle tables do not pin WAL**: keepalive positions are acknowledged
//!   when no transaction is in flight, and an optional heartbeat writes a
//!   non-transactional logical message so the position moves even when the
//!   owner's database writes nothing. Retained WAL and lag are measured
//!   every `status_every` (also during the snapshot), logged, kept in
//!   [`CdcStats`] and served as Prometheus metrics ([`metrics`]), with a
//!   warning and `spoke_cdc_retained_wal_alarm` above `wal_alarm_bytes`.
//!
//! # Layout
//! - [`pgoutput`]: the pgoutput message decoder.
//! - [`convert`]: column text → JSON field values; type compatibility.
//! - [`shape`]: table columns ↔ dataset fields, checked (rule 7).
//! - [`slot`]: catalog checks, publication, slot, and the state table.
//! - [`snapshot`]: the chunked, resumable initial snapshot.
//! - [`source`]: [`CdcSource`], which runs setup, snapshot and stream.
//! - [`metrics`]: the source's Prometheus metrics (`GET /metrics`).
//! - [`file`]: the `spoke cdc` config file.

pub mod convert;
pub mod file;
pub mod metrics;
pub mod pgoutput;
pub mod shape;
pub mod slot;
pub mod snapshot;
pub mod source;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::feed::FeedError;

pub use source::CdcSource;

/// One dataset captured from one owner table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMapping {
    /// The manifest's dataset.
    pub dataset: String,
    /// `schema.table` (unquoted; `public` when no schema is given).
    pub schema: String,
    pub table: String,
    /// The column whose text is the record key.
    pub key: String,
    /// An integer column the owner bumps on every write; `None`: versions
    /// are commit LSNs.
    pub version: Option<String>,
}

impl TableMapping {
    /// Parses `D=schema.table:keycol[:versioncol]` (the CLI flag form).
    pub fn parse_flag(s: &str) -> Result<TableMapping, CdcError> {
        let bad = |why: &str| {
            CdcError::Config(format!(
                "--dataset '{s}': {why} (expected DATASET=schema.table:keycol[:versioncol])"
            ))
        };
        let (dataset, rest) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
        let mut parts = rest.split(':');
        let table = parts.next().filter(|t| !t.is_empty());
        let key = parts.next().filter(|k| !k.is_empty());
        let version = parts.next().map(str::to_owned);
        if parts.next().is_some() {
            return Err(bad("too many ':'"));
        }
        let (Some(table), Some(key)) = (table, key) else {
            return Err(bad("table and key column are required"));
        };
        TableMapping::new(dataset, table, key, version)
    }

    pub fn new(
        dataset: &str,
        table: &str,
        key: &str,
        version: Option<String>,
    ) -> Result<TableMapping, CdcError> {
        let (schema, table) = match table.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("public", table),
        };
        for (what, name) in [("schema", schema), ("table", table), ("key column", key)]
            .into_iter()
            .chain(version.as_deref().map(|v| ("version column", v)))
        {
            if name.is_empty() || name.contains('"') || name.contains('\0') {
                return Err(CdcError::Config(format!(
                    "dataset '{dataset}': {what} name '{name}' is empty or contains a quote"
                )));
            }
        }
        if dataset.is_empty() {
            return Err(CdcError::Config("a dataset name is empty".into()));
        }
        Ok(TableMapping {
            dataset: dataset.to_owned(),
            schema: schema.to_owned(),
            table: table.to_owned(),
            key: key.to_owned(),
            version,
        })
    }

    /// `schema.table` for messages.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// `"schema"."table"` for SQL.
    pub fn sql_name(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.table))
    }
}

/// Quotes an SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// How the source runs.
#[derive(Debug, Clone)]
pub struct CdcOptions {
    /// Most changes per publish (≤ [`crate::feed::MAX_BATCH`]); `None`:
    /// what the publisher prefers ([`crate::feed::Publisher::preferred_batch`]).
    pub batch: Option<usize>,
    /// Rows per snapshot chunk.
    pub snapshot_chunk: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often the acknowledged position reaches the server at most.
    pub ack_interval: Duration,
    /// How often retained WAL and lag are measured and logged.
    pub status_every: Duration,
    /// Write a non-transactional logical message this often, so an idle
    /// database still moves the slot; `None`: rely on keepalives.
    pub heartbeat: Option<Duration>,
    /// Warn when the slot retains more WAL than this.
    pub wal_alarm_bytes: u64,
    /// Drop the slot and state and start over with a new snapshot.
    pub resnapshot: bool,
}

impl CdcOptions {
    /// The group limit in force: the configured one, else the default
    /// (the source fills in its publisher's preference when it is built).
    pub fn batch(&self) -> usize {
        self.batch.unwrap_or(crate::feed::DEFAULT_GROUP)
    }
}

impl Default for CdcOptions {
    fn default() -> Self {
        CdcOptions {
            batch: None,
            snapshot_chunk: 5_000,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            ack_interval: Duration::from_millis(200),
            status_every: Duration::from_secs(10),
            heartbeat: Some(Duration::from_secs(30)),
            wal_alarm_bytes: 1 << 30,
            resnapshot: false,
        }
    }
}

/// Where the owner's changes come from and how.
#[derive(Debug, Clone)]
pub struct CdcConfig {
    /// libpq-style connection string or URL of the owner's database.
    pub postgres: String,
    pub publication: String,
    pub slot: String,
    /// `schema.table` of the progress table in the owner's database.
    pub state_table: String,
    pub tables: Vec<TableMapping>,
    pub options: CdcOptions,
}

impl CdcConfig {
    pub fn new(postgres: &str, publication: &str, slot: &str, tables: Vec<TableMapping>) -> Self {
        CdcConfig {
            postgres: postgres.to_owned(),
            publication: publication.to_owned(),
            slot: slot.to_owned(),
            state_table: "public.spoke_cdc_state".to_owned(),
            tables,
            options: CdcOptions::default(),
        }
    }

    /// Checks names before anything touches the database.
    pub fn validate(&self) -> Result<(), CdcError> {
        let simple = |what: &str, s: &str| {
            if s.is_empty()
                || s.len() > 63
                || !s
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                Err(CdcError::Config(format!(
                    "{what} '{s}' must be 1-63 characters of a-z, 0-9 and _"
                )))
            } else {
                Ok(())
            }
        };
        simple("slot name", &self.slot)?;
        simple("publication name", &self.publication)?;
        let (schema, table) = self
            .state_table
            .split_once('.')
            .unwrap_or(("public", &self.state_table));
        simple("state table schema", schema)?;
        simple("state table", table)?;
        if self.tables.is_empty() {
            return Err(CdcError::Config("no dataset is mapped to a table".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tables {
            if !seen.insert(t.qualified()) {
                return Err(CdcError::Config(format!(
                    "table {} is mapped to more than one dataset",
                    t.qualified()
                )));
            }
        }
        if matches!(self.options.batch, Some(b) if b == 0 || b > crate::feed::MAX_BATCH) {
            return Err(CdcError::Config(format!(
                "batch must be 1..={}",
                crate::feed::MAX_BATCH
            )));
        }
        if self.options.snapshot_chunk == 0 {
            return Err(CdcError::Config("snapshot_chunk must be positive".into()));
        }
        Ok(())
    }

    /// The state table as quoted SQL.
    pub fn state_sql(&self) -> String {
        let (schema, table) = self
            .state_table
            .split_once('.')
            .unwrap_or(("public", &self.state_table));
        format!("{}.{}", ident(schema), ident(table))
    }
}

/// Why the CDC source stopped, classified by what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CdcError {
    /// Bad configuration: fix it.
    #[error("cdc config: {0}")]
    Config(String),
    /// The owner's database cannot be reached or failed: retried with backoff.
    #[error("owner database unavailable: {0}")]
    Unavailable(String),
    /// Another process holds the slot or the source's lock: retried.
    #[error("busy: {0}")]
    Busy(String),
    /// The database refused something that retrying will not fix.
    #[error("owner database: {0}")]
    Postgres(String),
    #[error("replication slot '{slot}' is gone or unusable ({reason}) although the snapshot and stream used it: changes made since its last confirmed position may be lost, so Spoke will not resume with a gap. Recover by taking a new snapshot: run `spoke cdc … --resnapshot` (drops the slot and its state, creates a new slot and republishes every row at a newer version)")]
    SlotLost { slot: String, reason: String },
    #[error("replication slot '{slot}' exists but {state_table} has no record of it, so Spoke cannot know what it already published. Drop it (SELECT pg_drop_replication_slot('{slot}')) if it is a leftover, choose another slot name, or run with --resnapshot")]
    SlotUnknown { slot: String, state_table: String },
    #[error("dataset '{dataset}' is not part of slot '{slot}''s snapshot (it was added to the configuration later): run with --resnapshot to snapshot every dataset again")]
    NewDataset { dataset: String, slot: String },
    /// A declared field no longer matches the table (rule 7).
    #[error("schema change on table {table}: {message}{}; the change that carries it and everything after it is neither published nor acknowledged. Update the manifest (dataset '{dataset}', schema version {schema_version}) or revert the table, then restart", consumers_text(consumers))]
    Schema {
        dataset: String,
        schema_version: u32,
        table: String,
        column: String,
        message: String,
        consumers: Vec<String>,
    },
    #[error("table {table}: {message}")]
    ReplicaIdentity { table: String, message: String },
    #[error("TRUNCATE of table {table} cannot be captured as per-key deletes; nothing after it was published. Recover with `spoke cdc … --resnapshot`")]
    Truncate { table: String },
    #[error("table {table}, key '{key}': column '{column}' is an unchanged TOASTed value that the change does not carry and no earlier image in the transaction has; run ALTER TABLE {table} REPLICA IDENTITY FULL so updates carry the old row")]
    Toast {
        table: String,
        key: String,
        column: String,
    },
    #[error("table {table}, key '{key}', column '{column}': {message}")]
    Value {
        table: String,
        key: String,
        column: String,
        message: String,
    },
    #[error("the feed rejected a change of dataset '{dataset}' (key '{key}'): {source}; nothing after it was acknowledged")]
    Rejected {
        dataset: String,
        key: String,
        #[source]
        source: FeedError,
    },
    #[error("replication stream: {0}")]
    Stream(String),
}

fn consumers_text(consumers: &[String]) -> String {
    if consumers.is_empty() {
        String::new()
    } else {
        format!(" (projected by {})", consumers.join(", "))
    }
}

impl CdcError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, CdcError::Unavailable(_) | CdcError::Busy(_))
    }
}

/// Classifies a tokio-postgres error.
pub(crate) fn pg_error(context: &str, e: tokio_postgres::Error) -> CdcError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let msg = format!("{context}: {} (SQLSTATE {code})", db.message());
            // 08 connection, 53 resources, 57P admin shutdown / cannot connect now,
            // 40 serialization / deadlock, 55006 object in use.
            if code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code.starts_with("40")
                || code == "55006"
            {
                CdcError::Unavailable(msg)
            } else {
                CdcError::Postgres(msg)
            }
        }
        None => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            CdcError::Unavailable(format!("{context}: {e}{cause}"))
        }
    }
}

/// What the source has done, readable while it runs (and rendered by
/// [`metrics`] on each scrape).
#[derive(Debug, Default)]
pub struct CdcStats {
    pub transactions: AtomicU64,
    /// Changes accepted and appended by the feed.
    pub published: AtomicU64,
    /// Changes the feed already held (replays).
    pub ignored: AtomicU64,
    /// Publish calls that the feed accepted (changes per publish =
    /// (published + ignored) / publishes).
    pub publishes: AtomicU64,
    pub snapshot_rows: AtomicU64,
    /// End LSN of the last published transaction.
    pub last_commit_lsn: AtomicU64,
    /// The position last handed to the server as confirmed.
    pub acked_lsn: AtomicU64,
    /// WAL the slot retains (current WAL − restart_lsn), bytes.
    pub retained_wal_bytes: AtomicU64,
    /// current WAL − confirmed_flush_lsn, bytes.
    pub lag_bytes: AtomicU64,
    /// The slot's confirmed_flush_lsn, as last measured.
    pub confirmed_flush_lsn: AtomicU64,
    /// When the slot was last measured, Unix ms; 0: not yet.
    pub slot_measured_ms: AtomicU64,
    /// The slot's `wal_status`, as last measured.
    pub wal_status: Mutex<Option<String>>,
    /// The slot was found gone or invalidated ([`CdcError::SlotLost`]).
    pub slot_lost: AtomicBool,
    /// The source stopped with a definite error (it needs a person).
    pub stopped: AtomicBool,
    pub reconnects: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Per dataset: changes the feed appended and ignored.
    pub datasets: Mutex<BTreeMap<String, DatasetCounts>>,
}

/// One dataset's changes, as the feed answered them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DatasetCounts {
    pub published: u64,
    pub ignored: u64,
}

impl CdcStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts one accepted publish of `dataset`.
    pub(crate) fn count_publish(&self, dataset: &str, published: u64, ignored: u64) {
        Self::add(&self.published, published);
        Self::add(&self.ignored, ignored);
        Self::add(&self.publishes, 1);
        let mut datasets = self.datasets.lock().expect("cdc stats");
        let counts = datasets.entry(dataset.to_owned()).or_default();
        counts.published += published;
        counts.ignored += ignored;
    }

    /// Per dataset counts, in name order.
    pub fn dataset_counts(&self) -> BTreeMap<String, DatasetCounts> {
        self.datasets.lock().expect("cdc stats").clone()
    }

    /// Whether the slot has not been measured for `every` (or ever).
    pub(crate) fn slot_measure_due(&self, every: Duration) -> bool {
        let last = Self::get(&self.slot_measured_ms);
        last == 0 || crate::clock::now_ms().saturating_sub(last) >= every.as_millis() as u64
    }
}

/// Snapshot progress, reported per finished chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotProgress {
    pub dataset: String,
    pub table: String,
    pub rows_done: u64,
    /// The planner's estimate of the table's rows, when it has one.
    pub rows_estimate: Option<u64>,
    pub finished: bool,
}

/// Formats an LSN as PostgreSQL does (`16/B374D848`).
pub fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `16/B374D848`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dataset_flags() {
        let m = TableMapping::parse_flag("products=shop.products:id:version").unwrap();
        assert_eq!(
            (
                m.dataset.as_str(),
                m.schema.as_str(),
                m.table.as_str(),
                m.key.as_str()
            ),
            ("products", "shop", "products", "id")
        );
        assert_eq!(m.version.as_deref(), Some("version"));
        let m = TableMapping::parse_flag("c=customers:id").unwrap();
        assert_eq!((m.schema.as_str(), m.version), ("public", None));
        for bad in ["c", "c=t", "c=:id", "c=t:id:v:x", "c=t\":id"] {
            assert!(TableMapping::parse_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(fmt_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("x"), None);
    }

    #[test]
    fn validates_names() {
        let t = vec![TableMapping::parse_flag("c=t:id").unwrap()];
        let mut c = CdcConfig::new("host=x", "spoke_pub", "spoke_slot", t);
        c.validate().unwrap();
        c.slot = "Bad-Slot".into();
        assert!(c.validate().unwrap_err().to_string().contains("slot name"));
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
