//! `snapshot_url`: the owner's snapshot over HTTP, in a small paged
//! protocol any owner can implement in a few lines.
//!
//! ```text
//!  GET  {snapshot_url}?fields=key,version&limit=N[&after=CURSOR]     list keys and versions, page by page
//!       200 {"records": [{"key": "c1", "version": 4}, …], "next": "CURSOR" | null}
//!  POST {snapshot_url}   {"keys": ["c1", "c7"]}                       full records of these keys
//!       200 {"records": [{"key": "c1", "version": 4, "fields": {"name": "Ada", …}}, …]}
//! ```
//!
//! # The owner's side of the contract
//! - The listing returns every key the owner holds, each once across all
//!   pages, with a positive integer `version` that grows with every change
//!   of that key (see [`super`] for why). At most `limit` records a page.
//!   `next` is an opaque cursor for the following page (percent-encoded by
//!   Spoke into `after=`), or `null` on the last page. Any order; stable
//!   paging (e.g. by key) is the owner's job.
//! - The lookup returns the records of the asked keys the owner still has
//!   (a key deleted meanwhile is left out), each once, never a key not
//!   asked for; `fields` holds at least the subscription's projected fields
//!   with their schema types (others are ignored and never stored). At most
//!   [`super::DEFAULT_BATCH`] keys per request.
//! - Both answer `200` with JSON. Anything else, a timeout
//!   ([`DEFAULT_SNAPSHOT_TIMEOUT`] per request), a body over
//!   [`MAX_SNAPSHOT_BODY_BYTES`], bad JSON, wrong types, a missing version,
//!   a key listed twice, a cursor that comes back, a page longer than
//!   `limit`, or an empty page that names a next cursor fails the refresh
//!   with an error naming the dataset, the URL and what is wrong; nothing
//!   is written (see [`super`], "All-or-nothing").
//!
//! Requests send `Accept: application/json` and follow no redirects, like
//! the `owner_url` reader ([`crate::owner`]).

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use spoke_core::manifest::{percent_encode, SnapshotUrl};
use spoke_core::Projection;

use super::{check_listing, Listed, SnapshotError, SnapshotRecord, SnapshotSource};
use crate::owner::{error_chain, kind, project_checked};

/// How long one page or lookup request may take.
pub const DEFAULT_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys asked per listing page.
pub const DEFAULT_PAGE: usize = 10_000;
/// The largest response body read (a listing page or a lookup).
pub const MAX_SNAPSHOT_BODY_BYTES: usize = 64 * 1024 * 1024;

/// One `snapshot_url` source.
#[derive(Debug, Clone)]
pub struct HttpSnapshot {
    dataset: String,
    url: SnapshotUrl,
    projection: Projection,
    client: reqwest::Client,
    page: usize,
    timeout: Duration,
}

impl HttpSnapshot {
    /// A source for `dataset` at `url`, checking records against `projection`.
    pub fn new(
        dataset: &str,
        url: SnapshotUrl,
        projection: Projection,
        timeout: Duration,
    ) -> Result<Self, String> {
        reqwest::Url::parse(url.as_str())
            .map_err(|e| format!("snapshot_url of {dataset}: '{url}' is not a usable URL: {e}"))?;
        let client = crate::owner::owner_client(timeout)
            .map_err(|e| format!("snapshot_url of {dataset}: cannot build the HTTP client: {e}"))?;
        Ok(HttpSnapshot {
            dataset: dataset.to_owned(),
            url,
            projection,
            client,
            page: DEFAULT_PAGE,
            timeout,
        })
    }

    /// Asks for `page` keys per listing page.
    pub fn with_page(mut self, page: usize) -> Self {
        self.page = page.max(1);
        self
    }

    fn error(&self, url: &str, reason: String, transient: bool) -> SnapshotError {
        SnapshotError::Source {
            dataset: self.dataset.clone(),
            from: url.to_owned(),
            reason,
            transient,
        }
    }

