//! `spoke check MANIFEST`.

use std::path::Path;
use std::process::ExitCode;

use spoke_core::Manifest;

pub fn run(path: &Path, json: bool) -> ExitCode {
    match Manifest::load(path) {
        Ok(m) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "file": path.display().to_string(), "valid": true, "problems": [] })
                );
            } else {
                println!(
                    "{}: ok ({} services, {} datasets, {} subscriptions)",
                    path.display(),
                    m.services.len(),
                    m.datasets.len(),
                    m.subscriptions.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                let problems: Vec<_> = e
                    .problems
                    .iter()
                    .map(|p| serde_json::json!({ "line": p.line, "message": p.message }))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "file": e.file, "valid": false, "problems": problems })
                );
            } else {
                println!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}
