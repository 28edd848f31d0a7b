//! Rules 4 and 8 at the hub's HTTP door: hostile and malformed requests get
//! the right status and a JSON error body `{error, kind}`, and change nothing.
//!
//! The real router runs in-process over an SQLite feed, with tokens for four
//! services (`owner-svc` owns `items` and `notes`; `ledger-svc` owns
//! `ledger`; `reader-svc` subscribes to `items` only; `auditor-svc` too, and
//! is granted the private field `cost`), served on 127.0.0.1:0 and called
//! with reqwest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{ChangeInput, Feed, FeedEntry, Publisher, MAX_BATCH};
use spoke::hub::{self, Tokens, MAX_BODY_BYTES};
use spoke_core::{Change, Manifest};

const MANIFEST: &str = r#"
[services.owner-svc]
[services.reader-svc]
[services.auditor-svc]
[services.ledger-svc]

[datasets.items]
owner = "owner-svc"
key = "id"
fields = { n = "int", label = "string?", price = "float?", cost = "float?" }
private = ["cost"]
grants = { "auditor-svc" = ["cost"] }

[datasets.ledger]
owner = "ledger-svc"
key = "id"
fields = { amount = "int" }

[datasets.notes]
owner = "owner-svc"
key = "id"
fields = { text = "string" }

[[subscriptions]]
consumer = "reader-svc"
dataset = "items"
fields = ["n", "label"]
staleness_budget = "1m"

[[subscriptions]]
consumer = "auditor-svc"
dataset = "items"
fields = ["n", "cost"]
staleness_budget = "1m"
"#;

const OWNER: &str = "owner-secret-token";
const READER: &str = "reader-secret-token";
const AUDITOR: &str = "auditor-secret-token";
const LEDGER: &str = "ledger-secret-token";

struct TestHub {
    base: String,
    http: reqwest::Client,
    owner: HubClient,
    ledger: HubClient,
    _dir: tempfile::TempDir,
}

/// Everything observable about the store: per dataset, the log and the snapshot.
#[derive(Debug, PartialEq)]
struct State {
    heads: Vec<u64>,
    logs: Vec<Vec<FeedEntry>>,
    snapshots: Vec<Vec<Change>>,
    /// Each dataset's registered schema versions.
    schemas: Vec<Vec<u8>>,
}

async fn start() -> TestHub {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = Manifest::parse("hub_http.toml", MANIFEST).expect("manifest");
    let feed =
        Arc::new(SqliteFeed::open(&dir.path().join("hub.db"), &manifest).expect("hub store"));
    let tokens = Tokens::new(&BTreeMap::from([
        ("owner-svc".to_owned(), OWNER.to_owned()),
        ("reader-svc".to_owned(), READER.to_owned()),
        ("auditor-svc".to_owned(), AUDITOR.to_owned()),
        ("ledger-svc".to_owned(), LEDGER.to_owned()),
    ]));
    let router = hub::router(feed, Arc::new(manifest), tokens);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(hub::serve(listener, router, std::future::pending()));
    let hub = TestHub {
        owner: HubClient::new(&base, Some(OWNER.to_owned())),
        ledger: HubClient::new(&base, Some(LEDGER.to_owned())),
        base,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client"),
        _dir: dir,
    };
    // Something to lose: a few records, an update and a tombstone.
    let f = |n: i64| {
        json!({ "n": n, "label": format!("L{n}"), "price": n as f64 * 1.5, "cost": n as f64 * 0.25 })
            .as_object()
            .cloned()
            .expect("object")
    };
    hub.owner
        .publish(
            "items",
            vec![
                ChangeInput::upsert("a", 1, f(1)),
                ChangeInput::upsert("b", 1, f(2)),
                ChangeInput::upsert("c", 1, f(3)),
            ],
        )
        .await
        .expect("seed items");
    hub.owner
        .publish(
            "items",
            vec![
                ChangeInput::upsert("a", 2, f(10)),
                ChangeInput::delete("c", 2),
            ],
        )
        .await
        .expect("seed items");
    hub.owner
        .publish(
            "notes",
            vec![ChangeInput::upsert(
                "x",
                1,
                json!({"text": "hello"})
                    .as_object()
                    .cloned()
                    .expect("object"),
            )],
        )
        .await
        .expect("seed notes");
    hub
}

impl TestHub {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Vec<u8>) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: request failed: {e}"));
        let status = resp.status().as_u16();
        (status, resp.bytes().await.expect("body").to_vec())
    }

    async fn publish_raw(
        &self,
        dataset: &str,
        token: Option<&str>,
        body: impl Into<Vec<u8>>,
    ) -> (u16, Vec<u8>) {
        self.call(
            Method::POST,
            &format!("/v1/datasets/{dataset}/changes"),
            token,
            Some(body.into()),
        )
        .await
    }

    async fn state(&self) -> State {
        let mut s = State {
            heads: vec![],
            logs: vec![],
            snapshots: vec![],
            schemas: vec![],
        };
        for (ds, client) in [
            ("items", &self.owner),
            ("notes", &self.owner),
            ("ledger", &self.ledger),
        ] {
            let b = client
                .read(ds, 0, 10_000, Duration::ZERO)
                .await
                .expect("read log");
            s.heads.push(b.head);
            s.logs.push(b.entries);
            let mut records = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = client
                    .snapshot(ds, after.as_deref(), 1_000)
                    .await
                    .expect("snapshot");
                records.extend(page.records);
                match page.next_after_key {
                    Some(k) => after = Some(k),
                    None => break,
                }
            }
            s.snapshots.push(records);
            let token = if ds == "ledger" { LEDGER } else { OWNER };
            let (status, versions) = self
                .call(
                    Method::GET,
                    &format!("/v1/datasets/{ds}/schema/versions"),
                    Some(token),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&versions));
            s.schemas.push(versions);
        }
        s
    }
}

