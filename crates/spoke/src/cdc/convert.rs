//! Column text → dataset JSON values, and which PostgreSQL column types a
//! dataset field type accepts.
//!
//! ```text
//!  pgoutput text value ─┐
//!                       ├─▶ to_json(field type, column type, text) ─▶ serde_json::Value
//!  snapshot `col::text` ┘
//! ```
//!
//! # Contract
//! - The snapshot reads every column as `col::text` and the stream receives
//!   the output function's text, both with `TimeZone=UTC` and
//!   `DateStyle=ISO`, so one converter serves both and a row converts to the
//!   same JSON whichever path brought it.
//! - A value that cannot be represented (a timestamp of `infinity`, a `NaN`
//!   numeric, an int out of range) is an error naming what was wrong, never a
//!   silently changed value.
//! - [`compatible`] is strict on purpose: a column retyped to something the
//!   dataset's field type does not accept stops the source (rule 7), e.g.
//!   `int` → `text`. User-defined types (enums, domains; OIDs ≥ 16384) are
//!   taken as strings.

use serde_json::Value;
use spoke_core::FieldType;

/// Well-known type OIDs (`pg_type.oid`, stable across versions).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
    /// First OID of user-defined objects.
    pub const FIRST_USER: u32 = 16384;
}

/// Integer column types (usable as a version column).
pub fn is_integer(type_oid: u32) -> bool {
    matches!(type_oid, oid::INT2 | oid::INT4 | oid::INT8 | oid::OID)
}

/// Whether a column of `type_oid` can feed a field of type `ty`.
pub fn compatible(ty: FieldType, type_oid: u32) -> bool {
    match ty {
        FieldType::String => {
            matches!(
                type_oid,
                oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UUID
            ) || type_oid >= oid::FIRST_USER
        }
        FieldType::Int => is_integer(type_oid),
        FieldType::Float => {
            is_integer(type_oid) || matches!(type_oid, oid::FLOAT4 | oid::FLOAT8 | oid::NUMERIC)
        }
        FieldType::Bool => type_oid == oid::BOOL,
        FieldType::Timestamp => matches!(type_oid, oid::TIMESTAMPTZ | oid::TIMESTAMP | oid::DATE),
        FieldType::Json => matches!(type_oid, oid::JSON | oid::JSONB),
    }
}

/// Converts one non-null text value of a column of `type_oid` into a field of type `ty`.
pub fn to_json(ty: FieldType, type_oid: u32, text: &str) -> Result<Value, String> {
    match ty {
        FieldType::String => Ok(Value::String(text.to_owned())),
        FieldType::Int => text
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("'{text}' is not a 64-bit integer")),
        FieldType::Float => {
            if is_integer(type_oid) {
                return text
                    .parse::<i64>()
                    .map(Value::from)
                    .map_err(|_| format!("'{text}' is not a 64-bit integer"));
            }
            let f: f64 = text
                .parse()
                .map_err(|_| format!("'{text}' is not a number"))?;
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("'{text}' has no JSON representation"))
        }
        FieldType::Bool => match text {
            "t" | "true" => Ok(Value::Bool(true)),
            "f" | "false" => Ok(Value::Bool(false)),
            _ => Err(format!("'{text}' is not a boolean")),
        },
        FieldType::Timestamp => rfc3339(type_oid, text).map(Value::String),
        FieldType::Json => {
            serde_json::from_str(text).map_err(|e| format!("'{text}' is not JSON: {e}"))
        }
    }
}

