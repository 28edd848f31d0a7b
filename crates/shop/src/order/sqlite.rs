//! Order Service on SQLite (the embedded default): `order.db` holds its tables
//! and the copy of customers that Spoke's agent keeps in the same file.
//!
//! ```text
//!  order.db   orders, order_lines          (Order Service's own)
//!             customers (VIEW, read-only)  ◀── the agent
//!             _spoke_copies                (position, fresh_as_of_ms)
//! ```
//!
//! A write to `customers` on Order Service's connection fails with
//! "customers is a read-only copy of dataset customers owned by customer-service: …".

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use rusqlite::params;
use spoke::clock::Clock;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{CopyStore, StoreError};
use spoke::read::{Copies, ReadError};
use spoke_core::Manifest;

use super::store::{CopyLookup, NewOrder, OrderStore, StoredOrder};
use super::{CopiedCustomer, OrderLine, CUSTOMERS, SERVICE};
use crate::web::{self, ApiError, Db};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL,
    total_cents INTEGER NOT NULL,
    reservation_id INTEGER NOT NULL,
    charge_id TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id INTEGER NOT NULL REFERENCES orders (id),
    line_no INTEGER NOT NULL,
    sku TEXT NOT NULL,
    product_name TEXT NOT NULL,
    unit_price_cents INTEGER NOT NULL,
    qty INTEGER NOT NULL,
    PRIMARY KEY (order_id, line_no)
) WITHOUT ROWID;";

/// The one query behind `GET /orders/{id}`: the order, its lines, the
/// customer from the copy and the copy's freshness mark, in one read.
const ORDER_SQL: &str = "
SELECT o.id, o.customer_id, o.total_cents, o.reservation_id, o.charge_id, o.created_at_ms,
       c.name, c.email, c._spoke_version,
       s.fresh_as_of_ms,
       l.line_no, l.sku, l.product_name, l.unit_price_cents, l.qty
FROM orders o
JOIN order_lines l ON l.order_id = o.id
LEFT JOIN customers c ON c.id = o.customer_id
LEFT JOIN _spoke_copies s ON s.dataset = 'customers'
WHERE o.id = ?1
ORDER BY l.line_no";

/// Order Service's tables and the copy, in `order.db`.
pub struct SqliteOrders {
    db: Db,
    store: Arc<SqliteCopyStore>,
    copies: Copies,
}

impl SqliteOrders {
    /// Opens `path` (creating Order Service's own tables) and the read API
    /// over the copy in it.
    pub async fn open(path: &Path, manifest: &Arc<Manifest>) -> anyhow::Result<Self> {
        let db = Db::open(path)?;
        db.run(|c| Ok(c.execute_batch(SCHEMA)?)).await?;
        let store = Arc::new(
            SqliteCopyStore::open_read_only(path)
                .with_context(|| format!("opening the copies in {}", path.display()))?,
        );
        let copies = Copies::new(manifest, SERVICE, store.clone(), Clock::System);
        Ok(SqliteOrders { db, store, copies })
    }
}

#[async_trait]
impl OrderStore for SqliteOrders {
    fn describe(&self) -> String {
        format!("SQLite {}", self.db.path().display())
    }

    fn order_sql(&self) -> &str {
        ORDER_SQL
    }

    async fn customer(&self, id: &str) -> Result<CopyLookup, ApiError> {
        let read = self.copies.get(CUSTOMERS, id).await.map_err(read_error)?;
        match read {
            Some(r) => Ok(CopyLookup {
                customer: Some(CopiedCustomer {
                    name: text(&r.fields, "name"),
                    email: text(&r.fields, "email"),
                    version: r.version,
                }),
                fresh_as_of_ms: r.fresh_as_of_ms,
            }),
            None => {
                let cursor = self
                    .store
                    .cursor(CUSTOMERS)
                    .await
                    .map_err(|e| read_error(e.into()))?;
                Ok(CopyLookup {
                    customer: None,
                    fresh_as_of_ms: cursor.fresh_as_of_ms,
                })
            }
        }
    }

