//! `snapshot_sql`: the owner's snapshot as a query against its PostgreSQL.
//!
//! ```text
//!  list:    SELECT q.key::text, q.version::bigint FROM (<snapshot_sql>) q
//!  records: SELECT q.key::text, q.version::bigint, to_jsonb(q) FROM (<snapshot_sql>) q
//!           WHERE q.key::text = ANY($1)
//! ```
//!
//! The query must return a `key` column, a `version` column (an integer
//! that grows with every change of the row, see [`super`]) and one column
//! per projected field, named like the field (`SELECT id AS key,
//! updated_version AS version, name, email FROM customers`). Column values
//! become JSON through `to_jsonb` (a `timestamptz` becomes an RFC 3339
//! string) and are checked against the schema like any owner record; other
//! columns are ignored. Each refresh opens one connection, marked
//! read-only (`default_transaction_read_only`), which its lookups reuse.
//!
//! The connection comes from the agent's deployment config
//! (`[agent.owner_postgres.<dataset>]`, password from the environment or a
//! file), never from the manifest; messages name that config path, never
//! the connection string.

use std::collections::HashSet;

use async_trait::async_trait;
use serde_json::Value;
use spoke_core::Projection;
use tokio_postgres::{Client, NoTls};

use super::{check_listing, Listed, SnapshotError, SnapshotRecord, SnapshotSource};
use crate::owner::{kind, project_checked};

/// Rows fetched per round trip of the listing cursor.
const LIST_CHUNK: i64 = 10_000;

/// One `snapshot_sql` source.
pub struct PostgresSnapshot {
    dataset: String,
    /// A libpq connection string, password included: never printed.
    conninfo: String,
    /// Where the connection was configured, for messages.
    label: String,
    sql: String,
    projection: Projection,
    /// One connection per refresh, reused by its lookups; reopened when
    /// closed (the next refresh after a failure starts afresh).
    client: tokio::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for PostgresSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSnapshot")
            .field("dataset", &self.dataset)
            .field("label", &self.label)
            .field("sql", &self.sql)
            .finish_non_exhaustive()
    }
}

impl PostgresSnapshot {
    /// A source for `dataset`: `sql` run over `conninfo`; `label` names
    /// where the connection was configured (e.g. `agent.owner_postgres.customers`).
    pub fn new(
        dataset: &str,
        conninfo: String,
        label: &str,
        sql: &str,
        projection: Projection,
    ) -> Self {
        PostgresSnapshot {
            dataset: dataset.to_owned(),
            conninfo,
            label: label.to_owned(),
            sql: sql.to_owned(),
            projection,
            client: tokio::sync::Mutex::new(None),
        }
    }

    fn error(&self, reason: String, transient: bool) -> SnapshotError {
        SnapshotError::Source {
            dataset: self.dataset.clone(),
            from: self.describe(),
            reason,
            transient,
        }
    }

    /// A database error with the server's message and a hint for the
    /// usual mistake (columns not named `key` and `version`).
    fn query_error(&self, what: &str, e: tokio_postgres::Error) -> SnapshotError {
        let Some(db) = e.as_db_error() else {
            // No server answer: the connection broke.
            return self.error(format!("{what}: {e}"), true);
        };
        let mut reason = format!("{what}: {}", db.message());
        if db.code() == &tokio_postgres::error::SqlState::UNDEFINED_COLUMN {
            reason.push_str(" (snapshot_sql must return columns named key and version, e.g. SELECT id AS key, updated_version AS version, …)");
        }
        self.error(reason, false)
    }

    /// The open connection, or a new one.
    async fn client(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, SnapshotError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.connect().await?);
        }
        Ok(tokio::sync::MutexGuard::map(slot, |c| {
            c.as_mut().expect("connected just above")
        }))
    }

    async fn connect(&self) -> Result<Client, SnapshotError> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo, NoTls)
            .await
            .map_err(|e| {
                // tokio-postgres never puts the password in its messages.
                self.error(format!("cannot connect: {e}"), true)
            })?;
        let dataset = self.dataset.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(dataset = %dataset, "snapshot connection ended: {e}");
            }
        });
        client
            .batch_execute("SET default_transaction_read_only = on; SET TimeZone = 'UTC'")
            .await
            .map_err(|e| self.query_error("session settings", e))?;
        Ok(client)
    }
}

