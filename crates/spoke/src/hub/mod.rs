//! The hub: the HTTP face of a feed (DESIGN.md, "Hub HTTP").
//!
//! ```text
//!  POST /v1/datasets/{d}/changes  ─ auth: owner only ─▶ Publisher::publish (all-or-nothing)
//!  GET  /v1/datasets/{d}/changes  ─ auth: owner or subscriber ─▶ Feed::read (long-poll)
//!  GET  /v1/datasets/{d}/snapshot ─▶ Feed::snapshot      GET /v1/datasets/{d}/schema ─▶ Feed::schema
//!  GET  /v1/datasets/{d}/digest?level=L&under=a,b   ─▶ Feed::digest (reconciliation; see spoke_core::digest)
//!  GET  /v1/datasets/{d}/digest/entries?buckets=a,b ─▶ Feed::bucket_entries
//!  POST /v1/datasets/{d}/records  {"keys": […]}     ─▶ Feed::records (a read: latest state of those keys)
//!  POST /v1/datasets/{d}/schema   {version, fields, accept_breaking} ─ owner only ─▶ SchemaRegistry::register
//!  GET  /v1/datasets/{d}/schema/versions            ─▶ SchemaRegistry::versions
//! ```
//!
//! The schema registry ([`crate::registry`]) holds every version of each
//! dataset's schema; `GET …/schema` answers the current one.
//!
//! The hub is generic over the feed backend, so the same server fronts the
//! embedded SQLite log and JetStream. Authentication is by bearer token per
//! service ([`crate::auth`]); tokens are kept only as BLAKE3 hashes in memory.
//! Authorization follows the manifest:
//!
//! ```text
//!  publish  ── caller is the dataset's owner ─────────────────────────▶ ok, else 403
//!  any read ── owner ─────────────────────────────────────────────────▶ every field
//!           ── subscriber ─▶ records keep only granted projected fields ▶ (rule 6)
//!           ── anyone else ───────────────────────────────────────────▶ 403
//! ```
//!
//! Filtering happens here, at the hub, so a private field the consumer was
//! not granted never crosses the network to it. Digests hash key, version and
//! the tombstone flag only, so they are the same for every reader. With no
//! tokens configured the hub runs open (for local development) and says so
//! in its log when it starts. TLS is optional ([`crate::tls`]).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use spoke_core::manifest::Dataset;
use spoke_core::{Change, Manifest, Schema};

use crate::feed::http::{
    bucket_list, digest_query, EntriesBody, ErrorBody, RecordsBody, RecordsRequest,
};
use crate::feed::{ChangeInput, Feed, FeedError, Publisher};
use crate::registry::{Registration, RegistryError, SchemaRegistry};

/// Largest publish body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Longest a feed read may wait at the head.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Page size when the reader does not ask for one.
pub const DEFAULT_LIMIT: usize = 1_000;

/// A backend that is both sides of a feed.
pub trait FeedBackend: Feed + Publisher {}
impl<T: Feed + Publisher> FeedBackend for T {}

pub use crate::auth::{Caller, Tokens};

/// What a caller may see of a dataset's records.
#[derive(Debug, Clone)]
enum Access {
    /// The owner, or anyone on an open hub: every field.
    All,
    /// A subscriber: only the fields its subscriptions project, and of those
    /// only the ones it may receive (rule 6); plus key, version, op and the
    /// other change metadata, which are not fields.
    Fields {
        service: String,
        fields: Arc<BTreeSet<String>>,
    },
}

impl Access {
    fn filter(&self, change: &mut Change) {
        if let Access::Fields { fields, .. } = self {
            change.fields.retain(|name, _| fields.contains(name));
        }
    }

    /// A schema as this caller may see it: a subscriber learns the fields it
    /// may receive (public ones and private ones granted to it), so it can
    /// widen its projection later, but never the names of private fields
    /// it was not granted.
    fn schema(&self, dataset: &Dataset, mut schema: Schema) -> Schema {
        if let Access::Fields { service, .. } = self {
            schema
                .fields
                .retain(|name, _| dataset.may_receive(service, name));
        }
        schema
    }
}

