//! Rule 2 with real processes on the distributed backends: nothing lost,
//! nothing doubled, with the feed in NATS JetStream and the copy in
//! PostgreSQL.
//!
//! The owner publishes in-process through `JetStreamFeed` (a `Publisher`)
//! a stream of upserts and deletes over 200 keys, in batches, while
//! `spoke agent` runs as a child process reading the same streams and
//! writing its copy into a PostgreSQL schema of its own. The agent is
//! killed with SIGKILL at random instants and restarted each time. Once it
//! caught up:
//! - the log holds every published change exactly once (its head is the
//!   number of changes the publisher appended) and the compacted state
//!   stream equals the owner's model;
//! - the copy equals the owner's model key by key: projected fields,
//!   versions and tombstones, with deleted keys absent from the live rows;
//! - every log entry was received exactly once: the agent bootstrapped from
//!   an empty log (position 0), so `received_total == position == head`;
//!   a batch whose records committed without its cursor (or twice) would
//!   make `received_total` exceed the head, a cursor that moved without its
//!   records would leave the copy short;
//! - `applied_total` is at least one per key and at most one per entry.
//!
//! Every name is unique to the run (stream and subject prefixes, schema);
//! the streams and the schema are removed at the end, also when the test
//! fails. Needs the machine's NATS JetStream and PostgreSQL (see
//! `spoke::testing`): skipped with a reason without them, failed under CI.

mod support;

use support::Proc;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use spoke::copy::postgres::{PostgresCopyStore, PostgresOptions};
use spoke::copy::{CopyStore, Cursor};
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::feed::{ChangeInput, Feed, Publisher};
use spoke::testing::{
    nats_delete_streams, nats_or_skip, postgres_exec, postgres_or_skip, unique_name,
};
use spoke_core::{Manifest, Op, Version};

const TEST: &str = "agent_crash_distributed";

const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int", label = "string?", secret = "string" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n", "label"]
strategy = "events"
staleness_budget = "1m"
"#;

const DATASET: &str = "items";
const KEYS: usize = 200;
const CHANGES: usize = 5_000;
const MIN_KILLS: usize = 20;
const DEADLINE: Duration = Duration::from_secs(30);
/// Longest a kill waits for the agent it targets to make progress.
const PROGRESS_PATIENCE: Duration = Duration::from_secs(5);

/// Deletes the run's streams and drops its schema when dropped, on success
/// and on failure alike. Declared before the agent, so the agent is killed
/// first and cannot recreate what was just removed.
struct Cleanup {
    nats_url: String,
    stream_prefix: String,
    postgres_url: String,
    schema: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let nats_url = self.nats_url.clone();
        let stream_prefix = self.stream_prefix.clone();
        let postgres_url = self.postgres_url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        // Drop cannot await and may run inside the test's runtime: clean up on
        // a thread with a runtime of its own, where a panic stays contained.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async {
                nats_delete_streams(&nats_url, &stream_prefix).await;
                postgres_exec(&postgres_url, &sql).await;
            });
        })
        .join();
        if done.is_err() {
            eprintln!(
                "{TEST}: cleanup failed; remove streams {}* and schema {} by hand",
                self.stream_prefix, self.schema
            );
        }
    }
}

type State = BTreeMap<String, (Version, bool, Map<String, Value>)>;

/// What the owner published: its model of the dataset and how many log
/// entries the publishes appended.
struct Published {
    model: State,
    appended: u64,
}

/// The copy's cursor, or `None` while the agent has not created the copy.
async fn cursor(store: &PostgresCopyStore) -> Option<Cursor> {
    store.cursor(DATASET).await.ok()
}

/// The log's compacted state stream: key → (version, deleted, fields).
async fn feed_state(feed: &JetStreamFeed) -> State {
    let mut out = State::new();
    let mut after: Option<String> = None;
    loop {
        let page = feed
            .snapshot(DATASET, after.as_deref(), 500)
            .await
            .expect("snapshot");
        for c in page.records {
            out.insert(c.key, (c.version, c.op == Op::Delete, c.fields));
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => return out,
        }
    }
}

