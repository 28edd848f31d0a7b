//! Order Service: the consumer.
//!
//! ```text
//!  POST /orders {customer_id, lines: [{sku, qty}]}
//!    1. customer ◀── the local copy of customers (freshness reported, never a call)
//!    2. name + unit price ◀── Catalog, per line  ─▶ snapshotted into order_lines
//!    3. stock ◀── Inventory POST /reserve        (synchronous: down ⇒ order refused)
//!    4. money ◀── Payment POST /charge           (synchronous: down ⇒ reservation released, refused)
//!    5. INSERT orders + order_lines in one transaction
//!
//!  GET /orders/{id}: one SQL query over Order Service's database
//!    orders ⋈ order_lines ⟕ customers (the copy, a view) ⟕ _spoke_copies (its freshness mark)
//! ```
//!
//! Where that database is, is configuration ([`Storage`]), behind one seam
//! ([`OrderStore`]) with the same shape for both:
//! - SQLite ([`sqlite`], the embedded default): `order.db` holds Order
//!   Service's own tables *and* the copy, which Spoke's agent writes (in the
//!   demo in this process, in production `spoke agent` beside it). A write to
//!   `customers` on Order Service's connection fails with "customers is a
//!   read-only copy of dataset customers owned by customer-service: …".
//! - PostgreSQL ([`postgres`], distributed): Order Service's tables in its
//!   own schema, the copy in the agent's schema of the same database; Order
//!   Service's role may only SELECT the copy, so a write fails with
//!   PostgreSQL's "permission denied".
//!
//! The handlers below are the same for both.
//!
//! Customer name and email are *not* snapshotted: an order shows the
//! customer's current name as far as the copy knows it, with the copy's
//! staleness. Product name and price *are* snapshotted: later price changes
//! never rewrite what a customer paid.

pub mod postgres;
pub mod sqlite;
pub mod store;

use std::sync::Arc;

use anyhow::anyhow;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use spoke::shutdown::Shutdown;
use spoke_core::freshness::format_rfc3339_ms;
use spoke_core::{Freshness, Manifest};
use tokio::net::TcpListener;

use self::store::{NewOrder, StoredOrder};
pub use self::store::{OrderStore, PostgresStorage, Storage, DEFAULT_ORDERS_SCHEMA};
use crate::catalog::Product;
use crate::inventory::{Reservation, ReserveLine, ReserveRequest};
use crate::payment::{Charge, ChargeRequest};
use crate::web::{self, ApiError, CallError};

/// This service's name in the manifest.
pub const SERVICE: &str = "order-service";
/// The copy Order Service keeps.
pub const CUSTOMERS: &str = "customers";
/// Most lines in one order.
pub const MAX_LINES: usize = 20;
/// Most units of one line.
pub const MAX_QTY: i64 = 100;

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
    /// Where Order Service keeps its data (SQLite file or PostgreSQL schema);
    /// the agent keeps the copy of customers beside it, in the same database.
    pub storage: Storage,
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
    store: Arc<dyn OrderStore>,
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
    /// Opens its storage (creating Order Service's own tables) with the
    /// reads of the copy beside them.
    pub async fn open(config: Config) -> anyhow::Result<Self> {
        let budget = config
            .manifest
            .subscriptions_of(SERVICE)
            .find(|s| s.dataset == CUSTOMERS)
            .map(|s| s.staleness_budget)
            .ok_or_else(|| {
                anyhow!("the manifest has no subscription of {SERVICE} to {CUSTOMERS}")
            })?;
        let store = store::open(&config.storage, &config.manifest).await?;
        Ok(OrderService {
            inner: Arc::new(Inner {
                store,
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

    /// Where its data is, for people.
    pub fn describe(&self) -> String {
        self.inner.store.describe()
    }

    /// The text of the one SQL query behind `GET /orders/{id}`.
    pub fn order_sql(&self) -> &str {
        self.inner.store.order_sql()
    }

    /// Runs one SQL statement on Order Service's own database connection
    /// and returns the rows changed. The demo uses it to show that the copy
    /// refuses writes.
    pub async fn execute(&self, sql: &str) -> anyhow::Result<usize> {
        self.inner
            .store
            .execute(sql)
            .await
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .map_err(|e| anyhow!("{e}"))
    }

    /// How many orders were taken.
    pub async fn count_orders(&self) -> anyhow::Result<u64> {
        Ok(self.inner.store.count_orders().await?)
    }

    /// One order with its customer from the copy: one SQL query.
    pub async fn order(&self, id: i64) -> Result<OrderView, ApiError> {
        let stored = self
            .inner
            .store
            .order(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no order {id}")))?;
        Ok(self.view(stored))
    }

    fn view(&self, o: StoredOrder) -> OrderView {
        OrderView {
            id: o.id,
            customer_id: o.customer_id,
            customer: o.customer,
            lines: o.lines,
            total_cents: o.total_cents,
            reservation_id: o.reservation_id,
            charge_id: o.charge_id,
            created_at_ms: o.created_at_ms,
            customer_copy: freshness(o.fresh_as_of_ms, self.inner.budget),
        }
    }

    /// Takes an order: see the module docs for the steps.
    pub async fn place(&self, req: PlaceOrder) -> Result<OrderView, ApiError> {
        validate(&req)?;
        let s = &self.inner;

        // 1. The customer, from the local copy: no call to Customer Service.
        let read = s.store.customer(&req.customer_id).await?;
        if read.customer.is_none() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "customer {} is not in Order Service's copy of customers (fresh as of {}); customer-service owns customers",
                    req.customer_id,
                    if read.fresh_as_of_ms == 0 {
                        "never".to_owned()
                    } else {
                        format_rfc3339_ms(read.fresh_as_of_ms)
                    }
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
        let id = s
            .store
            .insert(NewOrder {
                customer_id: req.customer_id.clone(),
                total_cents,
                reservation_id: reservation.reservation_id,
                charge_id: charge.charge_id,
                created_at_ms: spoke::clock::now_ms(),
                lines,
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