struct Hub {
    feed: Arc<dyn FeedBackend>,
    manifest: Arc<Manifest>,
    tokens: Tokens,
    registry: Arc<SchemaRegistry>,
    /// (consumer, dataset) → the fields the hub sends that consumer, built
    /// once from the manifest's subscriptions and grants.
    grants: HashMap<(String, String), Arc<BTreeSet<String>>>,
}

/// (consumer, dataset) → the union of the consumer's projected fields of
/// that dataset that it may receive.
fn grants(manifest: &Manifest) -> HashMap<(String, String), Arc<BTreeSet<String>>> {
    let mut out: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
    for sub in &manifest.subscriptions {
        let Some(ds) = manifest.datasets.get(&sub.dataset) else {
            continue;
        };
        out.entry((sub.consumer.clone(), sub.dataset.clone()))
            .or_default()
            .extend(
                sub.fields
                    .iter()
                    .filter(|f| ds.may_receive(&sub.consumer, f))
                    .cloned(),
            );
    }
    out.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

impl Hub {
    fn owner_of(&self, dataset: &str) -> Result<&str, FeedError> {
        self.manifest
            .datasets
            .get(dataset)
            .map(|d| d.owner.as_str())
            .ok_or_else(|| FeedError::UnknownDataset(dataset.to_owned()))
    }

    fn may_publish(&self, caller: &Caller, dataset: &str) -> Result<(), FeedError> {
        let owner = self.owner_of(dataset)?;
        match caller {
            Caller::Open => Ok(()),
            Caller::Service(s) if s == owner => Ok(()),
            Caller::Service(s) => Err(FeedError::Forbidden(format!(
                "service {s} may not publish to dataset {dataset}: its owner is {owner}, and only the owner publishes"
            ))),
        }
    }

    fn may_read(&self, caller: &Caller, dataset: &str) -> Result<Access, FeedError> {
        let owner = self.owner_of(dataset)?;
        match caller {
            Caller::Open => Ok(Access::All),
            Caller::Service(s) if s == owner => Ok(Access::All),
            Caller::Service(s) => match self.grants.get(&(s.clone(), dataset.to_owned())) {
                Some(fields) => Ok(Access::Fields {
                    service: s.clone(),
                    fields: fields.clone(),
                }),
                None => Err(FeedError::Forbidden(format!(
                    "service {s} does not subscribe to dataset {dataset}, so it may not read it"
                ))),
            },
        }
    }

    /// Authenticates the request and checks the caller may read `dataset`.
    fn reader(&self, headers: &HeaderMap, dataset: &str) -> Result<Access, FeedError> {
        let caller = self.caller(headers)?;
        self.may_read(&caller, dataset)
    }

    fn caller(&self, headers: &HeaderMap) -> Result<Caller, FeedError> {
        self.tokens
            .authenticate(headers)
            .map_err(|e| FeedError::Unauthorized(e.to_string()))
    }
}

/// An error answer with the JSON body clients map back to [`FeedError`].
pub struct ApiError(pub FeedError);

impl From<FeedError> for ApiError {
    fn from(e: FeedError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = ErrorBody::from_feed_error(&self.0);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(body)).into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    #[serde(default)]
    wait_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotParams {
    after_key: Option<String>,
    limit: Option<usize>,
}

fn query_error(e: QueryRejection) -> ApiError {
    ApiError(FeedError::BadRequest(format!(
        "query string: {}",
        e.body_text()
    )))
}

/// A request body that could not be read: too large, or cut short.
fn body_error(e: BytesRejection) -> FeedError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        FeedError::BadRequest(format!("body exceeds the limit of {MAX_BODY_BYTES} bytes"))
    } else {
        FeedError::BadRequest(format!("body: {}", e.body_text()))
    }
}

async fn publish(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = hub.caller(&headers)?;
    hub.may_publish(&caller, &dataset)?;
    let body = body.map_err(body_error)?;
    let changes: Vec<ChangeInput> = serde_json::from_slice(&body).map_err(|e| {
        FeedError::BadRequest(format!(
            "body must be a JSON array of changes {{key, version, op, fields}}: {e}"
        ))
    })?;
    let receipt = hub.feed.publish(&dataset, changes).await?;
    Ok(Json(receipt).into_response())
}

