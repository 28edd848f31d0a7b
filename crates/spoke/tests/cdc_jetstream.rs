//! CDC publishing straight into JetStream: snapshot, stream and a restart
//! land in the JetStream feed with nothing lost or doubled.

mod cdc_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_support::{assert_no_doubles, feed_state, log, table_state, Env};
use spoke::cdc::CdcSource;
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::shutdown::shutdown_channel;
use spoke::testing::{nats_delete_streams, nats_or_skip, unique_name};

async fn converge(env: &Env, feed: &JetStreamFeed) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let table = table_state(&env.db).await;
        let state = feed_state(feed).await;
        if table == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "JetStream never equalled the table: {} rows vs {} records",
            table.len(),
            state.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_into_jetstream_converges_across_a_restart() {
    let Some(url) = nats_or_skip("cdc into jetstream").await else {
        return;
    };
    let Some(env) = Env::start().await else {
        return;
    };
    let prefix = unique_name("spokecdc");
    let mut o = JetStreamOptions::new(&url);
    o.stream_prefix = prefix.to_uppercase();
    o.subject_prefix = prefix.clone();
    let feed = Arc::new(
        JetStreamFeed::connect(o, &env.manifest)
            .await
            .expect("jetstream"),
    );

    env.db
        .batch_execute("INSERT INTO items (id, name, qty) SELECT 'k' || g, 'item ' || g, g FROM generate_series(1, 40) g")
        .await
        .unwrap();
    let start = |cfg| {
        let source = CdcSource::new(cfg, env.manifest.clone(), feed.clone())
            .expect("source")
            .with_reader(feed.clone());
        let (trigger, shutdown) = shutdown_channel();
        (trigger, tokio::spawn(source.run(shutdown)))
    };
    let (trigger, task) = start(env.config("js_slot"));
    env.db
        .batch_execute(
            "BEGIN; UPDATE items SET qty = qty + 100 WHERE id IN ('k1', 'k2'); DELETE FROM items WHERE id = 'k3';
             INSERT INTO items (id, name) VALUES ('new', 'fresh'); UPDATE items SET name = 'twice' WHERE id = 'new'; COMMIT;",
        )
        .await
        .unwrap();
    converge(&env, &feed).await;

    trigger.fire();
    task.await.unwrap().expect("a clean stop");
    // Written while the source is down: delivered after the restart.
    env.db.batch_execute("UPDATE items SET name = 'while down' WHERE id = 'k10'; DELETE FROM items WHERE id = 'k11'").await.unwrap();
    let (trigger, task) = start(env.config("js_slot"));
    converge(&env, &feed).await;
    assert_no_doubles(&log(feed.as_ref(), "items").await);
    trigger.fire();
    task.await.unwrap().expect("a clean stop");
    nats_delete_streams(&url, &prefix.to_uppercase()).await;
}
