//! Rule 8 at the command line: broken manifests, flags and configs get a
//! clear error that says what and where, and a non-zero exit.
//!
//! `spoke check` runs on a corpus of manifests in `tests/manifests/`, one
//! file per rule, each with its exact `file:line: problem` output. The
//! binary runs with the corpus folder as its working directory so the file
//! names in the output are stable.

use std::path::{Path, PathBuf};
use std::process::Command;

fn spoke() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spoke"))
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests")
}

/// Runs `spoke` with `args` in `cwd`; returns (exit code, stdout, stderr).
fn run_in(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = spoke()
        .args(args)
        .current_dir(cwd)
        .env_remove("SPOKE_LOG")
        .output()
        .expect("spoke runs");
    (
        out.status
            .code()
            .expect("spoke exited normally, not by a signal"),
        String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    )
}

const TYPES: &str = "(expected string, int, float, bool, timestamp or json, with '?' for optional)";

/// (file, its exact `spoke check` output): `file:line: problem (fix: hint)`.
/// The fix hints were added with the governance rules (issue 5); the
/// problems themselves kept their text, except that hints which used to be
/// part of a message (`(add [services.x])`) moved into the hint.
fn cases() -> Vec<(&'static str, String)> {
    vec![
        (
            "unknown_owner.toml",
            "unknown_owner.toml:7: dataset customers: owner 'ghost-service' is not a declared service (fix: declare it with [services.ghost-service], or name a declared service)".into(),
        ),
        (
            "unknown_consumer.toml",
            "unknown_consumer.toml:12: subscription consumer 'ghost-service' is not a declared service (fix: declare it with [services.ghost-service], or name a declared service)".into(),
        ),
        (
            "unknown_dataset.toml",
            "unknown_dataset.toml:13: subscription dataset 'clients' is not a declared dataset (fix: declare [datasets.clients], or name a declared dataset: customers)".into(),
        ),
        (
            "unknown_projected_field.toml",
            "unknown_projected_field.toml:14: subscription order-service→customers projects field 'nickname', which customers (schema v1) does not have (fix: remove 'nickname', or project fields customers has: email, name, payment_method_id and preferred_name)".into(),
        ),
        (
            "self_subscription.toml",
            "self_subscription.toml:12: service customer-service subscribes to its own dataset customers; an owner reads its own data directly (fix: remove this subscription)".into(),
        ),
        (
            "bad_type.toml",
            format!("bad_type.toml:9: dataset customers, field payment_method_id: unknown field type 'integer' {TYPES} (fix: e.g. payment_method_id = \"string\", or \"string?\" when it may be missing)"),
        ),
        (
            "bad_budget.toml",
            "bad_budget.toml:16: staleness_budget: invalid duration 'an hour': a number must come before each unit (expected e.g. 250ms, 30s, 5m, 1h, 7d) (fix: e.g. staleness_budget = \"5m\")".into(),
        ),
        (
            "bad_strategy.toml",
            "bad_strategy.toml:15: unknown strategy 'sometimes' (expected events, cdc, scheduled, ttl or none) (fix: e.g. strategy = \"events\" to follow the owner's feed)".into(),
        ),
        (
            "toml_syntax_error.toml",
            "toml_syntax_error.toml:8: invalid basic string (fix: correct the TOML syntax on this line)".into(),
        ),
        (
            "unknown_key.toml",
            "unknown_key.toml:2: unknown field `colour`, expected `availability` (fix: remove the key or correct its spelling)".into(),
        ),
        (
            "duplicate_subscription.toml",
            "duplicate_subscription.toml:19: order-service subscribes to customers twice; keep one subscription per consumer and dataset (fix: merge them into one subscription with every field it needs)".into(),
        ),
        (
            "several_problems.toml",
            [
                format!("several_problems.toml:7: dataset customers, field email: unknown field type 'strin' {TYPES} (fix: e.g. email = \"string\", or \"string?\" when it may be missing)"),
                "several_problems.toml:12: subscription order-service→customers projects field 'phone', which customers (schema v1) does not have (fix: remove 'phone', or project fields customers has: name)".into(),
                "several_problems.toml:14: staleness_budget: invalid duration '1x': unknown unit (expected e.g. 250ms, 30s, 5m, 1h, 7d) (fix: e.g. staleness_budget = \"5m\")".into(),
                "several_problems.toml:17: service customer-service subscribes to its own dataset customers; an owner reads its own data directly (fix: remove this subscription)".into(),
            ]
            .join("\n"),
        ),
    ]
}

