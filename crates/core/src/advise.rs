//! The decision framework behind `spoke advise`: for every field a consumer
//! wants, should it **duplicate** it (keep a copy), **call the owner** when
//! it needs it, or **snapshot** it into its own record? And what does each
//! request path's availability become when copies replace calls?
//!
//! Pure functions of a [`Manifest`]; the CLI only prints them.
//!
//! # Traits and their defaults
//! Each subscription may declare, per projected field,
//! `traits = { <field> = { critical, tolerance, changes, access, impact, historical } }`.
//! Undeclared traits take these defaults (and the advice says which were
//! defaulted):
//!
//! | trait | meaning | default |
//! | --- | --- | --- |
//! | `critical` | needed for a critical operation | `true` |
//! | `tolerance` | how stale it may be for this use | `0s` when the owner marks the field `current`; else the subscription's `staleness_budget` when it copies; else unknown |
//! | `changes` | `never`, `rarely`, `often`, `constantly` | `rarely` |
//! | `access` | `every-request`, `often`, `rarely` | `often` |
//! | `impact` of a stale value | `none`, `ux`, `financial`, `safety` | `ux` |
//! | size | from the dataset: `sizes`, or `json` = unbounded | small |
//! | `historical` | a point-in-time fact of the consumer's record | `false` |
//!
//! # The decision, first rule that applies
//! 1. `historical` → **snapshot**: read it from the owner when the record is
//!    written and keep it; later changes must not rewrite it (price paid).
//! 2. the owner marks it `current` → **call owner**.
//! 3. tolerance below the budget floor → **call owner**: no copy can be that fresh.
//! 4. `financial`/`safety` impact and it changes `often`/`constantly` → **call owner**.
//! 5. it changes `constantly` → **call owner**: a copy would churn and still lag.
//! 6. large (over `[policy] large_field`, or unbounded `json`) and not read on
//!    every request → **call owner**.
//! 7. not critical and read `rarely` → **call owner**, degrade gracefully.
//! 8. otherwise → **duplicate**.
//!
//! # Availability
//! A request that calls services synchronously is up only when all of them
//! are: its availability is the product of theirs (the serving service
//! included). With copies, only the services it still calls count. Monthly
//! downtime is `(1 − availability) × 730 h` (a month as a twelfth of 8,760 h):
//! five services at 99.9 % give 0.999⁵ ≈ 99.50 %, about 3.6 h a month.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::duration::Duration;
use crate::manifest::{Access, Changes, Dataset, Impact, Manifest, Policy, Strategy, Subscription};

/// Hours in the month used for downtime: 8,760 h a year / 12.
pub const HOURS_PER_MONTH: f64 = 730.0;

/// What to do with one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Keep a managed, read-only local copy.
    Duplicate,
    /// Do not copy: call the owner when the value is needed.
    CallOwner,
    /// Read it from the owner once, when the consumer's own record is
    /// written, and store it in that record.
    Snapshot,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Duplicate => "duplicate",
            Decision::CallOwner => "call owner",
            Decision::Snapshot => "snapshot into own record",
        }
    }
    /// The strategies that carry out this decision.
    fn fits(self, s: Strategy) -> bool {
        match self {
            Decision::Duplicate => s.copies(),
            Decision::CallOwner | Decision::Snapshot => s == Strategy::None,
        }
    }
}

/// A field's traits with defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Traits {
    pub critical: bool,
    /// How stale it may be; `None` when neither declared nor implied.
    pub tolerance: Option<Duration>,
    /// The owner marks the field must-be-current.
    pub owner_marks_current: bool,
    pub changes: Changes,
    pub access: Access,
    pub impact: Impact,
    /// `small`, a declared size such as `64KiB`, or `unbounded`.
    pub size: String,
    /// Over the large-field bound (or unbounded).
    pub large: bool,
    pub historical: bool,
    /// Traits not declared in the manifest, which took their default.
    pub defaulted: Vec<&'static str>,
}

