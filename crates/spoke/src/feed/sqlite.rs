//! The embedded feed: a durable log per dataset, and beside it the compacted
//! state folded from that log, served by `spoke hub`.
//!
//! ```text
//!  hub.db (synchronous=FULL)            hub.state.db (synchronous=NORMAL)
//!  publish(batch) ─▶ BEGIN IMMEDIATE
//!     per change: latest version of its key (unfolded map, else `state`)
//!                 newer ─▶ INSERT INTO log
//!  COMMIT (fsync) ─▶ unfolded map + rows queued for the folder ─▶ head watch ─▶ wakes long-polls
//!  folder thread, every 100 ms or when a reader waits:
//!     rows (folded, head] (queued, else read from the log), newest per key,
//!     UPSERT state, XOR digest (old value: the key's base), folded = head
//!     in one transaction ─▶ folded watch
//! ```
//!
//! **Why two files.** A publish must be durable when it returns; the
//! compacted state need not be, because it is a function of the log. Keeping
//! the state in the publish transaction cost about 1.5 random page writes
//! per change (a state row and a bucket-index entry per key, on pages spread
//! over the whole table), fsynced with every publish: on a small machine
//! that, not CPU, bounded the hub. Now a publish appends log rows only
//! (contiguous pages) and hands them to a folder thread, which folds them
//! into the state in batches, in its own file, so its writes never wait on the log's fsync and
//! the log's commit never carries them. A larger batch touches fewer pages
//! per change, so the folder gets cheaper as load grows.
//!
//! **What stays exact.**
//! - *Versions.* A publish looks each key up first in the unfolded map
//!   (every key with a change past the folded position, its newest version)
//!   and only then in `state`; the folder removes a key from the map only
//!   after its fold committed, and only if no newer change arrived since.
//!   A publish decides its whole batch under the map's lock, reading the
//!   state from one snapshot begun under that lock, so a key is either
//!   still in the map or already in the snapshot.
//!   So the apply rule sees the same latest version it would see with the
//!   state in the publish transaction.
//! - *Reads of the state* (snapshots, digests, bucket entries, records) first
//!   wait until the state is folded through the head they observed, asking
//!   the folder to fold at once. They see every change published before
//!   they were asked, as before.
//! - *Crashes.* `state_folds.through` is written in the fold's transaction.
//!   At open, whatever the log holds past it is folded before the feed
//!   serves; a lost state file is rebuilt from the log, and one that claims
//!   more than the log holds (a log restored from an older backup) is
//!   cleared and rebuilt.
//! - *Digests.* Each unfolded key carries its base: its value in the state
//!   before its unfolded changes, found by the publish that looked its
//!   version up. The folder XORs the base out and the newest change in, then
//!   makes that change the base of a key changed again past the chunk; a
//!   publish whose key was folded while it ran takes the folded change as
//!   the base. Without a base (after a restart) the folder looks it up.
//! - *Back-pressure.* At most [`MAX_UNFOLDED`] keys wait unfolded; beyond
//!   that a publish waits for the folder, so memory stays bounded when the
//!   disk cannot keep up (queued rows are capped too, and read back from
//!   the log past the cap).
//!
//! The state's digest (see [`spoke_core::digest`]) lives in the state file's
//! `digest` table as 64 chunks of 64 bucket hashes per dataset, updated in the
//! fold's transaction from each key's old and new `(version, deleted)`;
//! Each dataset's state is its own table (`state_<n>`, named in
//! `state_tables`), keyed by key alone; its `bucket` column and covering
//! index `state_<n>_entries (bucket, key, version, op)` list a bucket's keys
//! from a few contiguous index pages.
//!
//! **Fields are stored once**, in the log. A state row holds a key's
//! version, tombstone flag, bucket and the position of its latest change;
//! snapshots and records join it to that log entry (the state's readers
//! attach the log file). Narrow rows keep the fold and the publishes'
//! version look-ups on fewer pages.
//!
//! The folder thread also checkpoints the log's WAL every 500 ms
//! (`wal_checkpoint(PASSIVE)`, its own connection), so no publish waits for
//! WAL pages to be copied into the database file.
//!
//! SQLite was chosen because it is embedded (no server to run), its WAL gives
//! concurrent readers beside the single writer, and batched commits reach
//! hundreds of thousands of rows per second on a small machine. The log is
//! kept whole. Writes to the log go through one connection behind a mutex
//! (SQLite allows one writer anyway); reads use small pools of read
//! connections, one per file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use spoke_core::digest::{bucket_of, DigestDelta, DigestEntry, DigestNodes, DigestQuery};
use spoke_core::{decide, Change, Decision, Manifest, Op, Schema};
use tokio::sync::watch;

use super::{
    check_after_key, check_digest_request, Catalog, ChangeInput, Feed, FeedBatch, FeedEntry,
    FeedError, Position, PublishReceipt, Publisher, SnapshotPage, MAX_PAGE,
};
use crate::clock::Clock;
use crate::copy::sqlite::{read_digest, write_digest_delta};

/// Page cache of each connection that reads or writes the state, in KiB.
const STATE_CACHE_KIB: i64 = 64 * 1024;
/// WAL pages after which a log commit checkpoints itself, should the folder
/// thread fall behind (SQLite's default: 1,000).
const WAL_BACKSTOP_PAGES: i64 = 16_000;
/// How often the folder thread copies the log's WAL into its database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// How long the folder lets changes gather between folds when no reader is
/// waiting for one: fewer, larger folds touch fewer pages per change.
const FOLD_PAUSE: Duration = Duration::from_millis(100);
/// Most log positions folded in one state transaction.
const FOLD_CHUNK: i64 = 50_000;
/// Most keys with unfolded changes; a publish beyond it waits for the folder.
pub const MAX_UNFOLDED: usize = 200_000;
/// Most published rows held in memory for the folder; past it, batches are
/// left for the folder to read from the log.
const MAX_QUEUED: usize = 200_000;
/// How long a read of the state waits for the folder before giving up.
const FOLD_WAIT: Duration = Duration::from_secs(60);

