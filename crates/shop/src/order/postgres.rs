//! Order Service on PostgreSQL (the distributed variant): its tables in its
//! own schema, the copy of customers in the agent's schema of the same
//! database, so one query JOINs them.
//!
//! ```text
//!  <orders_schema>.orders, .order_lines      Order Service's own (its role owns them)
//!  <copies_schema>.customers (VIEW)          ◀── spoke agent (PostgresCopyStore), SELECT only for Order Service
//!  <copies_schema>._spoke_copies             position, fresh_as_of_ms
//! ```
//!
//! Order Service connects with its application role, which the agent lists
//! in its `readers`: it may SELECT the copy and nothing else, so a write to
//! the copy fails with PostgreSQL's own "permission denied".

use std::sync::Arc;

use async_trait::async_trait;
use spoke_core::manifest::is_identifier;
use tokio_postgres::{Client, NoTls};

use super::store::{CopyLookup, NewOrder, OrderStore, PostgresStorage, StoredOrder};
use super::{CopiedCustomer, OrderLine, CUSTOMERS};
use crate::web::ApiError;

/// Order Service's tables and its reads of the copy, in PostgreSQL.
pub struct PostgresOrders {
    storage: PostgresStorage,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    order_sql: String,
    customer_sql: String,
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("order-service postgres connection ended: {e}");
        }
    });
    Ok(client)
}

/// The database's own message (e.g. "permission denied for view customers").
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| crate::web::error_chain(e), |d| d.message().to_owned())
}

impl PostgresOrders {
    /// Connects (so a wrong URL fails at start) and creates Order Service's
    /// schema and tables when missing.
    pub async fn open(storage: &PostgresStorage) -> anyhow::Result<Self> {
        for (what, s) in [
            ("orders schema", &storage.orders_schema),
            ("copies schema", &storage.copies_schema),
        ] {
            anyhow::ensure!(
                is_identifier(s),
                "{what} '{s}' must be a lowercase identifier"
            );
        }
        let client = connect(&storage.url)
            .await
            .map_err(|e| anyhow::anyhow!("order-service: PostgreSQL: {}", message(&e)))?;
        let o = &storage.orders_schema;
        let exists = client
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[o])
            .await
            .map_err(|e| anyhow::anyhow!("order-service: {}", message(&e)))?
            .is_some();
        // Concurrent starts would race on CREATE … IF NOT EXISTS: serialise them.
        let ddl = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('spoke-shop:{o}'));
             {create}
             CREATE TABLE IF NOT EXISTS \"{o}\".orders (
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 customer_id text NOT NULL,
                 total_cents bigint NOT NULL,
                 reservation_id bigint NOT NULL,
                 charge_id text NOT NULL,
                 created_at_ms bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS \"{o}\".order_lines (
                 order_id bigint NOT NULL REFERENCES \"{o}\".orders (id),
                 line_no bigint NOT NULL,
                 sku text NOT NULL,
                 product_name text NOT NULL,
                 unit_price_cents bigint NOT NULL,
                 qty bigint NOT NULL,
                 PRIMARY KEY (order_id, line_no));
             COMMIT;",
            create = if exists {
                String::new()
            } else {
                format!("CREATE SCHEMA IF NOT EXISTS \"{o}\";")
            }
        );
        client.batch_execute(&ddl).await.map_err(|e| {
            anyhow::anyhow!(
                "order-service: creating its tables in schema {o}: {}",
                message(&e)
            )
        })?;
        Ok(PostgresOrders {
            order_sql: order_sql(storage),
            customer_sql: customer_sql(storage),
            storage: storage.clone(),
            client: tokio::sync::Mutex::new(Some(Arc::new(client))),
        })
    }

    /// A live connection, reconnecting when the last one failed.
    async fn client(&self) -> Result<Arc<Client>, ApiError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(connect(&self.storage.url).await.map_err(|e| {
            ApiError::unavailable(format!(
                "order-service cannot reach its PostgreSQL: {}",
                message(&e)
            ))
        })?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Maps an error of a statement touching the copy to an answer.
    fn copy_error(&self, e: &tokio_postgres::Error) -> ApiError {
        let schema = &self.storage.copies_schema;
        let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
        match code.as_str() {
            // undefined_table / invalid_schema_name: the agent has not created the copy.
            "42P01" | "3F000" => ApiError::unavailable(format!(
                "the copy of customers is not in schema {schema} yet ({}); is the agent (`spoke agent`) running for order-service?",
                message(e)
            )),
            // insufficient_privilege: the agent has not granted this role SELECT yet.
            "42501" => ApiError::unavailable(format!(
                "order-service may not read the copy in schema {schema} ({}); list its role in the agent's store readers",
                message(e)
            )),
            "" => ApiError::unavailable(format!(
                "order-service lost its PostgreSQL connection: {}",
                message(e)
            )),
            _ => ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("database: {}", message(e)),
            ),
        }
    }
}

/// The one query behind `GET /orders/{id}`: Order Service's orders and lines,
/// the customer from the copy and the copy's freshness row.
fn order_sql(s: &PostgresStorage) -> String {
    let (o, c) = (&s.orders_schema, &s.copies_schema);
    format!(
        r#"SELECT o.id, o.customer_id, o.total_cents, o.reservation_id, o.charge_id, o.created_at_ms,
       c.name, c.email, c._spoke_version,
       s.fresh_as_of_ms,
       l.line_no, l.sku, l.product_name, l.unit_price_cents, l.qty
FROM "{o}".orders o
JOIN "{o}".order_lines l ON l.order_id = o.id
LEFT JOIN "{c}".customers c ON c.id = o.customer_id
LEFT JOIN "{c}"._spoke_copies s ON s.dataset = 'customers'
WHERE o.id = $1
ORDER BY l.line_no"#
    )
}

