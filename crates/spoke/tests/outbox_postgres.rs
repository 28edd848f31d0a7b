//! The PostgreSQL outbox against a real server: rule 3 (the owner's rows and
//! the outbox row commit or roll back together), per-key commit order under
//! concurrent writers, LISTEN/NOTIFY wake-up with polling as the fallback, and
//! a relay that rides out its PostgreSQL crashing and restarting.
//!
//! Each test uses its own schema (dropped at the end, also on failure).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use spoke::feed::memory::MemoryFeed;
use spoke::feed::{ChangeInput, Feed, FeedError, PublishReceipt, Publisher};
use spoke::outbox::postgres::{Outbox, PostgresOutbox};
use spoke::outbox::relay::{Relay, RelayOptions, RelayStats};
use spoke::outbox::Source;
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke::testing::{postgres_exec, postgres_or_skip, unique_name, PrivatePostgres};
use spoke_core::{Manifest, Op, Version};
use tokio_postgres::{Client, NoTls};

const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n"]
staleness_budget = "1m"
"#;

/// Drops the test's schema when dropped, on success and on failure alike.
struct Cleanup {
    url: String,
    schema: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, sql) = (
            self.url.clone(),
            format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema),
        );
        // Drop cannot await and runs inside the test's runtime: use a thread.
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime")
                .block_on(postgres_exec(&url, &sql));
        })
        .join();
        if done.is_err() {
            eprintln!("cleanup failed; drop schema {} by hand", self.schema);
        }
    }
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A fresh schema with the owner's business table and the outbox installed.
async fn setup(url: &str, prefix: &str) -> (Outbox, Cleanup) {
    let schema = unique_name(prefix);
    let cleanup = Cleanup {
        url: url.to_owned(),
        schema: schema.clone(),
    };
    let outbox = Outbox::new(&schema).expect("schema name");
    let client = connect(url).await;
    outbox.install(&client).await.expect("install");
    client
        .batch_execute(&format!(
            "CREATE TABLE \"{schema}\".items (id text PRIMARY KEY, n bigint NOT NULL)"
        ))
        .await
        .expect("business table");
    (outbox, cleanup)
}

fn fields(n: i64) -> Map<String, Value> {
    json!({ "n": n }).as_object().cloned().expect("object")
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// A publisher that takes its time, so the relay's window between
/// `pending` and `ack` overlaps with owner transactions committing.
struct Slow {
    inner: Arc<MemoryFeed>,
    max_delay_ms: u64,
}

#[async_trait]
impl Publisher for Slow {
    async fn publish(
        &self,
        dataset: &str,
        changes: Vec<ChangeInput>,
    ) -> Result<PublishReceipt, FeedError> {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=self.max_delay_ms))).await;
        self.inner.publish(dataset, changes).await
    }
}

struct Running {
    trigger: ShutdownTrigger,
    relay: tokio::task::JoinHandle<Result<(), spoke::outbox::relay::RelayError>>,
    listener: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<RelayStats>,
}

impl Running {
    async fn stop(self) {
        self.trigger.fire();
        self.relay.await.expect("relay task").expect("relay");
        if let Some(l) = self.listener {
            l.await.expect("listener task");
        }
    }
}

fn start_relay(
    source: Arc<PostgresOutbox>,
    publisher: Arc<dyn Publisher>,
    options: RelayOptions,
    listen: bool,
) -> Running {
    let relay = Relay::new(source.clone(), publisher).with_options(options);
    let stats = relay.stats();
    let (trigger, shutdown) = shutdown_channel();
    let listener = listen.then(|| source.listen(relay.nudger(), shutdown.clone()));
    Running {
        trigger,
        relay: tokio::spawn(relay.run(shutdown)),
        listener,
        stats,
    }
}

/// The feed's whole log for `items`: (key, version, op, fields).
async fn feed_log(feed: &MemoryFeed) -> Vec<(String, Version, Op, Map<String, Value>)> {
    let mut out = Vec::new();
    loop {
        let b = feed
            .read("items", out.len() as u64, 1_000, Duration::ZERO)
            .await
            .expect("read");
        if b.entries.is_empty() {
            return out;
        }
        out.extend(
            b.entries
                .into_iter()
                .map(|e| (e.change.key, e.change.version, e.change.op, e.change.fields)),
        );
    }
}

async fn feed_head(feed: &MemoryFeed) -> u64 {
    feed.read("items", 0, 1, Duration::ZERO)
        .await
        .expect("head")
        .head
}

