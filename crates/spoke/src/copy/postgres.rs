//! PostgreSQL copies: a consumer's copy inside its own database, next to its
//! own tables, so one SQL query can JOIN them.
//!
//! The layout mirrors the SQLite store: a base table with typed columns, live
//! rows and tombstones, and a view named after the dataset showing live rows.
//!
//! ```text
//!   <schema>.customers (VIEW)  ◀──  <schema>._spoke_copy_customers (TABLE, tombstones included, _spoke_bucket indexed)
//!   <schema>._spoke_copies: dataset | owner | position | fresh_as_of_ms | received_total | applied_total
//!   <schema>._spoke_digest: dataset | bucket | h1 | h2     (the 128-bit leaf as two bigints)
//!   <schema>._spoke_reconcile: dataset | runs_total | last_run_ms | …
//!
//!   apply(batch):  BEGIN
//!                  SET LOCAL spoke.agent = 'on'            ─ opens the read-only guard for this transaction
//!                  SELECT pg_advisory_xact_lock(…)          ─ one writer per copy (agent, spoke reconcile)
//!                  WITH up AS (INSERT … SELECT * FROM unnest($1, $2, …)  ─ newest change per key
//!                              ON CONFLICT DO UPDATE SET …, _spoke_p = t._spoke_h  ─ keep the replaced hash
//!                              WHERE excluded._spoke_version > t._spoke_version
//!                              RETURNING bucket, new hash # replaced hash),
//!                       d AS (per bucket: bit_xor of those),
//!                       g AS (INSERT INTO _spoke_digest … ON CONFLICT DO UPDATE SET h1 = h1 # …)
//!                  SELECT count(*) FROM up                   ─ one statement, one round trip
//!                  UPDATE _spoke_copies SET position = …    ─ same transaction: nothing lost or doubled
//!                  COMMIT
//! ```
//!
//! Each row stores the 128-bit hash of its `(key, version, deleted)` as
//! `_spoke_h1`, `_spoke_h2` (computed by the agent, which passes the new
//! rows' hashes in) and, after an update, the hash it replaced as
//! `_spoke_p1`, `_spoke_p2`, so the server XORs the replaced hash out
//! without a second look-up and without it coming back to the agent. `bit_xor` needs PostgreSQL 14 or later.
//! Copies made before digests existed are migrated by `ensure_copy`.
//!
//! # Read-only enforcement, two layers
//! - **Privileges**: the tables belong to the agent's role; `PUBLIC` gets
//!   nothing, and the configured reader roles get `SELECT` only (on the
//!   views, the base tables — so Spoke's read API works as that role — and
//!   `_spoke_copies`). An application role's write fails with
//!   PostgreSQL's own `permission denied`.
//! - **A statement trigger** on each base table rejects any write from a
//!   session that has not set `spoke.agent = 'on'` in its transaction, with
//!   a message naming the dataset and its owner. That catches roles that do
//!   hold write privileges (an operator in psql, a migration).
//!
//! Connections are re-opened after a failure, so the agent rides out a
//! PostgreSQL restart: the failed batch was rolled back with its position
//! and is applied again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Map, Value};
use spoke_core::digest::{bucket_of, entry_hash, Digest, DigestDelta, DigestEntry};
use spoke_core::manifest::is_identifier;
use spoke_core::{Change, FieldSpec, FieldType, Op, Version};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::sqlite::read_only_message;
use super::{
    narrowing, newest_per_key, Advance, ApplyOutcome, CopyRecord, CopySpec, CopyStore, Cursor,
    Held, ReconcileRun, ReconcileStats, StoreError,
};
use crate::clock::Clock;

/// Default schema for copies in the consumer's database.
pub const DEFAULT_SCHEMA: &str = "spoke";

/// Where and how to keep copies in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// A libpq-style connection string or URL.
    pub url: String,
    /// Schema holding the copies (created if missing).
    pub schema: String,
    /// Roles that may read the copies (granted SELECT only).
    pub readers: Vec<String>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("postgres: {e}"))
}

/// Classifies a PostgreSQL error: lost connections and server-side
/// shutdowns are transient; anything else is a layout or data problem.
fn classify(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        None => unavailable(e),
        Some(code)
            if code.code().starts_with("08")
                || code.code().starts_with("57")
                || code.code().starts_with("53") =>
        {
            unavailable(e)
        }
        Some(_) => StoreError::Layout(format!(
            "postgres: {}",
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned())
        )),
    }
}

#[derive(Debug)]
struct Layout {
    base: String,
    columns: Vec<(String, FieldSpec)>,
    upsert: String,
    remove: String,
    gc: String,
    select: String,
}

fn pg_type(ty: FieldType) -> &'static str {
    match ty {
        FieldType::String => "text",
        FieldType::Int => "bigint",
        FieldType::Float => "double precision",
        FieldType::Bool => "boolean",
        FieldType::Timestamp => "timestamptz",
        FieldType::Json => "jsonb",
    }
}

/// How a column is sent: as an array parameter, cast on the server.
fn array_param(ty: FieldType, n: usize) -> String {
    match ty {
        FieldType::String => format!("${n}::text[]"),
        FieldType::Int => format!("${n}::int8[]"),
        FieldType::Float => format!("${n}::float8[]"),
        FieldType::Bool => format!("${n}::bool[]"),
        FieldType::Timestamp => format!("${n}::text[]::timestamptz[]"),
        FieldType::Json => format!("${n}::text[]::jsonb[]"),
    }
}

