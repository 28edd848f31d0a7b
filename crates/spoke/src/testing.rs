//! Helpers for tests that need a real server (PostgreSQL, NATS).
//!
//! On a developer's machine a test whose server is absent is skipped with a
//! printed reason. Under `CI=true` an absent server is a failure: CI must
//! never pass by skipping.

use std::sync::atomic::{AtomicU64, Ordering};

/// The PostgreSQL tests connect to (`SPOKE_TEST_POSTGRES_URL`, default the
/// machine's local server, database `test`).
pub fn postgres_url() -> String {
    std::env::var("SPOKE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned())
}

/// Whether this run is CI, where missing services fail tests.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns the PostgreSQL URL when the server answers; otherwise skips the
/// test (returns `None` after printing why), or panics under CI.
pub async fn postgres_or_skip(test: &str) -> Option<String> {
    let url = postgres_url();
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            drop(client);
            Some(url)
        }
        Err(e) if in_ci() => panic!(
            "{test}: PostgreSQL at '{url}' is required under CI=true but cannot be reached: {e}"
        ),
        Err(e) => {
            eprintln!("SKIPPED {test}: PostgreSQL at '{url}' cannot be reached ({e}); set SPOKE_TEST_POSTGRES_URL to run it");
            None
        }
    }
}

/// A name no other test (or test run) uses: `prefix_<pid>_<n>_<random>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

/// Runs SQL on the test server, panicking on failure (setup and cleanup).
pub async fn postgres_exec(url: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect for setup");
    tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap_or_else(|e| {
        panic!(
            "setup SQL failed: {}\n{sql}",
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned())
        )
    });
}

/// The NATS server tests use (`SPOKE_TEST_NATS_URL`, default the machine's local server).
pub fn nats_url() -> String {
    std::env::var("SPOKE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Returns the NATS URL when a JetStream-enabled server answers; otherwise
/// skips (prints why and returns `None`), or panics under CI.
pub async fn nats_or_skip(test: &str) -> Option<String> {
    let url = nats_url();
    let probe = async {
        let client = async_nats::connect(url.as_str())
            .await
            .map_err(|e| e.to_string())?;
        // Account info does not parse against 2.9 servers; a stream round trip works on all.
        let js = async_nats::jetstream::new(client);
        let name = unique_name("SPOKE_PROBE");
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![name.to_lowercase()],
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        js.delete_stream(&name).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), probe).await {
        Ok(Ok(())) => Some(url),
        Ok(Err(e)) if in_ci() => panic!(
            "{test}: NATS JetStream at {url} is required under CI=true but cannot be used: {e}"
        ),
        Err(_) if in_ci() => {
            panic!("{test}: NATS JetStream at {url} is required under CI=true but did not answer")
        }
        Ok(Err(e)) => {
            eprintln!("SKIPPED {test}: NATS JetStream at {url} cannot be used ({e}); set SPOKE_TEST_NATS_URL to run it");
            None
        }
        Err(_) => {
            eprintln!("SKIPPED {test}: NATS JetStream at {url} did not answer; set SPOKE_TEST_NATS_URL to run it");
            None
        }
    }
}

/// Deletes every stream whose name starts with `prefix` (test cleanup).
pub async fn nats_delete_streams(url: &str, prefix: &str) {
    use futures_util::StreamExt;
    let Ok(client) = async_nats::connect(url).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for n in names.into_iter().filter(|n| n.starts_with(prefix)) {
        let _ = js.delete_stream(&n).await;
    }
}
