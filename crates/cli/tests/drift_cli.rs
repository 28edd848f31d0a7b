//! `spoke reconcile --cdc FILE --against-owner`: the tables a `spoke cdc`
//! config captures, compared with the JetStream feed they are captured
//! into (real PostgreSQL and NATS). Exit 0 while in sync; after rows change
//! behind the feed's back, exit 1 with exactly those keys in `--json`.

use std::process::Command;

use serde_json::{json, Value};
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::feed::{ChangeInput, Publisher};
use spoke::testing::{
    nats_delete_streams, nats_or_skip, postgres_exec, postgres_or_skip, unique_name,
};
use spoke_core::Manifest;

fn manifest(dataset: &str) -> String {
    format!(
        r#"
[services.catalog-service]
[services.order-service]
[datasets.{dataset}]
owner = "catalog-service"
key = "sku"
fields = {{ name = "string" }}
[[subscriptions]]
consumer = "order-service"
dataset = "{dataset}"
fields = ["name"]
staleness_budget = "1m"
"#
    )
}

fn drift(file: &std::path::Path) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(["reconcile", "--against-owner", "--json", "--cdc"])
        .arg(file)
        .env_remove("SPOKE_LOG")
        .output()
        .expect("run spoke reconcile");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr: {stderr}"));
    (out.status.code().expect("exit code"), json, stderr)
}

#[tokio::test]
async fn against_owner_reports_drift_between_a_cdc_table_and_its_jetstream_feed() {
    let Some(pg) = postgres_or_skip("reconcile --against-owner").await else {
        return;
    };
    let Some(nats) = nats_or_skip("reconcile --against-owner").await else {
        return;
    };
    // A dataset name of its own: the CLI uses the default stream prefix.
    let dataset = unique_name("drift");
    let schema = unique_name("spoke_drift_cli");
    postgres_exec(
        &pg,
        &format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.products (sku text PRIMARY KEY, version bigint NOT NULL, name text NOT NULL);
             INSERT INTO {schema}.products SELECT 's' || i, 1, 'product ' || i FROM generate_series(1, 100) i;"
        ),
    )
    .await;
    let m = Manifest::parse("m.toml", &manifest(&dataset)).expect("manifest");
    let feed = JetStreamFeed::connect(JetStreamOptions::new(&nats), &m)
        .await
        .expect("connect");
    let rows: Vec<ChangeInput> = (1..=100)
        .map(|i| {
            let fields = json!({ "name": format!("product {i}") })
                .as_object()
                .cloned()
                .unwrap_or_default();
            ChangeInput::upsert(format!("s{i}"), 1, fields)
        })
        .collect();
    feed.publish(&dataset, rows).await.expect("publish");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("m.toml"), manifest(&dataset)).expect("write manifest");
    let file = dir.path().join("cdc.toml");
    std::fs::write(
        &file,
        format!(
            r#"manifest = "m.toml"
postgres = "{pg}"
publication = "spoke_drift"
slot = "spoke_drift"
jetstream = "{nats}"
[datasets.{dataset}]
table = "{schema}.products"
key = "sku"
version = "version"
"#
        ),
    )
    .expect("write cdc config");

    let (code, report, stderr) = drift(&file);
    assert_eq!(code, 0, "in sync: {report} {stderr}");
    assert_eq!(report["datasets"][0]["in_sync"], json!(true));
    assert_eq!(report["datasets"][0]["owner_rows"], json!(100));

    postgres_exec(
        &pg,
        &format!(
            "INSERT INTO {schema}.products VALUES ('s500', 1, 'new');
             DELETE FROM {schema}.products WHERE sku = 's7';
             UPDATE {schema}.products SET version = 2, name = 'renamed' WHERE sku = 's9';"
        ),
    )
    .await;
    let (code, report, stderr) = drift(&file);
    assert_eq!(code, 1, "drift exits 1: {report} {stderr}");
    let r = &report["datasets"][0];
    assert_eq!(r["compare"], json!("versions"));
    assert_eq!(
        r["counts"],
        json!({"missing_from_feed": 1, "stale_in_feed": 1, "feed_ahead": 0, "gone_from_owner": 1})
    );
    let found: Vec<(String, String)> = r["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            (
                d["key"].as_str().unwrap_or_default().to_owned(),
                d["kind"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("s500", "missing_from_feed"),
            ("s7", "gone_from_owner"),
            ("s9", "stale_in_feed")
        ]
        .map(|(k, d)| (k.to_owned(), d.to_owned()))
    );
    assert!(
        !stderr.contains("password"),
        "no connection secrets printed: {stderr}"
    );

    nats_delete_streams(&nats, &format!("SPOKE_{}", dataset.to_uppercase())).await;
    postgres_exec(&pg, &format!("DROP SCHEMA {schema} CASCADE")).await;
}