/// How a column is read back so it round-trips to the JSON the owner sent.
fn select_expr(name: &str, ty: FieldType) -> String {
    match ty {
        FieldType::Timestamp => format!(
            "CASE WHEN \"{name}\" IS NULL THEN NULL WHEN date_part('microseconds', \"{name}\")::bigint % 1000000 = 0
                THEN to_char(\"{name}\" AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                ELSE rtrim(to_char(\"{name}\" AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), '0') || 'Z' END"
        ),
        _ => format!("\"{name}\""),
    }
}

impl Layout {
    fn new(schema: &str, dataset: &str, columns: Vec<(String, FieldSpec)>) -> Self {
        let base = format!("\"{schema}\".\"_spoke_copy_{dataset}\"");
        let names: String = columns.iter().map(|(n, _)| format!(", \"{n}\"")).collect();
        let params: String = columns
            .iter()
            .enumerate()
            .map(|(i, (_, s))| format!(", {}", array_param(s.ty, i + 7)))
            .collect();
        let sets: String = columns
            .iter()
            .map(|(n, _)| format!(", \"{n}\" = excluded.\"{n}\""))
            .collect();
        // One statement, one round trip, one key probe: each row stores the
        // hash of its state (_spoke_h1, _spoke_h2); an update moves the
        // replaced hash into _spoke_p1, _spoke_p2 (NULL on a fresh insert),
        // so the digest delta of a bucket is the XOR of new and replaced
        // hashes, computed by the server.
        let digest = format!("\"{schema}\"._spoke_digest");
        let upsert = format!(
            "WITH up AS (INSERT INTO {base} AS t (_spoke_key, _spoke_version, _spoke_deleted_at, _spoke_bucket, _spoke_h1, _spoke_h2{names})
                SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int4[], $5::int8[], $6::int8[]{params})
                ON CONFLICT (_spoke_key) DO UPDATE SET _spoke_version = excluded._spoke_version, _spoke_deleted_at = excluded._spoke_deleted_at,
                    _spoke_h1 = excluded._spoke_h1, _spoke_h2 = excluded._spoke_h2, _spoke_p1 = t._spoke_h1, _spoke_p2 = t._spoke_h2{sets}
                WHERE excluded._spoke_version > t._spoke_version
                RETURNING t._spoke_bucket AS b, t._spoke_h1 # coalesce(t._spoke_p1, 0) AS x, t._spoke_h2 # coalesce(t._spoke_p2, 0) AS y),
             d AS (SELECT b, bit_xor(x) AS x, bit_xor(y) AS y FROM up GROUP BY b),
             g AS (INSERT INTO {digest} AS g (dataset, bucket, h1, h2) SELECT '{dataset}', b, x, y FROM d
                ON CONFLICT (dataset, bucket) DO UPDATE SET h1 = g.h1 # excluded.h1, h2 = g.h2 # excluded.h2)
             SELECT count(*) FROM up"
        );
        // Removals (reconcile) and tombstone collection: the removed rows'
        // stored hashes XORed out, in the same statement.
        let removed = |gone: &str| {
            format!(
                "WITH gone AS ({gone} RETURNING _spoke_bucket AS b, _spoke_h1 AS h1, _spoke_h2 AS h2),
                 d AS (SELECT b, bit_xor(h1) AS x, bit_xor(h2) AS y FROM gone GROUP BY b),
                 g AS (INSERT INTO {digest} AS g (dataset, bucket, h1, h2) SELECT '{dataset}', b, x, y FROM d
                    ON CONFLICT (dataset, bucket) DO UPDATE SET h1 = g.h1 # excluded.h1, h2 = g.h2 # excluded.h2)
                 SELECT count(*) FROM gone"
            )
        };
        let remove = removed(&format!(
            "DELETE FROM {base} AS t USING unnest($1::text[], $2::int8[], $3::bool[]) AS u(k, v, d)
             WHERE t._spoke_key = u.k AND t._spoke_version = u.v AND (t._spoke_deleted_at IS NOT NULL) = u.d"
        ));
        let gc = removed(&format!(
            "DELETE FROM {base} WHERE _spoke_deleted_at IS NOT NULL AND _spoke_deleted_at < $1"
        ));
        let cols: String = columns
            .iter()
            .map(|(n, s)| format!(", {}", select_expr(n, s.ty)))
            .collect();
        let select =
            format!("SELECT _spoke_key, _spoke_version, _spoke_deleted_at{cols} FROM {base}");
        Layout {
            base,
            columns,
            upsert,
            remove,
            gc,
            select,
        }
    }

    fn record(
        &self,
        row: &Row,
    ) -> Result<(String, Version, bool, Map<String, Value>), tokio_postgres::Error> {
        let key: String = row.try_get(0)?;
        let version = row.try_get::<_, i64>(1)? as Version;
        let deleted = row.try_get::<_, Option<i64>>(2)?.is_some();
        let mut fields = Map::new();
        if !deleted {
            for (i, (name, spec)) in self.columns.iter().enumerate() {
                let i = i + 3;
                let v = match spec.ty {
                    FieldType::String | FieldType::Timestamp => {
                        row.try_get::<_, Option<String>>(i)?.map(Value::String)
                    }
                    FieldType::Int => row.try_get::<_, Option<i64>>(i)?.map(Value::from),
                    FieldType::Float => row.try_get::<_, Option<f64>>(i)?.map(Value::from),
                    FieldType::Bool => row.try_get::<_, Option<bool>>(i)?.map(Value::Bool),
                    FieldType::Json => row.try_get::<_, Option<Value>>(i)?,
                };
                fields.insert(name.clone(), v.unwrap_or(Value::Null));
            }
        }
        Ok((key, version, deleted, fields))
    }
}

/// One column's values for a batch, typed for the driver.
enum Column {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
}

impl Column {
    fn new(ty: FieldType, cap: usize) -> Self {
        match ty {
            FieldType::String | FieldType::Timestamp | FieldType::Json => {
                Column::Text(Vec::with_capacity(cap))
            }
            FieldType::Int => Column::Int(Vec::with_capacity(cap)),
            FieldType::Float => Column::Float(Vec::with_capacity(cap)),
            FieldType::Bool => Column::Bool(Vec::with_capacity(cap)),
        }
    }

    fn push(&mut self, ty: FieldType, v: Option<&Value>) {
        let v = v.filter(|v| !v.is_null());
        match self {
            Column::Text(c) => c.push(v.map(|v| match (ty, v) {
                (FieldType::Json, v) => v.to_string(),
                (_, Value::String(s)) => s.clone(),
                (_, other) => other.to_string(),
            })),
            Column::Int(c) => c.push(v.and_then(Value::as_i64)),
            Column::Float(c) => c.push(v.and_then(Value::as_f64)),
            Column::Bool(c) => c.push(v.and_then(Value::as_bool)),
        }
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Column::Text(c) => c,
            Column::Int(c) => c,
            Column::Float(c) => c,
            Column::Bool(c) => c,
        }
    }
}

/// A 128-bit digest value as the two bigints stored for it.
fn split(h: u128) -> (i64, i64) {
    (h as u64 as i64, (h >> 64) as u64 as i64)
}

fn join(h1: i64, h2: i64) -> u128 {
    u128::from(h1 as u64) | (u128::from(h2 as u64) << 64)
}

/// XORs a batch's deltas into `<schema>._spoke_digest`, in the caller's transaction.
async fn write_delta(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    dataset: &str,
    delta: &DigestDelta,
) -> Result<(), tokio_postgres::Error> {
    if delta.is_empty() {
        return Ok(());
    }
    let mut buckets: Vec<i32> = Vec::new();
    let mut h1: Vec<i64> = Vec::new();
    let mut h2: Vec<i64> = Vec::new();
    for (b, h) in delta.buckets() {
        let (x, y) = split(h);
        buckets.push(i32::from(b));
        h1.push(x);
        h2.push(y);
    }
    let sql = format!(
        "INSERT INTO \"{schema}\"._spoke_digest AS g (dataset, bucket, h1, h2)
         SELECT $1, b, x, y FROM unnest($2::int4[], $3::int8[], $4::int8[]) AS u(b, x, y)
         ON CONFLICT (dataset, bucket) DO UPDATE SET h1 = g.h1 # excluded.h1, h2 = g.h2 # excluded.h2"
    );
    tx.execute(&sql, &[&dataset, &buckets, &h1, &h2]).await?;
    Ok(())
}

/// Opens the read-only guard and takes the copy's writer lock for this
/// transaction (one round trip). The lock serialises the agent and
/// `spoke reconcile` writing the same copy, which keeps each statement's
/// view of the old states, and so the digest, exact.
fn guard_sql(schema: &str, dataset: &str) -> String {
    format!(
        "SET LOCAL spoke.agent = 'on'; SELECT pg_advisory_xact_lock(hashtext('spoke:copy:{schema}.{dataset}'))"
    )
}

/// Adds what digests need to a copy made before them — the bucket column,
/// its index and the digest built from the rows — in the caller's transaction.
async fn migrate_digest(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    dataset: &str,
    base: &str,
) -> Result<(), tokio_postgres::Error> {
    let table = format!("_spoke_copy_{dataset}");
    let has = |column: &'static str| {
        let table = table.clone();
        async move {
            tx.query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND column_name = $3)",
                &[&schema, &table, &column],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
        }
    };
    let has_bucket = has("_spoke_bucket").await?;
    if has_bucket && has("_spoke_p1").await? {
        return Ok(());
    }
    tx.batch_execute(&format!(
        "{}; ALTER TABLE {base} ADD COLUMN IF NOT EXISTS _spoke_bucket int NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS _spoke_h1 bigint, ADD COLUMN IF NOT EXISTS _spoke_h2 bigint,
            ADD COLUMN IF NOT EXISTS _spoke_p1 bigint, ADD COLUMN IF NOT EXISTS _spoke_p2 bigint",
        guard_sql(schema, dataset)
    ))
    .await?;
    let rows = tx
        .query(
            &format!(
                "SELECT _spoke_key, _spoke_version, _spoke_deleted_at IS NOT NULL FROM {base}"
            ),
            &[],
        )
        .await?;
    let mut keys: Vec<String> = Vec::with_capacity(rows.len());
    let mut buckets: Vec<i32> = Vec::with_capacity(rows.len());
    let mut h1s: Vec<i64> = Vec::with_capacity(rows.len());
    let mut h2s: Vec<i64> = Vec::with_capacity(rows.len());
    let mut digest = Digest::new();
    for r in &rows {
        let key: String = r.get(0);
        let version: i64 = r.get(1);
        let h = entry_hash(&key, version as Version, r.get(2));
        digest.xor(bucket_of(&key), h);
        let (h1, h2) = split(h);
        buckets.push(i32::from(bucket_of(&key)));
        h1s.push(h1);
        h2s.push(h2);
        keys.push(key);
    }
    tx.execute(
        &format!("UPDATE {base} SET _spoke_bucket = u.b, _spoke_h1 = u.x, _spoke_h2 = u.y FROM unnest($1::text[], $2::int4[], $3::int8[], $4::int8[]) AS u(k, b, x, y) WHERE _spoke_key = u.k"),
        &[&keys, &buckets, &h1s, &h2s],
    )
    .await?;
    if !has_bucket {
        tx.batch_execute(&format!("CREATE INDEX ON {base} (_spoke_bucket)"))
            .await?;
    }
    tx.batch_execute(&format!(
        "DELETE FROM \"{schema}\"._spoke_digest WHERE dataset = '{dataset}'"
    ))
    .await?;
    let mut delta = DigestDelta::new();
    for (b, &h) in digest.leaves().iter().enumerate() {
        delta.xor(b as u16, h);
    }
    write_delta(tx, schema, dataset, &delta).await?;
    tracing::info!(
        dataset,
        rows = rows.len(),
        "built the digest of a copy made before digests existed"
    );
    Ok(())
}

