//! Dataset schemas: the owner's declaration of each field's type.
//!
//! An upsert carries the record's full state, so every required field must be
//! present, every present field must be declared, and each value must have the
//! declared type. Optional fields (`string?`) may be absent or `null`.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The types a field can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    String,
    Int,
    Float,
    Bool,
    /// RFC 3339 text, e.g. `2026-11-28T14:00:00Z`.
    Timestamp,
    /// Any JSON value.
    Json,
}

impl FieldType {
    pub const ALL: [FieldType; 6] = [
        FieldType::String,
        FieldType::Int,
        FieldType::Float,
        FieldType::Bool,
        FieldType::Timestamp,
        FieldType::Json,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
            FieldType::Json => "json",
        }
    }

    /// Whether a non-null JSON value has this type.
    pub fn accepts(self, v: &Value) -> bool {
        match self {
            FieldType::String => v.is_string(),
            FieldType::Int => v.is_i64() || v.is_u64(),
            FieldType::Float => v.is_number(),
            FieldType::Bool => v.is_boolean(),
            FieldType::Timestamp => v.as_str().is_some_and(is_rfc3339),
            FieldType::Json => true,
        }
    }
}

/// One field's declaration: its type and whether it may be missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldSpec {
    pub ty: FieldType,
    pub optional: bool,
}

/// Why a type string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown field type '{0}' (expected string, int, float, bool, timestamp or json, with '?' for optional)")]
pub struct FieldTypeError(pub String);

impl FromStr for FieldSpec {
    type Err = FieldTypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (base, optional) = match s.strip_suffix('?') {
            Some(b) => (b, true),
            None => (s, false),
        };
        let ty = FieldType::ALL
            .into_iter()
            .find(|t| t.name() == base)
            .ok_or_else(|| FieldTypeError(s.to_owned()))?;
        Ok(FieldSpec { ty, optional })
    }
}

impl FieldSpec {
    /// Checks one present value (`null` included) of field `name`.
    pub fn check(&self, name: &str, value: &Value) -> Result<(), SchemaError> {
        let ok = if value.is_null() {
            self.optional
        } else {
            self.ty.accepts(value)
        };
        if ok {
            Ok(())
        } else {
            Err(SchemaError::WrongType {
                field: name.to_owned(),
                expected: self.to_string(),
                got: json_kind(value),
            })
        }
    }
}

impl fmt::Display for FieldSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            self.ty.name(),
            if self.optional { "?" } else { "" }
        )
    }
}

impl serde::Serialize for FieldSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for FieldSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A dataset's schema: field name → spec, in a stable order.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Schema {
    pub version: u32,
    pub fields: BTreeMap<String, FieldSpec>,
}

/// A change's fields do not match the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("field '{field}' is not in the schema")]
    UnknownField { field: String },
    #[error("required field '{field}' is missing")]
    MissingField { field: String },
    #[error("field '{field}' must be {expected}, got {got}")]
    WrongType {
        field: String,
        expected: String,
        got: &'static str,
    },
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an int",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Schema {
    pub fn new(version: u32, fields: BTreeMap<String, FieldSpec>) -> Self {
        Schema { version, fields }
    }

    /// Checks an upsert's full record against the schema.
    pub fn validate(&self, fields: &Map<String, Value>) -> Result<(), SchemaError> {
        for (name, value) in fields {
            let spec = self
                .fields
                .get(name)
                .ok_or_else(|| SchemaError::UnknownField {
                    field: name.clone(),
                })?;
            spec.check(name, value)?;
        }
        for (name, spec) in &self.fields {
            if !spec.optional && !fields.contains_key(name) {
                return Err(SchemaError::MissingField {
                    field: name.clone(),
                });
            }
        }
        Ok(())
    }
}

/// How a new schema version breaks a field some consumer projects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// The field is gone.
    Removed,
    /// The field's type changed, or it became optional (so `null` may now
    /// arrive where the copy was promised a value).
    Retyped { from: FieldSpec, to: FieldSpec },
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Break::Removed => write!(f, "is removed"),
            Break::Retyped { from, to } if from.ty == to.ty => {
                write!(
                    f,
                    "becomes optional ({from} → {to}), so it may arrive as null"
                )
            }
            Break::Retyped { from, to } => write!(f, "changes type from {from} to {to}"),
        }
    }
}

impl Schema {
    /// What `next` breaks among `projected` fields of this schema. A field
    /// that keeps its type, or goes from optional to required, is compatible.
    pub fn breaks<'a>(
        &self,
        next: &Schema,
        projected: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(String, Break)> {
        projected
            .into_iter()
            .filter_map(|name| {
                let from = *self.fields.get(name)?;
                let b = match next.fields.get(name) {
                    None => Break::Removed,
                    Some(to) if to.ty != from.ty || (to.optional && !from.optional) => {
                        Break::Retyped { from, to: *to }
                    }
                    Some(_) => return None,
                };
                Some((name.to_owned(), b))
            })
            .collect()
    }

