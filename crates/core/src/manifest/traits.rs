//! What a consumer declares about each field it wants, for the decision
//! framework of `spoke advise` ([`crate::advise`]): how critical it is, how
//! stale it may be, how often it changes, how often it is read, what a wrong
//! value costs and whether it is a point-in-time fact.
//!
//! Every trait is optional; [`crate::advise`] documents the defaults.

use std::fmt;

use crate::duration::Duration;

/// How often the owner changes a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Changes {
    /// Set once (country codes, a customer's sign-up date).
    Never,
    /// Now and then (names, email addresses, categories).
    Rarely,
    /// Many times a day (prices, statuses).
    Often,
    /// All the time (stock levels, balances, counters).
    Constantly,
}

/// How often the consumer reads a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// On every request it serves.
    EveryRequest,
    /// Regularly, but not on every request.
    Often,
    /// Now and then (a report, an admin page).
    Rarely,
}

/// What happens when the consumer acts on a wrong (stale) value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Impact {
    /// Nothing anyone notices.
    None,
    /// A worse experience: an old name shown, a notification to an old address.
    Ux,
    /// Money lost: overselling, a wrong price, a charge that fails.
    Financial,
    /// Harm to people: a wrong dosage, a wrong safety limit.
    Safety,
}

macro_rules! keyword_enum {
    ($ty:ident, $what:literal, $expected:literal, { $($name:literal => $v:ident),+ $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$v),+];
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($name => Some($ty::$v),)+
                    _ => None,
                }
            }
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$v => $name,)+
                }
            }
            /// What the manifest may say, for error messages.
            pub const EXPECTED: &'static str = $expected;
            /// The trait's key in the manifest.
            pub const KEY: &'static str = $what;
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keyword_enum!(Changes, "changes", "never, rarely, often or constantly", {
    "never" => Never, "rarely" => Rarely, "often" => Often, "constantly" => Constantly,
});
keyword_enum!(Access, "access", "every-request, often or rarely", {
    "every-request" => EveryRequest, "often" => Often, "rarely" => Rarely,
});
keyword_enum!(Impact, "impact", "none, ux, financial or safety", {
    "none" => None, "ux" => Ux, "financial" => Financial, "safety" => Safety,
});

/// The traits a subscription declares for one of its fields; `None` means
/// "not declared" (the advisor uses its default and says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FieldTraits {
    /// Needed for a critical operation (the consumer cannot work without it).
    pub critical: Option<bool>,
    /// How stale the value may be for this consumer's use.
    pub tolerance: Option<Duration>,
    pub changes: Option<Changes>,
    pub access: Option<Access>,
    pub impact: Option<Impact>,
    /// A point-in-time fact of the consumer's own record (the price paid,
    /// the address shipped to): later changes at the owner must not rewrite it.
    pub historical: Option<bool>,
}

/// Parses a declared size: a whole number of bytes, or a number with a unit
/// `B`, `KB`, `MB`, `GB` (powers of 1000) or `KiB`, `MiB`, `GiB` (powers of
/// 1024), e.g. `"512B"`, `"16KiB"`, `"2MB"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!(
            "invalid size '{s}': a number must come first (expected e.g. 512B, 16KiB, 2MB)"
        ));
    }
    let n: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("invalid size '{s}': number too large"))?;
    let unit: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "invalid size '{s}': unknown unit '{u}' (expected B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// Formats a byte count compactly: `512B`, `16KiB`, `2MB`, `1.5MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str, u64, &str); 3] = [
        (1 << 30, "GiB", 1_000_000_000, "GB"),
        (1 << 20, "MiB", 1_000_000, "MB"),
        (1 << 10, "KiB", 1_000, "KB"),
    ];
    for (bin, bin_unit, dec, dec_unit) in UNITS {
        if bytes >= bin {
            return if bytes.is_multiple_of(bin) {
                format!("{}{bin_unit}", bytes / bin)
            } else if bytes.is_multiple_of(dec) {
                format!("{}{dec_unit}", bytes / dec)
            } else {
                format!("{:.1}{bin_unit}", bytes as f64 / bin as f64)
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("16KiB"), Ok(16_384));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("big")
            .unwrap_err()
            .contains("a number must come first"));
        assert!(parse_size("3 parsecs")
            .unwrap_err()
            .contains("unknown unit 'parsecs'"));
        assert_eq!(format_size(4096), "4KiB");
        assert_eq!(format_size(2_000_000), "2MB");
        assert_eq!(format_size(1536 * 1024), "1.5MiB");
        assert_eq!(format_size(700), "700B");
    }

    #[test]
    fn keywords_round_trip() {
        for c in Changes::ALL {
            assert_eq!(Changes::parse(c.as_str()), Some(*c));
        }
        for a in Access::ALL {
            assert_eq!(Access::parse(a.as_str()), Some(*a));
        }
        for i in Impact::ALL {
            assert_eq!(Impact::parse(i.as_str()), Some(*i));
        }
        assert_eq!(Access::parse("every-request"), Some(Access::EveryRequest));
        assert_eq!(Impact::parse("money"), None);
    }
}
