//! The owner database's side of CDC: table checks, the publication, the
//! replication slot and the `spoke_cdc_state` progress table.
//!
//! ```text
//!  lock(slot) ─▶ inspect tables ─▶ ensure state table ─▶ ensure publication
//!       │
//!       ▼ prepare(): what the state and pg_replication_slots say
//!   no state, no slot ──────────▶ insert state (creating) ─▶ create slot ─▶ state.consistent_lsn = C
//!   state "creating" (crashed) ─▶ drop slot if any ─▶ create slot ─▶ state.consistent_lsn = C
//!   no state, slot exists ──────▶ SlotUnknown (never adopt a slot Spoke did not record)
//!   state, slot gone / lost ────▶ SlotLost (resnapshot)
//!   state, dataset missing ─────▶ NewDataset (resnapshot)
//!   --resnapshot ───────────────▶ drop slot, delete state, start over
//! ```
//!
//! # Contract
//! - One `spoke cdc` per slot: a session advisory lock is held for the
//!   process's lifetime; a second one gets [`CdcError::Busy`].
//! - The state row of a dataset is created before the slot and gets the
//!   slot's consistent point after it, so a crash between the two is
//!   recognised ("creating") and repaired without adopting a stranger's slot.
//! - A table is only accepted when its replica identity lets deletes carry
//!   the key (and the version column, when one is configured): otherwise
//!   PostgreSQL would either refuse the owner's deletes once published or
//!   send deletes Spoke cannot key.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::{ident, literal, parse_lsn, pg_error, CdcConfig, CdcError, TableMapping};

/// Session settings for every connection, so text output is the same on
/// the snapshot and stream paths.
pub const SESSION_SQL: &str =
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3";
/// The same settings as startup options of the replication connection.
pub const REPLICATION_OPTIONS: &str =
    "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres -c extra_float_digits=3";

/// Connects an ordinary (non-replication) session.
pub async fn connect(conninfo: &str) -> Result<Client, CdcError> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .map_err(|e| pg_error("connect", e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("cdc admin connection ended: {e}");
        }
    });
    client
        .batch_execute(SESSION_SQL)
        .await
        .map_err(|e| pg_error("session settings", e))?;
    Ok(client)
}

/// Takes the per-slot lock for this session, or fails with `Busy`.
pub async fn lock(client: &Client, slot: &str) -> Result<(), CdcError> {
    let got: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext($1))",
            &[&format!("spoke_cdc:{slot}")],
        )
        .await
        .map_err(|e| pg_error("advisory lock", e))?
        .get(0);
    if got {
        Ok(())
    } else {
        Err(CdcError::Busy(format!(
            "another spoke cdc process is running for slot '{slot}'"
        )))
    }
}

/// What the catalog says about a mapped table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub mapping: TableMapping,
    pub oid: u32,
    /// (name, type oid, `format_type` text) in column order.
    pub columns: Vec<(String, u32, String)>,
    pub rows_estimate: Option<u64>,
    /// `relreplident`: `d`, `n`, `f` or `i`.
    pub identity: String,
    /// Columns whose values may be stored out of line (TOAST).
    pub toastable: Vec<String>,
}

impl TableInfo {
    pub fn name_types(&self) -> Vec<(String, u32)> {
        self.columns
            .iter()
            .map(|(n, t, _)| (n.clone(), *t))
            .collect()
    }
    pub fn type_text(&self, column: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|(n, _, _)| n == column)
            .map(|(_, _, t)| t.as_str())
    }
}

