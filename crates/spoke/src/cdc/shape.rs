//! A table's shape as the dataset sees it: which column is the key, which
//! the version, which feed which field — built from the catalog (snapshot)
//! or a Relation message (stream), and checked against the dataset.
//!
//! ```text
//!  columns [(name, type oid)] ─▶ Shape::build ─┬─▶ Err(Schema): a declared field dropped or retyped
//!                                              └─▶ roles per column ─▶ Shape::row(values) ─▶ key, version, fields
//! ```
//!
//! # Contract
//! - Columns are matched to dataset fields by name; columns the dataset does
//!   not declare are ignored (added columns pass).
//! - Every declared field must have a column of a compatible type
//!   ([`super::convert::compatible`]); otherwise [`CdcError::Schema`] names
//!   the table, column, dataset, schema version and the consumers projecting it.
//! - A row converts completely or not at all: a null in a required field or
//!   an unconvertible value is [`CdcError::Value`].

use serde_json::{Map, Value};
use spoke_core::manifest::Dataset;
use spoke_core::{FieldSpec, Manifest};

use super::convert::{self, oid};
use super::pgoutput;
use super::{CdcError, TableMapping};

/// What one column of the table is to the dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    Key,
    Version,
    Field(String, FieldSpec),
    /// The key and a field at once (a dataset may also declare its key column).
    KeyField(String, FieldSpec),
    Ignored,
}

#[derive(Debug, Clone)]
pub struct Shape {
    pub table: String,
    pub dataset: String,
    pub columns: Vec<(String, u32, Role)>,
    pub key_index: usize,
    pub version_index: Option<usize>,
}

/// A converted row image.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub version: Option<u64>,
    pub fields: Map<String, Value>,
    /// Fields whose value the image did not carry (unchanged TOAST).
    pub missing: Vec<String>,
}

fn type_name(type_oid: u32) -> String {
    let known = match type_oid {
        oid::BOOL => "boolean",
        oid::NAME => "name",
        oid::INT8 => "bigint",
        oid::INT2 => "smallint",
        oid::INT4 => "integer",
        oid::TEXT => "text",
        oid::OID => "oid",
        oid::JSON => "json",
        oid::FLOAT4 => "real",
        oid::FLOAT8 => "double precision",
        oid::BPCHAR => "character",
        oid::VARCHAR => "character varying",
        oid::DATE => "date",
        oid::TIMESTAMP => "timestamp without time zone",
        oid::TIMESTAMPTZ => "timestamp with time zone",
        oid::NUMERIC => "numeric",
        oid::UUID => "uuid",
        oid::JSONB => "jsonb",
        _ => return format!("type oid {type_oid}"),
    };
    known.to_owned()
}