const LOG_SQL: &str = "
CREATE TABLE IF NOT EXISTS log_tables (
    dataset TEXT PRIMARY KEY,
    n INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS log_identity (id TEXT NOT NULL);
";

/// The columns of a dataset's log table after `pos`, in order.
const LOG_COLUMNS: &str = "key, version, op, fields, owner, ts, schema_version";

const STATE_SQL: &str = "
CREATE TABLE IF NOT EXISTS state_tables (
    dataset TEXT PRIMARY KEY,
    n INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS digest (
    dataset TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    hashes BLOB NOT NULL,
    PRIMARY KEY (dataset, chunk)
);
CREATE TABLE IF NOT EXISTS state_folds (
    dataset TEXT PRIMARY KEY,
    through INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS state_of_log (id TEXT NOT NULL);
";

/// The state file's layout (`PRAGMA user_version`). A file with another
/// is emptied and folded again from the log at open: the state is derived
/// data, so changing its tables needs no migration.
const STATE_LAYOUT: i64 = 4;

/// Makes `conn`'s state file hold [`STATE_LAYOUT`], emptying it if it held
/// another layout.
fn prepare_state(conn: &Connection) -> rusqlite::Result<()> {
    let layout: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if layout != STATE_LAYOUT {
        let tables: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if !tables.is_empty() {
            tracing::info!(
                layout,
                "hub store: the state file has another layout; folding it again from the log"
            );
        }
        // Everything in the file is derived from the log.
        conn.execute_batch("BEGIN")?;
        for t in tables {
            conn.execute_batch(&format!("DROP TABLE IF EXISTS \"{t}\""))?;
        }
        conn.execute_batch(STATE_SQL)?;
        conn.execute_batch(&format!("PRAGMA user_version = {STATE_LAYOUT}; COMMIT;"))?;
    }
    Ok(())
}

fn unavailable(e: impl std::fmt::Display) -> FeedError {
    FeedError::Unavailable(format!("hub store: {e}"))
}

/// Where the state folded from the log at `log` lives: `hub.db` → `hub.state.db`.
pub fn state_path(log: &Path) -> PathBuf {
    let stem = log
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "hub".into());
    log.with_file_name(format!("{stem}.state.db"))
}

fn open(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

/// A connection to the state file with a cache for random key look-ups.
fn open_state(path: &Path) -> rusqlite::Result<Connection> {
    // NORMAL: a commit is not fsynced. A power loss may take the newest
    // folds back, together with the `state_folds` row that counted them,
    // and they are folded again from the (fsynced) log at the next open.
    let conn = open(path, "NORMAL")?;
    conn.pragma_update(None, "cache_size", -STATE_CACHE_KIB)?;
    conn.pragma_update(None, "mmap_size", 1i64 << 30)?;
    Ok(conn)
}

fn row_to_change(dataset: &str, row: &rusqlite::Row<'_>) -> rusqlite::Result<Change> {
    let op: String = row.get("op")?;
    let fields: String = row.get("fields")?;
    Ok(Change {
        dataset: dataset.to_owned(),
        key: row.get("key")?,
        version: row.get::<_, i64>("version")? as u64,
        op: if op == "delete" {
            Op::Delete
        } else {
            Op::Upsert
        },
        fields: serde_json::from_str(&fields).unwrap_or_default(),
        owner: row.get("owner")?,
        ts: row.get::<_, i64>("ts")? as u64,
        schema_version: row.get("schema_version")?,
    })
}

/// The newest change of a key past the folded position.
#[derive(Debug, Clone, Copy)]
struct Latest {
    version: u64,
    deleted: bool,
    pos: Position,
    /// The key's `(version, deleted)` in the state as folded so far (`None`:
    /// not there), found by the publish that first saw it unfolded: the
    /// folder XORs it out of the digest without looking it up again.
    base: Option<(u64, bool)>,
}

/// Unfolded keys of one dataset. Looked up once or twice per published
/// change, so hashed with foldhash (seeded per map) rather than SipHash.
type KeyMap = foldhash::HashMap<String, Latest>;

/// Every key with a change the folder has not folded yet, per dataset, and
/// the published rows themselves, handed to the folder so that it need not
/// read them back from the log.
#[derive(Default)]
struct Unfolded {
    keys: HashMap<String, KeyMap>,
    /// Per dataset, published rows in position order. A gap (a batch not
    /// queued because the queue was full) is read from the log instead.
    queue: HashMap<String, std::collections::VecDeque<(String, LogRow)>>,
}

impl Unfolded {
    /// Keys with unfolded changes, over all datasets.
    fn count(&self) -> usize {
        self.keys.values().map(KeyMap::len).sum()
    }

    /// Rows waiting in the queue, over all datasets.
    fn queued(&self) -> usize {
        self.queue
            .values()
            .map(std::collections::VecDeque::len)
            .sum()
    }
}

/// A dataset's tables: its log in the hub file ([`log_table`]) and its
/// state in the state file ([`state_table`]).
struct Tables {
    log: String,
    state: String,
}

/// What the publishers, the readers and the folder thread share.
struct Shared {
    /// Each dataset's tables in the log and state files.
    tables: HashMap<String, Tables>,
    unfolded: Mutex<Unfolded>,
    /// Signalled when the folder forgot keys (publishers wait on it).
    drained: Condvar,
    heads: HashMap<String, watch::Sender<Position>>,
    folded: HashMap<String, watch::Sender<Position>>,
    /// Someone waits on a fold: fold now instead of after [`FOLD_PAUSE`].
    urgent: AtomicBool,
    stop: AtomicBool,
    /// Tests hold the folder to see the unfolded path.
    paused: AtomicBool,
    /// [`MAX_UNFOLDED`]; tests lower it.
    max_unfolded: AtomicUsize,
    /// The folder's last error, cleared by its next successful fold.
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn behind(&self) -> bool {
        self.heads
            .iter()
            .any(|(ds, h)| *h.borrow() > *self.folded[ds].borrow())
    }

    fn failure(&self) -> Option<FeedError> {
        self.failure
            .lock()
            .expect("fold failure")
            .as_ref()
            .map(|e| FeedError::Unavailable(format!("hub store: folding the state failed: {e}")))
    }
}

/// One log row as the folder folds it.
#[derive(Debug)]
struct LogRow {
    pos: i64,
    version: i64,
    deleted: bool,
}

/// The rows of `dataset` in `(from, to]`: from the queue while it holds them
/// in order, the rest from the log. Returns them in position order.
fn rows_to_fold(
    shared: &Shared,
    log: &Connection,
    dataset: &str,
    from: i64,
    to: i64,
) -> rusqlite::Result<Vec<(String, LogRow)>> {
    let mut out = Vec::new();
    let mut next = from + 1;
    {
        let mut guard = shared.unfolded.lock().expect("unfolded keys");
        if let Some(q) = guard.queue.get_mut(dataset) {
            // Rows already folded from the log (after a gap) are dropped.
            while q.front().is_some_and(|(_, r)| r.pos < next) {
                q.pop_front();
            }
            while q.front().is_some_and(|(_, r)| r.pos == next && r.pos <= to) {
                out.push(q.pop_front().expect("front"));
                next += 1;
            }
        }
    }
    if next <= to {
        let mut stmt = log.prepare_cached(&format!(
            "SELECT pos, key, version, op = 'delete' FROM {}
             WHERE pos >= ?1 AND pos <= ?2 ORDER BY pos",
            shared.tables[dataset].log
        ))?;
        let mut rows = stmt.query(params![next, to])?;
        while let Some(r) = rows.next()? {
            out.push((
                r.get(1)?,
                LogRow {
                    pos: r.get(0)?,
                    version: r.get(2)?,
                    deleted: r.get(3)?,
                },
            ));
        }
    }
    Ok(out)
}

/// Folds `dataset`'s log past its folded position into the state, in
/// transactions of at most [`FOLD_CHUNK`] positions, until it reaches the
/// head read at the start.
fn fold_dataset(
    shared: &Shared,
    log: &Connection,
    state: &mut Connection,
    dataset: &str,
) -> rusqlite::Result<()> {
    let head = *shared.heads[dataset].borrow() as i64;
    loop {
        let from = *shared.folded[dataset].borrow() as i64;
        if from >= head || shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let to = head.min(from + FOLD_CHUNK);
        // Newest change per key in (from, to], in key order so that the
        // upserts walk the state's B-tree instead of jumping around it.
        let mut newest: BTreeMap<String, LogRow> = BTreeMap::new();
        for (key, row) in rows_to_fold(shared, log, dataset, from, to)? {
            newest.insert(key, row);
        }
        // The state's value of each key before this chunk, as the
        // publishes saw it (absent after a restart: looked up below).
        let bases: Vec<Option<Option<(u64, bool)>>> = {
            let guard = shared.unfolded.lock().expect("unfolded keys");
            let map = guard.keys.get(dataset);
            newest
                .keys()
                .map(|k| map.and_then(|m| m.get(k)).map(|l| l.base))
                .collect()
        };
        let tx = state.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut delta = DigestDelta::new();
        {
            let table = &shared.tables[dataset].state;
            let mut old = tx.prepare_cached(&format!(
                "SELECT version, op = 'delete' FROM {table} WHERE key = ?1"
            ))?;
            let mut upsert = tx.prepare_cached(&format!(
                "INSERT INTO {table} (key, version, op, pos, bucket) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET version = excluded.version, op = excluded.op,
                    pos = excluded.pos"
            ))?;
            for ((key, r), base) in newest.iter().zip(bases) {
                let before = match base {
                    Some(b) => b,
                    None => old
                        .query_row(params![key], |x| {
                            Ok((x.get::<_, i64>(0)? as u64, x.get(1)?))
                        })
                        .optional()?,
                };
                let op = if r.deleted { "delete" } else { "upsert" };
                upsert.execute(params![key, r.version, op, r.pos, bucket_of(key)])?;
                delta.replace(key, before, Some((r.version as u64, r.deleted)));
            }
        }
        write_digest_delta(&tx, "digest", dataset, &delta)?;
        tx.execute(
            "INSERT INTO state_folds (dataset, through) VALUES (?1, ?2)
             ON CONFLICT (dataset) DO UPDATE SET through = excluded.through",
            params![dataset, to],
        )?;
        tx.commit()?;
        // Only now may a publish find these keys in the state instead of
        // the unfolded map; a key changed again meanwhile stays.
        {
            let mut guard = shared.unfolded.lock().expect("unfolded keys");
            if let Some(map) = guard.keys.get_mut(dataset) {
                for (key, r) in &newest {
                    match map.get_mut(key) {
                        Some(l) if l.pos <= to as Position => {
                            map.remove(key);
                        }
                        // Changed again past this chunk: its base is now
                        // what this chunk folded.
                        Some(l) => l.base = Some((r.version as u64, r.deleted)),
                        None => {}
                    }
                }
            }
        }
        // Announced last, so whoever waited for it also sees the keys gone
        // from the unfolded map (its metric included).
        shared.folded[dataset].send_replace(to as Position);
        shared.drained.notify_all();
    }
}

/// The thread that folds the log into the state and checkpoints the log;
/// stopped and joined on drop.
struct Folder {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Folder {
    fn start(shared: Arc<Shared>, log: Connection, state: Connection) -> std::io::Result<Self> {
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("spoke-hub-fold".into())
            .spawn(move || fold_loop(&s, log, state))?;
        Ok(Folder {
            shared,
            thread: Some(thread),
        })
    }

    fn handle(&self) -> std::thread::Thread {
        self.thread
            .as_ref()
            .expect("folder thread")
            .thread()
            .clone()
    }
}

fn fold_loop(shared: &Shared, log: Connection, mut state: Connection) {
    let mut checkpointed = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        shared.urgent.store(false, Ordering::SeqCst);
        if !shared.paused.load(Ordering::Relaxed) && shared.behind() {
            let mut result = Ok(());
            for ds in shared.heads.keys() {
                result = fold_dataset(shared, &log, &mut state, ds);
                if result.is_err() {
                    break;
                }
            }
            let mut failure = shared.failure.lock().expect("fold failure");
            match result {
                Ok(()) => *failure = None,
                Err(e) => {
                    tracing::warn!("hub store: folding the log into the state: {e}; retrying");
                    *failure = Some(e.to_string());
                    drop(failure);
                    shared.drained.notify_all();
                    std::thread::park_timeout(Duration::from_secs(1));
                    continue;
                }
            }
        }
        if checkpointed.elapsed() >= CHECKPOINT_EVERY {
            if let Err(e) = log.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::debug!("hub store checkpoint: {e}");
            }
            checkpointed = Instant::now();
        }
        if !shared.urgent.load(Ordering::SeqCst) {
            std::thread::park_timeout(FOLD_PAUSE);
        }
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// A small pool of read connections to one file, optionally with the log
/// attached as `l` (the state's readers join each key to its log entry).
struct Pool {
    path: PathBuf,
    attach_log: Option<PathBuf>,
    conns: Mutex<Vec<Connection>>,
}

impl Pool {
    fn new(path: PathBuf, attach_log: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Pool {
            path,
            attach_log,
            conns: Mutex::new(Vec::new()),
        })
    }

    fn connect(&self) -> rusqlite::Result<Connection> {
        let conn = open(&self.path, "NORMAL")?;
        if let Some(log) = &self.attach_log {
            conn.execute("ATTACH DATABASE ?1 AS l", [log.to_string_lossy().as_ref()])?;
        }
        Ok(conn)
    }

    /// Runs `f` on a pooled connection in the blocking pool.
    async fn with<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, FeedError> {
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.conns.lock().expect("reader pool").pop();
            let conn = match conn {
                Some(c) => c,
                None => pool.connect()?,
            };
            let out = f(&conn);
            pool.conns.lock().expect("reader pool").push(conn);
            out
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }
}

/// The publish side: the log's writer and a connection for version look-ups.
struct Writer {
    log: Connection,
    state: Connection,
}

pub struct SqliteFeed {
    catalog: Catalog,
    clock: Clock,
    writer: Arc<Mutex<Writer>>,
    log_readers: Arc<Pool>,
    state_readers: Arc<Pool>,
    shared: Arc<Shared>,
    folder: Folder,
}

/// The log file's identity, made at its first open: a state file folded
/// from another log (a copy restored beside the wrong log) is never trusted.
fn log_identity(log: &Connection) -> rusqlite::Result<String> {
    if let Some(id) = log
        .query_row("SELECT id FROM log_identity", [], |r| r.get(0))
        .optional()?
    {
        return Ok(id);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let id = format!("{nanos:x}-{:x}", std::process::id());
    log.execute("INSERT INTO log_identity (id) VALUES (?1)", [&id])?;
    Ok(id)
}

/// Empties the state file unless it was folded from the log `id`, and
/// records `id` as its log.
fn claim_state(state: &mut Connection, id: &str) -> rusqlite::Result<()> {
    let of: Option<String> = state
        .query_row("SELECT id FROM state_of_log", [], |r| r.get(0))
        .optional()?;
    if of.as_deref() == Some(id) {
        return Ok(());
    }
    let tx = state.transaction()?;
    let folded: i64 = tx.query_row("SELECT COUNT(*) FROM state_folds", [], |r| r.get(0))?;
    if of.is_some() || folded > 0 {
        tracing::warn!(
            "hub store: the state file was folded from another log; rebuilding it from this one"
        );
    }
    let tables: Vec<i64> = tx
        .prepare("SELECT n FROM state_tables")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for n in tables {
        tx.execute_batch(&format!("DELETE FROM state_{n}"))?;
    }
    tx.execute_batch("DELETE FROM digest; DELETE FROM state_folds; DELETE FROM state_of_log;")?;
    tx.execute("INSERT INTO state_of_log (id) VALUES (?1)", [id])?;
    tx.commit()
}

/// The number of `dataset`'s table in `registry` (`log_tables` or
/// `state_tables`), assigned at its first use and kept for good.
fn table_number(conn: &Connection, registry: &str, dataset: &str) -> rusqlite::Result<i64> {
    if let Some(n) = conn
        .query_row(
            &format!("SELECT n FROM {registry} WHERE dataset = ?1"),
            [dataset],
            |r| r.get(0),
        )
        .optional()?
    {
        return Ok(n);
    }
    conn.query_row(
        &format!(
            "INSERT INTO {registry} (dataset, n)
             VALUES (?1, (SELECT COALESCE(MAX(n), 0) + 1 FROM {registry})) RETURNING n"
        ),
        [dataset],
        |r| r.get(0),
    )
}

/// The log table of `dataset` in the hub file, created at its first use:
/// `log_<n>`, keyed by position as its rowid, so a publish appends at the
/// end of its B-tree without comparing keys, and reads seek by integer.
fn log_table(log: &Connection, dataset: &str) -> rusqlite::Result<String> {
    let n = table_number(log, "log_tables", dataset)?;
    log.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS log_{n} (
             pos INTEGER PRIMARY KEY,
             key TEXT NOT NULL,
             version INTEGER NOT NULL,
             op TEXT NOT NULL,
             fields TEXT NOT NULL,
             owner TEXT NOT NULL,
             ts INTEGER NOT NULL,
             schema_version INTEGER NOT NULL
         );"
    ))?;
    Ok(format!("log_{n}"))
}

/// Moves a log kept in one `log` table keyed by `(dataset, pos)` (hub
/// files before per-dataset log tables) into the per-dataset tables, in
/// one transaction, positions unchanged; returns how many entries moved.
fn migrate_shared_log(log: &mut Connection) -> rusqlite::Result<usize> {
    if !has_table(log, "log")? {
        return Ok(0);
    }
    let tx = log.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let datasets: Vec<String> = tx
        .prepare("SELECT DISTINCT dataset FROM log")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut moved = 0;
    for ds in datasets {
        let table = log_table(&tx, &ds)?;
        moved += tx.execute(
            &format!(
                "INSERT INTO {table} (pos, {LOG_COLUMNS})
                 SELECT pos, {LOG_COLUMNS} FROM log WHERE dataset = ?1 ORDER BY pos"
            ),
            [&ds],
        )?;
    }
    tx.execute_batch("DROP TABLE log")?;
    tx.commit()?;
    Ok(moved)
}

/// The state table of `dataset` in the state file, created at its first
/// use. One table per dataset keeps the dataset out of every key the
/// state's B-trees compare: with a `(dataset, key)` key, every comparison
/// met the equal dataset first and took SQLite's slow path for the rest
/// (a fifth of a publish's and a fold's instructions).
fn state_table(state: &Connection, dataset: &str) -> rusqlite::Result<String> {
    let n = table_number(state, "state_tables", dataset)?;
    state.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS state_{n} (
             key TEXT PRIMARY KEY,
             version INTEGER NOT NULL,
             op TEXT NOT NULL,
             pos INTEGER NOT NULL,
             bucket INTEGER NOT NULL
         ) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS state_{n}_entries ON state_{n} (bucket, key, version, op);"
    ))?;
    Ok(format!("state_{n}"))
}

