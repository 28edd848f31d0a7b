//! The hub's schema registry: every version of every dataset's schema, and
//! the check that guards each new one (DESIGN.md rule 7).
//!
//! ```text
//!  hub start ── manifest schema (version N) ──▶ stored if new; the highest stored version is current
//!  POST /v1/datasets/{d}/schema {version, fields, accept_breaking}
//!      └─ owner only ─▶ version > current? names valid? ─▶ compare with current, per subscription:
//!            projected field removed, retyped or made optional ─▶ a break naming consumer and field
//!            breaks and not accept_breaking ─▶ 409, nothing stored
//!            else ─▶ stored ─▶ installed in the feed's catalog: later publishes validate against it
//! ```
//!
//! An owner that must ship a breaking change says so (`accept_breaking`);
//! the hub records which consumers it breaks and accepts it. Those
//! consumers' agents then quarantine the changes their copies cannot hold
//! (see [`crate::quarantine`]) instead of applying them half, and their
//! status says why the copy stopped advancing. Added fields are listed with
//! the version, so consumers learn they are available; nothing projects them
//! until a consumer's subscription names them.
//!
//! Versions live in `schemas.db` in the hub's data directory (SQLite), or in
//! memory for an ephemeral hub. A hub in front of JetStream keeps its own
//! registry: run one hub per deployment, or give them the same manifest.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use spoke_core::manifest::{is_identifier, Dataset, MAX_NAME_LEN};
use spoke_core::{FieldSpec, Manifest, Schema};

use crate::feed::Catalog;

/// One stored version of a dataset's schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaVersion {
    pub version: u32,
    pub fields: BTreeMap<String, FieldSpec>,
    /// When the hub stored it (its clock, ms since the epoch).
    pub registered_at_ms: u64,
    /// Fields this version has that the previous one did not: available
    /// to consumers, copied by none until a subscription names them.
    #[serde(default)]
    pub added: Vec<String>,
    /// The subscriptions this version broke (accepted with `accept_breaking`).
    #[serde(default)]
    pub breaks: Vec<ConsumerBreak>,
}

impl SchemaVersion {
    pub fn schema(&self) -> Schema {
        Schema::new(self.version, self.fields.clone())
    }
}

/// A projected field that a new schema version breaks for one consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerBreak {
    pub consumer: String,
    pub field: String,
    /// What happens to it, e.g. "is removed".
    pub problem: String,
    /// The manifest line of the subscription.
    pub line: usize,
}

impl std::fmt::Display for ConsumerBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "field '{}' {}, but {} projects it (manifest line {})",
            self.field, self.problem, self.consumer, self.line
        )
    }
}

/// The body of `POST /v1/datasets/{d}/schema`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub version: u32,
    pub fields: BTreeMap<String, FieldSpec>,
    /// Store the version even though it breaks subscriptions.
    #[serde(default)]
    pub accept_breaking: bool,
}

/// Why a version was not stored.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown dataset '{0}'")]
    UnknownDataset(String),
    #[error("{0}")]
    Invalid(String),
    #[error("schema version {version} of {dataset} breaks {} subscription field(s): {}; nothing was stored. Ask those consumers to change their projections first, or register again with \"accept_breaking\": true, and their agents will quarantine the changes they cannot hold", breaks.len(), breaks.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Incompatible {
        dataset: String,
        version: u32,
        breaks: Vec<ConsumerBreak>,
    },
    #[error("schema registry store: {0}")]
    Store(String),
}

fn store_err(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Store(e.to_string())
}

/// Every dataset's schema versions, oldest first.
pub struct SchemaRegistry {
    manifest: std::sync::Arc<Manifest>,
    db: Option<Mutex<Connection>>,
    versions: Mutex<HashMap<String, Vec<SchemaVersion>>>,
    /// Catalogs that validate publishes and must learn each new version.
    catalogs: Vec<Catalog>,
    /// Held through a registration, from the version check to the store, so
    /// two registrations of the same version cannot both pass.
    registering: Mutex<()>,
}

