//! The governance rules: what must hold across declarations.
//!
//! - Hub and spoke: consumers read only the owner's feed. A subscription
//!   whose `source` is another service reads a copy of a copy; a dataset
//!   `derived_from` its owner's copy of another dataset re-publishes a copy.
//!   Both are rejected, naming the chain.
//! - No cycles: datasets do not derive from themselves, through any number
//!   of steps, and `source` chains never loop.
//! - Private fields leave the owner only for services it granted them to.
//! - The strategy can meet the budget: a `scheduled` interval or a `ttl`
//!   longer than the staleness budget is an error; an `events`/`cdc` budget
//!   below the floor ([`super::Policy::budget_floor`]) is a warning.
//!   A `ttl` whose `stale_if_error` can serve entries older than the budget
//!   while the owner fails is a warning.
//! - Fields the owner marks `current` are never copied (only `none`).
//! - Large fields in copies (declared over the bound, or `json` with no
//!   declared size) warn.

use std::collections::{BTreeMap, BTreeSet};

use super::problem::{Problem, Rule};
use super::resolve::Spans;
use super::{FieldSize, Manifest, Strategy, Subscription};

pub(super) fn check(m: &Manifest, spans: &Spans, problems: &mut Vec<Problem>) {
    sources(m, spans, problems);
    lineage(m, spans, problems);
    derivation_cycles(m, spans, problems);
    for (i, sub) in m.subscriptions.iter().enumerate() {
        let lines = &spans.subscriptions[i];
        if !lines.references_ok {
            continue;
        }
        let Some(ds) = m.datasets.get(&sub.dataset) else {
            continue;
        };
        let who = format!("{}→{}", sub.consumer, sub.dataset);
        let owner = &ds.owner;
        let projected = || {
            sub.fields
                .iter()
                .filter(|f| ds.schema.fields.contains_key(*f))
        };

        // Private fields and grants.
        for f in projected().filter(|f| !ds.may_receive(&sub.consumer, f)) {
            let granted: Vec<&str> = ds
                .grants
                .iter()
                .filter(|(_, g)| g.contains(f))
                .map(|(s, _)| s.as_str())
                .collect();
            let to_whom = if granted.is_empty() {
                "to no one".to_owned()
            } else {
                format!("only to {}", granted.join(", "))
            };
            problems.push(Problem::error(
                lines.fields,
                Rule::PrivateField,
                format!("subscription {who} projects private field '{f}', which {owner} grants {to_whom}"),
                format!("remove '{f}' from fields, or have {owner} add grants = {{ \"{}\" = [\"{f}\"] }}", sub.consumer),
            ));
        }

        // Must-be-current data is called, never copied.
        if sub.strategy.copies() {
            for f in projected().filter(|f| ds.current.contains(*f)) {
                problems.push(Problem::error(
                    lines.fields,
                    Rule::MustBeCurrent,
                    format!(
                        "subscription {who} copies '{f}' with strategy {}, but {owner} marks '{f}' must-be-current",
                        sub.strategy.as_str()
                    ),
                    format!("remove '{f}' from fields and call {owner} for it, or set strategy = \"none\""),
                ));
            }
        }

        // The strategy can meet the budget.
        if lines.budget_valid {
            budget(m, sub, &who, lines, problems);
        }

        // Large fields in copies.
        if sub.strategy.copies() {
            for f in projected() {
                let size = ds.size_of(f);
                if !size.is_large(&m.policy) {
                    continue;
                }
                let (message, hint) = match size {
                    FieldSize::Declared(_) => (
                        format!(
                            "subscription {who} copies '{f}', declared {size}, over the {} bound for copied fields; large fields slow every apply, bootstrap and reconciliation",
                            super::format_size(m.policy.large_field_bytes)
                        ),
                        format!("copy an id or a summary and fetch '{f}' from {owner} when needed, or raise [policy] large_field"),
                    ),
                    _ => (
                        format!("subscription {who} copies '{f}', a json field with no declared size: its size is unbounded"),
                        format!("declare its size in [datasets.{}], e.g. sizes = {{ {f} = \"2KiB\" }}, or fetch it from {owner} when needed", ds.name),
                    ),
                };
                problems.push(Problem::warning(
                    lines.fields,
                    Rule::LargeField,
                    message,
                    hint,
                ));
            }
        }
    }
}