/// Whether `conn`'s main database has a table `name`.
fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get(0),
    )
}

impl SqliteFeed {
    /// Opens (creating if needed) the hub store at `path`, with its state
    /// beside it ([`state_path`]).
    pub fn open(path: &Path, manifest: &Manifest) -> Result<Self, FeedError> {
        Self::open_with_clock(path, manifest, Clock::System)
    }

    pub fn open_with_clock(
        path: &Path,
        manifest: &Manifest,
        clock: Clock,
    ) -> Result<Self, FeedError> {
        let catalog = Catalog::new(manifest);
        let state_file = state_path(path);
        let mut log = open(path, "FULL").map_err(unavailable)?;
        // The folder thread checkpoints; this is the backstop should it lag.
        log.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)
            .map_err(unavailable)?;
        log.execute_batch(LOG_SQL).map_err(unavailable)?;
        let started = Instant::now();
        let moved = migrate_shared_log(&mut log).map_err(unavailable)?;
        if moved > 0 {
            tracing::info!(
                entries = moved,
                ms = started.elapsed().as_millis() as u64,
                "hub store: moved the log into one table per dataset"
            );
        }
        let id = log_identity(&log).map_err(unavailable)?;
        let mut state = open_state(&state_file).map_err(unavailable)?;
        prepare_state(&state).map_err(unavailable)?;
        claim_state(&mut state, &id).map_err(unavailable)?;