    /// Fields `next` has that this schema does not.
    pub fn added<'a>(&self, next: &'a Schema) -> Vec<&'a str> {
        next.fields
            .keys()
            .filter(|n| !self.fields.contains_key(*n))
            .map(String::as_str)
            .collect()
    }
}

/// A strict-enough RFC 3339 check: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|x| x.iter().all(u8::is_ascii_digit));
    let num = |r: std::ops::Range<usize>| -> u32 { s[r].parse().unwrap_or(99) };
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
    {
        return false;
    }
    if !matches!(b[10], b'T' | b't' | b' ')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let (month, day, hour, min, sec) =
        (num(5..7), num(8..10), num(11..13), num(14..16), num(17..19));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &s[i..] {
        "Z" | "z" => true,
        off => {
            let o = off.as_bytes();
            o.len() == 6
                && matches!(o[0], b'+' | b'-')
                && o[1..3].iter().all(u8::is_ascii_digit)
                && o[3] == b':'
                && o[4..6].iter().all(u8::is_ascii_digit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        let mut f = BTreeMap::new();
        f.insert("name".into(), "string".parse().unwrap());
        f.insert("nick".into(), "string?".parse().unwrap());
        f.insert("age".into(), "int".parse().unwrap());
        f.insert("score".into(), "float?".parse().unwrap());
        f.insert("vip".into(), "bool?".parse().unwrap());
        f.insert("born".into(), "timestamp?".parse().unwrap());
        f.insert("extra".into(), "json?".parse().unwrap());
        Schema::new(1, f)
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn accepts_a_valid_record() {
        let s = schema();
        s.validate(&obj(
            json!({"name": "Ada", "age": 36, "score": 1, "vip": true,
            "born": "1815-12-10T00:00:00Z", "extra": {"a": [1]}, "nick": null}),
        ))
        .unwrap();
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        let s = schema();
        let e = s.validate(&obj(json!({"name": 5, "age": 1}))).unwrap_err();
        assert_eq!(e.to_string(), "field 'name' must be string, got an int");
        let e = s.validate(&obj(json!({"name": "a"}))).unwrap_err();
        assert_eq!(e.to_string(), "required field 'age' is missing");
        let e = s
            .validate(&obj(json!({"name": "a", "age": 1, "zzz": 1})))
            .unwrap_err();
        assert_eq!(e.to_string(), "field 'zzz' is not in the schema");
        let e = s
            .validate(&obj(json!({"name": null, "age": 1})))
            .unwrap_err();
        assert!(e.to_string().contains("got null"));
        let e = s
            .validate(&obj(json!({"name": "a", "age": 1.5})))
            .unwrap_err();
        assert!(e.to_string().contains("must be int"));
        let e = s
            .validate(&obj(json!({"name": "a", "age": 1, "born": "yesterday"})))
            .unwrap_err();
        assert!(e.to_string().contains("'born' must be timestamp?"));
    }

    #[test]
    fn breaks_name_removed_retyped_and_loosened_fields_only() {
        let old = schema();
        let mut next = schema();
        next.version = 2;
        next.fields.remove("name");
        next.fields.insert("age".into(), "string".parse().unwrap());
        next.fields.insert("nick".into(), "string".parse().unwrap());
        next.fields.insert("vip".into(), "bool?".parse().unwrap());
        next.fields.insert("score".into(), "float".parse().unwrap());
        next.fields.insert("new".into(), "int?".parse().unwrap());
        let mut old2 = old.clone();
        old2.fields.insert("score".into(), "float".parse().unwrap());
        let b = old2.breaks(&next, ["name", "age", "nick", "vip", "score", "ghost"]);
        let text: Vec<String> = b.iter().map(|(f, b)| format!("{f} {b}")).collect();
        assert_eq!(
            text,
            ["name is removed", "age changes type from int to string"],
            "nick (optional → required), vip and score (unchanged) are compatible"
        );
        let mut loosened = old2.clone();
        loosened
            .fields
            .insert("age".into(), "int?".parse().unwrap());
        let b = old2.breaks(&loosened, ["age"]);
        assert_eq!(
            b[0].1.to_string(),
            "becomes optional (int → int?), so it may arrive as null"
        );
        assert_eq!(old.added(&next), ["new"]);
    }

    #[test]
    fn parses_types() {
        assert_eq!("int?".parse::<FieldSpec>().unwrap().to_string(), "int?");
        assert!("integer".parse::<FieldSpec>().is_err());
        assert!("?".parse::<FieldSpec>().is_err());
    }

    #[test]
    fn rfc3339() {
        assert!(is_rfc3339("2026-11-28T14:00:00Z"));
        assert!(is_rfc3339("2026-11-28T14:00:00.123+01:00"));
        assert!(!is_rfc3339("2026-13-28T14:00:00Z"));
        assert!(!is_rfc3339("2026-11-28"));
        assert!(!is_rfc3339("2026-11-28T14:00:00"));
        assert!(!is_rfc3339("2026-11-28T14:00:00.Z"));
    }
}
