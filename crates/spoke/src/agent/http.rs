//! The agent's HTTP API (DESIGN.md, "Agent HTTP"): records with freshness,
//! status, Prometheus metrics, and the copies' digests:
//!
//! ```text
//!  GET /v1/copies/{d}/records/{key}              a record with its freshness
//!      ?max_staleness_ms=N                         at most N ms stale: else from the owner, else 503
//!  GET /v1/copies/{d}/digest?level=L&under=a,b   digest nodes (same shape as the hub's)
//!  GET /v1/copies/{d}/digest/entries?buckets=a,b (key, version, deleted) of those buckets
//!  GET /v1/status    GET /metrics
//! ```
//!
//! With `[agent.api_tokens]` configured, every endpoint but `/v1/health`
//! needs `Authorization: Bearer <token>` (401 otherwise), `/metrics`
//! included: it names datasets and how far behind each copy is. Give the
//! Prometheus scraper its own named token (its `authorization.credentials_file`)
//! so it can be rotated apart from the applications'. The API is read-only,
//! so every token grants the same reads.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use spoke_core::change::validate_key;

use super::metrics::{render, Sample};
use super::Agent;
use crate::auth::Tokens;
use crate::feed::http::{bucket_list, digest_query, EntriesBody, ErrorBody};
use crate::read::{CopyStatus, ReadError};
use spoke_core::manifest::Strategy;

/// The largest `max_staleness_ms` accepted: a year. A bound keeps a typo
/// from meaning "never too stale" by accident.
pub const MAX_STALENESS_PARAM_MS: u64 = 365 * 86_400_000;

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message,
            kind: kind.to_owned(),
            index: None,
        }),
    )
        .into_response()
}

fn read_error(e: ReadError) -> Response {
    match e {
        ReadError::NotACopy(d) => error(
            StatusCode::NOT_FOUND,
            "unknown_copy",
            format!("{d} is not a copy this consumer keeps"),
        ),
        ReadError::Store(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
        ReadError::BadKey { .. } => error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        ReadError::Owner(_) => error(StatusCode::BAD_GATEWAY, "owner_unavailable", e.to_string()),
        ReadError::NoOwnerSource(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "misconfigured",
            e.to_string(),
        ),
        ReadError::TooStale {
            ref dataset,
            ref key,
            ref value,
            staleness_ms,
            max_staleness_ms,
            ref fallback_error,
        } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "error": e.to_string(),
                "kind": "too_stale",
                "dataset": dataset,
                "key": key,
                "value": value,
                "staleness_ms": staleness_ms,
                "max_staleness_ms": max_staleness_ms,
                "owner_error": fallback_error.as_ref().map(ToString::to_string),
            })),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordParams {
    max_staleness_ms: Option<String>,
}

/// `max_staleness_ms`: digits only, at most [`MAX_STALENESS_PARAM_MS`].
fn max_staleness(raw: &str) -> Result<u64, String> {
    let shown: String = raw.chars().take(40).collect();
    let n = (!raw.is_empty() && raw.len() <= 20 && raw.bytes().all(|b| b.is_ascii_digit()))
        .then(|| raw.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| {
            format!("max_staleness_ms must be a whole number of milliseconds from 0 to {MAX_STALENESS_PARAM_MS}, got '{shown}'")
        })?;
    if n > MAX_STALENESS_PARAM_MS {
        return Err(format!(
            "max_staleness_ms {n} is over the limit of {MAX_STALENESS_PARAM_MS} (365 days); leave it out to read the copy as it is"
        ));
    }
    Ok(n)
}

async fn record(
    State(agent): State<Arc<Agent>>,
    Path((dataset, key)): Path<(String, String)>,
    q: Result<Query<RecordParams>, QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return bad_query(e),
    };
    if let Err(e) = validate_key(&key) {
        return error(StatusCode::BAD_REQUEST, "bad_request", format!("key: {e}"));
    }
    let max = match q.max_staleness_ms.as_deref().map(max_staleness).transpose() {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    let copies = agent.copies();
    let read = match max {
        None => copies.get(&dataset, &key).await,
        Some(ms) => {
            copies
                .get_within(&dataset, &key, std::time::Duration::from_millis(ms))
                .await
        }
    };
    match read {
        Ok(Some(read)) => Json(read).into_response(),
        Ok(None) => {
            let whose = match copies.strategy(&dataset) {
                Ok(Strategy::Ttl) => format!("at the owner of {dataset}"),
                _ => format!("in the copy of {dataset}"),
            };
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no record '{key}' {whose}"),
            )
        }
        Err(e) => read_error(e),
    }
}