        let mut heads = HashMap::new();
        let mut folded = HashMap::new();
        let mut tables = HashMap::new();
        for name in catalog.names() {
            let table = state_table(&state, name).map_err(unavailable)?;
            let log_table = log_table(&log, name).map_err(unavailable)?;
            let head = log
                .query_row(&format!("SELECT MAX(pos) FROM {log_table}"), [], |r| {
                    r.get::<_, Option<i64>>(0)
                })
                .map_err(unavailable)?
                .unwrap_or(0);
            let mut through = state
                .query_row(
                    "SELECT through FROM state_folds WHERE dataset = ?1",
                    [name],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map_err(unavailable)?
                .unwrap_or(0);
            if through > head {
                // The state describes a longer log than this one (a log
                // restored from an older copy): it cannot be trusted.
                tracing::warn!(
                    dataset = name,
                    state_through = through,
                    log_head = head,
                    "hub store: the state file is ahead of the log; rebuilding it from the log"
                );
                let tx = state.transaction().map_err(unavailable)?;
                tx.execute_batch(&format!("DELETE FROM {table}"))
                    .map_err(unavailable)?;
                for t in ["digest", "state_folds"] {
                    tx.execute(&format!("DELETE FROM {t} WHERE dataset = ?1"), [name])
                        .map_err(unavailable)?;
                }
                tx.commit().map_err(unavailable)?;
                through = 0;
            }
            tables.insert(
                name.to_owned(),
                Tables {
                    log: log_table,
                    state: table,
                },
            );
            heads.insert(name.to_owned(), watch::channel(head as Position).0);
            folded.insert(name.to_owned(), watch::channel(through as Position).0);
        }
        let shared = Arc::new(Shared {
            tables,
            unfolded: Mutex::new(Unfolded::default()),
            drained: Condvar::new(),
            heads,
            folded,
            urgent: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            max_unfolded: AtomicUsize::new(MAX_UNFOLDED),
            failure: Mutex::new(None),
        });
        // Publishes look versions up in the state, so it must hold the
        // whole log before the first one: fold what the last run left (or
        // everything, for a new or lost state file) now.
        let started = Instant::now();
        let behind: Position = shared
            .heads
            .iter()
            .map(|(ds, h)| h.borrow().saturating_sub(*shared.folded[ds].borrow()))
            .sum();
        for ds in shared.heads.keys() {
            fold_dataset(&shared, &log, &mut state, ds).map_err(unavailable)?;
        }
        if behind > 0 {
            tracing::info!(
                changes = behind,
                ms = started.elapsed().as_millis() as u64,
                "hub store: folded the log into the state at open"
            );
        }
        // A hub file from before the state file kept the state beside the
        // log; it has just been rebuilt in the state file.
        if has_table(&log, "state").map_err(unavailable)? {
            log.execute_batch("DROP TABLE IF EXISTS state; DROP TABLE IF EXISTS digest;")
                .map_err(unavailable)?;
            tracing::info!(
                "hub store: moved the compacted state into {}",
                state_file.display()
            );
        }
        let writer = Writer {
            log,
            state: open_state(&state_file).map_err(unavailable)?,
        };
        let folder = Folder::start(
            shared.clone(),
            open(path, "FULL").map_err(unavailable)?,
            state,
        )
        .map_err(unavailable)?;
        Ok(SqliteFeed {
            catalog,
            clock,
            writer: Arc::new(Mutex::new(writer)),
            log_readers: Pool::new(path.to_owned(), None),
            state_readers: Pool::new(state_file, Some(path.to_owned())),
            shared,
            folder,
        })
    }

    fn head_tx(&self, dataset: &str) -> Result<&watch::Sender<Position>, FeedError> {
        self.shared
            .heads
            .get(dataset)
            .ok_or_else(|| FeedError::UnknownDataset(dataset.to_owned()))
    }

    /// Waits until the state holds every change of `dataset` published
    /// before this call, and returns the head it waited for. Snapshots,
    /// digests and records read the state after it.
    pub async fn wait_folded(&self, dataset: &str) -> Result<Position, FeedError> {
        let target = *self.head_tx(dataset)?.borrow();
        let mut rx = self.shared.folded[dataset].subscribe();
        let deadline = Instant::now() + FOLD_WAIT;
        while *rx.borrow_and_update() < target {
            if let Some(e) = self.shared.failure() {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(FeedError::Unavailable(format!(
                    "hub store: the state of {dataset} was not folded through position {target} within {FOLD_WAIT:?}"
                )));
            }
            self.shared.urgent.store(true, Ordering::SeqCst);
            self.folder.handle().unpark();
            let _ = tokio::time::timeout(Duration::from_millis(250), rx.changed()).await;
        }
        Ok(target)
    }

    /// Holds (true) or releases (false) the folder, for tests of the
    /// unfolded path.
    #[cfg(test)]
    fn hold_folding(&self, hold: bool) {
        self.shared.paused.store(hold, Ordering::SeqCst);
        self.folder.handle().unpark();
    }

    /// Lowers the back-pressure threshold, for tests.
    #[cfg(test)]
    fn set_max_unfolded(&self, keys: usize) {
        self.shared.max_unfolded.store(keys, Ordering::SeqCst);
    }
}

#[async_trait]
impl Publisher for SqliteFeed {
    fn catalog(&self) -> Option<&Catalog> {
        Some(&self.catalog)
    }

    /// Every publish is one fsynced log commit and one read of the state, so
    /// larger groups cost less per change (docs/BENCHMARKS.md: 0.78 of
    /// pg_recvlogical at 1,000 per publish, 0.87 at 4,000).
    fn preferred_batch(&self) -> usize {
        super::STORE_GROUP
    }