async fn wait_drained(source: &PostgresOutbox, within: Duration) {
    let start = Instant::now();
    loop {
        match source.backlog().await {
            Ok(0) => return,
            Ok(n) => assert!(
                start.elapsed() < within,
                "the outbox still holds {n} rows after {within:?}"
            ),
            Err(e) => assert!(start.elapsed() < within, "backlog: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks the feed against the owner's database: per key, the log holds
/// every committed version exactly once, in increasing order (1..=n, as
/// rolled-back versions are reused), and its last entry is the business
/// row's state (or a tombstone for a deleted row).
async fn assert_feed_matches_owner(feed: &MemoryFeed, owner: &Client, outbox: &Outbox) {
    let s = outbox.schema();
    let versions: BTreeMap<String, Version> = owner
        .query(
            &format!("SELECT key, version FROM \"{s}\".spoke_versions WHERE dataset = 'items'"),
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as Version))
        .collect();
    let rows: BTreeMap<String, i64> = owner
        .query(&format!("SELECT id, n FROM \"{s}\".items"), &[])
        .await
        .expect("items")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let log = feed_log(feed).await;
    let mut per_key: BTreeMap<String, Vec<Version>> = BTreeMap::new();
    let mut last: BTreeMap<String, (Op, Map<String, Value>)> = BTreeMap::new();
    for (k, v, op, f) in &log {
        per_key.entry(k.clone()).or_default().push(*v);
        last.insert(k.clone(), (*op, f.clone()));
    }
    assert_eq!(
        per_key.keys().collect::<Vec<_>>(),
        versions.keys().collect::<Vec<_>>(),
        "the feed has exactly the keys the owner committed"
    );
    for (k, n) in &versions {
        let want: Vec<Version> = (1..=*n).collect();
        assert_eq!(
            per_key[k], want,
            "key {k}: the feed's versions (left) are not every committed version once, in order"
        );
        let state = match rows.get(k) {
            Some(n) => (Op::Upsert, fields(*n)),
            None => (Op::Delete, Map::new()),
        };
        assert_eq!(
            last[k], state,
            "key {k}: the feed's latest is the owner's row"
        );
    }
    assert_eq!(
        log.len() as u64,
        versions.values().sum::<u64>(),
        "no duplicates"
    );
}

/// One owner transaction over `keys` (sorted, so writers never deadlock):
/// per key an upsert (or, sometimes, a delete of an existing row) of the
/// business row and its outbox entry, held open for `hold`, then committed
/// or rolled back. `outbox_first` writes the outbox row before the business
/// row, so only the outbox's own lock orders writers of a key.
#[allow(clippy::too_many_arguments)]
async fn owner_tx(
    client: &mut Client,
    outbox: &Outbox,
    keys: &[String],
    rng: &mut fastrand::Rng,
    commit: bool,
    hold: Duration,
    outbox_first: bool,
) -> Result<(), tokio_postgres::Error> {
    let s = outbox.schema().to_owned();
    let tx = client.transaction().await?;
    for key in keys {
        let delete = rng.u8(..5) == 0;
        let n = rng.i64(..);
        if outbox_first {
            if delete {
                outbox.delete(&tx, "items", key).await?;
                tx.execute(&format!("DELETE FROM \"{s}\".items WHERE id = $1"), &[key])
                    .await?;
            } else {
                outbox.upsert(&tx, "items", key, &fields(n)).await?;
                tx.execute(
                    &format!("INSERT INTO \"{s}\".items (id, n) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET n = excluded.n"),
                    &[key, &n],
                )
                .await?;
            }
        } else if delete
            && tx
                .execute(&format!("DELETE FROM \"{s}\".items WHERE id = $1"), &[key])
                .await?
                == 1
        {
            outbox.delete(&tx, "items", key).await?;
        } else {
            tx.execute(
                &format!("INSERT INTO \"{s}\".items (id, n) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET n = excluded.n"),
                &[key, &n],
            )
            .await?;
            outbox.upsert(&tx, "items", key, &fields(n)).await?;
        }
    }
    tokio::time::sleep(hold).await;
    if commit {
        tx.commit().await
    } else {
        tx.rollback().await
    }
}

fn random_keys(rng: &mut fastrand::Rng, universe: usize, most: usize) -> Vec<String> {
    let mut keys: Vec<String> = (0..rng.usize(1..=most))
        .map(|_| format!("k{:02}", rng.usize(..universe)))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn seed() -> u64 {
    let seed = std::env::var("SPOKE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed}");
    seed
}

#[tokio::test]
async fn a_rolled_back_owner_transaction_leaves_no_outbox_row_and_no_version_bump() {
    let Some(url) = postgres_or_skip("outbox_postgres rollback").await else {
        return;
    };
    let (outbox, _cleanup) = setup(&url, "spoke_obx_rb").await;
    let s = outbox.schema().to_owned();
    let mut client = connect(&url).await;
    let outbox_rows = format!("SELECT count(*) FROM \"{s}\".spoke_outbox");
    let version_rows = format!("SELECT count(*) FROM \"{s}\".spoke_versions");
    let item_rows = format!("SELECT count(*) FROM \"{s}\".items");

    // The owner's transaction fails after writing: nothing of it remains.
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO \"{s}\".items VALUES ('c1', 1)"), &[])
        .await
        .unwrap();
    assert_eq!(
        outbox.upsert(&tx, "items", "c1", &fields(1)).await.unwrap(),
        1
    );
    assert_eq!(
        outbox.upsert(&tx, "items", "c1", &fields(2)).await.unwrap(),
        2
    );
    assert_eq!(outbox.delete(&tx, "items", "c2").await.unwrap(), 1);
    tx.rollback().await.unwrap();
    assert_eq!(count(&client, &outbox_rows).await, 0, "no outbox row");
    assert_eq!(count(&client, &version_rows).await, 0, "no version bump");
    assert_eq!(count(&client, &item_rows).await, 0, "no business row");

    // Committed: the business row, the outbox row and the version together.
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO \"{s}\".items VALUES ('c1', 7)"), &[])
        .await
        .unwrap();
    assert_eq!(
        outbox.upsert(&tx, "items", "c1", &fields(7)).await.unwrap(),
        1,
        "the rolled-back versions are reused"
    );
    tx.commit().await.unwrap();

    // Dropped without commit (the owner's code returned an error): rolled back.
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(&format!("DELETE FROM \"{s}\".items"), &[])
            .await
            .unwrap();
        assert_eq!(outbox.delete(&tx, "items", "c1").await.unwrap(), 2);
    }
    assert_eq!(count(&client, &item_rows).await, 1);
    assert_eq!(count(&client, &outbox_rows).await, 1);

    // A failing statement aborts the owner's transaction: so does its outbox write.
    let tx = client.transaction().await.unwrap();
    assert_eq!(outbox.delete(&tx, "items", "c1").await.unwrap(), 2);
    tx.execute(&format!("INSERT INTO \"{s}\".items VALUES ('c1', 8)"), &[])
        .await
        .expect_err("duplicate key");
    // PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK.
    let _ = tx.commit().await;
    assert_eq!(count(&client, &item_rows).await, 1);
    assert_eq!(count(&client, &outbox_rows).await, 1);

    let source = PostgresOutbox::connect(&url, outbox.clone()).await.unwrap();
    let p = source.pending(10).await.unwrap();
    assert_eq!(
        p.iter()
            .map(|p| (
                p.dataset.as_str(),
                p.change.key.as_str(),
                p.change.version,
                p.change.op
            ))
            .collect::<Vec<_>>(),
        vec![("items", "c1", 1, Op::Upsert)]
    );
    assert_eq!(p[0].change.fields, fields(7));
    assert!(p[0].change.ts.is_some_and(|t| t > 0));
    source.ack(p[0].id).await.unwrap();
    assert_eq!(source.backlog().await.unwrap(), 0, "ack deletes the row");
    let tx = client.transaction().await.unwrap();
    assert_eq!(outbox.delete(&tx, "items", "c1").await.unwrap(), 2);
    tx.commit().await.unwrap();
    assert_eq!(source.backlog().await.unwrap(), 1);
}

