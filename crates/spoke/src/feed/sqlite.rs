//! The embedded feed: a durable log and compacted state per dataset in one
//! SQLite file (WAL mode), served by `spoke hub`.
//!
//! ```text
//!  publish(batch) ─▶ BEGIN IMMEDIATE
//!                     for each change: version in `state`? newer ─▶ INSERT log, UPSERT state, XOR digest delta
//!                     rewrite the touched `digest` chunks
//!                   COMMIT (synchronous=FULL) ─▶ head watch ─▶ wakes long-polls
//!  Checkpointer thread, own connection: every 500 ms wal_checkpoint(PASSIVE)
//!                   (so no publish waits for WAL pages to be copied into the file)
//! ```
//!
//! The compacted state's digest (see [`spoke_core::digest`]) lives in the
//! `digest` table as 64 chunks of 64 bucket hashes per dataset, updated in
//! the publish transaction from each key's old and new `(version, deleted)`;
//! `state.bucket` (written once per key) and the covering index
//! `state_entries (dataset, bucket, key, version, op)` list a bucket's keys
//! from a few contiguous index pages; the index costs one more B-tree update
//! per published change. A hub file from before digests is migrated at open.
//!
//! SQLite was chosen because it is embedded (no server to run), its WAL gives
//! concurrent readers beside the single writer, and batched commits reach
//! hundreds of thousands of rows per second on a small machine. The log is
//! kept whole; the `state` table is the compacted view used for snapshots.
//! Writes go through one connection behind a mutex (SQLite allows one writer
//! anyway); reads use a small pool of read connections.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use spoke_core::digest::{
    bucket_of, entry_hash, Digest, DigestDelta, DigestEntry, DigestNodes, DigestQuery,
};
use spoke_core::{decide, Change, Decision, Manifest, Op, Schema};
use tokio::sync::watch;

use super::{
    check_after_key, check_digest_request, Catalog, ChangeInput, Feed, FeedBatch, FeedEntry,
    FeedError, Position, PublishReceipt, Publisher, SnapshotPage, MAX_PAGE,
};
use crate::clock::Clock;
use crate::copy::sqlite::{read_digest, write_digest, write_digest_delta};

