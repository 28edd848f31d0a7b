//! Raw TOML → [`Manifest`], with the problems each declaration can have on
//! its own: names, types, durations and references to other declarations.
//! Cross-cutting governance rules are in `rules`.

use std::collections::{BTreeMap, BTreeSet};

use toml::Spanned;

use super::problem::{Problem, Rule};
use super::raw::{Lines, RawManifest, RawTraits};
use super::traits::{parse_size, Access, Changes, FieldTraits, Impact};
use super::{
    check_sql, is_identifier, is_service_name, CacheSettings, Dataset, Manifest, OwnerSnapshot,
    OwnerUrl, Policy, RequestPath, Service, SnapshotUrl, Strategy, Subscription,
    DEFAULT_MAX_ENTRIES, DEFAULT_NEGATIVE_TTL, DEFAULT_TOMBSTONE_HORIZON, MAX_MAX_ENTRIES,
    MAX_NAME_LEN,
};
use crate::duration::Duration;
use crate::schema::{FieldSpec, Schema};

/// Lines of the keys the governance rules point at (each defaults to the
/// line of its table).
#[derive(Debug, Default)]
pub(super) struct Spans {
    pub datasets: BTreeMap<String, DatasetLines>,
    /// Parallel to `Manifest::subscriptions`.
    pub subscriptions: Vec<SubscriptionLines>,
    pub paths: BTreeMap<String, usize>,
}

#[derive(Debug, Default)]
pub(super) struct DatasetLines {
    pub derived_from: usize,
}

#[derive(Debug, Default)]
pub(super) struct SubscriptionLines {
    pub dataset: usize,
    pub fields: usize,
    pub budget: usize,
    pub source: usize,
    pub interval: usize,
    pub ttl: usize,
    pub stale_if_error: usize,
    /// The staleness budget was declared and is valid (when it is missing
    /// or invalid, that is reported once and the budget rules stay quiet).
    pub budget_valid: bool,
    /// Consumer and dataset are declared and the consumer is not the owner.
    pub references_ok: bool,
}

/// Names a subscription in messages: `order-service→customers`.
fn sub_name(c: &str, d: &str) -> String {
    format!("{c}→{d}")
}

fn line_of<T>(lines: &Lines, v: &Option<Spanned<T>>, default: usize) -> usize {
    v.as_ref().map_or(default, |s| lines.of(s.span().start))
}

