//! What an agent's apply observer saw: for every numbered change of a
//! latency run, the instant its apply transaction committed.
//!
//! ```text
//!  agent apply commits ─▶ observer(changes) ─▶ seq_of(change) ─┬─ Some(seq): seen[seq] = now (first time only)
//!                                                              └─ None: counted as `other` (warm-up, bootstrap)
//! ```
//!
//! The latency benches number the changes they publish (or commit) from 0
//! and tell this observer how to read the number back from a change: from
//! key and version (`spoke bench e2e`) or from a field (`spoke bench cdc`,
//! whose versions are commit LSNs the bench does not know in advance).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use spoke_core::Change;

use super::{Summary, DATASET};

/// Reads a change's sequence number, `None` for changes the bench did not number.
pub type SeqOf = Box<dyn Fn(&Change) -> Option<u64> + Send + Sync>;

pub struct Visibility {
    seq_of: SeqOf,
    /// Per sequence number, when its apply committed (first time only).
    seen: Mutex<Vec<Option<Instant>>>,
    /// Distinct sequence numbers seen.
    count: AtomicU64,
    /// Changes seen that carry no sequence number (warm-up, bootstrap).
    other: AtomicU64,
    /// Apply transactions observed.
    applies: AtomicU64,
}

impl Visibility {
    pub fn new(total: u64, seq_of: SeqOf) -> Self {
        Visibility {
            seq_of,
            seen: Mutex::new(vec![None; total as usize]),
            count: AtomicU64::new(0),
            other: AtomicU64::new(0),
            applies: AtomicU64::new(0),
        }
    }

    /// The agent's observer: called right after each apply transaction commits.
    pub fn observe(&self, dataset: &str, changes: &[Change]) {
        if dataset != DATASET {
            return;
        }
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("visibility");
        let mut n = 0;
        for c in changes {
            match (self.seq_of)(c) {
                Some(s) => {
                    if let Some(slot @ None) = seen.get_mut(s as usize) {
                        *slot = Some(now);
                        n += 1;
                    }
                }
                None => {
                    self.other.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        drop(seen);
        self.count.fetch_add(n, Ordering::Release);
        self.applies.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    pub fn other(&self) -> u64 {
        self.other.load(Ordering::Relaxed)
    }

    pub fn applies(&self) -> u64 {
        self.applies.load(Ordering::Relaxed)
    }

    /// Waits until `want` numbered changes were seen, at most `timeout`.
    pub async fn wait_for(&self, want: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until `want` unnumbered changes were seen; `false` on timeout.
    pub async fn wait_for_other(&self, want: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.other() < want {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Latencies of changes `base..base + started.len()`, each measured from
    /// `started[i]`, and from when it fell due at `rate` after `start`.
    /// Changes never seen are left out; the first value is how many were seen.
    pub fn latencies(
        &self,
        base: u64,
        started: &[Instant],
        start: Instant,
        rate: u64,
    ) -> (u64, Summary, Summary) {
        let seen = self.seen.lock().expect("visibility");
        let mut lat = Vec::with_capacity(started.len());
        let mut from_due = Vec::with_capacity(started.len());
        for (i, t0) in started.iter().enumerate() {
            if let Some(Some(t)) = seen.get((base + i as u64) as usize) {
                lat.push(t.saturating_duration_since(*t0).as_secs_f64() * 1e3);
                let due = start + Duration::from_secs_f64((i as u64 + 1) as f64 / rate as f64);
                from_due.push(t.saturating_duration_since(due).as_secs_f64() * 1e3);
            }
        }
        drop(seen);
        (
            lat.len() as u64,
            Summary::of(&mut lat),
            Summary::of(&mut from_due),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoke_core::Op;

    fn change(key: &str, version: u64) -> Change {
        Change {
            dataset: DATASET.into(),
            key: key.into(),
            version,
            op: Op::Upsert,
            fields: serde_json::Map::new(),
            owner: "o".into(),
            ts: 0,
            schema_version: 1,
        }
    }

    #[test]
    fn counts_each_numbered_change_once_and_the_rest_as_other() {
        let v = Visibility::new(
            4,
            Box::new(|c: &Change| c.key.strip_prefix('c')?.parse().ok()),
        );
        let t0 = Instant::now() - Duration::from_secs(1);
        v.observe(
            DATASET,
            &[change("c0", 1), change("c2", 1), change("w1", 1)],
        );
        v.observe(DATASET, &[change("c2", 2), change("c9", 1)]);
        v.observe("elsewhere", &[change("c1", 1)]);
        assert_eq!((v.count(), v.other(), v.applies()), (2, 1, 2));
        let (seen, lat, _) = v.latencies(0, &[t0; 4], t0, 1000);
        assert_eq!(seen, 2, "c1 and c3 never showed up");
        assert!(lat.p50_ms >= 1000.0, "{lat:?}");
    }
}