/// Checks an error answer: status, a JSON body with `error` and `kind`, and
/// that the message holds every `needle`. Returns the body.
fn expect_error(
    case: &str,
    (status, body): &(u16, Vec<u8>),
    want_status: u16,
    want_kind: &str,
    needles: &[&str],
) -> Value {
    let text = String::from_utf8_lossy(body);
    assert_eq!(*status, want_status, "{case}: status (body: {text})");
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{case}: the error body is not JSON ({e}): {text:.300}"));
    let error = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: no `error` text in {v}"));
    assert!(!error.is_empty(), "{case}: empty error message");
    assert_eq!(v["kind"].as_str(), Some(want_kind), "{case}: kind in {v}");
    for n in needles {
        assert!(
            error.contains(n),
            "{case}: the message should mention {n:?}: {error}"
        );
    }
    v
}

fn change(key: &str, version: Value, op: &str, fields: Value) -> Value {
    json!({ "key": key, "version": version, "op": op, "fields": fields })
}

fn ok_fields() -> Value {
    json!({ "n": 1 })
}

/// A batch around `bad`: one good change before it and one after, so
/// all-or-nothing is checked on every case.
fn around(bad: Value) -> Vec<u8> {
    serde_json::to_vec(&json!([
        change("good-1", json!(1), "upsert", ok_fields()),
        bad,
        change("good-2", json!(1), "upsert", ok_fields())
    ]))
    .expect("json")
}

