//! The initial snapshot: a table read in key-ordered chunks and published
//! at the slot's consistent point, resumable after a crash.
//!
//! ```text
//!  state.last_key ─▶ SELECT key::text, … FROM t WHERE key > last ORDER BY key LIMIT n
//!                        │ (one short statement; no transaction spans chunks)
//!                        ▼
//!                  rows ─▶ ChangeInput::upsert(key, version = C or version column)
//!                        ▼
//!                  publish (all batches accepted) ─▶ state.last_key = chunk's last key
//!                        ▼
//!                  fewer than n rows? ─▶ state.snapshot_done = true
//! ```
//!
//! # Contract
//! - A chunk's progress is stored only after the feed accepted the chunk; a
//!   crash re-reads and republishes at most one chunk, which the feed ignores
//!   (same key, same version).
//! - Rows get version `C` (the slot's consistent point) in LSN mode. Every
//!   streamed change has a larger version, so a snapshot value never
//!   overwrites a streamed one, whatever order they reach the feed in.
//! - Progress is reported through the callback after each chunk and through
//!   `tracing`.

use std::sync::Arc;

use tokio_postgres::Client;

use super::shape::Shape;
use super::slot::{save_progress, StateRow, TableInfo};
use super::source::{measure_slot, publish_all, Published};
use super::{ident, pg_error, pgoutput, CdcConfig, CdcError, CdcStats, SnapshotProgress};
use crate::feed::{ChangeInput, Feed, Publisher};
use crate::shutdown::Shutdown;

/// Progress callback.
pub type ProgressFn = Arc<dyn Fn(&SnapshotProgress) + Send + Sync>;

pub(crate) struct SnapshotJob<'a> {
    pub client: &'a Client,
    pub cfg: &'a CdcConfig,
    pub info: &'a TableInfo,
    pub shape: &'a Shape,
    pub publisher: &'a dyn Publisher,
    /// The feed's read side, to delete records the table no longer has.
    pub reader: Option<&'a dyn Feed>,
    pub stats: &'a CdcStats,
    pub progress: Option<&'a ProgressFn>,
    pub shutdown: &'a mut Shutdown,
}