/// Why `dataset` has no stored copy (as a response), or `None` when it has one.
fn not_stored(agent: &Agent, dataset: &str) -> Option<Response> {
    match agent.copies().strategy(dataset) {
        Err(e) => Some(read_error(e)),
        Ok(Strategy::Ttl) => Some(error(
            StatusCode::NOT_FOUND,
            "not_stored",
            format!("{dataset} is a ttl cache, not a stored copy: it has no digest"),
        )),
        Ok(_) => None,
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DigestParams {
    level: Option<u8>,
    under: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesParams {
    buckets: String,
}

fn bad_query(e: QueryRejection) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        format!("query string: {}", e.body_text()),
    )
}

async fn digest(
    State(agent): State<Arc<Agent>>,
    Path(dataset): Path<String>,
    q: Result<Query<DigestParams>, QueryRejection>,
) -> Response {
    if let Some(resp) = not_stored(&agent, &dataset) {
        return resp;
    }
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return bad_query(e),
    };
    let query = match digest_query(q.level, q.under.as_deref()) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    match agent.store.digest(&dataset).await {
        Ok(d) => match d.nodes(&query) {
            Ok(nodes) => Json(nodes).into_response(),
            Err(e) => error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        },
        Err(e) => read_error(ReadError::Store(e)),
    }
}

async fn digest_entries(
    State(agent): State<Arc<Agent>>,
    Path(dataset): Path<String>,
    q: Result<Query<EntriesParams>, QueryRejection>,
) -> Response {
    if let Some(resp) = not_stored(&agent, &dataset) {
        return resp;
    }
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return bad_query(e),
    };
    let buckets = match bucket_list(&q.buckets) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    match agent.store.bucket_entries(&dataset, &buckets).await {
        Ok(entries) => Json(EntriesBody { entries }).into_response(),
        Err(e) => read_error(ReadError::Store(e)),
    }
}

/// Status of every copy this agent keeps.
pub async fn statuses(agent: &Agent) -> Result<Vec<CopyStatus>, ReadError> {
    let copies = agent.copies();
    let progress = agent.progress();
    let mut out = Vec::new();
    for dataset in copies.datasets() {
        let p = progress.get(dataset);
        let mut status = copies
            .status(
                dataset,
                p.and_then(|p| p.head()),
                p.and_then(|p| p.last_error()),
            )
            .await?;
        if let Some(p) = p {
            status.new_fields = p.new_fields();
        }
        out.push(status);
    }
    Ok(out)
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    match statuses(&agent).await {
        Ok(s) => {
            Json(serde_json::json!({ "consumer": agent.consumer(), "copies": s })).into_response()
        }
        Err(e) => read_error(e),
    }
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let statuses = match statuses(&agent).await {
        Ok(s) => s,
        Err(e) => return read_error(e),
    };
    let progress = agent.progress();
    let budgets: std::collections::BTreeMap<&str, u64> = agent
        .manifest
        .subscriptions_of(agent.consumer())
        .map(|s| (s.dataset.as_str(), s.staleness_budget.as_millis()))
        .collect();
    let samples: Vec<Sample<'_>> = statuses
        .iter()
        .map(|s| Sample {
            status: s,
            budget_ms: budgets.get(s.dataset.as_str()).copied().unwrap_or(0),
            breaches: progress
                .get(&s.dataset)
                .map_or(0, |p| p.budget_breaches.load(Ordering::Relaxed)),
        })
        .collect();
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        render(&samples),
    )
        .into_response()
}

/// Refuses a request without a known API token (401, JSON error).
async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match tokens.authenticate(&headers) {
        Ok(_) => next.run(request).await,
        Err(e) => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("agent API: {e}"),
        ),
    }
}

/// The agent's router; `api` holds the tokens its read API accepts (empty:
/// the API is open, as for a quick start, and the agent logs that).
pub fn router(agent: Arc<Agent>, api: Tokens) -> Router {
    let api = Arc::new(api);
    if api.is_empty() {
        tracing::warn!(consumer = agent.consumer(), "agent API runs open, without tokens: any caller may read the copies (configure [agent.api_tokens] to require one)");
    }
    let guarded = Router::new()
        .route("/v1/copies/{dataset}/records/{key}", get(record))
        .route("/v1/copies/{dataset}/digest", get(digest))
        .route("/v1/copies/{dataset}/digest/entries", get(digest_entries))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(api, require_token));
    guarded
        .route("/v1/health", get(|| async { "ok" }))
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the agent API is read-only: use GET".into(),
            )
        })
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see /v1/copies/{dataset}/records/{key}, /v1/copies/{dataset}/digest, /v1/status, /metrics"
                    .into(),
            )
        })
        .with_state(agent)
}