/// Consumers whose subscriptions project `field` of `dataset`.
pub fn consumers(manifest: &Manifest, dataset: &str, field: &str) -> Vec<String> {
    let mut out: Vec<String> = manifest
        .subscriptions
        .iter()
        .filter(|s| s.dataset == dataset && s.fields.iter().any(|f| f == field))
        .map(|s| s.consumer.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

impl Shape {
    pub fn build(
        mapping: &TableMapping,
        dataset: &Dataset,
        manifest: &Manifest,
        columns: &[(String, u32)],
    ) -> Result<Shape, CdcError> {
        let table = mapping.qualified();
        let schema_error = |column: &str, message: String| CdcError::Schema {
            dataset: dataset.name.clone(),
            schema_version: dataset.schema.version,
            table: table.clone(),
            column: column.to_owned(),
            message,
            consumers: consumers(manifest, &dataset.name, column),
        };
        let find = |name: &str| columns.iter().position(|(n, _)| n == name);
        let key_index = find(&mapping.key).ok_or_else(|| {
            schema_error(
                &mapping.key,
                format!(
                    "key column '{}' of dataset '{}' does not exist",
                    mapping.key, dataset.name
                ),
            )
        })?;
        let version_index = match &mapping.version {
            None => None,
            Some(v) => {
                let i = find(v).ok_or_else(|| {
                    schema_error(
                        v,
                        format!(
                            "version column '{v}' of dataset '{}' does not exist",
                            dataset.name
                        ),
                    )
                })?;
                if !convert::is_integer(columns[i].1) {
                    return Err(schema_error(
                        v,
                        format!(
                            "version column '{v}' is {}, not an integer",
                            type_name(columns[i].1)
                        ),
                    ));
                }
                Some(i)
            }
        };
        for (field, spec) in &dataset.schema.fields {
            match find(field) {
                None => {
                    return Err(schema_error(
                        field,
                        format!(
                            "column '{field}' (field '{field}' {spec} of dataset '{}') was dropped or renamed",
                            dataset.name
                        ),
                    ))
                }
                Some(i) if !convert::compatible(spec.ty, columns[i].1) => {
                    return Err(schema_error(
                        field,
                        format!(
                            "column '{field}' is now {}, which field '{field}' ({spec}) of dataset '{}' cannot hold (retyped)",
                            type_name(columns[i].1),
                            dataset.name
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let shaped = columns
            .iter()
            .enumerate()
            .map(|(i, (name, ty))| {
                let field = dataset.schema.fields.get(name).copied();
                let role = match (i == key_index, version_index == Some(i), field) {
                    (true, _, Some(spec)) => Role::KeyField(name.clone(), spec),
                    (true, _, None) => Role::Key,
                    (false, true, Some(spec)) => Role::Field(name.clone(), spec),
                    (false, true, None) => Role::Version,
                    (false, false, Some(spec)) => Role::Field(name.clone(), spec),
                    (false, false, None) => Role::Ignored,
                };
                (name.clone(), *ty, role)
            })
            .collect();
        Ok(Shape {
            table,
            dataset: dataset.name.clone(),
            columns: shaped,
            key_index,
            version_index,
        })
    }

    fn value_error(&self, key: &str, column: &str, message: String) -> CdcError {
        CdcError::Value {
            table: self.table.clone(),
            key: key.to_owned(),
            column: column.to_owned(),
            message,
        }
    }

    /// The key of a row image, when the image carries it.
    pub fn key_of(&self, values: &[pgoutput::Value]) -> Option<String> {
        match values.get(self.key_index) {
            Some(pgoutput::Value::Text(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The version column's value of a row image, when it carries one.
    pub fn version_of(
        &self,
        key: &str,
        values: &[pgoutput::Value],
    ) -> Result<Option<u64>, CdcError> {
        let Some(i) = self.version_index else {
            return Ok(None);
        };
        match values.get(i) {
            Some(pgoutput::Value::Text(s)) => self.parse_version(key, s).map(Some),
            _ => Ok(None),
        }
    }

    fn parse_version(&self, key: &str, s: &str) -> Result<u64, CdcError> {
        let column = &self.columns[self.version_index.unwrap_or(0)].0;
        match s.parse::<u64>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(self.value_error(
                key,
                column,
                format!("version '{s}' is not a positive integer"),
            )),
        }
    }

    /// Converts a row image. `Unchanged` values end up in `missing`.
    pub fn row(&self, values: &[pgoutput::Value]) -> Result<Row, CdcError> {
        if values.len() != self.columns.len() {
            return Err(CdcError::Stream(format!(
                "table {}: a row has {} columns, the relation {}",
                self.table,
                values.len(),
                self.columns.len()
            )));
        }
        let key = match &values[self.key_index] {
            pgoutput::Value::Text(s) => s.clone(),
            other => {
                return Err(self.value_error(
                    "?",
                    &self.columns[self.key_index].0,
                    format!("the key column is {other:?}"),
                ))
            }
        };
        spoke_core::change::validate_key(&key)
            .map_err(|e| self.value_error(&key, &self.columns[self.key_index].0, e.to_string()))?;
        let mut row = Row {
            key,
            version: None,
            fields: Map::new(),
            missing: Vec::new(),
        };
        for (i, (column, ty, role)) in self.columns.iter().enumerate() {
            if Some(i) == self.version_index {
                match &values[i] {
                    pgoutput::Value::Text(s) => {
                        row.version = Some(self.parse_version(&row.key, s)?)
                    }
                    other => {
                        return Err(self.value_error(
                            &row.key,
                            column,
                            format!("the version column is {other:?}"),
                        ))
                    }
                }
            }
            let (name, spec) = match role {
                Role::Field(n, s) | Role::KeyField(n, s) => (n, s),
                _ => continue,
            };
            let value = match &values[i] {
                pgoutput::Value::Null if spec.optional => Value::Null,
                pgoutput::Value::Null => {
                    return Err(self.value_error(
                        &row.key,
                        column,
                        format!(
                            "NULL in field '{name}', which the dataset declares required ({spec})"
                        ),
                    ))
                }
                pgoutput::Value::Unchanged => {
                    row.missing.push(name.clone());
                    continue;
                }
                pgoutput::Value::Binary(_) => {
                    return Err(self.value_error(
                        &row.key,
                        column,
                        "binary value (Spoke reads text format)".into(),
                    ))
                }
                pgoutput::Value::Text(s) => convert::to_json(spec.ty, *ty, s)
                    .map_err(|m| self.value_error(&row.key, column, m))?,
            };
            row.fields.insert(name.clone(), value);
        }
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgoutput::Value as V;
    use serde_json::json;

    const MANIFEST: &str = r#"
[services.owner]
[services.reader]
[datasets.items]
owner = "owner"
key = "id"
fields = { name = "string", tier = "int?", price = "float" }
[[subscriptions]]
consumer = "reader"
dataset = "items"
fields = ["name", "tier"]
staleness_budget = "1m"
"#;

    fn setup() -> (Manifest, TableMapping) {
        (
            Manifest::parse("m.toml", MANIFEST).unwrap(),
            TableMapping::parse_flag("items=public.items:id").unwrap(),
        )
    }

    fn cols(c: &[(&str, u32)]) -> Vec<(String, u32)> {
        c.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    }

    #[test]
    fn maps_columns_by_name_and_ignores_extra_ones() {
        let (m, t) = setup();
        let shape = Shape::build(
            &t,
            &m.datasets["items"],
            &m,
            &cols(&[
                ("extra", oid::TEXT),
                ("price", oid::NUMERIC),
                ("id", oid::INT8),
                ("name", oid::TEXT),
                ("tier", oid::INT4),
            ]),
        )
        .unwrap();
        let row = shape
            .row(&[
                V::Text("x".into()),
                V::Text("2.5".into()),
                V::Text("7".into()),
                V::Text("Ada".into()),
                V::Null,
            ])
            .unwrap();
        assert_eq!(row.key, "7");
        assert_eq!(
            Value::Object(row.fields),
            json!({"price": 2.5, "name": "Ada", "tier": null})
        );
    }

    #[test]
    fn a_dropped_or_retyped_field_names_table_column_and_consumers() {
        let (m, t) = setup();
        let ds = &m.datasets["items"];
        let e = Shape::build(
            &t,
            ds,
            &m,
            &cols(&[
                ("id", oid::INT8),
                ("name", oid::TEXT),
                ("price", oid::FLOAT8),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("public.items")
                && e.contains("'tier'")
                && e.contains("dropped")
                && e.contains("reader"),
            "{e}"
        );
        let e = Shape::build(
            &t,
            ds,
            &m,
            &cols(&[
                ("id", oid::INT8),
                ("name", oid::INT4),
                ("tier", oid::INT4),
                ("price", oid::FLOAT8),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("'name' is now integer") && e.contains("reader"),
            "{e}"
        );
        let e = Shape::build(&t, ds, &m, &cols(&[("name", oid::TEXT)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key column 'id'"), "{e}");
    }

    #[test]
    fn rows_convert_completely_or_not_at_all() {
        let (m, t) = setup();
        let shape = Shape::build(
            &t,
            &m.datasets["items"],
            &m,
            &cols(&[
                ("id", oid::TEXT),
                ("name", oid::TEXT),
                ("tier", oid::INT4),
                ("price", oid::FLOAT8),
            ]),
        )
        .unwrap();
        let e = shape
            .row(&[V::Text("k".into()), V::Null, V::Null, V::Text("1".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("NULL in field 'name'"), "{e}");
        let e = shape
            .row(&[
                V::Text("k".into()),
                V::Text("n".into()),
                V::Text("x".into()),
                V::Text("1".into()),
            ])
            .unwrap_err()
            .to_string();
        assert!(e.contains("column 'tier'") && e.contains("key 'k'"), "{e}");
        let row = shape
            .row(&[
                V::Text("k".into()),
                V::Unchanged,
                V::Null,
                V::Text("1".into()),
            ])
            .unwrap();
        assert_eq!(row.missing, vec!["name".to_owned()]);
    }

    #[test]
    fn version_columns_must_be_positive_integers() {
        let (m, _) = setup();
        let t = TableMapping::parse_flag("items=public.items:id:v").unwrap();
        let ds = &m.datasets["items"];
        let c = cols(&[
            ("id", oid::TEXT),
            ("name", oid::TEXT),
            ("tier", oid::INT4),
            ("price", oid::FLOAT8),
            ("v", oid::INT8),
        ]);
        let shape = Shape::build(&t, ds, &m, &c).unwrap();
        let ok = [
            V::Text("k".into()),
            V::Text("n".into()),
            V::Null,
            V::Text("1".into()),
            V::Text("42".into()),
        ];
        assert_eq!(shape.row(&ok).unwrap().version, Some(42));
        let mut zero = ok.clone();
        zero[4] = V::Text("0".into());
        assert!(shape.row(&zero).is_err());
        let mut c2 = c.clone();
        c2[4].1 = oid::TEXT;
        assert!(Shape::build(&t, ds, &m, &c2)
            .unwrap_err()
            .to_string()
            .contains("not an integer"));
    }
}
