//! The manifest as written: TOML with source spans, before any checking.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManifest {
    #[serde(default)]
    pub services: BTreeMap<String, Spanned<RawService>>,
    #[serde(default)]
    pub datasets: BTreeMap<String, Spanned<RawDataset>>,
    #[serde(default)]
    pub subscriptions: Vec<Spanned<RawSubscription>>,
    #[serde(default)]
    pub paths: BTreeMap<String, Spanned<RawPath>>,
    pub policy: Option<Spanned<RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub availability: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataset {
    /// A value rather than a string so that a list of owners gets the
    /// one-owner message instead of a TOML type error.
    pub owner: Option<Spanned<toml::Value>>,
    pub key: Option<Spanned<String>>,
    #[serde(default)]
    pub fields: BTreeMap<String, Spanned<String>>,
    pub schema_version: Option<Spanned<u32>>,
    pub tombstone_horizon: Option<Spanned<String>>,
    pub private: Option<Spanned<Vec<String>>>,
    pub grants: Option<Spanned<BTreeMap<String, Spanned<Vec<String>>>>>,
    pub current: Option<Spanned<Vec<String>>>,
    pub sizes: Option<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    pub derived_from: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubscription {
    pub consumer: Option<Spanned<String>>,
    pub dataset: Option<Spanned<String>>,
    pub fields: Option<Spanned<Vec<String>>>,
    pub strategy: Option<Spanned<String>>,
    pub staleness_budget: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub snapshot_url: Option<Spanned<String>>,
    pub snapshot_sql: Option<Spanned<String>>,
    pub reconcile_every: Option<Spanned<String>>,
    pub ttl: Option<Spanned<String>>,
    pub owner_url: Option<Spanned<String>>,
    /// An integer in TOML; signed so that a negative count gets its own message.
    pub max_entries: Option<Spanned<i64>>,
    pub negative_ttl: Option<Spanned<String>>,
    pub stale_if_error: Option<Spanned<String>>,
    pub traits: Option<Spanned<BTreeMap<String, Spanned<RawTraits>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTraits {
    pub critical: Option<bool>,
    pub tolerance: Option<String>,
    pub changes: Option<String>,
    pub access: Option<String>,
    pub impact: Option<String>,
    pub historical: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPath {
    pub service: Option<Spanned<String>>,
    pub calls: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub budget_floor: Option<Spanned<String>>,
    pub large_field: Option<Spanned<toml::Value>>,
}

/// Maps byte offsets to 1-based line numbers.
pub(super) struct Lines(Vec<usize>);

impl Lines {
    pub fn new(src: &str) -> Self {
        Lines(
            std::iter::once(0)
                .chain(src.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        )
    }
    pub fn of(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}