    /// Sends a request and reads a `200` body of at most [`MAX_SNAPSHOT_BODY_BYTES`].
    async fn body(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<Vec<u8>, SnapshotError> {
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                self.error(
                    url,
                    format!("no answer within {} ms", self.timeout.as_millis()),
                    true,
                )
            } else {
                self.error(url, format!("unreachable: {}", error_chain(&e)), true)
            }
        };
        let mut resp = request
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(failed)?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            if body.len() + chunk.len() > MAX_SNAPSHOT_BODY_BYTES {
                return Err(self.error(
                    url,
                    format!("the response is larger than {MAX_SNAPSHOT_BODY_BYTES} bytes; ask for smaller pages"),
                    false,
                ));
            }
            body.extend_from_slice(&chunk);
        }
        if status != reqwest::StatusCode::OK {
            let snippet = crate::owner::snippet(&body);
            let transient = status.is_server_error() || status.as_u16() == 429;
            return Err(self.error(
                url,
                format!("answered HTTP {}: {snippet}", status.as_u16()),
                transient,
            ));
        }
        Ok(body)
    }

    /// One listing page: its records and the next cursor.
    fn parse_page(
        &self,
        body: &[u8],
        limit: usize,
    ) -> Result<(Vec<Listed>, Option<String>), String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(mut page) = value else {
            return Err(format!(
                "expected an object {{\"records\": […], \"next\": …}}, got {}",
                kind(&value)
            ));
        };
        let records = match page.remove("records") {
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(format!(
                    "\"records\" must be an array, got {}",
                    kind(&other)
                ))
            }
            None => return Err("has no \"records\" array".into()),
        };
        if records.len() > limit {
            return Err(format!(
                "the page has {} records, more than the limit={limit} asked for",
                records.len()
            ));
        }
        let mut out = Vec::with_capacity(records.len());
        for (i, r) in records.into_iter().enumerate() {
            let (key, version) = key_and_version(&r).map_err(|e| format!("record {i}: {e}"))?;
            out.push(Listed { key, version });
        }
        let next = match page.remove("next") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            Some(other) => {
                return Err(format!(
                    "\"next\" must be a non-empty string cursor or null, got {other}"
                ))
            }
        };
        Ok((out, next))
    }

    fn parse_records(&self, body: &[u8]) -> Result<Vec<SnapshotRecord>, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let records = match value {
            Value::Object(mut o) => match o.remove("records") {
                Some(Value::Array(a)) => a,
                Some(other) => {
                    return Err(format!(
                        "\"records\" must be an array, got {}",
                        kind(&other)
                    ))
                }
                None => return Err("has no \"records\" array".into()),
            },
            other => {
                return Err(format!(
                    "expected an object {{\"records\": […]}}, got {}",
                    kind(&other)
                ))
            }
        };
        let mut out = Vec::with_capacity(records.len());
        for (i, r) in records.into_iter().enumerate() {
            let (key, version) = key_and_version(&r).map_err(|e| format!("record {i}: {e}"))?;
            let fields = match r.get("fields") {
                Some(Value::Object(f)) => f,
                Some(other) => {
                    return Err(format!(
                        "record {i} (key '{}'): \"fields\" must be an object, got {}",
                        super::shown(&key),
                        kind(other)
                    ))
                }
                None => {
                    return Err(format!(
                        "record {i} (key '{}') has no \"fields\" object",
                        super::shown(&key)
                    ))
                }
            };
            let fields = project_checked(&self.projection, fields)
                .map_err(|e| format!("record {i} (key '{}'): {e}", super::shown(&key)))?;
            out.push(SnapshotRecord {
                key,
                version,
                fields,
            });
        }
        Ok(out)
    }
}

/// The `key` and `version` members of one listed or returned record.
fn key_and_version(r: &Value) -> Result<(String, u64), String> {
    let Value::Object(o) = r else {
        return Err(format!("expected an object, got {}", kind(r)));
    };
    let key = match o.get("key") {
        Some(Value::String(k)) => k.clone(),
        Some(other) => return Err(format!("\"key\" must be a string, got {}", kind(other))),
        None => return Err("has no \"key\"".into()),
    };
    let version = match o.get("version") {
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "key '{}': \"version\" must be a positive integer, got {v}",
                    super::shown(&key)
                ))
            }
        },
        None => {
            return Err(format!(
                "key '{}' has no \"version\"; every key needs its owner's version, which the apply rule compares",
                super::shown(&key)
            ))
        }
    };
    Ok((key, version))
}

#[async_trait]
impl SnapshotSource for HttpSnapshot {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    async fn list(
        &self,
        progress: &(dyn Fn(usize) + Send + Sync),
    ) -> Result<Vec<Listed>, SnapshotError> {
        let mut listed: Vec<Listed> = Vec::new();
        let mut cursors: HashSet<String> = HashSet::new();
        let mut after: Option<String> = None;
        let mut page_no = 0usize;
        loop {
            page_no += 1;
            let mut query = format!("fields=key,version&limit={}", self.page);
            if let Some(a) = &after {
                query.push_str("&after=");
                query.push_str(&percent_encode(a));
            }
            let url = self.url.with_query(&query);
            let body = self.body(self.client.get(&url), &url).await?;
            let (records, next) = self
                .parse_page(&body, self.page)
                .map_err(|e| self.error(&url, format!("listing page {page_no}: {e}"), false))?;
            let empty = records.is_empty();
            listed.extend(records);
            progress(listed.len());
            match next {
                None => break,
                Some(_) if empty => {
                    return Err(self.error(
                        &url,
                        format!("listing page {page_no} is empty but names a next cursor; the last page has \"next\": null"),
                        false,
                    ))
                }
                Some(n) => {
                    if !cursors.insert(n.clone()) {
                        return Err(self.error(
                            &url,
                            format!("listing page {page_no} names cursor '{}' again: the listing loops", super::shown(&n)),
                            false,
                        ));
                    }
                    after = Some(n);
                }
            }
        }
        check_listing(&listed)
            .map_err(|e| self.error(self.url.as_str(), format!("listing: {e}"), false))?;
        Ok(listed)
    }

    async fn records(&self, keys: &[String]) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let url = self.url.as_str();
        let body = self
            .body(
                self.client
                    .post(url)
                    .json(&serde_json::json!({ "keys": keys })),
                url,
            )
            .await?;
        let records = self
            .parse_records(&body)
            .map_err(|e| self.error(url, format!("lookup of {} keys: {e}", keys.len()), false))?;
        super::check_records(keys, &records)
            .map_err(|e| self.error(url, format!("lookup of {} keys: {e}", keys.len()), false))?;
        Ok(records)
    }
}
