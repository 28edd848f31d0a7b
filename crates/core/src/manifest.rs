//! The manifest: Spoke's record of who owns what, who copies what, how and
//! how stale it may be.
//!
//! Loading has two stages, kept apart on purpose: the raw TOML (with source
//! spans) and the resolved [`Manifest`] that the rest of Spoke uses. Every
//! problem found on the way is collected, not just the first, and carries the
//! line it came from so `spoke check` can print `file:line: problem`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::duration::Duration;
use crate::schema::{FieldSpec, Schema};

/// Default garbage-collection horizon for tombstones in copies.
pub const DEFAULT_TOMBSTONE_HORIZON: Duration = Duration::from_secs(7 * 86_400);
/// Longest dataset, field or service name; names become SQL identifiers.
pub const MAX_NAME_LEN: usize = 63;

/// How a subscription keeps its copy in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Follow the owner's feed.
    Events,
    /// Follow a feed produced from the owner's PostgreSQL WAL.
    Cdc,
    /// Periodic snapshot and diff.
    Scheduled,
    /// Read-through cache with expiry.
    Ttl,
    /// Do not copy: call the owner synchronously.
    None,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "events" => Strategy::Events,
            "cdc" => Strategy::Cdc,
            "scheduled" => Strategy::Scheduled,
            "ttl" => Strategy::Ttl,
            "none" => Strategy::None,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Events => "events",
            Strategy::Cdc => "cdc",
            Strategy::Scheduled => "scheduled",
            Strategy::Ttl => "ttl",
            Strategy::None => "none",
        }
    }
    /// Whether copies under this strategy are maintained by following the feed.
    pub fn follows_feed(self) -> bool {
        matches!(self, Strategy::Events | Strategy::Cdc)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub availability: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub owner: String,
    /// Name of the key field in the owner's records.
    pub key: String,
    pub schema: Schema,
    pub tombstone_horizon: Duration,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub consumer: String,
    pub dataset: String,
    pub fields: Vec<String>,
    pub strategy: Strategy,
    pub staleness_budget: Duration,
    pub line: usize,
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Manifest {
    pub services: BTreeMap<String, Service>,
    pub datasets: BTreeMap<String, Dataset>,
    pub subscriptions: Vec<Subscription>,
}

/// One problem, at a line of the manifest (1-based; 0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

/// Every problem found in one manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}", self.file, p.line, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    services: BTreeMap<String, Spanned<RawService>>,
    #[serde(default)]
    datasets: BTreeMap<String, Spanned<RawDataset>>,
    #[serde(default)]
    subscriptions: Vec<Spanned<RawSubscription>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    availability: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    owner: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    fields: BTreeMap<String, Spanned<String>>,
    schema_version: Option<Spanned<u32>>,
    tombstone_horizon: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscription {
    consumer: Option<Spanned<String>>,
    dataset: Option<Spanned<String>>,
    fields: Option<Spanned<Vec<String>>>,
    strategy: Option<Spanned<String>>,
    staleness_budget: Option<Spanned<String>>,
}

/// Maps byte offsets to 1-based line numbers.
struct Lines(Vec<usize>);

impl Lines {
    fn new(src: &str) -> Self {
        Lines(
            std::iter::once(0)
                .chain(src.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        )
    }
    fn of(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

/// Whether `name` is usable as a dataset or field name: it becomes an SQL
/// identifier and a URL path segment.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Whether `name` is usable as a service name (`order-service`).
pub fn is_service_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl Manifest {
    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ManifestError {
            file: file.clone(),
            problems: vec![Problem {
                line: 0,
                message: format!("cannot read manifest: {e}"),
            }],
        })?;
        Self::parse(&file, &src)
    }

    /// Validates manifest text; `file` is only used in messages.
    pub fn parse(file: &str, src: &str) -> Result<Self, ManifestError> {
        let lines = Lines::new(src);
        let fail = |problems| ManifestError {
            file: file.to_owned(),
            problems,
        };
        let raw: RawManifest = toml::from_str(src).map_err(|e| {
            let line = e.span().map_or(0, |s| lines.of(s.start));
            let message = e.message().trim().replace('\n', " ");
            fail(vec![Problem { line, message }])
        })?;
        let mut problems = Vec::new();
        let manifest = resolve(raw, &lines, &mut problems);
        if problems.is_empty() {
            Ok(manifest)
        } else {
            problems.sort_by_key(|p| p.line);
            Err(fail(problems))
        }
    }

    /// The subscriptions of one consumer.
    pub fn subscriptions_of<'a>(
        &'a self,
        consumer: &'a str,
    ) -> impl Iterator<Item = &'a Subscription> + 'a {
        self.subscriptions
            .iter()
            .filter(move |s| s.consumer == consumer)
    }
}

fn resolve(raw: RawManifest, lines: &Lines, problems: &mut Vec<Problem>) -> Manifest {
    let mut report = |offset: usize, message: String| {
        problems.push(Problem {
            line: lines.of(offset),
            message,
        })
    };
    let mut m = Manifest::default();

    for (name, svc) in &raw.services {
        let at = svc.span().start;
        if !is_service_name(name) {
            report(at, format!("service name '{name}' must be lowercase letters, digits, '-' or '_', starting with a letter, at most {MAX_NAME_LEN} chars"));
        }
        let availability = svc.get_ref().availability.as_ref().map(|a| {
            let v = *a.get_ref();
            if !(v > 0.0 && v <= 1.0) {
                report(
                    a.span().start,
                    format!("service {name}: availability must be in (0, 1], got {v}"),
                );
            }
            v
        });
        m.services.insert(
            name.clone(),
            Service {
                name: name.clone(),
                availability,
            },
        );
    }

    for (name, ds) in raw.datasets {
        let at = ds.span().start;
        let ds = ds.into_inner();
        if !is_identifier(name.as_str()) {
            report(at, format!("dataset name '{name}' must be lowercase letters, digits or '_', starting with a letter, at most {MAX_NAME_LEN} chars"));
        }
        let owner = match ds.owner {
            None => {
                report(
                    at,
                    format!("dataset {name} has no owner (add owner = \"<service>\")"),
                );
                String::new()
            }
            Some(o) => {
                if !m.services.contains_key(o.get_ref()) {
                    report(o.span().start, format!("dataset {name}: owner '{}' is not a declared service (add [services.{}])", o.get_ref(), o.get_ref()));
                }
                o.into_inner()
            }
        };
        let key = match ds.key {
            None => {
                report(
                    at,
                    format!("dataset {name} has no key (add key = \"<field>\")"),
                );
                String::new()
            }
            Some(k) => {
                if !is_identifier(k.get_ref()) {
                    report(
                        k.span().start,
                        format!(
                            "dataset {name}: key name '{}' must be an identifier",
                            k.get_ref()
                        ),
                    );
                }
                if ds.fields.contains_key(k.get_ref()) {
                    report(
                        k.span().start,
                        format!(
                            "dataset {name}: key '{}' must not also be listed in fields",
                            k.get_ref()
                        ),
                    );
                }
                k.into_inner()
            }
        };
        if ds.fields.is_empty() {
            report(at, format!("dataset {name} declares no fields"));
        }
        let mut fields = BTreeMap::new();
        for (field, ty) in ds.fields {
            if !is_identifier(&field) || field.starts_with("_spoke") {
                report(ty.span().start, format!("dataset {name}: field name '{field}' must be an identifier not starting with _spoke"));
            }
            match ty.get_ref().parse::<FieldSpec>() {
                Ok(spec) => {
                    fields.insert(field, spec);
                }
                Err(e) => report(
                    ty.span().start,
                    format!("dataset {name}, field {field}: {e}"),
                ),
            }
        }
        let version = ds.schema_version.map_or(1, |v| *v.get_ref());
        let tombstone_horizon = match ds.tombstone_horizon {
            None => DEFAULT_TOMBSTONE_HORIZON,
            Some(h) => h.get_ref().parse().unwrap_or_else(|e| {
                report(
                    h.span().start,
                    format!("dataset {name}: tombstone_horizon: {e}"),
                );
                DEFAULT_TOMBSTONE_HORIZON
            }),
        };
        m.datasets.insert(
            name.clone(),
            Dataset {
                name,
                owner,
                key,
                schema: Schema::new(version, fields),
                tombstone_horizon,
                line: lines.of(at),
            },
        );
    }

    let mut seen = BTreeSet::new();
    for sub in raw.subscriptions {
        let at = sub.span().start;
        let line = lines.of(at);
        let sub = sub.into_inner();
        let required = |v: Option<Spanned<String>>,
                        what: &str,
                        report: &mut dyn FnMut(usize, String)| match v {
            Some(v) => Some((v.span().start, v.into_inner())),
            None => {
                report(at, format!("subscription has no {what}"));
                None
            }
        };
        let consumer = required(sub.consumer, "consumer", &mut report);
        let dataset = required(sub.dataset, "dataset", &mut report);
        if let Some((off, c)) = &consumer {
            if !m.services.contains_key(c) {
                report(*off, format!("subscription consumer '{c}' is not a declared service (add [services.{c}])"));
            }
        }
        let ds = dataset.as_ref().and_then(|(off, d)| {
            let found = m.datasets.get(d);
            if found.is_none() {
                report(
                    *off,
                    format!("subscription dataset '{d}' is not a declared dataset"),
                );
            }
            found
        });
        if let (Some((off, c)), Some(ds)) = (&consumer, ds) {
            if *c == ds.owner {
                report(*off, format!("service {c} subscribes to its own dataset {}; an owner reads its own data directly", ds.name));
            }
        }
        if let (Some((off, c)), Some((_, d))) = (&consumer, &dataset) {
            if !seen.insert((c.clone(), d.clone())) {
                report(*off, format!("{c} subscribes to {d} twice; keep one subscription per consumer and dataset"));
            }
        }
        let fields = match sub.fields {
            None => {
                report(
                    at,
                    "subscription has no fields (list the fields to copy)".to_owned(),
                );
                Vec::new()
            }
            Some(f) => {
                let off = f.span().start;
                let f = f.into_inner();
                if f.is_empty() {
                    report(off, "subscription fields must not be empty".to_owned());
                }
                let mut unique = BTreeSet::new();
                for name in &f {
                    if !unique.insert(name) {
                        report(off, format!("field '{name}' is listed twice"));
                    }
                    if let (Some(ds), Some((_, c))) = (ds, &consumer) {
                        if !ds.schema.fields.contains_key(name) {
                            report(off, format!("subscription {c}→{} projects field '{name}', which {} (schema v{}) does not have", ds.name, ds.name, ds.schema.version));
                        }
                    }
                }
                f
            }
        };
        let strategy = match sub.strategy {
            None => Strategy::Events,
            Some(s) => Strategy::parse(s.get_ref()).unwrap_or_else(|| {
                report(
                    s.span().start,
                    format!(
                        "unknown strategy '{}' (expected events, cdc, scheduled, ttl or none)",
                        s.get_ref()
                    ),
                );
                Strategy::Events
            }),
        };
        let staleness_budget = match sub.staleness_budget {
            // Not copying has no staleness: the owner answers every read.
            None if strategy == Strategy::None => Duration::default(),
            None => {
                report(
                    at,
                    "subscription has no staleness_budget (e.g. staleness_budget = \"5m\")"
                        .to_owned(),
                );
                Duration::default()
            }
            Some(b) => b.get_ref().parse().unwrap_or_else(|e| {
                report(b.span().start, format!("staleness_budget: {e}"));
                Duration::default()
            }),
        };
        m.subscriptions.push(Subscription {
            consumer: consumer.map(|c| c.1).unwrap_or_default(),
            dataset: dataset.map(|d| d.1).unwrap_or_default(),
            fields,
            strategy,
            staleness_budget,
            line,
        });
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &str = r#"
[services.customer-service]
availability = 0.999
[services.order-service]
availability = 0.999

[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string", preferred_name = "string?", payment_method_id = "string" }

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "email"]
strategy = "events"
staleness_budget = "1h"
"#;

    fn problems(src: &str) -> Vec<String> {
        Manifest::parse("m.toml", src)
            .unwrap_err()
            .to_string()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_design_sketch_is_valid() {
        let m = Manifest::parse("m.toml", SHOP).unwrap();
        assert_eq!(m.datasets["customers"].schema.fields.len(), 4);
        let s = &m.subscriptions[0];
        assert_eq!(s.staleness_budget.as_millis(), 3_600_000);
        assert_eq!(s.strategy, Strategy::Events);
        assert_eq!(s.line, 12);
    }

    #[test]
    fn unknown_projected_field_names_line_and_schema_version() {
        let src = SHOP.replace(r#"["name", "email"]"#, r#"["name", "nickname"]"#);
        assert_eq!(
            problems(&src),
            ["m.toml:15: subscription order-service→customers projects field 'nickname', which customers (schema v1) does not have"]
        );
    }

    #[test]
    fn collects_every_problem_with_its_line() {
        let src = r#"[services.a]
[datasets.things]
owner = "ghost"
key = "id"
fields = { x = "integer", y = "string" }

[[subscriptions]]
consumer = "a"
dataset = "nothing"
fields = ["x"]
strategy = "sometimes"
staleness_budget = "soon"
"#;
        assert_eq!(
            problems(src),
            [
                "m.toml:3: dataset things: owner 'ghost' is not a declared service (add [services.ghost])",
                "m.toml:5: dataset things, field x: unknown field type 'integer' (expected string, int, float, bool, timestamp or json, with '?' for optional)",
                "m.toml:9: subscription dataset 'nothing' is not a declared dataset",
                "m.toml:11: unknown strategy 'sometimes' (expected events, cdc, scheduled, ttl or none)",
                "m.toml:12: staleness_budget: invalid duration 'soon': a number must come before each unit (expected e.g. 250ms, 30s, 5m, 1h, 7d)",
            ]
        );
    }

    #[test]
    fn owner_may_not_subscribe_to_itself() {
        let src = SHOP.replace(
            r#"consumer = "order-service""#,
            r#"consumer = "customer-service""#,
        );
        assert_eq!(
            problems(&src),
            ["m.toml:13: service customer-service subscribes to its own dataset customers; an owner reads its own data directly"]
        );
    }

    #[test]
    fn toml_syntax_and_unknown_keys_have_lines() {
        let p = problems("[services.a]\navailability = \n");
        assert!(p[0].starts_with("m.toml:2: "), "{p:?}");
        let p = problems("[services.a]\ncolour = 1\n");
        assert!(
            p[0].starts_with("m.toml:2: unknown field `colour`"),
            "{p:?}"
        );
    }

    #[test]
    fn hostile_names_are_rejected() {
        let src = SHOP.replace("[datasets.customers]", "[datasets.\"x; DROP TABLE y\"]");
        let p = problems(&src);
        assert!(
            p.iter()
                .any(|l| l.contains("dataset name 'x; DROP TABLE y'")),
            "{p:?}"
        );
    }
}
