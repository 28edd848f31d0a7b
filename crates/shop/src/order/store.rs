//! Where Order Service keeps its own data, and how it reads the copy beside it.
//!
//! ```text
//!                      OrderStore (this trait: what the HTTP handlers use)
//!                    ┌──────────────┴───────────────┐
//!   SqliteOrders (sqlite.rs)                 PostgresOrders (postgres.rs)
//!   order.db: orders, order_lines            <orders_schema>.orders, .order_lines
//!             customers (copy, view)         <copies_schema>.customers (copy, view)
//!             _spoke_copies                  <copies_schema>._spoke_copies
//! ```
//!
//! Both keep the copy *in the same database* as Order Service's own tables,
//! so `GET /orders/{id}` is one SQL query that JOINs them. Which store runs is
//! configuration ([`Storage`]), never a code path in the handlers.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use spoke_core::Manifest;

use super::{CopiedCustomer, OrderLine};
use crate::web::ApiError;

/// Where Order Service keeps its data: chosen by configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// The embedded default: `order.db` holds Order Service's tables, and
    /// Spoke's agent keeps the copy in the same file.
    Sqlite(PathBuf),
    /// The distributed variant: Order Service's tables in its own schema of
    /// its PostgreSQL database; the agent keeps the copy in another schema
    /// of the same database (`PostgresCopyStore`).
    Postgres(PostgresStorage),
}

/// Order Service on PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresStorage {
    /// Order Service's own connection (its application role), a libpq
    /// key-value string or a `postgres://` URL.
    pub url: String,
    /// The schema holding `orders` and `order_lines` (created if missing).
    pub orders_schema: String,
    /// The schema the agent keeps the copy in (`agent.store.schema`).
    pub copies_schema: String,
}

/// The default schema of Order Service's own tables in PostgreSQL.
pub const DEFAULT_ORDERS_SCHEMA: &str = "orders";

/// An order about to be stored, with its lines snapshotted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_id: String,
    pub total_cents: i64,
    pub reservation_id: i64,
    pub charge_id: String,
    pub created_at_ms: u64,
    pub lines: Vec<OrderLine>,
}

/// An order as stored, with the customer from the copy and the copy's
/// freshness mark, all read by one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOrder {
    pub id: i64,
    pub customer_id: String,
    pub customer: Option<CopiedCustomer>,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub reservation_id: i64,
    pub charge_id: String,
    pub created_at_ms: u64,
    /// When the copy was last fresh (ms since the epoch; 0 = never).
    pub fresh_as_of_ms: u64,
}

/// A customer looked up in the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyLookup {
    /// `None` when the copy does not hold the customer.
    pub customer: Option<CopiedCustomer>,
    /// When the copy was last fresh (ms since the epoch; 0 = never).
    pub fresh_as_of_ms: u64,
}

/// Order Service's storage: its own tables, and reads of the copy beside them.
///
/// # Contract
/// - [`OrderStore::insert`] stores an order and its lines in one transaction.
/// - [`OrderStore::order`] is one SQL query over Order Service's tables, the
///   copy and the copy's freshness row ([`OrderStore::order_sql`] is its text).
/// - Nothing here writes the copy: [`OrderStore::execute`] runs a statement
///   on Order Service's own connection, where the copy refuses writes.
#[async_trait]
pub trait OrderStore: Send + Sync {
    /// Where the data is, for people: `order.db at PATH`, `PostgreSQL schema S`.
    fn describe(&self) -> String;

    /// The text of the one query behind `GET /orders/{id}`.
    fn order_sql(&self) -> &str;

    /// The customer as the copy holds it now, with the copy's freshness.
    async fn customer(&self, id: &str) -> Result<CopyLookup, ApiError>;

    /// Stores the order and its lines in one transaction; returns its id.
    async fn insert(&self, order: NewOrder) -> Result<i64, ApiError>;

    /// One order, JOINed with the copy: `None` when there is no such order.
    async fn order(&self, id: i64) -> Result<Option<StoredOrder>, ApiError>;

    /// How many orders were taken.
    async fn count_orders(&self) -> Result<u64, ApiError>;

    /// Runs one SQL statement on Order Service's own connection; returns the
    /// rows changed, or the database's error message.
    async fn execute(&self, sql: &str) -> Result<u64, String>;
}

/// Opens the store a [`Storage`] names.
pub async fn open(
    storage: &Storage,
    manifest: &Arc<Manifest>,
) -> anyhow::Result<Arc<dyn OrderStore>> {
    Ok(match storage {
        Storage::Sqlite(path) => Arc::new(super::sqlite::SqliteOrders::open(path, manifest).await?),
        Storage::Postgres(pg) => Arc::new(super::postgres::PostgresOrders::open(pg).await?),
    })
}