fn list(items: &[&str]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].to_owned(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

pub(super) fn resolve(
    raw: RawManifest,
    lines: &Lines,
    problems: &mut Vec<Problem>,
) -> (Manifest, Spans) {
    let mut m = Manifest::default();
    let mut spans = Spans::default();

    // [policy] first: other checks use it.
    if let Some(p) = raw.policy {
        let p = p.into_inner();
        let mut policy = Policy::default();
        if let Some(f) = p.budget_floor {
            match f.get_ref().parse::<Duration>() {
                Ok(d) => policy.budget_floor = d,
                Err(e) => problems.push(Problem::error(
                    lines.of(f.span().start),
                    Rule::Policy,
                    format!("policy budget_floor: {e}"),
                    "e.g. budget_floor = \"1s\"",
                )),
            }
        }
        if let Some(l) = p.large_field {
            let at = lines.of(l.span().start);
            let parsed = match l.get_ref() {
                toml::Value::Integer(n) => u64::try_from(*n)
                    .map_err(|_| format!("invalid size '{n}': must not be negative")),
                toml::Value::String(s) => parse_size(s),
                other => Err(format!("expected a size, got a {}", other.type_str())),
            };
            match parsed {
                Ok(b) => policy.large_field_bytes = b,
                Err(e) => problems.push(Problem::error(
                    at,
                    Rule::Policy,
                    format!("policy large_field: {e}"),
                    "e.g. large_field = \"4KiB\"",
                )),
            }
        }
        m.policy = policy;
    }

    for (name, svc) in &raw.services {
        let at = lines.of(svc.span().start);
        if !is_service_name(name) {
            problems.push(Problem::error(
                at,
                Rule::Name,
                format!("service name '{name}' must be lowercase letters, digits, '-' or '_', starting with a letter, at most {MAX_NAME_LEN} chars"),
                "rename it, e.g. [services.order-service]",
            ));
        }
        let availability = svc.get_ref().availability.as_ref().map(|a| {
            let v = *a.get_ref();
            if !(v > 0.0 && v <= 1.0) {
                problems.push(Problem::error(
                    lines.of(a.span().start),
                    Rule::Availability,
                    format!("service {name}: availability must be in (0, 1], got {v}"),
                    "write a fraction, e.g. availability = 0.999 for 99.9 %",
                ));
            }
            v
        });
        m.services.insert(
            name.clone(),
            Service {
                name: name.clone(),
                availability,
                line: at,
            },
        );
    }

    for (name, ds) in raw.datasets {
        let at_off = ds.span().start;
        let at = lines.of(at_off);
        let ds = ds.into_inner();
        // Errors of this dataset; warnings go straight to `problems`.
        let mut errors = Vec::new();
        let mut report = |line: usize, rule: Rule, message: String, hint: String| {
            errors.push(Problem::error(line, rule, message, hint))
        };
        if !is_identifier(name.as_str()) {
            report(
                at,
                Rule::Name,
                format!("dataset name '{name}' must be lowercase letters, digits or '_', starting with a letter, at most {MAX_NAME_LEN} chars"),
                "rename it, e.g. [datasets.customers]; it becomes an SQL table name".into(),
            );
        }
        let owner = match ds.owner {
            None => {
                report(
                    at,
                    Rule::Owner,
                    format!("dataset {name} has no owner"),
                    "add owner = \"<service>\", the one service that writes it".into(),
                );
                String::new()
            }
            Some(o) => {
                let line = lines.of(o.span().start);
                match o.into_inner() {
                    toml::Value::String(o) => {
                        if !m.services.contains_key(&o) {
                            report(
                                line,
                                Rule::Owner,
                                format!("dataset {name}: owner '{o}' is not a declared service"),
                                format!(
                                    "declare it with [services.{o}], or name a declared service"
                                ),
                            );
                        }
                        o
                    }
                    toml::Value::Array(owners) => {
                        let names: Vec<String> = owners
                            .iter()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                            .collect();
                        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                        report(
                            line,
                            Rule::Owner,
                            format!(
                                "dataset {name} names {} owners ({}); a dataset has exactly one owner",
                                names.len(),
                                list(&refs)
                            ),
                            "keep the one service that writes it as owner; the others subscribe to its feed".into(),
                        );
                        String::new()
                    }
                    other => {
                        report(
                            line,
                            Rule::Owner,
                            format!(
                                "dataset {name}: owner must be a service name, got a {}",
                                other.type_str()
                            ),
                            "write owner = \"<service>\"".into(),
                        );
                        String::new()
                    }
                }
            }
        };
        let key = match ds.key {
            None => {
                report(
                    at,
                    Rule::Schema,
                    format!("dataset {name} has no key"),
                    "add key = \"<field>\", the name of the records' key".into(),
                );
                String::new()
            }
            Some(k) => {
                let line = lines.of(k.span().start);
                if !is_identifier(k.get_ref()) {
                    report(
                        line,
                        Rule::Schema,
                        format!(
                            "dataset {name}: key name '{}' must be an identifier",
                            k.get_ref()
                        ),
                        "use lowercase letters, digits and '_', starting with a letter".into(),
                    );
                }
                if ds.fields.contains_key(k.get_ref()) {
                    report(
                        line,
                        Rule::Schema,
                        format!(
                            "dataset {name}: key '{}' must not also be listed in fields",
                            k.get_ref()
                        ),
                        format!(
                            "remove {} from fields; the key is always a string",
                            k.get_ref()
                        ),
                    );
                }
                k.into_inner()
            }
        };
        if ds.fields.is_empty() {
            report(
                at,
                Rule::Schema,
                format!("dataset {name} declares no fields"),
                "add fields = { <name> = \"<type>\", … }".into(),
            );
        }
        let mut fields = BTreeMap::new();
        for (field, ty) in &ds.fields {
            let line = lines.of(ty.span().start);
            if !is_identifier(field) || field.starts_with("_spoke") {
                report(
                    line,
                    Rule::Name,
                    format!("dataset {name}: field name '{field}' must be an identifier not starting with _spoke"),
                    "use lowercase letters, digits and '_', starting with a letter".into(),
                );
            }
            match ty.get_ref().parse::<FieldSpec>() {
                Ok(spec) => {
                    fields.insert(field.clone(), spec);
                }
                Err(e) => report(
                    line,
                    Rule::Schema,
                    format!("dataset {name}, field {field}: {e}"),
                    format!("e.g. {field} = \"string\", or \"string?\" when it may be missing"),
                ),
            }
        }
        let declared = |f: &str| ds.fields.contains_key(f);
        let field_names: Vec<&str> = ds.fields.keys().map(String::as_str).collect();
        let mut private = BTreeSet::new();
        if let Some(p) = &ds.private {
            let line = lines.of(p.span().start);
            for f in p.get_ref() {
                if declared(f) {
                    private.insert(f.clone());
                } else {
                    report(
                        line,
                        Rule::Grant,
                        format!(
                            "dataset {name}: private names '{f}', which is not one of its fields"
                        ),
                        format!("list fields of {name}: {}", list(&field_names)),
                    );
                }
            }
        }
        let mut grants: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        if let Some(g) = &ds.grants {
            for (service, granted) in g.get_ref() {
                let line = lines.of(granted.span().start);
                if !m.services.contains_key(service) {
                    report(
                        line,
                        Rule::Grant,
                        format!("dataset {name}: grants name '{service}', which is not a declared service"),
                        format!("declare [services.{service}], or remove the grant"),
                    );
                }
                for f in granted.get_ref() {
                    if !declared(f) {
                        report(
                            line,
                            Rule::Grant,
                            format!("dataset {name}: grants '{f}' to {service}, but {name} has no field '{f}'"),
                            format!("grant fields of {name}: {}", list(&field_names)),
                        );
                    } else if !private.contains(f) {
                        problems.push(Problem::warning(
                            line,
                            Rule::Grant,
                            format!("dataset {name} grants '{f}' to {service}, but '{f}' is not private: every subscriber may read it"),
                            format!("add '{f}' to private, or remove the grant"),
                        ));
                    }
                }
                grants
                    .entry(service.clone())
                    .or_default()
                    .extend(granted.get_ref().iter().cloned());
            }
        }
        let mut current = BTreeSet::new();
        if let Some(c) = &ds.current {
            let line = lines.of(c.span().start);
            for f in c.get_ref() {
                if declared(f) {
                    current.insert(f.clone());
                } else {
                    report(
                        line,
                        Rule::MustBeCurrent,
                        format!(
                            "dataset {name}: current names '{f}', which is not one of its fields"
                        ),
                        format!("list fields of {name}: {}", list(&field_names)),
                    );
                }
            }
        }
        let mut sizes = BTreeMap::new();
        if let Some(s) = &ds.sizes {
            for (f, v) in s.get_ref() {
                let line = lines.of(v.span().start);
                if !declared(f) {
                    report(
                        line,
                        Rule::LargeField,
                        format!(
                            "dataset {name}: sizes names '{f}', which is not one of its fields"
                        ),
                        format!("declare sizes of fields of {name}: {}", list(&field_names)),
                    );
                    continue;
                }
                let parsed = match v.get_ref() {
                    toml::Value::Integer(n) => u64::try_from(*n)
                        .map_err(|_| format!("invalid size '{n}': must not be negative")),
                    toml::Value::String(s) => parse_size(s),
                    other => Err(format!("expected a size, got a {}", other.type_str())),
                };
                match parsed {
                    Ok(b) => {
                        sizes.insert(f.clone(), b);
                    }
                    Err(e) => report(
                        line,
                        Rule::LargeField,
                        format!("dataset {name}, size of {f}: {e}"),
                        format!("e.g. sizes = {{ {f} = \"16KiB\" }} (the largest value expected)"),
                    ),
                }
            }
        }
        let derived_from_line = line_of(lines, &ds.derived_from, at);
        let derived_from = ds.derived_from.map(Spanned::into_inner).unwrap_or_default();
        let version = ds.schema_version.map_or(1, |v| *v.get_ref());
        let tombstone_horizon = match ds.tombstone_horizon {
            None => DEFAULT_TOMBSTONE_HORIZON,
            Some(h) => h.get_ref().parse().unwrap_or_else(|e| {
                report(
                    lines.of(h.span().start),
                    Rule::Schema,
                    format!("dataset {name}: tombstone_horizon: {e}"),
                    "e.g. tombstone_horizon = \"7d\"".into(),
                );
                DEFAULT_TOMBSTONE_HORIZON
            }),
        };
        problems.append(&mut errors);
        spans.datasets.insert(
            name.clone(),
            DatasetLines {
                derived_from: derived_from_line,
            },
        );
        m.datasets.insert(
            name.clone(),
            Dataset {
                name,
                owner,
                key,
                schema: Schema::new(version, fields),
                tombstone_horizon,
                private,
                grants,
                current,
                sizes,
                derived_from,
                line: at,
            },
        );
    }

    let mut seen = BTreeSet::new();
    for sub in raw.subscriptions {
        let at = lines.of(sub.span().start);
        let sub = sub.into_inner();
        let mut report = |line: usize, rule: Rule, message: String, hint: String| {
            problems.push(Problem::error(line, rule, message, hint))
        };
        let mut sl = SubscriptionLines {
            dataset: line_of(lines, &sub.dataset, at),
            fields: line_of(lines, &sub.fields, at),
            budget: line_of(lines, &sub.staleness_budget, at),
            source: line_of(lines, &sub.source, at),
            interval: line_of(lines, &sub.interval, at),
            ttl: line_of(lines, &sub.ttl, at),
            stale_if_error: line_of(lines, &sub.stale_if_error, at),
            budget_valid: false,
            references_ok: false,
        };
        let mut required = |v: Option<Spanned<String>>, what: &str, example: &str| match v {
            Some(v) => Some((lines.of(v.span().start), v.into_inner())),
            None => {
                report(
                    at,
                    Rule::Reference,
                    format!("subscription has no {what}"),
                    format!("add {what} = \"{example}\""),
                );
                None
            }
        };
        let consumer = required(sub.consumer, "consumer", "<service>");
        let dataset = required(sub.dataset, "dataset", "<dataset>");
        let mut references_ok = consumer.is_some();
        if let Some((line, c)) = &consumer {
            if !m.services.contains_key(c) {
                references_ok = false;
                report(
                    *line,
                    Rule::Reference,
                    format!("subscription consumer '{c}' is not a declared service"),
                    format!("declare it with [services.{c}], or name a declared service"),
                );
            }
        }
        let ds = dataset.as_ref().and_then(|(line, d)| {
            let found = m.datasets.get(d);
            if found.is_none() {
                let names: Vec<&str> = m.datasets.keys().map(String::as_str).collect();
                report(
                    *line,
                    Rule::Reference,
                    format!("subscription dataset '{d}' is not a declared dataset"),
                    if names.is_empty() {
                        format!("declare [datasets.{d}]")
                    } else {
                        format!(
                            "declare [datasets.{d}], or name a declared dataset: {}",
                            list(&names)
                        )
                    },
                );
            }
            found
        });
        references_ok &= ds.is_some();
        let c_name = consumer.as_ref().map_or("?", |c| c.1.as_str());
        let d_name = dataset.as_ref().map_or("?", |d| d.1.as_str());
        let who = sub_name(c_name, d_name);
        if let (Some((line, c)), Some(ds)) = (&consumer, ds) {
            if *c == ds.owner {
                references_ok = false;
                report(
                    *line,
                    Rule::SelfSubscription,
                    format!("service {c} subscribes to its own dataset {}; an owner reads its own data directly", ds.name),
                    "remove this subscription".into(),
                );
            }
        }
        if let (Some((line, c)), Some((_, d))) = (&consumer, &dataset) {
            if !seen.insert((c.clone(), d.clone())) {
                references_ok = false;
                report(
                    *line,
                    Rule::DuplicateSubscription,
                    format!("{c} subscribes to {d} twice; keep one subscription per consumer and dataset"),
                    "merge them into one subscription with every field it needs".into(),
                );
            }
        }
        sl.references_ok = references_ok;
        let fields = match sub.fields {
            None => {
                report(
                    at,
                    Rule::Projection,
                    "subscription has no fields".to_owned(),
                    "add fields = [\"…\"], the fields this consumer needs".into(),
                );
                Vec::new()
            }
            Some(f) => {
                let line = lines.of(f.span().start);
                let f = f.into_inner();
                if f.is_empty() {
                    report(
                        line,
                        Rule::Projection,
                        "subscription fields must not be empty".to_owned(),
                        "list the fields this consumer needs".into(),
                    );
                }
                let mut unique = BTreeSet::new();
                for name in &f {
                    if !unique.insert(name) {
                        report(
                            line,
                            Rule::Projection,
                            format!("field '{name}' is listed twice"),
                            "remove the repeat".into(),
                        );
                    }
                    if let (Some(ds), Some((_, c))) = (ds, &consumer) {
                        if !ds.schema.fields.contains_key(name) {
                            let have: Vec<&str> =
                                ds.schema.fields.keys().map(String::as_str).collect();
                            report(
                                line,
                                Rule::Projection,
                                format!("subscription {c}→{} projects field '{name}', which {} (schema v{}) does not have", ds.name, ds.name, ds.schema.version),
                                format!("remove '{name}', or project fields {} has: {}", ds.name, list(&have)),
                            );
                        }
                    }
                }
                f
            }
        };
        let strategy = match &sub.strategy {
            None => Strategy::Events,
            Some(s) => Strategy::parse(s.get_ref()).unwrap_or_else(|| {
                report(
                    lines.of(s.span().start),
                    Rule::Strategy,
                    format!(
                        "unknown strategy '{}' (expected events, cdc, scheduled, ttl or none)",
                        s.get_ref()
                    ),
                    "e.g. strategy = \"events\" to follow the owner's feed".into(),
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
                    Rule::Strategy,
                    "subscription has no staleness_budget".to_owned(),
                    "add staleness_budget = \"5m\" (how stale the copy may get), or strategy = \"none\" to call the owner instead".into(),
                );
                Duration::default()
            }
            Some(b) => match b.get_ref().parse() {
                Ok(d) => {
                    sl.budget_valid = true;
                    d
                }
                Err(e) => {
                    report(
                        lines.of(b.span().start),
                        Rule::Strategy,
                        format!("staleness_budget: {e}"),
                        "e.g. staleness_budget = \"5m\"".into(),
                    );
                    Duration::default()
                }
            },
        };
        let mut setting = |v: Option<Spanned<String>>,
                           key: &str,
                           wanted: Strategy,
                           what: &str,
                           example: &str|
         -> Option<Duration> {
            match v {
                None => {
                    if strategy == wanted {
                        report(
                            at,
                            Rule::Strategy,
                            format!(
                                "subscription {who}: strategy {} needs {key}",
                                wanted.as_str()
                            ),
                            format!(
                                "add {key} = \"{example}\": {what}, at most the staleness budget"
                            ),
                        );
                    }
                    None
                }
                Some(v) => {
                    let line = lines.of(v.span().start);
                    if strategy != wanted {
                        report(
                            line,
                            Rule::Strategy,
                            format!(
                                "subscription {who}: {key} applies only to strategy = \"{}\" (this one is {})",
                                wanted.as_str(),
                                strategy.as_str()
                            ),
                            format!("remove {key}, or set strategy = \"{}\"", wanted.as_str()),
                        );
                    }
                    positive_duration(
                        &who,
                        key,
                        v.get_ref(),
                        &format!("e.g. {key} = \"{example}\""),
                    )
                    .map_err(|(problem, fix)| report(line, Rule::Strategy, problem, fix))
                    .ok()
                }
            }
        };
        let interval = setting(
            sub.interval,
            "interval",
            Strategy::Scheduled,
            "how often the snapshot runs",
            "15m",
        );
        let ttl = setting(
            sub.ttl,
            "ttl",
            Strategy::Ttl,
            "how long a cached entry is served",
            "5m",
        );
        let reconcile_every = sub.reconcile_every.and_then(|v| {
            let line = lines.of(v.span().start);
            if !strategy.follows_feed() {
                let why = match strategy {
                    Strategy::Scheduled => "every scheduled refresh already compares the copy's digest with the owner's",
                    Strategy::Ttl => "a ttl cache keeps no copy to reconcile",
                    _ => "nothing is copied",
                };
                report(
                    line,
                    Rule::Strategy,
                    format!(
                        "subscription {who}: reconcile_every applies only to strategy = \"events\" or \"cdc\" (this one is {}: {why})",
                        strategy.as_str()
                    ),
                    "remove reconcile_every".into(),
                );
            }
            positive_duration(
                &who,
                "reconcile_every",
                v.get_ref(),
                "e.g. reconcile_every = \"1h\", or remove it to reconcile only on demand",
            )
            .map_err(|(problem, fix)| report(line, Rule::Strategy, problem, fix))
            .ok()
        });
        let snapshot = resolve_snapshot(
            sub.snapshot_url,
            sub.snapshot_sql,
            strategy,
            &who,
            at,
            lines,
            &mut report,
        );
        let (owner_url, cache) = resolve_cache(
            CacheKeys {
                owner_url: sub.owner_url,
                max_entries: sub.max_entries,
                negative_ttl: sub.negative_ttl,
                stale_if_error: sub.stale_if_error,
            },
            strategy,
            ttl,
            &who,
            at,
            lines,
            &mut report,
        );
        let source = sub.source.map(|s| {
            let line = lines.of(s.span().start);
            let s = s.into_inner();
            if !m.services.contains_key(&s) {
                let owner = ds.map_or("the owner".to_owned(), |d| d.owner.clone());
                report(
                    line,
                    Rule::Reference,
                    format!("subscription {who}: source '{s}' is not a declared service"),
                    format!("remove source to read the owner's feed ({owner})"),
                );
            }
            s
        });
        let mut traits = BTreeMap::new();
        if let Some(t) = sub.traits {
            for (field, declared) in t.into_inner() {
                let line = lines.of(declared.span().start);
                if !fields.contains(&field) {
                    report(
                        line,
                        Rule::Traits,
                        format!("subscription {who} declares traits for '{field}', which it does not project"),
                        format!("add '{field}' to fields, or remove its traits"),
                    );
                    continue;
                }
                traits.insert(
                    field.clone(),
                    resolve_traits(declared.into_inner(), &who, &field, line, &mut report),
                );
            }
        }
        spans.subscriptions.push(sl);
        m.subscriptions.push(Subscription {
            consumer: consumer.map(|c| c.1).unwrap_or_default(),
            dataset: dataset.map(|d| d.1).unwrap_or_default(),
            fields,
            strategy,
            staleness_budget,
            source,
            interval,
            snapshot,
            reconcile_every,
            ttl,
            owner_url,
            cache,
            traits,
            line: at,
        });
    }

    for (name, p) in raw.paths {
        let at = lines.of(p.span().start);
        let p = p.into_inner();
        let mut report = |line: usize, rule: Rule, message: String, hint: String| {
            problems.push(Problem::error(line, rule, message, hint))
        };
        if !is_service_name(&name) {
            report(
                at,
                Rule::Name,
                format!("path name '{name}' must be lowercase letters, digits, '-' or '_', starting with a letter, at most {MAX_NAME_LEN} chars"),
                "rename it, e.g. [paths.checkout]".into(),
            );
        }
        let mut needs_availability = Vec::new();
        let service = match p.service {
            None => {
                report(
                    at,
                    Rule::Path,
                    format!("path {name} has no service"),
                    "add service = \"<service>\", the service that serves the request".into(),
                );
                String::new()
            }
            Some(s) => {
                let line = lines.of(s.span().start);
                let s = s.into_inner();
                if m.services.contains_key(&s) {
                    needs_availability.push((line, s.clone()));
                } else {
                    report(
                        line,
                        Rule::Path,
                        format!("path {name}: service '{s}' is not a declared service"),
                        format!("declare it with [services.{s}], or name a declared service"),
                    );
                }
                s
            }
        };
        let calls = match p.calls {
            None => {
                report(
                    at,
                    Rule::Path,
                    format!("path {name} has no calls"),
                    "add calls = [\"<service>\", …], the services the request calls".into(),
                );
                Vec::new()
            }
            Some(c) => {
                let line = lines.of(c.span().start);
                let c = c.into_inner();
                if c.is_empty() {
                    report(
                        line,
                        Rule::Path,
                        format!("path {name}: calls must not be empty"),
                        "list the services the request calls".into(),
                    );
                }
                let mut unique = BTreeSet::new();
                for s in &c {
                    if !unique.insert(s) {
                        report(
                            line,
                            Rule::Path,
                            format!("path {name} calls {s} twice"),
                            "list each service once".into(),
                        );
                    } else if *s == service {
                        report(
                            line,
                            Rule::Path,
                            format!("path {name}: {s} serves the request and cannot also be one of its calls"),
                            format!("remove {s} from calls"),
                        );
                    } else if !m.services.contains_key(s) {
                        report(
                            line,
                            Rule::Path,
                            format!("path {name} calls '{s}', which is not a declared service"),
                            format!("declare it with [services.{s}], or name a declared service"),
                        );
                    } else {
                        needs_availability.push((line, s.clone()));
                    }
                }
                c
            }
        };
        for (line, s) in needs_availability {
            if m.services[&s].availability.is_none() {
                report(
                    line,
                    Rule::Availability,
                    format!("path {name} involves {s}, which declares no availability"),
                    format!(
                        "add availability = 0.999, or its measured value, under [services.{s}]"
                    ),
                );
            }
        }
        spans.paths.insert(name.clone(), at);
        m.paths.insert(
            name.clone(),
            RequestPath {
                name,
                service,
                calls,
                line: at,
            },
        );
    }
    (m, spans)
}

/// Checks `snapshot_url` and `snapshot_sql`: exactly one of them on a
/// `scheduled` subscription, neither on any other.
fn resolve_snapshot(
    url: Option<Spanned<String>>,
    sql: Option<Spanned<String>>,
    strategy: Strategy,
    who: &str,
    at: usize,
    lines: &Lines,
    report: &mut impl FnMut(usize, Rule, String, String),
) -> Option<OwnerSnapshot> {
    const EXAMPLE_URL: &str = "snapshot_url = \"http://customer-service:8080/v1/customers\"";
    const EXAMPLE_SQL: &str =
        "snapshot_sql = \"SELECT id AS key, version, name, email FROM customers\"";
    let scheduled = strategy == Strategy::Scheduled;
    let mut misplaced = |v: &Spanned<String>, key: &str| {
        if !scheduled {
            report(
                lines.of(v.span().start),
                Rule::Strategy,
                format!(
                    "subscription {who}: {key} applies only to strategy = \"scheduled\" (this one is {})",
                    strategy.as_str()
                ),
                format!("remove {key}, or set strategy = \"scheduled\" and an interval"),
            );
        }
    };
    if let Some(u) = &url {
        misplaced(u, "snapshot_url");
    }
    if let Some(q) = &sql {
        misplaced(q, "snapshot_sql");
    }
    let resolved = match (url, sql) {
        (None, None) => {
            if scheduled {
                report(
                    at,
                    Rule::Strategy,
                    format!("subscription {who}: strategy scheduled needs snapshot_url or snapshot_sql, where the agent reads the owner's snapshot"),
                    format!("add {EXAMPLE_URL} (the owner's paged listing), or {EXAMPLE_SQL} (with [agent.owner_postgres] in the deployment config)"),
                );
            }
            None
        }
        (Some(_), Some(q)) => {
            report(
                lines.of(q.span().start),
                Rule::Strategy,
                format!("subscription {who}: give snapshot_url or snapshot_sql, not both"),
                "keep the one the owner supports".into(),
            );
            None
        }
        (Some(u), None) => match SnapshotUrl::parse(u.get_ref()) {
            Ok(u) => Some(OwnerSnapshot::Url(u)),
            Err(e) => {
                report(
                    lines.of(u.span().start),
                    Rule::Strategy,
                    format!("subscription {who}: snapshot_url {e}"),
                    format!("write the owner's listing URL, e.g. {EXAMPLE_URL}"),
                );
                None
            }
        },
        (None, Some(q)) => match check_sql(q.get_ref()) {
            Ok(sql) => Some(OwnerSnapshot::Sql(sql)),
            Err(e) => {
                report(
                    lines.of(q.span().start),
                    Rule::Strategy,
                    format!("subscription {who}: snapshot_sql {e}"),
                    format!("e.g. {EXAMPLE_SQL}"),
                );
                None
            }
        },
    };
    resolved.filter(|_| scheduled)
}

/// The owner endpoint and cache keys of one subscription, as written.
struct CacheKeys {
    owner_url: Option<Spanned<String>>,
    max_entries: Option<Spanned<i64>>,
    negative_ttl: Option<Spanned<String>>,
    stale_if_error: Option<Spanned<String>>,
}

/// Checks `owner_url` (any strategy that keeps a copy; required for `ttl`)
/// and the cache keys (only `ttl`), and fills in the cache's defaults.
#[allow(clippy::too_many_arguments)]
fn resolve_cache(
    keys: CacheKeys,
    strategy: Strategy,
    ttl: Option<Duration>,
    who: &str,
    at: usize,
    lines: &Lines,
    report: &mut impl FnMut(usize, Rule, String, String),
) -> (Option<OwnerUrl>, Option<CacheSettings>) {
    const EXAMPLE: &str = "owner_url = \"http://customer-service:8080/v1/customers/{key}\"";
    let owner_url = match keys.owner_url {
        None => {
            if strategy == Strategy::Ttl {
                report(
                    at,
                    Rule::Strategy,
                    format!("subscription {who}: strategy ttl needs owner_url, the owner's read endpoint the cache reads through on a miss"),
                    format!("add {EXAMPLE}"),
                );
            }
            None
        }
        Some(u) => {
            let line = lines.of(u.span().start);
            if strategy == Strategy::None {
                report(
                    line,
                    Rule::Strategy,
                    format!("subscription {who}: owner_url does not apply to strategy = \"none\": nothing is copied, so there is nothing to read through or fall back from"),
                    "remove owner_url, or choose a strategy that keeps a copy (events, cdc, scheduled or ttl)".into(),
                );
                None
            } else {
                match OwnerUrl::parse(u.get_ref()) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        report(
                            line,
                            Rule::Strategy,
                            format!("subscription {who}: owner_url {e}"),
                            format!("write an http(s) URL with exactly one {{key}} in its path or query, e.g. {EXAMPLE}"),
                        );
                        None
                    }
                }
            }
        }
    };
    // Why `key` is out of place on this subscription, if it is.
    let only_ttl = |key: &str| {
        (strategy != Strategy::Ttl).then(|| {
            (
                format!(
                    "subscription {who}: {key} applies only to strategy = \"ttl\" (this one is {})",
                    strategy.as_str()
                ),
                format!("remove {key}, or set strategy = \"ttl\""),
            )
        })
    };
    let mut duration = |v: Option<Spanned<String>>, key: &str, example: &str| {
        v.and_then(|v| {
            let line = lines.of(v.span().start);
            if let Some((message, hint)) = only_ttl(key) {
                report(line, Rule::Strategy, message, hint);
            }
            match v.get_ref().parse::<Duration>() {
                Ok(d) => Some((line, d)),
                Err(e) => {
                    report(
                        line,
                        Rule::Strategy,
                        format!("subscription {who}: {key}: {e}"),
                        format!("e.g. {key} = \"{example}\""),
                    );
                    None
                }
            }
        })
    };
    let negative_ttl = duration(keys.negative_ttl, "negative_ttl", "30s");
    let stale_if_error = duration(keys.stale_if_error, "stale_if_error", "5m");
    let max_entries = keys.max_entries.and_then(|m| {
        let line = lines.of(m.span().start);
        if let Some((message, hint)) = only_ttl("max_entries") {
            report(line, Rule::Strategy, message, hint);
        }
        let n = *m.get_ref();
        match usize::try_from(n) {
            Ok(n) if (1..=MAX_MAX_ENTRIES).contains(&n) => Some(n),
            _ => {
                report(
                    line,
                    Rule::Strategy,
                    format!("subscription {who}: max_entries must be between 1 and {MAX_MAX_ENTRIES}, got {n}"),
                    format!("e.g. max_entries = {DEFAULT_MAX_ENTRIES}, the most keys the cache holds"),
                );
                None
            }
        }
    });
    let (Strategy::Ttl, Some(ttl)) = (strategy, ttl) else {
        return (owner_url, None);
    };
    let negative_ttl = match negative_ttl {
        Some((line, n)) if n > ttl => {
            report(
                line,
                Rule::Strategy,
                format!("subscription {who}: negative_ttl {n} is longer than ttl {ttl}: a missing key would be remembered longer than a present one"),
                format!("set negative_ttl to at most {ttl}"),
            );
            ttl
        }
        Some((_, n)) => n,
        None => DEFAULT_NEGATIVE_TTL.min(ttl),
    };
    let cache = CacheSettings {
        ttl,
        negative_ttl,
        stale_if_error: stale_if_error.map(|(_, d)| d),
        max_entries: max_entries.unwrap_or(DEFAULT_MAX_ENTRIES),
    };
    (owner_url, Some(cache))
}

