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
        let f = Freshness {
            fresh_as_of_ms: 1_000,
        };
        assert_eq!(f.staleness_ms(4_000), Some(3_000));
        assert!(f.within(Duration::from_secs(3), 4_000));
        assert!(!f.within(Duration::from_secs(2), 4_000));
        assert_eq!(Freshness::never().staleness_ms(5), None);
        assert!(!Freshness::never().within(Duration::from_secs(3600), 5));
        // A clock that went backwards reads as zero staleness, not a panic.
        assert_eq!(f.staleness_ms(10), Some(0));
    }
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC with millisecond precision.
pub fn format_rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod format_tests {
    use super::format_rfc3339_ms;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(951_782_400_123),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(1_795_876_200_000),
            "2026-11-28T14:30:00.000Z"
        );
    }
}
