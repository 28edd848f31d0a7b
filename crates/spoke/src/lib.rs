//! Spoke's runtime: how changes travel from an owner to a consumer's copy.
//!
//! ```text
//!  owner's transaction ──▶ outbox ──relay──▶ Publisher ──▶ feed (hub) ──▶ Feed ──agent──▶ CopyStore
//!                                     (HTTP / in-process)      log + compacted state     (SQLite copy)
//! ```
//!
//! # Layout
//! - [`feed`]: the [`feed::Feed`] (read side) and [`feed::Publisher`] (write side)
//!   traits with their contract, and their backends: in-memory, the embedded
//!   SQLite log the hub serves, and the HTTP client of a hub.
//! - [`copy`]: the [`copy::CopyStore`] trait and its backends (in-memory, SQLite).
//! - [`hub`]: the hub's HTTP server in front of any feed.
//! - [`agent`]: follows a consumer's subscriptions into its copy store, and
//!   serves the agent HTTP API and metrics.
//! - [`outbox`]: the transactional outbox for owners on SQLite, the
//!   [`outbox::Source`] trait and the relay that forwards a source to a publisher.
//! - [`cdc`]: change data capture from an owner's PostgreSQL (logical
//!   replication, pgoutput): initial snapshot, stream, slot care.
//! - [`read`]: the read-only library API for Rust consumers, with
//!   bounded-staleness reads.
//! - [`owner`]: reading one record from its owner's `owner_url` (HTTP and
//!   in-memory [`owner::OwnerSource`]s).
//! - [`ttl`]: the `ttl` strategy's read-through cache.
//! - [`reconcile`]: compares a copy's digest with its feed's and repairs
//!   exactly the keys that differ.
//! - [`drift`]: compares a feed with its owner's PostgreSQL rows (a CDC
//!   table or a `snapshot_sql` query) and reports what differs.
//! - [`scheduled`]: the `scheduled` strategy: refreshes a copy from its
//!   owner's snapshot (a paged HTTP listing or an SQL query), digest first,
//!   fetching only the records of buckets that differ.
//! - [`config`]: deployment configuration for the hub and agent roles.
//! - [`auth`]: bearer tokens (kept hashed) and who is calling.
//! - [`metrics`]: the Prometheus text format the agent's and the CDC
//!   source's `GET /metrics` answer in.
//! - [`tls`]: HTTPS for the hub and agent servers, and the CA clients trust.
//! - [`shutdown`]: the stop signal every long-running task takes.
//! - [`clock`]: wall-clock helpers, injectable for tests.

pub mod agent;
pub mod auth;
pub mod cdc;
pub mod clock;
pub mod config;
pub mod copy;
pub mod drift;
pub mod feed;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod owner;
pub mod quarantine;
pub mod read;
pub mod reconcile;
pub mod registry;
pub mod scheduled;
pub mod shutdown;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod ttl;
