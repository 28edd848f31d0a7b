//! SQLite copies: the embedded default.
//!
//! Each copy is a base table holding live rows and tombstones, with the
//! projected fields as typed columns, and a view named after the dataset
//! that shows live rows only — the view is what a service queries and JOINs:
//!
//! ```text
//!   customers (VIEW)                      _spoke_copy_customers (TABLE)
//!   id | name | email | _spoke_version ◀── _spoke_key | name | email | _spoke_version | _spoke_deleted_at | _spoke_bucket
//!                                         (rows with _spoke_deleted_at set are tombstones; index on _spoke_bucket)
//!   _spoke_copies: dataset | owner | position | fresh_as_of_ms | received_total | applied_total
//!   _spoke_digest: dataset | chunk | hashes    (64 chunks of 64 bucket hashes, 1 KiB each)
//!   _spoke_reconcile: dataset | runs_total | last_run_ms | … (reconcile bookkeeping)
//! ```
//!
//! # Digest
//! Each apply first reads the old `(rowid, version, deleted)` of every key
//! of the batch in *one* statement (the keys as a JSON array joined to the
//! table), decides by the apply rule, skips what it would ignore, writes
//! the rest as an `UPDATE … WHERE rowid` or a plain `INSERT` (so no key is
//! probed twice), and collects the XOR deltas per bucket. (Measured slower:
//! an `INSERT … ON CONFLICT` per change with a look-up per key before it,
//! or with `RETURNING`, which opens a temporary B-tree per statement, also
//! in multi-row statements.) Before commit the deltas are XORed into the
//! touched chunks of `_spoke_digest` (read, XOR, write, inside the same
//! transaction), so the digest commits or rolls back with the records and
//! stays exact when `spoke reconcile` writes beside the agent. A chunk
//! holds the 64 leaves under one level-1 node: a batch of 1,000 changes
//! rewrites at most 64 rows of 1 KiB (a rowid table, so a same-size rewrite
//! happens in place) instead of up to 1,000 bucket rows; a missing chunk
//! row means 64 empty buckets. `_spoke_bucket` is written once per key
//! (updates leave it and its index alone) and lets reconcile list a
//! bucket's rows without a scan. Copies made before digests existed are
//! migrated by `ensure_copy`: the column, the index and the digest are
//! built from the rows in one transaction.
//!
//! # Read-only enforcement
//! SQLite has no users, so the guard is a flag: triggers on the base table
//! abort any write unless `_spoke_guard.agent_writing` is 1, and the agent
//! sets it to 1 and back to 0 *inside* its own write transaction. The 1 is
//! never committed, so every other connection sees 0 and its write fails
//! with a message naming the dataset and its owner; a crash mid-transaction
//! rolls the flag back with everything else. Writes through the view fail
//! the same way. This stops accidents (a service's code, the sqlite3 shell),
//! not a determined user who edits the guard; the PostgreSQL store uses roles.
//!
//! The agent's own writer connection runs with triggers switched off
//! (`SQLITE_DBCONFIG_ENABLE_TRIGGER`, a per-connection setting): firing two
//! guard triggers per upserted row (BEFORE INSERT, then BEFORE UPDATE on
//! conflict) more than doubled the cost of an apply, and on that connection
//! they could only ever pass. Every other connection keeps triggers on and
//! is refused as above. The writer still sets the flag, so the store stays
//! correct if triggers are ever turned back on for it — which any trigger
//! that must fire on the agent's writes would need.
//!
//! # Crash safety
//! Records, cursor and counters commit in one transaction (WAL,
//! `synchronous=NORMAL`: a killed process loses nothing committed; a power
//! loss may roll back the last transactions, cursor included, which the
//! agent then replays).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::{Map, Value};
use spoke_core::digest::{
    bucket_of, entry_hash, xor_chunk, Digest, DigestDelta, DigestEntry, BUCKETS, CHUNK_BYTES,
    FANOUT,
};
use spoke_core::{Change, FieldSpec, FieldType, Op, Version};

use super::{
    narrowing, newest_per_key, Advance, ApplyOutcome, CopyRecord, CopySpec, CopyStore, Cursor,
    Held, ReconcileRun, ReconcileStats, StoreError,
};
use crate::clock::Clock;

