//! Catalog: the owner of `products`.
//!
//! Order Service does not copy products (its subscription's strategy is
//! `none`): a product's name and price are point-in-time facts of an order,
//! so Order Service asks Catalog at checkout and snapshots them into the
//! order line. Catalog's code publishes nothing and keeps no outbox.
//!
//! Two stores, the same API: a SQLite file (the embedded shop), or a
//! `products` table in Catalog's own schema of a PostgreSQL database (the
//! distributed shop). There the storefront's copy is fed by Spoke's CDC
//! source, which reads Catalog's committed changes from the write-ahead log;
//! Catalog does not know it is being captured.
//!
//! - `GET /products/{sku}` → [`Product`]; 404 when absent.
//! - `PUT /products/{sku}` [`ProductInput`] → [`Product`] (create or replace).
//! - `PUT /products/{sku}/price` `{unit_price_cents}` → [`Product`].
//! - `GET /categories/{id}` → [`Category`] (the `categories` reference
//!   dataset, which consumers read through a `ttl` cache); 404 when absent.
//! - `GET /stats` → [`Stats`]: how many category reads Catalog served, so a
//!   caller can see what a cache in front of it saved.
//!
//! An empty database is seeded with [`default_products`]; the categories
//! are fixed ([`default_categories`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::anyhow;
use spoke_core::manifest::is_identifier;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::{get, put};
use axum::{Json, Router};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use spoke::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::web::{self, ApiError, Db};

/// The dataset Catalog owns.
pub const DATASET: &str = "products";
/// The PostgreSQL table, in Catalog's schema.
pub const TABLE: &str = "products";

/// This service's name in the manifest.
pub const SERVICE: &str = "catalog-service";

/// The reference dataset Catalog owns beside products.
pub const CATEGORIES: &str = "categories";

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

/// A product category (the `categories` dataset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Category {
    pub id: String,
    pub name: String,
    /// Categories never change in this shop: every one is at version 1.
    pub version: u64,
}

/// The body of `GET /stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// `GET /categories/{id}` requests served since Catalog started.
    pub category_reads: u64,
}

/// The categories of [`default_products`].
pub fn default_categories() -> Vec<Category> {
    [("peripherals", "Peripherals"), ("displays", "Displays")]
        .map(|(id, name)| Category {
            id: id.into(),
            name: name.into(),
            version: 1,
        })
        .to_vec()
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
    pub storage: Storage,
}

/// Where Catalog keeps its products.
#[derive(Debug, Clone)]
pub enum Storage {
    /// A SQLite file of its own.
    Sqlite(PathBuf),
    /// `"<schema>".products` in a PostgreSQL database; the schema is created
    /// when missing.
    Postgres { url: String, schema: String },
}

impl Config {
    pub fn sqlite(db: PathBuf) -> Self {
        Config {
            storage: Storage::Sqlite(db),
        }
    }
}

/// An open store.
enum Store {
    Sqlite(Db),
    Postgres {
        client: tokio_postgres::Client,
        /// `"schema".products`
        table: String,
    },
}

type Shared = State<Arc<Store>>;

fn pg_error(e: &tokio_postgres::Error) -> ApiError {
    ApiError::unavailable(format!(
        "catalog database: {}",
        crate::order::postgres::message(e)
    ))
}

fn pg_product(r: &tokio_postgres::Row) -> Product {
    Product {
        sku: r.get(0),
        name: r.get(1),
        unit_price_cents: r.get(2),
        category: r.get(3),
    }
}

