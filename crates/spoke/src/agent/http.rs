//! The agent's HTTP API (DESIGN.md, "Agent HTTP"): records with freshness,
//! status, Prometheus metrics, and the copies' digests:
//!
//! ```text
//!  GET /v1/copies/{d}/records/{key}              a record with its freshness
//!  GET /v1/copies/{d}/digest?level=L&under=a,b   digest nodes (same shape as the hub's)
//!  GET /v1/copies/{d}/digest/entries?buckets=a,b (key, version, deleted) of those buckets
//!  GET /v1/status    GET /metrics
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use spoke_core::change::validate_key;

use super::metrics::{render, Sample};
use super::Agent;
use crate::feed::http::{bucket_list, digest_query, EntriesBody, ErrorBody};
use crate::read::{CopyStatus, ReadError};

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
    }
}

async fn record(
    State(agent): State<Arc<Agent>>,
    Path((dataset, key)): Path<(String, String)>,
) -> Response {
    if let Err(e) = validate_key(&key) {
        return error(StatusCode::BAD_REQUEST, "bad_request", format!("key: {e}"));
    }
    match agent.copies().get(&dataset, &key).await {
        Ok(Some(read)) => Json(read).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no record '{key}' in the copy of {dataset}"),
        ),
        Err(e) => read_error(e),
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
    if let Err(e) = agent.copies().copy(&dataset) {
        return read_error(e);
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
    if let Err(e) = agent.copies().copy(&dataset) {
        return read_error(e);
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
        out.push(
            copies
                .status(
                    dataset,
                    p.and_then(|p| p.head()),
                    p.and_then(|p| p.last_error()),
                )
                .await?,
        );
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
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&samples),
    )
        .into_response()
}

/// The agent's router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/copies/{dataset}/records/{key}", get(record))
        .route("/v1/copies/{dataset}/digest", get(digest))
        .route("/v1/copies/{dataset}/digest/entries", get(digest_entries))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
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
