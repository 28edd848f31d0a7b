//! The HTTP client of a hub: a [`Feed`] and [`Publisher`] over the hub API.
//!
//! Errors from the hub come back as JSON `{"error", "kind", "index"?}` and are
//! mapped to the same [`FeedError`] variants the hub produced, so callers
//! handle a remote feed exactly like a local one. Connection failures,
//! timeouts and 5xx answers are [`FeedError::Unavailable`] (retry).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use spoke_core::digest::{
    parse_indices, DigestEntry, DigestNodes, DigestQuery, BUCKETS, LEAF_LEVEL,
};
use spoke_core::{Change, Schema};

use super::{
    ChangeInput, Feed, FeedBatch, FeedError, Position, PublishReceipt, Publisher, SnapshotPage,
    MAX_DIGEST_BUCKETS, MAX_PAGE,
};

/// The body of `GET …/digest/entries?buckets=…` (hub and agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntriesBody {
    pub entries: Vec<DigestEntry>,
}

/// The body of `POST /v1/datasets/{dataset}/records`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsRequest {
    pub keys: Vec<String>,
}

/// The answer to `POST /v1/datasets/{dataset}/records`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordsBody {
    pub records: Vec<Change>,
}

/// The query string of a digest request, `?level=L&under=a,b`, as a
/// [`DigestQuery`] (shared by the hub and the agent).
pub fn digest_query(level: Option<u8>, under: Option<&str>) -> Result<DigestQuery, String> {
    let level = level.unwrap_or(0);
    if level > LEAF_LEVEL {
        return Err(format!(
            "level must be 0 (root), 1 (64 nodes) or 2 ({BUCKETS} buckets), got {level}"
        ));
    }
    let under = match under {
        None => None,
        Some(_) if level == 0 => {
            return Err("'under' names parent nodes: use it with level 1 or 2".into())
        }
        Some(u) => Some(
            parse_indices(u, DigestQuery::width(level - 1), "under").map_err(|e| e.to_string())?,
        ),
    };
    Ok(DigestQuery { level, under })
}

/// The `buckets=a,b,c` of an entries request.
pub fn bucket_list(s: &str) -> Result<Vec<u16>, String> {
    let b = parse_indices(s, BUCKETS, "buckets").map_err(|e| e.to_string())?;
    if b.is_empty() {
        return Err("buckets: name at least one bucket".into());
    }
    if b.len() > MAX_DIGEST_BUCKETS {
        return Err(format!(
            "buckets: {} named; at most {MAX_DIGEST_BUCKETS} per request",
            b.len()
        ));
    }
    Ok(b.into_iter().map(|b| b as u16).collect())
}

/// Bytes a [`HubClient`] sent and received: request line, headers and body
/// each way (what crossed the socket, minus TCP/TLS framing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Traffic {
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Default)]
struct TrafficCounters {
    requests: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// The error body every hub and agent endpoint returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl ErrorBody {
    pub fn from_feed_error(e: &FeedError) -> (u16, ErrorBody) {
        let (status, kind, index) = match e {
            FeedError::UnknownDataset(_) => (404, "unknown_dataset", None),
            FeedError::Invalid { index, .. } => (400, "invalid", Some(*index)),
            FeedError::BadRequest(m) if m.contains("exceeds the limit") => (413, "too_large", None),
            FeedError::BadRequest(_) => (400, "bad_request", None),
            FeedError::Unauthorized(_) => (401, "unauthorized", None),
            FeedError::Forbidden(_) => (403, "forbidden", None),
            FeedError::Unavailable(_) => (503, "unavailable", None),
            FeedError::Corrupt(_) => (502, "corrupt", None),
        };
        let error = match e {
            FeedError::Invalid { message, .. } => message.clone(),
            other => other.to_string(),
        };
        (
            status,
            ErrorBody {
                error,
                kind: kind.to_owned(),
                index,
            },
        )
    }