async fn read(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let access = hub.reader(&headers, &dataset)?;
    let Query(q) = q.map_err(query_error)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > crate::feed::MAX_PAGE {
        return Err(FeedError::BadRequest(format!(
            "limit must be between 1 and {}",
            crate::feed::MAX_PAGE
        ))
        .into());
    }
    let wait = Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    let mut batch = hub.feed.read(&dataset, q.after, limit, wait).await?;
    for e in &mut batch.entries {
        access.filter(&mut e.change);
    }
    Ok(Json(batch).into_response())
}

async fn snapshot(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
    q: Result<Query<SnapshotParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let access = hub.reader(&headers, &dataset)?;
    let Query(q) = q.map_err(query_error)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > crate::feed::MAX_PAGE {
        return Err(FeedError::BadRequest(format!(
            "limit must be between 1 and {}",
            crate::feed::MAX_PAGE
        ))
        .into());
    }
    let mut page = hub
        .feed
        .snapshot(&dataset, q.after_key.as_deref(), limit)
        .await?;
    for r in &mut page.records {
        access.filter(r);
    }
    Ok(Json(page).into_response())
}

async fn schema(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let access = hub.reader(&headers, &dataset)?;
    let schema = match hub.registry.current(&dataset) {
        Some(s) => s,
        None => hub.feed.schema(&dataset).await?,
    };
    let ds = &hub.manifest.datasets[&dataset];
    Ok(Json(access.schema(ds, schema)).into_response())
}

/// Every registered version, as this caller may see it: a subscriber sees
/// the fields it may receive and only the breaks of its own subscriptions.
async fn schema_versions(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let access = hub.reader(&headers, &dataset)?;
    let ds = &hub.manifest.datasets[&dataset];
    let mut versions = hub.registry.versions(&dataset).map_err(registry_error)?;
    for v in &mut versions {
        v.fields = access.schema(ds, v.schema()).fields;
        if let Access::Fields { service, .. } = &access {
            v.added.retain(|f| ds.may_receive(service, f));
            v.breaks.retain(|b| &b.consumer == service);
        }
    }
    Ok(Json(serde_json::json!({ "dataset": dataset, "versions": versions })).into_response())
}

fn registry_error(e: RegistryError) -> ApiError {
    ApiError(match e {
        RegistryError::UnknownDataset(d) => FeedError::UnknownDataset(d),
        RegistryError::Invalid(m) => FeedError::BadRequest(m),
        other => FeedError::Unavailable(other.to_string()),
    })
}

