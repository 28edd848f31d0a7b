//! `spoke cdc` publishing to a hub served over HTTPS by a private CA
//! (`--tls-ca`), with the owner's token, and its `--metrics-listen`
//! endpoint: real processes against a private PostgreSQL
//! (wal_level=logical). The TLS fixtures are those of the library's tests
//! (`crates/spoke/tests/fixtures/tls`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use spoke::feed::http::HubClient;
use spoke::feed::Feed;
use spoke::testing::PrivatePostgres;
use support::Proc;

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
strategy = "cdc"
staleness_budget = "1m"
"#;

const OWNER_TOKEN: &str = "owner-token-for-the-cdc-tls-test";
const ROWS: usize = 40;
const DEADLINE: Duration = Duration::from_secs(60);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../spoke/tests/fixtures/tls")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The address after `prefix` in a line such as "… listening on https://ADDR (…".
fn addr_after(line: &str, prefix: &str) -> String {
    line.split(prefix)
        .nth(1)
        .and_then(|r| r.split(['/', ' ']).next())
        .unwrap_or_else(|| panic!("no address after {prefix:?} in {line:?}"))
        .to_owned()
}

/// The hub over HTTPS with the owner's token; returns it and its base URL.
fn start_hub(dir: &Path, manifest: &Path) -> (Proc, String) {
    std::fs::write(dir.join("owner.token"), OWNER_TOKEN).unwrap();
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "manifest = {:?}\n[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\ntls_cert = {:?}\ntls_key = {:?}\n[hub.tokens]\ncatalog-service = {{ file = \"owner.token\" }}\n",
            path(manifest),
            path(&dir.join("hub")),
            path(&fixtures().join("server.pem")),
            path(&fixtures().join("server.key")),
        ),
    )
    .unwrap();
    let hub = Proc::spawn(&["hub", "--config", path(&config)]);
    let line = hub.wait_line("listening on https://");
    let base = format!("https://{}", addr_after(&line, "listening on https://"));
    (hub, base)
}

fn cdc_args<'a>(pg: &'a str, manifest: &'a str, hub: &'a str, slot: &'a str) -> Vec<&'a str> {
    vec![
        "cdc",
        "--manifest",
        manifest,
        "--postgres",
        pg,
        "--dataset",
        "products=public.products:sku",
        "--slot",
        slot,
        "--publication",
        slot,
        "--hub",
        hub,
        "--token-env",
        "SPOKE_TEST_CDC_TOKEN",
        "--status-every-secs",
        "1",
    ]
}

async fn hub_rows(hub: &HubClient) -> usize {
    hub.snapshot("products", None, 1000)
        .await
        .map(|p| p.records.len())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoke_cdc_publishes_to_an_https_hub_it_trusts_with_tls_ca() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = PrivatePostgres::start(&dir.path().join("pg")) else {
        return;
    };
    let (db, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    db.batch_execute(&format!(
        "CREATE TABLE products (sku text PRIMARY KEY, name text NOT NULL);
         INSERT INTO products SELECT 'p' || i, 'product ' || i FROM generate_series(1, {ROWS}) i;"
    ))
    .await
    .unwrap();
    let manifest = dir.path().join("manifest.toml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let (_hub, base) = start_hub(dir.path(), &manifest);
    let ca = fixtures().join("ca.pem");
    let url = pg.url();
    let env = [("SPOKE_TEST_CDC_TOKEN", OWNER_TOKEN)];

    // --tls-ca names a CA for a hub that has no certificate: refused up front.
    let mut args = cdc_args(&url, path(&manifest), "http://127.0.0.1:9", "s_tls_plain");
    args.extend(["--tls-ca", path(&ca)]);
    let out = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--tls-ca: set, but the hub is not an https:// URL"),
        "{stderr}"
    );

    // Without the CA the hub's certificate is not trusted: nothing gets through.
    let untrusting =
        Proc::spawn_with_env(&cdc_args(&url, path(&manifest), &base, "s_tls_no_ca"), &env);
    let line = untrusting.wait_line("publishing to products failed");
    assert!(
        line.contains("retrying") && line.contains("certificate"),
        "{line}"
    );
    drop(untrusting);

    // With --tls-ca: the snapshot and the stream reach the hub, and the
    // metrics endpoint counts them.
    let mut args = cdc_args(&url, path(&manifest), &base, "s_tls");
    args.extend(["--tls-ca", path(&ca), "--metrics-listen", "127.0.0.1:0"]);
    let cdc = Proc::spawn_with_env(&args, &env);
    let metrics = format!(
        "http://{}/metrics",
        addr_after(&cdc.wait_line("metrics at http://"), "metrics at http://")
    );
    let hub = HubClient::with_tls_ca(&base, Some(OWNER_TOKEN.to_owned()), &ca).expect("client");
    db.batch_execute("INSERT INTO products VALUES ('new-1', 'streamed'), ('new-2', 'streamed')")
        .await
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while hub_rows(&hub).await < ROWS + 2 {
        assert!(
            Instant::now() < deadline,
            "the hub never held every row; spoke cdc said:\n{}",
            cdc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = reqwest::get(&metrics)
        .await
        .expect("scrape")
        .text()
        .await
        .unwrap();
    let published = text
        .lines()
        .find_map(|l| l.strip_prefix("spoke_cdc_changes_published_total{dataset=\"products\"} "))
        .unwrap_or_else(|| panic!("no published counter in:\n{text}"));
    assert_eq!(published, (ROWS + 2).to_string(), "{text}");
    assert!(
        text.contains("spoke_cdc_retained_wal_alarm{slot=\"s_tls\"} 0"),
        "{text}"
    );
}