#[tokio::test]
async fn ack_deletes_exactly_the_rows_offered_never_a_late_committing_lower_id() {
    let Some(url) = postgres_or_skip("outbox_postgres exact ack").await else {
        return;
    };
    let (outbox, _cleanup) = setup(&url, "spoke_obx_ack").await;
    let mut slow = connect(&url).await;
    let mut fast = connect(&url).await;
    let source = PostgresOutbox::connect(&url, outbox.clone()).await.unwrap();

    // T1 draws the lower id but is still open while T2 (another key) commits.
    let t1 = slow.transaction().await.unwrap();
    outbox.upsert(&t1, "items", "a", &fields(1)).await.unwrap();
    let t2 = fast.transaction().await.unwrap();
    outbox.upsert(&t2, "items", "b", &fields(2)).await.unwrap();
    t2.commit().await.unwrap();

    let p = source.pending(10).await.unwrap();
    assert_eq!(p.len(), 1, "T1's row is not visible yet");
    assert_eq!(p[0].change.key, "b");
    // T1 commits between the relay's read and its acknowledgement.
    t1.commit().await.unwrap();
    source.ack(p[0].id).await.unwrap();

    let p = source.pending(10).await.unwrap();
    assert_eq!(
        p.iter().map(|p| p.change.key.as_str()).collect::<Vec<_>>(),
        vec!["a"],
        "the lower id committed late is still offered, not deleted by the ack"
    );
    source.ack(p[0].id).await.unwrap();
    assert_eq!(source.backlog().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_keep_per_key_commit_order_and_lose_nothing() {
    let Some(url) = postgres_or_skip("outbox_postgres commit order").await else {
        return;
    };
    let seed = seed();
    let (outbox, _cleanup) = setup(&url, "spoke_obx_order").await;
    let manifest = Manifest::parse("m.toml", MANIFEST).unwrap();
    let feed = Arc::new(MemoryFeed::new(&manifest));
    let source = Arc::new(PostgresOutbox::connect(&url, outbox.clone()).await.unwrap());
    let running = start_relay(
        source.clone(),
        Arc::new(Slow {
            inner: feed.clone(),
            max_delay_ms: 4,
        }),
        RelayOptions {
            batch: 7,
            poll_every: Duration::from_millis(20),
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(100),
        },
        true,
    );

    const WRITERS: u64 = 6;
    const TXS: usize = 60;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (url, outbox) = (url.clone(), outbox.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(w));
                let mut client = connect(&url).await;
                let mut committed = 0;
                for _ in 0..TXS {
                    // Eight hot keys shared by every writer: same-key and
                    // different-key transactions overlap all the time.
                    let keys = random_keys(&mut rng, 8, 3);
                    let commit = rng.u8(..8) != 0;
                    let hold = Duration::from_millis(rng.u64(0..6));
                    owner_tx(&mut client, &outbox, &keys, &mut rng, commit, hold, true)
                        .await
                        .expect("owner transaction");
                    committed += usize::from(commit);
                }
                committed
            })
        })
        .collect();
    let mut committed = 0;
    for w in writers {
        committed += w.await.expect("writer");
    }
    assert!(committed > 0);
    wait_drained(&source, Duration::from_secs(60)).await;
    running.stop().await;
    let owner = connect(&url).await;
    assert_feed_matches_owner(&feed, &owner, &outbox).await;
}

