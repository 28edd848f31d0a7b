//! Payment: charges, taken synchronously at order time.
//!
//! Order Service sends the customer's id and the amount; Payment resolves the
//! customer's payment method itself, which is why Order Service's copy of
//! `customers` projects only `name` and `email` and never `payment_method_id`.
//!
//! - `POST /charge` [`ChargeRequest`] → [`Charge`]; 402 above [`LIMIT_CENTS`].
//! - `GET /charges` → every [`Charge`], oldest first.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::params;
use serde::{Deserialize, Serialize};
use spoke::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::web::{self, ApiError, Db};

/// This service's name in the manifest.
pub const SERVICE: &str = "payment-service";
/// Largest single charge accepted (the demo's fraud rule).
pub const LIMIT_CENTS: i64 = 100_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    reference TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeRequest {
    pub customer_id: String,
    pub amount_cents: i64,
    /// The caller's reference, e.g. the inventory reservation it pays for.
    pub reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub charge_id: String,
    pub customer_id: String,
    pub amount_cents: i64,
    pub reference: String,
}

/// How to run Payment.
#[derive(Debug, Clone)]
pub struct Config {
    pub db: PathBuf,
}

type Shared = State<Arc<Db>>;

/// Runs Payment on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let db = Db::open(&config.db)?;
    db.run(|c| Ok(c.execute_batch(SCHEMA)?)).await?;
    let router = Router::new()
        .route("/charge", post(charge))
        .route("/charges", get(charges))
        .with_state(Arc::new(db));
    web::serve(listener, router, shutdown).await
}

async fn charge(
    State(db): Shared,
    body: Result<Json<ChargeRequest>, JsonRejection>,
) -> Result<Json<Charge>, ApiError> {
    let Json(req) = body?;
    if req.amount_cents <= 0 {
        return Err(ApiError::bad_request(format!(
            "amount_cents must be positive, got {}",
            req.amount_cents
        )));
    }
    if req.amount_cents > LIMIT_CENTS {
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            format!(
                "declined: {} cents is above the limit of {LIMIT_CENTS} cents per charge",
                req.amount_cents
            ),
        ));
    }
    let charge = db
        .run(move |c| {
            c.execute(
                "INSERT INTO charges (customer_id, amount_cents, reference, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![req.customer_id, req.amount_cents, req.reference, spoke::clock::now_ms() as i64],
            )?;
            Ok(Charge {
                charge_id: format!("ch_{}", c.last_insert_rowid()),
                customer_id: req.customer_id,
                amount_cents: req.amount_cents,
                reference: req.reference,
            })
        })
        .await?;
    Ok(Json(charge))
}

async fn charges(State(db): Shared) -> Result<Json<Vec<Charge>>, ApiError> {
    let all = db
        .run(|c| {
            let mut stmt = c.prepare(
                "SELECT id, customer_id, amount_cents, reference FROM charges ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(Charge {
                    charge_id: format!("ch_{}", r.get::<_, i64>(0)?),
                    customer_id: r.get(1)?,
                    amount_cents: r.get(2)?,
                    reference: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(Json(all))
}