fn budget(
    m: &Manifest,
    sub: &Subscription,
    who: &str,
    lines: &super::resolve::SubscriptionLines,
    problems: &mut Vec<Problem>,
) {
    let b = sub.staleness_budget;
    match sub.strategy {
        Strategy::Scheduled => {
            if let Some(i) = sub.interval.filter(|i| *i > b) {
                problems.push(Problem::error(
                    lines.interval,
                    Rule::Budget,
                    format!("subscription {who}: a scheduled snapshot every {i} cannot meet the staleness budget {b} (just before a run the copy is up to {i} old)"),
                    format!("set interval to at most {b}, raise staleness_budget to {i}, or follow the feed with strategy = \"events\""),
                ));
            }
        }
        Strategy::Ttl => {
            if let Some(t) = sub.ttl.filter(|t| *t > b) {
                problems.push(Problem::error(
                    lines.ttl,
                    Rule::Budget,
                    format!("subscription {who}: a cache entry kept for ttl {t} cannot meet the staleness budget {b} (it is served up to {t} after it was read)"),
                    format!("set ttl to at most {b}, or raise staleness_budget to {t}"),
                ));
            }
            if let Some(c) = sub.cache.filter(|c| c.ttl <= b) {
                if let Some(s) = c.stale_if_error {
                    let worst = crate::Duration::from_millis(
                        c.ttl.as_millis().saturating_add(s.as_millis()),
                    );
                    if worst > b {
                        problems.push(Problem::warning(
                            lines.stale_if_error,
                            Rule::Budget,
                            format!("subscription {who}: while the owner fails, entries are served up to ttl {} + stale_if_error {s} = {worst} old, over the staleness budget {b} (such reads are flagged stale)", c.ttl),
                            "lower stale_if_error to at most the budget minus the ttl, or accept stale reads during owner outages",
                        ));
                    }
                }
            }
        }
        Strategy::Events | Strategy::Cdc => {
            let floor = m.policy.budget_floor;
            if b < floor {
                problems.push(Problem::warning(
                    lines.budget,
                    Rule::Budget,
                    format!(
                        "subscription {who}: staleness budget {b} is below the {floor} a copy following the feed ({}) can promise; expect budget breaches",
                        sub.strategy.as_str()
                    ),
                    format!("raise staleness_budget to at least {floor}, call the owner with strategy = \"none\", or lower [policy] budget_floor if your feed is measured faster"),
                ));
            }
        }
        Strategy::None => {}
    }
}

/// Where a `source` chain ends.
enum ChainEnd {
    /// At the owner: every hop kept a copy.
    Owner,
    /// At a service seen before.
    Cycle,
    /// At a service that keeps no copy of the dataset.
    NoCopy,
}

/// `source` names the service whose feed a consumer reads; only the owner
/// is valid. Follows each non-owner source to name the whole chain.
fn sources(m: &Manifest, spans: &Spans, problems: &mut Vec<Problem>) {
    for (i, sub) in m.subscriptions.iter().enumerate() {
        let lines = &spans.subscriptions[i];
        let (Some(source), true) = (&sub.source, lines.references_ok) else {
            continue;
        };
        let Some(ds) = m.datasets.get(&sub.dataset) else {
            continue;
        };
        let owner = &ds.owner;
        if source == owner || !m.services.contains_key(source) {
            continue;
        }
        let d = &sub.dataset;
        let who = format!("{}→{d}", sub.consumer);
        // hops[0] is the consumer, each next hop the service it reads from.
        let mut hops: Vec<&str> = vec![&sub.consumer];
        let mut cur: &str = source;
        let end = loop {
            if cur == owner {
                hops.push(cur);
                break ChainEnd::Owner;
            }
            if hops.contains(&cur) {
                hops.push(cur);
                break ChainEnd::Cycle;
            }
            hops.push(cur);
            match m.subscription(cur, d).filter(|s| s.strategy.copies()) {
                None => break ChainEnd::NoCopy,
                Some(s) => cur = s.source.as_deref().unwrap_or(owner),
            }
        };
        let hint =
            format!("subscribe to the owner's feed: remove source, or set source = \"{owner}\"");
        let (rule, message) = match end {
            ChainEnd::NoCopy if hops.len() == 2 => {
                let has = if m.subscription(source, d).is_some() {
                    format!("keeps no copy of {d} (it calls {owner})")
                } else {
                    format!("neither owns {d} ({owner} does) nor keeps a copy of it")
                };
                (
                    Rule::CopyOfCopy,
                    format!("subscription {who} reads from {source}, which {has}"),
                )
            }
            ChainEnd::NoCopy => {
                (
                    Rule::CopyOfCopy,
                    format!(
                        "subscription {who} reads {source}'s copy of {d}, a copy of a copy: {}, which keeps no copy",
                        reading_chain(&hops)
                    ),
                )
            }
            ChainEnd::Owner => {
                let flow: Vec<&str> = hops.iter().rev().copied().collect();
                (
                    Rule::CopyOfCopy,
                    format!(
                        "subscription {who} reads {source}'s copy of {d}, a copy of a copy: {}",
                        flow.join(" → ")
                    ),
                )
            }
            ChainEnd::Cycle => (
                Rule::Cycle,
                format!(
                    "subscription {who} reads from {source}, and the chain loops without reaching the owner of {d} ({owner}): {}",
                    reading_chain(&hops)
                ),
            ),
        };
        problems.push(Problem::error(lines.source, rule, message, hint));
    }
}

/// `a reads from b, which reads from c`.
fn reading_chain(hops: &[&str]) -> String {
    let mut out = String::from(hops[0]);
    for (i, h) in hops.iter().enumerate().skip(1) {
        out.push_str(if i == 1 {
            " reads from "
        } else {
            ", which reads from "
        });
        out.push_str(h);
    }
    out
}

