//! Issue 4's crash test with real processes: `spoke cdc` captures an owner's
//! PostgreSQL table (a private instance with wal_level=logical) into a
//! `spoke hub` child, and is killed with SIGKILL at random instants — during
//! the initial snapshot and while streaming — at least 20 times, while a
//! writer commits inserts, updates and deletes in multi-row transactions
//! (and rolls some back). Afterwards:
//! - the hub's compacted state equals the owner table (every live row with
//!   its fields, no row the table does not have);
//! - the hub's log holds no (key, version) twice: a replay after a kill is
//!   ignored by the hub, never appended again.

mod support;

use support::Proc;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use spoke::feed::http::HubClient;
use spoke::feed::Feed;
use spoke::testing::PrivatePostgres;
use spoke_core::Op;

const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int", label = "string?" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n", "label"]
strategy = "cdc"
staleness_budget = "1m"
"#;

const KEYS: usize = 300;
const SEED_ROWS: usize = 3000;
const MIN_KILLS: usize = 20;
const DEADLINE: Duration = Duration::from_secs(180);

fn psql_bin() -> std::path::PathBuf {
    spoke::testing::postgres_bin_dir()
        .map(|d| d.join("psql"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "psql".into())
}

/// Runs one SQL command with psql and returns its unaligned output.
fn psql(url: &str, sql: &str) -> String {
    let out = Command::new(psql_bin())
        .args([
            url,
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql failed: {}\n{sql}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The owner's writer: one psql session fed transactions on stdin until
/// `stop`. Returns how many transactions it sent.
fn writer(url: String, seed: u64, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut child = Command::new(psql_bin())
        .args([url.as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn psql writer");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let mut sql = String::from("BEGIN;\n");
        for _ in 0..rng.usize(1..=5) {
            let key = format!("item-{:04}", rng.usize(..KEYS) * (SEED_ROWS / KEYS) + 1);
            match rng.u8(..10) {
                0..=3 => sql.push_str(&format!(
                    "INSERT INTO items (id, n, label) VALUES ('{key}', {}, 'w{n}') ON CONFLICT (id) DO UPDATE SET n = excluded.n, label = excluded.label;\n",
                    rng.i32(0..1_000_000)
                )),
                4..=6 => sql.push_str(&format!(
                    "UPDATE items SET n = n + 1, label = CASE WHEN n % 3 = 0 THEN NULL ELSE 'u{n}' END WHERE id = '{key}';\n"
                )),
                _ => sql.push_str(&format!("DELETE FROM items WHERE id = '{key}';\n")),
            }
        }
        sql.push_str(if rng.u8(..12) == 0 {
            "ROLLBACK;\n"
        } else {
            "COMMIT;\n"
        });
        if stdin.write_all(sql.as_bytes()).is_err() {
            break;
        }
        n += 1;
        sent.store(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(rng.u64(0..4)));
    }
    drop(stdin);
    let _ = child.wait();
}

type State = BTreeMap<String, Map<String, Value>>;

fn owner_state(url: &str) -> State {
    let json = psql(
        url,
        "SELECT coalesce(json_object_agg(id, json_build_object('n', n, 'label', label)), '{}') FROM items",
    );
    let all: Map<String, Value> = serde_json::from_str(&json).expect("owner json");
    all.into_iter()
        .map(|(k, v)| (k, v.as_object().cloned().unwrap_or_default()))
        .collect()
}

async fn hub_state(hub: &HubClient) -> State {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = hub
            .snapshot("items", after.as_deref(), 1000)
            .await
            .expect("snapshot");
        for c in page.records {
            if c.op == Op::Upsert {
                let mut f = c.fields;
                f.entry("label".to_owned()).or_insert(Value::Null);
                out.insert(c.key, f);
            }
        }
        match page.next_after_key {
            Some(k) => after = Some(k),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_spoke_cdc_at_random_instants_loses_and_doubles_nothing() {
    let seed = support::seed();
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pg) = PrivatePostgres::start(&dir.path().join("pg")) else {
        return;
    };
    let url = pg.url();
    psql(
        &url,
        &format!(
            "CREATE TABLE items (id text PRIMARY KEY, n integer NOT NULL, label text, internal text);
             INSERT INTO items SELECT 'item-' || lpad(i::text, 4, '0'), i, 'seed', 'not published'
             FROM generate_series(1, {SEED_ROWS}) i;"
        ),
    );
    let manifest = dir.path().join("manifest.toml");
    std::fs::write(&manifest, MANIFEST).expect("write manifest");

    let hub_proc = Proc::spawn(&[
        "hub",
        "--manifest",
        manifest.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--data",
        dir.path().join("hub").to_str().expect("utf-8"),
    ]);
    let line = hub_proc
        .wait_line_within("listening on http://", DEADLINE)
        .unwrap_or_else(|| panic!("hub did not start:\n{}", hub_proc.log()));
    let addr = line
        .split("listening on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address");
    let hub_url = format!("http://{addr}");
    let hub = HubClient::new(&hub_url, None);

    let config = dir.path().join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "manifest = \"manifest.toml\"\npostgres = \"{url}\"\npublication = \"crash_pub\"\nslot = \"crash_slot\"\nhub = \"{hub_url}\"\nsnapshot_chunk = 100\nbatch = 200\nheartbeat_secs = 1\nstatus_every_secs = 1\n\n[datasets.items]\ntable = \"public.items\"\nkey = \"id\"\n"
        ),
    )
    .expect("write cdc config");
    let cdc_args = ["cdc", "--config", config.to_str().expect("utf-8")];

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let (url, stop, sent) = (url.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || writer(url, seed, stop, sent))
    };

    let started = Instant::now();
    let (mut kills, mut during_snapshot, mut while_streaming) = (0, 0, 0);
    while kills < MIN_KILLS {
        assert!(started.elapsed() < DEADLINE, "kills took too long");
        let mut cdc = Proc::spawn(&cdc_args);
        if kills == 0 {
            // The first kill lands in the middle of the initial snapshot.
            cdc.wait_line_within("cdc snapshot of", Duration::from_secs(60))
                .unwrap_or_else(|| panic!("no snapshot progress:\n{}", cdc.log()));
        } else {
            std::thread::sleep(Duration::from_millis(rng.u64(50..1500)));
        }
        assert!(!cdc.exited(), "spoke cdc stopped by itself:\n{}", cdc.log());
        let log = cdc.log();
        cdc.kill();
        if log.contains("cdc streaming") {
            while_streaming += 1;
        } else {
            during_snapshot += 1;
        }
        kills += 1;
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    println!(
        "{kills} SIGKILLs ({during_snapshot} before streaming, {while_streaming} while streaming); {} transactions written",
        sent.load(Ordering::SeqCst)
    );
    assert!(while_streaming >= 10, "most kills must hit the stream");

    let cdc = Proc::spawn(&cdc_args);
    let owner = owner_state(&url);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let copy = hub_state(&hub).await;
        if copy == owner {
            break;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> = owner
                .iter()
                .filter(|(k, v)| copy.get(*k) != Some(v))
                .map(|(k, v)| (k.clone(), Some(v.clone()), copy.get(k).cloned()))
                .chain(
                    copy.iter()
                        .filter(|(k, _)| !owner.contains_key(*k))
                        .map(|(k, v)| (k.clone(), None, Some(v.clone()))),
                )
                .take(10)
                .collect();
            panic!(
                "the hub never equalled the owner table ({} rows vs {} records); first differences (key, owner, hub): {diff:?}\ncdc log:\n{}",
                owner.len(),
                copy.len(),
                cdc.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each (key, version) once in the log.
    let mut seen = HashSet::new();
    let mut pos = 0;
    loop {
        let b = hub
            .read("items", pos, 5_000, Duration::ZERO)
            .await
            .expect("read log");
        if b.entries.is_empty() {
            break;
        }
        for e in b.entries {
            pos = e.position;
            assert!(
                seen.insert((e.change.key.clone(), e.change.version)),
                "({}, {}) is in the hub's log twice",
                e.change.key,
                e.change.version
            );
        }
    }
    println!("the hub's log holds {pos} entries, each (key, version) once; its state equals the owner table ({} rows)", owner.len());
    drop(cdc);
    drop(hub_proc);
}