#[tokio::test]
async fn listen_wakes_the_relay_at_once_also_after_its_connection_is_killed() {
    let Some(url) = postgres_or_skip("outbox_postgres listen").await else {
        return;
    };
    let (outbox, _cleanup) = setup(&url, "spoke_obx_listen").await;
    let app = unique_name("spoke_obx_app");
    let relay_url = format!("{url} application_name={app}");
    let manifest = Manifest::parse("m.toml", MANIFEST).unwrap();
    let feed = Arc::new(MemoryFeed::new(&manifest));
    let source = Arc::new(
        PostgresOutbox::connect(&relay_url, outbox.clone())
            .await
            .unwrap(),
    );
    // Polling alone would take a minute: only a notification is this fast.
    let running = start_relay(
        source.clone(),
        feed.clone(),
        RelayOptions {
            poll_every: Duration::from_secs(60),
            ..Default::default()
        },
        true,
    );
    let mut client = connect(&url).await;
    let listener_pid =
        format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{app} (listen)'");
    let wait_listener = async |client: &Client| {
        let start = Instant::now();
        loop {
            if let Some(r) = client.query_opt(&listener_pid, &[]).await.unwrap() {
                return r.get::<_, i32>(0);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no LISTEN connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let pid = wait_listener(&client).await;
    // Let the relay go idle (its first look and the post-LISTEN nudge are done).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut rng = fastrand::Rng::new();
    for round in 0..6 {
        if round == 3 {
            // The LISTEN connection dies: the listener reconnects and listens again.
            client
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .unwrap();
            let start = Instant::now();
            while wait_listener(&client).await == pid {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no new LISTEN connection"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let before = feed_head(&feed).await;
        owner_tx(
            &mut client,
            &outbox,
            &[format!("k{round}")],
            &mut rng,
            true,
            Duration::ZERO,
            false,
        )
        .await
        .unwrap();
        let start = Instant::now();
        while feed_head(&feed).await == before {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "round {round}: a committed change did not reach the feed within 3 s (the relay polls only every 60 s, so NOTIFY did not wake it)"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("round {round}: delivered in {:?}", start.elapsed());
    }
    running.stop().await;
    assert_feed_matches_owner(&feed, &client, &outbox).await;
}

#[tokio::test]
async fn polling_alone_delivers_when_listen_is_off() {
    let Some(url) = postgres_or_skip("outbox_postgres polling").await else {
        return;
    };
    let (outbox, _cleanup) = setup(&url, "spoke_obx_poll").await;
    let manifest = Manifest::parse("m.toml", MANIFEST).unwrap();
    let feed = Arc::new(MemoryFeed::new(&manifest));
    let source = Arc::new(PostgresOutbox::connect(&url, outbox.clone()).await.unwrap());
    let running = start_relay(
        source.clone(),
        feed.clone(),
        RelayOptions {
            poll_every: Duration::from_millis(200),
            ..Default::default()
        },
        false,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = connect(&url).await;
    let mut rng = fastrand::Rng::new();
    for round in 0..3 {
        let before = feed_head(&feed).await;
        owner_tx(
            &mut client,
            &outbox,
            &[format!("k{round}"), format!("k{}", round + 1)],
            &mut rng,
            true,
            Duration::ZERO,
            false,
        )
        .await
        .unwrap();
        let start = Instant::now();
        while feed_head(&feed).await < before + 2 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "round {round}: polling every 200 ms did not deliver within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    wait_drained(&source, Duration::from_secs(5)).await;
    running.stop().await;
    assert_feed_matches_owner(&feed, &client, &outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_survives_postgres_crashing_and_delivers_everything() {
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = PrivatePostgres::start(&dir.path().join("pg")) else {
        return;
    };
    let url = pg.url();
    let (outbox, _cleanup) = setup(&url, "spoke_obx_crash").await;
    let manifest = Manifest::parse("m.toml", MANIFEST).unwrap();
    let feed = Arc::new(MemoryFeed::new(&manifest));
    let source = Arc::new(PostgresOutbox::connect(&url, outbox.clone()).await.unwrap());
    // Polling is a minute: after the restart, rows arrive through the
    // relay's retries and the listener's new LISTEN connection.
    let running = start_relay(
        source.clone(),
        Arc::new(Slow {
            inner: feed.clone(),
            max_delay_ms: 3,
        }),
        RelayOptions {
            batch: 10,
            poll_every: Duration::from_secs(60),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(300),
        },
        true,
    );

    const TXS: usize = 400;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (url, outbox, done) = (url.clone(), outbox.clone(), done.clone());
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut client = connect(&url).await;
            let mut failed = 0;
            while done.load(Ordering::SeqCst) < TXS {
                let keys = random_keys(&mut rng, 20, 3);
                let commit = rng.u8(..10) != 0;
                match owner_tx(
                    &mut client,
                    &outbox,
                    &keys,
                    &mut rng,
                    commit,
                    Duration::ZERO,
                    false,
                )
                .await
                {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    // The server went away (the commit may or may not have
                    // happened; the check below reads the owner's tables).
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if let Ok((c, conn)) = tokio_postgres::connect(&url, NoTls).await {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            client = c;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(0..3))).await;
            }
            failed
        })
    };
    // Crash while the writer writes and the relay forwards.
    let start = Instant::now();
    while done.load(Ordering::SeqCst) < TXS / 3 || feed_head(&feed).await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the writer made no progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let head_before = feed_head(&feed).await;
    {
        let pg = &pg;
        tokio::task::block_in_place(|| pg.crash_restart(Duration::from_millis(800)));
    }
    let failed = writer.await.expect("writer");
    wait_drained(&source, Duration::from_secs(60)).await;
    let retries = running.stats.retries.load(Ordering::SeqCst);
    running.stop().await;
    // An idle relay finds its connection closed and reconnects without an
    // error; a busy one fails a step and retries: both are fine.
    println!("the writer saw {failed} failed transactions; the relay retried {retries} times");
    assert!(
        failed > 0,
        "the crash happened while the writer was writing (its connection broke)"
    );
    assert!(
        feed_head(&feed).await > head_before,
        "rows written after the restart arrived (with a 60 s poll: through the reconnected LISTEN or the relay's retries)"
    );
    let owner = connect(&url).await;
    assert_feed_matches_owner(&feed, &owner, &outbox).await;
}
