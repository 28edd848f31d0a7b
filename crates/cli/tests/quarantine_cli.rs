//! `spoke quarantine list|replay` against an agent's SQLite copy store: what
//! is held is listed with its reason; replay with the same projection
//! changes nothing and exits 1; after the subscription stops projecting the
//! missing field it applies the held changes and exits 0. Bad arguments are
//! named.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{CopySpec, CopyStore};
use spoke_core::{Change, Manifest, Op};

const MANIFEST: &str = r#"
[services.customer-service]
[services.order-service]

[datasets.customers]
owner = "customer-service"
key = "id"
schema_version = 2
fields = { name = "string", email = "string?" }

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "email"]
strategy = "events"
staleness_budget = "5m"
"#;

fn spoke(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(args)
        .current_dir(dir)
        .env_remove("SPOKE_LOG")
        .output()
        .expect("spoke runs");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8(out.stderr).expect("utf-8"),
    )
}

fn change(key: &str, version: u64, fields: Value) -> Change {
    Change {
        dataset: "customers".into(),
        key: key.into(),
        version,
        op: Op::Upsert,
        fields: fields.as_object().cloned().expect("object"),
        owner: "customer-service".into(),
        ts: 1,
        schema_version: 3,
    }
}

#[test]
fn held_changes_are_listed_and_replayed_once_the_projection_fits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("manifest.toml"), MANIFEST).expect("manifest");
    std::fs::write(
        d.join("spoke.toml"),
        "manifest = \"manifest.toml\"\n[agent]\nconsumer = \"order-service\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nhub = \"http://127.0.0.1:9\"\n",
    )
    .expect("config");
    // What an agent leaves behind after the owner's schema v3 made `name`
    // optional and sent a record without it, and one with a number for it.
    let manifest = Manifest::parse("manifest.toml", MANIFEST).expect("manifest");
    let spec = CopySpec::of(&manifest, &manifest.subscriptions[0]).expect("spec");
    std::fs::create_dir_all(d.join("data")).expect("data dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = SqliteCopyStore::open(&d.join("data/copies.db")).expect("store");
        store.ensure_copy(&spec).await.expect("copy");
        let held: Vec<_> = [
            change("c1", 4, json!({"email": "ada@x"})),
            change("c2", 2, json!({"name": 7, "email": null})),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let reason = spoke::quarantine::misfit(&spec, 2, &c).expect("misfit");
            spoke::quarantine::held(&spec, c, Some(10 + i as u64), reason, 1_000 + i as u64)
        })
        .collect();
        store.hold("customers", &held).await.expect("hold");
    });

    let (code, out, err) = spoke(d, &["quarantine", "list", "--config", "spoke.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("customers: 2 change(s) quarantined"), "{out}");
    assert!(
        out.contains("position 10") && out.contains("required field 'name' is missing"),
        "{out}"
    );
    assert!(
        out.contains("field 'name' must be string, got an int"),
        "{out}"
    );
    let (code, out, _) = spoke(
        d,
        &["quarantine", "list", "--config", "spoke.toml", "--json"],
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["customers"].as_array().map(Vec::len), Some(2));

    let (code, out, _) = spoke(d, &["quarantine", "replay", "--config", "spoke.toml"]);
    assert_eq!(code, 1, "nothing fits yet: {out}");
    assert!(
        out.contains("replayed 0") && out.contains("2 still held"),
        "{out}"
    );

    // The consumer stops copying `name`; the copy is narrowed as the agent
    // would on restart, then replay applies both.
    let narrowed = MANIFEST.replace("fields = [\"name\", \"email\"]", "fields = [\"email\"]");
    std::fs::write(d.join("manifest.toml"), &narrowed).expect("manifest");
    let m = Manifest::parse("manifest.toml", &narrowed).expect("manifest");
    let narrow_spec = CopySpec::of(&m, &m.subscriptions[0]).expect("spec");
    rt.block_on(async {
        let store = SqliteCopyStore::open(&d.join("data/copies.db")).expect("store");
        store
            .ensure_copy(&narrow_spec)
            .await
            .expect("narrowed in place");
    });
    let (code, out, err) = spoke(
        d,
        &["quarantine", "replay", "--config", "spoke.toml", "--json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["applied"], 2, "{v}");
    let (_, out, _) = spoke(d, &["quarantine", "list", "--config", "spoke.toml"]);
    assert!(out.contains("customers: nothing quarantined"), "{out}");

    // Bad arguments are named.
    let (code, _, err) = spoke(
        d,
        &["quarantine", "replay", "--config", "spoke.toml", "orders"],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("order-service keeps no copy of orders; its copies: customers"),
        "{err}"
    );
    let (code, _, err) = spoke(d, &["quarantine", "list", "--config", "missing.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("missing.toml"), "{err}");
    let (code, _, err) = spoke(d, &["quarantine", "purge"]);
    assert_eq!(code, 2, "clap usage error");
    assert!(err.contains("purge"), "{err}");
}