/// The advice for one field of one subscription.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldAdvice {
    pub consumer: String,
    pub dataset: String,
    pub owner: String,
    pub field: String,
    /// The strategy the manifest declares today.
    pub strategy: Strategy,
    pub traits: Traits,
    pub decision: Decision,
    pub reason: String,
    /// Where the declared strategy or budget disagrees with the decision.
    pub flags: Vec<String>,
}

/// A subscription whose strategy cannot meet its staleness budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetFlag {
    pub consumer: String,
    pub dataset: String,
    pub strategy: Strategy,
    pub staleness_budget: Duration,
    pub message: String,
}

/// One service on a request path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hop {
    pub service: String,
    pub availability: f64,
    /// Still called synchronously once the declared copies are in place.
    pub synchronous_with_copies: bool,
    pub why: String,
}

/// The availability of a chain of synchronous services.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Availability {
    pub services: Vec<String>,
    pub availability: f64,
    pub downtime_hours_per_month: f64,
}

impl Availability {
    pub fn of(services: Vec<String>, availabilities: &[f64]) -> Self {
        let availability = chain_availability(availabilities.iter().copied());
        Availability {
            services,
            availability,
            downtime_hours_per_month: downtime_hours_per_month(availability),
        }
    }
}

/// A request path with synchronous calls and with copies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathAdvice {
    pub name: String,
    pub service: String,
    /// The serving service first, then each call in order.
    pub hops: Vec<Hop>,
    pub synchronous: Availability,
    pub with_copies: Availability,
}

/// Everything `spoke advise` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advice {
    pub fields: Vec<FieldAdvice>,
    pub budget_flags: Vec<BudgetFlag>,
    pub paths: Vec<PathAdvice>,
    pub hours_per_month: f64,
}

/// The availability of services called in a chain: the product of theirs.
pub fn chain_availability(availabilities: impl IntoIterator<Item = f64>) -> f64 {
    availabilities.into_iter().product()
}

/// Expected hours down per month (730 h) at `availability`.
pub fn downtime_hours_per_month(availability: f64) -> f64 {
    (1.0 - availability) * HOURS_PER_MONTH
}

/// Advises on a manifest.
pub fn advise(m: &Manifest) -> Advice {
    let mut fields = Vec::new();
    let mut budget_flags = Vec::new();
    for sub in &m.subscriptions {
        let Some(ds) = m.datasets.get(&sub.dataset) else {
            continue;
        };
        if let Some(message) = budget_problem(sub, &m.policy) {
            budget_flags.push(BudgetFlag {
                consumer: sub.consumer.clone(),
                dataset: sub.dataset.clone(),
                strategy: sub.strategy,
                staleness_budget: sub.staleness_budget,
                message,
            });
        }
        for field in &sub.fields {
            if ds.schema.fields.contains_key(field) {
                fields.push(advise_field(m, ds, sub, field));
            }
        }
    }
    let paths = m.paths.values().map(|p| advise_path(m, p)).collect();
    Advice {
        fields,
        budget_flags,
        paths,
        hours_per_month: HOURS_PER_MONTH,
    }
}

/// Applies defaults to the declared traits of `field`.
pub fn traits(m: &Manifest, ds: &Dataset, sub: &Subscription, field: &str) -> Traits {
    let declared = sub.traits.get(field).copied().unwrap_or_default();
    let mut defaulted = Vec::new();
    fn or_default<T>(
        v: Option<T>,
        name: &'static str,
        d: T,
        defaulted: &mut Vec<&'static str>,
    ) -> T {
        v.unwrap_or_else(|| {
            defaulted.push(name);
            d
        })
    }
    let critical = or_default(declared.critical, "critical", true, &mut defaulted);
    let changes = or_default(declared.changes, "changes", Changes::Rarely, &mut defaulted);
    let access = or_default(declared.access, "access", Access::Often, &mut defaulted);
    let impact = or_default(declared.impact, "impact", Impact::Ux, &mut defaulted);
    let historical = or_default(declared.historical, "historical", false, &mut defaulted);
    let owner_marks_current = ds.current.contains(field);
    let tolerance = if owner_marks_current {
        Some(Duration::default())
    } else if declared.tolerance.is_some() {
        declared.tolerance
    } else {
        defaulted.push("tolerance");
        sub.strategy.copies().then_some(sub.staleness_budget)
    };
    let size = ds.size_of(field);
    defaulted.sort_unstable();
    Traits {
        critical,
        tolerance,
        owner_marks_current,
        changes,
        access,
        impact,
        size: size.to_string(),
        large: size.is_large(&m.policy),
        historical,
        defaulted,
    }
}