/// The customer and the copy's freshness, in one query.
fn customer_sql(s: &PostgresStorage) -> String {
    let c = &s.copies_schema;
    format!(
        r#"SELECT c.name, c.email, c._spoke_version, s.fresh_as_of_ms
FROM "{c}"._spoke_copies s
LEFT JOIN "{c}".customers c ON c.id = $1
WHERE s.dataset = '{CUSTOMERS}'"#
    )
}

#[async_trait]
impl OrderStore for PostgresOrders {
    fn describe(&self) -> String {
        format!(
            "PostgreSQL, orders in schema {}, the copy in schema {}",
            self.storage.orders_schema, self.storage.copies_schema
        )
    }

    fn order_sql(&self) -> &str {
        &self.order_sql
    }

    async fn customer(&self, id: &str) -> Result<CopyLookup, ApiError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&self.customer_sql, &[&id])
            .await
            .map_err(|e| self.copy_error(&e))?
            .ok_or_else(|| {
                ApiError::unavailable(format!(
                    "the copy of customers is not in schema {} yet; is the agent (`spoke agent`) running for order-service?",
                    self.storage.copies_schema
                ))
            })?;
        let name: Option<String> = row.get(0);
        let email: Option<String> = row.get(1);
        let version: Option<i64> = row.get(2);
        Ok(CopyLookup {
            customer: match (name, email, version) {
                (Some(name), Some(email), Some(version)) => Some(CopiedCustomer {
                    name,
                    email,
                    version: version as u64,
                }),
                _ => None,
            },
            fresh_as_of_ms: row.get::<_, i64>(3) as u64,
        })
    }

    async fn insert(&self, order: NewOrder) -> Result<i64, ApiError> {
        let o = &self.storage.orders_schema;
        let client = self.client().await?;
        // One transaction; the lines go in with one statement.
        let sql = format!(
            "WITH new AS (
                INSERT INTO \"{o}\".orders (customer_id, total_cents, reservation_id, charge_id, created_at_ms)
                VALUES ($1, $2, $3, $4, $5) RETURNING id),
             lines AS (
                INSERT INTO \"{o}\".order_lines (order_id, line_no, sku, product_name, unit_price_cents, qty)
                SELECT new.id, l.* FROM new, unnest($6::int8[], $7::text[], $8::text[], $9::int8[], $10::int8[]) AS l)
             SELECT id FROM new"
        );
        let line_no: Vec<i64> = order.lines.iter().map(|l| l.line_no).collect();
        let sku: Vec<&str> = order.lines.iter().map(|l| l.sku.as_str()).collect();
        let name: Vec<&str> = order
            .lines
            .iter()
            .map(|l| l.product_name.as_str())
            .collect();
        let unit: Vec<i64> = order.lines.iter().map(|l| l.unit_price_cents).collect();
        let qty: Vec<i64> = order.lines.iter().map(|l| l.qty).collect();
        let row = client
            .query_one(
                &sql,
                &[
                    &order.customer_id,
                    &order.total_cents,
                    &order.reservation_id,
                    &order.charge_id,
                    &(order.created_at_ms as i64),
                    &line_no,
                    &sku,
                    &name,
                    &unit,
                    &qty,
                ],
            )
            .await
            .map_err(|e| self.copy_error(&e))?;
        Ok(row.get(0))
    }

    async fn order(&self, id: i64) -> Result<Option<StoredOrder>, ApiError> {
        let client = self.client().await?;
        let rows = client
            .query(&self.order_sql, &[&id])
            .await
            .map_err(|e| self.copy_error(&e))?;
        let mut order: Option<StoredOrder> = None;
        for r in rows {
            let unit: i64 = r.get(13);
            let qty: i64 = r.get(14);
            let line = OrderLine {
                line_no: r.get(10),
                sku: r.get(11),
                product_name: r.get(12),
                unit_price_cents: unit,
                qty,
                line_total_cents: unit * qty,
            };
            let o = order.get_or_insert_with(|| {
                let name: Option<String> = r.get(6);
                let email: Option<String> = r.get(7);
                let version: Option<i64> = r.get(8);
                StoredOrder {
                    id: r.get(0),
                    customer_id: r.get(1),
                    customer: match (name, email, version) {
                        (Some(name), Some(email), Some(version)) => Some(CopiedCustomer {
                            name,
                            email,
                            version: version as u64,
                        }),
                        _ => None,
                    },
                    lines: Vec::new(),
                    total_cents: r.get(2),
                    reservation_id: r.get(3),
                    charge_id: r.get(4),
                    created_at_ms: r.get::<_, i64>(5) as u64,
                    fresh_as_of_ms: r.get::<_, Option<i64>>(9).unwrap_or(0) as u64,
                }
            });
            o.lines.push(line);
        }
        Ok(order)
    }

    async fn count_orders(&self) -> Result<u64, ApiError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT count(*) FROM \"{}\".orders",
            self.storage.orders_schema
        );
        let n: i64 = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| self.copy_error(&e))?
            .get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn execute(&self, sql: &str) -> Result<u64, String> {
        let client = self.client().await.map_err(|e| e.message)?;
        client.execute(sql, &[]).await.map_err(|e| message(&e))
    }
}