/// (case, body, status, kind, what the message must mention).
type Case = (&'static str, Vec<u8>, u16, &'static str, Vec<&'static str>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_invalid_publishes_are_rejected_and_change_nothing() {
    let hub = start().await;
    let before = hub.state().await;
    assert_eq!(before.heads, vec![5, 1, 0], "seeded");

    let long_key = "k".repeat(513);
    let cases: Vec<Case> = vec![
        ("malformed JSON", b"[{\"key\": \"a\", \"version\": ".to_vec(), 400, "bad_request", vec!["JSON array of changes"]),
        ("not JSON at all", b"key=a&version=1".to_vec(), 400, "bad_request", vec!["JSON array"]),
        ("body is an object, not an array", serde_json::to_vec(&change("a", json!(9), "upsert", ok_fields())).expect("json"), 400, "bad_request", vec!["JSON array"]),
        ("array of numbers", b"[1, 2]".to_vec(), 400, "bad_request", vec![]),
        ("empty body", Vec::new(), 400, "bad_request", vec![]),
        (
            "wrong field type",
            around(change("bad", json!(1), "upsert", json!({ "n": "seven" }))),
            400,
            "invalid",
            vec!["key 'bad'", "field 'n' must be int, got a string"],
        ),
        ("float for an int", around(change("bad", json!(1), "upsert", json!({ "n": 1.5 }))), 400, "invalid", vec!["key 'bad'", "field 'n' must be int"]),
        ("null for a required field", around(change("bad", json!(1), "upsert", json!({ "n": null }))), 400, "invalid", vec!["field 'n'", "null"]),
        ("wrong optional field type", around(change("bad", json!(1), "upsert", json!({ "n": 1, "price": "cheap" }))), 400, "invalid", vec!["key 'bad'", "'price'"]),
        ("missing required field", around(change("bad", json!(1), "upsert", json!({ "label": "x" }))), 400, "invalid", vec!["key 'bad'", "required field 'n' is missing"]),
        ("field not in the schema", around(change("bad", json!(1), "upsert", json!({ "n": 1, "zzz": 1 }))), 400, "invalid", vec!["key 'bad'", "field 'zzz' is not in the schema"]),
        (
            "unknown property on a change",
            around(json!({ "key": "bad", "version": 1, "op": "upsert", "fields": { "n": 1 }, "colour": "red" })),
            400,
            "bad_request",
            vec!["colour"],
        ),
        ("missing key", around(json!({ "version": 1, "op": "upsert", "fields": { "n": 1 } })), 400, "bad_request", vec!["key"]),
        ("missing version", around(json!({ "key": "bad", "op": "upsert", "fields": { "n": 1 } })), 400, "bad_request", vec!["version"]),
        ("missing op", around(json!({ "key": "bad", "version": 1, "fields": { "n": 1 } })), 400, "bad_request", vec!["op"]),
        ("empty key", around(change("", json!(1), "upsert", ok_fields())), 400, "invalid", vec!["key is empty"]),
        ("key with a control char", around(change("a\u{1}b", json!(1), "upsert", ok_fields())), 400, "invalid", vec!["control character"]),
        ("key with a newline", around(change("a\nb", json!(1), "upsert", ok_fields())), 400, "invalid", vec!["control character"]),
        ("513-byte key", around(change(&long_key, json!(1), "upsert", ok_fields())), 400, "invalid", vec!["513 bytes", "512"]),
        ("key is a number", around(json!({ "key": 5, "version": 1, "op": "upsert", "fields": { "n": 1 } })), 400, "bad_request", vec!["key"]),
        ("version 0", around(change("bad", json!(0), "upsert", ok_fields())), 400, "invalid", vec!["version must be a positive integer"]),
        ("negative version", around(change("bad", json!(-1), "upsert", ok_fields())), 400, "bad_request", vec!["-1"]),
        ("string version", around(change("bad", json!("7"), "upsert", ok_fields())), 400, "bad_request", vec!["string"]),
        ("float version", around(change("bad", json!(1.5), "upsert", ok_fields())), 400, "bad_request", vec!["1.5"]),
        ("version beyond u64", b"[{\"key\":\"bad\",\"version\":18446744073709551616,\"op\":\"upsert\",\"fields\":{\"n\":1}}]".to_vec(), 400, "bad_request", vec![]),
        ("op not upsert or delete", around(change("bad", json!(1), "insert", ok_fields())), 400, "bad_request", vec!["insert"]),
        ("op in capitals", around(change("bad", json!(1), "UPSERT", ok_fields())), 400, "bad_request", vec!["UPSERT"]),
        ("delete carrying fields", around(change("a", json!(99), "delete", ok_fields())), 400, "invalid", vec!["a delete must not carry fields"]),
        ("fields not an object", around(change("bad", json!(1), "upsert", json!([1, 2]))), 400, "bad_request", vec![]),
        ("ts not a number", around(json!({ "key": "bad", "version": 1, "op": "upsert", "fields": { "n": 1 }, "ts": "now" })), 400, "bad_request", vec![]),
    ];
    for (case, body, status, kind, needles) in cases {
        let answer = hub.publish_raw("items", Some(OWNER), body).await;
        let v = expect_error(case, &answer, status, kind, &needles);
        if kind == "invalid" {
            assert_eq!(
                v["index"], 1,
                "{case}: the error names the bad change's index in the batch"
            );
        }
        assert_eq!(hub.state().await, before, "{case}: the store is unchanged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_and_bodies_are_413_and_change_nothing() {
    let hub = start().await;
    let before = hub.state().await;

    let batch: Vec<Value> = (0..=MAX_BATCH)
        .map(|i| change(&format!("big{i}"), json!(1), "upsert", ok_fields()))
        .collect();
    assert_eq!(batch.len(), 10_001);
    let answer = hub
        .publish_raw(
            "items",
            Some(OWNER),
            serde_json::to_vec(&batch).expect("json"),
        )
        .await;
    expect_error(
        "batch of 10,001",
        &answer,
        413,
        "too_large",
        &["10001", "10000"],
    );
    assert_eq!(
        hub.state().await,
        before,
        "batch of 10,001: the store is unchanged"
    );

    // Exactly the limit is accepted (so the 413 above is about the count).
    let batch: Vec<Value> = batch.into_iter().take(MAX_BATCH).collect();
    let (status, body) = hub
        .publish_raw(
            "items",
            Some(OWNER),
            serde_json::to_vec(&batch).expect("json"),
        )
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let before = hub.state().await;
    assert_eq!(before.heads[0], 5 + MAX_BATCH as u64);

    // A body over 16 MiB: a well-formed, empty JSON array padded with
    // whitespace, so only its size can make it fail.
    let mut body = Vec::with_capacity(MAX_BODY_BYTES + 1024);
    body.push(b'[');
    body.resize(MAX_BODY_BYTES + 1000, b' ');
    body.push(b']');
    let answer = hub.publish_raw("items", Some(OWNER), body).await;
    expect_error("body over 16 MiB", &answer, 413, "too_large", &["16777216"]);
    assert_eq!(
        hub.state().await,
        before,
        "body over 16 MiB: the store is unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_ownership_are_enforced() {
    let hub = start().await;
    let before = hub.state().await;
    let good = serde_json::to_vec(&json!([change("auth", json!(1), "upsert", ok_fields())]))
        .expect("json");

    let answer = hub.publish_raw("items", None, good.clone()).await;
    expect_error(
        "missing token",
        &answer,
        401,
        "unauthorized",
        &["Authorization"],
    );
    let answer = hub
        .publish_raw("items", Some("not-a-token"), good.clone())
        .await;
    expect_error(
        "wrong token",
        &answer,
        401,
        "unauthorized",
        &["unknown token"],
    );
    let answer = hub
        .call(
            Method::POST,
            "/v1/datasets/items/changes",
            None,
            Some(good.clone()),
        )
        .await;
    expect_error("no header at all", &answer, 401, "unauthorized", &[]);
    let resp = hub
        .http
        .post(format!("{}/v1/datasets/items/changes", hub.base))
        .header("Authorization", format!("Basic {OWNER}"))
        .body(good.clone())
        .send()
        .await
        .expect("send");
    let answer = (
        resp.status().as_u16(),
        resp.bytes().await.expect("body").to_vec(),
    );
    expect_error(
        "not a bearer token",
        &answer,
        401,
        "unauthorized",
        &["Bearer"],
    );
    assert_eq!(
        hub.state().await,
        before,
        "unauthenticated publishes change nothing"
    );

    // Rule 4: only the owner publishes, even a service with a valid token.
    let answer = hub.publish_raw("items", Some(READER), good.clone()).await;
    expect_error(
        "a subscriber publishing",
        &answer,
        403,
        "forbidden",
        &["reader-svc", "owner-svc", "items"],
    );
    let answer = hub
        .publish_raw(
            "notes",
            Some(READER),
            serde_json::to_vec(&json!([change(
                "n1",
                json!(1),
                "upsert",
                json!({"text": "t"})
            )]))
            .expect("json"),
        )
        .await;
    expect_error(
        "a stranger publishing",
        &answer,
        403,
        "forbidden",
        &["reader-svc", "owner-svc", "notes"],
    );
    assert_eq!(
        hub.state().await,
        before,
        "forbidden publishes change nothing"
    );

    // Reads: the owner and subscribers only.
    for path in [
        "/v1/datasets/notes/changes?after=0",
        "/v1/datasets/notes/snapshot",
        "/v1/datasets/notes/schema",
    ] {
        let answer = hub.call(Method::GET, path, Some(READER), None).await;
        expect_error(path, &answer, 403, "forbidden", &["reader-svc", "notes"]);
        let answer = hub.call(Method::GET, path, None, None).await;
        expect_error(path, &answer, 401, "unauthorized", &[]);
        let answer = hub.call(Method::GET, path, Some("nope"), None).await;
        expect_error(path, &answer, 401, "unauthorized", &[]);
        let (status, _) = hub.call(Method::GET, path, Some(OWNER), None).await;
        assert_eq!(status, 200, "{path}: the owner reads its own dataset");
    }
    for path in [
        "/v1/datasets/items/changes?after=0",
        "/v1/datasets/items/snapshot",
        "/v1/datasets/items/schema",
    ] {
        let (status, body) = hub.call(Method::GET, path, Some(READER), None).await;
        assert_eq!(
            status,
            200,
            "{path}: a subscriber reads: {}",
            String::from_utf8_lossy(&body)
        );
    }
    // The owner itself still publishes.
    let (status, body) = hub.publish_raw("items", Some(OWNER), good).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(hub.state().await.heads[0], before.heads[0] + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_datasets_bad_queries_and_unknown_endpoints_are_errors() {
    let hub = start().await;
    let before = hub.state().await;
    let good =
        serde_json::to_vec(&json!([change("z", json!(1), "upsert", ok_fields())])).expect("json");

    let answer = hub.publish_raw("nope", Some(OWNER), good).await;
    expect_error(
        "publish to an unknown dataset",
        &answer,
        404,
        "unknown_dataset",
        &["nope"],
    );
    for path in [
        "/v1/datasets/nope/changes",
        "/v1/datasets/nope/snapshot",
        "/v1/datasets/nope/schema",
    ] {
        let answer = hub.call(Method::GET, path, Some(OWNER), None).await;
        expect_error(path, &answer, 404, "unknown_dataset", &["nope"]);
    }

    for (path, needles) in [
        ("/v1/datasets/items/changes?after=-1", vec!["after"]),
        ("/v1/datasets/items/changes?after=abc", vec!["after"]),
        ("/v1/datasets/items/changes?limit=0", vec!["limit"]),
        ("/v1/datasets/items/changes?limit=abc", vec!["limit"]),
        ("/v1/datasets/items/changes?limit=-5", vec!["limit"]),
        ("/v1/datasets/items/changes?limit=10001", vec!["limit"]),
        ("/v1/datasets/items/changes?wait_ms=soon", vec!["wait_ms"]),
        (
            "/v1/datasets/items/changes?after=0&colour=red",
            vec!["colour"],
        ),
        ("/v1/datasets/items/snapshot?limit=0", vec!["limit"]),
        ("/v1/datasets/items/snapshot?limit=abc", vec!["limit"]),
        (
            "/v1/datasets/items/snapshot?after_key=a%01b",
            vec!["after_key"],
        ),
    ] {
        let answer = hub.call(Method::GET, path, Some(OWNER), None).await;
        expect_error(path, &answer, 400, "bad_request", &needles);
    }
    // Sanity: the same endpoints answer well-formed queries.
    let (status, body) = hub
        .call(
            Method::GET,
            "/v1/datasets/items/changes?after=0&limit=10&wait_ms=0",
            Some(OWNER),
            None,
        )
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["head"], 5);

    for path in [
        "/v1/nothing",
        "/v2/datasets/items/changes",
        "/v1/datasets/items/everything",
    ] {
        let answer = hub.call(Method::GET, path, Some(OWNER), None).await;
        assert!(
            (400..500).contains(&answer.0),
            "{path}: an unknown endpoint is a client error, got {}",
            answer.0
        );
        let v: Value = serde_json::from_slice(&answer.1)
            .unwrap_or_else(|e| panic!("{path}: error body is not JSON: {e}"));
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("no such endpoint")),
            "{path}: {v}"
        );
        assert!(v["kind"].is_string(), "{path}: {v}");
    }
    assert_eq!(hub.state().await, before, "none of these changed the store");
}

/// An unknown endpoint is "not found" — as the agent's API answers it — not
/// a malformed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_endpoint_is_404() {
    let hub = start().await;
    let answer = hub
        .call(Method::GET, "/v1/nothing", Some(OWNER), None)
        .await;
    expect_error(
        "unknown endpoint",
        &answer,
        404,
        "not_found",
        &["no such endpoint"],
    );
}

/// A known path with a method it does not serve still answers with the
/// JSON error body every client maps back to an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_answers_405_with_a_json_error() {
    let hub = start().await;
    let before = hub.state().await;
    for (method, path) in [
        (Method::DELETE, "/v1/datasets/items/changes"),
        (Method::PUT, "/v1/datasets/items/changes"),
        (Method::POST, "/v1/datasets/items/snapshot"),
    ] {
        let answer = hub
            .call(method.clone(), path, Some(OWNER), Some(b"[]".to_vec()))
            .await;
        assert_eq!(answer.0, 405, "{method} {path}");
        let v: Value = serde_json::from_slice(&answer.1).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: the 405 body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&answer.1)
            )
        });
        assert!(
            v["error"].is_string() && v["kind"].is_string(),
            "{method} {path}: {v}"
        );
    }
    assert_eq!(hub.state().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_bad_change_in_the_middle_appends_nothing() {
    let hub = start().await;
    let before = hub.state().await;
    let mut batch: Vec<Value> = (0..20)
        .map(|i| change(&format!("m{i:02}"), json!(1), "upsert", json!({ "n": i })))
        .collect();
    batch[11] = change("m11", json!(1), "upsert", json!({ "n": "eleven" }));
    let answer = hub
        .publish_raw(
            "items",
            Some(OWNER),
            serde_json::to_vec(&batch).expect("json"),
        )
        .await;
    let v = expect_error(
        "bad change at index 11",
        &answer,
        400,
        "invalid",
        &["key 'm11'", "field 'n'"],
    );
    assert_eq!(v["index"], 11, "the error names the change");
    assert_eq!(
        hub.state().await,
        before,
        "nothing before or after the bad change was appended"
    );

    // Through the client, the same rejection is a FeedError::Invalid with its index.
    let inputs: Vec<ChangeInput> = serde_json::from_value(Value::Array(batch)).expect("inputs");
    match hub.owner.publish("items", inputs).await {
        Err(spoke::feed::FeedError::Invalid { index, message }) => {
            assert_eq!(index, 11);
            assert!(message.contains("field 'n' must be int"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(hub.state().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_reported_as_ignored_with_the_same_head() {
    let hub = start().await;
    let batch = serde_json::to_vec(&json!([
        change("r1", json!(1), "upsert", json!({ "n": 1 })),
        change("a", json!(3), "upsert", json!({ "n": 3 })),
        change("r1", json!(2), "delete", json!({})),
    ]))
    .expect("json");
    let (status, body) = hub.publish_raw("items", Some(OWNER), batch.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let first: Value = serde_json::from_slice(&body).expect("receipt");
    assert_eq!(
        first,
        json!({ "positions": [6, 7, 8], "ignored": 0, "head": 8 })
    );
    let after_first = hub.state().await;

    for attempt in 0..3 {
        let (status, body) = hub.publish_raw("items", Some(OWNER), batch.clone()).await;
        assert_eq!(status, 200, "a retry is not an error");
        let retry: Value = serde_json::from_slice(&body).expect("receipt");
        assert_eq!(
            retry,
            json!({ "positions": [null, null, null], "ignored": 3, "head": 8 }),
            "attempt {attempt}"
        );
        assert_eq!(hub.state().await, after_first, "a retry appends nothing");
    }
    // An older version of a key the hub already holds newer is ignored too.
    let stale = serde_json::to_vec(&json!([change(
        "a",
        json!(1),
        "upsert",
        json!({ "n": -1 })
    )]))
    .expect("json");
    let (status, body) = hub.publish_raw("items", Some(OWNER), stale).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).expect("receipt"),
        json!({ "positions": [null], "ignored": 1, "head": 8 })
    );
    assert_eq!(hub.state().await, after_first);
}

/// An `Authorization` header as raw bytes, so malformed ones can be sent too.
fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

/// (case, method, path, Authorization header, body, status, kind, needles).
type AuthCase = (
    &'static str,
    Method,
    &'static str,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    u16,
    &'static str,
    Vec<&'static str>,
);

/// Issue 5, item 4: with tokens configured every endpoint but health needs
/// a known token (401), publishing needs the dataset's owner and reading its
/// owner or a subscriber (403, naming service and dataset); every refusal is
/// a JSON error and leaves the hub exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_against_a_hub_with_tokens_are_refused_and_change_nothing() {
    let hub = start().await;
    let before = hub.state().await;
    let publish = serde_json::to_vec(&json!([change("evil", json!(9), "upsert", ok_fields())]))
        .expect("json");
    let ledger_publish = serde_json::to_vec(&json!([change(
        "evil",
        json!(9),
        "upsert",
        json!({"amount": 1})
    )]))
    .expect("json");
    let keys = br#"{"keys": ["a", "x"]}"#.to_vec();
    let huge = bearer(&"t".repeat(16 * 1024));
    let reads_of = |ds: &'static str| -> Vec<(Method, &'static str)> {
        match ds {
            "notes" => vec![
                (Method::GET, "/v1/datasets/notes/changes?after=0"),
                (Method::GET, "/v1/datasets/notes/snapshot"),
                (Method::GET, "/v1/datasets/notes/schema"),
                (Method::GET, "/v1/datasets/notes/schema/versions"),
                (Method::GET, "/v1/datasets/notes/digest"),
                (Method::GET, "/v1/datasets/notes/digest/entries?buckets=0,1"),
                (Method::POST, "/v1/datasets/notes/records"),
            ],
            _ => vec![
                (Method::GET, "/v1/datasets/items/changes?after=0"),
                (Method::GET, "/v1/datasets/items/snapshot"),
                (Method::GET, "/v1/datasets/items/schema"),
                (Method::GET, "/v1/datasets/items/schema/versions"),
                (Method::GET, "/v1/datasets/items/digest"),
                (Method::GET, "/v1/datasets/items/digest/entries?buckets=0,1"),
                (Method::POST, "/v1/datasets/items/records"),
            ],
        }
    };
    let post = "/v1/datasets/items/changes";
    let mut cases: Vec<AuthCase> = vec![
        (
            "publish without a token",
            Method::POST,
            post,
            None,
            Some(publish.clone()),
            401,
            "unauthorized",
            vec!["missing Authorization"],
        ),
        (
            "publish with a Basic header",
            Method::POST,
            post,
            Some(format!("Basic {OWNER}").into_bytes()),
            Some(publish.clone()),
            401,
            "unauthorized",
            vec!["Bearer"],
        ),
        (
            "publish with 'Bearer' and no token",
            Method::POST,
            post,
            Some(b"Bearer ".to_vec()),
            Some(publish.clone()),
            401,
            "unauthorized",
            vec!["Bearer"],
        ),
        (
            "publish with the token but no scheme",
            Method::POST,
            post,
            Some(OWNER.as_bytes().to_vec()),
            Some(publish.clone()),
            401,
            "unauthorized",
            vec!["Bearer"],
        ),
        (
            "publish with a wrong token",
            Method::POST,
            post,
            Some(bearer("owner-secret-tokeN")),
            Some(publish.clone()),
            401,
            "unauthorized",
            vec!["unknown token"],
        ),
        (
            "publish with a token prefix",
            Method::POST,
            post,
            Some(bearer("owner-secret")),
            Some(publish.clone()),
            401,
            "unauthorized",
            vec!["unknown token"],
        ),
        (
            "publish with a 16 KiB token",
            Method::POST,
            post,
            Some(huge.clone()),
            Some(publish.clone()),
            401,
            "unauthorized",
            vec!["16384 bytes", "1024"],
        ),
        (
            "publish with non-UTF-8 garbage",
            Method::POST,
            post,
            Some(b"Bearer \xff\xfe\x80garbage".to_vec()),
            Some(publish.clone()),
            401,
            "unauthorized",
            vec!["Bearer"],
        ),
        (
            "another owner publishing",
            Method::POST,
            post,
            Some(bearer(LEDGER)),
            Some(publish.clone()),
            403,
            "forbidden",
            vec!["ledger-svc", "owner-svc", "items"],
        ),
        (
            "a consumer publishing",
            Method::POST,
            post,
            Some(bearer(READER)),
            Some(publish.clone()),
            403,
            "forbidden",
            vec!["reader-svc", "owner-svc", "items"],
        ),
        (
            "a granted consumer publishing",
            Method::POST,
            post,
            Some(bearer(AUDITOR)),
            Some(publish.clone()),
            403,
            "forbidden",
            vec!["auditor-svc", "items"],
        ),
        (
            "an owner publishing to another owner's dataset",
            Method::POST,
            "/v1/datasets/ledger/changes",
            Some(bearer(OWNER)),
            Some(ledger_publish),
            403,
            "forbidden",
            vec!["owner-svc", "ledger-svc", "ledger"],
        ),
    ];
    // The schema registry: only the owner registers, and a body it cannot
    // use is refused by name.
    let schema_path = "/v1/datasets/items/schema";
    let v2 =
        |fields: Value| serde_json::to_vec(&json!({"version": 2, "fields": fields})).expect("json");
    let good_v2 = v2(json!({"n": "int", "label": "string?", "price": "float?", "cost": "float?"}));
    for (who, auth, status, kind, needles) in [
        (
            "without a token",
            None,
            401,
            "unauthorized",
            vec!["Authorization"],
        ),
        (
            "by a consumer",
            Some(bearer(READER)),
            403,
            "forbidden",
            vec!["reader-svc", "items"],
        ),
        (
            "by another owner",
            Some(bearer(LEDGER)),
            403,
            "forbidden",
            vec!["ledger-svc", "owner-svc"],
        ),
    ] {
        cases.push((
            match who {
                "without a token" => "schema registered without a token",
                "by a consumer" => "schema registered by a consumer",
                _ => "schema registered by another owner",
            },
            Method::POST,
            schema_path,
            auth,
            Some(good_v2.clone()),
            status,
            kind,
            needles,
        ));
    }
    for (case, body, needles) in [
        (
            "schema body that is not JSON",
            b"{version: 2".to_vec(),
            vec!["body must be", "\"version\""],
        ),
        (
            "schema body with an unknown member",
            serde_json::to_vec(&json!({"version": 2, "fields": {"n": "int"}, "force": true}))
                .expect("json"),
            vec!["unknown field `force`"],
        ),
        (
            "schema with an unknown type",
            v2(json!({"n": "integer"})),
            vec!["unknown field type 'integer'"],
        ),
        (
            "schema with a hostile field name",
            v2(json!({"n": "int", "x\"; DROP TABLE items; --": "int?"})),
            vec!["must be an identifier"],
        ),
        (
            "schema with a reserved field name",
            v2(json!({"n": "int", "_spoke_version": "int?"})),
            vec!["_spoke"],
        ),
        (
            "schema with no fields",
            v2(json!({})),
            vec!["declares no fields"],
        ),
        (
            "schema version not newer",
            serde_json::to_vec(&json!({"version": 1, "fields": {"n": "int"}})).expect("json"),
            vec!["not newer than the current version 1"],
        ),
        (
            "schema version out of range",
            serde_json::to_vec(&json!({"version": -1, "fields": {"n": "int"}})).expect("json"),
            vec!["body must be"],
        ),
    ] {
        cases.push((
            case,
            Method::POST,
            schema_path,
            Some(bearer(OWNER)),
            Some(body),
            400,
            "bad_request",
            needles,
        ));
    }
    for (method, path) in reads_of("items") {
        let body = (method == Method::POST).then(|| keys.clone());
        cases.push((
            "read without a token",
            method.clone(),
            path,
            None,
            body.clone(),
            401,
            "unauthorized",
            vec!["Authorization"],
        ));
        cases.push((
            "read with a wrong token",
            method.clone(),
            path,
            Some(bearer("nope")),
            body.clone(),
            401,
            "unauthorized",
            vec!["unknown token"],
        ));
        cases.push((
            "read with a 16 KiB token",
            method.clone(),
            path,
            Some(huge.clone()),
            body.clone(),
            401,
            "unauthorized",
            vec!["longer than the limit"],
        ));
        cases.push((
            "another owner reading",
            method,
            path,
            Some(bearer(LEDGER)),
            body,
            403,
            "forbidden",
            vec!["ledger-svc", "items"],
        ));
    }
    for (method, path) in reads_of("notes") {
        let body = (method == Method::POST).then(|| keys.clone());
        cases.push((
            "a consumer reading a dataset it does not subscribe to",
            method,
            path,
            Some(bearer(READER)),
            body,
            403,
            "forbidden",
            vec!["reader-svc", "does not subscribe", "notes"],
        ));
    }

    for (case, method, path, auth, body, status, kind, needles) in cases {
        let mut req = hub
            .http
            .request(method.clone(), format!("{}{path}", hub.base));
        if let Some(a) = auth {
            req = req.header(
                "Authorization",
                reqwest::header::HeaderValue::from_bytes(&a).expect("header value"),
            );
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{case}: {e}"));
        let answer = (
            resp.status().as_u16(),
            resp.bytes().await.expect("body").to_vec(),
        );
        expect_error(
            &format!("{case} ({method} {path})"),
            &answer,
            status,
            kind,
            &needles,
        );
        assert_eq!(
            hub.state().await,
            before,
            "{case} ({method} {path}): the hub is unchanged"
        );
    }

    // Health needs no token (load balancers probe it).
    let (status, _) = hub.call(Method::GET, "/v1/health", None, None).await;
    assert_eq!(status, 200);
}

fn field_names(record: &Value) -> Vec<String> {
    record["fields"]
        .as_object()
        .unwrap_or_else(|| panic!("no fields in {record}"))
        .keys()
        .cloned()
        .collect()
}

/// Every record (feed entry, snapshot record or records-by-key) in an
/// answer, with its fields.
fn records_in(path: &str, body: &Value) -> Vec<Value> {
    let list = if path.contains("/changes") {
        &body["entries"]
    } else {
        &body["records"]
    };
    list.as_array()
        .unwrap_or_else(|| panic!("{path}: no records in {body}"))
        .clone()
}

/// Rule 6 at the hub: a subscriber's feed entries, snapshot records and
/// records-by-key carry only its granted projected fields (plus the change
/// metadata), so a private field never leaves the hub for it; a consumer
/// granted the private field gets it; the owner gets everything; digests
/// are the same for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_receives_only_the_fields_granted_to_it() {
    let hub = start().await;
    let before = hub.state().await;
    let reads = [
        (Method::GET, "/v1/datasets/items/changes?after=0"),
        (Method::GET, "/v1/datasets/items/snapshot"),
        (Method::POST, "/v1/datasets/items/records"),
    ];
    for (who, token, want) in [
        ("reader-svc", READER, vec!["label", "n"]),
        ("auditor-svc", AUDITOR, vec!["cost", "n"]),
        ("owner-svc", OWNER, vec!["cost", "label", "n", "price"]),
    ] {
        for (method, path) in &reads {
            let body = (*method == Method::POST).then(|| br#"{"keys": ["a", "b", "c"]}"#.to_vec());
            let (status, raw) = hub.call(method.clone(), path, Some(token), body).await;
            let text = String::from_utf8_lossy(&raw).into_owned();
            assert_eq!(status, 200, "{who} {path}: {text}");
            let v: Value = serde_json::from_slice(&raw).expect("json");
            let records = records_in(path, &v);
            assert!(!records.is_empty(), "{who} {path}: {text}");
            let mut upserts = 0;
            for r in &records {
                // Metadata is never filtered: key, version, op stay.
                assert!(
                    r["key"].is_string() && r["version"].is_u64(),
                    "{who} {path}: {r}"
                );
                if r["op"] == "delete" {
                    assert_eq!(field_names(r), Vec::<String>::new(), "{who} {path}: {r}");
                    continue;
                }
                upserts += 1;
                let mut names = field_names(r);
                names.sort();
                assert_eq!(names, want, "{who} {path}: fields of {r}");
            }
            assert!(upserts > 0, "{who} {path}: {text}");
            if who == "reader-svc" {
                // Not even the name of the private field crosses the wire.
                assert!(!text.contains("cost"), "{who} {path}: {text}");
                assert!(
                    !text.contains("price"),
                    "{who} {path}: unprojected public field: {text}"
                );
            }
        }
    }

    // Schemas: a subscriber sees what it may receive, never an ungranted private field.
    for (token, want) in [
        (READER, vec!["label", "n", "price"]),
        (AUDITOR, vec!["cost", "label", "n", "price"]),
        (OWNER, vec!["cost", "label", "n", "price"]),
    ] {
        let (status, raw) = hub
            .call(Method::GET, "/v1/datasets/items/schema", Some(token), None)
            .await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_slice(&raw).expect("json");
        let names: Vec<&str> = v["fields"]
            .as_object()
            .expect("fields")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names, want, "schema for {token}: {v}");
    }

    // Digests hash key, version and deleted only: every reader sees the same tree.
    for path in [
        "/v1/datasets/items/digest",
        "/v1/datasets/items/digest?level=1",
        "/v1/datasets/items/digest/entries?buckets=0,1,2,3",
    ] {
        let mut answers = Vec::new();
        for token in [OWNER, READER, AUDITOR] {
            let (status, raw) = hub.call(Method::GET, path, Some(token), None).await;
            assert_eq!(status, 200, "{path}");
            answers.push(serde_json::from_slice::<Value>(&raw).expect("json"));
        }
        assert_eq!(answers[0], answers[1], "{path}");
        assert_eq!(answers[0], answers[2], "{path}");
    }

    // Through the client an agent uses, the same filtering.
    let reader = HubClient::new(&hub.base, Some(READER.to_owned()));
    let batch = reader
        .read("items", 0, 100, Duration::ZERO)
        .await
        .expect("read");
    assert!(batch
        .entries
        .iter()
        .all(|e| !e.change.fields.contains_key("cost")));
    assert!(batch
        .entries
        .iter()
        .any(|e| e.change.fields.contains_key("n")));
    let page = reader.snapshot("items", None, 100).await.expect("snapshot");
    assert!(page.records.iter().all(|c| !c.fields.contains_key("cost")));
    assert_eq!(hub.state().await, before, "reads change nothing");
}

#[tokio::test]
async fn metrics_show_heads_and_the_state_catching_up_without_a_token() {
    let hub = start().await;
    // A snapshot waits for the fold, so afterwards the state is caught up.
    hub.owner
        .snapshot("items", None, 10)
        .await
        .expect("snapshot");
    hub.owner
        .snapshot("notes", None, 10)
        .await
        .expect("snapshot");
    let (status, body) = hub.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    for line in [
        "spoke_hub_head_position{dataset=\"items\"} 5",
        "spoke_hub_head_position{dataset=\"notes\"} 1",
        "spoke_hub_state_folded_position{dataset=\"items\"} 5",
        "spoke_hub_state_fold_lag{dataset=\"items\"} 0",
        "spoke_hub_state_fold_failing 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} is not in the scrape:\n{text}"
        );
    }
    assert!(
        text.contains("# TYPE spoke_hub_unfolded_keys gauge"),
        "{text}"
    );
    assert!(!text.contains("secret"), "no record content in metrics");
}
