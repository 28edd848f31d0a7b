//! The transactional outbox for owners on SQLite.
//!
//! The owner calls [`upsert`] or [`delete`] with the same transaction that
//! writes its business row. Versions are bumped per key in `spoke_versions`
//! inside that transaction, so they increase in commit order. [`SqliteOutbox`]
//! is the [`Source`] the relay reads, over its own connection to the file.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection};
use serde_json::{Map, Value};
use spoke_core::{Op, Version};

use super::{Pending, Source, SourceError};
use crate::feed::ChangeInput;

/// Creates the outbox tables in the owner's database (idempotent).
pub fn install(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS spoke_outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            dataset TEXT NOT NULL,
            key TEXT NOT NULL,
            version INTEGER NOT NULL,
            op TEXT NOT NULL,
            fields TEXT NOT NULL,
            ts INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS spoke_versions (
            dataset TEXT NOT NULL,
            key TEXT NOT NULL,
            version INTEGER NOT NULL,
            PRIMARY KEY (dataset, key)
        ) WITHOUT ROWID;",
    )
}

fn bump(conn: &Connection, dataset: &str, key: &str) -> rusqlite::Result<Version> {
    conn.query_row(
        "INSERT INTO spoke_versions (dataset, key, version) VALUES (?1, ?2, 1)
         ON CONFLICT (dataset, key) DO UPDATE SET version = version + 1 RETURNING version",
        params![dataset, key],
        |r| r.get::<_, i64>(0).map(|v| v as Version),
    )
}

fn insert(
    conn: &Connection,
    dataset: &str,
    key: &str,
    version: Version,
    op: Op,
    fields: &Map<String, Value>,
) -> rusqlite::Result<()> {
    let fields = serde_json::to_string(fields)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.execute(
        "INSERT INTO spoke_outbox (dataset, key, version, op, fields, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![dataset, key, version as i64, op.as_str(), fields, crate::clock::now_ms() as i64],
    )?;
    Ok(())
}

/// Records an upsert of `key`'s full state in the caller's transaction;
/// returns the new version.
pub fn upsert(
    tx: &Connection,
    dataset: &str,
    key: &str,
    fields: &Map<String, Value>,
) -> rusqlite::Result<Version> {
    let v = bump(tx, dataset, key)?;
    insert(tx, dataset, key, v, Op::Upsert, fields)?;
    Ok(v)
}

/// Records a delete of `key` in the caller's transaction; returns the new version.
pub fn delete(tx: &Connection, dataset: &str, key: &str) -> rusqlite::Result<Version> {
    let v = bump(tx, dataset, key)?;
    insert(tx, dataset, key, v, Op::Delete, &Map::new())?;
    Ok(v)
}

/// The outbox as a [`Source`], over its own connection.
pub struct SqliteOutbox {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteOutbox {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let conn = Connection::open(path)
            .map_err(|e| SourceError::Unavailable(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| SourceError::Unavailable(e.to_string()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| SourceError::Unavailable(e.to_string()))?;
        install(&conn).map_err(|e| SourceError::Unavailable(e.to_string()))?;
        Ok(SqliteOutbox {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Rows not yet acknowledged.
    pub async fn backlog(&self) -> Result<u64, SourceError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            conn.lock()
                .expect("outbox")
                .query_row("SELECT COUNT(*) FROM spoke_outbox", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as u64)
        })
        .await
        .map_err(|e| SourceError::Unavailable(e.to_string()))?
        .map_err(|e| SourceError::Unavailable(e.to_string()))
    }
}

#[async_trait]
impl Source for SqliteOutbox {
    async fn pending(&self, max: usize) -> Result<Vec<Pending>, SourceError> {
        let conn = self.conn.clone();
        let rows = tokio::task::spawn_blocking(move || -> rusqlite::Result<Vec<(i64, String, String, i64, String, String, i64)>> {
            let conn = conn.lock().expect("outbox");
            let mut stmt = conn.prepare_cached("SELECT id, dataset, key, version, op, fields, ts FROM spoke_outbox ORDER BY id LIMIT ?1")?;
            let rows = stmt.query_map([max as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))?;
            rows.collect()
        })
        .await
        .map_err(|e| SourceError::Unavailable(e.to_string()))?
        .map_err(|e| SourceError::Unavailable(e.to_string()))?;
        rows.into_iter()
            .map(|(id, dataset, key, version, op, fields, ts)| {
                let id = id as u64;
                let op = match op.as_str() {
                    "upsert" => Op::Upsert,
                    "delete" => Op::Delete,
                    other => {
                        return Err(SourceError::Corrupt {
                            id,
                            message: format!("unknown op '{other}'"),
                        })
                    }
                };
                let fields: Map<String, Value> =
                    serde_json::from_str(&fields).map_err(|e| SourceError::Corrupt {
                        id,
                        message: format!("fields are not a JSON object: {e}"),
                    })?;
                Ok(Pending {
                    id,
                    dataset,
                    change: ChangeInput {
                        key,
                        version: version as Version,
                        op,
                        fields,
                        ts: Some(ts as u64),
                    },
                })
            })
            .collect()
    }

    async fn ack(&self, upto: u64) -> Result<(), SourceError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            conn.lock()
                .expect("outbox")
                .execute("DELETE FROM spoke_outbox WHERE id <= ?1", [upto as i64])
        })
        .await
        .map_err(|e| SourceError::Unavailable(e.to_string()))?
        .map_err(|e| SourceError::Unavailable(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn versions_bump_per_key_and_rollback_leaves_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owner.db");
        let mut conn = Connection::open(&path).unwrap();
        install(&conn).unwrap();
        let f = json!({"name": "Ada"}).as_object().cloned().unwrap();
        let tx = conn.transaction().unwrap();
        assert_eq!(upsert(&tx, "customers", "c1", &f).unwrap(), 1);
        assert_eq!(upsert(&tx, "customers", "c1", &f).unwrap(), 2);
        assert_eq!(upsert(&tx, "customers", "c2", &f).unwrap(), 1);
        tx.commit().unwrap();
        {
            let tx = conn.transaction().unwrap();
            assert_eq!(delete(&tx, "customers", "c1").unwrap(), 3);
            // Dropped without commit: the owner's transaction failed.
        }
        let outbox = SqliteOutbox::open(&path).unwrap();
        let p = outbox.pending(10).await.unwrap();
        assert_eq!(
            p.iter()
                .map(|p| (p.change.key.as_str(), p.change.version))
                .collect::<Vec<_>>(),
            vec![("c1", 1), ("c1", 2), ("c2", 1)]
        );
        outbox.ack(p[1].id).await.unwrap();
        let p = outbox.pending(10).await.unwrap();
        assert_eq!(p.len(), 1, "ack removes a prefix");
        let tx = conn.transaction().unwrap();
        assert_eq!(
            delete(&tx, "customers", "c1").unwrap(),
            3,
            "the rolled-back version is reused"
        );
        tx.commit().unwrap();
    }
}
