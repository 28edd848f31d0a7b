//! An in-memory snapshot source for tests: the owner's records by key,
//! counters of what was asked, and a switch to make it fail.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::{Map, Value};
use spoke_core::{Projection, Version};

use super::{check_listing, Listed, SnapshotError, SnapshotRecord, SnapshotSource};

/// The owner's records: key → (version, fields).
type Records = BTreeMap<String, (Version, Map<String, Value>)>;

pub struct MemorySnapshot {
    dataset: String,
    projection: Projection,
    records: Mutex<Records>,
    listings: AtomicU64,
    fetched_keys: AtomicU64,
    failing: AtomicBool,
}

impl MemorySnapshot {
    pub fn new(dataset: &str, projection: Projection) -> Self {
        MemorySnapshot {
            dataset: dataset.to_owned(),
            projection,
            records: Mutex::new(BTreeMap::new()),
            listings: AtomicU64::new(0),
            fetched_keys: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        }
    }

    /// Sets the owner's record for `key`.
    pub fn put(&self, key: &str, version: Version, fields: Value) {
        let Value::Object(fields) = fields else {
            panic!("fields must be an object");
        };
        self.records
            .lock()
            .expect("snapshot lock")
            .insert(key.to_owned(), (version, fields));
    }

    pub fn remove(&self, key: &str) {
        self.records.lock().expect("snapshot lock").remove(key);
    }

    /// While set, every call fails (transiently, like an owner that is down).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Listings served.
    pub fn listings(&self) -> u64 {
        self.listings.load(Ordering::SeqCst)
    }

    /// Keys whose full records were asked for, in total.
    pub fn fetched_keys(&self) -> u64 {
        self.fetched_keys.load(Ordering::SeqCst)
    }

    fn check_up(&self) -> Result<(), SnapshotError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(SnapshotError::Source {
                dataset: self.dataset.clone(),
                from: self.describe(),
                reason: "owner is down (test switch)".into(),
                transient: true,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl SnapshotSource for MemorySnapshot {
    fn describe(&self) -> String {
        format!("memory://{}", self.dataset)
    }

    async fn list(
        &self,
        progress: &(dyn Fn(usize) + Send + Sync),
    ) -> Result<Vec<Listed>, SnapshotError> {
        self.check_up()?;
        self.listings.fetch_add(1, Ordering::SeqCst);
        let listed: Vec<Listed> = self
            .records
            .lock()
            .expect("snapshot lock")
            .iter()
            .map(|(k, (v, _))| Listed {
                key: k.clone(),
                version: *v,
            })
            .collect();
        check_listing(&listed).map_err(|reason| SnapshotError::Source {
            dataset: self.dataset.clone(),
            from: self.describe(),
            reason,
            transient: false,
        })?;
        progress(listed.len());
        Ok(listed)
    }

    async fn records(&self, keys: &[String]) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        self.check_up()?;
        self.fetched_keys
            .fetch_add(keys.len() as u64, Ordering::SeqCst);
        let records = self.records.lock().expect("snapshot lock");
        Ok(keys
            .iter()
            .filter_map(|k| {
                let (version, fields) = records.get(k)?;
                Some(SnapshotRecord {
                    key: k.clone(),
                    version: *version,
                    fields: self.projection.apply(fields),
                })
            })
            .collect())
    }
}