async fn register_schema(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = hub.caller(&headers)?;
    hub.may_publish(&caller, &dataset)?;
    let body = body.map_err(body_error)?;
    let reg: Registration = serde_json::from_slice(&body).map_err(|e| {
        FeedError::BadRequest(format!(
            "body must be {{\"version\": N, \"fields\": {{\"name\": \"type\", …}}, \"accept_breaking\": false}}: {e}"
        ))
    })?;
    match hub
        .registry
        .register(&dataset, reg, crate::clock::Clock::System.now_ms())
    {
        Ok(v) => Ok(Json(v).into_response()),
        Err(e @ RegistryError::Incompatible { .. }) => {
            let breaks = match &e {
                RegistryError::Incompatible { breaks, .. } => breaks.clone(),
                _ => Vec::new(),
            };
            let body = serde_json::json!({
                "error": e.to_string(),
                "kind": "incompatible_schema",
                "breaks": breaks,
            });
            Ok((StatusCode::CONFLICT, Json(body)).into_response())
        }
        Err(e) => Err(registry_error(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DigestParams {
    level: Option<u8>,
    under: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesParams {
    buckets: String,
}

async fn digest(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
    q: Result<Query<DigestParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    hub.reader(&headers, &dataset)?;
    let Query(q) = q.map_err(query_error)?;
    let query = digest_query(q.level, q.under.as_deref()).map_err(FeedError::BadRequest)?;
    Ok(Json(hub.feed.digest(&dataset, &query).await?).into_response())
}

async fn digest_entries(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
    q: Result<Query<EntriesParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    hub.reader(&headers, &dataset)?;
    let Query(q) = q.map_err(query_error)?;
    let buckets = bucket_list(&q.buckets).map_err(FeedError::BadRequest)?;
    let entries = hub.feed.bucket_entries(&dataset, &buckets).await?;
    Ok(Json(EntriesBody { entries }).into_response())
}

async fn records(
    State(hub): State<Arc<Hub>>,
    Path(dataset): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let access = hub.reader(&headers, &dataset)?;
    let body = body.map_err(body_error)?;
    let req: RecordsRequest = serde_json::from_slice(&body).map_err(|e| {
        FeedError::BadRequest(format!(
            "body must be {{\"keys\": [\"key\", …]}} (at most {} keys): {e}",
            crate::feed::MAX_PAGE
        ))
    })?;
    for k in &req.keys {
        spoke_core::change::validate_key(k)
            .map_err(|e| FeedError::BadRequest(format!("key '{k}': {e}")))?;
    }
    let mut records = hub.feed.records(&dataset, &req.keys).await?;
    for r in &mut records {
        access.filter(r);
    }
    Ok(Json(RecordsBody { records }).into_response())
}

/// `GET /metrics`: the backend's figures (for the embedded store: heads,
/// fold positions, unfolded keys). Open like `/v1/health`: dataset names
/// and positions, no records.
async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    use crate::metrics::{Exposition, CONTENT_TYPE};
    let mut out = Exposition::new();
    hub.feed.write_metrics(&mut out);
    (
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        out.finish(),
    )
        .into_response()
}

async fn fallback() -> Response {
    let body = ErrorBody {
        error: "no such endpoint; see /v1/datasets/{dataset}/changes|snapshot|schema|schema/versions|digest|digest/entries|records".into(),
        kind: "not_found".into(),
        index: None,
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn method_not_allowed() -> Response {
    let body = ErrorBody {
        error: "method not allowed: publish with POST …/changes, read with GET (and POST …/records for records by key)".into(),
        kind: "method_not_allowed".into(),
        index: None,
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// The hub's router over `feed`, with a schema registry kept in memory.
pub fn router(feed: Arc<dyn FeedBackend>, manifest: Arc<Manifest>, tokens: Tokens) -> Router {
    let mut registry = SchemaRegistry::open(None, manifest.clone(), 0)
        .expect("an in-memory registry opens from a resolved manifest");
    if let Some(c) = feed.catalog() {
        registry = registry
            .with_catalog(c.clone())
            .expect("the feed's catalog serves the manifest's datasets");
    }
    router_with_registry(feed, manifest, tokens, Arc::new(registry))
}

/// The hub's router over `feed`, with `registry` (which should already
/// update the feed's catalog, see [`SchemaRegistry::with_catalog`]).
pub fn router_with_registry(
    feed: Arc<dyn FeedBackend>,
    manifest: Arc<Manifest>,
    tokens: Tokens,
    registry: Arc<SchemaRegistry>,
) -> Router {
    if tokens.is_empty() {
        tracing::warn!("hub runs open, without tokens: any caller may publish to and read every dataset, all fields included (configure [hub.tokens] to enforce ownership, subscriptions and grants)");
    } else {
        tracing::info!(services = ?tokens.names(), "hub requires bearer tokens");
        for name in tokens.names() {
            if !manifest.services.contains_key(name) {
                tracing::warn!(service = name, "a hub token is configured for a service the manifest does not declare: it can read and publish nothing");
            }
        }
    }
    let hub = Arc::new(Hub {
        grants: grants(&manifest),
        feed,
        manifest,
        tokens,
        registry,
    });
    Router::new()
        .route("/v1/datasets/{dataset}/changes", get(read).post(publish))
        .route("/v1/datasets/{dataset}/snapshot", get(snapshot))
        .route(
            "/v1/datasets/{dataset}/schema",
            get(schema).post(register_schema),
        )
        .route(
            "/v1/datasets/{dataset}/schema/versions",
            get(schema_versions),
        )
        .route("/v1/datasets/{dataset}/digest", get(digest))
        .route("/v1/datasets/{dataset}/digest/entries", get(digest_entries))
        .route(
            "/v1/datasets/{dataset}/records",
            axum::routing::post(records),
        )
        .route("/v1/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(hub)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