    fn into_feed_error(self, status: u16) -> FeedError {
        match self.kind.as_str() {
            "unknown_dataset" => FeedError::UnknownDataset(
                self.error
                    .trim_start_matches("unknown dataset ")
                    .trim_matches('\'')
                    .to_owned(),
            ),
            "invalid" => FeedError::Invalid {
                index: self.index.unwrap_or(0),
                message: self.error,
            },
            "bad_request" | "too_large" => FeedError::BadRequest(self.error),
            "unauthorized" => FeedError::Unauthorized(self.error),
            "forbidden" => FeedError::Forbidden(self.error),
            "corrupt" => FeedError::Corrupt(self.error),
            _ if status >= 500 => FeedError::Unavailable(self.error),
            _ => FeedError::BadRequest(self.error),
        }
    }
}

/// An error with its causes, so "error sending request" also says why
/// (connection refused, timed out, …).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A hub reached over HTTP.
#[derive(Clone)]
pub struct HubClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    traffic: Arc<TrafficCounters>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never print it.
        f.debug_struct("HubClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl HubClient {
    /// `base` is the hub's URL, e.g. `http://127.0.0.1:7070`; an `https://`
    /// hub must present a certificate from a publicly trusted CA (see
    /// [`HubClient::with_tls_ca`] for a private one).
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self::build(base, token, Vec::new()).expect("HTTP client builds")
    }

    /// Like [`HubClient::new`], also trusting the CA certificates in the PEM
    /// file `ca` (deployment config `tls_ca`), for hubs whose certificate a
    /// private CA signed.
    pub fn with_tls_ca(
        base: &str,
        token: Option<String>,
        ca: &std::path::Path,
    ) -> Result<Self, crate::tls::TlsError> {
        let roots = crate::tls::client_roots(ca)?;
        Self::build(base, token, roots).map_err(|e| crate::tls::TlsError {
            path: ca.display().to_string(),
            message: format!("cannot build an HTTPS client with it: {}", error_chain(&e)),
        })
    }

    fn build(
        base: &str,
        token: Option<String>,
        roots: Vec<reqwest::Certificate>,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30));
        for root in roots {
            builder = builder.add_root_certificate(root);
        }
        Ok(HubClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: builder.build()?,
            traffic: Arc::default(),
        })
    }

    /// What this client (and its clones) sent and received so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            requests: self.traffic.requests.load(Ordering::Relaxed),
            bytes_sent: self.traffic.sent.load(Ordering::Relaxed),
            bytes_received: self.traffic.received.load(Ordering::Relaxed),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, dataset: &str, what: &str) -> String {
        format!("{}/v1/datasets/{}/{}", self.base, dataset, what)
    }

    async fn send<T: for<'de> Deserialize<'de>>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, FeedError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let req = req.build().map_err(|e| {
            FeedError::BadRequest(format!("hub {}: {}", self.base, error_chain(&e)))
        })?;
        let headers = |h: &reqwest::header::HeaderMap| -> u64 {
            h.iter()
                .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
                .sum()
        };
        let sent = (req.method().as_str().len() + req.url().as_str().len() + 12) as u64
            + headers(req.headers())
            + req
                .body()
                .and_then(reqwest::Body::as_bytes)
                .map_or(0, |b| b.len() as u64);
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        self.traffic.sent.fetch_add(sent, Ordering::Relaxed);
        let resp = self.http.execute(req).await.map_err(|e| {
            let chain = error_chain(&e);
            // A certificate problem does not fix itself by retrying: say what to do.
            let hint = if chain.contains("certificate") || chain.contains("UnknownIssuer") {
                " (the hub's TLS certificate is not trusted: name the CA that signed it in tls_ca)"
            } else {
                ""
            };
            FeedError::Unavailable(format!("hub {}: {chain}{hint}", self.base))
        })?;
        let status = resp.status().as_u16();
        let head = 17 + headers(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| {
            FeedError::Unavailable(format!("hub {}: {}", self.base, error_chain(&e)))
        })?;
        self.traffic
            .received
            .fetch_add(head + bytes.len() as u64, Ordering::Relaxed);
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| {
                FeedError::Unavailable(format!("hub {} sent an unreadable answer: {e}", self.base))
            });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(body.into_feed_error(status)),
            Err(_) if status >= 500 => Err(FeedError::Unavailable(format!(
                "hub {} answered {status}",
                self.base
            ))),
            Err(_) => Err(FeedError::BadRequest(format!(
                "hub {} answered {status}: {}",
                self.base,
                String::from_utf8_lossy(&bytes)
            ))),
        }
    }
}

