//! The ceiling of `spoke bench e2e --feed jetstream`: raw async-nats, no
//! Spoke in between.
//!
//! ```text
//!  every 1 ms tick: the messages that fell due
//!    publish each (same subject per key, same JSON payload size as Spoke's) ─▶ await every ack
//!                                                                              │ stream <PREFIX>_RAW
//!  ordered pull consumer (one, from the start) ◀──────────────────────────────┘
//!    records Instant::now() per stream sequence
//! ```
//!
//! The publisher learns each message's stream sequence from its ack, so a
//! message's latency = the instant the consumer received that sequence −
//! the instant the tick that published it started. Nothing is decoded and
//! no header is sent: this is the least a JetStream publish → consume of
//! the same messages at the same rate costs on this machine and server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::Context;
use futures_util::StreamExt;
use indicatif::ProgressBar;
use serde::Serialize;
use spoke_core::{Change, Op};

use super::{due, Row, Summary, DATASET, OWNER};

/// How long to wait for the last raw messages of a rate.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const WARMUP: u64 = 200;

/// One rate of the raw run.
#[derive(Debug, Serialize)]
pub struct RawRateResult {
    pub target_rate: u64,
    pub achieved_rate: f64,
    pub published: u64,
    pub received: u64,
    pub changes_per_publish: f64,
    pub latency: Summary,
    /// Measured from when each message fell due.
    pub from_due: Summary,
    /// One tick's publishes, from the first send to the last ack.
    pub publish: Summary,
}

