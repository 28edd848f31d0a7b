//! `spoke advise MANIFEST [--json]`: the decision framework per consumer
//! field and the availability of each request path. Every decision is made
//! by `spoke_core::advise`; this module only prints.
//!
//! Exit 0 when the manifest passes `spoke check`; 1 when it has errors (the
//! advice is still printed when the manifest resolves, followed by them).

use std::fmt::Write;
use std::path::Path;
use std::process::ExitCode;

use comfy_table::{presets::UTF8_BORDERS_ONLY, ContentArrangement, Table};
use spoke_core::advise::{self, Advice, FieldAdvice, PathAdvice, HOURS_PER_MONTH};
use spoke_core::Manifest;

/// Table width when stdout is not a terminal.
const PIPE_WIDTH: u16 = 200;

pub fn run(path: &Path, json: bool) -> ExitCode {
    let report = Manifest::check_file(path);
    let advice = report.manifest.as_ref().map(advise::advise);
    if json {
        let mut doc = super::check::to_json(&report);
        if let (Some(a), Some(obj)) = (&advice, doc.as_object_mut()) {
            if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(a) {
                obj.extend(fields);
            }
        }
        println!("{doc}");
    } else {
        if let Some(a) = &advice {
            print!("{}", to_text(&report.file, a));
        }
        if !report.problems.is_empty() {
            if advice.is_some() {
                println!("\n`spoke check` finds:");
            }
            print!("{}", super::check::to_text(&report));
        }
    }
    if report.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    if t.width().is_none() {
        t.set_width(PIPE_WIDTH);
    }
    t
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A trait's value, starred when it was not declared.
fn cell(f: &FieldAdvice, name: &str, value: String) -> String {
    if f.traits.defaulted.contains(&name) {
        format!("{value}*")
    } else {
        value
    }
}

fn percent(a: f64) -> String {
    format!("{:.3} %", a * 100.0)
}

fn downtime(hours: f64) -> String {
    if hours >= 1.0 {
        format!("{hours:.1} h")
    } else {
        format!("{:.0} min", hours * 60.0)
    }
}

pub fn to_text(file: &str, a: &Advice) -> String {
    let mut out = String::new();
    if !a.fields.is_empty() {
        let _ = writeln!(
            out,
            "{file}: what each consumer should do with each field it wants"
        );
        let mut t = table(&[
            "consumer",
            "field",
            "critical",
            "tolerance",
            "changes",
            "access",
            "impact",
            "size",
            "historical",
            "strategy",
            "decision",
        ]);
        for f in &a.fields {
            let tr = &f.traits;
            let tolerance = if tr.owner_marks_current {
                "must be current".to_owned()
            } else {
                // Unknown: not declared, and nothing implies it.
                tr.tolerance
                    .map_or("-".to_owned(), |d| cell(f, "tolerance", d.to_string()))
            };
            let size = if tr.large {
                format!("{} (large)", tr.size)
            } else {
                tr.size.clone()
            };
            t.add_row(vec![
                f.consumer.clone(),
                format!("{}.{}", f.dataset, f.field),
                cell(f, "critical", yes_no(tr.critical).into()),
                tolerance,
                cell(f, "changes", tr.changes.to_string()),
                cell(f, "access", tr.access.to_string()),
                cell(f, "impact", tr.impact.to_string()),
                size,
                cell(f, "historical", yes_no(tr.historical).into()),
                f.strategy.as_str().to_owned(),
                f.decision.as_str().to_owned(),
            ]);
        }
        let _ = writeln!(out, "{t}");
        let _ = writeln!(
            out,
            "* not declared in the manifest: the default (declare it under the subscription's traits)"
        );
        let _ = writeln!(out, "\nWhy:");
        for f in &a.fields {
            let _ = writeln!(
                out,
                "  {} ← {}.{}: {} — {}",
                f.consumer,
                f.dataset,
                f.field,
                f.decision.as_str(),
                f.reason
            );
        }
        let flagged: Vec<&FieldAdvice> = a.fields.iter().filter(|f| !f.flags.is_empty()).collect();
        if !flagged.is_empty() {
            let _ = writeln!(out, "\nDeclared strategies that disagree with the advice:");
            for f in flagged {
                for flag in &f.flags {
                    let _ = writeln!(out, "  ! {}→{}.{}: {flag}", f.consumer, f.dataset, f.field);
                }
            }
        }
    }
    if !a.budget_flags.is_empty() {
        let _ = writeln!(out, "\nStrategies that cannot meet their staleness budget:");
        for b in &a.budget_flags {
            let _ = writeln!(
                out,
                "  ! {}→{} ({}, budget {}): {}",
                b.consumer,
                b.dataset,
                b.strategy.as_str(),
                b.staleness_budget,
                b.message
            );
        }
    }
    for p in &a.paths {
        out.push('\n');
        out.push_str(&path_text(p));
    }
    if !a.paths.is_empty() {
        let _ = writeln!(
            out,
            "\nDowntime assumes a month of {HOURS_PER_MONTH} h (8,760 h a year / 12)."
        );
    }
    out
}

fn path_text(p: &PathAdvice) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Request path {} (served by {}):", p.name, p.service);
    let mut t = table(&["service", "availability", "with copies"]);
    for h in &p.hops {
        t.add_row(vec![
            h.service.clone(),
            percent(h.availability),
            h.why.clone(),
        ]);
    }
    let _ = writeln!(out, "{t}");
    for (label, chain) in [
        ("synchronous calls", &p.synchronous),
        ("with copies", &p.with_copies),
    ] {
        let _ = writeln!(
            out,
            "  {label:<17}  {} service{}: {} up, {} down a month",
            chain.services.len(),
            if chain.services.len() == 1 { "" } else { "s" },
            percent(chain.availability),
            downtime(chain.downtime_hours_per_month),
        );
    }
    out
}
