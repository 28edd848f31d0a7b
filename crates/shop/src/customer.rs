//! Customer Service: the owner of `customers`.
//!
//! ```text
//!  POST /customers, PUT|DELETE /customers/{id}
//!     └─ one SQLite transaction: the customers row + its spoke_outbox row ─▶ commit ─▶ nudge the relay
//!  relay task: spoke_outbox ──HTTP, owner's token──▶ hub      (hub down: rows wait in the outbox)
//!          or: spoke_outbox ──────────────────────────▶ JetStream (distributed: no hub)
//! ```
//!
//! Where the relay publishes is configuration ([`Publish`]); it can also run
//! outside the service ([`Publish::External`] and [`relay`]), as `spoke relay`
//! does.
//!
//! - `POST /customers` `{id, name, email, preferred_name?, payment_method_id}` → 201 [`Written`]; 409 when the id exists.
//! - `PUT /customers/{id}` `{name, email, preferred_name?, payment_method_id}` → [`Written`]; 404 when absent.
//! - `DELETE /customers/{id}` → [`Written`] (`customer` is `null`).
//! - `GET /customers/{id}` → [`Customer`], the owner's own record.
//! - `GET /outbox` → [`OutboxStatus`]: rows waiting for the feed and the relay's last error
//!   (counters are zero when the relay runs outside the service).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spoke::feed::http::HubClient;
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::feed::Publisher;
use spoke::outbox::relay::{Relay, RelayOptions, RelayStats};
use spoke::outbox::sqlite::{self as outbox, SqliteOutbox};
use spoke::shutdown::Shutdown;
use spoke_core::Manifest;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::web::{self, ApiError, Db};

/// The dataset this service owns.
pub const DATASET: &str = "customers";
/// This service's name in the manifest.
pub const SERVICE: &str = "customer-service";
/// Where `shop customer-service` reads its hub token from.
pub const TOKEN_ENV: &str = "SPOKE_TOKEN_CUSTOMER_SERVICE";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    preferred_name TEXT,
    payment_method_id TEXT NOT NULL
);";

/// A customer, as Customer Service stores and publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    pub id: String,
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub preferred_name: Option<String>,
    pub payment_method_id: String,
}

/// The body of `PUT /customers/{id}`: every field but the id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerInput {
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub preferred_name: Option<String>,
    pub payment_method_id: String,
}

impl Customer {
    pub fn input(&self) -> CustomerInput {
        CustomerInput {
            name: self.name.clone(),
            email: self.email.clone(),
            preferred_name: self.preferred_name.clone(),
            payment_method_id: self.payment_method_id.clone(),
        }
    }

    /// The record as published to `customers` (the manifest's fields).
    pub fn fields(&self) -> Map<String, Value> {
        let mut f = Map::new();
        f.insert("name".into(), Value::from(self.name.clone()));
        f.insert("email".into(), Value::from(self.email.clone()));
        f.insert(
            "preferred_name".into(),
            self.preferred_name.clone().map_or(Value::Null, Value::from),
        );
        f.insert(
            "payment_method_id".into(),
            Value::from(self.payment_method_id.clone()),
        );
        f
    }

    fn validate(&self) -> Result<(), ApiError> {
        if !web::is_plain_id(&self.id) {
            return Err(ApiError::bad_request(format!(
                "id '{}' must be 1 to 64 letters, digits, '-' or '_'",
                self.id
            )));
        }
        if self.name.trim().is_empty() {
            return Err(ApiError::bad_request("name must not be empty"));
        }
        if !self.email.contains('@') {
            return Err(ApiError::bad_request(format!(
                "email '{}' is not an address",
                self.email
            )));
        }
        if self.payment_method_id.trim().is_empty() {
            return Err(ApiError::bad_request("payment_method_id must not be empty"));
        }
        Ok(())
    }
}

/// What a write did: the record, the version it published, and when it committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub id: String,
    /// `null` after a delete.
    pub customer: Option<Customer>,
    /// The per-key version written to the outbox in the same transaction.
    pub version: u64,
    /// Wall-clock time just after the transaction committed (ms since the epoch).
    pub committed_at_ms: u64,
}

