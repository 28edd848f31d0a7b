//! SQLite copies: the embedded default.
//!
//! Each copy is a base table holding live rows and tombstones, with the
//! projected fields as typed columns, and a view named after the dataset
//! that shows live rows only — the view is what a service queries and JOINs:
//!
//! ```text
//!   customers (VIEW)                      _spoke_copy_customers (TABLE)
//!   id | name | email | _spoke_version ◀── _spoke_key | name | email | _spoke_version | _spoke_deleted_at
//!                                         (rows with _spoke_deleted_at set are tombstones)
//!   _spoke_copies: dataset | owner | position | fresh_as_of_ms | received_total | applied_total
//! ```
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
use spoke_core::{Change, FieldSpec, FieldType, Op, Version};

use super::{
    newest_per_key, Advance, ApplyOutcome, CopyRecord, CopySpec, CopyStore, Cursor, StoreError,
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
";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The columns of one copy, as stored in `_spoke_copies.fields`.
#[derive(Debug, Clone)]
struct Layout {
    base: String,
    columns: Vec<(String, FieldSpec)>,
    upsert: String,
    delete: String,
    select: String,
}

impl Layout {
    fn new(dataset: &str, columns: Vec<(String, FieldSpec)>) -> Self {
        let base = format!("\"_spoke_copy_{dataset}\"");
        let names: Vec<String> = columns.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let placeholders: Vec<String> = (0..columns.len()).map(|i| format!("?{}", i + 3)).collect();
        let sets: Vec<String> = names
            .iter()
            .map(|n| format!("{n} = excluded.{n}"))
            .collect();
        let nulls: Vec<String> = names.iter().map(|n| format!("{n} = NULL")).collect();
        let comma = |v: &[String]| v.iter().map(|s| format!(", {s}")).collect::<String>();
        let upsert = format!(
            "INSERT INTO {base} (_spoke_key, _spoke_version, _spoke_deleted_at{}) VALUES (?1, ?2, NULL{})
             ON CONFLICT (_spoke_key) DO UPDATE SET _spoke_version = excluded._spoke_version, _spoke_deleted_at = NULL{}
             WHERE excluded._spoke_version > {base}._spoke_version",
            comma(&names),
            comma(&placeholders),
            comma(&sets),
        );
        let delete = format!(
            "INSERT INTO {base} (_spoke_key, _spoke_version, _spoke_deleted_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (_spoke_key) DO UPDATE SET _spoke_version = excluded._spoke_version, _spoke_deleted_at = excluded._spoke_deleted_at{}
             WHERE excluded._spoke_version > {base}._spoke_version",
            comma(&nulls),
        );
        let select = format!(
            "SELECT _spoke_key, _spoke_version, _spoke_deleted_at{} FROM {base}",
            comma(&names)
        );
        Layout {
            base,
            columns,
            upsert,
            delete,
            select,
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
        let reader = open_conn(path, false).map_err(unavailable)?;
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
        let reader = open_conn(path, true).map_err(unavailable)?;
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
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().expect("copy reader");
            let layout = layout_of(&layouts, &conn, &dataset)?;
            f(&conn, &layout)
        })
        .await
        .map_err(unavailable)?
    }
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
                    return Err(StoreError::Layout(format!(
                        "the copy of {ds} in this store holds fields {existing}, but the subscription now projects {fields_json}; drop the copy (DROP VIEW {ds}; DROP TABLE _spoke_copy_{ds}; DELETE FROM _spoke_copies WHERE dataset = '{ds}') and the agent rebuilds it from a snapshot"
                    )));
                }
            } else {
                let layout = Layout::new(ds, columns.clone());
                let base = &layout.base;
                let cols: String = columns.iter().map(|(n, s)| format!(", \"{n}\" {}", sql_type(s.ty))).collect();
                let view_cols: String = columns.iter().map(|(n, _)| format!(", \"{n}\"")).collect();
                let msg = read_only_message(ds, &spec.owner);
                let key = &spec.key_name;
                let mut sql = format!(
                    "CREATE TABLE {base} (_spoke_key TEXT PRIMARY KEY NOT NULL, _spoke_version INTEGER NOT NULL, _spoke_deleted_at INTEGER{cols});
                     CREATE VIEW \"{ds}\" AS SELECT _spoke_key AS \"{key}\"{view_cols}, _spoke_version FROM {base} WHERE _spoke_deleted_at IS NULL;"
                );
                for op in ["INSERT", "UPDATE", "DELETE"] {
                    sql.push_str(&format!(
                        "CREATE TRIGGER \"_spoke_ro_{ds}_{op}\" BEFORE {op} ON {base} WHEN (SELECT agent_writing FROM _spoke_guard WHERE id = 1) IS NOT 1
                         BEGIN SELECT RAISE(ABORT, '{msg}'); END;
                         CREATE TRIGGER \"_spoke_ro_{ds}_view_{op}\" INSTEAD OF {op} ON \"{ds}\" BEGIN SELECT RAISE(ABORT, '{msg}'); END;"
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
        self.read(dataset, move |conn, _| {
            conn.query_row(
                "SELECT position, fresh_as_of_ms, received_total, applied_total FROM _spoke_copies WHERE dataset = ?1",
                [&ds],
                |r| {
                    Ok(Cursor {
                        position: r.get::<_, Option<i64>>(0)?.map(|p| p as u64),
                        fresh_as_of_ms: r.get::<_, i64>(1)? as u64,
                        received_total: r.get::<_, i64>(2)? as u64,
                        applied_total: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .map_err(unavailable)
        })
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
        self.read(dataset, move |conn, layout| {
            let sql = format!(
                "{} WHERE _spoke_key = ?1 AND _spoke_deleted_at IS NULL",
                layout.select
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
            let rec = stmt
                .query_row([&key], |r| layout.row_to_record(r))
                .optional()
                .map_err(unavailable)?;
            Ok(rec.map(|(key, version, _, fields)| CopyRecord {
                key,
                version,
                fields,
            }))
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
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().expect("copy writer");
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute("UPDATE _spoke_guard SET agent_writing = 1 WHERE id = 1", [])?;
            let n = tx.execute(
                &format!(
                    "DELETE FROM {} WHERE _spoke_deleted_at IS NOT NULL AND _spoke_deleted_at < ?1",
                    layout.base
                ),
                [now_ms.saturating_sub(horizon_ms) as i64],
            )?;
            tx.execute("UPDATE _spoke_guard SET agent_writing = 0 WHERE id = 1", [])?;
            tx.commit()?;
            Ok(n as u64)
        })
        .await
        .map_err(unavailable)?
        .map_err(|e: rusqlite::Error| unavailable(e))
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
    /// Per change, `stride` values: key, version, then one per column of the
    /// layout (NULL for deletes).
    values: Vec<SqlValue>,
    stride: usize,
}

impl Rows {
    fn new(layout: &Layout, changes: &[Change]) -> Self {
        let newest = newest_per_key(changes);
        let stride = layout.columns.len() + 2;
        let mut rows = Rows {
            ops: Vec::with_capacity(newest.len()),
            values: Vec::with_capacity(newest.len() * stride),
            stride,
        };
        for c in newest {
            rows.ops.push(c.op);
            rows.values.push(SqlValue::Text(c.key.clone()));
            rows.values.push(SqlValue::Integer(c.version as i64));
            match c.op {
                Op::Upsert => push_columns(&mut rows.values, &layout.columns, &c.fields),
                Op::Delete => rows
                    .values
                    .extend(std::iter::repeat_n(SqlValue::Null, layout.columns.len())),
            }
        }
        rows
    }

    fn iter(&self) -> impl Iterator<Item = (Op, &[SqlValue])> {
        self.ops
            .iter()
            .copied()
            .zip(self.values.chunks_exact(self.stride))
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

/// One apply transaction: records, cursor and counters together.
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
    {
        let mut upsert = tx.prepare_cached(&layout.upsert)?;
        let mut delete = tx.prepare_cached(&layout.delete)?;
        for (op, values) in rows.iter() {
            let n = match op {
                Op::Upsert => upsert.execute(rusqlite::params_from_iter(values))?,
                Op::Delete => delete.execute(params![values[0], values[1], now_ms as i64])?,
            };
            if n > 0 {
                out.applied += 1;
            }
        }
    }
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
        let mut narrower = spec.clone();
        let schema = conformance::schema();
        narrower.projection = spoke_core::Projection::new(&schema, &["n".to_owned()]).unwrap();
        let e = store.ensure_copy(&narrower).await.unwrap_err().to_string();
        assert!(e.contains("now projects"), "{e}");
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
