//! The relay: forwards a [`Source`] to a [`Publisher`] until shut down.
//!
//! ```text
//!  loop: pending(batch) ──empty──▶ wait for a nudge or the poll interval
//!          │
//!          ▼ split into runs of one dataset, keeping order
//!        publish(run) ─transient error─▶ back off, retry the same rows
//!          │           ─rejected──────▶ stop: the row needs a person (named in the error)
//!          ▼
//!        ack(last id)
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Pending, Source, SourceError};
use crate::feed::{FeedError, Publisher};
use crate::shutdown::Shutdown;

#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub batch: usize,
    /// How often to look for rows when nobody nudges the relay.
    pub poll_every: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch: 1_000,
            poll_every: Duration::from_millis(100),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Counters a relay keeps.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded: AtomicU64,
    pub ignored: AtomicU64,
    pub retries: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// Why a relay stopped by itself.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the feed rejected outbox row {id} (dataset {dataset}, key {key}): {source}; fix or remove that row, then restart the relay")]
    Rejected {
        id: u64,
        dataset: String,
        key: String,
        #[source]
        source: FeedError,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
}

pub struct Relay {
    source: Arc<dyn Source>,
    publisher: Arc<dyn Publisher>,
    options: RelayOptions,
    nudge: Arc<Notify>,
    stats: Arc<RelayStats>,
}

impl Relay {
    pub fn new(source: Arc<dyn Source>, publisher: Arc<dyn Publisher>) -> Self {
        Relay {
            source,
            publisher,
            options: RelayOptions::default(),
            nudge: Arc::new(Notify::new()),
            stats: Arc::default(),
        }
    }

    pub fn with_options(mut self, options: RelayOptions) -> Self {
        self.options = options;
        self
    }