fn resolve_traits(
    raw: RawTraits,
    who: &str,
    field: &str,
    line: usize,
    report: &mut impl FnMut(usize, Rule, String, String),
) -> FieldTraits {
    let mut bad = |key: &str, value: &str, expected: &str, example: &str| {
        report(
            line,
            Rule::Traits,
            format!("subscription {who}, traits of {field}: unknown {key} '{value}' (expected {expected})"),
            format!("e.g. {key} = \"{example}\""),
        );
    };
    let changes = raw.changes.as_deref().and_then(|v| {
        let r = Changes::parse(v);
        if r.is_none() {
            bad(Changes::KEY, v, Changes::EXPECTED, "rarely");
        }
        r
    });
    let access = raw.access.as_deref().and_then(|v| {
        let r = Access::parse(v);
        if r.is_none() {
            bad(Access::KEY, v, Access::EXPECTED, "every-request");
        }
        r
    });
    let impact = raw.impact.as_deref().and_then(|v| {
        let r = Impact::parse(v);
        if r.is_none() {
            bad(Impact::KEY, v, Impact::EXPECTED, "ux");
        }
        r
    });
    let tolerance = raw.tolerance.as_deref().and_then(|v| match v.parse::<Duration>() {
        Ok(d) => Some(d),
        Err(e) => {
            report(
                line,
                Rule::Traits,
                format!("subscription {who}, traits of {field}: tolerance: {e}"),
                "e.g. tolerance = \"1h\": how stale the value may be for this use, \"0s\" when it must be current".into(),
            );
            None
        }
    });
    FieldTraits {
        critical: raw.critical,
        tolerance,
        changes,
        access,
        impact,
        historical: raw.historical,
    }
}

/// A subscription's duration setting, which must be longer than 0s: the
/// value, or the problem and its fix (`hint`).
fn positive_duration(
    who: &str,
    key: &str,
    value: &str,
    hint: &str,
) -> Result<Duration, (String, String)> {
    match value.parse::<Duration>() {
        Ok(d) if d == Duration::default() => Err((
            format!("subscription {who}: {key} must be longer than 0s"),
            hint.to_owned(),
        )),
        Ok(d) => Ok(d),
        Err(e) => Err((format!("subscription {who}: {key}: {e}"), hint.to_owned())),
    }
}
