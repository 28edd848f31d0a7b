//! The initial snapshot: interrupted and resumed from its last finished
//! chunk; rows written while it runs are neither lost nor overwritten by
//! older snapshot values.

mod cdc_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdc_support::*;
use spoke::cdc::{CdcSource, CdcStats};
use spoke::shutdown::shutdown_channel;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_resumes_and_concurrent_writes_win() {
    let Some(env) = Env::start().await else {
        return;
    };
    env.db
        .batch_execute(
            "INSERT INTO items (id, name, qty)
             SELECT 'k' || lpad(i::text, 4, '0'), 'orig', i FROM generate_series(1, 1000) i",
        )
        .await
        .unwrap();
    let slot = spoke::testing::unique_name("cdc_snap");

    // First run: stop after the third chunk (50 rows each).
    let mut cfg = env.config(&slot);
    cfg.options.snapshot_chunk = 50;
    let (trigger, shutdown) = shutdown_channel();
    let trigger = Arc::new(Mutex::new(Some(trigger)));
    let chunks = Arc::new(AtomicU64::new(0));
    let source = {
        let (trigger, chunks) = (trigger.clone(), chunks.clone());
        CdcSource::new(cfg.clone(), env.manifest.clone(), env.feed.clone())
            .unwrap()
            .on_progress(move |p| {
                assert!(!p.finished, "the snapshot was meant to be interrupted");
                if chunks.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                    if let Some(t) = trigger.lock().unwrap().take() {
                        t.fire();
                    }
                }
            })
    };
    tokio::time::timeout(T, source.run(shutdown))
        .await
        .expect("stops")
        .expect("stops cleanly");
    let (last_key, rows_done): (Option<String>, i64) = {
        let r = env
            .db
            .query_one(
                "SELECT last_key, rows_done FROM spoke_cdc_state WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(last_key.as_deref(), Some("k0150"));
    assert_eq!(rows_done, 150);

    // While it is down: change rows already snapshotted and rows not yet
    // read, delete some of each, add new ones.
    env.db
        .batch_execute(
            "UPDATE items SET name = 'after' WHERE id IN ('k0010', 'k0500', 'k0999');
             DELETE FROM items WHERE id IN ('k0020', 'k0600');
             INSERT INTO items (id, name) VALUES ('k0001a', 'new-early'), ('k2000', 'new-late');",
        )
        .await
        .unwrap();

    // Second run: resumes after k0150; writes during it keep coming.
    let source = CdcSource::new(cfg, env.manifest.clone(), env.feed.clone()).unwrap();
    let stats: Arc<CdcStats> = source.stats();
    let (trigger, shutdown) = shutdown_channel();
    let task = tokio::spawn(source.run(shutdown));
    for i in 0..100 {
        env.db
            .execute(
                "UPDATE items SET name = $1, qty = coalesce(qty, 0) + 1 WHERE id = $2",
                &[
                    &format!("during-{i}"),
                    &format!("k{:04}", (i * 97) % 1000 + 1),
                ],
            )
            .await
            .unwrap();
    }
    env.converge(T).await;
    trigger.fire();
    task.await.unwrap().unwrap();
    let resumed_rows = CdcStats::get(&stats.snapshot_rows);
    assert!(
        resumed_rows < 1000 - 150 + 10,
        "the second run read {resumed_rows} rows: it resumed, it did not start over"
    );
    let state = feed_state(env.feed.as_ref()).await;
    assert_eq!(
        state["k0010"]["name"], "after",
        "a change to an already snapshotted row arrived"
    );
    assert!(!state.contains_key("k0020") && !state.contains_key("k0600"));
    assert_eq!(
        state["k0001a"]["name"], "new-early",
        "a row inserted behind the snapshot's cursor arrived"
    );
    let entries = log(env.feed.as_ref(), "items").await;
    assert_no_doubles(&entries);
}