fn project(fields: &Map<String, Value>) -> Map<String, Value> {
    ["n", "label"]
        .iter()
        .map(|f| {
            (
                (*f).to_owned(),
                fields.get(*f).cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Publishes `CHANGES` changes in random batches through the owner's feed.
/// `published` follows the log's head as the publishes report it.
async fn publish_stream(
    feed: Arc<JetStreamFeed>,
    published: Arc<AtomicU64>,
    seed: u64,
) -> Published {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = State::new();
    let mut appended = 0u64;
    let mut sent = 0;
    while sent < CHANGES {
        let size = rng.usize(1..=60).min(CHANGES - sent);
        let mut batch = Vec::with_capacity(size);
        let mut keys = std::collections::BTreeSet::new();
        for _ in 0..size {
            let key = format!("key-{:03}", rng.usize(..KEYS));
            let version = model.get(&key).map_or(0, |s| s.0) + 1;
            keys.insert(key.clone());
            if rng.u8(..5) == 0 {
                batch.push(ChangeInput::delete(key.clone(), version));
                model.insert(key, (version, true, Map::new()));
            } else {
                let label = if rng.bool() {
                    json!(format!("label {version}"))
                } else {
                    Value::Null
                };
                let fields = json!({ "n": rng.i64(-1_000_000..1_000_000), "label": label, "secret": "not for the consumer" });
                let fields = fields.as_object().cloned().expect("object");
                batch.push(ChangeInput::upsert(key.clone(), version, fields.clone()));
                model.insert(key, (version, false, fields));
            }
        }
        let receipt = feed
            .publish(DATASET, batch)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: publish: {e}"));
        // JetStream appends the newest change of each key in a batch; the
        // older ones of the same key are superseded, so reported as ignored.
        assert_eq!(
            receipt.ignored,
            size - keys.len(),
            "seed {seed}: fresh versions are never ignored, superseded ones always are"
        );
        appended += keys.len() as u64;
        published.store(receipt.head, Ordering::SeqCst);
        sent += size;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..25))).await;
    }
    Published { model, appended }
}

/// SQL that fails, naming the differences, unless the view
/// `<schema>.items` has exactly the projected columns and holds exactly the
/// live records of `model`, with their versions.
fn view_check(schema: &str, model: &State) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let rows: Vec<String> = model
        .iter()
        .filter(|(_, (_, deleted, _))| !deleted)
        .map(|(key, (version, _, fields))| {
            let n = fields["n"]
                .as_i64()
                .map_or("NULL".into(), |n| n.to_string());
            let label = fields["label"].as_str().map_or("NULL".into(), quote);
            format!(
                "({}, {n}::bigint, {label}::text, {version}::bigint)",
                quote(key)
            )
        })
        .collect();
    let want = if rows.is_empty() {
        "SELECT NULL::text, NULL::bigint, NULL::text, NULL::bigint WHERE false".to_owned()
    } else {
        format!("VALUES {}", rows.join(", "))
    };
    format!(
        r#"DO $check$
DECLARE columns text; diff text;
BEGIN
  SELECT string_agg(column_name, ',' ORDER BY column_name) INTO columns
    FROM information_schema.columns WHERE table_schema = '{schema}' AND table_name = '{DATASET}';
  IF columns IS DISTINCT FROM '_spoke_version,id,label,n' THEN
    RAISE EXCEPTION 'the view {schema}.{DATASET} has columns %', columns;
  END IF;
  WITH want(id, n, label, v) AS ({want}),
       got AS (SELECT id, n, label, _spoke_version FROM "{schema}"."{DATASET}")
  SELECT string_agg(d.side || ' ' || d.r, '; ') INTO diff FROM (
      SELECT 'missing' AS side, w::text AS r FROM (SELECT * FROM want EXCEPT ALL SELECT * FROM got) w
      UNION ALL
      SELECT 'unexpected', g::text FROM (SELECT * FROM got EXCEPT ALL SELECT * FROM want) g) d;
  IF diff IS NOT NULL THEN
    RAISE EXCEPTION 'the view {schema}.{DATASET} differs from the owner: %', left(diff, 2000);
  END IF;
END $check$;"#
    )
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_agent_on_jetstream_and_postgres_loses_and_doubles_nothing() {
    let Some(nats_url) = nats_or_skip(TEST).await else {
        return;
    };
    let Some(postgres_url) = postgres_or_skip(TEST).await else {
        return;
    };
    let seed = std::env::var("SPOKE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let name = unique_name("spokecrash");
    let stream_prefix = name.to_uppercase();
    let _cleanup = Cleanup {
        nats_url: nats_url.clone(),
        stream_prefix: stream_prefix.clone(),
        postgres_url: postgres_url.clone(),
        schema: name.clone(),
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let manifest_path = dir.path().join("manifest.toml");
    std::fs::write(&manifest_path, MANIFEST).expect("write manifest");
    let config = dir.path().join("spoke.toml");
    std::fs::write(
        &config,
        format!(
            "manifest = \"manifest.toml\"\n\
             [agent]\n\
             consumer = \"reader-svc\"\n\
             listen = \"127.0.0.1:0\"\n\
             data_dir = \"agent\"\n\
             jetstream = {{ url = {}, stream_prefix = {}, subject_prefix = {} }}\n\
             store = {{ postgres = {}, schema = {} }}\n",
            toml_str(&nats_url),
            toml_str(&stream_prefix),
            toml_str(&name),
            toml_str(&postgres_url),
            toml_str(&name),
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8 path").to_owned();
    let agent_args = ["agent", "--config", &config];

    // The owner, in-process, on the same streams.
    let manifest = Manifest::load(&manifest_path).expect("manifest");
    let mut options = JetStreamOptions::new(&nats_url);
    options.stream_prefix = stream_prefix.clone();
    options.subject_prefix = name.clone();
    let feed = Arc::new(
        JetStreamFeed::connect(options, &manifest)
            .await
            .expect("connect the owner to JetStream"),
    );
    // The test's own view of the copy, on the agent's schema.
    let store = PostgresCopyStore::open(PostgresOptions {
        url: postgres_url.clone(),
        schema: name.clone(),
        readers: Vec::new(),
    })
    .await
    .expect("open the copy's schema");

    // Start the agent before anything is published, and let it finish its
    // (empty) bootstrap, so every change reaches it through the log.
    let mut agent = Proc::spawn(&agent_args);
    agent.wait_addr();
    let start = Instant::now();
    while cursor(&store).await.and_then(|c| c.position).is_none() {
        assert!(
            start.elapsed() < DEADLINE,
            "the agent never bootstrapped; stderr:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        cursor(&store).await.and_then(|c| c.position),
        Some(0),
        "bootstrapped from an empty log"
    );

    let started = Instant::now();
    let published = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish_stream(feed.clone(), published.clone(), seed));
    let mut kills = 0;
    let mut progressed = 0;
    let mut last_position = 0;
    while kills < MIN_KILLS || !publisher.is_finished() {
        // Half of the kills first wait for this agent to apply something (or
        // to have nothing left to apply), so that, however slow a start is on
        // a loaded machine, many land on a working agent in the middle of the
        // stream; the others may land anywhere, start and bootstrap included.
        if rng.bool() {
            let waiting = Instant::now();
            while waiting.elapsed() < PROGRESS_PATIENCE {
                let p = cursor(&store).await.and_then(|c| c.position);
                if p.is_some_and(|p| p > last_position || p >= published.load(Ordering::SeqCst)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..=300))).await;
        if let Some(p) = cursor(&store).await.and_then(|c| c.position) {
            if p > last_position {
                progressed += 1;
                last_position = p;
            }
        }
        agent.kill();
        kills += 1;
        agent = Proc::spawn(&agent_args);
    }
    let Published { model, appended } = publisher.await.expect("publisher");
    println!(
        "{kills} kills in {:.1}s; the copy moved forward between {progressed} of them",
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= MIN_KILLS);
    assert!(
        progressed >= MIN_KILLS / 4,
        "seed {seed}: the agent made progress while being killed ({progressed} times), so the kills landed on a working agent"
    );

    // The log holds each appended change once, and its compacted state is the owner's.
    let head = feed
        .read(DATASET, 0, 1, Duration::ZERO)
        .await
        .expect("head")
        .head;
    assert_eq!(
        head, appended,
        "seed {seed}: the log's head is the number of changes appended"
    );
    assert!(
        head <= CHANGES as u64 && head >= model.len() as u64,
        "seed {seed}: head {head}"
    );
    let start = Instant::now();
    let mut log_state = feed_state(&feed).await;
    // The state stream sources the log asynchronously: give it a moment.
    while log_state != model && start.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_millis(100)).await;
        log_state = feed_state(&feed).await;
    }
    assert_eq!(
        log_state, model,
        "seed {seed}: the compacted state stream is the owner's state"
    );

    // Let the last agent catch up.
    let agent_url = format!("http://{}", agent.wait_addr());
    let start = Instant::now();
    loop {
        let c = cursor(&store).await;
        if c.and_then(|c| c.position) == Some(head) {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "seed {seed}: the copy did not catch up to {head}: {c:?}; stderr:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "caught up to {head} after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The copy holds the owner's state, projected, key by key with versions
    // and tombstones.
    let copy = store.dump(DATASET).await.expect("dump");
    let expected: State = model
        .iter()
        .map(|(k, (v, deleted, f))| {
            (
                k.clone(),
                (*v, *deleted, if *deleted { Map::new() } else { project(f) }),
            )
        })
        .collect();
    let diffs: Vec<_> = expected
        .iter()
        .filter(|(k, want)| copy.get(*k) != Some(want))
        .map(|(k, want)| (k, want, copy.get(k)))
        .take(5)
        .collect();
    assert!(
        diffs.is_empty(),
        "seed {seed}: copy differs from the owner at (key, owner, copy): {diffs:?}"
    );
    assert_eq!(
        copy.len(),
        expected.len(),
        "seed {seed}: the copy has no keys the owner lacks"
    );
    // What the consumer's application reads, the `items` view, holds the
    // live records only, with the projected columns only.
    postgres_exec(&postgres_url, &view_check(&name, &model)).await;

    // Nothing doubled: every log entry received exactly once.
    let c = cursor(&store).await.expect("cursor");
    assert_eq!(c.position, Some(head), "seed {seed}");
    assert_eq!(
        c.received_total, head,
        "seed {seed}: received_total counts each log entry once ({c:?}, head {head})"
    );
    assert!(
        (model.len() as u64..=head).contains(&c.applied_total),
        "seed {seed}: applied_total is at least one per key and at most one per entry ({c:?}, {} keys, head {head})",
        model.len()
    );

    // The agent reports no error and no lag.
    let status: Value = reqwest::get(format!("{agent_url}/v1/status"))
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    let s = &status["copies"][0];
    assert_eq!(s["last_error"], Value::Null, "{status}");
    assert_eq!(s["position"], head, "{status}");
    assert_eq!(s["received_total"], head, "{status}");
    println!("done in {:.1}s", started.elapsed().as_secs_f64());
}