/// The outbox's standing, for operators (and the demo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStatus {
    /// Changes committed but not yet accepted by the feed (hub or JetStream).
    pub backlog: u64,
    pub forwarded: u64,
    pub retries: u64,
    pub last_error: Option<String>,
}

/// Where Customer Service's relay publishes its outbox.
#[derive(Debug, Clone)]
pub enum Publish {
    /// To a hub's HTTP API (the embedded default).
    Hub {
        /// The hub's URL, e.g. `http://127.0.0.1:7070`.
        url: String,
        /// This service's hub token (`None` for an open hub).
        token: Option<String>,
    },
    /// Straight into NATS JetStream (distributed: no hub).
    JetStream {
        options: JetStreamOptions,
        /// The manifest, whose schemas every published change is checked against.
        manifest: Arc<Manifest>,
    },
    /// Nowhere from this process: a relay runs beside it ([`relay`], or
    /// `spoke relay --outbox customer.db …`).
    External,
}

impl Publish {
    /// Connects the publisher (`None` for [`Publish::External`]).
    pub async fn connect(&self) -> anyhow::Result<Option<Arc<dyn Publisher>>> {
        Ok(match self {
            Publish::Hub { url, token } => Some(Arc::new(HubClient::new(url, token.clone()))),
            Publish::JetStream { options, manifest } => Some(Arc::new(
                JetStreamFeed::connect(options.clone(), manifest).await?,
            )),
            Publish::External => None,
        })
    }
}

/// How to run Customer Service.
#[derive(Debug, Clone)]
pub struct Config {
    pub db: PathBuf,
    pub publish: Publish,
    pub relay: RelayOptions,
}

struct Service {
    db: Db,
    outbox: Arc<SqliteOutbox>,
    /// `None` when the relay runs outside this process.
    relay: Option<Arc<RelayStats>>,
    nudge: Arc<Notify>,
}

/// A relay forwarding Customer Service's outbox in `db` to `publisher`, to
/// run beside the service (the service must have created `db` first).
pub fn relay(
    db: &std::path::Path,
    publisher: Arc<dyn Publisher>,
    options: RelayOptions,
) -> anyhow::Result<Relay> {
    let source = Arc::new(SqliteOutbox::open(db)?);
    Ok(Relay::new(source, publisher).with_options(options))
}

type Shared = State<Arc<Service>>;

/// Runs Customer Service and its relay on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let db = Db::open(&config.db)?;
    db.run(|c| {
        c.execute_batch(SCHEMA)?;
        outbox::install(c)?;
        Ok(())
    })
    .await?;
    let source = Arc::new(SqliteOutbox::open(&config.db)?);
    let relay = config
        .publish
        .connect()
        .await?
        .map(|p| Relay::new(source.clone(), p).with_options(config.relay.clone()));
    let service = Arc::new(Service {
        db,
        outbox: source,
        relay: relay.as_ref().map(Relay::stats),
        nudge: relay
            .as_ref()
            .map_or_else(|| Arc::new(Notify::new()), Relay::nudger),
    });
    let relay_task = relay.map(|r| tokio::spawn(r.run(shutdown.clone())));
    let router = Router::new()
        .route("/customers", post(create))
        .route("/customers/{id}", get(read).put(update).delete(remove))
        .route("/outbox", get(outbox_status))
        .with_state(service);
    let served = web::serve(listener, router, shutdown).await;
    let Some(relay_task) = relay_task else {
        return served;
    };
    match relay_task.await {
        Ok(Ok(())) => {}
        // The relay stopped on a change the hub rejects; the row stays in the
        // outbox and `GET /outbox` showed the error meanwhile.
        Ok(Err(e)) => tracing::error!("customer-service relay stopped: {e}"),
        Err(e) => tracing::error!("customer-service relay task: {e}"),
    }
    served
}

