//! Freshness and staleness.
//!
//! A copy is *fresh as of T* when it has applied everything the feed held at
//! T. The agent learns this from feed responses (each one, even an empty
//! long-poll answer, carries the feed's head position): when the copy's
//! position reaches the head returned by a request sent at local time T, the
//! copy is fresh as of T. T is read on the consumer's own clock, before the
//! request left, so clock skew between hub and consumer never makes a copy
//! look fresher than it is. Staleness is `now − T`.

use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// What a copy knows about its own freshness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Freshness {
    /// Milliseconds since the Unix epoch on the consumer's clock; 0 = never.
    pub fresh_as_of_ms: u64,
}

impl Freshness {
    pub fn never() -> Self {
        Freshness { fresh_as_of_ms: 0 }
    }

    /// Staleness at `now_ms`; `None` when the copy was never fresh.
    pub fn staleness_ms(&self, now_ms: u64) -> Option<u64> {
        (self.fresh_as_of_ms != 0).then(|| now_ms.saturating_sub(self.fresh_as_of_ms))
    }

    /// Whether the staleness at `now_ms` is within `budget`. A copy that was
    /// never fresh is never within budget.
    pub fn within(&self, budget: Duration, now_ms: u64) -> bool {
        self.staleness_ms(now_ms)
            .is_some_and(|s| s <= budget.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_is_measured_from_fresh_as_of() {
        let f = Freshness { fresh_as_of_ms: 1_000 };
        assert_eq!(f.staleness_ms(4_000), Some(3_000));
        assert!(f.within(Duration::from_secs(3), 4_000));
        assert!(!f.within(Duration::from_secs(2), 4_000));
        assert_eq!(Freshness::never().staleness_ms(5), None);
        assert!(!Freshness::never().within(Duration::from_secs(3600), 5));
        // A clock that went backwards reads as zero staleness, not a panic.
        assert_eq!(f.staleness_ms(10), Some(0));
    }
}
