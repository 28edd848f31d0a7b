//! Digests of a JetStream feed's compacted state, for reconciliation.
//!
//! JetStream keeps no digest of its own, so the feed builds one from the
//! last message of each key subject of the log and keeps it in memory,
//! keyed by the log's last sequence:
//!
//! ```text
//!  digest / bucket_entries request
//!      │ log's last sequence L (one round trip)
//!      ▼
//!  cached at L? ── yes ─▶ answer from the cache
//!      │ no
//!      ▼
//!  nothing cached: ordered consumer, DeliverPolicy::LastPerSubject  (O(keys), once)
//!  cached at S < L: ordered consumer, DeliverPolicy::ByStartSequence(S + 1)  (O(changes since S))
//!      │ each message: key, version, tombstone; newer than the cached state? XOR old out, new in
//!      ▼ until the consumer has nothing pending (the stream's last message was delivered)
//!  cache := (state by bucket, digest, sequence of the last message)
//! ```
//!
//! Every answer is therefore the digest of the log's latest state per key
//! at some sequence at or after the request arrived, which is what the
//! reconciler's race argument needs ([`crate::reconcile`], "Races"): a
//! record a copy holds was on the log before the copy had it, so the
//! answer includes it. The first request of a process reads every key once
//! (an O(keys) scan; docs/BENCHMARKS.md, "Against a JetStream feed"); later
//! ones read only what was appended since. The state (key, version,
//! tombstone flag per key, no fields) stays in memory: about 60 bytes plus
//! the key per key.
//!
//! Messages are decoded and checked like reads ([`super::decode_entry`]):
//! bytes written around Spoke fail the request as a corrupt feed, naming
//! the message.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::Context;
use futures_util::StreamExt;
use spoke_core::digest::{bucket_of, Digest, DigestEntry, BUCKETS};
use spoke_core::manifest::Dataset;
use spoke_core::{Op, Version};

use super::{decode_entry, unavailable};
use crate::feed::FeedError;

/// Longest wait for the next message while the consumer still has some pending.
const MESSAGE_PATIENCE: Duration = Duration::from_secs(30);

/// One dataset's compacted state as digests see it, at one log sequence.
#[derive(Clone)]
pub(super) struct Compacted {
    /// The log sequence this state includes everything up to.
    pub sequence: u64,
    /// Per bucket: key → (version, tombstone).
    buckets: Vec<BTreeMap<String, (Version, bool)>>,
    pub digest: Digest,
}

impl Default for Compacted {
    fn default() -> Self {
        Compacted {
            sequence: 0,
            buckets: vec![BTreeMap::new(); BUCKETS],
            digest: Digest::new(),
        }
    }
}

impl Compacted {
    /// Takes one key's state if it is newer than the one held (the apply
    /// rule: the log only ever appends newer versions per key, but bytes
    /// written around Spoke could say otherwise).
    fn take(&mut self, key: String, version: Version, deleted: bool) {
        let bucket = bucket_of(&key);
        let map = &mut self.buckets[bucket as usize];
        match map.get(&key) {
            Some(&(v, _)) if v >= version => {}
            old => {
                if let Some(&(v, d)) = old {
                    self.digest.toggle(&key, v, d);
                }
                self.digest.toggle(&key, version, deleted);
                map.insert(key, (version, deleted));
            }
        }
    }

    /// Every key of `buckets`, with version and tombstone flag, in bucket
    /// then key order.
    pub fn entries(&self, buckets: &[u16]) -> Vec<DigestEntry> {
        buckets
            .iter()
            .flat_map(|&b| {
                self.buckets[b as usize]
                    .iter()
                    .map(|(k, &(v, d))| DigestEntry::new(k.clone(), v, d))
            })
            .collect()
    }

    /// Brings the state up to the log's `last` sequence: from scratch
    /// (last message per subject) when nothing was read yet, else only the
    /// messages appended after the cached sequence.
    pub async fn catch_up(
        &mut self,
        js: &Context,
        ds: &Dataset,
        log_stream: &str,
        log_subjects: &str,
        last: u64,
    ) -> Result<(), FeedError> {
        if last <= self.sequence {
            return Ok(());
        }
        let deliver_policy = if self.sequence == 0 {
            DeliverPolicy::LastPerSubject
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: self.sequence + 1,
            }
        };
        let stream = js.get_stream(log_stream).await.map_err(unavailable)?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy,
                filter_subject: log_subjects.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        // Work on a copy: a failure halfway leaves the cache as it was.
        let mut next = self.clone();
        loop {
            let m = tokio::time::timeout(MESSAGE_PATIENCE, messages.next())
                .await
                .map_err(|_| {
                    unavailable(format!(
                        "reading the compacted state of {} for its digest: no message for {}s while {log_stream} holds up to sequence {last} (read up to {})",
                        ds.name,
                        MESSAGE_PATIENCE.as_secs(),
                        next.sequence
                    ))
                })?
                .ok_or_else(|| unavailable(format!("the digest consumer of {log_stream} ended")))?
                .map_err(unavailable)?;
            let info = m.info().map_err(unavailable)?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            let change = decode_entry(ds, sequence, &m.payload)?;
            next.take(change.key, change.version, change.op == Op::Delete);
            next.sequence = next.sequence.max(sequence);
            // Delivery is in stream order, so with nothing pending the
            // stream's last message has been delivered.
            if pending == 0 && next.sequence >= last {
                break;
            }
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_state_keeps_the_newest_version_and_its_digest() {
        let mut c = Compacted::default();
        c.take("a".into(), 2, false);
        c.take("b".into(), 1, false);
        c.take("a".into(), 1, true); // older: ignored
        c.take("b".into(), 3, true); // newer tombstone replaces
        let scratch = Digest::from_entries([("a", 2, false), ("b", 3, true)]);
        assert_eq!(c.digest, scratch);
        let all: Vec<u16> = (0..BUCKETS as u16).collect();
        let mut entries = c.entries(&all);
        entries.sort();
        assert_eq!(
            entries,
            vec![
                DigestEntry::new("a", 2, false),
                DigestEntry::new("b", 3, true)
            ]
        );
        assert!(c
            .entries(&[bucket_of("a") ^ 1])
            .iter()
            .all(|e| e.key != "a"));
    }
}