    async fn publish(
        &self,
        dataset: &str,
        changes: Vec<ChangeInput>,
    ) -> Result<PublishReceipt, FeedError> {
        let changes = self
            .catalog
            .prepare(dataset, changes, self.clock.now_ms())?;
        let head_tx = self.head_tx(dataset)?.clone();
        let writer = self.writer.clone();
        let shared = self.shared.clone();
        let folder = self.folder.handle();
        let dataset = dataset.to_owned();
        tokio::task::spawn_blocking(move || -> Result<PublishReceipt, FeedError> {
            let mut guard = writer.lock().expect("hub writer");
            let Writer { log, state } = &mut *guard;
            // Back-pressure: wait while the folder is too far behind.
            {
                let mut unfolded = shared.unfolded.lock().expect("unfolded keys");
                while unfolded.count() >= shared.max_unfolded.load(Ordering::Relaxed) {
                    if let Some(e) = shared.failure() {
                        return Err(e);
                    }
                    shared.urgent.store(true, Ordering::SeqCst);
                    folder.unpark();
                    unfolded = shared
                        .drained
                        .wait_timeout(unfolded, Duration::from_millis(100))
                        .expect("unfolded keys")
                        .0;
                }
            }
            let mut head = *head_tx.borrow();
            let mut positions = Vec::with_capacity(changes.len());
            let mut ignored = 0;
            let mut batch = KeyMap::default();
            let mut accepted: Vec<(Change, bool, Position)> = Vec::with_capacity(changes.len());
            {
                // Decide every change first, holding the unfolded map and
                // one read snapshot of the state for the whole batch (one
                // lock round instead of one per change). The snapshot starts
                // under the map's lock, so a key the folder removed from the
                // map before it is in the snapshot, and one folded after it
                // is still in the map: the folder removes keys only under
                // this lock, after its commit.
                let unfolded = shared.unfolded.lock().expect("unfolded keys");
                let unfolded = unfolded.keys.get(&dataset);
                let read = state.transaction().map_err(unavailable)?;
                let mut folded_version = read
                    .prepare_cached(&format!(
                        "SELECT version, op = 'delete' FROM {} WHERE key = ?1",
                        shared.tables[&dataset].state
                    ))
                    .map_err(unavailable)?;
                for c in changes {
                    // Newest first: this batch, then changes not folded yet,
                    // then the state (see "What stays exact" above).
                    let known = match batch.get(&c.key) {
                        Some(l) => Some(*l),
                        None => unfolded
                            .and_then(|m| m.get(&c.key))
                            // Should the folder fold that change meanwhile,
                            // it becomes the base (see below).
                            .map(|l| Latest { base: Some((l.version, l.deleted)), ..*l }),
                    };
                    let (local, base) = match known {
                        Some(l) => (Some(l.version), l.base),
                        None => {
                            let folded = folded_version
                                .query_row(params![c.key], |r| {
                                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, bool>(1)?))
                                })
                                .optional()
                                .map_err(unavailable)?;
                            (folded.map(|(v, _)| v), folded)
                        }
                    };
                    if decide(local, c.version) == Decision::Ignore {
                        positions.push(None);
                        ignored += 1;
                        continue;
                    }
                    head += 1;
                    let deleted = c.op == Op::Delete;
                    batch.insert(
                        c.key.clone(),
                        Latest {
                            version: c.version,
                            deleted,
                            pos: head,
                            base,
                        },
                    );
                    positions.push(Some(head));
                    accepted.push((c, deleted, head));
                }
                drop(folded_version);
                read.commit().map_err(unavailable)?;
            }
            let tx = log
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let mut rows: Vec<(String, LogRow)> = Vec::with_capacity(accepted.len());
            {
                let mut insert_log = tx
                    .prepare_cached(&format!(
                        "INSERT INTO {} (pos, {LOG_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        shared.tables[&dataset].log
                    ))
                    .map_err(unavailable)?;
                for (c, deleted, pos) in accepted {
                    let fields = serde_json::to_string(&c.fields).unwrap_or_else(|_| "{}".into());
                    insert_log
                        .execute(params![pos as i64, c.key, c.version as i64, c.op.as_str(), fields, c.owner, c.ts as i64, c.schema_version])
                        .map_err(unavailable)?;
                    rows.push((
                        c.key,
                        LogRow {
                            pos: pos as i64,
                            version: c.version as i64,
                            deleted,
                        },
                    ));
                }
            }
            tx.commit().map_err(unavailable)?;
            {
                let mut guard = shared.unfolded.lock().expect("unfolded keys");
                let queued = guard.queued();
                let Unfolded { keys, queue } = &mut *guard;
                let map = keys.entry(dataset.clone()).or_default();
                for (k, mut l) in batch {
                    // A key still unfolded keeps the base the folder keeps
                    // current; one folded since it was looked up has the
                    // folded change as its base.
                    if let Some(e) = map.get(&k) {
                        l.base = e.base;
                    }
                    map.insert(k, l);
                }
                if queued + rows.len() <= MAX_QUEUED {
                    queue.entry(dataset.clone()).or_default().extend(rows);
                }
            }
            // Published only after commit and after the unfolded map holds
            // the batch, still under the writer lock, so a head value always
            // names committed, readable positions the folder can find.
            head_tx.send_replace(head);
            Ok(PublishReceipt { positions, ignored, head })
        })
        .await
        .map_err(unavailable)?
    }
}