/// Reads a table's columns and checks its replica identity.
pub async fn inspect(client: &Client, mapping: &TableMapping) -> Result<TableInfo, CdcError> {
    let table = mapping.qualified();
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, c.reltuples::float8 FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&mapping.schema, &mapping.table],
        )
        .await
        .map_err(|e| pg_error("inspect table", e))?
        .ok_or_else(|| {
            CdcError::Config(format!(
                "dataset '{}': table {table} does not exist",
                mapping.dataset
            ))
        })?;
    let oid: u32 = row.get(0);
    let identity: String = row.get(1);
    let reltuples: f64 = row.get(2);
    let rows = client
        .query(
            "SELECT attname::text, atttypid, format_type(atttypid, atttypmod), attstorage IN ('x', 'e') \
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error("inspect columns", e))?;
    let columns = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, u32>(1),
                r.get::<_, String>(2),
            )
        })
        .collect();
    let toastable = rows
        .iter()
        .filter(|r| r.get::<_, bool>(3))
        .map(|r| r.get::<_, String>(0))
        .collect();
    let identity_columns: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND (($2 = 'd' AND i.indisprimary) OR ($2 = 'i' AND i.indisreplident))",
            &[&oid, &identity],
        )
        .await
        .map_err(|e| pg_error("inspect replica identity", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    check_identity(mapping, &identity, &identity_columns)?;
    Ok(TableInfo {
        mapping: mapping.clone(),
        oid,
        columns,
        rows_estimate: (reltuples >= 0.0).then_some(reltuples as u64),
        identity,
        toastable,
    })
}

/// Whether deletes on the table will carry the key (and version) column.
pub fn check_identity(
    mapping: &TableMapping,
    identity: &str,
    identity_columns: &[String],
) -> Result<(), CdcError> {
    let table = mapping.qualified();
    let fix = format!("ALTER TABLE {} REPLICA IDENTITY FULL", mapping.sql_name());
    let fail = |message: String| {
        Err(CdcError::ReplicaIdentity {
            table: table.clone(),
            message,
        })
    };
    let has = |c: &str| identity_columns.iter().any(|i| i == c);
    match identity {
        "f" => Ok(()),
        "n" => fail(format!(
            "REPLICA IDENTITY NOTHING: deletes would not say which row went. Run: {fix}"
        )),
        "d" if identity_columns.is_empty() => fail(format!(
            "no primary key and REPLICA IDENTITY DEFAULT: once published, PostgreSQL refuses UPDATE and DELETE on it. Add a primary key on '{}' or run: {fix}",
            mapping.key
        )),
        _ if !has(&mapping.key) => fail(format!(
            "the replica identity ({}) does not include key column '{}', so a delete could not name its key. Run: {fix}",
            identity_columns.join(", "),
            mapping.key
        )),
        _ => match &mapping.version {
            Some(v) if !has(v) => fail(format!(
                "version column '{v}' is not in the replica identity, so a delete could not carry its version. Run: {fix}"
            )),
            _ => Ok(()),
        },
    }
}

/// Creates the progress table if needed.
pub async fn ensure_state_table(client: &Client, cfg: &CdcConfig) -> Result<(), CdcError> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                slot_name text NOT NULL,
                dataset text NOT NULL,
                table_name text NOT NULL,
                consistent_lsn pg_lsn,
                snapshot_done boolean NOT NULL DEFAULT false,
                last_key text,
                rows_done bigint NOT NULL DEFAULT 0,
                updated_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (slot_name, dataset))",
            cfg.state_sql()
        ))
        .await
        .map_err(|e| pg_error("create state table", e))
}

/// Creates the publication, or checks and completes an existing one.
pub async fn ensure_publication(client: &Client, cfg: &CdcConfig) -> Result<(), CdcError> {
    let p = &cfg.publication;
    let row = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[p],
        )
        .await
        .map_err(|e| pg_error("inspect publication", e))?;
    let tables: Vec<String> = cfg.tables.iter().map(TableMapping::sql_name).collect();
    match row {
        None => {
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    ident(p),
                    tables.join(", ")
                ))
                .await
                .map_err(|e| pg_error("create publication", e))?;
            tracing::info!("created publication {p} for {}", tables.join(", "));
        }
        Some(r) => {
            let (ins, upd, del, trunc): (bool, bool, bool, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if !(ins && upd && del && trunc) {
                return Err(CdcError::Config(format!(
                    "publication {p} does not publish every kind of change, so some would be lost silently; run: ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
                    ident(p)
                )));
            }
            let have: Vec<(String, String)> = client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[p],
                )
                .await
                .map_err(|e| pg_error("inspect publication tables", e))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            for t in &cfg.tables {
                if !have.contains(&(t.schema.clone(), t.table.clone())) {
                    client
                        .batch_execute(&format!(
                            "ALTER PUBLICATION {} ADD TABLE {}",
                            ident(p),
                            t.sql_name()
                        ))
                        .await
                        .map_err(|e| pg_error("add table to publication", e))?;
                    tracing::info!("added {} to publication {p}", t.qualified());
                }
            }
        }
    }
    Ok(())
}

/// A slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub wal_status: Option<String>,
    pub confirmed_flush: Option<u64>,
    pub restart_lsn: Option<u64>,
    pub active_pid: Option<i32>,
    /// current WAL − restart_lsn.
    pub retained_bytes: Option<u64>,
    /// current WAL − confirmed_flush_lsn.
    pub lag_bytes: Option<u64>,
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, CdcError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, wal_status, confirmed_flush_lsn::text, restart_lsn::text, active_pid, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| pg_error("inspect slot", e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        wal_status: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).as_deref().and_then(parse_lsn),
        restart_lsn: r.get::<_, Option<String>>(4).as_deref().and_then(parse_lsn),
        active_pid: r.get(5),
        retained_bytes: r.get::<_, Option<f64>>(6).map(|b| b.max(0.0) as u64),
        lag_bytes: r.get::<_, Option<f64>>(7).map(|b| b.max(0.0) as u64),
    }))
}

/// Creates the logical slot; returns its consistent point.
pub async fn create_slot(client: &Client, slot: &str) -> Result<u64, CdcError> {
    let lsn: String = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(|e| pg_error("create replication slot", e))?
        .get(0);
    let lsn = parse_lsn(&lsn).ok_or_else(|| CdcError::Stream(format!("bad slot LSN '{lsn}'")))?;
    tracing::info!("created replication slot {slot} at {}", super::fmt_lsn(lsn));
    Ok(lsn)
}

/// Drops the slot if it exists (it must not be in use).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), CdcError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| pg_error("drop replication slot", e))?;
    Ok(())
}

