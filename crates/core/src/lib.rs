//! Spoke's data model, with no I/O.
//!
//! Everything that decides *what* a copy should contain lives here, so that
//! every feed backend and every copy store agrees on it by construction: the
//! hub validates published changes with [`schema::Schema`], copy stores apply
//! them by [`apply::decide`], agents measure [`freshness::Freshness`], and the
//! `spoke check` command reports [`manifest`] problems.
//!
//! # Layout
//! - [`duration`]: staleness budgets and horizons written as `30s`, `5m`, `1h`.
//! - [`schema`]: field types (`string`, `int`, `float`, `bool`, `timestamp`,
//!   `json`, `?` for optional) and validation of change fields.
//! - [`change`]: the unit that flows from owner to copy, with its per-key version.
//! - [`apply`]: the apply rule (newer version wins, tombstones kept) and a pure
//!   in-memory copy used as the reference model in tests.
//! - [`digest`]: per-bucket digests of (key, version, deleted) for reconciliation.
//! - [`projection`]: the subset of fields a consumer copies.
//! - [`freshness`]: "fresh as of T", staleness and budgets.
//! - [`manifest`]: the TOML manifest, loaded with `file:line` errors, and the
//!   governance rules `spoke check` enforces.
//! - [`advise`]: the decision framework (duplicate, call the owner or
//!   snapshot) and request-path availability behind `spoke advise`.

pub mod advise;
pub mod apply;
pub mod change;
pub mod digest;
pub mod duration;
pub mod freshness;
pub mod manifest;
pub mod projection;
pub mod schema;

pub use apply::{decide, Decision, MemoryCopy, RecordState};
pub use change::{Change, ChangeError, Op, Version};
pub use duration::Duration;
pub use freshness::Freshness;
pub use manifest::{Manifest, ManifestError, Problem};
pub use projection::Projection;
pub use schema::{Break, FieldSpec, FieldType, Schema, SchemaError};
