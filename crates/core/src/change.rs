//! Changes: what an owner publishes and a copy applies.
//!
//! An upsert carries the record's full projected-from state; a delete is a
//! tombstone. Both carry the owner's per-key version, which strictly increases
//! in the owner's commit order and is the only thing the apply rule compares.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::schema::{Schema, SchemaError};

/// A per-key version assigned by the owner (a bumped version column, or a
/// commit LSN for CDC). Zero is reserved for "never seen".
pub type Version = u64;

/// Longest key accepted, in bytes. Keys end up as primary keys and URL path
/// segments; a bound keeps hostile input from bloating indexes.
pub const MAX_KEY_BYTES: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Upsert,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

/// One change to one record of one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub dataset: String,
    pub key: String,
    pub version: Version,
    pub op: Op,
    /// The full record for an upsert; empty for a delete.
    #[serde(default)]
    pub fields: Map<String, Value>,
    /// The owning service that published it.
    pub owner: String,
    /// Owner commit time, milliseconds since the Unix epoch.
    pub ts: u64,
    pub schema_version: u32,
}

/// A change that cannot be accepted, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("key is empty")]
    EmptyKey,
    #[error("key is {len} bytes, longer than the limit of {MAX_KEY_BYTES}")]
    KeyTooLong { len: usize },
    #[error("key contains a control character")]
    KeyControlChar,
    #[error("version must be a positive integer, got 0")]
    ZeroVersion,
    #[error("a delete must not carry fields")]
    DeleteWithFields,
    #[error("key '{key}': {source}")]
    Schema {
        key: String,
        #[source]
        source: SchemaError,
    },
}

/// Checks a key on its own (used for path segments too).
pub fn validate_key(key: &str) -> Result<(), ChangeError> {
    if key.is_empty() {
        return Err(ChangeError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ChangeError::KeyTooLong { len: key.len() });
    }
    if key.chars().any(char::is_control) {
        return Err(ChangeError::KeyControlChar);
    }
    Ok(())
}

impl Change {
    /// Validates key, version and (for upserts) fields against `schema`.
    pub fn validate(&self, schema: &Schema) -> Result<(), ChangeError> {
        self.validate_shape()?;
        match self.op {
            Op::Upsert => schema
                .validate(&self.fields)
                .map_err(|source| ChangeError::Schema {
                    key: self.key.clone(),
                    source,
                }),
            Op::Delete => Ok(()),
        }
    }

    /// Validates key, version and that a delete carries no fields, without
    /// a schema (for changes written under a schema version the reader
    /// does not hold).
    pub fn validate_shape(&self) -> Result<(), ChangeError> {
        validate_key(&self.key)?;
        if self.version == 0 {
            return Err(ChangeError::ZeroVersion);
        }
        if self.op == Op::Delete && !self.fields.is_empty() {
            return Err(ChangeError::DeleteWithFields);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, version: Version) -> Change {
        Change {
            dataset: "d".into(),
            key: key.into(),
            version,
            op: Op::Delete,
            fields: Map::new(),
            owner: "o".into(),
            ts: 0,
            schema_version: 1,
        }
    }

    #[test]
    fn rejects_bad_keys_and_versions() {
        let s = Schema::default();
        assert_eq!(change("", 1).validate(&s), Err(ChangeError::EmptyKey));
        assert_eq!(
            change("a\nb", 1).validate(&s),
            Err(ChangeError::KeyControlChar)
        );
        assert!(matches!(
            change(&"k".repeat(MAX_KEY_BYTES + 1), 1).validate(&s),
            Err(ChangeError::KeyTooLong { .. })
        ));
        assert_eq!(change("a", 0).validate(&s), Err(ChangeError::ZeroVersion));
        assert_eq!(change("a", 1).validate(&s), Ok(()));
        let mut c = change("a", 1);
        c.fields.insert("x".into(), Value::Bool(true));
        assert_eq!(c.validate(&s), Err(ChangeError::DeleteWithFields));
    }
}
