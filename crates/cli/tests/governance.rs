//! Issue 5, governance: `spoke check` enforces every rule of the manifest
//! with `file:line`, a fix hint, exit 1 on errors (warnings alone exit 0),
//! and `--json` for CI; `spoke advise` explains per field whether to
//! duplicate, call the owner or snapshot, and what copies do to a request
//! path's availability.
//!
//! The corpus is `tests/manifests/governance/`, one file per rule, each with
//! its exact output. The binary runs in the corpus folder so the file names
//! in the output are stable.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/governance")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `spoke` with `args` in `cwd`; returns (exit code, stdout, stderr).
fn run_in(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(args)
        .current_dir(cwd)
        .env_remove("SPOKE_LOG")
        .output()
        .expect("spoke runs");
    (
        out.status.code().expect("spoke exited normally"),
        String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    )
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("output is not JSON ({e}): {stdout}"))
}

struct Case {
    file: &'static str,
    /// 1 on any error; 0 with warnings alone.
    exit: i32,
    /// The rules the problems break, as `--json` names them.
    rules: &'static [&'static str],
    /// The exact text output, line by line.
    output: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            file: "budget_below_floor.toml",
            exit: 0,
            rules: &["budget"],
            output: &[
                r#"budget_below_floor.toml:17: warning: subscription order-service→customers: staleness budget 200ms is below the 1s a copy following the feed (events) can promise; expect budget breaches (fix: raise staleness_budget to at least 1s, call the owner with strategy = "none", or lower [policy] budget_floor if your feed is measured faster)"#,
                r#"budget_below_floor.toml: ok (2 services, 1 dataset, 1 subscription, 1 warning)"#,
            ],
        },
        Case {
            file: "copy_of_copy.toml",
            exit: 1,
            rules: &["copy-of-copy"],
            output: &[
                r#"copy_of_copy.toml:27: subscription shipping-service→customers reads order-service's copy of customers, a copy of a copy: customer-service → order-service → shipping-service (fix: subscribe to the owner's feed: remove source, or set source = "customer-service")"#,
            ],
        },
        Case {
            file: "derivation_cycle.toml",
            exit: 1,
            rules: &["cycle"],
            output: &[
                r#"derivation_cycle.toml:19: datasets derive from themselves in a cycle: invoices derives from orders, which derives from invoices; a change would echo around it (fix: remove orders from the derived_from of invoices, or let one owner keep its own data)"#,
            ],
        },
        Case {
            file: "grants.toml",
            exit: 1,
            rules: &["grant"],
            output: &[
                r#"grants.toml:12: dataset customers: private names 'iban', which is not one of its fields (fix: list fields of customers: email, name, payment_method_id and preferred_name)"#,
                r#"grants.toml:13: dataset customers: grants 'phone' to order-service, but customers has no field 'phone' (fix: grant fields of customers: email, name, payment_method_id and preferred_name)"#,
                r#"grants.toml:13: dataset customers: grants name 'payment-service', which is not a declared service (fix: declare [services.payment-service], or remove the grant)"#,
                r#"grants.toml:13: warning: dataset customers grants 'email' to order-service, but 'email' is not private: every subscriber may read it (fix: add 'email' to private, or remove the grant)"#,
            ],
        },
        Case {
            file: "large_field.toml",
            exit: 0,
            rules: &["large-field"],
            output: &[
                r#"large_field.toml:20: warning: subscription search-service→products copies 'description', declared 64KiB, over the 4KiB bound for copied fields; large fields slow every apply, bootstrap and reconciliation (fix: copy an id or a summary and fetch 'description' from catalog-service when needed, or raise [policy] large_field)"#,
                r#"large_field.toml:20: warning: subscription search-service→products copies 'attributes', a json field with no declared size: its size is unbounded (fix: declare its size in [datasets.products], e.g. sizes = { attributes = "2KiB" }, or fetch it from catalog-service when needed)"#,
                r#"large_field.toml: ok (4 services, 1 dataset, 1 subscription, 2 warnings)"#,
            ],
        },
        Case {
            file: "lineage.toml",
            exit: 1,
            rules: &["lineage"],
            output: &[
                r#"lineage.toml:16: dataset orders derives from customers, but its owner order-service has no subscription to customers (fix: declare how order-service reads customers: a subscription with strategy = "none" if it snapshots facts into orders when it writes them)"#,
                r#"lineage.toml:16: dataset orders: derived_from names 'carts', which is not a declared dataset (fix: name a declared dataset: customers)"#,
            ],
        },
        Case {
            file: "must_be_current.toml",
            exit: 1,
            rules: &["must-be-current"],
            output: &[
                r#"must_be_current.toml:18: subscription order-service→stock copies 'available' with strategy events, but inventory-service marks 'available' must-be-current (fix: remove 'available' from fields and call inventory-service for it, or set strategy = "none")"#,
            ],
        },
        Case {
            file: "paths.toml",
            exit: 1,
            rules: &["availability", "path"],
            output: &[
                r#"paths.toml:22: path checkout calls 'inventory-service', which is not a declared service (fix: declare it with [services.inventory-service], or name a declared service)"#,
                r#"paths.toml:22: path checkout calls customer-service twice (fix: list each service once)"#,
                r#"paths.toml:22: path checkout involves payment-service, which declares no availability (fix: add availability = 0.999, or its measured value, under [services.payment-service])"#,
                r#"paths.toml:24: path refund has no service (fix: add service = "<service>", the service that serves the request)"#,
                r#"paths.toml:25: path refund involves payment-service, which declares no availability (fix: add availability = 0.999, or its measured value, under [services.payment-service])"#,
            ],
        },
        Case {
            file: "policy.toml",
            exit: 1,
            rules: &["policy"],
            output: &[
                r#"policy.toml:3: policy budget_floor: invalid duration 'fast': a number must come before each unit (expected e.g. 250ms, 30s, 5m, 1h, 7d) (fix: e.g. budget_floor = "1s")"#,
                r#"policy.toml:4: policy large_field: invalid size 'huge': a number must come first (expected e.g. 512B, 16KiB, 2MB) (fix: e.g. large_field = "4KiB")"#,
            ],
        },
        Case {
            file: "private_field.toml",
            exit: 1,
            rules: &["private-field"],
            output: &[
                r#"private_field.toml:19: subscription order-service→customers projects private field 'payment_method_id', which customer-service grants only to payment-service (fix: remove 'payment_method_id' from fields, or have customer-service add grants = { "order-service" = ["payment_method_id"] })"#,
            ],
        },
        Case {
            file: "republished_copy.toml",
            exit: 1,
            rules: &["copy-of-copy"],
            output: &[
                r#"republished_copy.toml:19: dataset customer_directory (owner order-service) re-publishes order-service's copy of customers, owned by customer-service; a copy is never a source: customer-service → order-service → customer_directory (fix: let consumers of customer_directory subscribe to customers from customer-service; keep only order-service's own data and point-in-time snapshots in customer_directory)"#,
                r#"republished_copy.toml:30: subscription shipping-service→customer_directory reads a copy of a copy, because customer_directory re-publishes order-service's copy of customers: customer-service → order-service → shipping-service (fix: subscribe to customers from its owner customer-service instead)"#,
            ],
        },
        Case {
            file: "scheduled_over_budget.toml",
            exit: 1,
            rules: &["budget"],
            output: &[
                r#"scheduled_over_budget.toml:17: subscription order-service→customers: a scheduled snapshot every 1h cannot meet the staleness budget 1m (just before a run the copy is up to 1h old) (fix: set interval to at most 1m, raise staleness_budget to 1h, or follow the feed with strategy = "events")"#,
            ],
        },
        Case {
            file: "source_cycle.toml",
            exit: 1,
            rules: &["cycle"],
            output: &[
                r#"source_cycle.toml:20: subscription order-service→customers reads from shipping-service, and the chain loops without reaching the owner of customers (customer-service): order-service reads from shipping-service, which reads from order-service (fix: subscribe to the owner's feed: remove source, or set source = "customer-service")"#,
                r#"source_cycle.toml:28: subscription shipping-service→customers reads from order-service, and the chain loops without reaching the owner of customers (customer-service): shipping-service reads from order-service, which reads from shipping-service (fix: subscribe to the owner's feed: remove source, or set source = "customer-service")"#,
            ],
        },
        Case {
            file: "source_without_copy.toml",
            exit: 1,
            rules: &["copy-of-copy"],
            output: &[
                r#"source_without_copy.toml:20: subscription shipping-service→customers reads from order-service, which neither owns customers (customer-service does) nor keeps a copy of it (fix: subscribe to the owner's feed: remove source, or set source = "customer-service")"#,
            ],
        },
        Case {
            file: "strategy_settings.toml",
            exit: 1,
            rules: &["strategy"],
            output: &[
                r#"strategy_settings.toml:14: subscription order-service→customers: strategy scheduled needs interval (fix: add interval = "15m": how often the snapshot runs, at most the staleness budget)"#,
                r#"strategy_settings.toml:14: subscription order-service→customers: strategy scheduled needs snapshot_url or snapshot_sql, where the agent reads the owner's snapshot (fix: add snapshot_url = "http://customer-service:8080/v1/customers" (the owner's paged listing), or snapshot_sql = "SELECT id AS key, version, name, email FROM customers" (with [agent.owner_postgres] in the deployment config))"#,
                r#"strategy_settings.toml:27: subscription shipping-service→customers: ttl applies only to strategy = "ttl" (this one is events) (fix: remove ttl, or set strategy = "ttl")"#,
            ],
        },
        Case {
            file: "traits.toml",
            exit: 1,
            rules: &["traits"],
            output: &[
                r#"traits.toml:19: subscription order-service→customers, traits of name: unknown changes 'hourly' (expected never, rarely, often or constantly) (fix: e.g. changes = "rarely")"#,
                r#"traits.toml:20: subscription order-service→customers, traits of email: unknown impact 'money' (expected none, ux, financial or safety) (fix: e.g. impact = "ux")"#,
                r#"traits.toml:20: subscription order-service→customers, traits of email: tolerance: invalid duration 'a while': a number must come before each unit (expected e.g. 250ms, 30s, 5m, 1h, 7d) (fix: e.g. tolerance = "1h": how stale the value may be for this use, "0s" when it must be current)"#,
                r#"traits.toml:21: subscription order-service→customers declares traits for 'phone', which it does not project (fix: add 'phone' to fields, or remove its traits)"#,
            ],
        },
        Case {
            file: "ttl_over_budget.toml",
            exit: 1,
            rules: &["budget"],
            output: &[
                r#"ttl_over_budget.toml:17: subscription order-service→customers: a cache entry kept for ttl 10m cannot meet the staleness budget 5m (it is served up to 10m after it was read) (fix: set ttl to at most 5m, or raise staleness_budget to 10m)"#,
            ],
        },
        Case {
            file: "two_owners.toml",
            exit: 1,
            rules: &["owner"],
            output: &[
                r#"two_owners.toml:8: dataset customers names 2 owners (customer-service and order-service); a dataset has exactly one owner (fix: keep the one service that writes it as owner; the others subscribe to its feed)"#,
            ],
        },
    ]
}