/// The decision framework for one field's traits, with the reason.
pub fn decide(t: &Traits, policy: &Policy) -> (Decision, String) {
    use Decision::*;
    if t.historical {
        return (
            Snapshot,
            "a point-in-time fact: take it from the owner when your record is written and keep it there; later changes must not rewrite it".into(),
        );
    }
    if t.owner_marks_current {
        return (
            CallOwner,
            "the owner marks it must-be-current: any copy is stale by design".into(),
        );
    }
    if let Some(tol) = t.tolerance.filter(|tol| *tol < policy.budget_floor) {
        return (
            CallOwner,
            format!(
                "tolerates only {tol}, less than a copy can promise ({})",
                policy.budget_floor
            ),
        );
    }
    if t.impact >= Impact::Financial && t.changes >= Changes::Often {
        return (
            CallOwner,
            format!(
                "a stale value has {} impact and it changes {}",
                t.impact, t.changes
            ),
        );
    }
    if t.changes == Changes::Constantly {
        return (
            CallOwner,
            "it changes constantly: a copy would churn and still lag".into(),
        );
    }
    if t.large && t.access != Access::EveryRequest {
        return (
            CallOwner,
            format!(
                "large ({}) and not read on every request: fetch it when needed",
                t.size
            ),
        );
    }
    if !t.critical && t.access == Access::Rarely {
        return (
            CallOwner,
            "not needed for a critical operation and read rarely: call the owner when needed and degrade gracefully when it is down".into(),
        );
    }
    let tolerance = match t.tolerance {
        Some(tol) => format!("tolerates {tol}"),
        None => "tolerance not declared".into(),
    };
    let access = match t.access {
        Access::EveryRequest => "read on every request",
        Access::Often => "read often",
        Access::Rarely => "read rarely",
    };
    let impact = match t.impact {
        Impact::None => "harmless when stale",
        Impact::Ux => "a stale value only costs user experience",
        Impact::Financial => "a stale value costs money, but it changes rarely",
        Impact::Safety => "a stale value is a safety risk, but it changes rarely",
    };
    (
        Duplicate,
        format!(
            "{tolerance}, changes {}, {access}, {impact}: a local copy keeps the owner off the request path",
            t.changes
        ),
    )
}

fn advise_field(m: &Manifest, ds: &Dataset, sub: &Subscription, field: &str) -> FieldAdvice {
    let t = traits(m, ds, sub, field);
    let (decision, reason) = decide(&t, &m.policy);
    let owner = &ds.owner;
    let mut flags = Vec::new();
    if !decision.fits(sub.strategy) {
        flags.push(match decision {
            Decision::Duplicate => format!(
                "declared strategy none, but a copy would do: it would take {owner} off the request path"
            ),
            Decision::CallOwner => format!(
                "declared {}, but this field should be read from {owner} (strategy = \"none\")",
                sub.strategy.as_str()
            ),
            Decision::Snapshot => format!(
                "declared {}: a copy follows later changes, but a point-in-time fact belongs in {}'s own record (strategy = \"none\", snapshot at write time)",
                sub.strategy.as_str(),
                sub.consumer
            ),
        });
    }
    if sub.strategy.copies() && decision == Decision::Duplicate {
        if let Some(tol) = t.tolerance.filter(|tol| *tol < sub.staleness_budget) {
            flags.push(format!(
                "staleness budget {} is looser than this field's tolerance {tol}",
                sub.staleness_budget
            ));
        }
        if t.large {
            flags.push(format!(
                "large ({}): copies of it slow every apply, bootstrap and reconciliation; consider copying a summary",
                t.size
            ));
        }
    }
    FieldAdvice {
        consumer: sub.consumer.clone(),
        dataset: sub.dataset.clone(),
        owner: owner.clone(),
        field: field.to_owned(),
        strategy: sub.strategy,
        traits: t,
        decision,
        reason,
        flags,
    }
}

