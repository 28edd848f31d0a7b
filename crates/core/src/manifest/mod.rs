//! The manifest: Spoke's record of who owns what, who copies what, how and
//! how stale it may be, and which request paths call which services.
//!
//! Loading has three stages, kept apart on purpose:
//! 1. the raw TOML with source spans (`raw`),
//! 2. the resolved [`Manifest`] the rest of Spoke uses, with the problems a
//!    single declaration can have on its own (`resolve`: names, types,
//!    references, durations),
//! 3. the governance rules that look across declarations (`rules`): one
//!    owner and no copy of a copy, no cycles, private fields and grants,
//!    strategies that can meet their budgets, must-be-current data, large
//!    fields.
//!
//! Every problem found on the way is collected, not just the first, and
//! carries the line it came from, its [`Rule`], a [`Severity`] and a fix
//! hint, so `spoke check` can print `file:line: problem (fix: hint)`.
//! Errors make a manifest invalid; warnings are reported and allowed.

mod owner_url;
mod problem;
mod raw;
mod resolve;
mod rules;
mod snapshot;
mod traits;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::duration::Duration;
use crate::schema::{FieldType, Schema};

pub use owner_url::{percent_encode, OwnerUrl, KEY_PLACEHOLDER};
pub use problem::{ManifestError, Problem, Rule, Severity};
pub use snapshot::{check_sql, OwnerSnapshot, SnapshotUrl};
pub use traits::{format_size, parse_size, Access, Changes, FieldTraits, Impact};

/// Default garbage-collection horizon for tombstones in copies.
pub const DEFAULT_TOMBSTONE_HORIZON: Duration = Duration::from_secs(7 * 86_400);
/// Longest dataset, field or service name; names become SQL identifiers.
pub const MAX_NAME_LEN: usize = 63;
/// The smallest staleness budget a copy that follows the feed (`events`,
/// `cdc`) can be expected to keep: publish, relay, hub and apply each take
/// time. Budgets below it are flagged; `[policy] budget_floor` overrides it.
pub const DEFAULT_BUDGET_FLOOR: Duration = Duration::from_secs(1);
/// Fields declared larger than this (bytes) warn when copied;
/// `[policy] large_field` overrides it.
pub const DEFAULT_LARGE_FIELD_BYTES: u64 = 4 * 1024;

/// Most entries a `ttl` cache keeps unless `max_entries` says otherwise.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// The largest `max_entries` accepted: a bound on the agent's memory.
pub const MAX_MAX_ENTRIES: usize = 10_000_000;
/// How long a `ttl` cache remembers that the owner has no such key (a 404),
/// unless `negative_ttl` says otherwise; never longer than the `ttl`.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);

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
    /// Whether the consumer keeps a stored copy (a table in its copy store):
    /// `events`, `cdc` and `scheduled`.
    pub fn stores_copy(self) -> bool {
        matches!(self, Strategy::Events | Strategy::Cdc | Strategy::Scheduled)
    }
    /// Whether the consumer keeps a copy at all (everything but `none`).
    pub fn copies(self) -> bool {
        self != Strategy::None
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    /// The fraction of time the service answers, e.g. 0.999; used by
    /// `spoke advise` for request-path availability.
    pub availability: Option<f64>,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub owner: String,
    /// Name of the key field in the owner's records.
    pub key: String,
    pub schema: Schema,
    pub tombstone_horizon: Duration,
    /// Fields that leave the owner only for services in [`Dataset::grants`].
    pub private: BTreeSet<String>,
    /// Service → the private fields it may receive.
    pub grants: BTreeMap<String, BTreeSet<String>>,
    /// Fields that must be current when read (a balance, stock): nobody may
    /// copy them, only call the owner (`strategy = "none"`).
    pub current: BTreeSet<String>,
    /// Declared sizes in bytes (the largest value expected).
    pub sizes: BTreeMap<String, u64>,
    /// Datasets whose data the owner puts into this one's records (lineage).
    pub derived_from: Vec<String>,
    pub line: usize,
}

impl Dataset {
    /// Whether `service` may receive `field` of this dataset: the owner and
    /// every service for public fields; only granted services for private ones.
    pub fn may_receive(&self, service: &str, field: &str) -> bool {
        !self.private.contains(field)
            || service == self.owner
            || self.grants.get(service).is_some_and(|g| g.contains(field))
    }

    /// How large values of `field` can get.
    pub fn size_of(&self, field: &str) -> FieldSize {
        if let Some(&bytes) = self.sizes.get(field) {
            return FieldSize::Declared(bytes);
        }
        match self.schema.fields.get(field) {
            Some(spec) if spec.ty == FieldType::Json => FieldSize::Unbounded,
            _ => FieldSize::Small,
        }
    }
}

/// A field's size as far as the manifest knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldSize {
    /// Not declared, and of a scalar type (string, int, …): assumed small.
    Small,
    /// Declared, in bytes.
    Declared(u64),
    /// A `json` field with no declared size.
    Unbounded,
}

impl FieldSize {
    /// Whether copying it deserves a warning under `policy`.
    pub fn is_large(self, policy: &Policy) -> bool {
        match self {
            FieldSize::Small => false,
            FieldSize::Declared(b) => b > policy.large_field_bytes,
            FieldSize::Unbounded => true,
        }
    }
}

