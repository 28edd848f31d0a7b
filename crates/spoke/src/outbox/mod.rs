//! Owners' side: where changes come from and how they reach the feed.
//!
//! ```text
//!  owner's transaction ─┬─ UPDATE customers …            (business row)
//!                       └─ INSERT spoke_outbox …          (same transaction: rule 3)
//!                               │
//!  relay: pending() ─▶ publish per dataset, in id order ─▶ ack() deletes the rows
//! ```
//!
//! A crash between the owner's commit and the relay's publish leaves the row
//! in the outbox, so the change is delayed, never lost. A crash between
//! publish and ack republishes the rows; the feed ignores versions it already
//! holds, so nothing is doubled.
//!
//! - [`Source`]: the trait every change source implements (this outbox now;
//!   CDC from PostgreSQL later).
//! - [`sqlite`]: the outbox for owners whose data lives in SQLite.
//! - [`postgres`]: the outbox for owners on PostgreSQL (per-key commit order, LISTEN/NOTIFY).
//! - [`relay`]: forwards any source to any publisher with retry and backoff.

pub mod postgres;
pub mod relay;
pub mod sqlite;

use async_trait::async_trait;

use crate::feed::ChangeInput;

/// One change waiting to be forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Position in the source; increases in commit order.
    pub id: u64,
    pub dataset: String,
    pub change: ChangeInput,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Retry later.
    #[error("source unavailable: {0}")]
    Unavailable(String),
    /// A stored change cannot be read: needs a person.
    #[error("outbox row {id}: {message}")]
    Corrupt { id: u64, message: String },
}

/// Where an owner's changes come from.
///
/// # Contract
/// - **At least once.** Items are offered again until acknowledged.
/// - **Commit order.** `pending` returns items in the order their
///   transactions committed, so per-key versions arrive increasing.
/// - **Ack is a prefix.** `ack(upto)` acknowledges every item with
///   `id <= upto` that was returned by `pending`.
/// - A crash before `ack` re-offers the items; a crash after it loses nothing.
#[async_trait]
pub trait Source: Send + Sync {
    /// Up to `max` unacknowledged changes, oldest first.
    async fn pending(&self, max: usize) -> Result<Vec<Pending>, SourceError>;

    /// Acknowledges every item up to and including `upto`.
    async fn ack(&self, upto: u64) -> Result<(), SourceError>;
}