pub struct PostgresCopyStore {
    options: PostgresOptions,
    clock: Clock,
    writer: tokio::sync::Mutex<Option<Client>>,
    reader: tokio::sync::Mutex<Option<Client>>,
    layouts: Mutex<HashMap<String, Arc<Layout>>>,
}

async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(unavailable)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("postgres connection ended: {e}");
        }
    });
    Ok(client)
}

impl PostgresCopyStore {
    /// Checks the options and connects once, so a wrong URL fails at start.
    pub async fn open(options: PostgresOptions) -> Result<Self, StoreError> {
        Self::open_with_clock(options, Clock::System).await
    }

    pub async fn open_with_clock(
        options: PostgresOptions,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        if !is_identifier(&options.schema) {
            return Err(StoreError::Layout(format!(
                "schema name '{}' must be a lowercase identifier",
                options.schema
            )));
        }
        for r in &options.readers {
            if !is_identifier(r) {
                return Err(StoreError::Layout(format!(
                    "reader role '{r}' must be a lowercase identifier"
                )));
            }
        }
        let writer = connect(&options.url).await?;
        Ok(PostgresCopyStore {
            options,
            clock,
            writer: tokio::sync::Mutex::new(Some(writer)),
            reader: tokio::sync::Mutex::new(None),
            layouts: Mutex::default(),
        })
    }

