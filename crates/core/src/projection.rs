//! Projections: the fields a consumer declared (and was granted) for a copy.

use serde_json::{Map, Value};

use crate::schema::{FieldSpec, Schema, SchemaError};

/// An ordered list of projected fields with their specs from the owner's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    fields: Vec<(String, FieldSpec)>,
}

impl Projection {
    /// Builds a projection; `None` when a field is not in the schema (the
    /// manifest check reports that case with its line).
    pub fn new(schema: &Schema, names: &[String]) -> Option<Self> {
        let fields = names
            .iter()
            .map(|n| schema.fields.get(n).map(|s| (n.clone(), *s)))
            .collect::<Option<Vec<_>>>()?;
        Some(Projection { fields })
    }

    /// No fields: for reads that only need keys and versions.
    pub fn none() -> Self {
        Projection { fields: Vec::new() }
    }

    /// The projection of every field in the schema.
    pub fn all(schema: &Schema) -> Self {
        Projection {
            fields: schema.fields.iter().map(|(n, s)| (n.clone(), *s)).collect(),
        }
    }

    pub fn fields(&self) -> &[(String, FieldSpec)] {
        &self.fields
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(n, _)| n.as_str())
    }

    /// Checks that an upsert's record can fill this projection: every
    /// projected field present (unless optional) with its declared type.
    /// Fields outside the projection are not looked at.
    pub fn check(&self, record: &Map<String, Value>) -> Result<(), SchemaError> {
        for (name, spec) in &self.fields {
            match record.get(name) {
                Some(v) => spec.check(name, v)?,
                None if spec.optional => {}
                None => {
                    return Err(SchemaError::MissingField {
                        field: name.clone(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Keeps only the projected fields; absent optional fields become `null`
    /// so every copy row has every column.
    pub fn apply(&self, record: &Map<String, Value>) -> Map<String, Value> {
        self.fields
            .iter()
            .map(|(n, _)| (n.clone(), record.get(n).cloned().unwrap_or(Value::Null)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_only_declared_fields() {
        let mut s = Schema::default();
        s.fields.insert("name".into(), "string".parse().unwrap());
        s.fields.insert("secret".into(), "string".parse().unwrap());
        s.fields.insert("nick".into(), "string?".parse().unwrap());
        let p = Projection::new(&s, &["name".into(), "nick".into()]).unwrap();
        let rec = json!({"name": "Ada", "secret": "x"});
        let out = p.apply(rec.as_object().unwrap());
        assert_eq!(Value::Object(out), json!({"name": "Ada", "nick": null}));
        assert!(Projection::new(&s, &["missing".into()]).is_none());
    }

    #[test]
    fn check_names_what_the_projection_cannot_be_filled_with() {
        let mut s = Schema::default();
        s.fields.insert("name".into(), "string".parse().unwrap());
        s.fields.insert("nick".into(), "string?".parse().unwrap());
        let p = Projection::new(&s, &["name".into(), "nick".into()]).unwrap();
        let ok = json!({"name": "Ada", "other": 1});
        p.check(ok.as_object().unwrap()).unwrap();
        let e = p
            .check(json!({"nick": "a"}).as_object().unwrap())
            .unwrap_err();
        assert_eq!(e.to_string(), "required field 'name' is missing");
        let e = p
            .check(json!({"name": 1}).as_object().unwrap())
            .unwrap_err();
        assert_eq!(e.to_string(), "field 'name' must be string, got an int");
        let e = p
            .check(json!({"name": null}).as_object().unwrap())
            .unwrap_err();
        assert_eq!(e.to_string(), "field 'name' must be string, got null");
    }
}