/// A `version` value as a positive integer.
fn version_of(key: &str, v: Option<i64>) -> Result<u64, String> {
    match v {
        Some(n) if n > 0 => Ok(n as u64),
        Some(n) => Err(format!(
            "key '{}' has version {n}; versions are positive integers",
            super::shown(key)
        )),
        None => Err(format!(
            "key '{}' has a NULL version; every key needs its owner's version, which the apply rule compares",
            super::shown(key)
        )),
    }
}

#[async_trait]
impl SnapshotSource for PostgresSnapshot {
    fn describe(&self) -> String {
        format!("PostgreSQL ({})", self.label)
    }

    async fn list(
        &self,
        progress: &(dyn Fn(usize) + Send + Sync),
    ) -> Result<Vec<Listed>, SnapshotError> {
        // A fresh connection per listing, so a refresh never inherits a
        // session broken by the previous one.
        *self.client.lock().await = None;
        let mut client = self.client().await?;
        // One read-only transaction and a server-side cursor: a large
        // table is read in chunks, from one consistent snapshot.
        let tx = client
            .build_transaction()
            .read_only(true)
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(|e| self.query_error("begin", e))?;
        let list = format!(
            "SELECT q.key::text, q.version::bigint FROM ({}) q",
            self.sql
        );
        let portal = tx
            .bind(list.as_str(), &[])
            .await
            .map_err(|e| self.query_error("listing keys and versions", e))?;
        let mut listed = Vec::new();
        loop {
            let rows = tx
                .query_portal(&portal, LIST_CHUNK as i32)
                .await
                .map_err(|e| self.query_error("listing keys and versions", e))?;
            let n = rows.len();
            for (i, row) in rows.into_iter().enumerate() {
                let key: Option<String> = row.get(0);
                let key = key.ok_or_else(|| {
                    self.error(
                        format!("listing: row {} has a NULL key", listed.len() + i + 1),
                        false,
                    )
                })?;
                let version = version_of(&key, row.get(1))
                    .map_err(|e| self.error(format!("listing: {e}"), false))?;
                listed.push(Listed { key, version });
            }
            progress(listed.len());
            if (n as i64) < LIST_CHUNK {
                break;
            }
        }
        tx.commit()
            .await
            .map_err(|e| self.query_error("commit", e))?;
        check_listing(&listed).map_err(|e| self.error(format!("listing: {e}"), false))?;
        Ok(listed)
    }

    async fn records(&self, keys: &[String]) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let sql = format!(
            "SELECT q.key::text, q.version::bigint, to_jsonb(q) FROM ({}) q WHERE q.key::text = ANY($1)",
            self.sql
        );
        let rows = client
            .query(sql.as_str(), &[&keys])
            .await
            .map_err(|e| self.query_error("reading full rows", e))?;
        let mut seen = HashSet::with_capacity(rows.len());
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let key: String = row.get::<_, Option<String>>(0).ok_or_else(|| {
                self.error("reading full rows: a row has a NULL key".into(), false)
            })?;
            if !seen.insert(key.clone()) {
                return Err(self.error(
                    format!(
                        "reading full rows: key '{}' is returned by more than one row; keys must be unique",
                        super::shown(&key)
                    ),
                    false,
                ));
            }
            let version = version_of(&key, row.get(1))
                .map_err(|e| self.error(format!("reading full rows: {e}"), false))?;
            let object = match row.get::<_, Value>(2) {
                Value::Object(o) => o,
                other => {
                    return Err(self.error(
                        format!(
                            "reading full rows: key '{}': a row is {}",
                            super::shown(&key),
                            kind(&other)
                        ),
                        false,
                    ))
                }
            };
            let fields = project_checked(&self.projection, &object).map_err(|e| {
                self.error(
                    format!("reading full rows: key '{}': {e}", super::shown(&key)),
                    false,
                )
            })?;
            out.push(SnapshotRecord {
                key,
                version,
                fields,
            });
        }
        Ok(out)
    }
}