#[async_trait]
impl Publisher for HubClient {
    /// A hub stores into its embedded log by default; a group of
    /// [`super::STORE_GROUP`] is about 1 MB of JSON, far below the hub's
    /// body limit.
    fn preferred_batch(&self) -> usize {
        super::STORE_GROUP
    }

    async fn publish(
        &self,
        dataset: &str,
        changes: Vec<ChangeInput>,
    ) -> Result<PublishReceipt, FeedError> {
        self.send(
            self.http
                .post(self.url(dataset, "changes"))
                .json(&changes)
                .timeout(Duration::from_secs(30)),
        )
        .await
    }
}

#[async_trait]
impl Feed for HubClient {
    async fn read(
        &self,
        dataset: &str,
        after: Position,
        limit: usize,
        wait: Duration,
    ) -> Result<FeedBatch, FeedError> {
        let wait_ms = wait.as_millis().to_string();
        let req = self
            .http
            .get(self.url(dataset, "changes"))
            .query(&[
                ("after", after.to_string()),
                ("limit", limit.to_string()),
                ("wait_ms", wait_ms),
            ])
            .timeout(wait + Duration::from_secs(30));
        self.send(req).await
    }

    async fn snapshot(
        &self,
        dataset: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, FeedError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(k) = after_key {
            query.push(("after_key", k.to_owned()));
        }
        self.send(
            self.http
                .get(self.url(dataset, "snapshot"))
                .query(&query)
                .timeout(Duration::from_secs(60)),
        )
        .await
    }

    async fn schema(&self, dataset: &str) -> Result<Schema, FeedError> {
        self.send(
            self.http
                .get(self.url(dataset, "schema"))
                .timeout(Duration::from_secs(30)),
        )
        .await
    }

    async fn digest(&self, dataset: &str, query: &DigestQuery) -> Result<DigestNodes, FeedError> {
        let mut q = vec![("level", query.level.to_string())];
        if let Some(under) = &query.under {
            let list: Vec<String> = under.iter().map(u32::to_string).collect();
            q.push(("under", list.join(",")));
        }
        let nodes: DigestNodes = self
            .send(
                self.http
                    .get(self.url(dataset, "digest"))
                    .query(&q)
                    .timeout(Duration::from_secs(30)),
            )
            .await?;
        nodes
            .check_layout()
            .map_err(|e| FeedError::Corrupt(format!("hub {}: {e}", self.base)))?;
        Ok(nodes)
    }

    /// Asks in requests of at most [`MAX_DIGEST_BUCKETS`] buckets.
    async fn bucket_entries(
        &self,
        dataset: &str,
        buckets: &[u16],
    ) -> Result<Vec<DigestEntry>, FeedError> {
        let mut out = Vec::new();
        for chunk in buckets.chunks(MAX_DIGEST_BUCKETS) {
            let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
            let body: EntriesBody = self
                .send(
                    self.http
                        .get(self.url(dataset, "digest/entries"))
                        .query(&[("buckets", list.join(","))])
                        .timeout(Duration::from_secs(60)),
                )
                .await?;
            out.extend(body.entries);
        }
        Ok(out)
    }

    /// Asks in requests of at most [`MAX_PAGE`] keys.
    async fn records(&self, dataset: &str, keys: &[String]) -> Result<Vec<Change>, FeedError> {
        let mut out = Vec::new();
        for chunk in keys.chunks(MAX_PAGE) {
            let body: RecordsBody = self
                .send(
                    self.http
                        .post(self.url(dataset, "records"))
                        .json(&RecordsRequest {
                            keys: chunk.to_vec(),
                        })
                        .timeout(Duration::from_secs(60)),
                )
                .await?;
            out.extend(body.records);
        }
        Ok(out)
    }
}
