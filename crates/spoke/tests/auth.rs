//! Issue 5, item 4 end to end: an agent following a hub that requires
//! tokens, the agent's own API token, TLS for both servers with a private
//! CA (fixtures in `tests/fixtures/tls`, see its README), and tokens that
//! never show up in `Debug` output or logs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use spoke::agent::{http as agent_http, Agent, AgentOptions};
use spoke::config::DeploymentConfig;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Feed, FeedBatch, FeedError, Position, Publisher, SnapshotPage};
use spoke::hub::{self, Tokens};
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke::tls::{self, TlsFiles};
use spoke_core::{Manifest, Schema};

const MANIFEST: &str = r#"
[services.customer-service]
[services.order-service]

[datasets.customers]
owner = "customer-service"
key = "id"
fields = { name = "string", email = "string", payment_method_id = "string" }
private = ["payment_method_id"]

[[subscriptions]]
consumer = "order-service"
dataset = "customers"
fields = ["name", "email"]
strategy = "events"
staleness_budget = "1h"
"#;

const OWNER_TOKEN: &str = "cust-owner-token-5b1f";
const CONSUMER_TOKEN: &str = "order-consumer-token-9c2e";
const API_TOKEN: &str = "order-app-api-token-77aa";
const DEADLINE: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn server_files() -> TlsFiles {
    TlsFiles {
        cert: fixture("server.pem"),
        key: fixture("server.key"),
    }
}

fn manifest() -> Manifest {
    Manifest::parse("auth.toml", MANIFEST).expect("manifest")
}

fn customer(i: u32) -> Map<String, Value> {
    json!({ "name": format!("Customer {i}"), "email": format!("c{i}@example.com"), "payment_method_id": format!("pm_secret_{i}") })
        .as_object()
        .cloned()
        .expect("object")
}

struct Hub {
    base: String,
    trigger: ShutdownTrigger,
    _dir: tempfile::TempDir,
}