    /// Wake the relay now (call after committing an outbox row).
    pub fn nudger(&self) -> Arc<Notify> {
        self.nudge.clone()
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Forwards until `shutdown`; returns early only on a definite error.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), RelayError> {
        let mut backoff = self.options.backoff_min;
        loop {
            if shutdown.is_fired() {
                return Ok(());
            }
            let step = tokio::select! {
                r = self.step() => r,
                _ = shutdown.wait() => return Ok(()),
            };
            let wait = match step {
                Ok(0) => {
                    backoff = self.options.backoff_min;
                    tokio::select! {
                        _ = self.nudge.notified() => {}
                        _ = tokio::time::sleep(self.options.poll_every) => {}
                        _ = shutdown.wait() => return Ok(()),
                    }
                    continue;
                }
                Ok(_) => {
                    backoff = self.options.backoff_min;
                    *self.stats.last_error.lock().expect("relay stats") = None;
                    continue;
                }
                Err(Step::Transient(msg)) => {
                    tracing::warn!("relay retrying in {backoff:?}: {msg}");
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    *self.stats.last_error.lock().expect("relay stats") = Some(msg);
                    backoff
                }
                Err(Step::Definite(e)) => {
                    *self.stats.last_error.lock().expect("relay stats") = Some(e.to_string());
                    return Err(e);
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait() => return Ok(()),
            }
            backoff = (backoff * 2).min(self.options.backoff_max);
        }
    }

    /// Forwards one batch; returns how many rows it acknowledged.
    async fn step(&self) -> Result<usize, Step> {
        let pending = self
            .source
            .pending(self.options.batch)
            .await
            .map_err(|e| match e {
                SourceError::Unavailable(m) => Step::Transient(m),
                corrupt => Step::Definite(corrupt.into()),
            })?;
        let Some(last) = pending.last().map(|p| p.id) else {
            return Ok(0);
        };
        for run in runs(&pending) {
            let dataset = run[0].dataset.clone();
            let changes = run.iter().map(|p| p.change.clone()).collect();
            match self.publisher.publish(&dataset, changes).await {
                Ok(receipt) => {
                    self.stats
                        .forwarded
                        .fetch_add((run.len() - receipt.ignored) as u64, Ordering::Relaxed);
                    self.stats
                        .ignored
                        .fetch_add(receipt.ignored as u64, Ordering::Relaxed);
                }
                Err(e) if e.is_transient() => return Err(Step::Transient(e.to_string())),
                Err(e) => {
                    let row = match &e {
                        FeedError::Invalid { index, .. } => run.get(*index).unwrap_or(&run[0]),
                        _ => &run[0],
                    };
                    return Err(Step::Definite(RelayError::Rejected {
                        id: row.id,
                        dataset,
                        key: row.change.key.clone(),
                        source: e,
                    }));
                }
            }
        }
        self.source
            .ack(last)
            .await
            .map_err(|e| Step::Transient(e.to_string()))?;
        Ok(pending.len())
    }
}

enum Step {
    Transient(String),
    Definite(RelayError),
}

/// Splits rows into maximal runs of one dataset, preserving order.
fn runs(rows: &[Pending]) -> Vec<&[Pending]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=rows.len() {
        if i == rows.len() || rows[i].dataset != rows[start].dataset {
            out.push(&rows[start..i]);
            start = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::conformance::manifest;
    use crate::feed::memory::MemoryFeed;
    use crate::feed::{ChangeInput, Feed};
    use crate::shutdown::shutdown_channel;
    use async_trait::async_trait;
    use serde_json::json;

    /// A source that fails its first `fail` calls, then serves fixed rows.
    struct Flaky {
        rows: Mutex<Vec<Pending>>,
        fail: AtomicU64,
    }

    #[async_trait]
    impl Source for Flaky {
        async fn pending(&self, max: usize) -> Result<Vec<Pending>, SourceError> {
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(SourceError::Unavailable("disk busy".into()));
            }
            Ok(self
                .rows
                .lock()
                .unwrap()
                .iter()
                .take(max)
                .cloned()
                .collect())
        }
        async fn ack(&self, upto: u64) -> Result<(), SourceError> {
            self.rows.lock().unwrap().retain(|p| p.id > upto);
            Ok(())
        }
    }

    fn row(id: u64, key: &str, version: u64) -> Pending {
        Pending {
            id,
            dataset: "items".into(),
            change: ChangeInput::upsert(
                key,
                version,
                json!({"n": id}).as_object().cloned().unwrap(),
            ),
        }
    }

    #[tokio::test]
    async fn forwards_in_order_after_transient_failures() {
        let feed = Arc::new(MemoryFeed::new(&manifest()));
        let source = Arc::new(Flaky {
            rows: Mutex::new(vec![row(1, "a", 1), row(2, "a", 2), row(3, "b", 1)]),
            fail: AtomicU64::new(2),
        });
        let relay = Relay::new(source.clone(), feed.clone()).with_options(RelayOptions {
            backoff_min: Duration::from_millis(1),
            ..Default::default()
        });
        let stats = relay.stats();
        let (trigger, shutdown) = shutdown_channel();
        let task = tokio::spawn(relay.run(shutdown));
        let batch = feed
            .read("items", 0, 10, Duration::from_secs(10))
            .await
            .unwrap();
        let mut entries = batch.entries;
        while entries.len() < 3 {
            entries.extend(
                feed.read("items", entries.len() as u64, 10, Duration::from_secs(10))
                    .await
                    .unwrap()
                    .entries,
            );
        }
        trigger.fire();
        task.await.unwrap().unwrap();
        assert_eq!(
            entries
                .iter()
                .map(|e| (e.change.key.as_str(), e.change.version))
                .collect::<Vec<_>>(),
            vec![("a", 1), ("a", 2), ("b", 1)]
        );
        assert!(stats.retries.load(Ordering::SeqCst) >= 2);
        assert!(
            source.rows.lock().unwrap().is_empty(),
            "everything was acknowledged"
        );
    }

    #[tokio::test]
    async fn a_rejected_row_stops_the_relay_and_is_named() {
        let feed = Arc::new(MemoryFeed::new(&manifest()));
        let mut bad = row(2, "b", 1);
        bad.change.fields = json!({"n": "text"}).as_object().cloned().unwrap();
        let source = Arc::new(Flaky {
            rows: Mutex::new(vec![row(1, "a", 1), bad]),
            fail: AtomicU64::new(0),
        });
        let (_trigger, shutdown) = shutdown_channel();
        let e = Relay::new(source.clone(), feed.clone())
            .run(shutdown)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("outbox row 2") && e.contains("key b") && e.contains("must be int"),
            "{e}"
        );
        assert_eq!(source.rows.lock().unwrap().len(), 2, "nothing acknowledged");
        assert_eq!(
            feed.read("items", 0, 10, Duration::ZERO)
                .await
                .unwrap()
                .head,
            0,
            "the batch was all-or-nothing"
        );
    }
}