/// Runs (or resumes) one table's snapshot. `Ok(false)`: stopped by shutdown.
pub(crate) async fn run(
    job: SnapshotJob<'_>,
    state: &StateRow,
    version: u64,
) -> Result<bool, CdcError> {
    let SnapshotJob {
        client,
        cfg,
        info,
        shape,
        publisher,
        reader,
        stats,
        progress,
        shutdown,
    } = job;
    let mapping = &info.mapping;
    let key_type = info.type_text(&mapping.key).unwrap_or("text").to_owned();
    let wanted: Vec<usize> = shape
        .columns
        .iter()
        .enumerate()
        .filter(|(i, (_, _, role))| {
            *i == shape.key_index
                || Some(*i) == shape.version_index
                || !matches!(role, super::shape::Role::Ignored)
        })
        .map(|(i, _)| i)
        .collect();
    let select: Vec<String> = wanted
        .iter()
        .map(|&i| format!("{}::text", ident(&shape.columns[i].0)))
        .collect();
    let key = ident(&mapping.key);
    let base = format!("SELECT {} FROM {}", select.join(", "), mapping.sql_name());
    let first = client
        .prepare(&format!("{base} ORDER BY {key} LIMIT $1"))
        .await
        .map_err(|e| pg_error("prepare snapshot", e))?;
    let next = client
        .prepare(&format!(
            "{base} WHERE {key} > $2::text::{key_type} ORDER BY {key} LIMIT $1"
        ))
        .await
        .map_err(|e| pg_error("prepare snapshot", e))?;
    let mut last_key = state.last_key.clone();
    let mut rows_done = state.rows_done;
    let report = |rows_done: u64, finished: bool| {
        let p = SnapshotProgress {
            dataset: mapping.dataset.clone(),
            table: mapping.qualified(),
            rows_done,
            rows_estimate: info.rows_estimate,
            finished,
        };
        tracing::info!(
            "cdc snapshot of {} (dataset {}): {} rows{}{}",
            p.table,
            p.dataset,
            p.rows_done,
            p.rows_estimate
                .map(|e| format!(" of about {e}"))
                .unwrap_or_default(),
            if finished { ", done" } else { "" }
        );
        if let Some(f) = progress {
            f(&p);
        }
    };
    if last_key.is_some() {
        tracing::info!(
            "cdc snapshot of {} resumes after key '{}'",
            mapping.qualified(),
            last_key.as_deref().unwrap_or_default()
        );
    }
    let limit = cfg.options.snapshot_chunk as i64;
    loop {
        if shutdown.is_fired() {
            return Ok(false);
        }
        let rows = match &last_key {
            None => client.query(&first, &[&limit]).await,
            Some(k) => client.query(&next, &[&limit, k]).await,
        }
        .map_err(|e| pg_error("snapshot read", e))?;
        let mut changes = Vec::with_capacity(rows.len());
        let mut chunk_last = None;
        for r in &rows {
            let mut values = vec![pgoutput::Value::Null; shape.columns.len()];
            for (j, &i) in wanted.iter().enumerate() {
                if let Some(s) = r.get::<_, Option<String>>(j) {
                    values[i] = pgoutput::Value::Text(s);
                }
            }
            let row = shape.row(&values)?;
            let v = row.version.unwrap_or(version);
            chunk_last = Some(row.key.clone());
            changes.push(ChangeInput::upsert(row.key, v, row.fields));
        }
        let n = changes.len() as u64;
        match publish_all(
            publisher,
            &mapping.dataset,
            changes,
            &cfg.options,
            stats,
            shutdown,
        )
        .await?
        {
            Published::Done => {}
            Published::Stopped => return Ok(false),
        }
        rows_done += n;
        CdcStats::add(&stats.snapshot_rows, n);
        let finished = (n as i64) < limit;
        if chunk_last.is_some() {
            last_key = chunk_last;
        }
        if finished && shape.version_index.is_none() {
            if let Some(feed) = reader {
                if !sweep(
                    feed,
                    publisher,
                    &mapping.dataset,
                    version,
                    cfg,
                    stats,
                    shutdown,
                )
                .await?
                {
                    return Ok(false);
                }
            }
        }
        save_progress(
            client,
            cfg,
            &mapping.dataset,
            last_key.as_deref(),
            rows_done,
            finished,
        )
        .await?;
        report(rows_done, finished);
        // A long snapshot holds WAL back: keep its figures current.
        if stats.slot_measure_due(cfg.options.status_every) {
            measure_slot(client, cfg, stats).await?;
        }
        if finished {
            return Ok(true);
        }
    }
}

/// Deletes, at version `c`, every live record of the feed older than `c`:
/// after a snapshot at `c` every row of the table is in the feed at a
/// version ≥ `c`, so an older live record is a row the table no longer has
/// (deleted while no slot watched, e.g. before a resnapshot). A row
/// re-inserted later arrives through the stream at a version above `c`.
async fn sweep(
    feed: &dyn Feed,
    publisher: &dyn Publisher,
    dataset: &str,
    c: u64,
    cfg: &CdcConfig,
    stats: &CdcStats,
    shutdown: &mut Shutdown,
) -> Result<bool, CdcError> {
    let mut after: Option<String> = None;
    let mut deleted = 0usize;
    loop {
        let page = feed
            .snapshot(dataset, after.as_deref(), 1_000)
            .await
            .map_err(|e| CdcError::Unavailable(format!("reading the feed of {dataset}: {e}")))?;
        let gone: Vec<ChangeInput> = page
            .records
            .iter()
            .filter(|r| r.op == spoke_core::Op::Upsert && r.version < c)
            .map(|r| ChangeInput::delete(r.key.clone(), c))
            .collect();
        deleted += gone.len();
        if !gone.is_empty() {
            match publish_all(publisher, dataset, gone, &cfg.options, stats, shutdown).await? {
                Published::Done => {}
                Published::Stopped => return Ok(false),
            }
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    if deleted > 0 {
        tracing::warn!(
            "cdc snapshot of {dataset}: deleted {deleted} records the table no longer has"
        );
    }
    Ok(true)
}