/// Why `sub`'s strategy cannot meet its staleness budget, if it cannot.
pub fn budget_problem(sub: &Subscription, policy: &Policy) -> Option<String> {
    let b = sub.staleness_budget;
    match sub.strategy {
        Strategy::Scheduled => match sub.interval {
            Some(i) if i > b => Some(format!(
                "a scheduled snapshot every {i} cannot meet a {b} budget"
            )),
            None => Some("scheduled with no interval: nothing bounds its staleness".into()),
            _ => None,
        },
        Strategy::Ttl => match sub.ttl {
            Some(t) if t > b => Some(format!("a ttl of {t} cannot meet a {b} budget")),
            None => Some("ttl with no ttl: nothing bounds its staleness".into()),
            _ => None,
        },
        Strategy::Events | Strategy::Cdc if b < policy.budget_floor => Some(format!(
            "a {b} budget is below the {} a copy following the feed can promise",
            policy.budget_floor
        )),
        _ => None,
    }
}

fn advise_path(m: &Manifest, p: &crate::manifest::RequestPath) -> PathAdvice {
    let availability = |s: &str| {
        m.services
            .get(s)
            .and_then(|s| s.availability)
            .unwrap_or(1.0)
    };
    let mut hops = vec![Hop {
        service: p.service.clone(),
        availability: availability(&p.service),
        synchronous_with_copies: true,
        why: "serves the request".into(),
    }];
    for callee in &p.calls {
        let subs: Vec<&Subscription> = m
            .subscriptions_of(&p.service)
            .filter(|s| {
                m.datasets
                    .get(&s.dataset)
                    .is_some_and(|d| d.owner == *callee)
            })
            .collect();
        let called: Vec<&Subscription> = subs
            .iter()
            .copied()
            .filter(|s| !s.strategy.copies())
            .collect();
        let (synchronous, why) = if subs.is_empty() {
            (
                true,
                format!(
                    "stays: no subscription says what {} reads from it (a command, such as a reservation or a charge)",
                    p.service
                ),
            )
        } else if called.is_empty() {
            let copies: Vec<String> = subs
                .iter()
                .map(|s| format!("{} ({})", s.dataset, s.strategy.as_str()))
                .collect();
            (
                false,
                format!(
                    "off the path: {} keeps copies of {}",
                    p.service,
                    copies.join(", ")
                ),
            )
        } else {
            let names: BTreeSet<&str> = called.iter().map(|s| s.dataset.as_str()).collect();
            (
                true,
                format!(
                    "stays: {} calls it for {} (strategy none)",
                    p.service,
                    names.into_iter().collect::<Vec<_>>().join(", ")
                ),
            )
        };
        hops.push(Hop {
            service: callee.clone(),
            availability: availability(callee),
            synchronous_with_copies: synchronous,
            why,
        });
    }
    let all: Vec<String> = hops.iter().map(|h| h.service.clone()).collect();
    let all_a: Vec<f64> = hops.iter().map(|h| h.availability).collect();
    let kept: Vec<&Hop> = hops.iter().filter(|h| h.synchronous_with_copies).collect();
    PathAdvice {
        name: p.name.clone(),
        service: p.service.clone(),
        synchronous: Availability::of(all, &all_a),
        with_copies: Availability::of(
            kept.iter().map(|h| h.service.clone()).collect(),
            &kept.iter().map(|h| h.availability).collect::<Vec<_>>(),
        ),
        hops,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &str = include_str!("../../../examples/shop/manifest.toml");

    fn shop() -> Manifest {
        Manifest::parse("shop.toml", SHOP).expect("the shop manifest is valid")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn five_services_at_three_nines_are_up_99_5_percent_and_down_3_6_hours_a_month() {
        let a = chain_availability([0.999; 5]);
        assert!(close(a, 0.995_009_990_004_999), "{a}");
        assert_eq!(format!("{:.1}", a * 100.0), "99.5");
        let h = downtime_hours_per_month(a);
        assert!((h - 3.642_707).abs() < 1e-5, "{h}");
        assert_eq!(format!("{h:.1}"), "3.6");
        // One service at 99.9 %: 0.73 h ≈ 44 minutes.
        assert!(close(downtime_hours_per_month(0.999), 0.73));
        assert!(close(chain_availability([]), 1.0), "no calls, no downtime");
        assert!(close(downtime_hours_per_month(1.0), 0.0));
    }

    fn t() -> Traits {
        Traits {
            critical: true,
            tolerance: Some(Duration::from_secs(3600)),
            owner_marks_current: false,
            changes: Changes::Rarely,
            access: Access::Often,
            impact: Impact::Ux,
            size: "small".into(),
            large: false,
            historical: false,
            defaulted: vec![],
        }
    }

    #[test]
    fn each_rule_of_the_framework_decides() {
        let p = Policy::default();
        let d = |t: Traits| decide(&t, &p).0;
        assert_eq!(d(t()), Decision::Duplicate);
        assert_eq!(
            d(Traits {
                historical: true,
                owner_marks_current: true,
                ..t()
            }),
            Decision::Snapshot,
            "a point-in-time fact is a snapshot even of must-be-current data"
        );
        assert_eq!(
            d(Traits {
                owner_marks_current: true,
                ..t()
            }),
            Decision::CallOwner
        );
        assert_eq!(
            d(Traits {
                tolerance: Some(Duration::from_millis(500)),
                ..t()
            }),
            Decision::CallOwner
        );
        assert_eq!(
            d(Traits {
                impact: Impact::Financial,
                changes: Changes::Often,
                ..t()
            }),
            Decision::CallOwner
        );
        assert_eq!(
            d(Traits {
                impact: Impact::Financial,
                changes: Changes::Rarely,
                ..t()
            }),
            Decision::Duplicate,
            "money at stake but it rarely changes: a copy with a budget is fine"
        );
        assert_eq!(
            d(Traits {
                changes: Changes::Constantly,
                ..t()
            }),
            Decision::CallOwner
        );
        assert_eq!(d(Traits { large: true, ..t() }), Decision::CallOwner);
        assert_eq!(
            d(Traits {
                large: true,
                access: Access::EveryRequest,
                ..t()
            }),
            Decision::Duplicate
        );
        assert_eq!(
            d(Traits {
                critical: false,
                access: Access::Rarely,
                ..t()
            }),
            Decision::CallOwner
        );
        assert_eq!(
            d(Traits {
                critical: false,
                ..t()
            }),
            Decision::Duplicate
        );
        let (_, why) = decide(&t(), &p);
        assert_eq!(why, "tolerates 1h, changes rarely, read often, a stale value only costs user experience: a local copy keeps the owner off the request path");
    }

    #[test]
    fn the_shop_duplicates_customers_snapshots_prices_and_calls_inventory_and_payment() {
        let a = advise(&shop());
        let got: Vec<(String, Decision)> = a
            .fields
            .iter()
            .map(|f| (format!("{}.{}", f.dataset, f.field), f.decision))
            .collect();
        assert_eq!(
            got,
            [
                ("customers.name".to_owned(), Decision::Duplicate),
                ("customers.email".to_owned(), Decision::Duplicate),
                ("products.name".to_owned(), Decision::Snapshot),
                ("products.unit_price_cents".to_owned(), Decision::Snapshot),
                ("stock.available".to_owned(), Decision::CallOwner),
                ("payment_methods.status".to_owned(), Decision::CallOwner),
                ("products.name".to_owned(), Decision::Duplicate),
                ("products.category".to_owned(), Decision::Duplicate),
                ("categories.name".to_owned(), Decision::Duplicate),
            ]
        );
        for f in &a.fields {
            assert_eq!(
                f.flags,
                Vec::<String>::new(),
                "{}.{}: the shop follows its advice",
                f.dataset,
                f.field
            );
        }
        assert_eq!(a.budget_flags, []);
        let name = &a.fields[0];
        assert_eq!(name.traits.tolerance, Some(Duration::from_secs(86_400)));
        assert_eq!(name.traits.defaulted, ["critical", "historical"]);
        assert!(
            a.fields[4].reason.contains("must-be-current"),
            "{}",
            a.fields[4].reason
        );
    }

    #[test]
    fn checkout_with_copies_drops_customer_service_from_the_chain() {
        let a = advise(&shop());
        let p = &a.paths[0];
        assert_eq!(p.name, "checkout");
        assert_eq!(p.synchronous.services.len(), 5);
        assert!(close(p.synchronous.availability, 0.999f64.powi(5)));
        assert_eq!(
            format!("{:.1}", p.synchronous.downtime_hours_per_month),
            "3.6"
        );
        assert_eq!(
            p.with_copies.services,
            [
                "order-service",
                "catalog-service",
                "inventory-service",
                "payment-service"
            ]
        );
        assert!(close(p.with_copies.availability, 0.999f64.powi(4)));
        assert_eq!(
            format!("{:.1}", p.with_copies.downtime_hours_per_month),
            "2.9"
        );
        let customer = &p.hops[1];
        assert!(!customer.synchronous_with_copies);
        assert_eq!(
            customer.why,
            "off the path: order-service keeps copies of customers (events)"
        );
        assert_eq!(
            p.hops[3].why,
            "stays: order-service calls it for stock (strategy none)"
        );
    }

    #[test]
    fn mismatched_strategies_and_budgets_are_flagged() {
        let src = SHOP
            .replace(
                "strategy = \"events\"\nstaleness_budget = \"1h\"",
                "strategy = \"none\"",
            )
            .replace(
                "consumer = \"order-service\"\ndataset = \"stock\"\nfields = [\"available\"]\nstrategy = \"none\"",
                "consumer = \"order-service\"\ndataset = \"stock\"\nfields = [\"available\"]\nstrategy = \"scheduled\"\ninterval = \"1h\"\nstaleness_budget = \"1m\"\nsnapshot_url = \"http://inventory-service/v1/stock\"",
            );
        // Copying must-be-current stock on an hourly schedule breaks check,
        // and advise still explains what is wrong.
        let report = Manifest::check("m.toml", &src);
        assert!(!report.is_valid());
        let a = advise(report.manifest.as_ref().expect("resolves"));
        let name = &a.fields[0];
        assert_eq!(name.decision, Decision::Duplicate);
        assert_eq!(name.flags, ["declared strategy none, but a copy would do: it would take customer-service off the request path"]);
        let stock = a.fields.iter().find(|f| f.dataset == "stock").unwrap();
        assert_eq!(stock.flags, ["declared scheduled, but this field should be read from inventory-service (strategy = \"none\")"]);
        assert_eq!(a.budget_flags.len(), 1);
        assert_eq!(
            a.budget_flags[0].message,
            "a scheduled snapshot every 1h cannot meet a 1m budget"
        );
        // Customers are called now and stock is copied: the chain changes.
        assert_eq!(
            a.paths[0].with_copies.services,
            [
                "order-service",
                "customer-service",
                "catalog-service",
                "payment-service"
            ]
        );
    }
}