/// Waits until every transaction in progress now has ended, so everything
/// that committed before the slot's consistent point is visible to later
/// statements.
pub async fn wait_for_running_transactions(client: &Client) -> Result<(), CdcError> {
    let xids: Vec<String> = client
        .query_one(
            "SELECT coalesce(array_agg(x::text), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) x",
            &[],
        )
        .await
        .map_err(|e| pg_error("read running transactions", e))?
        .get(0);
    if xids.is_empty() {
        return Ok(());
    }
    loop {
        let running: i64 = client
            .query_one(
                "SELECT count(*) FROM unnest($1::text[]) x WHERE pg_xact_status(x::xid8) = 'in progress'",
                &[&xids],
            )
            .await
            .map_err(|e| pg_error("wait for running transactions", e))?
            .get(0);
        if running == 0 {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One dataset's row of `spoke_cdc_state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRow {
    pub dataset: String,
    pub table: String,
    /// `None` while the slot is being created.
    pub consistent_lsn: Option<u64>,
    pub snapshot_done: bool,
    pub last_key: Option<String>,
    pub rows_done: u64,
}

pub async fn load_state(
    client: &Client,
    cfg: &CdcConfig,
) -> Result<BTreeMap<String, StateRow>, CdcError> {
    Ok(client
        .query(
            &format!(
                "SELECT dataset, table_name, consistent_lsn::text, snapshot_done, last_key, rows_done \
                 FROM {} WHERE slot_name = $1",
                cfg.state_sql()
            ),
            &[&cfg.slot],
        )
        .await
        .map_err(|e| pg_error("read state", e))?
        .iter()
        .map(|r| {
            let row = StateRow {
                dataset: r.get(0),
                table: r.get(1),
                consistent_lsn: r.get::<_, Option<String>>(2).as_deref().and_then(parse_lsn),
                snapshot_done: r.get(3),
                last_key: r.get(4),
                rows_done: r.get::<_, i64>(5).max(0) as u64,
            };
            (row.dataset.clone(), row)
        })
        .collect())
}

pub async fn delete_state(client: &Client, cfg: &CdcConfig) -> Result<(), CdcError> {
    client
        .execute(
            &format!("DELETE FROM {} WHERE slot_name = $1", cfg.state_sql()),
            &[&cfg.slot],
        )
        .await
        .map_err(|e| pg_error("delete state", e))?;
    Ok(())
}

/// Records every dataset as "creating" (no consistent point yet).
pub async fn insert_creating(client: &Client, cfg: &CdcConfig) -> Result<(), CdcError> {
    let values: Vec<String> = cfg
        .tables
        .iter()
        .map(|t| {
            format!(
                "({}, {}, {})",
                literal(&cfg.slot),
                literal(&t.dataset),
                literal(&t.qualified())
            )
        })
        .collect();
    client
        .batch_execute(&format!(
            "INSERT INTO {} (slot_name, dataset, table_name) VALUES {} \
             ON CONFLICT (slot_name, dataset) DO UPDATE SET consistent_lsn = NULL, snapshot_done = false, last_key = NULL, rows_done = 0, updated_at = now()",
            cfg.state_sql(),
            values.join(", ")
        ))
        .await
        .map_err(|e| pg_error("record state", e))
}

pub async fn set_consistent(client: &Client, cfg: &CdcConfig, lsn: u64) -> Result<(), CdcError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET consistent_lsn = $2::text::pg_lsn, updated_at = now() WHERE slot_name = $1",
                cfg.state_sql()
            ),
            &[&cfg.slot, &super::fmt_lsn(lsn)],
        )
        .await
        .map_err(|e| pg_error("record consistent point", e))?;
    Ok(())
}

/// Records a finished snapshot chunk (or the end of the snapshot).
pub async fn save_progress(
    client: &Client,
    cfg: &CdcConfig,
    dataset: &str,
    last_key: Option<&str>,
    rows_done: u64,
    done: bool,
) -> Result<(), CdcError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET last_key = $3, rows_done = $4, snapshot_done = $5, updated_at = now() \
                 WHERE slot_name = $1 AND dataset = $2",
                cfg.state_sql()
            ),
            &[&cfg.slot, &dataset, &last_key, &(rows_done as i64), &done],
        )
        .await
        .map_err(|e| pg_error("record snapshot progress", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_identity_must_carry_the_key() {
        let m = TableMapping::parse_flag("d=public.t:id").unwrap();
        check_identity(&m, "f", &[]).unwrap();
        check_identity(&m, "d", &["id".into()]).unwrap();
        let e = check_identity(&m, "d", &[]).unwrap_err().to_string();
        assert!(
            e.contains("public.t") && e.contains("REPLICA IDENTITY FULL"),
            "{e}"
        );
        let e = check_identity(&m, "d", &["other".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key column 'id'"), "{e}");
        assert!(check_identity(&m, "n", &[]).is_err());
        let v = TableMapping::parse_flag("d=public.t:id:v").unwrap();
        let e = check_identity(&v, "d", &["id".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("version column 'v'"), "{e}");
        check_identity(&v, "f", &[]).unwrap();
    }
}