#[test]
fn every_rule_has_a_manifest_with_its_exact_problems_and_exit_code() {
    let dir = corpus();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("corpus folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    files.sort();
    let cases = cases();
    let covered: Vec<&str> = cases.iter().map(|c| c.file).collect();
    assert_eq!(
        files, covered,
        "every manifest in the corpus has an expected output, and every expectation a file"
    );
    for c in cases {
        let (code, stdout, stderr) = run_in(&dir, &["check", c.file]);
        assert_eq!(
            code, c.exit,
            "{}: exit code\nstdout: {stdout}\nstderr: {stderr}",
            c.file
        );
        let got: Vec<&str> = stdout.lines().collect();
        assert_eq!(got, c.output, "{}: output", c.file);
        for line in got {
            assert!(
                line.starts_with(&format!("{}:", c.file)),
                "{}: every line starts with the file: {line}",
                c.file
            );
        }
    }
}

#[test]
fn json_names_line_severity_rule_message_and_hint_of_each_problem() {
    let dir = corpus();
    for c in cases() {
        let (code, stdout, _) = run_in(&dir, &["check", "--json", c.file]);
        assert_eq!(code, c.exit, "{}", c.file);
        let v = json(&stdout);
        assert_eq!(v["file"], c.file);
        assert_eq!(v["valid"], c.exit == 0, "{}", c.file);
        let problems = v["problems"].as_array().expect("problems array");
        let mut rules: Vec<&str> = problems
            .iter()
            .map(|p| p["rule"].as_str().expect("rule"))
            .collect();
        rules.sort_unstable();
        rules.dedup();
        assert_eq!(rules, c.rules, "{}", c.file);
        // The JSON carries exactly what the text shows.
        let rendered: Vec<String> = problems
            .iter()
            .map(|p| {
                let severity = p["severity"].as_str().expect("severity");
                assert!(severity == "error" || severity == "warning", "{p}");
                let hint = p["hint"].as_str().expect("hint");
                assert!(
                    !hint.is_empty(),
                    "{}: every problem has a fix hint: {p}",
                    c.file
                );
                format!(
                    "{}:{}: {}{} (fix: {hint})",
                    c.file,
                    p["line"].as_u64().expect("line"),
                    if severity == "warning" {
                        "warning: "
                    } else {
                        ""
                    },
                    p["message"].as_str().expect("message"),
                )
            })
            .collect();
        let problem_lines: Vec<&str> = c
            .output
            .iter()
            .copied()
            .filter(|l| !l.starts_with(&format!("{}: ok", c.file)))
            .collect();
        assert_eq!(rendered, problem_lines, "{}", c.file);
    }
}

#[test]
fn the_shop_passes_every_rule_without_warnings() {
    let (code, stdout, stderr) = run_in(&root(), &["check", "examples/shop/manifest.toml"]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(
        stdout,
        "examples/shop/manifest.toml: ok (6 services, 5 datasets, 6 subscriptions, 1 path)\n"
    );
}

#[test]
fn advise_on_the_shop_duplicates_customers_snapshots_prices_and_calls_inventory_and_payment() {
    let (code, stdout, stderr) = run_in(
        &root(),
        &["advise", "--json", "examples/shop/manifest.toml"],
    );
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let v = json(&stdout);
    assert_eq!(v["valid"], true);
    assert_eq!(v["hours_per_month"], 730.0);
    let decisions: Vec<(String, String)> = v["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .map(|f| {
            (
                format!(
                    "{}.{}",
                    f["dataset"].as_str().unwrap(),
                    f["field"].as_str().unwrap()
                ),
                f["decision"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("customers.name", "duplicate"),
        ("customers.email", "duplicate"),
        ("products.name", "snapshot"),
        ("products.unit_price_cents", "snapshot"),
        ("stock.available", "call-owner"),
        ("payment_methods.status", "call-owner"),
        ("products.name", "duplicate"),
        ("products.category", "duplicate"),
        ("categories.name", "duplicate"),
    ];
    assert_eq!(
        decisions,
        expected.map(|(f, d)| (f.to_owned(), d.to_owned())),
    );
    for f in v["fields"].as_array().unwrap() {
        let consumer = if f["dataset"] == "products" && f["strategy"] == "cdc" {
            "storefront"
        } else {
            "order-service"
        };
        assert_eq!(f["consumer"], consumer);
        assert_eq!(
            f["flags"],
            serde_json::json!([]),
            "the shop follows the advice: {f}"
        );
        assert!(!f["reason"].as_str().unwrap().is_empty());
    }
    assert_eq!(v["budget_flags"], serde_json::json!([]));
    let checkout = &v["paths"][0];
    assert_eq!(checkout["name"], "checkout");
    let sync = checkout["synchronous"]["availability"].as_f64().unwrap();
    assert!((sync - 0.999f64.powi(5)).abs() < 1e-12, "{sync}");
    let down = checkout["synchronous"]["downtime_hours_per_month"]
        .as_f64()
        .unwrap();
    assert!(
        (down - 3.6427).abs() < 1e-3,
        "0.999^5 is down about 3.6 h a month: {down}"
    );
    assert_eq!(
        checkout["with_copies"]["services"],
        serde_json::json!([
            "order-service",
            "catalog-service",
            "inventory-service",
            "payment-service"
        ])
    );
    let copies = checkout["with_copies"]["availability"].as_f64().unwrap();
    assert!((copies - 0.999f64.powi(4)).abs() < 1e-12, "{copies}");
}

#[test]
fn advise_prints_the_table_the_reasons_and_the_availability() {
    let (code, stdout, _) = run_in(&root(), &["advise", "examples/shop/manifest.toml"]);
    assert_eq!(code, 0, "{stdout}");
    let row = |field: &str, decision: &str| {
        stdout
            .lines()
            .any(|l| l.contains(&format!(" {field} ")) && l.contains(decision))
    };
    assert!(row("customers.name", "duplicate"), "{stdout}");
    assert!(row("customers.email", "duplicate"), "{stdout}");
    assert!(row("stock.available", "call owner"), "{stdout}");
    assert!(row("payment_methods.status", "call owner"), "{stdout}");
    for line in [
        "  order-service ← customers.name: duplicate — tolerates 1d, changes rarely, read on every request, a stale value only costs user experience: a local copy keeps the owner off the request path",
        "  order-service ← products.unit_price_cents: snapshot into own record — a point-in-time fact: take it from the owner when your record is written and keep it there; later changes must not rewrite it",
        "  order-service ← stock.available: call owner — the owner marks it must-be-current: any copy is stale by design",
        "Request path checkout (served by order-service):",
        "  synchronous calls  5 services: 99.501 % up, 3.6 h down a month",
        "  with copies        4 services: 99.601 % up, 2.9 h down a month",
        "Downtime assumes a month of 730 h (8,760 h a year / 12).",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing line {line:?} in\n{stdout}");
    }
    assert!(
        stdout.lines().any(|l| l.contains("customer-service")
            && l.contains("off the path: order-service keeps copies of customers (events)")),
        "{stdout}"
    );
}

#[test]
fn advise_flags_a_strategy_that_cannot_meet_its_budget_and_exits_1() {
    let (code, stdout, _) = run_in(&corpus(), &["advise", "scheduled_over_budget.toml"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("  ! order-service→customers (scheduled, budget 1m): a scheduled snapshot every 1h cannot meet a 1m budget"),
        "{stdout}"
    );
    assert!(stdout.contains("`spoke check` finds:"), "{stdout}");
    assert!(
        stdout.contains("scheduled_over_budget.toml:17: subscription order-service→customers: a scheduled snapshot every 1h cannot meet the staleness budget 1m"),
        "{stdout}"
    );
    let (code, stdout, _) = run_in(
        &corpus(),
        &["advise", "--json", "scheduled_over_budget.toml"],
    );
    assert_eq!(code, 1);
    let v = json(&stdout);
    assert_eq!(v["valid"], false);
    assert_eq!(v["budget_flags"][0]["staleness_budget"], "1m");
    assert_eq!(v["problems"][0]["rule"], "budget");
}

#[test]
fn advise_on_a_manifest_that_does_not_resolve_prints_only_its_problems() {
    let dir = corpus().join("..");
    let (code, stdout, _) = run_in(&dir, &["advise", "toml_syntax_error.toml"]);
    assert_eq!(code, 1);
    assert_eq!(
        stdout,
        "toml_syntax_error.toml:8: invalid basic string (fix: correct the TOML syntax on this line)\n"
    );
    let (code, stdout, _) = run_in(&dir, &["advise", "--json", "unknown_owner.toml"]);
    assert_eq!(code, 1);
    let v = json(&stdout);
    assert_eq!(v["valid"], false);
    assert!(
        v.get("fields").is_none(),
        "no advice without a resolved manifest: {v}"
    );
}