/// A hub with tokens for both services, over HTTPS when `tls` is set.
async fn start_hub(tls: bool) -> Hub {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest();
    let feed = Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &m).expect("hub store"));
    let tokens = Tokens::new(&BTreeMap::from([
        ("customer-service".to_owned(), OWNER_TOKEN.to_owned()),
        ("order-service".to_owned(), CONSUMER_TOKEN.to_owned()),
    ]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = tls.then(|| tls::server_config(&server_files()).expect("server TLS config"));
    let (trigger, shutdown) = shutdown_channel();
    tokio::spawn(tls::serve(
        listener,
        config,
        hub::router(feed, Arc::new(m), tokens),
        shutdown.signal(),
    ));
    Hub {
        base: format!("{}://{addr}", if tls { "https" } else { "http" }),
        trigger,
        _dir: dir,
    }
}

/// A feed that remembers every field name it handed to the agent, to show
/// what crossed the wire from the hub.
struct Watched {
    inner: HubClient,
    seen: Arc<Mutex<BTreeSet<String>>>,
}

#[async_trait]
impl Feed for Watched {
    async fn read(
        &self,
        dataset: &str,
        after: Position,
        limit: usize,
        wait: Duration,
    ) -> Result<FeedBatch, FeedError> {
        let b = self.inner.read(dataset, after, limit, wait).await?;
        let mut seen = self.seen.lock().expect("seen");
        for e in &b.entries {
            seen.extend(e.change.fields.keys().cloned());
        }
        Ok(b)
    }

    async fn snapshot(
        &self,
        dataset: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, FeedError> {
        let p = self.inner.snapshot(dataset, after_key, limit).await?;
        let mut seen = self.seen.lock().expect("seen");
        for c in &p.records {
            seen.extend(c.fields.keys().cloned());
        }
        Ok(p)
    }

    async fn schema(&self, dataset: &str) -> Result<Schema, FeedError> {
        self.inner.schema(dataset).await
    }
}

struct RunningAgent {
    base: String,
    agent: Arc<Agent>,
    trigger: ShutdownTrigger,
    _dir: tempfile::TempDir,
}

/// An agent for order-service reading `feed`, its API guarded by `api`
/// and served over HTTPS when `tls` is set.
async fn start_agent(feed: Arc<dyn Feed>, api: Tokens, tls: bool) -> RunningAgent {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteCopyStore::open(&dir.path().join("copies.db")).expect("store"));
    let agent = Arc::new(
        Agent::new(Arc::new(manifest()), "order-service", feed, store)
            .expect("agent")
            .with_options(AgentOptions {
                wait: Duration::from_millis(200),
                backoff_max: Duration::from_millis(200),
                ..AgentOptions::default()
            }),
    );
    agent.ensure_copies().await.expect("copies");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = tls.then(|| tls::server_config(&server_files()).expect("server TLS config"));
    let (trigger, shutdown) = shutdown_channel();
    tokio::spawn(tls::serve(
        listener,
        config,
        agent_http::router(agent.clone(), api),
        shutdown.clone().signal(),
    ));
    tokio::spawn(agent.clone().run(shutdown));
    RunningAgent {
        base: format!("{}://{addr}", if tls { "https" } else { "http" }),
        agent,
        trigger,
        _dir: dir,
    }
}

async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = http.get(url).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// Waits until the agent serves customer `key` with `name`.
async fn wait_for(http: &reqwest::Client, agent: &RunningAgent, key: &str, name: &str) -> Value {
    let start = Instant::now();
    loop {
        let (status, v) = get(
            http,
            &format!("{}/v1/copies/customers/records/{key}", agent.base),
            Some(API_TOKEN),
        )
        .await;
        if status == 200 && v["fields"]["name"] == name {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "record {key} never became {name:?}: last answer {status} {v}; status {:?}",
            agent.agent.progress()["customers"].last_error()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn api_tokens() -> Tokens {
    Tokens::new(&BTreeMap::from([
        ("order-app".to_owned(), API_TOKEN.to_owned()),
        ("prometheus".to_owned(), "scraper-token-31d0".to_owned()),
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_its_consumer_token_bootstraps_and_follows_an_authenticated_hub() {
    let hub = start_hub(false).await;
    let owner = HubClient::new(&hub.base, Some(OWNER_TOKEN.to_owned()));
    owner
        .publish(
            "customers",
            (1..=20)
                .map(|i| ChangeInput::upsert(format!("c{i:02}"), 1, customer(i)))
                .collect(),
        )
        .await
        .expect("publish before the agent starts");

    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let feed = Arc::new(Watched {
        inner: HubClient::new(&hub.base, Some(CONSUMER_TOKEN.to_owned())),
        seen: seen.clone(),
    });
    let agent = start_agent(feed, api_tokens(), false).await;
    let http = reqwest::Client::new();

    // Bootstrap.
    let rec = wait_for(&http, &agent, "c07", "Customer 7").await;
    assert_eq!(
        rec["fields"],
        json!({ "name": "Customer 7", "email": "c7@example.com" })
    );
    // Follow.
    let mut renamed = customer(7);
    renamed.insert("name".into(), json!("Customer Seven"));
    owner
        .publish("customers", vec![ChangeInput::upsert("c07", 2, renamed)])
        .await
        .expect("publish after");
    let rec = wait_for(&http, &agent, "c07", "Customer Seven").await;
    assert_eq!(rec["version"], 2);

    // The private field never reached the agent at all: the hub filtered it.
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(
        seen,
        BTreeSet::from(["email".to_owned(), "name".to_owned()]),
        "fields the hub sent the agent"
    );
    agent.trigger.fire();
    hub.trigger.fire();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_wrong_token_gets_nothing_and_says_why() {
    let hub = start_hub(false).await;
    let owner = HubClient::new(&hub.base, Some(OWNER_TOKEN.to_owned()));
    owner
        .publish(
            "customers",
            vec![ChangeInput::upsert("c01", 1, customer(1))],
        )
        .await
        .expect("publish");
    // A token the hub does not know (stolen, stale, mistyped) reads nothing.
    let feed = Arc::new(HubClient::new(
        &hub.base,
        Some("stolen-or-stale".to_owned()),
    ));
    let agent = start_agent(feed, Tokens::default(), false).await;
    let start = Instant::now();
    let error = loop {
        if let Some(e) = agent.agent.progress()["customers"].last_error() {
            break e;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the agent never reported an error"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(error.contains("unknown token"), "{error}");
    let http = reqwest::Client::new();
    let (status, _) = get(
        &http,
        &format!("{}/v1/copies/customers/records/c01", agent.base),
        None,
    )
    .await;
    assert_eq!(status, 404, "nothing was copied");
    agent.trigger.fire();
    hub.trigger.fire();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_api_requires_a_token_when_configured() {
    let hub = start_hub(false).await;
    HubClient::new(&hub.base, Some(OWNER_TOKEN.to_owned()))
        .publish(
            "customers",
            vec![ChangeInput::upsert("c01", 1, customer(1))],
        )
        .await
        .expect("publish");
    let feed = Arc::new(HubClient::new(&hub.base, Some(CONSUMER_TOKEN.to_owned())));
    let agent = start_agent(feed, api_tokens(), false).await;
    let http = reqwest::Client::new();
    wait_for(&http, &agent, "c01", "Customer 1").await;

    for path in [
        "/v1/copies/customers/records/c01",
        "/v1/copies/customers/digest",
        "/v1/copies/customers/digest/entries?buckets=0",
        "/v1/status",
        "/metrics",
    ] {
        let url = format!("{}{path}", agent.base);
        for (case, token, needle) in [
            ("no token", None, "missing Authorization"),
            (
                "wrong token",
                Some("order-app-api-token-77ab"),
                "unknown token",
            ),
            ("the hub token", Some(CONSUMER_TOKEN), "unknown token"),
        ] {
            let (status, v) = get(&http, &url, token).await;
            assert_eq!(status, 401, "{path} with {case}: {v}");
            assert_eq!(v["kind"], "unauthorized", "{path} with {case}: {v}");
            assert!(
                v["error"].as_str().is_some_and(|e| e.contains(needle)),
                "{path} with {case}: {v}"
            );
        }
        let (status, v) = get(&http, &url, Some(API_TOKEN)).await;
        assert_eq!(status, 200, "{path} with the API token: {v}");
        // The scraper's own token reads too (every API token grants the same reads).
        let (status, _) = get(&http, &url, Some("scraper-token-31d0")).await;
        assert_eq!(status, 200, "{path} with the scraper's token");
    }
    let (status, _) = get(&http, &format!("{}/v1/health", agent.base), None).await;
    assert_eq!(status, 200, "health needs no token");
    agent.trigger.fire();
    hub.trigger.fire();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_agent_over_tls_with_a_private_ca() {
    let hub = start_hub(true).await;
    assert!(hub.base.starts_with("https://127.0.0.1:"));
    let ca = fixture("ca.pem");

    // Without the CA: refused, with a message that says what to do.
    let untrusting = HubClient::new(&hub.base, Some(OWNER_TOKEN.to_owned()));
    match untrusting
        .publish(
            "customers",
            vec![ChangeInput::upsert("c01", 1, customer(1))],
        )
        .await
    {
        Err(FeedError::Unavailable(m)) => {
            assert!(m.contains("certificate"), "{m}");
            assert!(m.contains("tls_ca"), "{m}");
        }
        other => panic!("expected a certificate error, got {other:?}"),
    }
    // Plain HTTP to the HTTPS port gets no answer it could read.
    let plain = HubClient::new(
        &hub.base.replace("https", "http"),
        Some(OWNER_TOKEN.to_owned()),
    );
    assert!(plain.schema("customers").await.is_err());

    // With the CA: publishes and an agent follows over HTTPS.
    let owner = HubClient::with_tls_ca(&hub.base, Some(OWNER_TOKEN.to_owned()), &ca)
        .expect("client with CA");
    owner
        .publish(
            "customers",
            vec![ChangeInput::upsert("c01", 1, customer(1))],
        )
        .await
        .expect("publish over TLS");
    let feed = Arc::new(
        HubClient::with_tls_ca(&hub.base, Some(CONSUMER_TOKEN.to_owned()), &ca)
            .expect("client with CA"),
    );
    let agent = start_agent(feed, api_tokens(), true).await;
    assert!(agent.base.starts_with("https://"));
    let roots = tls::client_roots(&ca).expect("CA");
    let mut builder = reqwest::Client::builder();
    for r in roots {
        builder = builder.add_root_certificate(r);
    }
    let https = builder.build().expect("client");
    let rec = wait_for(&https, &agent, "c01", "Customer 1").await;
    assert_eq!(rec["fields"]["email"], "c1@example.com");

    // The agent API without the CA: the handshake fails.
    let err = reqwest::Client::new()
        .get(format!("{}/v1/status", agent.base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect_err("untrusted certificate");
    let mut chain = err.to_string();
    let mut src = std::error::Error::source(&err);
    while let Some(s) = src {
        chain.push_str(&format!(": {s}"));
        src = s.source();
    }
    assert!(chain.contains("certificate"), "{chain}");
    agent.trigger.fire();
    hub.trigger.fire();
}

#[test]
fn tls_files_that_cannot_be_used_are_named() {
    let missing = tls::server_config(&TlsFiles {
        cert: fixture("nope.pem"),
        key: fixture("server.key"),
    })
    .unwrap_err()
    .to_string();
    assert!(
        missing.contains("nope.pem") && missing.contains("cannot read"),
        "{missing}"
    );
    let not_a_cert = tls::server_config(&TlsFiles {
        cert: fixture("README.md"),
        key: fixture("server.key"),
    })
    .unwrap_err()
    .to_string();
    assert!(
        not_a_cert.contains("README.md") && not_a_cert.contains("no certificate"),
        "{not_a_cert}"
    );
    let key_is_a_cert = tls::server_config(&TlsFiles {
        cert: fixture("server.pem"),
        key: fixture("ca.pem"),
    })
    .unwrap_err()
    .to_string();
    assert!(
        key_is_a_cert.contains("ca.pem") && key_is_a_cert.contains("private key"),
        "{key_is_a_cert}"
    );
    let e = HubClient::with_tls_ca("https://h", None, &fixture("server.key"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("server.key") && e.contains("no certificate"),
        "{e}"
    );
}

/// A writer tracing can log into, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[test]
fn tokens_never_appear_in_debug_output_or_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = [
        "file-token-secret-1",
        "env-token-secret-2",
        "api-token-secret-3",
    ];
    std::fs::write(dir.path().join("owner.token"), format!("{}\n", secrets[0])).expect("write");
    std::fs::write(dir.path().join("api.token"), secrets[2]).expect("write");
    // A variable name no other test uses, so tests running in parallel agree.
    std::env::set_var("SPOKE_AUTH_TEST_TOKEN", secrets[1]);
    let text = r#"
manifest = "m.toml"
[hub]
listen = "127.0.0.1:0"
data_dir = "hub"
[hub.tokens]
customer-service = { file = "owner.token" }
order-service = { env = "SPOKE_AUTH_TEST_TOKEN" }
[agent]
consumer = "order-service"
listen = "127.0.0.1:0"
data_dir = "agent"
hub = "http://127.0.0.1:1"
token = { env = "SPOKE_AUTH_TEST_TOKEN" }
[agent.api_tokens]
order-app = { file = "api.token" }
"#;
    let config = DeploymentConfig::parse("spoke.toml", text, dir.path()).expect("config");
    let hub_tokens =
        Tokens::read(&config.hub().expect("hub").tokens, "hub.tokens").expect("tokens");
    let api = Tokens::read(
        &config.agent().expect("agent").api_tokens,
        "agent.api_tokens",
    )
    .expect("tokens");
    let client = HubClient::new("http://127.0.0.1:1", Some(secrets[1].to_owned()));
    let shown = format!("{config:?} {config:#?} {hub_tokens:?} {api:?} {client:?}");
    assert!(
        shown.contains("customer-service") && shown.contains("order-app"),
        "{shown}"
    );
    for s in secrets {
        assert!(!shown.contains(s), "{s} printed in {shown}");
    }

    // Logs of a hub and an agent API at TRACE while right and wrong tokens arrive.
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let m = manifest();
            let feed = Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &m).expect("store"));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            let (trigger, shutdown) = shutdown_channel();
            let server = tokio::spawn(tls::serve(
                listener,
                None,
                hub::router(feed, Arc::new(m), hub_tokens),
                shutdown.signal(),
            ));
            let owner = HubClient::new(&base, Some(secrets[0].to_owned()));
            owner
                .publish(
                    "customers",
                    vec![ChangeInput::upsert("c01", 1, customer(1))],
                )
                .await
                .expect("publish");
            let wrong = HubClient::new(&base, Some(format!("{}x", secrets[1])));
            assert!(wrong.schema("customers").await.is_err());
            let consumer = HubClient::new(&base, Some(secrets[1].to_owned()));
            consumer.schema("customers").await.expect("schema");
            trigger.fire();
            server.await.expect("join").expect("serve");
        });
    });
    let logs = String::from_utf8(logs.0.lock().expect("log").clone()).expect("utf-8");
    assert!(
        logs.contains("hub requires bearer tokens"),
        "the capture works: {logs}"
    );
    for s in secrets {
        assert!(!logs.contains(s), "{s} logged: {logs}");
    }
}
