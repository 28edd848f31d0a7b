//! Catalog: the owner of `products`.
//!
//! Order Service does not copy products (its subscription's strategy is
//! `none`): a product's name and price are point-in-time facts of an order,
//! so Order Service asks Catalog at checkout and snapshots them into the
//! order line. Nothing is published, so Catalog keeps no outbox.
//!
//! - `GET /products/{sku}` → [`Product`]; 404 when absent.
//! - `PUT /products/{sku}` [`ProductInput`] → [`Product`] (create or replace).
//! - `PUT /products/{sku}/price` `{unit_price_cents}` → [`Product`].
//!
//! An empty database is seeded with [`default_products`].

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::{get, put};
use axum::{Json, Router};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use spoke::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::web::{self, ApiError, Db};

/// This service's name in the manifest.
pub const SERVICE: &str = "catalog-service";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS products (
    sku TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    unit_price_cents INTEGER NOT NULL,
    category TEXT NOT NULL
);";

/// A product, as Catalog owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub unit_price_cents: i64,
    pub category: String,
}

/// The body of `PUT /products/{sku}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductInput {
    pub name: String,
    pub unit_price_cents: i64,
    pub category: String,
}

/// The body of `PUT /products/{sku}/price`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceInput {
    pub unit_price_cents: i64,
}

/// The products an empty catalog starts with.
pub fn default_products() -> Vec<Product> {
    let p = |sku: &str, name: &str, cents: i64, category: &str| Product {
        sku: sku.into(),
        name: name.into(),
        unit_price_cents: cents,
        category: category.into(),
    };
    vec![
        p("kb-01", "Mechanical keyboard", 8_900, "peripherals"),
        p("ms-01", "Wireless mouse", 2_900, "peripherals"),
        p("mn-27", "27-inch monitor", 24_900, "displays"),
    ]
}

/// How to run Catalog.
#[derive(Debug, Clone)]
pub struct Config {
    pub db: PathBuf,
}

type Shared = State<Arc<Db>>;

/// Runs Catalog on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let db = Db::open(&config.db)?;
    db.run(|c| {
        c.execute_batch(SCHEMA)?;
        let n: i64 = c.query_row("SELECT COUNT(*) FROM products", [], |r| r.get(0))?;
        if n == 0 {
            for p in default_products() {
                save(c, &p)?;
            }
        }
        Ok(())
    })
    .await?;
    let router = Router::new()
        .route("/products/{sku}", get(read).put(replace))
        .route("/products/{sku}/price", put(set_price))
        .with_state(Arc::new(db));
    web::serve(listener, router, shutdown).await
}

fn save(conn: &Connection, p: &Product) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO products (sku, name, unit_price_cents, category) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (sku) DO UPDATE SET name = excluded.name, unit_price_cents = excluded.unit_price_cents, category = excluded.category",
        params![p.sku, p.name, p.unit_price_cents, p.category],
    )?;
    Ok(())
}

fn load(conn: &Connection, sku: &str) -> Result<Product, ApiError> {
    conn.query_row(
        "SELECT sku, name, unit_price_cents, category FROM products WHERE sku = ?1",
        [sku],
        |r| {
            Ok(Product {
                sku: r.get(0)?,
                name: r.get(1)?,
                unit_price_cents: r.get(2)?,
                category: r.get(3)?,
            })
        },
    )
    .optional()?
    .ok_or_else(|| ApiError::not_found(format!("no product {sku}")))
}

fn check_price(cents: i64) -> Result<(), ApiError> {
    if cents < 0 {
        return Err(ApiError::bad_request(format!(
            "unit_price_cents must not be negative, got {cents}"
        )));
    }
    Ok(())
}

async fn read(State(db): Shared, Path(sku): Path<String>) -> Result<Json<Product>, ApiError> {
    Ok(Json(db.run(move |c| load(c, &sku)).await?))
}

async fn replace(
    State(db): Shared,
    Path(sku): Path<String>,
    body: Result<Json<ProductInput>, JsonRejection>,
) -> Result<Json<Product>, ApiError> {
    let Json(input) = body?;
    if !web::is_plain_id(&sku) {
        return Err(ApiError::bad_request(format!(
            "sku '{sku}' must be 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    check_price(input.unit_price_cents)?;
    let product = Product {
        sku,
        name: input.name,
        unit_price_cents: input.unit_price_cents,
        category: input.category,
    };
    let saved = product.clone();
    db.run(move |c| Ok(save(c, &saved)?)).await?;
    Ok(Json(product))
}

async fn set_price(
    State(db): Shared,
    Path(sku): Path<String>,
    body: Result<Json<PriceInput>, JsonRejection>,
) -> Result<Json<Product>, ApiError> {
    let Json(PriceInput { unit_price_cents }) = body?;
    check_price(unit_price_cents)?;
    let product = db
        .run(move |c| {
            let n = c.execute(
                "UPDATE products SET unit_price_cents = ?2 WHERE sku = ?1",
                params![sku, unit_price_cents],
            )?;
            if n == 0 {
                return Err(ApiError::not_found(format!("no product {sku}")));
            }
            load(c, &sku)
        })
        .await?;
    Ok(Json(product))
}
