//! `spoke check MANIFEST [--json]`: every rule, one line per problem.
//!
//! Text: `file:line: problem (fix: hint)`, warnings as
//! `file:line: warning: problem (fix: hint)`, then, when there is no error,
//! `file: ok (…)`. Exit 1 on any error; warnings alone exit 0.
//!
//! `--json`: `{"file", "valid", "problems": [{"line", "severity", "rule",
//! "message", "hint"}]}` for CI.

use std::path::Path;
use std::process::ExitCode;

use spoke_core::manifest::Report;
use spoke_core::Manifest;

pub fn run(path: &Path, json: bool) -> ExitCode {
    let report = Manifest::check_file(path);
    if json {
        println!("{}", to_json(&report));
    } else {
        print!("{}", to_text(&report));
    }
    if report.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The `--json` document (also embedded in `spoke advise --json`).
pub fn to_json(report: &Report) -> serde_json::Value {
    serde_json::json!({
        "file": report.file,
        "valid": report.is_valid(),
        "problems": report.problems,
    })
}

/// One line per problem, then the summary when valid.
pub fn to_text(report: &Report) -> String {
    let mut out = String::new();
    for p in &report.problems {
        out.push_str(&p.render(&report.file));
        out.push('\n');
    }
    if let (true, Some(m)) = (report.is_valid(), &report.manifest) {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut summary = vec![
            plural(m.services.len(), "service"),
            plural(m.datasets.len(), "dataset"),
            plural(m.subscriptions.len(), "subscription"),
        ];
        if !m.paths.is_empty() {
            summary.push(plural(m.paths.len(), "path"));
        }
        let warnings = report.warnings().count();
        if warnings > 0 {
            summary.push(plural(warnings, "warning"));
        }
        out.push_str(&format!("{}: ok ({})\n", report.file, summary.join(", ")));
    }
    out
}