async fn create(
    State(s): Shared,
    body: Result<Json<Customer>, JsonRejection>,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let Json(customer) = body?;
    customer.validate()?;
    let written = s
        .db
        .run(move |conn| {
            let tx = web::write_tx(conn)?;
            let exists: Option<String> = tx
                .query_row("SELECT id FROM customers WHERE id = ?1", [&customer.id], |r| r.get(0))
                .optional()?;
            if exists.is_some() {
                return Err(ApiError::conflict(format!(
                    "customer {} exists; use PUT /customers/{} to change it",
                    customer.id, customer.id
                )));
            }
            tx.execute(
                "INSERT INTO customers (id, name, email, preferred_name, payment_method_id) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![customer.id, customer.name, customer.email, customer.preferred_name, customer.payment_method_id],
            )?;
            let version = outbox::upsert(&tx, DATASET, &customer.id, &customer.fields())?;
            tx.commit()?;
            Ok(Written {
                id: customer.id.clone(),
                customer: Some(customer),
                version,
                committed_at_ms: spoke::clock::now_ms(),
            })
        })
        .await?;
    s.nudge.notify_one();
    Ok((StatusCode::CREATED, Json(written)))
}

async fn update(
    State(s): Shared,
    Path(id): Path<String>,
    body: Result<Json<CustomerInput>, JsonRejection>,
) -> Result<Json<Written>, ApiError> {
    let Json(input) = body?;
    let customer = Customer {
        id,
        name: input.name,
        email: input.email,
        preferred_name: input.preferred_name,
        payment_method_id: input.payment_method_id,
    };
    customer.validate()?;
    let written = s
        .db
        .run(move |conn| {
            let tx = web::write_tx(conn)?;
            let n = tx.execute(
                "UPDATE customers SET name = ?2, email = ?3, preferred_name = ?4, payment_method_id = ?5 WHERE id = ?1",
                params![customer.id, customer.name, customer.email, customer.preferred_name, customer.payment_method_id],
            )?;
            if n == 0 {
                return Err(ApiError::not_found(format!("no customer {}", customer.id)));
            }
            let version = outbox::upsert(&tx, DATASET, &customer.id, &customer.fields())?;
            tx.commit()?;
            Ok(Written {
                id: customer.id.clone(),
                customer: Some(customer),
                version,
                committed_at_ms: spoke::clock::now_ms(),
            })
        })
        .await?;
    s.nudge.notify_one();
    Ok(Json(written))
}

async fn remove(State(s): Shared, Path(id): Path<String>) -> Result<Json<Written>, ApiError> {
    let written =
        s.db.run(move |conn| {
            let tx = web::write_tx(conn)?;
            let n = tx.execute("DELETE FROM customers WHERE id = ?1", [&id])?;
            if n == 0 {
                return Err(ApiError::not_found(format!("no customer {id}")));
            }
            let version = outbox::delete(&tx, DATASET, &id)?;
            tx.commit()?;
            Ok(Written {
                id,
                customer: None,
                version,
                committed_at_ms: spoke::clock::now_ms(),
            })
        })
        .await?;
    s.nudge.notify_one();
    Ok(Json(written))
}

async fn read(State(s): Shared, Path(id): Path<String>) -> Result<Json<Customer>, ApiError> {
    let found = s
        .db
        .run(move |conn| {
            conn.query_row(
                    "SELECT id, name, email, preferred_name, payment_method_id FROM customers WHERE id = ?1",
                    [&id],
                    |r| {
                        Ok(Customer {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            email: r.get(2)?,
                            preferred_name: r.get(3)?,
                            payment_method_id: r.get(4)?,
                        })
                    },
                )
                .optional()?
                .ok_or_else(|| ApiError::not_found(format!("no customer {id}")))
        })
        .await?;
    Ok(Json(found))
}

async fn outbox_status(State(s): Shared) -> Result<Json<OutboxStatus>, ApiError> {
    let backlog = s
        .outbox
        .backlog()
        .await
        .map_err(|e| ApiError::unavailable(format!("outbox: {e}")))?;
    let Some(relay) = &s.relay else {
        // The relay runs elsewhere and keeps its own counters.
        return Ok(Json(OutboxStatus {
            backlog,
            forwarded: 0,
            retries: 0,
            last_error: None,
        }));
    };
    let last_error = relay
        .last_error
        .lock()
        .map_err(|_| anyhow::anyhow!("relay stats lock poisoned"))?
        .clone();
    Ok(Json(OutboxStatus {
        backlog,
        forwarded: relay.forwarded.load(Ordering::Relaxed),
        retries: relay.retries.load(Ordering::Relaxed),
        last_error,
    }))
}