    pub fn schema(&self) -> &str {
        &self.options.schema
    }

    /// Runs `f` with a live client, reconnecting first if the last one failed.
    async fn with_client<R>(
        &self,
        which: &tokio::sync::Mutex<Option<Client>>,
        f: impl AsyncFnOnce(&mut Client) -> Result<R, tokio_postgres::Error>,
    ) -> Result<R, StoreError> {
        let mut slot = which.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(connect(&self.options.url).await?);
        }
        let client = slot.as_mut().ok_or_else(|| unavailable("no connection"))?;
        match f(client).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let e = classify(e);
                if matches!(e, StoreError::Unavailable(_)) {
                    *slot = None;
                }
                Err(e)
            }
        }
    }

    async fn layout(&self, dataset: &str) -> Result<Arc<Layout>, StoreError> {
        if let Some(l) = self.layouts.lock().expect("layouts").get(dataset) {
            return Ok(l.clone());
        }
        let sql = format!(
            "SELECT fields FROM \"{}\"._spoke_copies WHERE dataset = $1",
            self.options.schema
        );
        let ds = dataset.to_owned();
        let fields: Option<String> = self
            .with_client(&self.reader, async |c| {
                c.query_opt(&sql, &[&ds]).await.map(|r| r.map(|r| r.get(0)))
            })
            .await
            .map_err(|e| match e {
                StoreError::Layout(_) => StoreError::UnknownCopy(dataset.to_owned()),
                other => other,
            })?;
        let fields = fields.ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))?;
        let columns: Vec<(String, FieldSpec)> = serde_json::from_str(&fields).map_err(|e| {
            StoreError::Layout(format!("copy {dataset}: unreadable field list: {e}"))
        })?;
        let layout = Arc::new(Layout::new(&self.options.schema, dataset, columns));
        self.layouts
            .lock()
            .expect("layouts")
            .insert(dataset.to_owned(), layout.clone());
        Ok(layout)
    }
}