#[test]
fn every_broken_manifest_gets_its_exact_file_line_problem_and_exit_1() {
    let dir = corpus();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("corpus folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    files.sort();
    let cases = cases();
    let mut covered: Vec<String> = cases.iter().map(|(f, _)| (*f).to_owned()).collect();
    covered.sort();
    assert_eq!(
        files, covered,
        "every manifest in the corpus has an expected output, and every expectation a file"
    );
    for (file, expected) in cases {
        let (code, stdout, stderr) = run_in(&dir, &["check", file]);
        assert_eq!(
            code, 1,
            "{file}: exit code\nstdout: {stdout}\nstderr: {stderr}"
        );
        assert_eq!(stdout.trim_end(), expected, "{file}: output");
        for line in stdout.lines() {
            assert!(
                line.starts_with(&format!("{file}:")),
                "{file}: every line is `file:line: problem`: {line}"
            );
        }
    }
}

#[test]
fn json_output_parses_and_carries_the_same_problems() {
    let dir = corpus();
    for (file, expected) in cases() {
        let (code, stdout, _) = run_in(&dir, &["check", "--json", file]);
        assert_eq!(code, 1, "{file}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{file}: --json output is not JSON ({e}): {stdout}"));
        assert_eq!(v["file"], file, "{file}");
        assert_eq!(v["valid"], false, "{file}");
        let problems = v["problems"].as_array().expect("problems array");
        let as_lines: Vec<String> = problems
            .iter()
            .map(|p| {
                assert_eq!(p["severity"], "error", "{file}: {p}");
                assert!(
                    p["rule"].as_str().is_some_and(|r| !r.is_empty()),
                    "{file}: every problem names its rule: {p}"
                );
                format!(
                    "{file}:{}: {} (fix: {})",
                    p["line"].as_u64().expect("line is a number"),
                    p["message"].as_str().expect("message is text"),
                    p["hint"].as_str().expect("hint is text")
                )
            })
            .collect();
        assert_eq!(
            as_lines.join("\n"),
            expected,
            "{file}: the JSON problems match the text output"
        );
    }
}

#[test]
fn the_shop_manifest_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (code, stdout, stderr) = run_in(&root, &["check", "examples/shop/manifest.toml"]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.starts_with("examples/shop/manifest.toml: ok"),
        "{stdout}"
    );
    let (code, stdout, _) = run_in(&root, &["check", "--json", "examples/shop/manifest.toml"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("--json output parses");
    assert_eq!(v["valid"], true);
    assert_eq!(v["problems"], serde_json::json!([]));
}

#[test]
fn a_missing_manifest_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, stdout, _) = run_in(dir.path(), &["check", "no-such-manifest.toml"]);
    assert_eq!(code, 1);
    assert!(stdout.starts_with("no-such-manifest.toml:"), "{stdout}");
    assert!(stdout.contains("cannot read manifest"), "{stdout}");
}

#[test]
fn agent_and_hub_without_config_or_flags_say_what_to_give() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, stdout, stderr) = run_in(dir.path(), &["agent"]);
    assert_ne!(code, 0, "stdout: {stdout}");
    assert!(
        stderr.contains("give --config FILE, or --manifest M --consumer NAME"),
        "{stderr}"
    );
    for flag in ["--hub URL", "--listen ADDR", "--data DIR"] {
        assert!(stderr.contains(flag), "names {flag}: {stderr}");
    }
    let (code, _, stderr) = run_in(dir.path(), &["hub"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("give --config FILE, or --manifest M --listen ADDR --data DIR"),
        "{stderr}"
    );
    // Half the flags: clap names the missing ones.
    let (code, _, stderr) = run_in(dir.path(), &["agent", "--manifest", "m.toml"]);
    assert_ne!(code, 0);
    for flag in ["--consumer", "--listen", "--data"] {
        assert!(stderr.contains(flag), "names missing {flag}: {stderr}");
    }
    // --config and flags together are refused rather than silently mixed.
    let (code, _, stderr) = run_in(
        dir.path(),
        &["hub", "--config", "c.toml", "--listen", "127.0.0.1:0"],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--config") && stderr.contains("--listen"),
        "{stderr}"
    );
}

