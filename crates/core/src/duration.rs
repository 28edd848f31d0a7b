//! Human durations for budgets, intervals and horizons: `250ms`, `30s`, `5m`,
//! `1h`, `7d`, or a sum of them such as `1h30m`.

use std::fmt;
use std::str::FromStr;

/// A non-negative duration parsed from the manifest's compact notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(std::time::Duration);

/// Why a duration string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration '{input}': {reason} (expected e.g. 250ms, 30s, 5m, 1h, 7d)")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl Duration {
    pub const fn from_std(d: std::time::Duration) -> Self {
        Duration(d)
    }
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub const fn as_std(self) -> std::time::Duration {
        self.0
    }
    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| DurationError {
            input: input.to_owned(),
            reason,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        let mut total_ms: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err("a number must come before each unit"));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| err("number too large"))?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit_ms = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "" => return Err(err("missing unit")),
                _ => return Err(err("unknown unit")),
            };
            rest = &rest[unit_len..];
            total_ms = n
                .checked_mul(unit_ms)
                .and_then(|v| total_ms.checked_add(v))
                .ok_or_else(|| err("too large"))?;
        }
        Ok(Duration::from_millis(total_ms))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.as_millis();
        const UNITS: [(u64, &str); 5] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
            (1, "ms"),
        ];
        if ms == 0 {
            return f.write_str("0s");
        }
        let mut rest = ms;
        for (size, unit) in UNITS {
            if rest >= size {
                write!(f, "{}{}", rest / size, unit)?;
                rest %= size;
            }
        }
        Ok(())
    }
}

impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!("30s".parse::<Duration>().unwrap().as_millis(), 30_000);
        assert_eq!("5m".parse::<Duration>().unwrap().as_millis(), 300_000);
        assert_eq!("1h".parse::<Duration>().unwrap().as_millis(), 3_600_000);
        assert_eq!("250ms".parse::<Duration>().unwrap().as_millis(), 250);
        assert_eq!("1h30m".parse::<Duration>().unwrap().as_millis(), 5_400_000);
        assert_eq!("2d".parse::<Duration>().unwrap().as_millis(), 172_800_000);
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in ["", "5", "m", "5x", "-5s", "1.5h", "99999999999999999999s"] {
            let e = bad.parse::<Duration>().unwrap_err().to_string();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["30s", "5m", "1h", "1h30m", "250ms", "1d2h"] {
            let d: Duration = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
        }
    }
}