/// Page cache of the hub's writer connection, in KiB.
const WRITER_CACHE_KIB: i64 = 64 * 1024;
/// WAL pages after which a commit checkpoints itself, should the
/// [`Checkpointer`] fall behind (SQLite's default: 1,000).
const WAL_BACKSTOP_PAGES: i64 = 16_000;
/// How often the [`Checkpointer`] copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Copies committed WAL pages into the database file on its own thread and
/// connection (`wal_checkpoint(PASSIVE)`: it never blocks the writer or
/// readers), so that publishes do not; stopped and joined on drop.
struct Checkpointer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> rusqlite::Result<Self> {
        let conn = open(path)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("spoke-hub-checkpoint".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::park_timeout(CHECKPOINT_EVERY);
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!("hub store checkpoint: {e}");
                    }
                }
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS log (
    dataset TEXT NOT NULL,
    pos INTEGER NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    op TEXT NOT NULL,
    fields TEXT NOT NULL,
    owner TEXT NOT NULL,
    ts INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    PRIMARY KEY (dataset, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    dataset TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    op TEXT NOT NULL,
    fields TEXT NOT NULL,
    owner TEXT NOT NULL,
    ts INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    bucket INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digest (
    dataset TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    hashes BLOB NOT NULL,
    PRIMARY KEY (dataset, chunk)
);
";

/// Adds the bucket column and the digests to a hub file from before
/// digests (idempotent), then makes sure the bucket index exists.
fn migrate_digest(conn: &mut Connection) -> rusqlite::Result<()> {
    let has_bucket: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('state') WHERE name = 'bucket'",
        [],
        |r| r.get(0),
    )?;
    if has_bucket == 0 {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch("ALTER TABLE state ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0")?;
        let rows: Vec<(String, String, i64, String)> = {
            let mut stmt = tx.prepare("SELECT dataset, key, version, op FROM state")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut digests: HashMap<String, Digest> = HashMap::new();
        {
            let mut set =
                tx.prepare("UPDATE state SET bucket = ?1 WHERE dataset = ?2 AND key = ?3")?;
            for (ds, key, version, op) in &rows {
                set.execute(params![bucket_of(key), ds, key])?;
                digests
                    .entry(ds.clone())
                    .or_default()
                    .toggle(key, *version as u64, op == "delete");
            }
        }
        for (ds, d) in &digests {
            write_digest(&tx, "digest", ds, d)?;
        }
        tx.commit()?;
        tracing::info!(
            rows = rows.len(),
            "built the digests of a hub file made before digests existed"
        );
    }
    // Covering, so listing a bucket reads a few contiguous index pages
    // instead of one table look-up per key.
    conn.execute_batch(
        "DROP INDEX IF EXISTS state_bucket;
         CREATE INDEX IF NOT EXISTS state_entries ON state (dataset, bucket, key, version, op);",
    )
}

fn unavailable(e: impl std::fmt::Display) -> FeedError {
    FeedError::Unavailable(format!("hub store: {e}"))
}

pub struct SqliteFeed {
    catalog: Catalog,
    clock: Clock,
    path: std::path::PathBuf,
    writer: Arc<Mutex<Connection>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    heads: Arc<HashMap<String, watch::Sender<Position>>>,
    _checkpointer: Checkpointer,
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
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

impl SqliteFeed {
    /// Opens (creating if needed) the hub store at `path`.
    pub fn open(path: &Path, manifest: &Manifest) -> Result<Self, FeedError> {
        Self::open_with_clock(path, manifest, Clock::System)
    }

    pub fn open_with_clock(
        path: &Path,
        manifest: &Manifest,
        clock: Clock,
    ) -> Result<Self, FeedError> {
        let catalog = Catalog::new(manifest);
        let mut conn = open(path).map_err(unavailable)?;
        // The writer touches the log's tail, each key's state row and its
        // index entry: with SQLite's 2 MB default most of those pages are
        // read back from disk once the state outgrows it.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(unavailable)?;
        // A batch of changes to random keys dirties a page per key in the
        // state table and its index. Checkpointing in the commit (SQLite's
        // default, past 1,000 WAL pages) writes the same pages to the
        // database file after nearly every batch and makes that publish
        // wait for it. A thread beside the writer checkpoints instead
        // ([`Checkpointer`]); the commit-time threshold stays as a backstop.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)
            .map_err(unavailable)?;
        conn.execute_batch(SCHEMA_SQL).map_err(unavailable)?;
        migrate_digest(&mut conn).map_err(unavailable)?;
        let mut heads = HashMap::new();
        for name in catalog.names() {
            let head: Option<i64> = conn
                .query_row("SELECT MAX(pos) FROM log WHERE dataset = ?1", [name], |r| {
                    r.get(0)
                })
                .map_err(unavailable)?;
            heads.insert(
                name.to_owned(),
                watch::channel(head.unwrap_or(0) as Position).0,
            );
        }
        Ok(SqliteFeed {
            catalog,
            clock,
            path: path.to_owned(),
            writer: Arc::new(Mutex::new(conn)),
            readers: Arc::new(Mutex::new(Vec::new())),
            heads: Arc::new(heads),
            _checkpointer: Checkpointer::start(path).map_err(unavailable)?,
        })
    }

    fn head_tx(&self, dataset: &str) -> Result<&watch::Sender<Position>, FeedError> {
        self.heads
            .get(dataset)
            .ok_or_else(|| FeedError::UnknownDataset(dataset.to_owned()))
    }

    /// Runs `f` on a pooled read connection in the blocking pool.
    async fn with_reader<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, FeedError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.lock().expect("reader pool").pop();
            let conn = match conn {
                Some(c) => c,
                None => open(&path)?,
            };
            let out = f(&conn);
            readers.lock().expect("reader pool").push(conn);
            out
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }
}

#[async_trait]
impl Publisher for SqliteFeed {
    fn catalog(&self) -> Option<&Catalog> {
        Some(&self.catalog)
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
        let dataset = dataset.to_owned();
        tokio::task::spawn_blocking(move || -> rusqlite::Result<PublishReceipt> {
            let mut conn = writer.lock().expect("hub writer");
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut head = *head_tx.borrow();
            let mut positions = Vec::with_capacity(changes.len());
            let mut ignored = 0;
            let mut delta = DigestDelta::new();
            {
                let mut get_version = tx.prepare_cached("SELECT version, op = 'delete' FROM state WHERE dataset = ?1 AND key = ?2")?;
                let mut insert_log = tx.prepare_cached(
                    "INSERT INTO log (dataset, pos, key, version, op, fields, owner, ts, schema_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                let mut upsert_state = tx.prepare_cached(
                    "INSERT INTO state (dataset, key, version, op, fields, owner, ts, schema_version, pos, bucket) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (dataset, key) DO UPDATE SET version = excluded.version, op = excluded.op, fields = excluded.fields,
                        owner = excluded.owner, ts = excluded.ts, schema_version = excluded.schema_version, pos = excluded.pos",
                )?;
                for c in &changes {
                    let local: Option<(i64, bool)> = get_version.query_row(params![dataset, c.key], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
                    if decide(local.map(|(v, _)| v as u64), c.version) == Decision::Ignore {
                        positions.push(None);
                        ignored += 1;
                        continue;
                    }
                    head += 1;
                    let fields = serde_json::to_string(&c.fields).unwrap_or_else(|_| "{}".into());
                    insert_log.execute(params![dataset, head as i64, c.key, c.version as i64, c.op.as_str(), fields, c.owner, c.ts as i64, c.schema_version])?;
                    let bucket = bucket_of(&c.key);
                    upsert_state.execute(params![dataset, c.key, c.version as i64, c.op.as_str(), fields, c.owner, c.ts as i64, c.schema_version, head as i64, bucket])?;
                    let mut h = entry_hash(&c.key, c.version, c.op == Op::Delete);
                    if let Some((v, d)) = local {
                        h ^= entry_hash(&c.key, v as u64, d);
                    }
                    delta.xor(bucket, h);
                    positions.push(Some(head));
                }
            }
            write_digest_delta(&tx, "digest", &dataset, &delta)?;
            tx.commit()?;
            // Published only after commit, still under the writer lock, so a
            // head value always names committed, readable positions.
            head_tx.send_replace(head);
            Ok(PublishReceipt { positions, ignored, head })
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }
}

#[async_trait]
impl Feed for SqliteFeed {
    async fn read(
        &self,
        dataset: &str,
        after: Position,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<FeedBatch, FeedError> {
        let mut rx = self.head_tx(dataset)?.subscribe();
        if *rx.borrow_and_update() <= after {
            let _ = tokio::time::timeout(wait, rx.wait_for(|h| *h > after)).await;
        }
        let head = *rx.borrow();
        let limit = limit.clamp(1, MAX_PAGE) as i64;
        let ds = dataset.to_owned();
        let entries = self
            .with_reader(move |conn| {
                let mut stmt = conn.prepare_cached("SELECT * FROM log WHERE dataset = ?1 AND pos > ?2 AND pos <= ?3 ORDER BY pos LIMIT ?4")?;
                let rows = stmt.query_map(params![ds, after as i64, head as i64, limit], |row| {
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
        let head = *self.head_tx(dataset)?.borrow();
        check_after_key(after_key)?;
        let limit = limit.clamp(1, MAX_PAGE);
        let ds = dataset.to_owned();
        let after = after_key.map(str::to_owned);
        let mut records = self
            .with_reader(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT * FROM state WHERE dataset = ?1 AND (?2 IS NULL OR key > ?2) ORDER BY key LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![ds, after, (limit + 1) as i64], |row| row_to_change(&ds, row))?;
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
        let ds = dataset.to_owned();
        let digest = self
            .with_reader(move |conn| read_digest(conn, "digest", &ds))
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
        let ds = dataset.to_owned();
        let buckets = buckets.to_vec();
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(
                // Without statistics SQLite prefers the primary key's dataset
                // prefix (a scan of the dataset); the covering bucket index
                // keeps this proportional to the bucket's size.
                "SELECT key, version, op = 'delete' FROM state INDEXED BY state_entries WHERE dataset = ?1 AND bucket = ?2",
            )?;
            let mut out = Vec::new();
            for b in buckets {
                let rows = stmt.query_map(params![ds, b], |r| {
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

    async fn records(&self, dataset: &str, keys: &[String]) -> Result<Vec<Change>, FeedError> {
        self.catalog.get(dataset)?;
        check_digest_request(&[], keys.len())?;
        let ds = dataset.to_owned();
        let keys = keys.to_vec();
        self.with_reader(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT * FROM state WHERE dataset = ?1 AND key = ?2")?;
            let mut out = Vec::with_capacity(keys.len());
            for k in &keys {
                if let Some(c) = stmt
                    .query_row(params![ds, k], |row| row_to_change(&ds, row))
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

    #[tokio::test]
    async fn a_hub_file_from_before_digests_gets_its_digest_built_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let m = super::super::conformance::manifest();
        let memory = crate::feed::memory::MemoryFeed::new(&m);
        {
            let feed = SqliteFeed::open(&path, &m).unwrap();
            let f = serde_json::json!({"n": 1}).as_object().cloned().unwrap();
            let batch: Vec<ChangeInput> = (0..200)
                .map(|i| {
                    if i % 5 == 0 {
                        ChangeInput::delete(format!("k{i}"), 3)
                    } else {
                        ChangeInput::upsert(format!("k{i}"), 1, f.clone())
                    }
                })
                .collect();
            feed.publish("items", batch.clone()).await.unwrap();
            memory.publish("items", batch).await.unwrap();
        }
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "DROP INDEX state_entries; ALTER TABLE state DROP COLUMN bucket; DELETE FROM digest;",
        )
        .unwrap();
        drop(old);
        let feed = SqliteFeed::open(&path, &m).unwrap();
        for q in [DigestQuery::root(), DigestQuery::level(2)] {
            assert_eq!(
                feed.digest("items", &q).await.unwrap(),
                memory.digest("items", &q).await.unwrap()
            );
        }
        let some: Vec<u16> = (0..256).collect();
        assert_eq!(
            feed.bucket_entries("items", &some).await.unwrap().len(),
            memory.bucket_entries("items", &some).await.unwrap().len()
        );
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
