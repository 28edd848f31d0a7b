//! The CDC source's `GET /metrics` against a private PostgreSQL
//! (wal_level=logical): the figures move with the stream, the retained-WAL
//! alarm flips both ways, and a lost slot shows.

mod cdc_support;

use std::time::Duration;

use cdc_support::*;
use spoke::cdc::CdcError;

const T: Duration = Duration::from_secs(60);

fn series(name: &str, slot: &str) -> String {
    format!("{name}{{slot=\"{slot}\"}}")
}

const PUBLISHED: &str = "spoke_cdc_changes_published_total{dataset=\"items\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_snapshot_and_the_stream() {
    let Some(env) = Env::start().await else {
        return;
    };
    env.db
        .batch_execute(
            "INSERT INTO items (id, name, qty) SELECT 'pre-' || i, 'n' || i, i FROM generate_series(1, 30) i",
        )
        .await
        .unwrap();
    let slot = spoke::testing::unique_name("cdc_metrics");
    let (running, metrics) = env.spawn_with_metrics(env.config(&slot)).await;
    env.converge(T).await;
    let confirmed = series("spoke_cdc_confirmed_flush_lsn", &slot);
    wait_for("the snapshot's rows in the metrics", T, || async {
        metrics.value(PUBLISHED).await == Some(30.0)
    })
    .await;
    let text = metrics.scrape().await;
    for name in [
        "spoke_cdc_retained_wal_bytes",
        "spoke_cdc_lag_bytes",
        "spoke_cdc_slot_measured_timestamp_seconds",
    ] {
        assert!(
            metric_value(&text, &series(name, &slot)).is_some(),
            "{name} is measured: {text}"
        );
    }
    assert_eq!(
        metric_value(&text, &series("spoke_cdc_snapshot_rows_total", &slot)),
        Some(30.0)
    );
    assert_eq!(
        metric_value(&text, &series("spoke_cdc_slot_lost", &slot)),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&text, &series("spoke_cdc_stopped", &slot)),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &text,
            &format!("spoke_cdc_slot_wal_status{{slot=\"{slot}\",status=\"reserved\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    let confirmed_before = metric_value(&text, &confirmed).expect("confirmed position");

    // Streamed changes: the counters and the slot's confirmed position move.
    for i in 0..10 {
        env.db
            .batch_execute(&format!(
                "BEGIN; INSERT INTO items (id, name) SELECT 's{i}-' || g, 'x' FROM generate_series(1, 5) g; COMMIT;"
            ))
            .await
            .unwrap();
    }
    env.converge(T).await;
    wait_for(
        "published changes and the confirmed position to move",
        T,
        || async {
            let text = metrics.scrape().await;
            metric_value(&text, PUBLISHED) == Some(80.0)
                && metric_value(&text, &confirmed).is_some_and(|c| c > confirmed_before)
        },
    )
    .await;
    let text = metrics.scrape().await;
    assert!(
        metric_value(&text, &series("spoke_cdc_transactions_total", &slot))
            .is_some_and(|t| t >= 10.0),
        "{text}"
    );
    let acked = metric_value(&text, &series("spoke_cdc_acknowledged_lsn", &slot)).unwrap();
    assert!(acked >= confirmed_before, "{text}");
    running.stop().await;
    metrics.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_alarm_flips_and_a_lost_slot_shows() {
    let Some(env) = Env::start().await else {
        return;
    };
    let slot = spoke::testing::unique_name("cdc_alarm");
    let alarm_series = series("spoke_cdc_retained_wal_alarm", &slot);
    let mut cfg = env.config(&slot);
    cfg.options.wal_alarm_bytes = 512 * 1024;
    let (running, metrics) = env.spawn_with_metrics(cfg.clone()).await;
    env.converge(T).await;
    wait_for("the alarm to be measured off", T, || async {
        metrics.value(&alarm_series).await == Some(0.0)
    })
    .await;
    assert_eq!(
        metrics
            .value(&series("spoke_cdc_wal_alarm_threshold_bytes", &slot))
            .await,
        Some(524_288.0)
    );
    running.stop().await;
    metrics.stop().await;

    // Nobody reads the slot while the owner writes about 3 MB of WAL: the
    // next source measures it before it streams anything.
    env.db
        .batch_execute(
            "INSERT INTO items (id, name, body) SELECT 'f' || i, 'filler', repeat(md5(i::text), 16) FROM generate_series(1, 5000) i",
        )
        .await
        .unwrap();
    let (running, metrics) = env.spawn_with_metrics(cfg.clone()).await;
    wait_for("the alarm to go on", T, || async {
        metrics.value(&alarm_series).await == Some(1.0)
    })
    .await;
    assert!(
        metrics
            .value(&series("spoke_cdc_retained_wal_bytes", &slot))
            .await
            .is_some_and(|b| b > 524_288.0),
        "the figure behind the alarm"
    );
    // Once the source has caught up and a checkpoint lets the slot move its
    // restart position, the WAL is released and the alarm goes off.
    env.converge(T).await;
    wait_for("the alarm to go off again", T, || async {
        env.db.batch_execute("CHECKPOINT").await.unwrap();
        metrics.value(&alarm_series).await == Some(0.0)
    })
    .await;
    running.stop().await;
    metrics.stop().await;

    // The slot is dropped behind Spoke's back: the source stops, and its
    // metrics say why.
    drop_slot(&env.db, &slot).await;
    let (running, metrics) = env.spawn_with_metrics(cfg).await;
    let e = running.error(T).await;
    assert!(matches!(e, CdcError::SlotLost { .. }), "{e:?}");
    let text = metrics.scrape().await;
    assert_eq!(
        metric_value(&text, &series("spoke_cdc_slot_lost", &slot)),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, &series("spoke_cdc_stopped", &slot)),
        Some(1.0)
    );
    metrics.stop().await;
}