    async fn insert(&self, order: NewOrder) -> Result<i64, ApiError> {
        self.db
            .run(move |c| {
                let tx = web::write_tx(c)?;
                tx.execute(
                    "INSERT INTO orders (customer_id, total_cents, reservation_id, charge_id, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![order.customer_id, order.total_cents, order.reservation_id, order.charge_id, order.created_at_ms as i64],
                )?;
                let id = tx.last_insert_rowid();
                for l in &order.lines {
                    tx.execute(
                        "INSERT INTO order_lines (order_id, line_no, sku, product_name, unit_price_cents, qty) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![id, l.line_no, l.sku, l.product_name, l.unit_price_cents, l.qty],
                    )?;
                }
                tx.commit()?;
                Ok(id)
            })
            .await
    }

    async fn order(&self, id: i64) -> Result<Option<StoredOrder>, ApiError> {
        self.db
            .run(move |c| {
                let mut stmt = c.prepare_cached(ORDER_SQL).map_err(copy_missing)?;
                let mut rows = stmt.query([id])?;
                let mut order: Option<StoredOrder> = None;
                while let Some(r) = rows.next()? {
                    if order.is_none() {
                        let name: Option<String> = r.get(6)?;
                        let email: Option<String> = r.get(7)?;
                        let version: Option<i64> = r.get(8)?;
                        order = Some(StoredOrder {
                            id: r.get(0)?,
                            customer_id: r.get(1)?,
                            customer: match (name, email, version) {
                                (Some(name), Some(email), Some(version)) => Some(CopiedCustomer {
                                    name,
                                    email,
                                    version: version as u64,
                                }),
                                _ => None,
                            },
                            lines: Vec::new(),
                            total_cents: r.get(2)?,
                            reservation_id: r.get(3)?,
                            charge_id: r.get(4)?,
                            created_at_ms: r.get::<_, i64>(5)? as u64,
                            fresh_as_of_ms: r.get::<_, Option<i64>>(9)?.unwrap_or(0) as u64,
                        });
                    }
                    let unit: i64 = r.get(13)?;
                    let qty: i64 = r.get(14)?;
                    let line = OrderLine {
                        line_no: r.get(10)?,
                        sku: r.get(11)?,
                        product_name: r.get(12)?,
                        unit_price_cents: unit,
                        qty,
                        line_total_cents: unit * qty,
                    };
                    if let Some(o) = order.as_mut() {
                        o.lines.push(line);
                    }
                }
                Ok(order)
            })
            .await
    }

    async fn count_orders(&self) -> Result<u64, ApiError> {
        let n = self
            .db
            .run(|c| Ok(c.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get::<_, i64>(0))?))
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn execute(&self, sql: &str) -> Result<u64, String> {
        let sql = sql.to_owned();
        self.db
            .run(move |c| {
                c.execute(&sql, [])
                    .map(|n| n as u64)
                    .map_err(|e| ApiError::bad_request(e.to_string()))
            })
            .await
            .map_err(|e| e.message)
    }
}

fn text(fields: &serde_json::Map<String, serde_json::Value>, name: &str) -> String {
    fields
        .get(name)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned()
}

fn copy_missing(e: rusqlite::Error) -> ApiError {
    if e.to_string().contains("no such table") {
        ApiError::unavailable(format!(
            "the copy of customers is not in order.db yet ({e}); is the agent (`spoke agent`) running for order-service?"
        ))
    } else {
        e.into()
    }
}

fn read_error(e: ReadError) -> ApiError {
    match e {
        ReadError::Store(StoreError::UnknownCopy(_)) => ApiError::unavailable(
            "the copy of customers is not in order.db yet; is the agent (`spoke agent`) running for order-service?",
        ),
        other => ApiError::unavailable(format!("reading the copy of customers: {other}")),
    }
}