/// `derived_from`: each source is a declared dataset the owner reads; a
/// dataset built from its owner's *copy* of another re-publishes a copy,
/// and everyone who subscribes to it reads a copy of a copy.
fn lineage(m: &Manifest, spans: &Spans, problems: &mut Vec<Problem>) {
    for (name, ds) in &m.datasets {
        let line = spans.datasets.get(name).map_or(ds.line, |l| l.derived_from);
        let o = &ds.owner;
        for src in &ds.derived_from {
            if src == name {
                continue; // a cycle, reported by derivation_cycles
            }
            let Some(origin) = m.datasets.get(src) else {
                let names: Vec<&str> = m
                    .datasets
                    .keys()
                    .map(String::as_str)
                    .filter(|n| n != name)
                    .collect();
                problems.push(Problem::error(
                    line,
                    Rule::Lineage,
                    format!("dataset {name}: derived_from names '{src}', which is not a declared dataset"),
                    if names.is_empty() {
                        format!("declare [datasets.{src}], or remove it from derived_from")
                    } else {
                        format!("name a declared dataset: {}", names.join(", "))
                    },
                ));
                continue;
            };
            let p = &origin.owner;
            if p == o || o.is_empty() {
                continue; // an owner deriving from its own data
            }
            match m.subscription(o, src) {
                None => problems.push(Problem::error(
                    line,
                    Rule::Lineage,
                    format!("dataset {name} derives from {src}, but its owner {o} has no subscription to {src}"),
                    format!("declare how {o} reads {src}: a subscription with strategy = \"none\" if it snapshots facts into {name} when it writes them"),
                )),
                Some(s) if s.strategy.copies() => {
                    problems.push(Problem::error(
                        line,
                        Rule::CopyOfCopy,
                        format!("dataset {name} (owner {o}) re-publishes {o}'s copy of {src}, owned by {p}; a copy is never a source: {p} → {o} → {name}"),
                        format!("let consumers of {name} subscribe to {src} from {p}; keep only {o}'s own data and point-in-time snapshots in {name}"),
                    ));
                    for (i, reader) in m.subscriptions.iter().enumerate() {
                        if reader.dataset != *name || !spans.subscriptions[i].references_ok {
                            continue;
                        }
                        let c = &reader.consumer;
                        let (rule, message) = if c == p {
                            (
                                Rule::Cycle,
                                format!("subscription {c}→{name} reads {p}'s own data back through {o}'s copy of {src}, a cycle: {p} → {o} → {p}"),
                            )
                        } else {
                            (
                                Rule::CopyOfCopy,
                                format!("subscription {c}→{name} reads a copy of a copy, because {name} re-publishes {o}'s copy of {src}: {p} → {o} → {c}"),
                            )
                        };
                        problems.push(Problem::error(
                            spans.subscriptions[i].dataset,
                            rule,
                            message,
                            if c == p {
                                format!("remove this subscription; {p} reads {src} directly")
                            } else {
                                format!("subscribe to {src} from its owner {p} instead")
                            },
                        ));
                    }
                }
                Some(_) => {} // strategy none: facts snapshotted from the owner
            }
        }
    }
}

/// Datasets deriving from themselves, through any number of steps.
fn derivation_cycles(m: &Manifest, spans: &Spans, problems: &mut Vec<Problem>) {
    let graph: BTreeMap<&str, Vec<&str>> = m
        .datasets
        .iter()
        .map(|(n, d)| {
            (
                n.as_str(),
                d.derived_from
                    .iter()
                    .map(String::as_str)
                    .filter(|s| m.datasets.contains_key(*s))
                    .collect(),
            )
        })
        .collect();
    let mut reported: BTreeSet<Vec<&str>> = BTreeSet::new();
    for &start in graph.keys() {
        // Depth-first search for a path back to `start` through datasets
        // named after it, so each cycle is found once, from its smallest name.
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        let mut path: Vec<&str> = vec![start];
        let mut visited: BTreeSet<&str> = BTreeSet::new();
        while let Some((node, next)) = stack.pop() {
            let edges = &graph[node];
            if next >= edges.len() {
                path.pop();
                continue;
            }
            stack.push((node, next + 1));
            let to = edges[next];
            if to == start {
                let mut cycle = path.clone();
                let key = {
                    let mut k = cycle.clone();
                    k.sort_unstable();
                    k
                };
                if reported.insert(key) {
                    cycle.push(start);
                    let line = spans.datasets.get(start).map_or(0, |l| l.derived_from);
                    let mut chain = format!("{} derives from {}", cycle[0], cycle[1]);
                    for d in &cycle[2..] {
                        chain.push_str(&format!(", which derives from {d}"));
                    }
                    problems.push(Problem::error(
                        line,
                        Rule::Cycle,
                        format!(
                            "datasets derive from themselves in a cycle: {chain}; a change would echo around it"
                        ),
                        format!(
                            "remove {} from the derived_from of {}, or let one owner keep its own data",
                            cycle[1], cycle[0]
                        ),
                    ));
                }
                continue;
            }
            if to > start && visited.insert(to) {
                stack.push((to, 0));
                path.push(to);
            }
        }
    }
}
