//! Reading one record straight from its owner, over the `owner_url` a
//! subscription declares.
//!
//! Two readers use it: the `ttl` strategy's read-through cache
//! ([`crate::ttl`]) on every miss, and bounded-staleness reads
//! ([`crate::read::Copy::get_within`]) when a copy is too stale.
//!
//! # The owner's answer
//! `GET owner_url` with `{key}` replaced by the percent-encoded key:
//! - `200` with a JSON object whose members are the record's fields. Every
//!   projected field must be there (an optional one may be absent or
//!   `null`) with its schema type; other members are ignored and never
//!   leave this module (rule 6). An optional `"version"` member (a positive
//!   integer) is the record's per-key version — unless the dataset has a
//!   field named `version`, which then wins.
//! - `404`: the key does not exist (a `ttl` cache remembers that for its
//!   `negative_ttl`).
//! - anything else, a timeout, or a body that breaks the rules above: an
//!   [`OwnerError`] naming the dataset, the key and the URL.
//!
//! Redirects are not followed: the manifest names the endpoint.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};
use spoke_core::manifest::OwnerUrl;
use spoke_core::{Manifest, Projection, Schema, Version};

/// How long an owner read may take, connection and body included.
pub const DEFAULT_OWNER_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest owner response read; a record is small, a bigger body is an error.
pub const MAX_OWNER_BODY_BYTES: usize = 1024 * 1024;

/// A record as the owner returned it: the projected fields, checked
/// against the schema, and its version when the owner gave one.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerRecord {
    pub fields: Map<String, Value>,
    pub version: Option<Version>,
}

/// Why an owner read failed. Every message names the dataset, the key and
/// the URL asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    /// The subscription declares no `owner_url`.
    #[error("{dataset} has no owner_url in this consumer's subscription: add owner_url = \"http://…/{{key}}\" to read from its owner")]
    NoEndpoint { dataset: String },
    #[error("owner of {dataset}, key '{key}': {url} did not answer within {timeout_ms} ms")]
    Timeout {
        dataset: String,
        key: String,
        url: String,
        timeout_ms: u64,
    },
    #[error("owner of {dataset}, key '{key}': {url} is unreachable: {reason}")]
    Unreachable {
        dataset: String,
        key: String,
        url: String,
        reason: String,
    },
    #[error("owner of {dataset}, key '{key}': {url} answered HTTP {status}: {body}")]
    Status {
        dataset: String,
        key: String,
        url: String,
        status: u16,
        /// The start of the body, for the message.
        body: String,
    },
    #[error("owner of {dataset}, key '{key}': {url} sent a bad record: {reason}")]
    BadResponse {
        dataset: String,
        key: String,
        url: String,
        reason: String,
    },
}

impl OwnerError {
    /// Whether asking again later may succeed (timeouts, unreachable owners,
    /// 5xx and 429); a bad record or a 4xx needs the owner or the manifest fixed.
    pub fn is_transient(&self) -> bool {
        match self {
            OwnerError::Timeout { .. } | OwnerError::Unreachable { .. } => true,
            OwnerError::Status { status, .. } => *status >= 500 || *status == 429,
            OwnerError::NoEndpoint { .. } | OwnerError::BadResponse { .. } => false,
        }
    }
}

/// Reads single records from their owners.
///
/// # Contract
/// - One call makes at most one request to the owner: no retries (the
///   caller decides: a cache serves stale, a read reports the error).
/// - `Ok(None)` only when the owner said the key does not exist.
/// - Returned fields are exactly the subscription's projection, checked
///   against the schema; nothing else the owner sent is passed on.
/// - Safe to call concurrently; it keeps no per-key state (coalescing is
///   the cache's job).
#[async_trait]
pub trait OwnerSource: Send + Sync {
    async fn fetch(&self, dataset: &str, key: &str) -> Result<Option<OwnerRecord>, OwnerError>;
}

/// Where and what to read for one subscription.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: OwnerUrl,
    pub projection: Projection,
    /// Whether a `"version"` member is the record's version (it is not when
    /// the dataset has a field called `version`).
    pub version_member: bool,
}

impl Endpoint {
    /// The endpoint of `consumer`'s subscription to `dataset`, if it declares one.
    pub fn of(manifest: &Manifest, consumer: &str, dataset: &str) -> Option<Self> {
        let sub = manifest.subscription(consumer, dataset)?;
        let ds = manifest.datasets.get(dataset)?;
        Some(Endpoint {
            url: sub.owner_url.clone()?,
            projection: Projection::new(&ds.schema, &sub.fields)?,
            version_member: !ds.schema.fields.contains_key("version"),
        })
    }

