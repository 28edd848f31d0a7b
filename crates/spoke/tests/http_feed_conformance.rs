//! The HTTP client of a hub passes the same feed conformance suite as the
//! backends it fronts: a remote feed behaves exactly like a local one.
//!
//! Each constructor call starts its own hub (router over a fresh SQLite
//! feed, open mode) on 127.0.0.1:0 and hands back a `HubClient` for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use spoke::feed::conformance;
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::hub::{self, Tokens};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_client_passes_the_feed_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = AtomicUsize::new(0);
    let started = AtomicUsize::new(0);
    conformance::run(|manifest| {
        let path = dir
            .path()
            .join(format!("hub{}.db", n.fetch_add(1, Ordering::SeqCst)));
        started.fetch_add(1, Ordering::SeqCst);
        async move {
            let feed = Arc::new(SqliteFeed::open(&path, &manifest).expect("open hub store"));
            let router = hub::router(feed, Arc::new(manifest), Tokens::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("local addr");
            // Runs until the test's runtime shuts down.
            tokio::spawn(hub::serve(listener, router, std::future::pending()));
            HubClient::new(&format!("http://{addr}"), None)
        }
    })
    .await;
    assert!(
        started.load(Ordering::SeqCst) >= 7,
        "the suite ran every rule, each against its own hub"
    );
}
