//! Order Service: the consumer.
//!
//! ```text
//!  POST /orders {customer_id, lines: [{sku, qty}]}
//!    1. customer ◀── the local copy of customers (read API; freshness reported, never a call)
//!    2. name + unit price ◀── Catalog, per line  ─▶ snapshotted into order_lines
//!    3. stock ◀── Inventory POST /reserve        (synchronous: down ⇒ order refused)
//!    4. money ◀── Payment POST /charge           (synchronous: down ⇒ reservation released, refused)
//!    5. INSERT orders + order_lines in one transaction
//!
//!  GET /orders/{id}: one SQL query over order.db
//!    orders ⋈ order_lines ⟕ customers (the copy, a view) ⟕ _spoke_copies (its freshness mark)
//! ```
//!
//! `order.db` holds Order Service's own tables *and* the copy, which Spoke's
//! agent writes (in the demo in this process, in production `spoke agent`
//! beside it). The copy is read-only for Order Service: a write to
//! `customers` on its own connection fails with "customers is a read-only
//! copy of dataset customers owned by customer-service: …".
//!
//! Customer name and email are *not* snapshotted: an order shows the
//! customer's current name as far as the copy knows it, with the copy's
//! staleness. Product name and price *are* snapshotted: later price changes
//! never rewrite what a customer paid.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::params;
use serde::{Deserialize, Serialize};
use spoke::clock::Clock;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::StoreError;
use spoke::read::{Copies, ReadError};
use spoke::shutdown::Shutdown;
use spoke_core::freshness::format_rfc3339_ms;
use spoke_core::{Freshness, Manifest};
use tokio::net::TcpListener;

use crate::catalog::Product;
use crate::inventory::{Reservation, ReserveLine, ReserveRequest};
use crate::payment::{Charge, ChargeRequest};
use crate::web::{self, ApiError, CallError, Db};

/// This service's name in the manifest.
pub const SERVICE: &str = "order-service";
/// The copy Order Service keeps.
pub const CUSTOMERS: &str = "customers";
/// Most lines in one order.
pub const MAX_LINES: usize = 20;
/// Most units of one line.
pub const MAX_QTY: i64 = 100;

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

/// The body of `POST /orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    pub customer_id: String,
    pub lines: Vec<LineRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    pub sku: String,
    pub qty: i64,
}

/// An order line with the product name and price snapshotted at order time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub line_no: i64,
    pub sku: String,
    pub product_name: String,
    pub unit_price_cents: i64,
    pub qty: i64,
    pub line_total_cents: i64,
}

/// The customer as Order Service's copy knows it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiedCustomer {
    pub name: String,
    pub email: String,
    /// The owner's version of the record the copy holds.
    pub version: u64,
}

/// How fresh the copy of customers was when the order was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyFreshness {
    pub dataset: String,
    /// RFC 3339; `null` when the copy was never fresh.
    pub fresh_as_of: Option<String>,
    /// `null` when the copy was never fresh.
    pub staleness_ms: Option<u64>,
    pub staleness_budget: String,
    pub within_budget: bool,
}

/// An order as `GET /orders/{id}` (and `POST /orders`) answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    pub id: i64,
    pub customer_id: String,
    /// From the copy; `null` when the copy no longer holds the customer.
    pub customer: Option<CopiedCustomer>,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub reservation_id: i64,
    pub charge_id: String,
    pub created_at_ms: u64,
    pub customer_copy: CopyFreshness,
}

/// How to run Order Service.
#[derive(Debug, Clone)]
pub struct Config {
    /// Order Service's database; the agent keeps the copy of customers in it.
    pub db: PathBuf,
    pub catalog: String,
    pub inventory: String,
    pub payment: String,
    pub manifest: Arc<Manifest>,
}

/// A running Order Service: cheap to clone, shared by its HTTP handlers.
#[derive(Clone)]
pub struct OrderService {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    copies: Copies,
    budget: spoke_core::Duration,
    http: reqwest::Client,
    catalog: String,
    inventory: String,
    payment: String,
}

/// Runs Order Service on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    OrderService::open(config)
        .await?
        .serve(listener, shutdown)
        .await
}