const META_SQL: &str = "
CREATE TABLE IF NOT EXISTS _spoke_guard (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    agent_writing INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO _spoke_guard (id, agent_writing) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS _spoke_copies (
    dataset TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    key_name TEXT NOT NULL,
    fields TEXT NOT NULL,
    position INTEGER,
    fresh_as_of_ms INTEGER NOT NULL DEFAULT 0,
    received_total INTEGER NOT NULL DEFAULT 0,
    applied_total INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _spoke_digest (
    dataset TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    hashes BLOB NOT NULL,
    PRIMARY KEY (dataset, chunk)
);
CREATE TABLE IF NOT EXISTS _spoke_reconcile (
    dataset TEXT PRIMARY KEY,
    runs_total INTEGER NOT NULL DEFAULT 0,
    last_run_ms INTEGER NOT NULL DEFAULT 0,
    last_duration_ms INTEGER NOT NULL DEFAULT 0,
    last_repaired INTEGER NOT NULL DEFAULT 0,
    missing_total INTEGER NOT NULL DEFAULT 0,
    stale_total INTEGER NOT NULL DEFAULT 0,
    extra_total INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _spoke_quarantine (
    dataset TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    position INTEGER,
    reason TEXT NOT NULL,
    held_at_ms INTEGER NOT NULL,
    change TEXT NOT NULL,
    PRIMARY KEY (dataset, key, version)
);
";

/// The copy's view (live records, the key under the owner's key name) and
/// the triggers that refuse writes through it.
fn view_sql(
    ds: &str,
    key: &str,
    owner: &str,
    columns: &[(String, FieldSpec)],
    base: &str,
) -> String {
    let view_cols: String = columns.iter().map(|(n, _)| format!(", \"{n}\"")).collect();
    let msg = read_only_message(ds, owner);
    let mut sql = format!(
        "CREATE VIEW \"{ds}\" AS SELECT _spoke_key AS \"{key}\"{view_cols}, _spoke_version FROM {base} WHERE _spoke_deleted_at IS NULL;"
    );
    for op in ["INSERT", "UPDATE", "DELETE"] {
        sql.push_str(&format!(
            "CREATE TRIGGER \"_spoke_ro_{ds}_view_{op}\" INSTEAD OF {op} ON \"{ds}\" BEGIN SELECT RAISE(ABORT, '{msg}'); END;"
        ));
    }
    sql
}

/// Reads the stored digest of `dataset` from `table` (chunk rows; absent = empty).
pub(crate) fn read_digest(
    conn: &Connection,
    table: &str,
    dataset: &str,
) -> rusqlite::Result<Digest> {
    let mut digest = Digest::new();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT chunk, hashes FROM {table} WHERE dataset = ?1"
    ))?;
    let rows = stmt.query_map([dataset], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    for row in rows {
        let (chunk, bytes) = row?;
        digest
            .set_chunk_bytes(chunk as usize, &bytes)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    }
    Ok(digest)
}

/// XORs a batch's deltas into the stored digest, inside the caller's transaction.
pub(crate) fn write_digest_delta(
    conn: &Connection,
    table: &str,
    dataset: &str,
    delta: &DigestDelta,
) -> rusqlite::Result<()> {
    if delta.is_empty() {
        return Ok(());
    }
    let mut read = conn.prepare_cached(&format!(
        "SELECT hashes FROM {table} WHERE dataset = ?1 AND chunk = ?2"
    ))?;
    let mut write = conn.prepare_cached(&format!(
        "INSERT INTO {table} (dataset, chunk, hashes) VALUES (?1, ?2, ?3)
         ON CONFLICT (dataset, chunk) DO UPDATE SET hashes = excluded.hashes"
    ))?;
    for (chunk, deltas) in delta.chunks() {
        let mut bytes: Vec<u8> = read
            .query_row(params![dataset, chunk as i64], |r| r.get(0))
            .optional()?
            .filter(|b: &Vec<u8>| b.len() == CHUNK_BYTES)
            .unwrap_or_else(|| vec![0; CHUNK_BYTES]);
        xor_chunk(&mut bytes, &deltas);
        write.execute(params![dataset, chunk as i64, bytes])?;
    }
    Ok(())
}

/// Replaces the stored digest of `dataset` with `digest` (migrations).
pub(crate) fn write_digest(
    conn: &Connection,
    table: &str,
    dataset: &str,
    digest: &Digest,
) -> rusqlite::Result<()> {
    conn.execute(
        &format!("DELETE FROM {table} WHERE dataset = ?1"),
        [dataset],
    )?;
    let mut write = conn.prepare_cached(&format!(
        "INSERT INTO {table} (dataset, chunk, hashes) VALUES (?1, ?2, ?3)"
    ))?;
    for chunk in 0..BUCKETS / FANOUT {
        write.execute(params![dataset, chunk as i64, digest.chunk_bytes(chunk)])?;
    }
    Ok(())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The columns of one copy, as stored in `_spoke_copies.fields`.
#[derive(Debug, Clone)]
struct Layout {
    base: String,
    columns: Vec<(String, FieldSpec)>,
    select: String,
    /// One live record by key.
    get_live: String,
    old_states: String,
    insert_live: String,
    insert_tombstone: String,
    update_live: String,
    update_tombstone: String,
}

impl Layout {
    fn new(dataset: &str, columns: Vec<(String, FieldSpec)>) -> Self {
        let base = format!("\"_spoke_copy_{dataset}\"");
        let names: Vec<String> = columns.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let placeholders: Vec<String> = (0..columns.len()).map(|i| format!("?{}", i + 4)).collect();
        let sets: Vec<String> = names
            .iter()
            .zip(&placeholders)
            .map(|(n, p)| format!("{n} = {p}"))
            .collect();
        let nulls: Vec<String> = names.iter().map(|n| format!("{n} = NULL")).collect();
        let comma = |v: &[String]| v.iter().map(|s| format!(", {s}")).collect::<String>();
        // The old states of a whole batch in one statement: the keys go in
        // as one JSON array, `j.key` is a key's index in it, and CROSS JOIN
        // keeps the array as the outer loop (one primary-key probe per key,
        // never a scan of the copy). With the rowid in hand, a newer change
        // to an existing key is an UPDATE by rowid (no second key probe)
        // and a new key a plain INSERT.
        let old_states = format!(
            "SELECT j.key, t.rowid, t._spoke_version, t._spoke_deleted_at IS NOT NULL
             FROM json_each(?1) AS j CROSS JOIN {base} AS t ON t._spoke_key = j.value"
        );
        let stride = columns.len() + 3;
        let insert_live = format!(
            "INSERT INTO {base} (_spoke_key, _spoke_version, _spoke_bucket, _spoke_deleted_at{}) VALUES (?1, ?2, ?3, NULL{})",
            comma(&names),
            comma(&placeholders),
        );
        let insert_tombstone = format!(
            "INSERT INTO {base} (_spoke_key, _spoke_version, _spoke_bucket, _spoke_deleted_at) VALUES (?1, ?2, ?3, ?4)"
        );
        // Binds a row's values (?1 key and ?3 bucket unused) then its rowid.
        let update_live = format!(
            "UPDATE {base} SET _spoke_version = ?2, _spoke_deleted_at = NULL{} WHERE rowid = ?{}",
            comma(&sets),
            stride + 1,
        );
        let update_tombstone = format!(
            "UPDATE {base} SET _spoke_version = ?2, _spoke_deleted_at = ?3{} WHERE rowid = ?1",
            comma(&nulls),
        );
        let select = format!(
            "SELECT _spoke_key, _spoke_version, _spoke_deleted_at{} FROM {base}",
            comma(&names)
        );
        let get_live = format!("{select} WHERE _spoke_key = ?1 AND _spoke_deleted_at IS NULL");
        Layout {
            base,
            columns,
            select,
            get_live,
            old_states,
            insert_live,
            insert_tombstone,
            update_live,
            update_tombstone,
        }
    }

    fn from_json(dataset: &str, fields: &str) -> Result<Self, StoreError> {
        let cols: Vec<(String, FieldSpec)> = serde_json::from_str(fields).map_err(|e| {
            StoreError::Layout(format!("copy {dataset}: unreadable field list: {e}"))
        })?;
        Ok(Layout::new(dataset, cols))
    }

    fn row_to_record(
        &self,
        row: &rusqlite::Row<'_>,
    ) -> rusqlite::Result<(String, Version, bool, Map<String, Value>)> {
        let key: String = row.get(0)?;
        let version = row.get::<_, i64>(1)? as Version;
        let deleted = row.get::<_, Option<i64>>(2)?.is_some();
        let mut fields = Map::new();
        if !deleted {
            for (i, (name, spec)) in self.columns.iter().enumerate() {
                fields.insert(name.clone(), from_sql(spec.ty, row.get(i + 3)?));
            }
        }
        Ok((key, version, deleted, fields))
    }
}

fn sql_type(ty: FieldType) -> &'static str {
    match ty {
        FieldType::String | FieldType::Timestamp | FieldType::Json => "TEXT",
        FieldType::Int | FieldType::Bool => "INTEGER",
        FieldType::Float => "REAL",
    }
}

fn to_sql(ty: FieldType, v: Option<&Value>) -> SqlValue {
    match (ty, v) {
        (_, None | Some(Value::Null)) => SqlValue::Null,
        (FieldType::Json, Some(v)) => SqlValue::Text(v.to_string()),
        (_, Some(Value::String(s))) => SqlValue::Text(s.clone()),
        (_, Some(Value::Bool(b))) => SqlValue::Integer(i64::from(*b)),
        (FieldType::Float, Some(Value::Number(n))) => SqlValue::Real(n.as_f64().unwrap_or(0.0)),
        (_, Some(Value::Number(n))) => n.as_i64().map_or_else(
            || SqlValue::Real(n.as_f64().unwrap_or(0.0)),
            SqlValue::Integer,
        ),
        (_, Some(other)) => SqlValue::Text(other.to_string()),
    }
}

fn from_sql(ty: FieldType, v: SqlValue) -> Value {
    match (ty, v) {
        (_, SqlValue::Null) => Value::Null,
        (FieldType::Bool, SqlValue::Integer(i)) => Value::Bool(i != 0),
        (FieldType::Json, SqlValue::Text(s)) => {
            serde_json::from_str(&s).unwrap_or(Value::String(s))
        }
        (_, SqlValue::Integer(i)) => Value::from(i),
        (_, SqlValue::Real(f)) => Value::from(f),
        (_, SqlValue::Text(s)) => Value::String(s),
        (_, SqlValue::Blob(b)) => Value::String(String::from_utf8_lossy(&b).into_owned()),
    }
}

/// The message a refused write carries.
pub fn read_only_message(dataset: &str, owner: &str) -> String {
    format!("{dataset} is a read-only copy of dataset {dataset} owned by {owner}: only spoke agent writes it; keep local data in your own tables")
}

pub struct SqliteCopyStore {
    clock: Clock,
    path: PathBuf,
    writer: Option<Arc<Mutex<Connection>>>,
    reader: Arc<Mutex<Connection>>,
    layouts: Arc<Mutex<HashMap<String, Arc<Layout>>>>,
}

fn open_conn(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let conn = if read_only {
        Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?
    } else {
        Connection::open(path)?
    };
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
    }
    Ok(conn)
}

/// Readers map the file: reads that hop around a large copy (a bucket's
/// rows for reconcile, point reads) then cost no system call per page.
const READER_MMAP_BYTES: i64 = 256 * 1024 * 1024;

fn open_reader(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let conn = open_conn(path, read_only)?;
    conn.pragma_update(None, "mmap_size", READER_MMAP_BYTES)?;
    Ok(conn)
}

impl SqliteCopyStore {
    /// Opens the store as its writer (the agent).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_clock(path, Clock::System)
    }

    pub fn open_with_clock(path: &Path, clock: Clock) -> Result<Self, StoreError> {
        let writer = open_conn(path, false).map_err(unavailable)?;
        writer.execute_batch(META_SQL).map_err(unavailable)?;
        // Only the guard triggers live in a copy store; see "Read-only enforcement".
        writer
            .set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER,
                false,
            )
            .map_err(unavailable)?;
        let reader = open_reader(path, false).map_err(unavailable)?;
        // Room for the batch statements of every size (see `Layout`).
        writer.set_prepared_statement_cache_capacity(64);
        Ok(SqliteCopyStore {
            clock,
            path: path.to_owned(),
            writer: Some(Arc::new(Mutex::new(writer))),
            reader: Arc::new(Mutex::new(reader)),
            layouts: Arc::default(),
        })
    }

    /// Opens an existing store for reading only (a service reading its copies).
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let reader = open_reader(path, true).map_err(unavailable)?;
        Ok(SqliteCopyStore {
            clock: Clock::System,
            path: path.to_owned(),
            writer: None,
            reader: Arc::new(Mutex::new(reader)),
            layouts: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writer(&self) -> Result<Arc<Mutex<Connection>>, StoreError> {
        self.writer.clone().ok_or_else(|| {
            StoreError::Unavailable(format!("{} was opened read-only", self.path.display()))
        })
    }

    async fn read<R: Send + 'static>(
        &self,
        dataset: &str,
        f: impl FnOnce(&Connection, &Layout) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let reader = self.reader.clone();
        let layouts = self.layouts.clone();
        let dataset = dataset.to_owned();
        let work = move || {
            let conn = reader.lock().expect("copy reader");
            let layout = layout_of(&layouts, &conn, &dataset)?;
            f(&conn, &layout)
        };
        // Reads are short (a few pages, usually cached). On a multi-thread
        // runtime they run in place, telling the scheduler this worker may
        // block, which saves the hand-off to the blocking pool and back (the
        // larger share of a point read's latency, and most of its tail when
        // the machine is busy).
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            return tokio::task::block_in_place(work);
        }
        tokio::task::spawn_blocking(work)
            .await
            .map_err(unavailable)?
    }
}

