//! `spoke status --cdc FILE`: the slot's retained WAL against its alarm, and
//! a lost slot reported with the recovery path — read from the owner's
//! database whether or not `spoke cdc` runs.

use std::process::Command;

use spoke::cdc::{file::CdcFile, slot};
use spoke::testing::PrivatePostgres;

const MANIFEST: &str = r#"
[services.catalog-service]
[services.order-service]
[datasets.products]
owner = "catalog-service"
key = "sku"
fields = { name = "string" }
[[subscriptions]]
consumer = "order-service"
dataset = "products"
fields = ["name"]
staleness_budget = "1m"
"#;

fn status(file: &std::path::Path) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(["status", "--json", "--cdc"])
        .arg(file)
        .output()
        .expect("run spoke status");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_retained_wal_alarms_and_lost_slots() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = PrivatePostgres::start(&dir.path().join("pg")) else {
        return;
    };
    std::fs::write(dir.path().join("manifest.toml"), MANIFEST).unwrap();
    let config = dir.path().join("cdc.toml");
    let write_config = |alarm: u64| {
        std::fs::write(
            &config,
            format!(
                "manifest = \"manifest.toml\"\npostgres = \"{}\"\npublication = \"p_status\"\nslot = \"s_status\"\nhub = \"http://127.0.0.1:9\"\nwal_alarm_bytes = {alarm}\n[datasets.products]\ntable = \"public.products\"\nkey = \"sku\"\n",
                pg.url()
            ),
        )
        .unwrap();
    };
    write_config(1 << 30);

    let (code, s) = status(&config);
    assert_eq!(code, 2, "{s}");
    assert_eq!(s["problem"], "no slot yet: start spoke cdc");

    // Set up the slot and state as `spoke cdc` does, without running it.
    let cfg = CdcFile::load(&config).unwrap().cdc;
    let client = slot::connect(&pg.url()).await.unwrap();
    client
        .batch_execute("CREATE TABLE products (sku text PRIMARY KEY, name text NOT NULL)")
        .await
        .unwrap();
    slot::ensure_state_table(&client, &cfg).await.unwrap();
    slot::insert_creating(&client, &cfg).await.unwrap();
    let c = slot::create_slot(&client, &cfg.slot).await.unwrap();
    slot::set_consistent(&client, &cfg, c).await.unwrap();

    let (code, s) = status(&config);
    assert_eq!(code, 0, "{s}");
    assert_eq!(s["exists"], true);
    assert_eq!(s["datasets"][0]["dataset"], "products");
    assert!(s["retained_wal_bytes"].as_u64().is_some(), "{s}");

    // Nobody consumes the slot: WAL piles up past a small alarm.
    client.batch_execute("INSERT INTO products SELECT 'k' || g, repeat('x', 200) FROM generate_series(1, 2000) g").await.unwrap();
    write_config(1024);
    let (code, s) = status(&config);
    assert_eq!(code, 2, "{s}");
    assert!(
        s["problem"]
            .as_str()
            .unwrap()
            .contains("over the alarm of 1024"),
        "{s}"
    );
    assert!(s["retained_wal_bytes"].as_u64().unwrap() > 1024);

    // The slot is dropped behind Spoke's back: reported with the way out.
    slot::drop_slot(&client, &cfg.slot).await.unwrap();
    let (code, s) = status(&config);
    assert_eq!(code, 2, "{s}");
    assert_eq!(
        s["problem"],
        "slot s_status is gone: run spoke cdc --resnapshot"
    );
}