fn base(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

impl OrderService {
    /// Opens `order.db` (creating Order Service's own tables) and the read
    /// API over the copy in it.
    pub async fn open(config: Config) -> anyhow::Result<Self> {
        let budget = config
            .manifest
            .subscriptions_of(SERVICE)
            .find(|s| s.dataset == CUSTOMERS)
            .map(|s| s.staleness_budget)
            .ok_or_else(|| {
                anyhow!("the manifest has no subscription of {SERVICE} to {CUSTOMERS}")
            })?;
        let db = Db::open(&config.db)?;
        db.run(|c| Ok(c.execute_batch(SCHEMA)?)).await?;
        let store = SqliteCopyStore::open_read_only(&config.db)
            .with_context(|| format!("opening the copies in {}", config.db.display()))?;
        let copies = Copies::new(&config.manifest, SERVICE, Arc::new(store), Clock::System);
        Ok(OrderService {
            inner: Arc::new(Inner {
                db,
                copies,
                budget,
                http: web::client()?,
                catalog: base(&config.catalog),
                inventory: base(&config.inventory),
                payment: base(&config.payment),
            }),
        })
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/orders", post(place_handler))
            .route("/orders/{id}", get(get_handler))
            .with_state(self.clone())
    }

    /// Serves [`Self::router`] on `listener` until `shutdown` fires.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
        let router = self.router();
        web::serve(listener, router, shutdown).await
    }

    /// Runs one SQL statement on Order Service's own connection to `order.db`
    /// and returns the rows changed. The demo uses it to show that the copy
    /// refuses writes.
    pub async fn execute(&self, sql: &str) -> anyhow::Result<usize> {
        let sql = sql.to_owned();
        self.inner
            .db
            .run(move |c| {
                c.execute(&sql, [])
                    .map_err(|e| ApiError::bad_request(e.to_string()))
            })
            .await
            .map_err(|e| anyhow!("{}", e.message))
    }

    /// How many orders were taken.
    pub async fn count_orders(&self) -> anyhow::Result<u64> {
        let n = self
            .inner
            .db
            .run(|c| Ok(c.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get::<_, i64>(0))?))
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// One order with its customer from the copy: one SQL query.
    pub async fn order(&self, id: i64) -> Result<OrderView, ApiError> {
        let budget = self.inner.budget;
        self.inner
            .db
            .run(move |c| {
                let mut stmt = c.prepare_cached(ORDER_SQL).map_err(copy_missing)?;
                let mut rows = stmt.query([id])?;
                let mut view: Option<OrderView> = None;
                while let Some(r) = rows.next()? {
                    if view.is_none() {
                        let name: Option<String> = r.get(6)?;
                        let email: Option<String> = r.get(7)?;
                        let version: Option<i64> = r.get(8)?;
                        let fresh_as_of_ms = r.get::<_, Option<i64>>(9)?.unwrap_or(0) as u64;
                        view = Some(OrderView {
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
                            customer_copy: freshness(fresh_as_of_ms, budget),
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
                    if let Some(v) = view.as_mut() {
                        v.lines.push(line);
                    }
                }
                view.ok_or_else(|| ApiError::not_found(format!("no order {id}")))
            })
            .await
    }

    /// Takes an order: see the module docs for the steps.
    pub async fn place(&self, req: PlaceOrder) -> Result<OrderView, ApiError> {
        validate(&req)?;
        let s = &self.inner;

        // 1. The customer, from the local copy: no call to Customer Service.
        let read = s
            .copies
            .get(CUSTOMERS, &req.customer_id)
            .await
            .map_err(read_error)?;
        if read.is_none() {
            let status = s
                .copies
                .status(CUSTOMERS, None, None)
                .await
                .map_err(read_error)?;
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "customer {} is not in Order Service's copy of customers (fresh as of {}); customer-service owns customers",
                    req.customer_id,
                    status.fresh_as_of.as_deref().unwrap_or("never")
                ),
            ));
        }

        // 2. Name and price from Catalog, snapshotted into the lines.
        let mut lines = Vec::with_capacity(req.lines.len());
        for (i, l) in req.lines.iter().enumerate() {
            let url = format!("{}/products/{}", s.catalog, l.sku);
            let product: Product = web::call(s.http.get(&url)).await.map_err(|e| match e {
                CallError::Unreachable(m) => ApiError::unavailable(format!(
                    "catalog-service is unreachable ({m}); order refused: product name and price are snapshotted from Catalog at order time"
                )),
                CallError::Refused { status: 404, .. } => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("unknown product {}", l.sku),
                ),
                CallError::Refused { status, message } => ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("catalog-service answered {status}: {message}"),
                ),
            })?;
            lines.push(OrderLine {
                line_no: i as i64 + 1,
                sku: product.sku,
                product_name: product.name,
                unit_price_cents: product.unit_price_cents,
                qty: l.qty,
                line_total_cents: product.unit_price_cents * l.qty,
            });
        }
        let total_cents: i64 = lines.iter().map(|l| l.line_total_cents).sum();

        // 3. Stock, reserved now.
        let reserve = ReserveRequest {
            lines: req
                .lines
                .iter()
                .map(|l| ReserveLine {
                    sku: l.sku.clone(),
                    qty: l.qty,
                })
                .collect(),
        };
        let reservation: Reservation = web::call(s.http.post(format!("{}/reserve", s.inventory)).json(&reserve))
            .await
            .map_err(|e| match e {
                CallError::Unreachable(m) => ApiError::unavailable(format!(
                    "inventory-service is unreachable ({m}); order refused: stock is checked synchronously at order time, never from a copy"
                )),
                CallError::Refused { status, message } => ApiError::new(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    format!("inventory-service refused the reservation: {message}"),
                ),
            })?;

        // 4. Payment; a refusal gives the stock back.
        let charge_req = ChargeRequest {
            customer_id: req.customer_id.clone(),
            amount_cents: total_cents,
            reference: format!("reservation-{}", reservation.reservation_id),
        };
        let charge: Charge = match web::call(
            s.http
                .post(format!("{}/charge", s.payment))
                .json(&charge_req),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                let released = self.release(reservation.reservation_id).await;
                return Err(match e {
                    CallError::Unreachable(m) => ApiError::unavailable(format!(
                        "payment-service is unreachable ({m}); order refused: payment is taken synchronously at order time; {released}"
                    )),
                    CallError::Refused { status, message } => ApiError::new(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        format!("payment-service refused the charge: {message}; {released}"),
                    ),
                });
            }
        };

        // 5. The order and its snapshotted lines, in one transaction.
        let customer_id = req.customer_id.clone();
        let id = s
            .db
            .run(move |c| {
                let tx = web::write_tx(c)?;
                tx.execute(
                    "INSERT INTO orders (customer_id, total_cents, reservation_id, charge_id, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![customer_id, total_cents, reservation.reservation_id, charge.charge_id, spoke::clock::now_ms() as i64],
                )?;
                let id = tx.last_insert_rowid();
                for l in &lines {
                    tx.execute(
                        "INSERT INTO order_lines (order_id, line_no, sku, product_name, unit_price_cents, qty) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![id, l.line_no, l.sku, l.product_name, l.unit_price_cents, l.qty],
                    )?;
                }
                tx.commit()?;
                Ok(id)
            })
            .await?;
        self.order(id).await
    }

    /// Gives a reservation back; says what happened, for the error message.
    async fn release(&self, reservation_id: i64) -> String {
        let url = format!(
            "{}/reservations/{reservation_id}/release",
            self.inner.inventory
        );
        match web::call::<Reservation>(self.inner.http.post(url)).await {
            Ok(_) => format!("stock reservation {reservation_id} released"),
            Err(e) => {
                tracing::warn!("releasing reservation {reservation_id} failed: {e}");
                format!("releasing stock reservation {reservation_id} failed ({e})")
            }
        }
    }
}