impl Store {
    async fn open(storage: &Storage) -> anyhow::Result<Store> {
        match storage {
            Storage::Sqlite(path) => {
                let db = Db::open(path)?;
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
                Ok(Store::Sqlite(db))
            }
            Storage::Postgres { url, schema } => {
                anyhow::ensure!(
                    is_identifier(schema),
                    "catalog schema '{schema}' must be a lowercase identifier"
                );
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| {
                        anyhow!(
                            "{SERVICE}: PostgreSQL cannot be reached: {}",
                            web::error_chain(&e)
                        )
                    })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("catalog-service postgres connection ended: {e}");
                    }
                });
                let table = format!("\"{schema}\".{TABLE}");
                client
                    .batch_execute(&format!(
                        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
                         CREATE TABLE IF NOT EXISTS {table} (
                             sku text PRIMARY KEY,
                             name text NOT NULL,
                             unit_price_cents bigint NOT NULL,
                             category text NOT NULL
                         );"
                    ))
                    .await
                    .map_err(|e| anyhow!("{SERVICE}: creating {table}: {}", pg_error(&e)))?;
                let store = Store::Postgres { client, table };
                if store.count().await? == 0 {
                    for p in default_products() {
                        store.save(p).await?;
                    }
                }
                Ok(store)
            }
        }
    }

    async fn count(&self) -> Result<i64, ApiError> {
        match self {
            Store::Sqlite(db) => Ok(db
                .run(|c| Ok(c.query_row("SELECT COUNT(*) FROM products", [], |r| r.get(0))?))
                .await?),
            Store::Postgres { client, table } => Ok(client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .map_err(|e| pg_error(&e))?
                .get(0)),
        }
    }

    async fn load(&self, sku: String) -> Result<Product, ApiError> {
        match self {
            Store::Sqlite(db) => db.run(move |c| load(c, &sku)).await,
            Store::Postgres { client, table } => client
                .query_opt(
                    &format!(
                        "SELECT sku, name, unit_price_cents, category FROM {table} WHERE sku = $1"
                    ),
                    &[&sku],
                )
                .await
                .map_err(|e| pg_error(&e))?
                .map(|r| pg_product(&r))
                .ok_or_else(|| ApiError::not_found(format!("no product {sku}"))),
        }
    }

    async fn save(&self, p: Product) -> Result<(), ApiError> {
        match self {
            Store::Sqlite(db) => db.run(move |c| Ok(save(c, &p)?)).await,
            Store::Postgres { client, table } => {
                client
                    .execute(
                        &format!(
                            "INSERT INTO {table} (sku, name, unit_price_cents, category) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (sku) DO UPDATE SET name = excluded.name, unit_price_cents = excluded.unit_price_cents, category = excluded.category"
                        ),
                        &[&p.sku, &p.name, &p.unit_price_cents, &p.category],
                    )
                    .await
                    .map_err(|e| pg_error(&e))?;
                Ok(())
            }
        }
    }

    async fn set_price(&self, sku: String, cents: i64) -> Result<Product, ApiError> {
        match self {
            Store::Sqlite(db) => {
                db.run(move |c| {
                    let n = c.execute(
                        "UPDATE products SET unit_price_cents = ?2 WHERE sku = ?1",
                        params![sku, cents],
                    )?;
                    if n == 0 {
                        return Err(ApiError::not_found(format!("no product {sku}")));
                    }
                    load(c, &sku)
                })
                .await
            }
            Store::Postgres { client, table } => client
                .query_opt(
                    &format!(
                        "UPDATE {table} SET unit_price_cents = $2 WHERE sku = $1
                         RETURNING sku, name, unit_price_cents, category"
                    ),
                    &[&sku, &cents],
                )
                .await
                .map_err(|e| pg_error(&e))?
                .map(|r| pg_product(&r))
                .ok_or_else(|| ApiError::not_found(format!("no product {sku}"))),
        }
    }
}

/// Runs Catalog on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let store = Store::open(&config.storage).await?;
    let categories = Router::new()
        .route("/categories/{id}", get(category))
        .route("/stats", get(stats))
        .with_state(Arc::new(AtomicU64::new(0)));
    let router = Router::new()
        .route("/products/{sku}", get(read).put(replace))
        .route("/products/{sku}/price", put(set_price))
        .with_state(Arc::new(store))
        .merge(categories);
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

async fn category(
    State(reads): State<Arc<AtomicU64>>,
    Path(id): Path<String>,
) -> Result<Json<Category>, ApiError> {
    reads.fetch_add(1, Ordering::Relaxed);
    default_categories()
        .into_iter()
        .find(|c| c.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no category {id}")))
}

async fn stats(State(reads): State<Arc<AtomicU64>>) -> Json<Stats> {
    Json(Stats {
        category_reads: reads.load(Ordering::Relaxed),
    })
}

async fn read(State(store): Shared, Path(sku): Path<String>) -> Result<Json<Product>, ApiError> {
    Ok(Json(store.load(sku).await?))
}

async fn replace(
    State(store): Shared,
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
    store.save(product.clone()).await?;
    Ok(Json(product))
}

async fn set_price(
    State(store): Shared,
    Path(sku): Path<String>,
    body: Result<Json<PriceInput>, JsonRejection>,
) -> Result<Json<Product>, ApiError> {
    let Json(PriceInput { unit_price_cents }) = body?;
    check_price(unit_price_cents)?;
    Ok(Json(store.set_price(sku, unit_price_cents).await?))
}