/// PostgreSQL ISO output (`2026-01-02 03:04:05.5+00`, `2026-01-02 03:04:05`,
/// `2026-01-02`) → RFC 3339 (`2026-01-02T03:04:05.5Z`). A timestamp without
/// time zone is taken as UTC.
pub fn rfc3339(type_oid: u32, text: &str) -> Result<String, String> {
    let bad = || format!("'{text}' cannot be written as an RFC 3339 timestamp");
    if text.ends_with(" BC") || text.contains("infinity") {
        return Err(bad());
    }
    let out = if type_oid == oid::DATE {
        format!("{text}T00:00:00Z")
    } else {
        let (date, time) = text.split_once(' ').ok_or_else(bad)?;
        // An offset starts at the last '+' or '-' of the time part.
        let (clock, offset) = match time.rfind(['+', '-']) {
            Some(i) => (&time[..i], Some(&time[i..])),
            None => (time, None),
        };
        let offset = match offset {
            None => "Z".to_owned(),
            Some(o) => {
                let sign = &o[..1];
                let parts: Vec<&str> = o[1..].split(':').collect();
                match parts.as_slice() {
                    ["00"] | ["00", "00"] => "Z".to_owned(),
                    [h] => format!("{sign}{h}:00"),
                    [h, m] => format!("{sign}{h}:{m}"),
                    // Seconds in an offset (historic zones) have no RFC 3339 form.
                    _ => return Err(bad()),
                }
            }
        };
        format!("{date}T{clock}{offset}")
    };
    if spoke_core::schema::is_rfc3339(&out) {
        Ok(out)
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_each_type() {
        assert_eq!(
            to_json(FieldType::String, oid::TEXT, "a b").unwrap(),
            json!("a b")
        );
        assert_eq!(
            to_json(FieldType::Int, oid::INT8, "-9223372036854775808").unwrap(),
            json!(i64::MIN)
        );
        assert!(to_json(FieldType::Int, oid::INT4, "1.5").is_err());
        assert_eq!(
            to_json(FieldType::Float, oid::NUMERIC, "12.50").unwrap(),
            json!(12.5)
        );
        assert_eq!(to_json(FieldType::Float, oid::INT4, "3").unwrap(), json!(3));
        assert!(to_json(FieldType::Float, oid::NUMERIC, "NaN").is_err());
        assert_eq!(
            to_json(FieldType::Bool, oid::BOOL, "t").unwrap(),
            json!(true)
        );
        assert_eq!(
            to_json(FieldType::Bool, oid::BOOL, "false").unwrap(),
            json!(false)
        );
        assert_eq!(
            to_json(FieldType::Json, oid::JSONB, r#"{"a": [1, 2]}"#).unwrap(),
            json!({"a": [1, 2]})
        );
        assert!(to_json(FieldType::Json, oid::JSON, "{").is_err());
    }

    #[test]
    fn timestamps_become_rfc3339() {
        let tz = |s| to_json(FieldType::Timestamp, oid::TIMESTAMPTZ, s);
        assert_eq!(
            tz("2026-01-02 03:04:05+00").unwrap(),
            json!("2026-01-02T03:04:05Z")
        );
        assert_eq!(
            tz("2026-01-02 03:04:05.123456+00").unwrap(),
            json!("2026-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            tz("2026-01-02 03:04:05+05:30").unwrap(),
            json!("2026-01-02T03:04:05+05:30")
        );
        assert_eq!(
            tz("2026-01-02 03:04:05-08").unwrap(),
            json!("2026-01-02T03:04:05-08:00")
        );
        assert!(tz("infinity").is_err());
        assert!(tz("0044-03-15 00:00:00+00 BC").is_err());
        assert!(tz("1900-01-01 00:00:00+00:09:21").is_err());
        assert_eq!(
            to_json(FieldType::Timestamp, oid::TIMESTAMP, "2026-01-02 03:04:05").unwrap(),
            json!("2026-01-02T03:04:05Z")
        );
        assert_eq!(
            to_json(FieldType::Timestamp, oid::DATE, "2026-01-02").unwrap(),
            json!("2026-01-02T00:00:00Z")
        );
    }

    #[test]
    fn compatibility_is_strict() {
        assert!(compatible(FieldType::Int, oid::INT4));
        assert!(!compatible(FieldType::Int, oid::TEXT));
        assert!(!compatible(FieldType::String, oid::INT4));
        assert!(compatible(FieldType::String, 70_000));
        assert!(compatible(FieldType::Float, oid::INT8));
        assert!(!compatible(FieldType::Bool, oid::INT2));
        assert!(compatible(FieldType::Json, oid::JSONB));
        assert!(!compatible(FieldType::Timestamp, oid::TEXT));
    }
}
