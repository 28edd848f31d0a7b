//! Inventory: stock, reserved synchronously at order time.
//!
//! Stock must be current when an order is taken, so nobody keeps a copy of
//! it: Order Service calls `POST /reserve`, and when Inventory is down orders
//! are refused rather than taken on stale stock.
//!
//! - `POST /reserve` `{lines: [{sku, qty}]}` → [`Reservation`]; 409 when any line lacks stock
//!   (all-or-nothing), 404 for an unknown sku.
//! - `POST /reservations/{id}/release` → [`Reservation`]: the stock goes back (once).
//! - `GET /stock/{sku}` → [`Stock`].
//!
//! An empty database is seeded with [`default_stock`].

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use spoke::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::web::{self, ApiError, Db};

/// This service's name in the manifest.
pub const SERVICE: &str = "inventory-service";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stock (
    sku TEXT PRIMARY KEY NOT NULL,
    available INTEGER NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at_ms INTEGER NOT NULL,
    released INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reservation_lines (
    reservation_id INTEGER NOT NULL REFERENCES reservations (id),
    sku TEXT NOT NULL,
    qty INTEGER NOT NULL
);";

/// One line to reserve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveLine {
    pub sku: String,
    pub qty: i64,
}

/// The body of `POST /reserve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    pub lines: Vec<ReserveLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub reservation_id: i64,
    pub released: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub sku: String,
    pub available: i64,
}

/// The stock an empty inventory starts with (the skus of [`crate::catalog::default_products`]).
pub fn default_stock() -> Vec<Stock> {
    [("kb-01", 20), ("ms-01", 50), ("mn-27", 5)]
        .into_iter()
        .map(|(sku, available)| Stock {
            sku: sku.into(),
            available,
        })
        .collect()
}

/// How to run Inventory.
#[derive(Debug, Clone)]
pub struct Config {
    pub db: PathBuf,
}

type Shared = State<Arc<Db>>;

/// Runs Inventory on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let db = Db::open(&config.db)?;
    db.run(|c| {
        c.execute_batch(SCHEMA)?;
        let n: i64 = c.query_row("SELECT COUNT(*) FROM stock", [], |r| r.get(0))?;
        if n == 0 {
            for s in default_stock() {
                c.execute(
                    "INSERT INTO stock (sku, available) VALUES (?1, ?2)",
                    params![s.sku, s.available],
                )?;
            }
        }
        Ok(())
    })
    .await?;
    let router = Router::new()
        .route("/reserve", post(reserve))
        .route("/reservations/{id}/release", post(release))
        .route("/stock/{sku}", get(stock))
        .with_state(Arc::new(db));
    web::serve(listener, router, shutdown).await
}

async fn reserve(
    State(db): Shared,
    body: Result<Json<ReserveRequest>, JsonRejection>,
) -> Result<Json<Reservation>, ApiError> {
    let Json(req) = body?;
    if req.lines.is_empty() {
        return Err(ApiError::bad_request("nothing to reserve: lines is empty"));
    }
    if let Some(l) = req.lines.iter().find(|l| l.qty <= 0) {
        return Err(ApiError::bad_request(format!(
            "qty of {} must be positive, got {}",
            l.sku, l.qty
        )));
    }
    let reservation_id = db
        .run(move |conn| {
            let tx = web::write_tx(conn)?;
            tx.execute(
                "INSERT INTO reservations (created_at_ms) VALUES (?1)",
                [spoke::clock::now_ms() as i64],
            )?;
            let id = tx.last_insert_rowid();
            for line in &req.lines {
                let available: Option<i64> = tx
                    .query_row(
                        "SELECT available FROM stock WHERE sku = ?1",
                        [&line.sku],
                        |r| r.get(0),
                    )
                    .optional()?;
                let available = available.ok_or_else(|| {
                    ApiError::not_found(format!("no stock record for {}", line.sku))
                })?;
                if available < line.qty {
                    // Dropping `tx` rolls back the lines reserved so far.
                    return Err(ApiError::conflict(format!(
                        "not enough {}: {} asked, {available} available",
                        line.sku, line.qty
                    )));
                }
                tx.execute(
                    "UPDATE stock SET available = available - ?2 WHERE sku = ?1",
                    params![line.sku, line.qty],
                )?;
                tx.execute(
                    "INSERT INTO reservation_lines (reservation_id, sku, qty) VALUES (?1, ?2, ?3)",
                    params![id, line.sku, line.qty],
                )?;
            }
            tx.commit()?;
            Ok(id)
        })
        .await?;
    Ok(Json(Reservation {
        reservation_id,
        released: false,
    }))
}

async fn release(State(db): Shared, Path(id): Path<i64>) -> Result<Json<Reservation>, ApiError> {
    db.run(move |conn| {
        let tx = web::write_tx(conn)?;
        let released: Option<i64> = tx
            .query_row("SELECT released FROM reservations WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        match released {
            None => return Err(ApiError::not_found(format!("no reservation {id}"))),
            Some(1) => {}
            Some(_) => {
                tx.execute(
                    "UPDATE stock SET available = available + (SELECT COALESCE(SUM(qty), 0) FROM reservation_lines l WHERE l.reservation_id = ?1 AND l.sku = stock.sku)",
                    [id],
                )?;
                tx.execute("UPDATE reservations SET released = 1 WHERE id = ?1", [id])?;
            }
        }
        tx.commit()?;
        Ok(())
    })
    .await?;
    Ok(Json(Reservation {
        reservation_id: id,
        released: true,
    }))
}

async fn stock(State(db): Shared, Path(sku): Path<String>) -> Result<Json<Stock>, ApiError> {
    let s = db
        .run(move |c| {
            c.query_row(
                "SELECT sku, available FROM stock WHERE sku = ?1",
                [&sku],
                |r| {
                    Ok(Stock {
                        sku: r.get(0)?,
                        available: r.get(1)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| ApiError::not_found(format!("no stock record for {sku}")))
        })
        .await?;
    Ok(Json(s))
}