#[test]
fn bad_flag_values_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop/manifest.toml");
    let shop = shop.to_str().expect("utf-8 path");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let (code, _, stderr) = run_in(
        dir.path(),
        &[
            "agent",
            "--manifest",
            shop,
            "--consumer",
            "order-service",
            "--hub",
            "nohttp",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data,
        ],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--hub: 'nohttp' must start with http:// or https://"),
        "{stderr}"
    );
    let (code, _, stderr) = run_in(
        dir.path(),
        &[
            "agent",
            "--manifest",
            shop,
            "--consumer",
            "nobody",
            "--hub",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data,
        ],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("consumer 'nobody' is not a service in the manifest"),
        "{stderr}"
    );
    let (code, _, stderr) = run_in(
        dir.path(),
        &[
            "hub",
            "--manifest",
            shop,
            "--listen",
            "nowhere",
            "--data",
            data,
        ],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("nowhere") && stderr.contains("--listen"),
        "{stderr}"
    );
    let (code, _, stderr) = run_in(
        dir.path(),
        &["relay", "--outbox", "owner.db", "--hub", "ftp://x"],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--hub: 'ftp://x' must start with http:// or https://"),
        "{stderr}"
    );
    // A hub whose manifest is broken does not start, and says why.
    let broken = corpus().join("unknown_owner.toml");
    let (code, _, stderr) = run_in(
        dir.path(),
        &[
            "hub",
            "--manifest",
            broken.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
            "--data",
            data,
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown_owner.toml:7: dataset customers: owner 'ghost-service' is not a declared service"), "{stderr}");
    // Bench flags out of range are refused before anything starts.
    for bad in ["0", "10001", "-5", "many"] {
        let flag = format!("--batch={bad}");
        let (code, _, stderr) = run_in(dir.path(), &["bench", "cdc", &flag]);
        assert_eq!(code, 2, "--batch {bad}: {stderr}");
        assert!(stderr.contains("--batch"), "--batch {bad}: {stderr}");
    }
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    for role in ["hub", "agent", "status"] {
        let (code, _, stderr) = run_in(dir.path(), &[role, "--config", "missing.toml"]);
        assert_ne!(code, 0, "{role}");
        assert!(
            stderr.contains("error: missing.toml: cannot read"),
            "{role}: {stderr}"
        );
    }
}

#[test]
fn an_unknown_config_key_is_an_error_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("spoke.toml");
    std::fs::write(
        &cfg,
        "manifest = \"m.toml\"\n\n[agent]\nconsumer = \"order-service\"\ncolour = \"blue\"\n",
    )
    .expect("write config");
    let cfg_s = cfg.to_str().expect("utf-8");
    for role in ["agent", "status"] {
        let (code, _, stderr) = run_in(dir.path(), &[role, "--config", cfg_s]);
        assert_ne!(code, 0, "{role}");
        assert!(
            stderr.contains(&format!("{cfg_s}:5: unknown field `colour`")),
            "{role}: {stderr}"
        );
    }
    std::fs::write(
        &cfg,
        "manifest = \"m.toml\"\n[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\nport = 7070\n",
    )
    .expect("write config");
    let (code, _, stderr) = run_in(dir.path(), &["hub", "--config", cfg_s]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("{cfg_s}:5: unknown field `port`")),
        "{stderr}"
    );
    // A config whose role section is missing says which section.
    std::fs::write(
        &cfg,
        "manifest = \"m.toml\"\n[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n",
    )
    .expect("write config");
    let (code, _, stderr) = run_in(dir.path(), &["agent", "--config", cfg_s]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("{cfg_s} has no [agent] section")),
        "{stderr}"
    );
}
