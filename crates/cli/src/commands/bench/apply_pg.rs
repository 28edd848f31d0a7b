//! `spoke bench apply --store postgres`: the PostgreSQL copy store's apply
//! path against a raw `COPY` + upsert of the same rows (the ceiling), in the
//! same run, in a fresh schema that is dropped at the end.
//!
//! ```text
//!  per batch (not timed): generate rows ─▶ Vec<Change> for Spoke, typed rows for raw
//!  timed, alternating which side goes first:
//!    Spoke: PostgresCopyStore::apply(changes, Advance{position, fresh_as_of, from_feed})
//!           (BEGIN; SET LOCAL spoke.agent; INSERT … SELECT FROM unnest(…) ON CONFLICT …;
//!            UPDATE _spoke_copies …; COMMIT — one statement trigger per write statement)
//!    raw:   newest row per key (in Rust) ─▶ BEGIN; COPY raw_in FROM STDIN (FORMAT binary);
//!           INSERT INTO raw SELECT … FROM raw_in ON CONFLICT (key) DO UPDATE …
//!             WHERE excluded.version > t.version; COMMIT   (raw_in: TEMP, ON COMMIT DELETE ROWS)
//!  then (not timed): both tables must hold exactly the same rows.
//! ```
//!
//! Both sides talk to the same server over their own TCP connection and
//! commit with the server's settings (`synchronous_commit` as configured).
//! The raw side's statements are prepared once, before the clock starts.
//! An `INSERT … ON CONFLICT DO UPDATE` may not touch a row twice, so the raw
//! side keeps the newest change per key of a batch, as the store does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use spoke::copy::postgres::{PostgresCopyStore, PostgresOptions};
use spoke::copy::{Advance, CopySpec, CopyStore};
use spoke_core::Change;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::apply::{change, Generator, Side};
use super::{pg, progress, with_cleanup, Row, DATASET};

/// What one run measured.
pub struct Measured {
    pub spoke: Side,
    pub raw: Side,
    pub distinct_keys: u64,
}

/// The newest row of each key in `rows` (the last one: versions count up),
/// in the order of their last occurrence.
pub fn newest_rows(rows: &[Row]) -> Vec<&Row> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        last.insert(r.key.as_str(), i);
    }
    rows.iter()
        .enumerate()
        .filter(|(i, r)| last.get(r.key.as_str()) == Some(i))
        .map(|(_, r)| r)
        .collect()
}

/// The raw side: its connection and statements, prepared before timing.
struct Raw {
    client: Client,
    copy: Statement,
    upsert: Statement,
}

impl Raw {
    async fn open(conninfo: &str, schema: &str) -> anyhow::Result<Self> {
        let client = pg::connect(conninfo).await?;
        let s = pg::ident(schema);
        client
            .batch_execute(&format!(
                "CREATE TABLE {s}.raw (key text PRIMARY KEY, version bigint NOT NULL, deleted_at bigint, name text, email text, tier bigint);
                 CREATE TEMP TABLE raw_in (key text, version bigint, name text, email text, tier bigint) ON COMMIT DELETE ROWS;"
            ))
            .await
            .map_err(|e| anyhow::anyhow!("creating the raw tables: {}", pg::db_message(&e)))?;
        let copy = client
            .prepare("COPY raw_in (key, version, name, email, tier) FROM STDIN (FORMAT binary)")
            .await?;
        let upsert = client
            .prepare(&format!(
                "INSERT INTO {s}.raw AS t (key, version, deleted_at, name, email, tier)
                 SELECT key, version, NULL, name, email, tier FROM raw_in
                 ON CONFLICT (key) DO UPDATE SET version = excluded.version, deleted_at = NULL,
                    name = excluded.name, email = excluded.email, tier = excluded.tier
                 WHERE excluded.version > t.version"
            ))
            .await?;
        Ok(Raw {
            client,
            copy,
            upsert,
        })
    }

    /// One raw batch: newest per key, one transaction, binary COPY, one upsert.
    async fn batch(&mut self, rows: &[Row]) -> anyhow::Result<u64> {
        let newest = newest_rows(rows);
        let tx = self.client.transaction().await?;
        let sink = tx.copy_in(&self.copy).await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[Type::TEXT, Type::INT8, Type::TEXT, Type::TEXT, Type::INT8],
        );
        let mut writer = std::pin::pin!(writer);
        for r in newest {
            writer
                .as_mut()
                .write(&[&r.key, &(r.version as i64), &r.name, &r.email, &r.tier])
                .await?;
        }
        writer.finish().await?;
        let applied = tx.execute(&self.upsert, &[]).await?;
        tx.commit().await?;
        Ok(applied)
    }
}