#[async_trait]
impl Feed for SqliteFeed {
    async fn read(
        &self,
        dataset: &str,
        after: Position,
        limit: usize,
        wait: Duration,
    ) -> Result<FeedBatch, FeedError> {
        let mut rx = self.head_tx(dataset)?.subscribe();
        if *rx.borrow_and_update() <= after {
            let _ = tokio::time::timeout(wait, rx.wait_for(|h| *h > after)).await;
        }
        let head = *rx.borrow();
        let limit = limit.clamp(1, MAX_PAGE) as i64;
        let ds = dataset.to_owned();
        let table = self.shared.tables[dataset].log.clone();
        let entries = self
            .log_readers
            .with(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT pos, {LOG_COLUMNS} FROM {table} WHERE pos > ?1 AND pos <= ?2 ORDER BY pos LIMIT ?3"
                ))?;
                let rows = stmt.query_map(params![after as i64, head as i64, limit], |row| {
                    Ok(FeedEntry {
                        position: row.get::<_, i64>("pos")? as Position,
                        change: row_to_change(&ds, row)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(FeedBatch {
            entries,
            head,
            hub_time_ms: self.clock.now_ms(),
        })
    }

    async fn snapshot(
        &self,
        dataset: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, FeedError> {
        self.head_tx(dataset)?;
        check_after_key(after_key)?;
        let head = self.wait_folded(dataset).await?;
        let limit = limit.clamp(1, MAX_PAGE);
        let ds = dataset.to_owned();
        let Tables { log, state: table } = &self.shared.tables[dataset];
        let (log, table) = (log.clone(), table.clone());
        // Keys are never empty, so "" starts at the first. (An `?2 IS NULL
        // OR key > ?2` here kept SQLite from seeking: every page scanned
        // the dataset from its first key.)
        let after = after_key.unwrap_or_default().to_owned();
        let mut records = self
            .state_readers
            .with(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT s.key, s.version, s.op, g.fields, g.owner, g.ts, g.schema_version
                     FROM {table} s JOIN l.{log} g ON g.pos = s.pos
                     WHERE s.key > ?1 ORDER BY s.key LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![after, (limit + 1) as i64], |row| {
                    row_to_change(&ds, row)
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        let next_after_key = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|c| c.key.clone())
        } else {
            None
        };
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

    async fn digest(&self, dataset: &str, query: &DigestQuery) -> Result<DigestNodes, FeedError> {
        self.catalog.get(dataset)?;
        query
            .indices()
            .map_err(|e| FeedError::BadRequest(e.to_string()))?;
        self.wait_folded(dataset).await?;
        let ds = dataset.to_owned();
        let digest = self
            .state_readers
            .with(move |conn| read_digest(conn, "digest", &ds))
            .await?;
        digest
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
        self.wait_folded(dataset).await?;
        let table = self.shared.tables[dataset].state.clone();
        let buckets = buckets.to_vec();
        self.state_readers
            .with(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    // The covering bucket index keeps this proportional to
                    // the bucket's size.
                    "SELECT key, version, op = 'delete' FROM {table} INDEXED BY {table}_entries WHERE bucket = ?1"
                ))?;
                let mut out = Vec::new();
                for b in buckets {
                    let rows = stmt.query_map(params![b], |r| {
                        Ok(DigestEntry::new(
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)? as u64,
                            r.get(2)?,
                        ))
                    })?;
                    for e in rows {
                        out.push(e?);
                    }
                }
                Ok(out)
            })
            .await
    }

    fn write_metrics(&self, out: &mut crate::metrics::Exposition) {
        use crate::metrics::Kind;
        // One reading per dataset, so lag = head - folded in every scrape.
        let mut rows: Vec<(&str, Position, Position)> = self
            .shared
            .heads
            .iter()
            .map(|(ds, h)| (ds.as_str(), *h.borrow(), *self.shared.folded[ds].borrow()))
            .collect();
        rows.sort();
        type Value = fn(Position, Position) -> Position;
        let families: [(&str, &str, Value); 3] = [
            ("spoke_hub_head_position", "Last position appended to the dataset's log.", |head, _| head),
            (
                "spoke_hub_state_folded_position",
                "Position through which the compacted state is folded from the log (snapshots and digests wait for it).",
                |_, folded| folded,
            ),
            (
                "spoke_hub_state_fold_lag",
                "Log positions not folded into the compacted state yet.",
                |head, folded| head.saturating_sub(folded),
            ),
        ];
        for (name, help, value) in families {
            out.family(name, Kind::Gauge, help);
            for &(ds, head, folded) in &rows {
                out.sample(name, &[("dataset", ds)], value(head, folded) as f64);
            }
        }
        let unfolded = self.shared.unfolded.lock().expect("unfolded keys").count();
        out.family(
            "spoke_hub_unfolded_keys",
            Kind::Gauge,
            "Keys with changes not folded yet; publishes wait beyond the store's limit.",
        )
        .sample("spoke_hub_unfolded_keys", &[], unfolded as f64);
        out.family(
            "spoke_hub_state_fold_failing",
            Kind::Gauge,
            "1 while the last attempt to fold the log into the state failed (see the hub's log).",
        )
        .sample(
            "spoke_hub_state_fold_failing",
            &[],
            if self.shared.failure().is_some() {
                1.0
            } else {
                0.0
            },
        );
    }

    async fn records(&self, dataset: &str, keys: &[String]) -> Result<Vec<Change>, FeedError> {
        self.catalog.get(dataset)?;
        check_digest_request(&[], keys.len())?;
        self.wait_folded(dataset).await?;
        let ds = dataset.to_owned();
        let Tables { log, state: table } = &self.shared.tables[dataset];
        let (log, table) = (log.clone(), table.clone());
        let keys = keys.to_vec();
        self.state_readers
            .with(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT s.key, s.version, s.op, g.fields, g.owner, g.ts, g.schema_version
                         FROM {table} s JOIN l.{log} g ON g.pos = s.pos
                         WHERE s.key = ?1"
                ))?;
                let mut out = Vec::with_capacity(keys.len());
                for k in &keys {
                    if let Some(c) = stmt
                        .query_row(params![k], |row| row_to_change(&ds, row))
                        .optional()?
                    {
                        out.push(c);
                    }
                }
                Ok(out)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_feed_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        super::super::conformance::run(|m| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = dir.path().join(format!("hub{i}.db"));
            async move { SqliteFeed::open(&path, &m).unwrap() }
        })
        .await;
    }

    fn fields(n: i64) -> serde_json::Map<String, serde_json::Value> {
        serde_json::json!({ "n": n }).as_object().cloned().unwrap()
    }

    /// 200 keys, every fifth deleted.
    fn batch() -> Vec<ChangeInput> {
        (0..200)
            .map(|i| {
                if i % 5 == 0 {
                    ChangeInput::delete(format!("k{i}"), 3)
                } else {
                    ChangeInput::upsert(format!("k{i}"), 1, fields(i))
                }
            })
            .collect()
    }

    /// Copies an SQLite file with its WAL (what a file copy of a live
    /// database holds), replacing `to`'s.
    fn copy_db(from: &Path, to: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let (f, t) = (
                format!("{}{suffix}", from.display()),
                format!("{}{suffix}", to.display()),
            );
            let _ = std::fs::remove_file(&t);
            if suffix != "-shm" && Path::new(&f).exists() {
                std::fs::copy(&f, &t).unwrap();
            }
        }
    }

    /// Every page of `dataset`'s snapshot.
    async fn whole_snapshot<T: Feed>(feed: &T, dataset: &str) -> Vec<Change> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = feed.snapshot(dataset, after.as_deref(), 7).await.unwrap();
            out.extend(page.records);
            match page.next_after_key {
                Some(k) => after = Some(k),
                None => return out,
            }
        }
    }

    /// The state, digest levels and bucket entries of `a` and `b` agree.
    pub(super) async fn same_state<A: Feed, B: Feed>(a: &A, b: &B, dataset: &str) {
        let strip = |v: Vec<Change>| -> Vec<(String, u64, Op, String)> {
            v.into_iter()
                .map(|c| {
                    (
                        c.key,
                        c.version,
                        c.op,
                        serde_json::to_string(&c.fields).unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(
            strip(whole_snapshot(a, dataset).await),
            strip(whole_snapshot(b, dataset).await)
        );
        for q in [DigestQuery::root(), DigestQuery::level(2)] {
            assert_eq!(
                a.digest(dataset, &q).await.unwrap(),
                b.digest(dataset, &q).await.unwrap()
            );
        }
        let some: Vec<u16> = (0..256).collect();
        let mut ea = a.bucket_entries(dataset, &some).await.unwrap();
        let mut eb = b.bucket_entries(dataset, &some).await.unwrap();
        ea.sort_by(|x, y| x.key.cmp(&y.key));
        eb.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(ea, eb);
    }

    /// A SqliteFeed at `path` and a MemoryFeed, both given [`batch`], the
    /// SqliteFeed's state folded through it.
    async fn seeded(path: &Path) -> (SqliteFeed, crate::feed::memory::MemoryFeed) {
        let m = super::super::conformance::manifest();
        let memory = crate::feed::memory::MemoryFeed::new(&m);
        let feed = SqliteFeed::open(path, &m).unwrap();
        feed.publish("items", batch()).await.unwrap();
        feed.wait_folded("items").await.unwrap();
        memory.publish("items", batch()).await.unwrap();
        (feed, memory)
    }

    #[tokio::test]
    async fn a_hub_file_from_before_the_state_file_gets_its_state_rebuilt_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let m = super::super::conformance::manifest();
        let (feed, memory) = seeded(&path).await;
        drop(feed);
        // What an older hub left: the state inside hub.db, no state file.
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", state_path(&path).display()));
        }
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE state (dataset TEXT, key TEXT, version INTEGER, PRIMARY KEY (dataset, key));
             INSERT INTO state VALUES ('items', 'stale', 1);
             CREATE TABLE digest (dataset TEXT, chunk INTEGER, hashes BLOB);",
        )
        .unwrap();
        drop(old);

        let feed = SqliteFeed::open(&path, &m).unwrap();
        same_state(&feed, &memory, "items").await;
        assert!(
            !has_table(&Connection::open(&path).unwrap(), "state").unwrap(),
            "the old state table is dropped once the state file holds the state"
        );
        // Versions are found in the rebuilt state.
        let r = feed
            .publish("items", vec![ChangeInput::upsert("k1", 1, fields(9))])
            .await
            .unwrap();
        assert_eq!(r.ignored, 1);
    }

    #[tokio::test]
    async fn a_log_kept_in_one_shared_table_moves_to_per_dataset_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let m = super::super::conformance::manifest();
        // What a hub before per-dataset log tables left: one `log` table
        // keyed by (dataset, pos), and a dataset no longer in the manifest.
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            r#"CREATE TABLE log (
                 dataset TEXT NOT NULL, pos INTEGER NOT NULL, key TEXT NOT NULL,
                 version INTEGER NOT NULL, op TEXT NOT NULL, fields TEXT NOT NULL,
                 owner TEXT NOT NULL, ts INTEGER NOT NULL, schema_version INTEGER NOT NULL,
                 PRIMARY KEY (dataset, pos)) WITHOUT ROWID;
               INSERT INTO log VALUES
                 ('items', 1, 'k1', 1, 'upsert', '{"n":1}', 'owner-svc', 10, 1),
                 ('gone', 1, 'x', 1, 'upsert', '{}', 'someone', 10, 1),
                 ('items', 2, 'k2', 1, 'upsert', '{"n":2}', 'owner-svc', 11, 1),
                 ('items', 3, 'k1', 2, 'delete', '{}', 'owner-svc', 12, 1);"#,
        )
        .unwrap();
        drop(old);

        let feed = SqliteFeed::open(&path, &m).unwrap();
        let b = feed.read("items", 0, 10, Duration::ZERO).await.unwrap();
        let got: Vec<(Position, &str, u64, Op)> = b
            .entries
            .iter()
            .map(|e| {
                (
                    e.position,
                    e.change.key.as_str(),
                    e.change.version,
                    e.change.op,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "k1", 1, Op::Upsert),
                (2, "k2", 1, Op::Upsert),
                (3, "k1", 2, Op::Delete)
            ],
            "every entry at its position"
        );
        assert_eq!(b.entries[1].change.fields["n"], serde_json::json!(2));
        assert_eq!(b.head, 3);
        let snapshot = whole_snapshot(&feed, "items").await;
        let state: Vec<(&str, u64, Op)> = snapshot
            .iter()
            .map(|c| (c.key.as_str(), c.version, c.op))
            .collect();
        assert_eq!(state, vec![("k1", 2, Op::Delete), ("k2", 1, Op::Upsert)]);
        // Versions are honoured and positions go on from the old head.
        let r = feed
            .publish(
                "items",
                vec![
                    ChangeInput::upsert("k2", 1, fields(9)),
                    ChangeInput::upsert("k3", 1, fields(3)),
                ],
            )
            .await
            .unwrap();
        assert_eq!(r.positions, vec![None, Some(4)]);
        drop(feed);
        let conn = Connection::open(&path).unwrap();
        assert!(
            !has_table(&conn, "log").unwrap(),
            "the shared table is dropped"
        );
        let kept: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM log_tables t WHERE t.dataset = 'gone'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            kept, 1,
            "a dataset gone from the manifest keeps its entries"
        );
    }

    #[tokio::test]
    async fn a_state_file_of_another_layout_is_folded_again_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let m = super::super::conformance::manifest();
        let (feed, memory) = seeded(&path).await;
        drop(feed);
        let old = Connection::open(state_path(&path)).unwrap();
        old.execute_batch("DELETE FROM state_1 WHERE key = 'k1'; PRAGMA user_version = 0;")
            .unwrap();
        drop(old);
        let feed = SqliteFeed::open(&path, &m).unwrap();
        same_state(&feed, &memory, "items").await;
    }

    #[tokio::test]
    async fn a_state_file_folded_from_another_log_is_cleared_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let m = super::super::conformance::manifest();
        let ours = dir.path().join("ours.db");
        let other = dir.path().join("other.db");
        let memory = crate::feed::memory::MemoryFeed::new(&m);
        {
            let a = SqliteFeed::open(&ours, &m).unwrap();
            a.publish("items", batch()).await.unwrap();
            memory.publish("items", batch()).await.unwrap();
            // Shorter than ours, so its fold position alone looks plausible.
            let b = SqliteFeed::open(&other, &m).unwrap();
            b.publish("items", vec![ChangeInput::upsert("k1", 7, fields(1))])
                .await
                .unwrap();
            b.wait_folded("items").await.unwrap();
        }
        copy_db(&state_path(&other), &state_path(&ours));
        let feed = SqliteFeed::open(&ours, &m).unwrap();
        same_state(&feed, &memory, "items").await;
    }

    #[tokio::test]
    async fn a_state_file_ahead_of_its_log_is_cleared_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let m = super::super::conformance::manifest();
        let path = dir.path().join("hub.db");
        let memory = crate::feed::memory::MemoryFeed::new(&m);
        let few = vec![ChangeInput::upsert("k1", 7, fields(1))];
        {
            let feed = SqliteFeed::open(&path, &m).unwrap();
            feed.publish("items", few.clone()).await.unwrap();
            memory.publish("items", few).await.unwrap();
        }
        let backup = dir.path().join("backup.db");
        copy_db(&path, &backup);
        {
            let feed = SqliteFeed::open(&path, &m).unwrap();
            feed.publish("items", batch()).await.unwrap();
            feed.wait_folded("items").await.unwrap();
        }
        // The log restored from the backup; its state file stays as it is.
        copy_db(&backup, &path);
        let feed = SqliteFeed::open(&path, &m).unwrap();
        same_state(&feed, &memory, "items").await;
    }

    #[tokio::test]
    async fn versions_of_unfolded_changes_are_honoured_and_reads_of_the_state_wait_for_the_fold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let m = super::super::conformance::manifest();
        let memory = crate::feed::memory::MemoryFeed::new(&m);
        let feed = Arc::new(SqliteFeed::open(&path, &m).unwrap());
        feed.publish("items", batch()).await.unwrap();
        memory.publish("items", batch()).await.unwrap();
        feed.wait_folded("items").await.unwrap();

        feed.hold_folding(true);
        let newer = vec![
            ChangeInput::upsert("k1", 2, fields(20)),
            ChangeInput::upsert("new", 1, fields(21)),
        ];
        assert_eq!(
            feed.publish("items", newer.clone()).await.unwrap().ignored,
            0
        );
        memory.publish("items", newer).await.unwrap();
        // Stale against the unfolded map (k1@2, new@1), not the state (k1@1).
        let stale = vec![
            ChangeInput::upsert("k1", 2, fields(30)),
            ChangeInput::upsert("new", 1, fields(31)),
            ChangeInput::upsert("k2", 1, fields(32)),
        ];
        let r = feed.publish("items", stale.clone()).await.unwrap();
        assert_eq!(r.positions, vec![None, None, None]);
        memory.publish("items", stale).await.unwrap();
        assert_eq!(
            *feed.shared.folded["items"].borrow(),
            200,
            "the folder is held"
        );

        // A snapshot waits for the fold, then holds every change before it.
        let reader = {
            let feed = feed.clone();
            tokio::spawn(async move { whole_snapshot(&*feed, "items").await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !reader.is_finished(),
            "the snapshot waits while the folder is held"
        );
        feed.hold_folding(false);
        let snap = reader.await.unwrap();
        let k1 = snap.iter().find(|c| c.key == "k1").unwrap();
        assert_eq!((k1.version, k1.fields["n"].clone()), (2, 20.into()));
        same_state(&*feed, &memory, "items").await;
        assert_eq!(feed.shared.unfolded.lock().unwrap().count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_waits_while_too_many_keys_are_unfolded() {
        let dir = tempfile::tempdir().unwrap();
        let m = super::super::conformance::manifest();
        let feed = Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &m).unwrap());
        feed.hold_folding(true);
        feed.set_max_unfolded(50);
        let first: Vec<ChangeInput> = (0..50)
            .map(|i| ChangeInput::upsert(format!("a{i}"), 1, fields(i)))
            .collect();
        feed.publish("items", first).await.unwrap();
        let blocked = {
            let feed = feed.clone();
            tokio::spawn(async move {
                feed.publish("items", vec![ChangeInput::upsert("b", 1, fields(0))])
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !blocked.is_finished(),
            "50 unfolded keys, the limit: the next publish waits for the folder"
        );
        feed.hold_folding(false);
        let r = blocked.await.unwrap().unwrap();
        assert_eq!(r.positions, vec![Some(51)]);
        assert_eq!(feed.wait_folded("items").await.unwrap(), 51);
    }

    #[tokio::test]
    async fn metrics_show_the_fold_lag_while_the_folder_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let m = super::super::conformance::manifest();
        let feed = SqliteFeed::open(&dir.path().join("hub.db"), &m).unwrap();
        feed.hold_folding(true);
        feed.publish("items", batch()).await.unwrap();
        let scrape = |feed: &SqliteFeed| {
            let mut out = crate::metrics::Exposition::new();
            feed.write_metrics(&mut out);
            out.finish()
        };
        let text = scrape(&feed);
        for line in [
            "spoke_hub_head_position{dataset=\"items\"} 200",
            "spoke_hub_state_folded_position{dataset=\"items\"} 0",
            "spoke_hub_state_fold_lag{dataset=\"items\"} 200",
            "spoke_hub_unfolded_keys 200",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
        }
        feed.hold_folding(false);
        feed.wait_folded("items").await.unwrap();
        let text = scrape(&feed);
        for line in [
            "spoke_hub_state_folded_position{dataset=\"items\"} 200",
            "spoke_hub_state_fold_lag{dataset=\"items\"} 0",
            "spoke_hub_unfolded_keys 0",
            "spoke_hub_state_fold_failing 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
        }
    }

    /// Drops the fold's bookkeeping behind the feed's back (of a feed
    /// `seeded` at `path`), so every fold fails until [`repair_folding`].
    fn break_folding(path: &Path) -> Connection {
        let other = Connection::open(state_path(path)).unwrap();
        other.busy_timeout(Duration::from_secs(10)).unwrap();
        other.execute_batch("DROP TABLE state_folds").unwrap();
        other
    }

    /// Puts the bookkeeping back as `seeded` left it (folded through 200).
    fn repair_folding(other: &Connection) {
        other
            .execute_batch("CREATE TABLE state_folds (dataset TEXT PRIMARY KEY, through INTEGER NOT NULL); INSERT INTO state_folds VALUES ('items', 200);")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_fold_is_reported_to_readers_and_metrics_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let (feed, memory) = seeded(&path).await;

        // Break the fold's bookkeeping behind the feed's back.
        let other = break_folding(&path);
        let more = vec![ChangeInput::upsert("k1", 5, fields(50))];
        // Publishes still append to the log (it does not depend on the state's bookkeeping).
        feed.publish("items", more.clone()).await.unwrap();
        memory.publish("items", more).await.unwrap();
        let err = feed.snapshot("items", None, 10).await.unwrap_err();
        assert!(
            matches!(&err, FeedError::Unavailable(m) if m.contains("folding the state failed") && m.contains("state_folds")),
            "a state read names the fold's failure: {err}"
        );
        let mut out = crate::metrics::Exposition::new();
        feed.write_metrics(&mut out);
        assert!(out
            .finish()
            .lines()
            .any(|l| l == "spoke_hub_state_fold_failing 1"));

        // Repaired: the folder's next attempt succeeds and nothing was lost.
        repair_folding(&other);
        let deadline = Instant::now() + Duration::from_secs(20);
        while feed.shared.failure().is_some() || feed.wait_folded("items").await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the folder recovers once the table is back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        same_state(&feed, &memory, "items").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_held_by_back_pressure_fails_while_folding_fails_and_appends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let (feed, _memory) = seeded(&path).await;
        let other = break_folding(&path);
        feed.set_max_unfolded(5);
        let five: Vec<ChangeInput> = (0..5)
            .map(|i| ChangeInput::upsert(format!("a{i}"), 1, fields(i)))
            .collect();
        let head = feed.publish("items", five).await.unwrap().head;
        let deadline = Instant::now() + Duration::from_secs(20);
        while feed.shared.failure().is_none() {
            assert!(Instant::now() < deadline, "the fold never failed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // At the limit, with the folder failing: an error, not a hang.
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            feed.publish("items", vec![ChangeInput::upsert("b", 1, fields(0))]),
        )
        .await
        .expect("the publish answers instead of waiting for a folder that fails")
        .unwrap_err();
        assert!(
            matches!(&err, FeedError::Unavailable(m) if m.contains("state_folds")),
            "the error names the fold's failure: {err}"
        );
        let b = feed
            .read("items", head - 1, 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(b.head, head, "the refused publish appended nothing");

        // Repaired: the folder catches up and the same publish goes through.
        repair_folding(&other);
        let deadline = Instant::now() + Duration::from_secs(20);
        let r = loop {
            match feed
                .publish("items", vec![ChangeInput::upsert("b", 1, fields(0))])
                .await
            {
                Ok(r) => break r,
                Err(e) => {
                    assert!(Instant::now() < deadline, "never recovered: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(r.positions, vec![Some(head + 1)]);
    }

    #[tokio::test]
    async fn changes_left_unfolded_by_a_stop_are_folded_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let m = super::super::conformance::manifest();
        let memory = crate::feed::memory::MemoryFeed::new(&m);
        {
            let feed = SqliteFeed::open(&path, &m).unwrap();
            feed.hold_folding(true);
            feed.publish("items", batch()).await.unwrap();
            memory.publish("items", batch()).await.unwrap();
        }
        let feed = SqliteFeed::open(&path, &m).unwrap();
        assert_eq!(*feed.shared.folded["items"].borrow(), 200);
        same_state(&feed, &memory, "items").await;
    }

    #[tokio::test]
    async fn the_log_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let m = super::super::conformance::manifest();
        {
            let feed = SqliteFeed::open(&path, &m).unwrap();
            let f = serde_json::json!({"n": 1}).as_object().cloned().unwrap();
            feed.publish(
                "items",
                vec![
                    ChangeInput::upsert("a", 1, f.clone()),
                    ChangeInput::upsert("b", 1, f),
                ],
            )
            .await
            .unwrap();
        }
        let feed = SqliteFeed::open(&path, &m).unwrap();
        let b = feed
            .read("items", 0, 10, std::time::Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(b.head, 2, "head is recovered from the log");
        let f = serde_json::json!({"n": 2}).as_object().cloned().unwrap();
        let r = feed
            .publish(
                "items",
                vec![
                    ChangeInput::upsert("a", 1, f.clone()),
                    ChangeInput::upsert("a", 2, f),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            r.positions,
            vec![None, Some(3)],
            "versions are recovered too"
        );
    }
}

#[cfg(test)]
mod props {
    //! Whatever the folder's timing (held, released, stopped by a reopen),
    //! the SqliteFeed answers every publish and ends in the state the
    //! MemoryFeed (which has no folding) reaches.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Publish(Vec<(u8, u64, bool)>),
        Hold(bool),
        /// Wait until the folder folded everything (unless held).
        Settle,
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => proptest::collection::vec((0u8..12, 1u64..6, proptest::bool::weighted(0.2)), 1..12)
                .prop_map(Step::Publish),
            2 => any::<bool>().prop_map(Step::Hold),
            2 => Just(Step::Settle),
            1 => Just(Step::Reopen),
        ]
    }

    fn input((k, v, delete): (u8, u64, bool)) -> ChangeInput {
        let key = format!("key{k}");
        if delete {
            ChangeInput::delete(key, v)
        } else {
            let f = serde_json::json!({ "n": v as i64 * 100 + k as i64 });
            ChangeInput::upsert(key, v, f.as_object().cloned().unwrap())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn folding_never_changes_what_a_publish_or_a_read_sees(steps in proptest::collection::vec(step(), 1..20)) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("hub.db");
                let m = super::super::conformance::manifest();
                let memory = crate::feed::memory::MemoryFeed::new(&m);
                let mut feed = SqliteFeed::open(&path, &m).unwrap();
                let mut held = false;
                for s in steps {
                    match s {
                        Step::Publish(changes) => {
                            let inputs: Vec<ChangeInput> = changes.into_iter().map(input).collect();
                            let a = feed.publish("items", inputs.clone()).await.unwrap();
                            let b = memory.publish("items", inputs).await.unwrap();
                            assert_eq!(a, b);
                        }
                        Step::Hold(h) => {
                            held = h;
                            feed.hold_folding(h);
                        }
                        Step::Settle if !held => {
                            feed.wait_folded("items").await.unwrap();
                        }
                        Step::Settle => {}
                        Step::Reopen => {
                            held = false;
                            drop(feed);
                            feed = SqliteFeed::open(&path, &m).unwrap();
                        }
                    }
                }
                feed.hold_folding(false);
                super::tests::same_state(&feed, &memory, "items").await;
            });
        }
    }
}