#[async_trait]
impl CopyStore for PostgresCopyStore {
    async fn ensure_copy(&self, spec: &CopySpec) -> Result<(), StoreError> {
        let schema = self.options.schema.clone();
        let ds = spec.dataset.clone();
        let columns: Vec<(String, FieldSpec)> = spec.projection.fields().to_vec();
        let fields_json = serde_json::to_string(&columns).map_err(unavailable)?;
        let layout = Layout::new(&schema, &ds, columns.clone());
        let base = layout.base.clone();
        let msg = read_only_message(&ds, &spec.owner);
        let key = spec.key_name.clone();
        let owner = spec.owner.clone();
        let readers = self.options.readers.clone();
        let existing = self
            .with_client(&self.writer, async |c| {
                let tx = c.transaction().await?;
                // Serialises concurrent agents creating the same schema.
                tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&format!("spoke:{schema}")]).await?;
                tx.batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
                     CREATE TABLE IF NOT EXISTS \"{schema}\"._spoke_copies (
                        dataset text PRIMARY KEY, owner text NOT NULL, key_name text NOT NULL, fields text NOT NULL,
                        position bigint, fresh_as_of_ms bigint NOT NULL DEFAULT 0,
                        received_total bigint NOT NULL DEFAULT 0, applied_total bigint NOT NULL DEFAULT 0);
                     REVOKE ALL ON \"{schema}\"._spoke_copies FROM PUBLIC;
                     CREATE TABLE IF NOT EXISTS \"{schema}\"._spoke_digest (
                        dataset text NOT NULL, bucket int NOT NULL, h1 bigint NOT NULL, h2 bigint NOT NULL,
                        PRIMARY KEY (dataset, bucket));
                     REVOKE ALL ON \"{schema}\"._spoke_digest FROM PUBLIC;
                     CREATE TABLE IF NOT EXISTS \"{schema}\"._spoke_reconcile (
                        dataset text PRIMARY KEY, runs_total bigint NOT NULL DEFAULT 0, last_run_ms bigint NOT NULL DEFAULT 0,
                        last_duration_ms bigint NOT NULL DEFAULT 0, last_repaired bigint NOT NULL DEFAULT 0,
                        missing_total bigint NOT NULL DEFAULT 0, stale_total bigint NOT NULL DEFAULT 0, extra_total bigint NOT NULL DEFAULT 0);
                     REVOKE ALL ON \"{schema}\"._spoke_reconcile FROM PUBLIC;
                     CREATE TABLE IF NOT EXISTS \"{schema}\"._spoke_quarantine (
                        dataset text NOT NULL, key text NOT NULL, version bigint NOT NULL, position bigint,
                        reason text NOT NULL, held_at_ms bigint NOT NULL, change text NOT NULL,
                        PRIMARY KEY (dataset, key, version));
                     REVOKE ALL ON \"{schema}\"._spoke_quarantine FROM PUBLIC;
                     CREATE OR REPLACE FUNCTION \"{schema}\"._spoke_guard() RETURNS trigger LANGUAGE plpgsql AS $f$
                     BEGIN
                        IF coalesce(current_setting('spoke.agent', true), '') <> 'on' THEN
                            RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'insufficient_privilege';
                        END IF;
                        RETURN NULL;
                     END $f$;"
                ))
                .await?;
                let existing: Option<String> = tx
                    .query_opt(&format!("SELECT fields FROM \"{schema}\"._spoke_copies WHERE dataset = $1"), &[&ds])
                    .await?
                    .map(|r| r.get(0));
                let view_cols: String = columns.iter().map(|(n, _)| format!(", \"{n}\"")).collect();
                let escaped = msg.replace('\'', "''");
                let view = format!(
                    "CREATE VIEW \"{schema}\".\"{ds}\" AS SELECT _spoke_key AS \"{key}\"{view_cols}, _spoke_version FROM {base} WHERE _spoke_deleted_at IS NULL;
                     COMMENT ON VIEW \"{schema}\".\"{ds}\" IS '{escaped}';
                     REVOKE ALL ON \"{schema}\".\"{ds}\" FROM PUBLIC;"
                );
                if existing.is_none() {
                    let cols: String = columns.iter().map(|(n, s)| format!(", \"{n}\" {}", pg_type(s.ty))).collect();
                    tx.batch_execute(&format!(
                        "CREATE TABLE {base} (_spoke_key text PRIMARY KEY, _spoke_version bigint NOT NULL, _spoke_deleted_at bigint{cols}, _spoke_bucket int NOT NULL DEFAULT 0, _spoke_h1 bigint, _spoke_h2 bigint, _spoke_p1 bigint, _spoke_p2 bigint);
                         CREATE INDEX ON {base} (_spoke_bucket);
                         DELETE FROM \"{schema}\"._spoke_digest WHERE dataset = '{ds}';
                         {view}
                         CREATE TRIGGER _spoke_read_only BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {base}
                            FOR EACH STATEMENT EXECUTE FUNCTION \"{schema}\"._spoke_guard('{escaped}');
                         REVOKE ALL ON {base} FROM PUBLIC;"
                    ))
                    .await?;
                    tx.execute(
                        &format!("INSERT INTO \"{schema}\"._spoke_copies (dataset, owner, key_name, fields) VALUES ($1, $2, $3, $4)"),
                        &[&ds, &owner, &key, &fields_json],
                    )
                    .await?;
                } else if existing.as_deref() == Some(fields_json.as_str()) {
                    migrate_digest(&tx, &schema, &ds, &base).await?;
                } else if let Some(dropped) = existing.as_deref().and_then(|e| narrowing(e, &columns)) {
                    let drops: String = dropped.iter().map(|c| format!("ALTER TABLE {base} DROP COLUMN \"{c}\";")).collect();
                    tx.batch_execute(&format!("DROP VIEW \"{schema}\".\"{ds}\"; {drops} {view}")).await?;
                    tx.execute(&format!("UPDATE \"{schema}\"._spoke_copies SET fields = $2 WHERE dataset = $1"), &[&ds, &fields_json]).await?;
                    tracing::info!(dataset = %ds, dropped = ?dropped, "narrowed the copy in place to the subscription's projection");
                    tx.commit().await?;
                    return Ok(None);
                }
                for r in &readers {
                    tx.batch_execute(&format!(
                        "GRANT USAGE ON SCHEMA \"{schema}\" TO \"{r}\";
                         GRANT SELECT ON \"{schema}\".\"{ds}\", {base}, \"{schema}\"._spoke_copies, \"{schema}\"._spoke_digest, \"{schema}\"._spoke_reconcile TO \"{r}\";"
                    ))
                    .await?;
                }
                tx.commit().await?;
                Ok(existing)
            })
            .await?;
        if let Some(existing) = existing {
            if existing != fields_json {
                return Err(StoreError::Layout(format!(
                    "the copy of {ds} in schema {schema} holds fields {existing}, but the subscription now projects {fields_json}, which it cannot become in place (only dropping fields or letting one be null can); drop the copy (DROP VIEW {schema}.{ds}; DROP TABLE {base}; DELETE FROM {schema}._spoke_copies WHERE dataset = '{ds}') and the agent rebuilds it from a snapshot",
                    schema = self.options.schema
                )));
            }
        }
        self.layouts.lock().expect("layouts").remove(&spec.dataset);
        Ok(())
    }

    async fn cursor(&self, dataset: &str) -> Result<Cursor, StoreError> {
        let sql = format!("SELECT position, fresh_as_of_ms, received_total, applied_total FROM \"{}\"._spoke_copies WHERE dataset = $1", self.options.schema);
        let ds = dataset.to_owned();
        let row = self
            .with_client(&self.reader, async |c| c.query_opt(&sql, &[&ds]).await)
            .await
            .map_err(|e| match e {
                StoreError::Layout(_) => StoreError::UnknownCopy(dataset.to_owned()),
                other => other,
            })?;
        let row = row.ok_or_else(|| StoreError::UnknownCopy(dataset.to_owned()))?;
        Ok(Cursor {
            position: row.get::<_, Option<i64>>(0).map(|p| p as u64),
            fresh_as_of_ms: row.get::<_, i64>(1) as u64,
            received_total: row.get::<_, i64>(2) as u64,
            applied_total: row.get::<_, i64>(3) as u64,
        })
    }

    async fn apply(
        &self,
        dataset: &str,
        changes: &[Change],
        advance: Advance,
    ) -> Result<ApplyOutcome, StoreError> {
        let layout = self.layout(dataset).await?;
        let now = self.clock.now_ms() as i64;
        let newest = newest_per_key(changes);
        let n = newest.len();
        let mut keys = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut deleted_at: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut buckets: Vec<i32> = Vec::with_capacity(n);
        let mut h1s: Vec<i64> = Vec::with_capacity(n);
        let mut h2s: Vec<i64> = Vec::with_capacity(n);
        let mut columns: Vec<Column> = layout
            .columns
            .iter()
            .map(|(_, s)| Column::new(s.ty, n))
            .collect();
        for c in &newest {
            keys.push(c.key.as_str());
            versions.push(c.version as i64);
            deleted_at.push((c.op == Op::Delete).then_some(now));
            buckets.push(i32::from(bucket_of(&c.key)));
            let (h1, h2) = split(entry_hash(&c.key, c.version, c.op == Op::Delete));
            h1s.push(h1);
            h2s.push(h2);
            for ((name, spec), col) in layout.columns.iter().zip(columns.iter_mut()) {
                col.push(
                    spec.ty,
                    if c.op == Op::Upsert {
                        c.fields.get(name)
                    } else {
                        None
                    },
                );
            }
        }
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&keys, &versions, &deleted_at, &buckets, &h1s, &h2s];
        params.extend(columns.iter().map(Column::as_sql));
        let cursor_sql = format!(
            "UPDATE \"{}\"._spoke_copies SET position = COALESCE($1, position), fresh_as_of_ms = COALESCE($2, fresh_as_of_ms),
                received_total = received_total + $3, applied_total = applied_total + $4 WHERE dataset = $5",
            self.options.schema
        );
        let received: i64 = if advance.from_feed {
            changes.len() as i64
        } else {
            0
        };
        let position = advance.position.map(|p| p as i64);
        let fresh = advance.fresh_as_of_ms.map(|f| f as i64);
        let ds = dataset.to_owned();
        let schema = self.options.schema.clone();
        let guard = guard_sql(&schema, dataset);
        let applied = self
            .with_client(&self.writer, async |c| {
                let tx = c.transaction().await?;
                tx.batch_execute(&guard).await?;
                let applied = if n > 0 {
                    let count: i64 = tx.query_one(&layout.upsert, &params).await?.get(0);
                    count as u64
                } else {
                    0
                };
                tx.execute(
                    &cursor_sql,
                    &[&position, &fresh, &received, &(applied as i64), &ds],
                )
                .await?;
                tx.commit().await?;
                Ok(applied)
            })
            .await?;
        Ok(ApplyOutcome {
            applied,
            ignored: changes.len() as u64 - applied,
        })
    }

    async fn get(&self, dataset: &str, key: &str) -> Result<Option<CopyRecord>, StoreError> {
        let layout = self.layout(dataset).await?;
        let sql = format!(
            "{} WHERE _spoke_key = $1 AND _spoke_deleted_at IS NULL",
            layout.select
        );
        let key = key.to_owned();
        let row = self
            .with_client(&self.reader, async |c| c.query_opt(&sql, &[&key]).await)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let (key, version, _, fields) = layout.record(&row).map_err(classify)?;
        Ok(Some(CopyRecord {
            key,
            version,
            fields,
        }))
    }

    async fn count(&self, dataset: &str) -> Result<u64, StoreError> {
        let layout = self.layout(dataset).await?;
        let sql = format!(
            "SELECT count(*) FROM {} WHERE _spoke_deleted_at IS NULL",
            layout.base
        );
        let row = self
            .with_client(&self.reader, async |c| c.query_one(&sql, &[]).await)
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn gc_tombstones(
        &self,
        dataset: &str,
        now_ms: u64,
        horizon_ms: u64,
    ) -> Result<u64, StoreError> {
        let layout = self.layout(dataset).await?;
        let cutoff = now_ms.saturating_sub(horizon_ms) as i64;
        let guard = guard_sql(&self.options.schema, dataset);
        self.with_client(&self.writer, async |c| {
            let tx = c.transaction().await?;
            tx.batch_execute(&guard).await?;
            let n: i64 = tx.query_one(&layout.gc, &[&cutoff]).await?.get(0);
            tx.commit().await?;
            Ok(n as u64)
        })
        .await
    }

    async fn digest(&self, dataset: &str) -> Result<Digest, StoreError> {
        self.layout(dataset).await?;
        let sql = format!(
            "SELECT bucket, h1, h2 FROM \"{}\"._spoke_digest WHERE dataset = $1",
            self.options.schema
        );
        let ds = dataset.to_owned();
        let rows = self
            .with_client(&self.reader, async |c| c.query(&sql, &[&ds]).await)
            .await?;
        let mut d = Digest::new();
        for r in rows {
            let b: i32 = r.get(0);
            d.xor(b as u16, join(r.get(1), r.get(2)));
        }
        Ok(d)
    }

    async fn bucket_entries(
        &self,
        dataset: &str,
        buckets: &[u16],
    ) -> Result<Vec<DigestEntry>, StoreError> {
        let layout = self.layout(dataset).await?;
        let sql = format!(
            "SELECT _spoke_key, _spoke_version, _spoke_deleted_at IS NOT NULL FROM {} WHERE _spoke_bucket = ANY($1::int4[])",
            layout.base
        );
        let buckets: Vec<i32> = buckets.iter().map(|&b| i32::from(b)).collect();
        let rows = self
            .with_client(&self.reader, async |c| c.query(&sql, &[&buckets]).await)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                DigestEntry::new(
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1) as Version,
                    r.get(2),
                )
            })
            .collect())
    }

    async fn remove(&self, dataset: &str, entries: &[DigestEntry]) -> Result<u64, StoreError> {
        let layout = self.layout(dataset).await?;
        let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        let versions: Vec<i64> = entries.iter().map(|e| e.version as i64).collect();
        let deleted: Vec<bool> = entries.iter().map(|e| e.deleted).collect();
        let guard = guard_sql(&self.options.schema, dataset);
        self.with_client(&self.writer, async |c| {
            let tx = c.transaction().await?;
            tx.batch_execute(&guard).await?;
            let n: i64 = tx
                .query_one(&layout.remove, &[&keys, &versions, &deleted])
                .await?
                .get(0);
            tx.commit().await?;
            Ok(n as u64)
        })
        .await
    }

    async fn reconcile_stats(&self, dataset: &str) -> Result<ReconcileStats, StoreError> {
        self.layout(dataset).await?;
        let sql = format!(
            "SELECT runs_total, last_run_ms, last_duration_ms, last_repaired, missing_total, stale_total, extra_total
             FROM \"{}\"._spoke_reconcile WHERE dataset = $1",
            self.options.schema
        );
        let ds = dataset.to_owned();
        let row = self
            .with_client(&self.reader, async |c| c.query_opt(&sql, &[&ds]).await)
            .await?;
        Ok(
            row.map_or_else(ReconcileStats::default, |r| ReconcileStats {
                runs_total: r.get::<_, i64>(0) as u64,
                last_run_ms: r.get::<_, i64>(1) as u64,
                last_duration_ms: r.get::<_, i64>(2) as u64,
                last_repaired: r.get::<_, i64>(3) as u64,
                repaired_missing_total: r.get::<_, i64>(4) as u64,
                repaired_stale_total: r.get::<_, i64>(5) as u64,
                repaired_extra_total: r.get::<_, i64>(6) as u64,
            }),
        )
    }

    async fn hold(&self, dataset: &str, held: &[Held]) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO \"{}\"._spoke_quarantine (dataset, key, version, position, reason, held_at_ms, change)
             SELECT $1, * FROM unnest($2::text[], $3::int8[], $4::int8[], $5::text[], $6::int8[], $7::text[])
             ON CONFLICT (dataset, key, version) DO NOTHING",
            self.options.schema
        );
        let ds = dataset.to_owned();
        let keys: Vec<&str> = held.iter().map(|h| h.change.key.as_str()).collect();
        let versions: Vec<i64> = held.iter().map(|h| h.change.version as i64).collect();
        let positions: Vec<Option<i64>> =
            held.iter().map(|h| h.position.map(|p| p as i64)).collect();
        let reasons: Vec<&str> = held.iter().map(|h| h.reason.as_str()).collect();
        let at: Vec<i64> = held.iter().map(|h| h.held_at_ms as i64).collect();
        let changes = held
            .iter()
            .map(|h| serde_json::to_string(&h.change))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        self.with_client(&self.writer, async |c| {
            c.execute(
                &sql,
                &[&ds, &keys, &versions, &positions, &reasons, &at, &changes],
            )
            .await
            .map(|_| ())
        })
        .await
    }

    async fn held(&self, dataset: &str, limit: usize) -> Result<Vec<Held>, StoreError> {
        self.layout(dataset).await?;
        let sql = format!(
            "SELECT change, position, reason, held_at_ms FROM \"{}\"._spoke_quarantine WHERE dataset = $1 ORDER BY held_at_ms, position, key LIMIT $2",
            self.options.schema
        );
        let ds = dataset.to_owned();
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows = self
            .with_client(&self.reader, async |c| c.query(&sql, &[&ds, &limit]).await)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Held {
                    change: serde_json::from_str(r.get::<_, &str>(0)).map_err(|e| {
                        StoreError::Layout(format!("a held change of {ds} is unreadable: {e}"))
                    })?,
                    position: r.get::<_, Option<i64>>(1).map(|p| p as u64),
                    reason: r.get(2),
                    held_at_ms: r.get::<_, i64>(3) as u64,
                })
            })
            .collect()
    }

    async fn held_count(&self, dataset: &str) -> Result<u64, StoreError> {
        self.layout(dataset).await?;
        let sql = format!(
            "SELECT count(*) FROM \"{}\"._spoke_quarantine WHERE dataset = $1",
            self.options.schema
        );
        let ds = dataset.to_owned();
        let row = self
            .with_client(&self.reader, async |c| c.query_one(&sql, &[&ds]).await)
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn release(&self, dataset: &str, held: &[(String, Version)]) -> Result<u64, StoreError> {
        let sql = format!(
            "DELETE FROM \"{}\"._spoke_quarantine q USING unnest($2::text[], $3::int8[]) AS r(key, version)
             WHERE q.dataset = $1 AND q.key = r.key AND q.version = r.version",
            self.options.schema
        );
        let ds = dataset.to_owned();
        let keys: Vec<&str> = held.iter().map(|(k, _)| k.as_str()).collect();
        let versions: Vec<i64> = held.iter().map(|(_, v)| *v as i64).collect();
        self.with_client(&self.writer, async |c| {
            c.execute(&sql, &[&ds, &keys, &versions]).await
        })
        .await
    }

    async fn record_reconcile(&self, dataset: &str, run: &ReconcileRun) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO \"{}\"._spoke_reconcile AS r (dataset, runs_total, last_run_ms, last_duration_ms, last_repaired, missing_total, stale_total, extra_total)
             VALUES ($1, 1, $2::int8, $3::int8, $4::int8 + $5::int8 + $6::int8, $4::int8, $5::int8, $6::int8)
             ON CONFLICT (dataset) DO UPDATE SET runs_total = r.runs_total + 1, last_run_ms = excluded.last_run_ms,
                last_duration_ms = excluded.last_duration_ms, last_repaired = excluded.last_repaired,
                missing_total = r.missing_total + excluded.missing_total, stale_total = r.stale_total + excluded.stale_total,
                extra_total = r.extra_total + excluded.extra_total",
            self.options.schema
        );
        let ds = dataset.to_owned();
        let v = [
            run.started_ms as i64,
            run.duration_ms as i64,
            run.missing as i64,
            run.stale as i64,
            run.extra as i64,
        ];
        self.with_client(&self.writer, async |c| {
            c.execute(&sql, &[&ds, &v[0], &v[1], &v[2], &v[3], &v[4]])
                .await
                .map(|_| ())
        })
        .await
    }

    async fn dump(
        &self,
        dataset: &str,
    ) -> Result<BTreeMap<String, (Version, bool, Map<String, Value>)>, StoreError> {
        let layout = self.layout(dataset).await?;
        let sql = layout.select.clone();
        let rows = self
            .with_client(&self.reader, async |c| c.query(&sql, &[]).await)
            .await?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (k, v, d, f) = layout.record(&row).map_err(classify)?;
            out.insert(k, (v, d, f));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::conformance;
    use crate::testing::{postgres_exec, postgres_or_skip, unique_name};

    async fn store(url: &str, schema: &str, clock: Clock) -> PostgresCopyStore {
        PostgresCopyStore::open_with_clock(
            PostgresOptions {
                url: url.to_owned(),
                schema: schema.to_owned(),
                readers: vec![],
            },
            clock,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn passes_the_copy_store_conformance_suite() {
        let Some(url) = postgres_or_skip("postgres conformance").await else {
            return;
        };
        let schemas = Mutex::new(Vec::new());
        conformance::run(|clock| {
            let schema = unique_name("spoke_t");
            schemas.lock().unwrap().push(schema.clone());
            let url = url.clone();
            async move { store(&url, &schema, clock).await }
        })
        .await;
        for s in schemas.into_inner().unwrap() {
            postgres_exec(&url, &format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE")).await;
        }
    }

    #[tokio::test]
    async fn a_copy_made_before_digests_gets_its_digest_built_on_open() {
        let Some(url) = postgres_or_skip("postgres digest migration").await else {
            return;
        };
        let schema = unique_name("spoke_t");
        let s = store(&url, &schema, Clock::System).await;
        s.ensure_copy(&conformance::spec()).await.unwrap();
        let changes: Vec<Change> = (0..200)
            .map(|i| {
                if i % 6 == 0 {
                    conformance::delete(&format!("k{i}"), 2)
                } else {
                    conformance::upsert(&format!("k{i}"), 1 + i % 3, i as i64)
                }
            })
            .collect();
        s.apply("items", &changes, conformance::feed_advance(1, 1))
            .await
            .unwrap();
        let want = conformance::digest_from_scratch(&s, "items").await;
        assert_eq!(s.digest("items").await.unwrap(), want);
        drop(s);
        postgres_exec(
            &url,
            &format!(
                "ALTER TABLE \"{schema}\"._spoke_copy_items DROP COLUMN _spoke_bucket, DROP COLUMN _spoke_h1, DROP COLUMN _spoke_h2, DROP COLUMN _spoke_p1, DROP COLUMN _spoke_p2;
                 DELETE FROM \"{schema}\"._spoke_digest;"
            ),
        )
        .await;
        let s = store(&url, &schema, Clock::System).await;
        s.ensure_copy(&conformance::spec()).await.unwrap();
        assert_eq!(s.digest("items").await.unwrap(), want, "rebuilt on open");
        let all: Vec<u16> = (0..4096).collect();
        assert_eq!(s.bucket_entries("items", &all).await.unwrap().len(), 200);
        s.apply(
            "items",
            &[conformance::upsert("k0", 9, 9)],
            conformance::feed_advance(2, 1),
        )
        .await
        .unwrap();
        assert_eq!(
            s.digest("items").await.unwrap(),
            conformance::digest_from_scratch(&s, "items").await
        );
        drop(s);
        postgres_exec(&url, &format!("DROP SCHEMA \"{schema}\" CASCADE")).await;
    }

    #[tokio::test]
    async fn writes_are_refused_for_app_roles_and_unmarked_sessions() {
        let Some(url) = postgres_or_skip("postgres read-only").await else {
            return;
        };
        let schema = unique_name("spoke_t");
        let role = unique_name("spoke_app");
        postgres_exec(&url, &format!("CREATE ROLE \"{role}\" LOGIN")).await;
        let store = PostgresCopyStore::open(PostgresOptions {
            url: url.clone(),
            schema: schema.clone(),
            readers: vec![role.clone()],
        })
        .await
        .unwrap();
        store.ensure_copy(&conformance::spec()).await.unwrap();
        store
            .apply(
                "items",
                &[conformance::upsert("a", 1, 1)],
                conformance::feed_advance(1, 1),
            )
            .await
            .unwrap();

        // The application role reads, and may not write.
        let (app, conn) = tokio_postgres::connect(&format!("{url} user={role}"), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let n: i64 = app
            .query_one(
                &format!("SELECT n FROM \"{schema}\".items WHERE id = 'a'"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        let e = app
            .execute(&format!("UPDATE \"{schema}\".items SET n = 5"), &[])
            .await
            .unwrap_err();
        // Spoke's own read API works as the reader role too.
        let as_app = PostgresCopyStore::open(PostgresOptions {
            url: format!("{url} user={role}"),
            schema: schema.clone(),
            readers: vec![],
        })
        .await
        .unwrap();
        assert_eq!(as_app.get("items", "a").await.unwrap().unwrap().version, 1);
        drop(as_app);
        assert!(
            e.as_db_error()
                .unwrap()
                .message()
                .contains("permission denied"),
            "{e:?}"
        );

        // A privileged session without the agent's mark hits the trigger.
        let (admin, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        for sql in [
            format!("UPDATE \"{schema}\".items SET n = 5"),
            format!("DELETE FROM \"{schema}\"._spoke_copy_items"),
            format!("INSERT INTO \"{schema}\"._spoke_copy_items (_spoke_key, _spoke_version) VALUES ('z', 9)"),
            format!("TRUNCATE \"{schema}\"._spoke_copy_items"),
        ] {
            let e = admin.batch_execute(&sql).await.unwrap_err();
            let msg = e.as_db_error().unwrap().message().to_owned();
            assert!(msg.contains("items is a read-only copy of dataset items owned by owner-svc"), "{sql}: {msg}");
        }
        assert_eq!(
            store.get("items", "a").await.unwrap().unwrap().version,
            1,
            "nothing changed"
        );
        drop(store);
        postgres_exec(
            &url,
            &format!(
                "DROP SCHEMA \"{schema}\" CASCADE; DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""
            ),
        )
        .await;
    }
}