impl std::fmt::Display for FieldSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldSize::Small => f.write_str("small"),
            FieldSize::Declared(b) => f.write_str(&format_size(*b)),
            FieldSize::Unbounded => f.write_str("unbounded"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub consumer: String,
    pub dataset: String,
    pub fields: Vec<String>,
    pub strategy: Strategy,
    pub staleness_budget: Duration,
    /// The service whose feed the consumer reads; `None` means the owner,
    /// the only valid source.
    pub source: Option<String>,
    /// How often a `scheduled` subscription snapshots.
    pub interval: Option<Duration>,
    /// Where a `scheduled` subscription reads the owner's snapshot.
    pub snapshot: Option<OwnerSnapshot>,
    /// How often the agent reconciles an `events`/`cdc` copy against its
    /// feed in the background; `None`: only on demand (`spoke reconcile`).
    pub reconcile_every: Option<Duration>,
    /// How long a `ttl` subscription keeps an entry.
    pub ttl: Option<Duration>,
    /// The owner's read endpoint: where a `ttl` subscription reads through,
    /// and where bounded-staleness reads of a copy fall back to.
    pub owner_url: Option<OwnerUrl>,
    /// The cache of a `ttl` subscription, defaults filled in; `None` for
    /// every other strategy.
    pub cache: Option<CacheSettings>,
    /// Declared decision traits, per projected field.
    pub traits: BTreeMap<String, FieldTraits>,
    pub line: usize,
}

/// How a `ttl` subscription's read-through cache behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// An entry is served from the cache for this long after it was read.
    pub ttl: Duration,
    /// A "no such key" answer (404) is remembered this long; `0s` = never.
    pub negative_ttl: Duration,
    /// When the owner fails, an expired entry may still be served (flagged
    /// stale) while it is at most `ttl + stale_if_error` old (a remembered
    /// 404: `negative_ttl + stale_if_error`); `None` = never.
    pub stale_if_error: Option<Duration>,
    /// Most entries kept; the least recently used go first.
    pub max_entries: usize,
}

/// A request path: a request served by `service` that calls `calls`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestPath {
    pub name: String,
    /// The service that serves the request.
    pub service: String,
    /// The services it calls (today, synchronously) to serve it.
    pub calls: Vec<String>,
    pub line: usize,
}

/// Manifest-wide settings (`[policy]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Smallest budget an `events`/`cdc` copy is expected to keep.
    pub budget_floor: Duration,
    /// Copied fields declared larger than this warn.
    pub large_field_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            budget_floor: DEFAULT_BUDGET_FLOOR,
            large_field_bytes: DEFAULT_LARGE_FIELD_BYTES,
        }
    }
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Manifest {
    pub services: BTreeMap<String, Service>,
    pub datasets: BTreeMap<String, Dataset>,
    pub subscriptions: Vec<Subscription>,
    pub paths: BTreeMap<String, RequestPath>,
    pub policy: Policy,
}

/// Everything `spoke check` learns about one manifest file.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub file: String,
    /// The manifest, when every declaration resolved on its own (names,
    /// types, references). It may still break governance rules: look at
    /// [`Report::is_valid`] before using it for anything but advice.
    pub manifest: Option<Manifest>,
    /// Errors and warnings, by line.
    pub problems: Vec<Problem>,
}