fn validate(req: &PlaceOrder) -> Result<(), ApiError> {
    if !web::is_plain_id(&req.customer_id) {
        return Err(ApiError::bad_request(format!(
            "customer_id '{}' must be 1 to 64 letters, digits, '-' or '_'",
            req.customer_id
        )));
    }
    if req.lines.is_empty() || req.lines.len() > MAX_LINES {
        return Err(ApiError::bad_request(format!(
            "an order has 1 to {MAX_LINES} lines, got {}",
            req.lines.len()
        )));
    }
    for l in &req.lines {
        if !web::is_plain_id(&l.sku) {
            return Err(ApiError::bad_request(format!(
                "sku '{}' is not a valid sku",
                l.sku
            )));
        }
        if !(1..=MAX_QTY).contains(&l.qty) {
            return Err(ApiError::bad_request(format!(
                "qty of {} must be 1 to {MAX_QTY}, got {}",
                l.sku, l.qty
            )));
        }
    }
    Ok(())
}

fn freshness(fresh_as_of_ms: u64, budget: spoke_core::Duration) -> CopyFreshness {
    let f = Freshness { fresh_as_of_ms };
    let now = spoke::clock::now_ms();
    CopyFreshness {
        dataset: CUSTOMERS.to_owned(),
        fresh_as_of: (fresh_as_of_ms != 0).then(|| format_rfc3339_ms(fresh_as_of_ms)),
        staleness_ms: f.staleness_ms(now),
        staleness_budget: budget.to_string(),
        within_budget: f.within(budget, now),
    }
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

async fn place_handler(
    State(svc): State<OrderService>,
    body: Result<Json<PlaceOrder>, JsonRejection>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(svc.place(req).await?)))
}

async fn get_handler(
    State(svc): State<OrderService>,
    Path(id): Path<i64>,
) -> Result<Json<OrderView>, ApiError> {
    Ok(Json(svc.order(id).await?))
}