pub struct RawJetStream {
    js: Context,
    subject_prefix: String,
    /// Receive instant per stream sequence (index = sequence).
    seen: Arc<Mutex<Vec<Option<Instant>>>>,
    received: Arc<std::sync::atomic::AtomicU64>,
    consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for RawJetStream {
    fn drop(&mut self) {
        self.consumer.abort();
    }
}

/// The JSON of the change Spoke would put on the bus for `row` (owner's
/// full record, `note` included), so both paths carry the same bytes.
pub fn payload(row: &Row) -> Vec<u8> {
    let c = Change {
        dataset: DATASET.into(),
        key: row.key.clone(),
        version: row.version,
        op: Op::Upsert,
        fields: row.fields(true),
        owner: OWNER.into(),
        ts: spoke::clock::now_ms(),
        schema_version: 1,
    };
    serde_json::to_vec(&c).unwrap_or_default()
}

impl RawJetStream {
    /// Connects (its own connection), creates `<stream_prefix>_RAW` and
    /// starts the consumer. `capacity`: how many messages the run publishes.
    pub async fn start(
        url: &str,
        stream_prefix: &str,
        subject_prefix: &str,
        memory: bool,
        capacity: u64,
    ) -> anyhow::Result<Self> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let js = async_nats::jetstream::new(client);
        let name = format!("{stream_prefix}_RAW");
        let subject_prefix = format!("{subject_prefix}.raw");
        let stream = js
            .create_stream(StreamConfig {
                name: name.clone(),
                subjects: vec![format!("{subject_prefix}.*")],
                storage: if memory {
                    StorageType::Memory
                } else {
                    StorageType::File
                },
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating stream {name}"))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("creating the raw ordered consumer")?;
        let seen = Arc::new(Mutex::new(vec![None; (capacity + WARMUP + 1) as usize]));
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = {
            let seen = seen.clone();
            let received = received.clone();
            tokio::spawn(async move {
                let mut messages = consumer.messages().await?;
                while let Some(m) = messages.next().await {
                    let now = Instant::now();
                    let m = m.map_err(|e| anyhow::anyhow!("raw consumer: {e}"))?;
                    let seq = m
                        .info()
                        .map_err(|e| anyhow::anyhow!("raw consumer: {e}"))?
                        .stream_sequence;
                    if let Some(slot @ None) = seen.lock().expect("raw seen").get_mut(seq as usize)
                    {
                        *slot = Some(now);
                    }
                    received.fetch_add(1, std::sync::atomic::Ordering::Release);
                }
                anyhow::Ok(())
            })
        };
        let raw = RawJetStream {
            js,
            subject_prefix,
            seen,
            received,
            consumer: task,
        };
        raw.warm_up().await?;
        Ok(raw)
    }

    fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Publishes `rows` without waiting between them, then waits for every
    /// ack (Spoke's JetStream publisher also has a batch's publishes in
    /// flight together); returns their stream sequences.
    async fn publish(&self, rows: &[Row]) -> anyhow::Result<Vec<u64>> {
        let mut acks = Vec::with_capacity(rows.len());
        for r in rows {
            let subject = format!("{}.{}", self.subject_prefix, r.key);
            acks.push(
                self.js
                    .publish(subject, payload(r).into())
                    .await
                    .context("raw publish")?,
            );
        }
        // Acks come back in publish order; awaiting them in turn waits as
        // long as awaiting them together.
        let mut seqs = Vec::with_capacity(rows.len());
        for a in acks {
            seqs.push(a.await.context("raw publish ack")?.sequence);
        }
        Ok(seqs)
    }

    async fn warm_up(&self) -> anyhow::Result<()> {
        let mut rng = fastrand::Rng::with_seed(1);
        for chunk in 0..WARMUP / 10 {
            let rows: Vec<Row> = (0..10)
                .map(|i| Row::new(chunk * 10 + i, 1, &mut rng))
                .collect();
            self.publish(&rows).await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.received() < WARMUP {
            if self.consumer.is_finished() || Instant::now() > deadline {
                bail!("the raw consumer did not receive the warm-up messages within {DRAIN_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Publishes `total` messages at `rate` (keys and versions numbered from
    /// `base` as the Spoke run numbers them) and measures them.
    pub async fn run_rate(
        &self,
        base: u64,
        rate: u64,
        total: u64,
        keys: u64,
        bar: &ProgressBar,
    ) -> anyhow::Result<RawRateResult> {
        let mut rng = fastrand::Rng::with_seed(base);
        let mut started: Vec<(u64, Instant)> = Vec::with_capacity(total as usize);
        let mut publishes = 0u64;
        let mut round_trips = Vec::new();
        let received_before = self.received();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            tick.tick().await;
            let n = due(start.elapsed().as_secs_f64(), rate, total).saturating_sub(sent);
            if n == 0 {
                continue;
            }
            let rows: Vec<Row> = (base + sent..base + sent + n)
                .map(|seq| {
                    let (k, v) = super::e2e::key_version(seq, keys);
                    Row::new(k, v, &mut rng)
                })
                .collect();
            let t0 = Instant::now();
            let seqs = self.publish(&rows).await?;
            round_trips.push(t0.elapsed().as_secs_f64() * 1e3);
            started.extend(seqs.into_iter().map(|s| (s, t0)));
            sent += n;
            publishes += 1;
            bar.inc(n);
        }
        let publish_time = start.elapsed();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.received() < received_before + total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let seen = self.seen.lock().expect("raw seen");
        let mut lat = Vec::with_capacity(started.len());
        let mut from_due = Vec::with_capacity(started.len());
        for (i, (seq, t0)) in started.iter().enumerate() {
            if let Some(Some(t)) = seen.get(*seq as usize) {
                lat.push(t.saturating_duration_since(*t0).as_secs_f64() * 1e3);
                let due = start + Duration::from_secs_f64((i as u64 + 1) as f64 / rate as f64);
                from_due.push(t.saturating_duration_since(due).as_secs_f64() * 1e3);
            }
        }
        drop(seen);
        Ok(RawRateResult {
            target_rate: rate,
            achieved_rate: total as f64 / publish_time.as_secs_f64().max(1e-9),
            published: total,
            received: lat.len() as u64,
            changes_per_publish: total as f64 / publishes.max(1) as f64,
            latency: Summary::of(&mut lat),
            from_due: Summary::of(&mut from_due),
            publish: Summary::of(&mut round_trips),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_payload_is_the_change_spoke_publishes() {
        let row = Row::new(7, 3, &mut fastrand::Rng::with_seed(1));
        let c: Change = serde_json::from_slice(&payload(&row)).unwrap();
        assert_eq!((c.key.as_str(), c.version), ("c7", 3));
        assert_eq!(c.fields.len(), 4, "the owner's full record, note included");
        assert_eq!(c.owner, OWNER);
    }
}