    /// Checks an owner's `200` body and keeps the projected fields.
    pub fn parse(
        &self,
        dataset: &str,
        key: &str,
        url: &str,
        body: &[u8],
    ) -> Result<OwnerRecord, OwnerError> {
        let bad = |reason: String| OwnerError::BadResponse {
            dataset: dataset.to_owned(),
            key: key.to_owned(),
            url: url.to_owned(),
            reason,
        };
        let value: Value =
            serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
        let Value::Object(object) = value else {
            return Err(bad(format!(
                "expected a JSON object of the record's fields, got {}",
                kind(&value)
            )));
        };
        let version = match object.get("version").filter(|_| self.version_member) {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Some(n),
                _ => {
                    return Err(bad(format!(
                        "\"version\" must be a positive integer, got {v}"
                    )))
                }
            },
        };
        let fields = project_checked(&self.projection, &object).map_err(bad)?;
        Ok(OwnerRecord { fields, version })
    }
}

/// The projected fields of an owner's record, checked: every required
/// projected field is present and every value has its schema type. Other
/// members are dropped (rule 6). Shared by every reader of owner records
/// (`owner_url`, and the `scheduled` strategy's snapshot sources).
pub(crate) fn project_checked(
    projection: &Projection,
    object: &Map<String, Value>,
) -> Result<Map<String, Value>, String> {
    for (name, spec) in projection.fields() {
        if !spec.optional && !object.contains_key(name) {
            return Err(format!(
                "required field '{name}' is missing (the subscription projects {})",
                projection.names().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let fields = projection.apply(object);
    let schema = Schema::new(0, projection.fields().iter().cloned().collect());
    schema.validate(&fields).map_err(|e| e.to_string())?;
    Ok(fields)
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads owners over HTTP, one [`Endpoint`] per subscription that declares
/// an `owner_url`.
#[derive(Debug, Clone)]
pub struct HttpOwnerSource {
    client: reqwest::Client,
    endpoints: BTreeMap<String, Endpoint>,
    timeout: Duration,
}

/// An owner endpoint that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("owner_url of {dataset}: {reason}")]
pub struct EndpointError {
    pub dataset: String,
    pub reason: String,
}

impl HttpOwnerSource {
    /// Every `owner_url` among `consumer`'s subscriptions.
    pub fn from_manifest(
        manifest: &Manifest,
        consumer: &str,
        timeout: Duration,
    ) -> Result<Self, EndpointError> {
        let mut endpoints = BTreeMap::new();
        for sub in manifest.subscriptions_of(consumer) {
            if let Some(e) = Endpoint::of(manifest, consumer, &sub.dataset) {
                // The manifest checked the template; this catches what only a
                // full URL parser sees (a bad port, say) before any request.
                reqwest::Url::parse(&e.url.url_for("k")).map_err(|err| EndpointError {
                    dataset: sub.dataset.clone(),
                    reason: format!("'{}' is not a usable URL: {err}", e.url),
                })?;
                endpoints.insert(sub.dataset.clone(), e);
            }
        }
        Self::new(endpoints, timeout)
    }

    pub fn new(
        endpoints: BTreeMap<String, Endpoint>,
        timeout: Duration,
    ) -> Result<Self, EndpointError> {
        let client = owner_client(timeout).map_err(|e| EndpointError {
            dataset: endpoints.keys().cloned().collect::<Vec<_>>().join(", "),
            reason: format!("cannot build the HTTP client: {e}"),
        })?;
        Ok(HttpOwnerSource {
            client,
            endpoints,
            timeout,
        })
    }
}

/// The HTTP client Spoke reads owners with: a whole-request timeout, and no
/// redirects (an owner endpoint that moves is a configuration to fix, not
/// a hop to follow silently).
pub(crate) fn owner_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// The start of an owner's error body, for a message: at most 200
/// characters, `…` when cut.
pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut snippet: String = text.chars().take(200).collect();
    if snippet.len() < text.len() {
        snippet.push('…');
    }
    snippet
}

/// A reqwest error with its causes: reqwest's own message alone is terse.
pub(crate) fn error_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[async_trait]
impl OwnerSource for HttpOwnerSource {
    async fn fetch(&self, dataset: &str, key: &str) -> Result<Option<OwnerRecord>, OwnerError> {
        let endpoint = self
            .endpoints
            .get(dataset)
            .ok_or_else(|| OwnerError::NoEndpoint {
                dataset: dataset.to_owned(),
            })?;
        let url = endpoint.url.url_for(key);
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                OwnerError::Timeout {
                    dataset: dataset.to_owned(),
                    key: key.to_owned(),
                    url: url.clone(),
                    timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                }
            } else {
                OwnerError::Unreachable {
                    dataset: dataset.to_owned(),
                    key: key.to_owned(),
                    url: url.clone(),
                    reason: error_chain(&e),
                }
            }
        };
        let mut resp = self
            .client
            .get(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(failed)?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            if body.len() + chunk.len() > MAX_OWNER_BODY_BYTES {
                return Err(OwnerError::BadResponse {
                    dataset: dataset.to_owned(),
                    key: key.to_owned(),
                    url,
                    reason: format!(
                        "the response is larger than {MAX_OWNER_BODY_BYTES} bytes; one record is expected"
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if status != reqwest::StatusCode::OK {
            return Err(OwnerError::Status {
                dataset: dataset.to_owned(),
                key: key.to_owned(),
                url,
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        endpoint.parse(dataset, key, &url, &body).map(Some)
    }
}

pub mod memory {
    //! An in-memory owner for tests: records by dataset and key, a call
    //! counter, and switches to make it fail or answer slowly. It returns
    //! records as they were put, unprojected, which also shows that readers
    //! project owner records themselves.

    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;
    use serde_json::{Map, Value};
    use spoke_core::Version;

    use super::{OwnerError, OwnerRecord, OwnerSource};

    #[derive(Debug, Default)]
    pub struct MemoryOwner {
        records: Mutex<BTreeMap<(String, String), OwnerRecord>>,
        calls: Mutex<BTreeMap<String, u64>>,
        total: AtomicU64,
        failing: AtomicBool,
        delay_ms: AtomicU64,
    }

    impl MemoryOwner {
        pub fn new() -> Self {
            Self::default()
        }

        /// Sets the owner's record for `key`.
        pub fn put(&self, dataset: &str, key: &str, fields: Value, version: Option<Version>) {
            let fields: Map<String, Value> = match fields {
                Value::Object(m) => m,
                other => panic!("fields must be an object, got {other}"),
            };
            self.records.lock().expect("owner lock").insert(
                (dataset.into(), key.into()),
                OwnerRecord { fields, version },
            );
        }

        pub fn remove(&self, dataset: &str, key: &str) {
            self.records
                .lock()
                .expect("owner lock")
                .remove(&(dataset.into(), key.into()));
        }

        /// While set, every fetch fails with HTTP 503.
        pub fn set_failing(&self, failing: bool) {
            self.failing.store(failing, Ordering::SeqCst);
        }

        /// Every fetch first waits this long (real time).
        pub fn set_delay(&self, delay: Duration) {
            self.delay_ms.store(
                u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                Ordering::SeqCst,
            );
        }

        /// Fetches made, of any key.
        pub fn calls(&self) -> u64 {
            self.total.load(Ordering::SeqCst)
        }

        /// Fetches made of `key`.
        pub fn calls_for(&self, key: &str) -> u64 {
            self.calls
                .lock()
                .expect("owner lock")
                .get(key)
                .copied()
                .unwrap_or(0)
        }
    }

    #[async_trait]
    impl OwnerSource for MemoryOwner {
        async fn fetch(&self, dataset: &str, key: &str) -> Result<Option<OwnerRecord>, OwnerError> {
            self.total.fetch_add(1, Ordering::SeqCst);
            *self
                .calls
                .lock()
                .expect("owner lock")
                .entry(key.to_owned())
                .or_default() += 1;
            let delay = self.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(OwnerError::Status {
                    dataset: dataset.to_owned(),
                    key: key.to_owned(),
                    url: format!("memory://{dataset}/{key}"),
                    status: 503,
                    body: "owner is down (test switch)".into(),
                });
            }
            Ok(self
                .records
                .lock()
                .expect("owner lock")
                .get(&(dataset.to_owned(), key.to_owned()))
                .cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Router;
    use serde_json::json;
    use spoke_core::manifest::OwnerUrl;
    use spoke_core::{FieldSpec, Projection, Schema};

    use super::*;

    /// A stand-in owner with one key per behaviour.
    async fn owner_record(Path(key): Path<String>) -> Response {
        let body = |v: serde_json::Value| (StatusCode::OK, v.to_string()).into_response();
        match key.as_str() {
            "ok" => body(
                json!({"id": "ok", "name": "Ada", "email": "ada@example.com", "payment_method_id": "pm-secret", "version": 7}),
            ),
            "no-version" => {
                body(json!({"name": "Ada", "email": "ada@example.com", "preferred_name": null}))
            }
            "gone" => StatusCode::NOT_FOUND.into_response(),
            "boom" => (StatusCode::INTERNAL_SERVER_ERROR, "database is down").into_response(),
            "garbage" => (StatusCode::OK, "{\"name\": \"Ada\",").into_response(),
            "list" => body(json!(["Ada"])),
            "wrong-type" => body(json!({"name": 5, "email": "ada@example.com"})),
            "missing" => body(json!({"name": "Ada"})),
            "bad-version" => body(json!({"name": "Ada", "email": "e", "version": -1})),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                body(json!({"name": "Ada", "email": "e"}))
            }
            "huge" => body(json!({"name": "x".repeat(MAX_OWNER_BODY_BYTES), "email": "e"})),
            // Anything else echoes its (decoded) key as the name.
            other => body(json!({"name": other, "email": "echo@example.com"})),
        }
    }

    struct Owner {
        source: HttpOwnerSource,
        base: String,
    }

    async fn owner(timeout: Duration) -> Owner {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let app = Router::new().route("/v1/customers/{key}", get(owner_record));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut schema = Schema::default();
        for (f, t) in [
            ("name", "string"),
            ("email", "string"),
            ("preferred_name", "string?"),
            ("payment_method_id", "string"),
        ] {
            schema
                .fields
                .insert(f.into(), t.parse::<FieldSpec>().expect("type"));
        }
        let projection = Projection::new(
            &schema,
            &["name".into(), "email".into(), "preferred_name".into()],
        )
        .expect("projection");
        let endpoint = Endpoint {
            url: OwnerUrl::parse(&format!("{base}/v1/customers/{{key}}")).expect("url"),
            projection,
            version_member: true,
        };
        let source = HttpOwnerSource::new(
            BTreeMap::from([("customers".to_owned(), endpoint)]),
            timeout,
        )
        .expect("source");
        Owner { source, base }
    }

    #[tokio::test]
    async fn a_valid_record_is_projected_with_its_version() {
        let o = owner(DEFAULT_OWNER_TIMEOUT).await;
        let r = o.source.fetch("customers", "ok").await.unwrap().unwrap();
        assert_eq!(
            serde_json::Value::Object(r.fields),
            json!({"name": "Ada", "email": "ada@example.com", "preferred_name": null}),
            "only projected fields leave the owner; the absent optional one is null"
        );
        assert_eq!(r.version, Some(7));
        let r = o
            .source
            .fetch("customers", "no-version")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.version, None);
        // Keys travel percent-encoded and arrive whole.
        let r = o
            .source
            .fetch("customers", "a/b c?d#é")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.fields["name"], json!("a/b c?d#é"));
    }

    #[tokio::test]
    async fn a_404_is_a_missing_key_and_other_statuses_are_errors() {
        let o = owner(DEFAULT_OWNER_TIMEOUT).await;
        assert_eq!(o.source.fetch("customers", "gone").await.unwrap(), None);
        let e = o.source.fetch("customers", "boom").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("owner of customers, key 'boom': {}/v1/customers/boom answered HTTP 500: database is down", o.base)
        );
        assert!(e.is_transient());
        let e = o.source.fetch("orders", "x").await.unwrap_err();
        assert!(matches!(e, OwnerError::NoEndpoint { .. }), "{e}");
    }

    #[tokio::test]
    async fn malformed_records_are_rejected_naming_dataset_key_and_url() {
        let o = owner(DEFAULT_OWNER_TIMEOUT).await;
        let cases = [
            ("garbage", "sent a bad record: not JSON: EOF while parsing"),
            ("list", "expected a JSON object of the record's fields, got an array"),
            ("wrong-type", "field 'name' must be string, got an int"),
            ("missing", "required field 'email' is missing (the subscription projects name, email, preferred_name)"),
            ("bad-version", "\"version\" must be a positive integer, got -1"),
            ("huge", "larger than 1048576 bytes"),
        ];
        for (key, want) in cases {
            let e = o.source.fetch("customers", key).await.unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!(
                    "owner of customers, key '{key}': {}/v1/customers/{key} ",
                    o.base
                )),
                "{msg}"
            );
            assert!(msg.contains(want), "{key}: {msg}");
            assert!(!e.is_transient(), "{key}");
        }
    }

    #[tokio::test]
    async fn a_slow_owner_times_out() {
        let o = owner(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let e = o.source.fetch("customers", "slow").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(1500));
        assert!(
            matches!(
                e,
                OwnerError::Timeout {
                    timeout_ms: 200,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("did not answer within 200 ms"),
            "{e}"
        );
        assert!(e.is_transient());
    }

    #[tokio::test]
    async fn an_owner_that_is_not_listening_is_unreachable() {
        let port = crate::testing::free_port();
        let endpoint = Endpoint {
            url: OwnerUrl::parse(&format!("http://127.0.0.1:{port}/{{key}}")).unwrap(),
            projection: Projection::all(&Schema::default()),
            version_member: true,
        };
        let source = HttpOwnerSource::new(
            BTreeMap::from([("customers".to_owned(), endpoint)]),
            DEFAULT_OWNER_TIMEOUT,
        )
        .unwrap();
        let e = source.fetch("customers", "k").await.unwrap_err();
        assert!(matches!(e, OwnerError::Unreachable { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("127.0.0.1:{port}/k is unreachable")),
            "{e}"
        );
    }
}