impl Report {
    /// No errors (warnings allowed).
    pub fn is_valid(&self) -> bool {
        self.manifest.is_some() && !self.problems.iter().any(Problem::is_error)
    }
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| p.is_error())
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| !p.is_error())
    }
    /// The manifest when valid; otherwise every problem.
    pub fn into_result(self) -> Result<Manifest, ManifestError> {
        match self.manifest {
            Some(m) if !self.problems.iter().any(Problem::is_error) => Ok(m),
            _ => Err(ManifestError {
                file: self.file,
                problems: self.problems,
            }),
        }
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
        Self::check_file(path).into_result()
    }

    /// Validates manifest text; `file` is only used in messages.
    pub fn parse(file: &str, src: &str) -> Result<Self, ManifestError> {
        Self::check(file, src).into_result()
    }

    /// Reads a manifest file and runs every check, keeping warnings.
    pub fn check_file(path: &Path) -> Report {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(src) => Self::check(&file, &src),
            Err(e) => Report {
                file,
                manifest: None,
                problems: vec![Problem::error(
                    0,
                    Rule::Read,
                    format!("cannot read manifest: {e}"),
                    "check the path and the file's permissions",
                )],
            },
        }
    }

    /// Runs every check on manifest text, keeping warnings.
    pub fn check(file: &str, src: &str) -> Report {
        let lines = raw::Lines::new(src);
        let raw: raw::RawManifest = match toml::from_str(src) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map_or(0, |s| lines.of(s.start));
                let message = e.message().trim().replace('\n', " ");
                let hint = if message.starts_with("unknown field") {
                    "remove the key or correct its spelling"
                } else if message.starts_with("invalid type") {
                    "write a value of the expected type"
                } else {
                    "correct the TOML syntax on this line"
                };
                return Report {
                    file: file.to_owned(),
                    manifest: None,
                    problems: vec![Problem::error(line, Rule::Syntax, message, hint)],
                };
            }
        };
        let mut problems = Vec::new();
        let (manifest, spans) = resolve::resolve(raw, &lines, &mut problems);
        let resolved = !problems.iter().any(Problem::is_error);
        rules::check(&manifest, &spans, &mut problems);
        // Stable: problems on one line keep the order they were found in.
        problems.sort_by_key(|p| (p.line, p.severity));
        Report {
            file: file.to_owned(),
            manifest: resolved.then_some(manifest),
            problems,
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

    /// The subscription of `consumer` to `dataset`, if any.
    pub fn subscription(&self, consumer: &str, dataset: &str) -> Option<&Subscription> {
        self.subscriptions
            .iter()
            .find(|s| s.consumer == consumer && s.dataset == dataset)
    }
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

    /// `line: message` of every problem (errors and warnings).
    fn problems(src: &str) -> Vec<String> {
        Manifest::check("m.toml", src)
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.line, p.message))
            .collect()
    }

    /// (line, severity, rule) of every problem.
    fn rules(src: &str) -> Vec<(usize, Severity, Rule)> {
        Manifest::check("m.toml", src)
            .problems
            .iter()
            .map(|p| (p.line, p.severity, p.rule))
            .collect()
    }

    /// SHOP plus more declarations.
    fn shop_with(extra: &str) -> String {
        format!("{SHOP}{extra}")
    }

    #[test]
    fn the_design_sketch_is_valid() {
        let m = Manifest::parse("m.toml", SHOP).unwrap();
        assert_eq!(m.datasets["customers"].schema.fields.len(), 4);
        let s = &m.subscriptions[0];
        assert_eq!(s.staleness_budget.as_millis(), 3_600_000);
        assert_eq!(s.strategy, Strategy::Events);
        assert_eq!(s.line, 12);
        assert_eq!(m.policy, Policy::default());
        assert!(Manifest::check("m.toml", SHOP).problems.is_empty());
    }

    #[test]
    fn the_shop_example_is_valid_without_warnings() {
        let src = include_str!("../../../../examples/shop/manifest.toml");
        let r = Manifest::check("shop.toml", src);
        assert_eq!(r.problems, [], "{:?}", r.problems);
        let m = r.manifest.unwrap();
        assert!(m.datasets["customers"]
            .private
            .contains("payment_method_id"));
        assert!(m.datasets["customers"].may_receive("payment-service", "payment_method_id"));
        assert!(!m.datasets["customers"].may_receive("order-service", "payment_method_id"));
        assert!(m.datasets["customers"].may_receive("order-service", "name"));
        assert_eq!(m.paths["checkout"].calls.len(), 4);
    }

    #[test]
    fn problems_render_with_a_fix_hint_and_warnings_say_so() {
        let p = Problem::error(3, Rule::Owner, "dataset x has no owner", "add owner");
        assert_eq!(
            p.render("m.toml"),
            "m.toml:3: dataset x has no owner (fix: add owner)"
        );
        let w = Problem::warning(4, Rule::LargeField, "big", "smaller");
        assert_eq!(w.render("m.toml"), "m.toml:4: warning: big (fix: smaller)");
        let e = ManifestError {
            file: "m.toml".into(),
            problems: vec![p, w],
        };
        assert_eq!(
            e.to_string(),
            "m.toml:3: dataset x has no owner (fix: add owner)\nm.toml:4: warning: big (fix: smaller)"
        );
    }

    #[test]
    fn unknown_projected_field_names_line_and_schema_version() {
        let src = SHOP.replace(r#"["name", "email"]"#, r#"["name", "nickname"]"#);
        assert_eq!(
            problems(&src),
            ["15: subscription order-service→customers projects field 'nickname', which customers (schema v1) does not have"]
        );
        let e = Manifest::parse("m.toml", &src).unwrap_err();
        assert!(e.to_string().ends_with("(fix: remove 'nickname', or project fields customers has: email, name, payment_method_id and preferred_name)"), "{e}");
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
                "3: dataset things: owner 'ghost' is not a declared service",
                "5: dataset things, field x: unknown field type 'integer' (expected string, int, float, bool, timestamp or json, with '?' for optional)",
                "9: subscription dataset 'nothing' is not a declared dataset",
                "11: unknown strategy 'sometimes' (expected events, cdc, scheduled, ttl or none)",
                "12: staleness_budget: invalid duration 'soon': a number must come before each unit (expected e.g. 250ms, 30s, 5m, 1h, 7d)",
            ]
        );
        let r = Manifest::check("m.toml", src);
        assert!(r.manifest.is_none() && !r.is_valid());
        assert!(
            r.problems.iter().all(|p| !p.hint.is_empty()),
            "every problem has a hint"
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
            ["13: service customer-service subscribes to its own dataset customers; an owner reads its own data directly"]
        );
    }

    #[test]
    fn a_dataset_has_exactly_one_owner() {
        let src = SHOP.replace(
            r#"owner = "customer-service""#,
            r#"owner = ["customer-service", "order-service"]"#,
        );
        assert_eq!(
            problems(&src),
            ["8: dataset customers names 2 owners (customer-service and order-service); a dataset has exactly one owner"]
        );
    }

    #[test]
    fn toml_syntax_and_unknown_keys_have_lines() {
        let p = problems("[services.a]\navailability = \n");
        assert!(p[0].starts_with("2: "), "{p:?}");
        let p = problems("[services.a]\ncolour = 1\n");
        assert!(p[0].starts_with("2: unknown field `colour`"), "{p:?}");
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

    const MIDDLEMAN: &str = r#"
[services.shipping-service]
[[subscriptions]]
consumer = "shipping-service"
dataset = "customers"
fields = ["name"]
staleness_budget = "1h"
source = "order-service"
"#;

    #[test]
    fn a_subscription_to_a_copy_is_rejected_naming_the_chain() {
        assert_eq!(
            problems(&shop_with(MIDDLEMAN)),
            ["25: subscription shipping-service→customers reads order-service's copy of customers, a copy of a copy: customer-service → order-service → shipping-service"]
        );
        assert_eq!(rules(&shop_with(MIDDLEMAN))[0].2, Rule::CopyOfCopy);
        // Naming the owner as source is fine.
        let ok = MIDDLEMAN.replace(
            r#"source = "order-service""#,
            r#"source = "customer-service""#,
        );
        assert_eq!(problems(&shop_with(&ok)), Vec::<String>::new());
        // A source that keeps no copy.
        let none = SHOP.replace(r#"strategy = "events""#, r#"strategy = "none""#);
        assert_eq!(
            problems(&format!("{none}{MIDDLEMAN}")),
            ["25: subscription shipping-service→customers reads from order-service, which keeps no copy of customers (it calls customer-service)"]
        );
    }

    #[test]
    fn longer_chains_are_named_hop_by_hop() {
        let third = r#"
[services.billing-service]
[[subscriptions]]
consumer = "billing-service"
dataset = "customers"
fields = ["name"]
staleness_budget = "1h"
source = "shipping-service"
"#;
        let src = format!("{SHOP}{MIDDLEMAN}{third}");
        let p = problems(&src);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(
            p[1],
            "33: subscription billing-service→customers reads shipping-service's copy of customers, a copy of a copy: customer-service → order-service → shipping-service → billing-service"
        );
        // A chain that ends at a service keeping no copy.
        let broken = src.replace(
            "consumer = \"order-service\"\ndataset = \"customers\"\nfields = [\"name\", \"email\"]\nstrategy = \"events\"",
            "consumer = \"order-service\"\ndataset = \"customers\"\nfields = [\"name\", \"email\"]\nstrategy = \"none\"",
        );
        assert_eq!(
            problems(&broken)[1],
            "33: subscription billing-service→customers reads shipping-service's copy of customers, a copy of a copy: billing-service reads from shipping-service, which reads from order-service, which keeps no copy"
        );
    }

    #[test]
    fn source_chains_that_loop_are_cycles() {
        let src = shop_with(
            r#"
[services.a]
[services.b]
[[subscriptions]]
consumer = "a"
dataset = "customers"
fields = ["name"]
staleness_budget = "1h"
source = "b"
[[subscriptions]]
consumer = "b"
dataset = "customers"
fields = ["name"]
staleness_budget = "1h"
source = "a"
"#,
        );
        assert_eq!(
            problems(&src),
            [
                "26: subscription a→customers reads from b, and the chain loops without reaching the owner of customers (customer-service): a reads from b, which reads from a",
                "32: subscription b→customers reads from a, and the chain loops without reaching the owner of customers (customer-service): b reads from a, which reads from b",
            ]
        );
        assert!(rules(&src).iter().all(|r| r.2 == Rule::Cycle));
    }

    const DIRECTORY: &str = r#"
[services.shipping-service]
[datasets.customer_directory]
owner = "order-service"
key = "id"
fields = { name = "string" }
derived_from = ["customers"]
[[subscriptions]]
consumer = "shipping-service"
dataset = "customer_directory"
fields = ["name"]
staleness_budget = "1h"
"#;

    #[test]
    fn republishing_a_copy_is_rejected_at_the_dataset_and_its_subscribers() {
        assert_eq!(
            problems(&shop_with(DIRECTORY)),
            [
                "24: dataset customer_directory (owner order-service) re-publishes order-service's copy of customers, owned by customer-service; a copy is never a source: customer-service → order-service → customer_directory",
                "27: subscription shipping-service→customer_directory reads a copy of a copy, because customer_directory re-publishes order-service's copy of customers: customer-service → order-service → shipping-service",
            ]
        );
        // Deriving from snapshots taken by calling the owner is fine.
        let snap = SHOP.replace(r#"strategy = "events""#, r#"strategy = "none""#);
        assert_eq!(
            problems(&format!("{snap}{DIRECTORY}")),
            Vec::<String>::new()
        );
        // Deriving from data the owner never reads is not.
        let src = shop_with(&DIRECTORY.replace("[\"customers\"]", "[\"customers\", \"ghosts\"]"));
        assert!(problems(&src).contains(&"24: dataset customer_directory: derived_from names 'ghosts', which is not a declared dataset".to_owned()));
    }

    #[test]
    fn datasets_deriving_from_themselves_are_cycles() {
        let src = shop_with(
            r#"
[datasets.a]
owner = "order-service"
key = "id"
fields = { x = "string" }
derived_from = ["b"]
[datasets.b]
owner = "order-service"
key = "id"
fields = { x = "string" }
derived_from = ["a"]
"#,
        );
        assert_eq!(
            problems(&src),
            ["23: datasets derive from themselves in a cycle: a derives from b, which derives from a; a change would echo around it"]
        );
    }

    #[test]
    fn private_fields_need_a_grant() {
        let private = SHOP.replace(
            "payment_method_id = \"string\" }",
            "payment_method_id = \"string\" }\nprivate = [\"payment_method_id\"]\ngrants = { \"customer-service\" = [] }",
        );
        let src = private.replace(r#"["name", "email"]"#, r#"["name", "payment_method_id"]"#);
        assert_eq!(
            problems(&src),
            ["17: subscription order-service→customers projects private field 'payment_method_id', which customer-service grants to no one"]
        );
        let granted = src.replace(
            r#"grants = { "customer-service" = [] }"#,
            r#"grants = { "order-service" = ["payment_method_id"] }"#,
        );
        assert_eq!(problems(&granted), Vec::<String>::new());
        let wrong = src.replace(
            r#"grants = { "customer-service" = [] }"#,
            r#"grants = { "ghost-service" = ["payment_method_id", "name"] }"#,
        );
        assert_eq!(
            rules(&wrong),
            [
                (12, Severity::Error, Rule::Grant),
                (12, Severity::Warning, Rule::Grant),
                (17, Severity::Error, Rule::PrivateField),
            ]
        );
    }

    #[test]
    fn strategies_must_meet_their_budget() {
        let sched = SHOP.replace(
            "strategy = \"events\"\nstaleness_budget = \"1h\"",
            "strategy = \"scheduled\"\nstaleness_budget = \"1m\"\ninterval = \"1h\"\nsnapshot_url = \"http://o/v1/customers\"",
        );
        assert_eq!(
            problems(&sched),
            ["18: subscription order-service→customers: a scheduled snapshot every 1h cannot meet the staleness budget 1m (just before a run the copy is up to 1h old)"]
        );
        let ttl = SHOP.replace(
            "strategy = \"events\"\nstaleness_budget = \"1h\"",
            "strategy = \"ttl\"\nstaleness_budget = \"5m\"\nttl = \"10m\"\nowner_url = \"http://o/{key}\"",
        );
        assert_eq!(
            problems(&ttl),
            ["18: subscription order-service→customers: a cache entry kept for ttl 10m cannot meet the staleness budget 5m (it is served up to 10m after it was read)"]
        );
        let fast = SHOP.replace("\"1h\"", "\"200ms\"");
        assert_eq!(rules(&fast), [(17, Severity::Warning, Rule::Budget)]);
        assert!(
            Manifest::parse("m.toml", &fast).is_ok(),
            "warnings alone keep it valid"
        );
        let floor = format!("[policy]\nbudget_floor = \"100ms\"\n{fast}");
        assert_eq!(problems(&floor), Vec::<String>::new());
        let misplaced = SHOP.replace(
            "staleness_budget = \"1h\"",
            "staleness_budget = \"1h\"\ninterval = \"5m\"",
        );
        assert_eq!(
            problems(&misplaced),
            ["18: subscription order-service→customers: interval applies only to strategy = \"scheduled\" (this one is events)"]
        );
        let missing = SHOP.replace("\"events\"", "\"scheduled\"");
        assert_eq!(
            problems(&missing),
            [
                "12: subscription order-service→customers: strategy scheduled needs interval",
                "12: subscription order-service→customers: strategy scheduled needs snapshot_url or snapshot_sql, where the agent reads the owner's snapshot",
            ]
        );
    }

    /// SHOP with `strategy = "scheduled"` every 5m under a 1h budget, plus
    /// `extra` lines (from line 19 on).
    fn scheduled_with(extra: &str) -> String {
        SHOP.replace(
            "strategy = \"events\"\nstaleness_budget = \"1h\"",
            &format!(
                "strategy = \"scheduled\"\nstaleness_budget = \"1h\"\ninterval = \"5m\"\n{extra}"
            ),
        )
    }

    #[test]
    fn scheduled_subscriptions_name_exactly_one_snapshot_source() {
        let url = Manifest::parse(
            "m.toml",
            &scheduled_with(
                "snapshot_url = \"http://customer-service:8080/v1/customers?tenant=a\"",
            ),
        )
        .unwrap();
        assert_eq!(
            url.subscriptions[0].snapshot,
            Some(OwnerSnapshot::Url(
                SnapshotUrl::parse("http://customer-service:8080/v1/customers?tenant=a").unwrap()
            ))
        );
        let sql = Manifest::parse(
            "m.toml",
            &scheduled_with(
                "snapshot_sql = \"SELECT id AS key, version, name, email FROM customers\"",
            ),
        )
        .unwrap();
        assert_eq!(
            sql.subscriptions[0].snapshot,
            Some(OwnerSnapshot::Sql(
                "SELECT id AS key, version, name, email FROM customers".into()
            ))
        );
        let cases: &[(&str, &str)] = &[
            ("", "12: subscription order-service→customers: strategy scheduled needs snapshot_url or snapshot_sql, where the agent reads the owner's snapshot"),
            ("snapshot_url = \"http://o/c\"\nsnapshot_sql = \"SELECT 1\"", "20: subscription order-service→customers: give snapshot_url or snapshot_sql, not both"),
            ("snapshot_url = \"ftp://o/c\"", "19: subscription order-service→customers: snapshot_url 'ftp://o/c' must start with http:// or https://"),
            ("snapshot_url = \"http://o/c/{key}\"", "19: subscription order-service→customers: snapshot_url 'http://o/c/{key}' has a placeholder"),
            ("snapshot_sql = \"  \"", "19: subscription order-service→customers: snapshot_sql is empty"),
            ("snapshot_sql = \"SELECT 1; DROP TABLE t\"", "19: subscription order-service→customers: snapshot_sql must be a single SELECT without ';'"),
        ];
        for (extra, want) in cases {
            let got = problems(&scheduled_with(extra));
            assert_eq!(got.len(), 1, "{extra}: {got:?}");
            assert!(got[0].starts_with(want), "{extra}: {got:?}");
        }
        // On another strategy, both keys are misplaced.
        let events = SHOP.replace(
            "staleness_budget = \"1h\"",
            "staleness_budget = \"1h\"\nsnapshot_url = \"http://o/c\"",
        );
        assert_eq!(
            problems(&events),
            ["18: subscription order-service→customers: snapshot_url applies only to strategy = \"scheduled\" (this one is events)"]
        );
        let report = Manifest::check("m.toml", &events);
        assert!(!report.is_valid());
    }

    #[test]
    fn reconcile_every_is_for_copies_that_follow_the_feed() {
        let every = |strategy_lines: &str, value: &str| {
            SHOP.replace(
                "strategy = \"events\"\nstaleness_budget = \"1h\"",
                &format!("{strategy_lines}\nreconcile_every = \"{value}\""),
            )
        };
        let ok = Manifest::parse(
            "m.toml",
            &every("strategy = \"cdc\"\nstaleness_budget = \"1h\"", "1h30m"),
        )
        .unwrap();
        assert_eq!(
            ok.subscriptions[0].reconcile_every,
            Some(Duration::from_secs(5400))
        );
        let events = Manifest::parse(
            "m.toml",
            &every("strategy = \"events\"\nstaleness_budget = \"1h\"", "10m"),
        )
        .unwrap();
        assert_eq!(
            events.subscriptions[0].reconcile_every,
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            Manifest::parse("m.toml", SHOP).unwrap().subscriptions[0].reconcile_every,
            None
        );
        let cases: &[(String, &str)] = &[
            (
                every("strategy = \"events\"\nstaleness_budget = \"1h\"", "0s"),
                "18: subscription order-service→customers: reconcile_every must be longer than 0s",
            ),
            (
                every("strategy = \"events\"\nstaleness_budget = \"1h\"", "hourly"),
                "18: subscription order-service→customers: reconcile_every: ",
            ),
            (
                every("strategy = \"ttl\"\nstaleness_budget = \"1h\"\nttl = \"1m\"\nowner_url = \"http://o/{key}\"", "1h"),
                "20: subscription order-service→customers: reconcile_every applies only to strategy = \"events\" or \"cdc\" (this one is ttl: a ttl cache keeps no copy to reconcile)",
            ),
            (
                every("strategy = \"none\"", "1h"),
                "17: subscription order-service→customers: reconcile_every applies only to strategy = \"events\" or \"cdc\" (this one is none: nothing is copied)",
            ),
            (
                every("strategy = \"scheduled\"\nstaleness_budget = \"1h\"\ninterval = \"5m\"\nsnapshot_url = \"http://o/c\"", "1h"),
                "20: subscription order-service→customers: reconcile_every applies only to strategy = \"events\" or \"cdc\" (this one is scheduled",
            ),
        ];
        for (src, want) in cases {
            let got = problems(src);
            assert_eq!(got.len(), 1, "{src}: {got:?}");
            assert!(got[0].starts_with(want), "{got:?}");
        }
    }

    /// SHOP with its subscription turned into `ttl = "1m"` under a 5m
    /// budget, plus `extra` lines (from line 19 on).
    fn ttl_with(extra: &str) -> String {
        SHOP.replace(
            "strategy = \"events\"\nstaleness_budget = \"1h\"",
            &format!("strategy = \"ttl\"\nstaleness_budget = \"5m\"\nttl = \"1m\"\n{extra}"),
        )
    }

    const OWNER_URL: &str = "owner_url = \"http://127.0.0.1:8081/v1/customers/{key}\"";

    #[test]
    fn a_ttl_subscription_resolves_its_owner_url_and_cache_defaults() {
        let m = Manifest::parse("m.toml", &ttl_with(OWNER_URL)).unwrap();
        let s = &m.subscriptions[0];
        assert_eq!(
            s.owner_url.as_ref().map(|u| u.url_for("c 1")).as_deref(),
            Some("http://127.0.0.1:8081/v1/customers/c%201")
        );
        assert_eq!(
            s.cache,
            Some(CacheSettings {
                ttl: Duration::from_secs(60),
                negative_ttl: DEFAULT_NEGATIVE_TTL,
                stale_if_error: None,
                max_entries: DEFAULT_MAX_ENTRIES,
            })
        );
        let explicit = ttl_with(&format!(
            "{OWNER_URL}\nmax_entries = 5\nnegative_ttl = \"10s\"\nstale_if_error = \"2m\""
        ));
        let m = Manifest::parse("m.toml", &explicit).unwrap();
        assert_eq!(
            m.subscriptions[0].cache,
            Some(CacheSettings {
                ttl: Duration::from_secs(60),
                negative_ttl: Duration::from_secs(10),
                stale_if_error: Some(Duration::from_secs(120)),
                max_entries: 5,
            })
        );
        // The default negative ttl never outlives a shorter ttl.
        let short = ttl_with(OWNER_URL).replace("ttl = \"1m\"", "ttl = \"10s\"");
        let m = Manifest::parse("m.toml", &short).unwrap();
        assert_eq!(
            m.subscriptions[0].cache.map(|c| c.negative_ttl),
            Some(Duration::from_secs(10))
        );
        // A copy that follows the feed may name its owner's endpoint as the
        // fallback of bounded-staleness reads; it gets no cache.
        let events = SHOP.replace(
            "staleness_budget = \"1h\"",
            &format!("staleness_budget = \"1h\"\n{OWNER_URL}"),
        );
        let m = Manifest::parse("m.toml", &events).unwrap();
        assert!(m.subscriptions[0].owner_url.is_some());
        assert_eq!(m.subscriptions[0].cache, None);
    }

    #[test]
    fn malformed_ttl_settings_name_the_line_and_the_problem() {
        let who = "subscription order-service→customers";
        assert_eq!(
            problems(&ttl_with("")),
            [format!("12: {who}: strategy ttl needs owner_url, the owner's read endpoint the cache reads through on a miss")]
        );
        let cases: &[(&str, &str)] = &[
            (
                "owner_url = \"http://h/v1/customers\"",
                "19: S: owner_url 'http://h/v1/customers' has no {key} placeholder for the record's key",
            ),
            (
                "owner_url = \"http://h/{key}/{key}\"",
                "19: S: owner_url 'http://h/{key}/{key}' has 2 {key} placeholders; exactly one is replaced by the key",
            ),
            (
                "owner_url = \"ftp://h/{key}\"",
                "19: S: owner_url 'ftp://h/{key}' must start with http:// or https://",
            ),
            (
                "owner_url = \"http://h/{id}\"",
                "19: S: owner_url 'http://h/{id}' has no {key} placeholder for the record's key",
            ),
            (
                "owner_url = \"http://o/{key}\"\nnegative_ttl = \"2m\"",
                "20: S: negative_ttl 2m is longer than ttl 1m: a missing key would be remembered longer than a present one",
            ),
            (
                "owner_url = \"http://o/{key}\"\nnegative_ttl = \"soon\"",
                "20: S: negative_ttl: invalid duration 'soon': a number must come before each unit (expected e.g. 250ms, 30s, 5m, 1h, 7d)",
            ),
            (
                "owner_url = \"http://o/{key}\"\nstale_if_error = \"5parsecs\"",
                "20: S: stale_if_error: invalid duration '5parsecs': unknown unit (expected e.g. 250ms, 30s, 5m, 1h, 7d)",
            ),
            (
                "owner_url = \"http://o/{key}\"\nmax_entries = 0",
                "20: S: max_entries must be between 1 and 10000000, got 0",
            ),
            (
                "owner_url = \"http://o/{key}\"\nmax_entries = -3",
                "20: S: max_entries must be between 1 and 10000000, got -3",
            ),
            (
                "owner_url = \"http://o/{key}\"\nstale_if_error = \"10m\"",
                "20: S: while the owner fails, entries are served up to ttl 1m + stale_if_error 10m = 11m old, over the staleness budget 5m (such reads are flagged stale)",
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(
                problems(&ttl_with(extra)),
                [want.replace("S:", &format!("{who}:"))],
                "{extra}"
            );
        }
        let bad_type = ttl_with("owner_url = \"http://o/{key}\"\nmax_entries = \"many\"");
        assert_eq!(rules(&bad_type), [(20, Severity::Error, Rule::Syntax)]);
        // Cache keys belong to ttl; owner_url to strategies that keep a copy.
        let on_events = SHOP.replace(
            "staleness_budget = \"1h\"",
            "staleness_budget = \"1h\"\nnegative_ttl = \"1s\"\nmax_entries = 3",
        );
        assert_eq!(
            problems(&on_events),
            [
                format!("18: {who}: negative_ttl applies only to strategy = \"ttl\" (this one is events)"),
                format!("19: {who}: max_entries applies only to strategy = \"ttl\" (this one is events)"),
            ]
        );
        let on_none = SHOP.replace(
            "strategy = \"events\"\nstaleness_budget = \"1h\"",
            &format!("strategy = \"none\"\n{OWNER_URL}"),
        );
        assert_eq!(
            problems(&on_none),
            [format!("17: {who}: owner_url does not apply to strategy = \"none\": nothing is copied, so there is nothing to read through or fall back from")]
        );
    }

    #[test]
    fn must_be_current_fields_are_never_copied() {
        let src = SHOP.replace(
            "payment_method_id = \"string\" }",
            "payment_method_id = \"string\" }\ncurrent = [\"email\"]",
        );
        assert_eq!(
            problems(&src),
            ["16: subscription order-service→customers copies 'email' with strategy events, but customer-service marks 'email' must-be-current"]
        );
        let called = src.replace(r#"strategy = "events""#, r#"strategy = "none""#);
        assert_eq!(problems(&called), Vec::<String>::new());
    }

    #[test]
    fn large_fields_warn_when_copied() {
        let src = SHOP.replace(
            "payment_method_id = \"string\" }",
            "payment_method_id = \"string\", bio = \"string\", prefs = \"json\" }\nsizes = { bio = \"64KiB\" }",
        )
        .replace(r#"["name", "email"]"#, r#"["name", "bio", "prefs"]"#);
        assert_eq!(
            problems(&src),
            [
                "16: subscription order-service→customers copies 'bio', declared 64KiB, over the 4KiB bound for copied fields; large fields slow every apply, bootstrap and reconciliation",
                "16: subscription order-service→customers copies 'prefs', a json field with no declared size: its size is unbounded",
            ]
        );
        assert!(rules(&src).iter().all(|r| r.1 == Severity::Warning));
        let bounded = src.replace("{ bio = \"64KiB\" }", "{ bio = \"1KiB\", prefs = 512 }");
        assert_eq!(problems(&bounded), Vec::<String>::new());
        let raised = format!(
            "[policy]\nlarge_field = \"1MiB\"\n{}",
            src.replace(", \"prefs\"]", "]")
        );
        assert_eq!(problems(&raised), Vec::<String>::new());
    }

    #[test]
    fn traits_and_paths_are_checked() {
        let src = shop_with(
            r#"[subscriptions.traits]
name = { changes = "hourly", tolerance = "1d" }
phone = { critical = true }

[paths.checkout]
service = "order-service"
calls = ["customer-service", "payment-service", "customer-service"]
"#,
        );
        assert_eq!(
            problems(&src),
            [
                "19: subscription order-service→customers, traits of name: unknown changes 'hourly' (expected never, rarely, often or constantly)",
                "20: subscription order-service→customers declares traits for 'phone', which it does not project",
                "24: path checkout calls 'payment-service', which is not a declared service",
                "24: path checkout calls customer-service twice",
            ]
        );
        let m = Manifest::parse(
            "m.toml",
            &shop_with("[subscriptions.traits]\nname = { changes = \"often\", access = \"every-request\" }\n"),
        )
        .unwrap();
        let t = m.subscriptions[0].traits["name"];
        assert_eq!(t.changes, Some(Changes::Often));
        assert_eq!(t.access, Some(Access::EveryRequest));
        assert_eq!(t.impact, None);
        let no_availability =
            shop_with("[services.x]\n[paths.p]\nservice = \"order-service\"\ncalls = [\"x\"]\n");
        assert_eq!(
            problems(&no_availability),
            ["21: path p involves x, which declares no availability"]
        );
    }

    mod never_panics {
        use super::super::*;
        use proptest::prelude::*;

        const SHOP: &str = include_str!("../../../../examples/shop/manifest.toml");

        /// Lines of a manifest that exercise every rule, to splice in.
        const PIECES: &[&str] = &[
            "source = \"order-service\"",
            "source = \"catalog-service\"",
            "derived_from = [\"customers\", \"products\", \"stock\"]",
            "derived_from = [\"products\"]",
            "strategy = \"scheduled\"",
            "strategy = \"ttl\"",
            "strategy = \"events\"",
            "interval = \"2h\"",
            "snapshot_url = \"http://o/v1/x\"",
            "snapshot_sql = \"SELECT 1;\"",
            "reconcile_every = \"0s\"",
            "ttl = \"0s\"",
            "owner_url = \"http://o/{key}\"",
            "owner_url = \"http://{key}/{key}\"",
            "negative_ttl = \"1h\"\nstale_if_error = \"1d\"\nmax_entries = 0",
            "staleness_budget = \"1ms\"",
            "private = [\"name\", \"ghost\"]",
            "grants = { \"order-service\" = [\"name\"], \"x\" = [] }",
            "current = [\"name\"]",
            "sizes = { name = \"1GiB\", status = -1 }",
            "[[subscriptions]]\nconsumer = \"catalog-service\"\ndataset = \"customers\"\nfields = [\"name\"]\nstaleness_budget = \"1h\"\nsource = \"order-service\"",
            "[datasets.loop]\nowner = \"order-service\"\nkey = \"id\"\nfields = { x = \"json\" }\nderived_from = [\"loop\", \"customers\"]",
            "[paths.p]\nservice = \"ghost\"\ncalls = []",
            "[subscriptions.traits]\nname = { changes = \"x\", tolerance = \"0s\" }",
            "[policy]\nbudget_floor = \"1d\"\nlarge_field = 0",
        ];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Splicing rule-breaking lines anywhere into the shop manifest
            /// never panics, and a report with a manifest can be advised on.
            #[test]
            fn spliced_manifests_never_panic(cuts in proptest::collection::vec((0usize..4000, 0usize..PIECES.len()), 0..6)) {
                let mut lines: Vec<&str> = SHOP.lines().collect();
                for (at, piece) in cuts {
                    let at = at % (lines.len() + 1);
                    lines.insert(at, PIECES[piece]);
                }
                let src = lines.join("\n");
                let report = Manifest::check("m.toml", &src);
                for p in &report.problems {
                    prop_assert!(!p.hint.is_empty(), "{:?}", p);
                    prop_assert!(p.line <= src.lines().count() + 1);
                }
                if let Some(m) = &report.manifest {
                    let _ = crate::advise::advise(m);
                }
            }

            #[test]
            fn arbitrary_text_never_panics(src in "\\PC{0,400}") {
                let _ = Manifest::check("m.toml", &src);
            }
        }
    }
}
