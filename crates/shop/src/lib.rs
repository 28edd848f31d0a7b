//! The shop example: five small services wired together with Spoke.
//!
//! ```text
//!  Customer Service ── outbox ─relay─▶ hub ─▶ agent ─▶ order.db: customers (read-only copy: name, email)
//!   (owns customers)                                         ▲ JOIN
//!                                                            │
//!  Catalog ◀── GET /products/{sku} (snapshot name + price) ── Order Service ── POST /reserve ──▶ Inventory
//!   (owns products)                                          └──────────────── POST /charge ───▶ Payment
//! ```
//!
//! Distributed (`spoke demo --distributed`), the same services with no code
//! change, only configuration: Customer Service's relay publishes straight
//! into NATS JetStream (no hub), the agent keeps the copy in Order Service's
//! PostgreSQL, and Order Service keeps its orders there too, JOINing them
//! with the copy in one SQL query.
//!
//! ```text
//!  Customer Service ── outbox ─relay─▶ JetStream ─▶ agent ─▶ PostgreSQL: <copies>.customers (read-only copy)
//!                                                                      <orders>.orders, order_lines ─ JOIN ─┘
//! ```
//!
//! Order Service keeps a local copy of what rarely changes and is only
//! displayed (customer name and email: `events`, 1 h budget), snapshots what
//! is a point-in-time fact of an order (product name and price), and calls
//! what must be current (stock, payment). `examples/shop/manifest.toml` says
//! so, and is embedded here as [`MANIFEST_TOML`].
//!
//! # Layout
//! - [`customer`]: Customer Service — customers in its own SQLite file, each
//!   write and its outbox row in one transaction, the relay to the hub or
//!   straight into JetStream.
//! - [`catalog`]: Catalog — products and prices.
//! - [`inventory`]: Inventory — stock reservations.
//! - [`payment`]: Payment — charges.
//! - [`order`]: Order Service — orders placed from the copy, read back with
//!   one SQL JOIN against it; its storage ([`order::OrderStore`]) is SQLite
//!   or PostgreSQL by configuration ([`order::Storage`]).
//! - [`web`]: what the services share: JSON errors, their SQLite file,
//!   re-bindable listeners, calls to each other.
//! - [`demo`]: the whole shop in one process ([`demo::Shop`]) and the
//!   narrated runs behind `spoke demo` ([`demo::run`]) and
//!   `spoke demo --distributed` ([`demo::run_distributed`]).
//!
//! The `shop` binary (`src/main.rs`) starts each service as its own process;
//! Spoke's hub and agent then run as `spoke hub` and `spoke agent`.

pub mod catalog;
pub mod customer;
pub mod demo;
pub mod inventory;
pub mod order;
pub mod payment;
pub mod web;

use spoke_core::Manifest;

/// Where the shop's manifest lives in the repository.
pub const MANIFEST_PATH: &str = "examples/shop/manifest.toml";

/// The shop's manifest, as compiled in.
pub const MANIFEST_TOML: &str = include_str!("../../../examples/shop/manifest.toml");

/// Where the manifest's `owner_url`s find Catalog: the address
/// `shop catalog-service --listen` is given in the shop's README.
pub const CATALOG_ADDR: &str = "127.0.0.1:7102";

/// The shop's manifest, parsed.
pub fn manifest() -> anyhow::Result<Manifest> {
    Manifest::parse(MANIFEST_PATH, MANIFEST_TOML).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The shop's manifest with Catalog at `catalog` instead of
/// [`CATALOG_ADDR`] in its `owner_url`s, for a shop whose Catalog listens
/// on a port chosen at run time: the demo binds Catalog's listener first,
/// then loads the manifest with the address it got.
pub fn manifest_with_catalog_at(catalog: std::net::SocketAddr) -> anyhow::Result<Manifest> {
    let at = format!("http://{CATALOG_ADDR}/");
    anyhow::ensure!(
        MANIFEST_TOML.contains(&at),
        "{MANIFEST_PATH} has no owner_url at {at}: nothing to point at Catalog's address"
    );
    let text = MANIFEST_TOML.replace(&at, &format!("http://{catalog}/"));
    Manifest::parse(MANIFEST_PATH, &text).map_err(|e| anyhow::anyhow!("{e}"))
}