/// One live record by key.
fn get_live(
    conn: &Connection,
    layout: &Layout,
    key: &str,
) -> Result<Option<CopyRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&layout.get_live).map_err(unavailable)?;
    let rec = stmt
        .query_row([key], |r| layout.row_to_record(r))
        .optional()
        .map_err(unavailable)?;
    Ok(rec.map(|(key, version, _, fields)| CopyRecord {
        key,
        version,
        fields,
    }))
}

/// The cursor row of `dataset`.
fn read_cursor(conn: &Connection, dataset: &str) -> Result<Cursor, StoreError> {
    conn.prepare_cached(
        "SELECT position, fresh_as_of_ms, received_total, applied_total FROM _spoke_copies WHERE dataset = ?1",
    )
    .and_then(|mut stmt| {
        stmt.query_row([dataset], |r| {
            Ok(Cursor {
                position: r.get::<_, Option<i64>>(0)?.map(|p| p as u64),
                fresh_as_of_ms: r.get::<_, i64>(1)? as u64,
                received_total: r.get::<_, i64>(2)? as u64,
                applied_total: r.get::<_, i64>(3)? as u64,
            })
        })
    })
    .map_err(unavailable)
}

/// Adds what digests need to a copy made before them — the bucket column,
/// its index and the digest built from the rows — in the caller's
/// transaction. Returns the number of rows when it migrated, `None` when
/// the copy already had them.
fn migrate_digest(
    tx: &rusqlite::Transaction<'_>,
    dataset: &str,
    base: &str,
) -> rusqlite::Result<Option<usize>> {
    let has = |column: &str| -> rusqlite::Result<bool> {
        tx.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
            [format!("_spoke_copy_{dataset}"), column.to_owned()],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if has("_spoke_bucket")? {
        return Ok(None);
    }
    tx.execute_batch(&format!(
        "ALTER TABLE {base} ADD COLUMN _spoke_bucket INTEGER NOT NULL DEFAULT 0"
    ))?;
    let rows: Vec<(String, i64, bool)> = {
        let mut stmt = tx.prepare(&format!(
            "SELECT _spoke_key, _spoke_version, _spoke_deleted_at IS NOT NULL FROM {base}"
        ))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut digest = Digest::new();
    tx.execute("UPDATE _spoke_guard SET agent_writing = 1 WHERE id = 1", [])?;
    {
        let mut set = tx.prepare(&format!(
            "UPDATE {base} SET _spoke_bucket = ?1 WHERE _spoke_key = ?2"
        ))?;
        for (key, version, deleted) in &rows {
            set.execute(params![bucket_of(key), key])?;
            digest.toggle(key, *version as Version, *deleted);
        }
    }
    tx.execute("UPDATE _spoke_guard SET agent_writing = 0 WHERE id = 1", [])?;
    tx.execute_batch(&format!(
        "CREATE INDEX \"_spoke_copy_{dataset}_bucket\" ON {base} (_spoke_bucket)"
    ))?;
    write_digest(tx, "_spoke_digest", dataset, &digest)?;
    Ok(Some(rows.len()))
}

/// The layout of `dataset`'s copy, cached after the first look-up.
fn layout_of(
    cache: &Mutex<HashMap<String, Arc<Layout>>>,
    conn: &Connection,
    dataset: &str,
) -> Result<Arc<Layout>, StoreError> {
    if let Some(l) = cache.lock().expect("layouts").get(dataset) {
        return Ok(l.clone());
    }
    let fields: Option<String> = conn
        .query_row(
            "SELECT fields FROM _spoke_copies WHERE dataset = ?1",
            [dataset],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    let fields = fields.ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))?;
    let layout = Arc::new(Layout::from_json(dataset, &fields)?);
    cache
        .lock()
        .expect("layouts")
        .insert(dataset.to_owned(), layout.clone());
    Ok(layout)
}

#[async_trait]
impl CopyStore for SqliteCopyStore {
    async fn ensure_copy(&self, spec: &CopySpec) -> Result<(), StoreError> {
        let writer = self.writer()?;
        let spec = spec.clone();
        let layouts = self.layouts.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("copy writer");
            let columns: Vec<(String, FieldSpec)> = spec.projection.fields().to_vec();
            let fields_json = serde_json::to_string(&columns).map_err(unavailable)?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(unavailable)?;
            let existing: Option<String> = tx
                .query_row("SELECT fields FROM _spoke_copies WHERE dataset = ?1", [&spec.dataset], |r| r.get(0))
                .optional()
                .map_err(unavailable)?;
            let ds = &spec.dataset;
            if let Some(existing) = existing {
                if existing != fields_json {
                    let Some(dropped) = narrowing(&existing, &columns) else {
                        return Err(StoreError::Layout(format!(
                            "the copy of {ds} in this store holds fields {existing}, but the subscription now projects {fields_json}, which it cannot become in place (only dropping fields or letting one be null can); drop the copy (DROP VIEW {ds}; DROP TABLE _spoke_copy_{ds}; DELETE FROM _spoke_copies WHERE dataset = '{ds}') and the agent rebuilds it from a snapshot"
                        )));
                    };
                    let base = Layout::new(ds, columns.clone()).base;
                    let mut sql = format!("DROP VIEW IF EXISTS \"{ds}\";");
                    for col in &dropped {
                        sql.push_str(&format!("ALTER TABLE {base} DROP COLUMN \"{col}\";"));
                    }
                    sql.push_str(&view_sql(ds, &spec.key_name, &spec.owner, &columns, &base));
                    tx.execute_batch(&sql).map_err(|e| StoreError::Layout(format!("narrowing the copy of {ds}: {e}")))?;
                    tx.execute("UPDATE _spoke_copies SET fields = ?2 WHERE dataset = ?1", params![ds, fields_json]).map_err(unavailable)?;
                    tracing::info!(dataset = %ds, dropped = ?dropped, "narrowed the copy in place to the subscription's projection");
                }
                let base = Layout::new(ds, columns.clone()).base;
                if let Some(rows) = migrate_digest(&tx, ds, &base).map_err(unavailable)? {
                    tracing::info!(dataset = %ds, rows, "built the digest of a copy made before digests existed");
                }
            } else {
                let layout = Layout::new(ds, columns.clone());
                let base = &layout.base;
                let cols: String = columns.iter().map(|(n, s)| format!(", \"{n}\" {}", sql_type(s.ty))).collect();
                let msg = read_only_message(ds, &spec.owner);
                let key = &spec.key_name;
                let mut sql = format!(
                    "CREATE TABLE {base} (_spoke_key TEXT PRIMARY KEY NOT NULL, _spoke_version INTEGER NOT NULL, _spoke_deleted_at INTEGER{cols}, _spoke_bucket INTEGER NOT NULL DEFAULT 0);
                     CREATE INDEX \"_spoke_copy_{ds}_bucket\" ON {base} (_spoke_bucket);
                     DELETE FROM _spoke_digest WHERE dataset = '{ds}';"
                );
                sql.push_str(&view_sql(ds, key, &spec.owner, &columns, base));
                for op in ["INSERT", "UPDATE", "DELETE"] {
                    sql.push_str(&format!(
                        "CREATE TRIGGER \"_spoke_ro_{ds}_{op}\" BEFORE {op} ON {base} WHEN (SELECT agent_writing FROM _spoke_guard WHERE id = 1) IS NOT 1
                         BEGIN SELECT RAISE(ABORT, '{msg}'); END;"
                    ));
                }
                tx.execute_batch(&sql).map_err(|e| StoreError::Layout(format!("creating the copy of {ds}: {e}")))?;
                tx.execute(
                    "INSERT INTO _spoke_copies (dataset, owner, key_name, fields) VALUES (?1, ?2, ?3, ?4)",
                    params![ds, spec.owner, key, fields_json],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            layouts.lock().expect("layouts").remove(ds);
            Ok(())
        })
        .await
        .map_err(unavailable)?
    }

    async fn cursor(&self, dataset: &str) -> Result<Cursor, StoreError> {
        let ds = dataset.to_owned();
        self.read(dataset, move |conn, _| read_cursor(conn, &ds))
            .await
    }

    async fn apply(
        &self,
        dataset: &str,
        changes: &[Change],
        advance: Advance,
    ) -> Result<ApplyOutcome, StoreError> {
        let writer = self.writer()?;
        let layout = {
            let conn = writer.lock().expect("copy writer");
            layout_of(&self.layouts, &conn, dataset)?
        };
        let rows = Rows::new(&layout, changes);
        let received = changes.len() as u64;
        let now = self.clock.now_ms();
        let ds = dataset.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("copy writer");
            apply_batch(&mut conn, &ds, &layout, &rows, received, advance, now).map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }

    async fn get(&self, dataset: &str, key: &str) -> Result<Option<CopyRecord>, StoreError> {
        let key = key.to_owned();
        self.read(dataset, move |conn, layout| get_live(conn, layout, &key))
            .await
    }

    async fn get_with_cursor(
        &self,
        dataset: &str,
        key: &str,
    ) -> Result<(Cursor, Option<CopyRecord>), StoreError> {
        let key = key.to_owned();
        let ds = dataset.to_owned();
        self.read(dataset, move |conn, layout| {
            // One read transaction: cursor and record from the same snapshot.
            let tx = conn.unchecked_transaction().map_err(unavailable)?;
            let cursor = read_cursor(&tx, &ds)?;
            Ok((cursor, get_live(&tx, layout, &key)?))
        })
        .await
    }

    async fn count(&self, dataset: &str) -> Result<u64, StoreError> {
        self.read(dataset, move |conn, layout| {
            conn.query_row(
                &format!(
                    "SELECT COUNT(*) FROM {} WHERE _spoke_deleted_at IS NULL",
                    layout.base
                ),
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }

    async fn gc_tombstones(
        &self,
        dataset: &str,
        now_ms: u64,
        horizon_ms: u64,
    ) -> Result<u64, StoreError> {
        let writer = self.writer()?;
        let layout = {
            let conn = writer.lock().expect("copy writer");
            layout_of(&self.layouts, &conn, dataset)?
        };
        let ds = dataset.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("copy writer");
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute("UPDATE _spoke_guard SET agent_writing = 1 WHERE id = 1", [])?;
            let mut delta = DigestDelta::new();
            let mut n = 0u64;
            {
                let mut stmt = tx.prepare(&format!(
                    "DELETE FROM {} WHERE _spoke_deleted_at IS NOT NULL AND _spoke_deleted_at < ?1
                     RETURNING _spoke_key, _spoke_version",
                    layout.base
                ))?;
                let mut rows = stmt.query([now_ms.saturating_sub(horizon_ms) as i64])?;
                while let Some(r) = rows.next()? {
                    let key = r.get_ref(0)?.as_str()?;
                    let version = r.get::<_, i64>(1)? as Version;
                    delta.xor(bucket_of(key), entry_hash(key, version, true));
                    n += 1;
                }
            }
            write_digest_delta(&tx, "_spoke_digest", &ds, &delta)?;
            tx.execute("UPDATE _spoke_guard SET agent_writing = 0 WHERE id = 1", [])?;
            tx.commit()?;
            Ok(n)
        })
        .await
        .map_err(unavailable)?
        .map_err(|e: rusqlite::Error| unavailable(e))
    }

    async fn digest(&self, dataset: &str) -> Result<Digest, StoreError> {
        let ds = dataset.to_owned();
        self.read(dataset, move |conn, _| {
            read_digest(conn, "_spoke_digest", &ds).map_err(unavailable)
        })
        .await
    }

    async fn bucket_entries(
        &self,
        dataset: &str,
        buckets: &[u16],
    ) -> Result<Vec<DigestEntry>, StoreError> {
        let buckets = buckets.to_vec();
        let ds = dataset.to_owned();
        self.read(dataset, move |conn, layout| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT _spoke_key, _spoke_version, _spoke_deleted_at IS NOT NULL FROM {} INDEXED BY \"_spoke_copy_{ds}_bucket\" WHERE _spoke_bucket = ?1",
                    layout.base
                ))
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for b in buckets {
                let rows = stmt
                    .query_map([i64::from(b)], |r| {
                        Ok(DigestEntry::new(
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)? as Version,
                            r.get(2)?,
                        ))
                    })
                    .map_err(unavailable)?;
                for e in rows {
                    out.push(e.map_err(unavailable)?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn remove(&self, dataset: &str, entries: &[DigestEntry]) -> Result<u64, StoreError> {
        let writer = self.writer()?;
        let layout = {
            let conn = writer.lock().expect("copy writer");
            layout_of(&self.layouts, &conn, dataset)?
        };
        let entries = entries.to_vec();
        let ds = dataset.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("copy writer");
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute("UPDATE _spoke_guard SET agent_writing = 1 WHERE id = 1", [])?;
            let mut delta = DigestDelta::new();
            let mut n = 0u64;
            {
                let mut del = tx.prepare_cached(&format!(
                    "DELETE FROM {} WHERE _spoke_key = ?1 AND _spoke_version = ?2 AND (_spoke_deleted_at IS NOT NULL) = ?3",
                    layout.base
                ))?;
                for e in &entries {
                    if del.execute(params![e.key, e.version as i64, e.deleted])? > 0 {
                        delta.xor(e.bucket(), e.hash());
                        n += 1;
                    }
                }
            }
            write_digest_delta(&tx, "_spoke_digest", &ds, &delta)?;
            tx.execute("UPDATE _spoke_guard SET agent_writing = 0 WHERE id = 1", [])?;
            tx.commit()?;
            Ok(n)
        })
        .await
        .map_err(unavailable)?
        .map_err(|e: rusqlite::Error| unavailable(e))
    }

    async fn reconcile_stats(&self, dataset: &str) -> Result<ReconcileStats, StoreError> {
        let ds = dataset.to_owned();
        self.read(dataset, move |conn, _| {
            let row = conn.query_row(
                "SELECT runs_total, last_run_ms, last_duration_ms, last_repaired, missing_total, stale_total, extra_total
                 FROM _spoke_reconcile WHERE dataset = ?1",
                [&ds],
                |r| {
                    Ok(ReconcileStats {
                        runs_total: r.get::<_, i64>(0)? as u64,
                        last_run_ms: r.get::<_, i64>(1)? as u64,
                        last_duration_ms: r.get::<_, i64>(2)? as u64,
                        last_repaired: r.get::<_, i64>(3)? as u64,
                        repaired_missing_total: r.get::<_, i64>(4)? as u64,
                        repaired_stale_total: r.get::<_, i64>(5)? as u64,
                        repaired_extra_total: r.get::<_, i64>(6)? as u64,
                    })
                },
            );
            match row {
                Ok(s) => Ok(s),
                Err(rusqlite::Error::QueryReturnedNoRows) => Ok(ReconcileStats::default()),
                // A store written before reconciliation existed, opened read-only.
                Err(e) if e.to_string().contains("no such table") => Ok(ReconcileStats::default()),
                Err(e) => Err(unavailable(e)),
            }
        })
        .await
    }

    async fn record_reconcile(&self, dataset: &str, run: &ReconcileRun) -> Result<(), StoreError> {
        let writer = self.writer()?;
        let ds = dataset.to_owned();
        let run = *run;
        tokio::task::spawn_blocking(move || {
            let conn = writer.lock().expect("copy writer");
            conn.execute(
                "INSERT INTO _spoke_reconcile (dataset, runs_total, last_run_ms, last_duration_ms, last_repaired, missing_total, stale_total, extra_total)
                 VALUES (?1, 1, ?2, ?3, ?4 + ?5 + ?6, ?4, ?5, ?6)
                 ON CONFLICT (dataset) DO UPDATE SET runs_total = runs_total + 1, last_run_ms = excluded.last_run_ms,
                    last_duration_ms = excluded.last_duration_ms, last_repaired = excluded.last_repaired,
                    missing_total = missing_total + excluded.missing_total, stale_total = stale_total + excluded.stale_total,
                    extra_total = extra_total + excluded.extra_total",
                params![ds, run.started_ms as i64, run.duration_ms as i64, run.missing as i64, run.stale as i64, run.extra as i64],
            )
            .map(|_| ())
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    async fn hold(&self, dataset: &str, held: &[Held]) -> Result<(), StoreError> {
        let writer = self.writer()?;
        let ds = dataset.to_owned();
        let rows = held
            .iter()
            .map(|h| {
                Ok((
                    h.change.key.clone(),
                    h.change.version as i64,
                    h.position.map(|p| p as i64),
                    h.reason.clone(),
                    h.held_at_ms as i64,
                    serde_json::to_string(&h.change)?,
                ))
            })
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(unavailable)?;
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("copy writer");
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO _spoke_quarantine (dataset, key, version, position, reason, held_at_ms, change) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for (key, version, position, reason, at, change) in &rows {
                    stmt.execute(params![ds, key, version, position, reason, at, change])?;
                }
            }
            tx.commit()
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    async fn held(&self, dataset: &str, limit: usize) -> Result<Vec<Held>, StoreError> {
        let ds = dataset.to_owned();
        self.read(dataset, move |conn, _| {
            let mut stmt = match conn.prepare_cached(
                "SELECT change, position, reason, held_at_ms FROM _spoke_quarantine WHERE dataset = ?1 ORDER BY held_at_ms, position, key LIMIT ?2",
            ) {
                Ok(s) => s,
                Err(e) if e.to_string().contains("no such table") => return Ok(Vec::new()),
                Err(e) => return Err(unavailable(e)),
            };
            let rows = stmt
                .query_map(params![ds, limit.min(i64::MAX as usize) as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
                })
                .map_err(unavailable)?;
            rows.map(|row| {
                let (change, position, reason, at) = row.map_err(unavailable)?;
                Ok(Held {
                    change: serde_json::from_str(&change).map_err(|e| StoreError::Layout(format!("a held change of {ds} is unreadable: {e}")))?,
                    position: position.map(|p| p as u64),
                    reason,
                    held_at_ms: at as u64,
                })
            })
            .collect()
        })
        .await
    }

    async fn held_count(&self, dataset: &str) -> Result<u64, StoreError> {
        let ds = dataset.to_owned();
        self.read(dataset, move |conn, _| {
            match conn.query_row(
                "SELECT count(*) FROM _spoke_quarantine WHERE dataset = ?1",
                [&ds],
                |r| r.get::<_, i64>(0),
            ) {
                Ok(n) => Ok(n as u64),
                Err(e) if e.to_string().contains("no such table") => Ok(0),
                Err(e) => Err(unavailable(e)),
            }
        })
        .await
    }

    async fn release(&self, dataset: &str, held: &[(String, Version)]) -> Result<u64, StoreError> {
        let writer = self.writer()?;
        let ds = dataset.to_owned();
        let held = held.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("copy writer");
            let tx = conn.transaction()?;
            let mut n = 0;
            {
                let mut stmt = tx.prepare_cached("DELETE FROM _spoke_quarantine WHERE dataset = ?1 AND key = ?2 AND version = ?3")?;
                for (key, version) in &held {
                    n += stmt.execute(params![ds, key, *version as i64])? as u64;
                }
            }
            tx.commit()?;
            Ok::<u64, rusqlite::Error>(n)
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    async fn dump(
        &self,
        dataset: &str,
    ) -> Result<BTreeMap<String, (Version, bool, Map<String, Value>)>, StoreError> {
        self.read(dataset, move |conn, layout| {
            let mut stmt = conn.prepare(&layout.select).map_err(unavailable)?;
            let rows = stmt
                .query_map([], |r| layout.row_to_record(r))
                .map_err(unavailable)?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (k, v, d, f) = row.map_err(unavailable)?;
                out.insert(k, (v, d, f));
            }
            Ok(out)
        })
        .await
    }
}

/// The SQL arguments of a batch, built on the caller's thread so the
/// blocking task gets one flat copy of what it binds rather than a clone of
/// every change (dataset, owner and field map included).
///
/// Only the newest change per key is kept ([`newest_per_key`]); the others
/// could not change the copy.
struct Rows {
    ops: Vec<Op>,
    /// Per change, `stride` values: key, version, bucket, then one per
    /// column of the layout (NULL for deletes).
    values: Vec<SqlValue>,
    stride: usize,
    /// Per change: key, version, its bucket and the digest hash of its new state.
    digest: Vec<(String, Version, u16, u128)>,
    /// The keys as one JSON array, for the batch's look-up of old states.
    keys_json: String,
}

impl Rows {
    fn new(layout: &Layout, changes: &[Change]) -> Self {
        let newest = newest_per_key(changes);
        let stride = layout.columns.len() + 3;
        let mut rows = Rows {
            ops: Vec::with_capacity(newest.len()),
            values: Vec::with_capacity(newest.len() * stride),
            stride,
            digest: Vec::with_capacity(newest.len()),
            keys_json: String::new(),
        };
        for c in newest {
            rows.ops.push(c.op);
            rows.values.push(SqlValue::Text(c.key.clone()));
            rows.values.push(SqlValue::Integer(c.version as i64));
            let bucket = bucket_of(&c.key);
            rows.values.push(SqlValue::Integer(i64::from(bucket)));
            rows.digest.push((
                c.key.clone(),
                c.version,
                bucket,
                entry_hash(&c.key, c.version, c.op == Op::Delete),
            ));
            match c.op {
                Op::Upsert => push_columns(&mut rows.values, &layout.columns, &c.fields),
                Op::Delete => rows
                    .values
                    .extend(std::iter::repeat_n(SqlValue::Null, layout.columns.len())),
            }
        }
        let keys: Vec<&str> = rows.digest.iter().map(|(k, ..)| k.as_str()).collect();
        rows.keys_json = serde_json::to_string(&keys).unwrap_or_else(|_| "[]".into());
        rows
    }

    fn iter(&self) -> impl Iterator<Item = (Op, &[SqlValue], &(String, Version, u16, u128))> {
        self.ops
            .iter()
            .copied()
            .zip(self.values.chunks_exact(self.stride))
            .zip(&self.digest)
            .map(|((op, values), digest)| (op, values, digest))
    }
}

/// Appends one value per column. The agent projects fields in column order,
/// so that order is tried first; any other map falls back to look-ups by name.
fn push_columns(
    out: &mut Vec<SqlValue>,
    columns: &[(String, FieldSpec)],
    fields: &Map<String, Value>,
) {
    let in_order = fields.len() == columns.len()
        && columns
            .iter()
            .zip(fields.iter())
            .all(|((name, _), (k, _))| name == k);
    if in_order {
        out.extend(
            columns
                .iter()
                .zip(fields.values())
                .map(|((_, spec), v)| to_sql(spec.ty, Some(v))),
        );
    } else {
        out.extend(
            columns
                .iter()
                .map(|(name, spec)| to_sql(spec.ty, fields.get(name))),
        );
    }
}

/// One apply transaction: records, digest, cursor and counters together.
fn apply_batch(
    conn: &mut Connection,
    dataset: &str,
    layout: &Layout,
    rows: &Rows,
    received: u64,
    advance: Advance,
    now_ms: u64,
) -> rusqlite::Result<ApplyOutcome> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.prepare_cached("UPDATE _spoke_guard SET agent_writing = 1 WHERE id = 1")?
        .execute([])?;
    let mut out = ApplyOutcome::default();
    let mut delta = DigestDelta::new();
    {
        // The old (rowid, version, deleted) of every key of the batch, by index.
        let mut old: Vec<Option<(i64, i64, bool)>> = vec![None; rows.ops.len()];
        if !old.is_empty() {
            let mut stmt = tx.prepare_cached(&layout.old_states)?;
            let mut found = stmt.query([&rows.keys_json])?;
            while let Some(r) = found.next()? {
                let i: i64 = r.get(0)?;
                if let Some(slot) = old.get_mut(i as usize) {
                    *slot = Some((r.get(1)?, r.get(2)?, r.get(3)?));
                }
            }
        }
        let mut insert_live = tx.prepare_cached(&layout.insert_live)?;
        let mut insert_tombstone = tx.prepare_cached(&layout.insert_tombstone)?;
        let mut update_live = tx.prepare_cached(&layout.update_live)?;
        let mut update_tombstone = tx.prepare_cached(&layout.update_tombstone)?;
        let now = SqlValue::Integer(now_ms as i64);
        for ((op, values, (key, version, bucket, new_hash)), old) in rows.iter().zip(old) {
            let n = match (old, op) {
                // The apply rule: only a newer version changes the copy.
                (Some((_, v, _)), _) if v as Version >= *version => continue,
                (None, Op::Upsert) => insert_live.execute(rusqlite::params_from_iter(values))?,
                (None, Op::Delete) => {
                    insert_tombstone.execute(params![values[0], values[1], values[2], now])?
                }
                (Some((rowid, ..)), Op::Upsert) => update_live.execute(
                    rusqlite::params_from_iter(values.iter().chain([&SqlValue::Integer(rowid)])),
                )?,
                (Some((rowid, ..)), Op::Delete) => {
                    update_tombstone.execute(params![rowid, values[1], now])?
                }
            };
            if n > 0 {
                out.applied += 1;
                let old_hash = old.map_or(0, |(_, v, d)| entry_hash(key, v as Version, d));
                delta.xor(*bucket, old_hash ^ new_hash);
            }
        }
    }
    write_digest_delta(&tx, "_spoke_digest", dataset, &delta)?;
    out.ignored = received - out.applied;
    let received = if advance.from_feed {
        received as i64
    } else {
        0
    };
    tx.prepare_cached(
        "UPDATE _spoke_copies SET position = COALESCE(?1, position), fresh_as_of_ms = COALESCE(?2, fresh_as_of_ms),
            received_total = received_total + ?3, applied_total = applied_total + ?4 WHERE dataset = ?5",
    )?
    .execute(params![advance.position.map(|p| p as i64), advance.fresh_as_of_ms.map(|f| f as i64), received, out.applied as i64, dataset])?;
    tx.prepare_cached("UPDATE _spoke_guard SET agent_writing = 0 WHERE id = 1")?
        .execute([])?;
    tx.commit()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::conformance;

    #[tokio::test]
    async fn passes_the_copy_store_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        conformance::run(|clock| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = dir.path().join(format!("copy{i}.db"));
            async move { SqliteCopyStore::open_with_clock(&path, clock).unwrap() }
        })
        .await;
    }

    #[tokio::test]
    async fn a_copy_made_before_digests_gets_its_digest_built_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.db");
        let store = SqliteCopyStore::open(&path).unwrap();
        store.ensure_copy(&conformance::spec()).await.unwrap();
        let changes: Vec<Change> = (0..300)
            .map(|i| {
                if i % 7 == 0 {
                    conformance::delete(&format!("k{i}"), 2)
                } else {
                    conformance::upsert(&format!("k{i}"), 1 + i % 3, i as i64)
                }
            })
            .collect();
        store
            .apply("items", &changes, conformance::feed_advance(1, 1))
            .await
            .unwrap();
        let want = conformance::digest_from_scratch(&store, "items").await;
        assert_eq!(store.digest("items").await.unwrap(), want);
        drop(store);
        // Back to the layout of a copy made before digests.
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "DROP INDEX \"_spoke_copy_items_bucket\";
             ALTER TABLE _spoke_copy_items DROP COLUMN _spoke_bucket;
             DELETE FROM _spoke_digest;",
        )
        .unwrap();
        drop(old);
        let store = SqliteCopyStore::open(&path).unwrap();
        store.ensure_copy(&conformance::spec()).await.unwrap();
        assert_eq!(
            store.digest("items").await.unwrap(),
            want,
            "rebuilt on open"
        );
        let all: Vec<u16> = (0..BUCKETS as u16).collect();
        assert_eq!(
            store.bucket_entries("items", &all).await.unwrap().len(),
            300
        );
        store
            .apply(
                "items",
                &[conformance::upsert("k0", 9, 9)],
                conformance::feed_advance(2, 1),
            )
            .await
            .unwrap();
        assert_eq!(
            store.digest("items").await.unwrap(),
            conformance::digest_from_scratch(&store, "items").await,
            "and maintained from then on"
        );
        store
            .ensure_copy(&conformance::spec())
            .await
            .expect("idempotent");
    }

    #[tokio::test]
    async fn writes_from_another_connection_are_refused_with_the_owner_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.db");
        let store = SqliteCopyStore::open(&path).unwrap();
        let spec = conformance::spec();
        store.ensure_copy(&spec).await.unwrap();
        store
            .apply(
                "items",
                &[conformance::upsert("a", 1, 1)],
                conformance::feed_advance(1, 1),
            )
            .await
            .unwrap();

        let other = Connection::open(&path).unwrap();
        let expected = "items is a read-only copy of dataset items owned by owner-svc";
        for sql in [
            "UPDATE items SET n = 5",
            "DELETE FROM items",
            "INSERT INTO items (id, n) VALUES ('z', 1)",
            "UPDATE _spoke_copy_items SET n = 5",
            "DELETE FROM _spoke_copy_items",
            "INSERT INTO _spoke_copy_items (_spoke_key, _spoke_version) VALUES ('z', 9)",
        ] {
            let err = other.execute(sql, []).expect_err(sql).to_string();
            assert!(err.contains(expected), "{sql}: {err}");
        }
        // The copy is unchanged, and a service can still read and JOIN it.
        let n: i64 = other
            .query_row("SELECT n FROM items WHERE id = 'a'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        // The agent can still write after the refusals.
        store
            .apply(
                "items",
                &[conformance::upsert("a", 2, 2)],
                conformance::feed_advance(2, 1),
            )
            .await
            .unwrap();
        let n: i64 = other
            .query_row("SELECT n FROM items WHERE id = 'a'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn a_changed_projection_is_a_layout_error_not_a_silent_mix() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteCopyStore::open(&dir.path().join("c.db")).unwrap();
        let spec = conformance::spec();
        store.ensure_copy(&spec).await.unwrap();
        store.ensure_copy(&spec).await.expect("idempotent");
        let mut wider = spec.clone();
        let schema = conformance::schema();
        let names: Vec<String> = ["n", "label", "flag", "score", "at", "meta", "secret"]
            .map(String::from)
            .to_vec();
        wider.projection = spoke_core::Projection::new(&schema, &names).unwrap();
        let e = store.ensure_copy(&wider).await.unwrap_err().to_string();
        assert!(
            e.contains("now projects") && e.contains("cannot become in place"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn fields_in_any_order_land_in_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteCopyStore::open(&dir.path().join("c.db")).unwrap();
        store.ensure_copy(&conformance::spec()).await.unwrap();
        // Column order is n, label, flag, score, at, meta; give the fields
        // reversed, with some missing, as a hand-built change might.
        let mut c = conformance::upsert("a", 1, 0);
        c.fields = serde_json::json!({"meta": {"x": 1}, "score": 1.5, "label": "L", "n": 7})
            .as_object()
            .cloned()
            .unwrap();
        // And one in column order, as the agent projects them.
        let d = conformance::upsert("b", 1, 9);
        store
            .apply("items", &[c, d], conformance::feed_advance(2, 1))
            .await
            .unwrap();
        let a = store.get("items", "a").await.unwrap().unwrap().fields;
        assert_eq!(
            Value::Object(a),
            serde_json::json!({"n": 7, "label": "L", "flag": null, "score": 1.5, "at": null, "meta": {"x": 1}})
        );
        let b = store.get("items", "b").await.unwrap().unwrap().fields;
        assert_eq!(b["n"], serde_json::json!(9));
        assert_eq!(b["label"], Value::Null);
    }

    #[tokio::test]
    async fn the_agent_connection_writes_but_others_still_run_the_guard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteCopyStore::open(&path).unwrap();
        store.ensure_copy(&conformance::spec()).await.unwrap();
        store
            .apply(
                "items",
                &[conformance::upsert("a", 1, 1)],
                conformance::feed_advance(1, 1),
            )
            .await
            .unwrap();
        // The flag is never left set, whatever the writer's trigger setting.
        let other = Connection::open(&path).unwrap();
        let flag: i64 = other
            .query_row("SELECT agent_writing FROM _spoke_guard", [], |r| r.get(0))
            .unwrap();
        assert_eq!(flag, 0);
        assert!(other.execute("DELETE FROM _spoke_copy_items", []).is_err());
        // A second store on the same file (a restarted agent) writes too.
        drop(store);
        let again = SqliteCopyStore::open(&path).unwrap();
        again
            .apply(
                "items",
                &[conformance::delete("a", 2)],
                conformance::feed_advance(2, 1),
            )
            .await
            .unwrap();
        assert!(again.get("items", "a").await.unwrap().is_none());
    }
}