impl SchemaRegistry {
    /// Opens the registry in `dir` (`None`: in memory), storing the
    /// manifest's schema versions it does not hold yet. A manifest version
    /// that the registry holds with other fields is an error: two schemas
    /// must not share a version.
    pub fn open(
        dir: Option<&Path>,
        manifest: std::sync::Arc<Manifest>,
        now_ms: u64,
    ) -> Result<Self, RegistryError> {
        let db = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .map_err(|e| RegistryError::Store(format!("creating {}: {e}", d.display())))?;
                let c = Connection::open(d.join("schemas.db")).map_err(store_err)?;
                c.execute_batch(
                    "CREATE TABLE IF NOT EXISTS schemas (
                        dataset TEXT NOT NULL,
                        version INTEGER NOT NULL,
                        body TEXT NOT NULL,
                        PRIMARY KEY (dataset, version)
                    );",
                )
                .map_err(store_err)?;
                Some(c)
            }
            None => None,
        };
        let mut versions: HashMap<String, Vec<SchemaVersion>> = HashMap::new();
        if let Some(c) = &db {
            let mut stmt = c
                .prepare("SELECT dataset, body FROM schemas ORDER BY dataset, version")
                .map_err(store_err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(store_err)?;
            for row in rows {
                let (ds, body) = row.map_err(store_err)?;
                let v: SchemaVersion = serde_json::from_str(&body).map_err(|e| {
                    RegistryError::Store(format!("a stored schema of {ds} is unreadable: {e}"))
                })?;
                versions.entry(ds).or_default().push(v);
            }
        }
        let registry = SchemaRegistry {
            manifest: manifest.clone(),
            db: db.map(Mutex::new),
            versions: Mutex::new(versions),
            catalogs: Vec::new(),
            registering: Mutex::new(()),
        };
        for (name, ds) in &manifest.datasets {
            let known = registry.versions_of(name);
            match known.iter().find(|v| v.version == ds.schema.version) {
                Some(v) if v.fields != ds.schema.fields => {
                    return Err(RegistryError::Invalid(format!(
                        "dataset {name}: the manifest's schema version {} differs from the version {} the hub registered earlier; give the manifest's schema a new schema_version",
                        ds.schema.version, v.version
                    )))
                }
                Some(_) => {}
                None if known.last().is_some_and(|l| l.version > ds.schema.version) => {
                    tracing::warn!(
                        dataset = %name,
                        "the manifest declares schema version {} but the hub registered version {} since: the registry's is current",
                        ds.schema.version,
                        known.last().map_or(0, |l| l.version)
                    );
                }
                None => {
                    let added = known
                        .last()
                        .map(|prev| prev.schema().added(&ds.schema).into_iter().map(str::to_owned).collect())
                        .unwrap_or_default();
                    registry.store(
                        name,
                        SchemaVersion {
                            version: ds.schema.version,
                            fields: ds.schema.fields.clone(),
                            registered_at_ms: now_ms,
                            added,
                            breaks: Vec::new(),
                        },
                    )?;
                }
            }
        }
        Ok(registry)
    }

    /// Installs every current schema into `catalog` and keeps it updated
    /// with the versions registered from now on.
    pub fn with_catalog(mut self, catalog: Catalog) -> Result<Self, RegistryError> {
        for name in self.manifest.datasets.keys() {
            if let Some(current) = self.current(name) {
                catalog
                    .install(name, current)
                    .map_err(|e| RegistryError::Store(e.to_string()))?;
            }
        }
        self.catalogs.push(catalog);
        Ok(self)
    }

    fn versions_of(&self, dataset: &str) -> Vec<SchemaVersion> {
        self.versions
            .lock()
            .expect("registry lock")
            .get(dataset)
            .cloned()
            .unwrap_or_default()
    }

    fn dataset(&self, dataset: &str) -> Result<&Dataset, RegistryError> {
        self.manifest
            .datasets
            .get(dataset)
            .ok_or_else(|| RegistryError::UnknownDataset(dataset.to_owned()))
    }

    /// Every stored version of `dataset`, oldest first.
    pub fn versions(&self, dataset: &str) -> Result<Vec<SchemaVersion>, RegistryError> {
        self.dataset(dataset)?;
        Ok(self.versions_of(dataset))
    }

    /// The newest version of `dataset`'s schema.
    pub fn current(&self, dataset: &str) -> Option<Schema> {
        self.versions
            .lock()
            .expect("registry lock")
            .get(dataset)?
            .last()
            .map(SchemaVersion::schema)
    }

    /// What `next` would break: every subscription's projected fields of
    /// `dataset` compared between `current` and `next`.
    fn breaks(&self, dataset: &str, current: &Schema, next: &Schema) -> Vec<ConsumerBreak> {
        self.manifest
            .subscriptions
            .iter()
            .filter(|s| s.dataset == dataset && s.strategy.stores_copy())
            .flat_map(|s| {
                current
                    .breaks(next, s.fields.iter().map(String::as_str))
                    .into_iter()
                    .map(|(field, b)| ConsumerBreak {
                        consumer: s.consumer.clone(),
                        field,
                        problem: b.to_string(),
                        line: s.line,
                    })
            })
            .collect()
    }

    /// Checks and stores a new version; on success it is current and every
    /// catalog validates later publishes against it.
    pub fn register(
        &self,
        dataset: &str,
        reg: Registration,
        now_ms: u64,
    ) -> Result<SchemaVersion, RegistryError> {
        let ds = self.dataset(dataset)?;
        if reg.fields.is_empty() {
            return Err(RegistryError::Invalid(format!(
                "schema version {} of {dataset} declares no fields",
                reg.version
            )));
        }
        for name in reg.fields.keys() {
            if !is_identifier(name) || name.starts_with("_spoke") || name.len() > MAX_NAME_LEN {
                return Err(RegistryError::Invalid(format!(
                    "field name '{}' must be an identifier of at most {MAX_NAME_LEN} bytes not starting with _spoke",
                    name.escape_debug()
                )));
            }
        }
        for f in ds.private.iter().chain(ds.current.iter()) {
            if !reg.fields.contains_key(f) {
                tracing::info!(dataset, field = %f, "schema version {} drops a field the manifest marks private or must-be-current", reg.version);
            }
        }
        let next = Schema::new(reg.version, reg.fields.clone());
        let _registering = self.registering.lock().expect("registry lock");
        let current = self
            .current(dataset)
            .ok_or_else(|| RegistryError::UnknownDataset(dataset.to_owned()))?;
        if reg.version <= current.version {
            return Err(RegistryError::Invalid(format!(
                "schema version {} of {dataset} is not newer than the current version {}",
                reg.version, current.version
            )));
        }
        let breaks = self.breaks(dataset, &current, &next);
        if !breaks.is_empty() && !reg.accept_breaking {
            return Err(RegistryError::Incompatible {
                dataset: dataset.to_owned(),
                version: reg.version,
                breaks,
            });
        }
        let v = SchemaVersion {
            version: reg.version,
            added: current
                .added(&next)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            fields: reg.fields,
            registered_at_ms: now_ms,
            breaks,
        };
        self.store(dataset, v.clone())?;
        for c in &self.catalogs {
            c.install(dataset, v.schema())
                .map_err(|e| RegistryError::Store(e.to_string()))?;
        }
        if v.breaks.is_empty() {
            tracing::info!(dataset, version = v.version, added = ?v.added, "schema version registered");
        } else {
            tracing::warn!(
                dataset,
                version = v.version,
                "schema version registered although it breaks subscriptions: {}",
                v.breaks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        Ok(v)
    }

    fn store(&self, dataset: &str, v: SchemaVersion) -> Result<(), RegistryError> {
        if let Some(db) = &self.db {
            let body = serde_json::to_string(&v).map_err(store_err)?;
            let c = db.lock().expect("registry db");
            let exists: Option<i64> = c
                .query_row(
                    "SELECT 1 FROM schemas WHERE dataset = ?1 AND version = ?2",
                    params![dataset, v.version],
                    |r| r.get(0),
                )
                .optional()
                .map_err(store_err)?;
            if exists.is_none() {
                c.execute(
                    "INSERT INTO schemas (dataset, version, body) VALUES (?1, ?2, ?3)",
                    params![dataset, v.version, body],
                )
                .map_err(store_err)?;
            }
        }
        self.versions
            .lock()
            .expect("registry lock")
            .entry(dataset.to_owned())
            .or_default()
            .push(v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::memory::MemoryFeed;
    use crate::feed::{ChangeInput, Feed, Publisher};
    use serde_json::json;
    use std::sync::Arc;

    const MANIFEST: &str = r#"
[services.customer-service]
[services.order-service]
[services.billing]

[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string", tier = "string?" }

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "email"]
strategy = "events"
staleness_budget = "5m"

[[subscriptions]]
consumer = "billing"
dataset = "customers"
fields = ["name"]
strategy = "events"
staleness_budget = "5m"
"#;

    fn manifest() -> Arc<Manifest> {
        Arc::new(Manifest::parse("m.toml", MANIFEST).expect("manifest"))
    }

    fn reg(version: u32, fields: serde_json::Value, accept_breaking: bool) -> Registration {
        serde_json::from_value(
            json!({"version": version, "fields": fields, "accept_breaking": accept_breaking}),
        )
        .expect("registration")
    }

    #[tokio::test]
    async fn a_breaking_version_is_refused_by_name_then_accepted_when_acknowledged() {
        let m = manifest();
        let feed = MemoryFeed::new(&m);
        let r = SchemaRegistry::open(None, m.clone(), 1)
            .unwrap()
            .with_catalog(feed.catalog().unwrap().clone())
            .unwrap();
        assert_eq!(r.current("customers").unwrap().version, 1);
        let v2 = json!({"name": "string", "tier": "string?", "loyalty": "int?"});
        let e = r
            .register("customers", reg(2, v2.clone(), false), 2)
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("field 'email' is removed, but order-service projects it"),
            "{text}"
        );
        assert!(
            !text.contains("billing"),
            "billing does not project email: {text}"
        );
        assert_eq!(r.current("customers").unwrap().version, 1, "nothing stored");
        // Publishes still validate against version 1.
        let no_email = json!({"name": "Ada"}).as_object().cloned().unwrap();
        feed.publish(
            "customers",
            vec![ChangeInput::upsert("c1", 1, no_email.clone())],
        )
        .await
        .expect_err("email is required by version 1");

        let v = r.register("customers", reg(2, v2, true), 3).unwrap();
        assert_eq!(v.added, ["loyalty"]);
        assert_eq!(v.breaks.len(), 1);
        assert_eq!(v.breaks[0].consumer, "order-service");
        let receipt = feed
            .publish("customers", vec![ChangeInput::upsert("c1", 1, no_email)])
            .await
            .expect("version 2 has no email");
        assert_eq!(receipt.positions.len(), 1);
        let batch = feed
            .read("customers", 0, 10, std::time::Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(batch.entries[0].change.schema_version, 2);

        let e = r
            .register("customers", reg(2, json!({"name": "string"}), true), 4)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("not newer than the current version 2"),
            "{e}"
        );
    }

    #[test]
    fn compatible_changes_pass_and_bad_names_are_refused() {
        let r = SchemaRegistry::open(None, manifest(), 1).unwrap();
        // email required → optional breaks order-service only; tier optional → required is fine.
        let e = r
            .register(
                "customers",
                reg(
                    2,
                    json!({"name": "string", "email": "string?", "tier": "string"}),
                    false,
                ),
                2,
            )
            .unwrap_err();
        assert!(e.to_string().contains("becomes optional"), "{e}");
        r.register(
            "customers",
            reg(
                2,
                json!({"name": "string", "email": "string", "tier": "string", "x": "int?"}),
                false,
            ),
            2,
        )
        .unwrap();
        for bad in ["_spoke_v", "a b", "Robert'); DROP TABLE x;--", ""] {
            let e = r
                .register(
                    "customers",
                    reg(3, json!({"name": "string", bad: "int?"}), false),
                    3,
                )
                .unwrap_err();
            assert!(matches!(e, RegistryError::Invalid(_)), "{bad}: {e}");
        }
        let e = r
            .register("customers", reg(3, json!({}), false), 3)
            .unwrap_err();
        assert!(e.to_string().contains("declares no fields"), "{e}");
        let e = r
            .register("nope", reg(3, json!({"a": "int"}), false), 3)
            .unwrap_err();
        assert!(matches!(e, RegistryError::UnknownDataset(_)));
    }

    #[test]
    fn versions_survive_a_restart_and_a_conflicting_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = SchemaRegistry::open(Some(dir.path()), manifest(), 1).unwrap();
        r.register(
            "customers",
            reg(
                2,
                json!({"name": "string", "email": "string", "tier": "string?", "x": "int?"}),
                false,
            ),
            2,
        )
        .unwrap();
        drop(r);
        let r = SchemaRegistry::open(Some(dir.path()), manifest(), 5).unwrap();
        let versions: Vec<u32> = r
            .versions("customers")
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, [1, 2]);
        assert_eq!(r.current("customers").unwrap().version, 2);
        drop(r);
        let changed = MANIFEST.replace("tier = \"string?\"", "tier = \"int?\"");
        let m = Arc::new(Manifest::parse("m.toml", &changed).unwrap());
        let e = SchemaRegistry::open(Some(dir.path()), m, 6)
            .err()
            .expect("conflict");
        assert!(
            e.to_string()
                .contains("give the manifest's schema a new schema_version"),
            "{e}"
        );
    }
}