/// Runs the workload against both sides in a fresh schema of `conninfo`,
/// then drops the schema.
pub async fn measure(
    conninfo: &str,
    spec: &CopySpec,
    n: u64,
    batch: u64,
    keys: u64,
    seed: u64,
) -> anyhow::Result<Measured> {
    let schema = pg::unique("spoke_bench_apply");
    let body = async {
        let store = PostgresCopyStore::open(PostgresOptions {
            url: conninfo.to_owned(),
            schema: schema.clone(),
            readers: vec![],
        })
        .await?;
        store.ensure_copy(spec).await?;
        let mut raw = Raw::open(conninfo, &schema).await?;

        let bar = progress(n, "apply (postgres)");
        let mut gen = Generator::new(seed, keys);
        let (mut spoke_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
        let (mut spoke_applied, mut raw_applied) = (0u64, 0u64);
        let mut done = 0u64;
        let mut batch_no = 0u64;
        while done < n {
            let m = batch.min(n - done);
            // Not timed: building the inputs of both sides.
            let rows = gen.batch(m);
            let changes: Vec<Change> = rows.iter().map(change).collect();
            let advance = Advance {
                position: Some(done + m),
                fresh_as_of_ms: Some(spoke::clock::now_ms()),
                from_feed: true,
            };
            let spoke_first = batch_no % 2 == 1;
            if !spoke_first {
                let t = Instant::now();
                raw_applied += raw.batch(&rows).await?;
                raw_time += t.elapsed();
            }
            let t = Instant::now();
            let out = store.apply(DATASET, &changes, advance).await?;
            spoke_time += t.elapsed();
            spoke_applied += out.applied;
            if spoke_first {
                let t = Instant::now();
                raw_applied += raw.batch(&rows).await?;
                raw_time += t.elapsed();
            }
            done += m;
            batch_no += 1;
            bar.inc(m);
        }
        bar.finish_and_clear();
        let distinct_keys =
            verify(&store, &raw.client, &schema, n, spoke_applied, raw_applied).await?;
        Ok(Measured {
            spoke: Side::new(n, spoke_applied, spoke_time),
            raw: Side::new(n, raw_applied, raw_time),
            distinct_keys,
        })
    };
    let drop_schema = format!("DROP SCHEMA IF EXISTS {} CASCADE", pg::ident(&schema));
    with_cleanup(body, pg::exec(conninfo, &drop_schema)).await
}

/// Checks both sides did the same work; returns the number of rows.
async fn verify(
    store: &PostgresCopyStore,
    client: &Client,
    schema: &str,
    n: u64,
    spoke_applied: u64,
    raw_applied: u64,
) -> anyhow::Result<u64> {
    let cursor = store.cursor(DATASET).await?;
    if cursor.position != Some(n)
        || cursor.received_total != n
        || cursor.applied_total != spoke_applied
    {
        bail!("copy cursor {cursor:?} does not match {n} changes applied in order");
    }
    if spoke_applied != raw_applied {
        bail!("spoke applied {spoke_applied} changes but the raw upsert {raw_applied}");
    }
    let s = pg::ident(schema);
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {s}._spoke_copy_customers WHERE _spoke_deleted_at IS NULL),
                        (SELECT count(*) FROM {s}.raw),
                        (SELECT count(*) FROM {s}._spoke_copy_customers c JOIN {s}.raw r ON r.key = c._spoke_key
                          WHERE c._spoke_deleted_at IS NULL AND r.version = c._spoke_version
                            AND r.name IS NOT DISTINCT FROM c.name AND r.email IS NOT DISTINCT FROM c.email
                            AND r.tier IS NOT DISTINCT FROM c.tier)"
            ),
            &[],
        )
        .await
        .context("comparing the copy with the raw table")?;
    let (copy_rows, raw_rows, same): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    if copy_rows != raw_rows || same != raw_rows {
        bail!(
            "the copy holds {copy_rows} rows and the raw table {raw_rows}, of which {same} agree"
        );
    }
    Ok(copy_rows as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_rows_keeps_the_last_change_of_each_key() {
        let mut g = Generator::new(3, 4);
        let rows = g.batch(50);
        let newest = newest_rows(&rows);
        assert_eq!(newest.len(), 4, "one per key");
        for r in &newest {
            let max = rows
                .iter()
                .filter(|x| x.key == r.key)
                .map(|x| x.version)
                .max();
            assert_eq!(Some(r.version), max, "{r:?}");
        }
        let distinct = Generator::new(1, 1_000_000).batch(10);
        assert_eq!(newest_rows(&distinct).len(), 10);
        assert!(newest_rows(&[]).is_empty());
    }
}
