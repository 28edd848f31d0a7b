//! CDC end to end against a private PostgreSQL (wal_level=logical) into an
//! embedded SqliteFeed: snapshot, stream, restart, slot loss, idle WAL.

mod cdc_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdc_support::*;
use spoke::cdc::CdcError;
use spoke::feed::{ChangeInput, FeedError, PublishReceipt, Publisher};
use spoke_core::Op;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_inserts_updates_deletes_reach_the_feed() {
    let Some(env) = Env::start().await else {
        return;
    };
    // Rows before the source starts: they come through the snapshot.
    env.db
        .batch_execute(
            "INSERT INTO items (id, name, qty, price, active, at, doc)
             SELECT 'pre-' || lpad(i::text, 3, '0'), 'item ' || i, i, i * 1.25, i % 2 = 0,
                    '2026-01-02 03:04:05.123+00'::timestamptz + i * interval '1 hour', jsonb_build_object('i', i)
             FROM generate_series(1, 120) i",
        )
        .await
        .unwrap();
    let slot = spoke::testing::unique_name("cdc_e2e");
    let running = env.spawn(env.config(&slot));
    env.converge(T).await;
    let snapshot_entries = log(env.feed.as_ref(), "items").await.len();
    assert_eq!(snapshot_entries, 120, "one snapshot entry per row");

    // A multi-row transaction, one key changed three times in it.
    env.db
        .batch_execute(
            "BEGIN;
             INSERT INTO items (id, name, qty) VALUES ('a', 'A', 1), ('b', 'B', 2), ('c', 'C', 3);
             UPDATE items SET qty = 10 WHERE id = 'a';
             UPDATE items SET name = 'A2', at = '2026-05-06 07:08:09+02' WHERE id = 'a';
             DELETE FROM items WHERE id = 'pre-001';
             COMMIT;",
        )
        .await
        .unwrap();
    // Many small transactions.
    for i in 0..200i32 {
        let id = format!("k{}", i % 40);
        match i % 4 {
            0 | 1 => env
                .db
                .execute(
                    "INSERT INTO items (id, name, qty, doc) VALUES ($1, $2, $3, '{\"x\": [1, 2]}')
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty",
                    &[&id, &format!("n{i}"), &i],
                )
                .await
                .unwrap(),
            2 => env
                .db
                .execute(
                    "UPDATE items SET active = NOT coalesce(active, false) WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap(),
            _ => env
                .db
                .execute("DELETE FROM items WHERE id = $1", &[&id])
                .await
                .unwrap(),
        };
    }
    env.converge(T).await;
    let entries = log(env.feed.as_ref(), "items").await;
    assert_no_doubles(&entries);
    let a: Vec<_> = entries.iter().filter(|e| e.change.key == "a").collect();
    assert_eq!(
        a.len(),
        1,
        "three changes to 'a' in one transaction are one entry"
    );
    assert_eq!(a[0].change.fields["name"], "A2");
    assert_eq!(a[0].change.fields["qty"], 10);
    assert_eq!(a[0].change.fields["at"], "2026-05-06T05:08:09Z");
    let tx: Vec<_> = entries
        .iter()
        .filter(|e| ["a", "b", "c", "pre-001"].contains(&e.change.key.as_str()))
        .filter(|e| e.position > snapshot_entries as u64)
        .collect();
    assert_eq!(tx.len(), 4);
    assert!(
        tx.iter().all(|e| e.change.version == tx[0].change.version),
        "one transaction, one version (its commit LSN)"
    );
    assert!(tx
        .iter()
        .any(|e| e.change.key == "pre-001" && e.change.op == Op::Delete));
    let snapshot_version = entries[0].change.version;
    assert!(
        tx[0].change.version > snapshot_version,
        "streamed versions are above the snapshot's consistent point"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_exactly_where_the_feed_left_off() {
    let Some(env) = Env::start().await else {
        return;
    };
    let slot = spoke::testing::unique_name("cdc_restart");
    let mut expected_entries = 0usize;
    for round in 0..4 {
        let running = env.spawn(env.config(&slot));
        if round == 0 {
            wait_snapshot_done(&env.db, &slot).await;
        }
        for t in 0..30 {
            // Three distinct keys per transaction: three entries per transaction.
            let keys: Vec<String> = (0..3).map(|j| format!("r{round}-{t}-{j}")).collect();
            env.db
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO items (id, name) VALUES ('{}', 'x'), ('{}', 'y'); UPDATE items SET qty = {t} WHERE id LIKE 'r{round}-%' AND id <> '{}'; INSERT INTO items (id, name) VALUES ('{}', 'z'); COMMIT;",
                    keys[0], keys[1], keys[0], keys[2]
                ))
                .await
                .unwrap();
            expected_entries += 3;
            if t > 0 {
                // The update touched the previous transactions' rows of this round too.
                expected_entries += (t as usize) * 3;
            }
        }
        if round % 2 == 0 {
            // Stop right away: part of the round may not be published yet.
            running.stop().await;
        } else {
            env.converge(T).await;
            running.stop().await;
        }
        // Writes while the source is down come through the slot.
        env.db
            .execute(
                "INSERT INTO items (id, name) VALUES ($1, 'offline')",
                &[&format!("offline-{round}")],
            )
            .await
            .unwrap();
        expected_entries += 1;
    }
    let running = env.spawn(env.config(&slot));
    env.converge(T).await;
    wait_for("every entry", T, || async {
        log(env.feed.as_ref(), "items").await.len() >= expected_entries
    })
    .await;
    running.stop().await;
    let entries = log(env.feed.as_ref(), "items").await;
    assert_no_doubles(&entries);
    assert_eq!(
        entries.len(),
        expected_entries,
        "every committed change once: nothing lost, nothing doubled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_reported_and_resnapshot_recovers() {
    let Some(env) = Env::start().await else {
        return;
    };
    env.db
        .batch_execute("INSERT INTO items (id, name) VALUES ('a', 'A'), ('b', 'B')")
        .await
        .unwrap();
    let slot = spoke::testing::unique_name("cdc_lost");
    let running = env.spawn(env.config(&slot));
    env.converge(T).await;
    running.stop().await;
    // Behind Spoke's back: the slot goes, and a change is made that no slot saw.
    drop_slot(&env.db, &slot).await;
    env.db
        .batch_execute(
            "UPDATE items SET name = 'gap' WHERE id = 'a'; DELETE FROM items WHERE id = 'b';",
        )
        .await
        .unwrap();
    let e = env.spawn(env.config(&slot)).error(T).await;
    assert!(matches!(e, CdcError::SlotLost { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&slot) && msg.contains("--resnapshot") && msg.contains("no longer exists"),
        "{msg}"
    );
    assert!(
        slot_row(&env.db, &slot).await.is_none(),
        "the source did not quietly create a new slot"
    );
    // Recovery: a new snapshot, at versions above everything published before.
    let mut cfg = env.config(&slot);
    cfg.options.resnapshot = true;
    let running = env.spawn(cfg);
    wait_for("the renamed row", T, || async {
        feed_state(env.feed.as_ref())
            .await
            .get("a")
            .map(|f| f["name"] == "gap")
            == Some(true)
    })
    .await;
    // The row deleted in the gap is deleted in the feed too.
    env.converge(T).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported() {
    let Some(env) = Env::start().await else {
        return;
    };
    let slot = spoke::testing::unique_name("cdc_inval");
    let running = env.spawn(env.config(&slot));
    env.converge(T).await;
    running.stop().await;
    // Let the slot fall behind a tiny WAL budget, then force the WAL out.
    env.db
        .batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await
        .unwrap();
    env.db
        .batch_execute("SELECT pg_reload_conf(); CREATE TABLE filler (x text);")
        .await
        .unwrap();
    for _ in 0..6 {
        env.db
            .batch_execute(
                "INSERT INTO filler SELECT repeat(md5(i::text), 40) FROM generate_series(1, 3000) i;
                 SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await
            .unwrap();
    }
    wait_for("the slot to be lost", T, || async {
        slot_row(&env.db, &slot).await.and_then(|r| r.1).as_deref() == Some("lost")
    })
    .await;
    let e = env.spawn(env.config(&slot)).error(T).await;
    assert!(matches!(e, CdcError::SlotLost { .. }), "{e:?}");
    assert!(e.to_string().contains("lost"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_published_table_does_not_pin_wal() {
    let Some(env) = Env::start().await else {
        return;
    };
    let slot = spoke::testing::unique_name("cdc_idle");
    let mut cfg = env.config(&slot);
    cfg.options.heartbeat = None; // keepalives alone
    let running = env.spawn(cfg);
    env.converge(T).await;
    wait_for("the slot to be confirmed once", T, || async {
        slot_row(&env.db, &slot).await.is_some_and(|r| r.0 > 0)
    })
    .await;
    let before = slot_row(&env.db, &slot).await.unwrap().0;
    // WAL from a table outside the publication only.
    env.db
        .batch_execute(
            "CREATE TABLE other (x int); INSERT INTO other SELECT generate_series(1, 10000);",
        )
        .await
        .unwrap();
    let current: String = env
        .db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::text", &[])
        .await
        .unwrap()
        .get(0);
    let current = current.parse::<f64>().unwrap() as u64;
    assert!(current > before);
    wait_for(
        "the confirmed position to follow unrelated WAL",
        T,
        || async { slot_row(&env.db, &slot).await.unwrap().0 >= current },
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_rides_out_a_postgres_crash_restart() {
    let Some(env) = Env::start().await else {
        return;
    };
    let slot = spoke::testing::unique_name("cdc_pgcrash");
    let running = env.spawn(env.config(&slot));
    wait_snapshot_done(&env.db, &slot).await;
    for i in 0..50 {
        env.db
            .execute(
                "INSERT INTO items (id, name) VALUES ($1, 'before')",
                &[&format!("b{i}")],
            )
            .await
            .unwrap();
    }
    env.pg.crash_restart(Duration::from_millis(500));
    let db = connect(&env.pg.url()).await;
    for i in 0..50 {
        db.execute(
            "INSERT INTO items (id, name) VALUES ($1, 'after')",
            &[&format!("a{i}")],
        )
        .await
        .unwrap();
    }
    db.execute("UPDATE items SET qty = 1", &[]).await.unwrap();
    let env = Env { db, ..env };
    env.converge(T).await;
    assert_no_doubles(&log(env.feed.as_ref(), "items").await);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_published_in_groups_keeping_commit_order_per_key() {
    let Some(env) = Env::start().await else {
        return;
    };
    let slot = spoke::testing::unique_name("cdc_group");
    let running = env.spawn(env.config(&slot));
    wait_snapshot_done(&env.db, &slot).await;
    running.stop().await;
    // While no source runs, 60 transactions pile up in the slot, each
    // changing key 'k' (and a key of its own; every fifth deletes one).
    for i in 1..=60i32 {
        let extra = if i % 5 == 0 {
            format!("DELETE FROM items WHERE id = 'o{}';", i - 1)
        } else {
            String::new()
        };
        env.db
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO items (id, name, qty) VALUES ('k', 'v{i}', {i})
                   ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty;
                 INSERT INTO items (id, name, qty) VALUES ('o{i}', 'own', {i});
                 {extra}
                 COMMIT;"
            ))
            .await
            .unwrap();
    }
    let mut cfg = env.config(&slot);
    cfg.options.batch = Some(50);
    let recording = Arc::new(Recording {
        feed: env.feed.clone(),
        sizes: Mutex::new(Vec::new()),
    });
    let source = spoke::cdc::CdcSource::new(cfg, env.manifest.clone(), recording.clone())
        .unwrap()
        .with_reader(env.feed.clone());
    let stats = source.stats();
    let (trigger, shutdown) = spoke::shutdown::shutdown_channel();
    let running = Running {
        trigger,
        task: tokio::spawn(source.run(shutdown)),
    };
    env.converge(T).await;
    running.stop().await;

    let entries = log(env.feed.as_ref(), "items").await;
    assert_no_doubles(&entries);
    let k: Vec<_> = entries.iter().filter(|e| e.change.key == "k").collect();
    assert_eq!(k.len(), 60, "every committed version of 'k' is in the log");
    for (i, e) in k.iter().enumerate() {
        assert_eq!(
            e.change.fields["qty"],
            serde_json::json!(i as i64 + 1),
            "commit order per key"
        );
        if i > 0 {
            assert!(e.change.version > k[i - 1].change.version);
        }
    }
    // 60 transactions of 2 or 3 changes, already waiting in the stream:
    // they share publishes of at most `batch` (50) changes.
    let sizes = recording.sizes.lock().unwrap().clone();
    let transactions = spoke::cdc::CdcStats::get(&stats.transactions);
    assert!(transactions >= 60, "{transactions} transactions");
    assert!(
        sizes.iter().sum::<usize>() >= 132,
        "every change published: {sizes:?}"
    );
    assert!(sizes.iter().all(|&n| n <= 50), "{sizes:?}");
    assert!(
        (sizes.len() as u64) < transactions,
        "{} publishes for {transactions} transactions: {sizes:?}",
        sizes.len()
    );
    assert_eq!(
        spoke::cdc::CdcStats::get(&stats.publishes),
        sizes.len() as u64
    );
}

/// A publisher that records the size of every publish into the feed.
struct Recording {
    feed: Arc<spoke::feed::sqlite::SqliteFeed>,
    sizes: Mutex<Vec<usize>>,
}

#[async_trait::async_trait]
impl Publisher for Recording {
    async fn publish(
        &self,
        dataset: &str,
        changes: Vec<ChangeInput>,
    ) -> Result<PublishReceipt, FeedError> {
        let n = changes.len();
        let receipt = self.feed.publish(dataset, changes).await?;
        self.sizes.lock().unwrap().push(n);
        Ok(receipt)
    }
}
