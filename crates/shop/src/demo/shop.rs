//! The whole shop in one process: every service on its own loopback port
//! (chosen by the OS) with real HTTP between them, and Spoke's roles beside
//! them. Any part can be stopped and started again on the same port with the
//! same data. Two deployments, the same services:
//!
//! **Embedded** ([`Shop::start`]): the hub with per-service tokens, the agent
//! writing the copy of customers into Order Service's `order.db`.
//!
//! ```text
//!  <dir>/hub/hub.db                      the hub's log and compacted state
//!  <dir>/customer-service/customer.db    customers + spoke_outbox
//!  <dir>/order-service/order.db          orders, order_lines + the copy (customers view)
//!  <dir>/{catalog,inventory,payment}/…   the other services' own files
//! ```
//!
//! **Distributed** ([`Shop::start_distributed`]): no hub. Customer Service's
//! relay publishes its outbox straight into NATS JetStream; the agent reads
//! JetStream into a PostgreSQL copy; Order Service keeps its orders in
//! PostgreSQL too, as its own role, and JOINs them with the copy.
//!
//! ```text
//!  customer.db ─relay─▶ JetStream <P>_CUSTOMERS_LOG ─agent─▶ PostgreSQL "<copies>".customers (view)
//!                       (+ <P>_CUSTOMERS_STATE)               "<copies>"._spoke_copies
//!                                                             "<orders>".orders, order_lines  (owned by <app role>)
//! ```
//!
//! Catalog keeps its products in PostgreSQL (its own schema of a database
//! with `wal_level=logical`: `Backends::catalog_postgres`, or a private
//! server the shop starts) and publishes nothing: Spoke's CDC source reads
//! its commits from the write-ahead log into JetStream, and a second agent
//! copies `products` (name, category) for the storefront.
//!
//! ```text
//!  "<catalog>".products ─WAL─▶ cdc (slot, publication) ─▶ JetStream <P>_PRODUCTS_LOG ─agent─▶ "<storefront>".products (view)
//! ```
//!
//! Every name there (schemas, the application role, the stream prefix, the
//! slot and publication) is unique to the run, and [`Shop::shutdown`] (or
//! dropping the shop) removes them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use spoke::agent::{http as agent_http, Agent, AgentOptions};
use spoke::cdc::{CdcConfig, CdcOptions, CdcSource, TableMapping};
use spoke::clock::Clock;
use spoke::copy::postgres::{PostgresCopyStore, PostgresOptions};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::{CopySpec, CopyStore};
use spoke::feed::http::HubClient;
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::Feed;
use spoke::hub::{self, Tokens};
use spoke::outbox::relay::{RelayOptions, RelayStats};
use spoke::read::{Copies, Read};
use spoke::reconcile::{ReconcileReport, Reconciler};
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke_core::{Change, Manifest};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::catalog::{self, PriceInput, Product};
use crate::customer::{self, Customer, CustomerInput, OutboxStatus, Publish, Written};
use crate::inventory::{self, Stock};
use crate::order::{
    self, LineRequest, OrderService, OrderView, PlaceOrder, PostgresStorage, Storage,
};
use crate::payment::{self, Charge};
use crate::web::{self, CallError};

/// How long a stopped part may take to finish its in-flight work.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a wait polls the copy.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Retry backoff ceiling for the relay and the agent: short, so a restarted
/// hub is noticed within half a second.
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How often a relay running beside Customer Service (which cannot nudge it)
/// looks at the outbox.
const EXTERNAL_RELAY_POLL: Duration = Duration::from_millis(20);

/// The parts of the shop that run as servers (the relay of the distributed
/// shop runs beside Customer Service and serves nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Hub,
    Catalog,
    Inventory,
    Payment,
    Order,
    Agent,
    Customer,
    Relay,
    /// The CDC source capturing Catalog's `products` (distributed shop).
    Cdc,
    /// The storefront's agent: its copy of products (distributed shop).
    Storefront,
}

/// The storefront: a consumer that lists products from its copy.
pub const STOREFRONT: &str = "storefront";

impl Part {
    /// The embedded shop's parts, in start order.
    pub const ALL: [Part; 7] = [
        Part::Hub,
        Part::Catalog,
        Part::Inventory,
        Part::Payment,
        Part::Order,
        Part::Agent,
        Part::Customer,
    ];

    /// The distributed shop's parts, in start order: no hub (JetStream is the
    /// feed), and Customer Service's relay on its own.
    pub const DISTRIBUTED: [Part; 9] = [
        Part::Catalog,
        Part::Cdc,
        Part::Inventory,
        Part::Payment,
        Part::Order,
        Part::Agent,
        Part::Storefront,
        Part::Customer,
        Part::Relay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Part::Hub => "hub",
            Part::Catalog => catalog::SERVICE,
            Part::Inventory => inventory::SERVICE,
            Part::Payment => payment::SERVICE,
            Part::Order => order::SERVICE,
            Part::Agent => "agent (order-service)",
            Part::Customer => customer::SERVICE,
            Part::Relay => "relay (customer-service)",
            Part::Cdc => "cdc (catalog-service)",
            Part::Storefront => "agent (storefront)",
        }
    }

    /// Whether the part serves HTTP.
    pub fn listens(self) -> bool {
        !matches!(self, Part::Relay | Part::Cdc)
    }
}

/// The servers the distributed shop uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    /// A PostgreSQL connection (libpq key-value string or `postgres://` URL)
    /// whose role may create roles and schemas. The agent and the operator's
    /// privileged session use it; Order Service gets a role of its own.
    pub postgres: String,
    /// NATS with JetStream, e.g. `nats://127.0.0.1:4222`.
    pub nats: String,
    /// Catalog's own PostgreSQL, with `wal_level=logical` (the CDC source
    /// reads its WAL), as a role that may create schemas, publications and
    /// replication slots. `None`: the shop starts a private server (initdb
    /// from the machine's PostgreSQL binaries) and stops it at the end.
    pub catalog_postgres: Option<String>,
}

/// The PostgreSQL server on this machine, as the tests use it.
pub const DEFAULT_POSTGRES: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";
/// The NATS server on this machine.
pub const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

impl Default for Backends {
    fn default() -> Self {
        Backends {
            postgres: DEFAULT_POSTGRES.to_owned(),
            nats: DEFAULT_NATS.to_owned(),
            catalog_postgres: None,
        }
    }
}

/// What the distributed shop created in PostgreSQL and JetStream, every name
/// unique to this run.
#[derive(Debug, Clone)]
pub struct Distributed {
    pub backends: Backends,
    /// Where the agent keeps the copy (`PostgresOptions::schema`).
    pub copies_schema: String,
    /// Order Service's own schema (orders, order_lines), owned by its role.
    pub orders_schema: String,
    /// Order Service's application role: owns its schema, may only SELECT the copy.
    pub app_role: String,
    app_password: String,
    /// JetStream stream prefix (upper case) and subject prefix (lower case).
    pub stream_prefix: String,
    pub subject_prefix: String,
    /// Catalog's database (`Backends::catalog_postgres` or the private server).
    pub catalog_postgres: String,
    /// Catalog's schema there (products, and the CDC source's progress table).
    pub catalog_schema: String,
    /// The CDC source's replication slot and publication in Catalog's database.
    pub cdc_slot: String,
    pub cdc_publication: String,
    /// Where the storefront's agent keeps its copy of products.
    pub storefront_schema: String,
}

impl Distributed {
    fn new(backends: Backends, catalog_postgres: String) -> Self {
        let base = spoke::testing::unique_name("shop");
        Distributed {
            backends,
            catalog_postgres,
            catalog_schema: format!("{base}_catalog"),
            cdc_slot: format!("{base}_slot"),
            cdc_publication: format!("{base}_pub"),
            storefront_schema: format!("{base}_storefront"),
            copies_schema: format!("{base}_copies"),
            orders_schema: format!("{base}_orders"),
            app_role: format!("{base}_app"),
            app_password: token("order-app"),
            stream_prefix: base.to_uppercase(),
            subject_prefix: base,
        }
    }

    /// Order Service's own connection: the admin connection with its role.
    pub fn app_url(&self) -> String {
        with_credentials(&self.backends.postgres, &self.app_role, &self.app_password)
    }

    /// How the agent and the relay reach JetStream.
    pub fn jetstream(&self) -> JetStreamOptions {
        let mut o = JetStreamOptions::new(&self.backends.nats);
        o.stream_prefix = self.stream_prefix.clone();
        o.subject_prefix = self.subject_prefix.clone();
        o
    }

    async fn create(&self) -> anyhow::Result<()> {
        let admin = pg_connect(&self.backends.postgres).await?;
        admin
            .batch_execute(&format!(
                "CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}';
                 CREATE SCHEMA \"{orders}\" AUTHORIZATION \"{role}\";",
                role = self.app_role,
                password = self.app_password,
                orders = self.orders_schema,
            ))
            .await
            .map_err(|e| {
                anyhow!(
                    "creating Order Service's role and schema: {}",
                    order::postgres::message(&e)
                )
            })
    }

    /// Drops what [`Self::create`] and the run created; idempotent.
    async fn remove(&self) -> anyhow::Result<()> {
        let admin = pg_connect(&self.backends.postgres).await;
        let pg = match admin {
            Ok(admin) => admin
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS \"{copies}\" CASCADE;
                     DROP SCHEMA IF EXISTS \"{orders}\" CASCADE;
                     DO $$ BEGIN
                        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                            EXECUTE 'DROP OWNED BY \"{role}\"';
                            EXECUTE 'DROP ROLE \"{role}\"';
                        END IF;
                     END $$;",
                    copies = self.copies_schema,
                    orders = self.orders_schema,
                    role = self.app_role,
                ))
                .await
                .map_err(|e| {
                    anyhow!(
                        "dropping the shop's schemas and role: {}",
                        order::postgres::message(&e)
                    )
                }),
            Err(e) => Err(e),
        };
        let catalog = self.remove_catalog().await;
        spoke::testing::nats_delete_streams(&self.backends.nats, &self.stream_prefix).await;
        pg.and(catalog)
    }

    /// Drops the CDC source's slot and publication, Catalog's schema, and the
    /// storefront's copy (the CDC source must have stopped: an active slot
    /// cannot be dropped).
    async fn remove_catalog(&self) -> anyhow::Result<()> {
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}';
             DROP PUBLICATION IF EXISTS \"{publication}\";
             DROP SCHEMA IF EXISTS \"{catalog}\" CASCADE;",
            slot = self.cdc_slot,
            publication = self.cdc_publication,
            catalog = self.catalog_schema,
        );
        let catalog = pg_connect(&self.catalog_postgres).await?;
        // The walsender of a just-stopped source may hold the slot a moment longer.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while let Err(e) = catalog.batch_execute(&sql).await {
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "dropping Catalog's slot, publication and schema: {}",
                    order::postgres::message(&e)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let admin = pg_connect(&self.backends.postgres).await?;
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.storefront_schema
            ))
            .await
            .map_err(|e| {
                anyhow!(
                    "dropping the storefront's copy: {}",
                    order::postgres::message(&e)
                )
            })
    }

    /// How the CDC source captures Catalog's products.
    pub fn cdc_config(&self) -> anyhow::Result<CdcConfig> {
        let table = TableMapping::new(
            catalog::DATASET,
            &format!("{}.{}", self.catalog_schema, catalog::TABLE),
            "sku",
            None,
        )?;
        let mut cfg = CdcConfig::new(
            &self.catalog_postgres,
            &self.cdc_publication,
            &self.cdc_slot,
            vec![table],
        );
        cfg.state_table = format!("{}.spoke_cdc_state", self.catalog_schema);
        cfg.options = CdcOptions {
            backoff_max: BACKOFF_MAX,
            ack_interval: Duration::from_millis(50),
            heartbeat: Some(Duration::from_secs(5)),
            ..CdcOptions::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `url` with another user and password, for a key-value string or a URL.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}user={user}&password={password}")
    } else {
        format!("{url} user={user} password={password}")
    }
}

/// Whether every server of a NATS URL list accepts TCP connections.
async fn nats_reachable(urls: &str) -> anyhow::Result<()> {
    for url in urls.split(',').map(str::trim) {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        let host_port = rest.split('/').next().unwrap_or_default();
        let addr = if host_port.contains(':') {
            host_port.to_owned()
        } else {
            format!("{host_port}:4222")
        };
        match tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(anyhow!("NATS at {url} cannot be reached: {e}")),
            Err(_) => return Err(anyhow!("NATS at {url} did not answer within 3 s")),
        }
    }
    Ok(())
}

async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| {
            anyhow!(
                "PostgreSQL at '{url}' cannot be reached: {}",
                web::error_chain(&e)
            )
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

struct Running {
    trigger: ShutdownTrigger,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The shop, running.
pub struct Shop {
    dir: PathBuf,
    /// Catalog's private PostgreSQL when the backends named none; declared
    /// before `_temp` so it stops before its data directory is removed.
    catalog_pg: Option<spoke::testing::PrivatePostgres>,
    _temp: Option<tempfile::TempDir>,
    manifest: Arc<Manifest>,
    tokens: BTreeMap<String, String>,
    addrs: BTreeMap<Part, SocketAddr>,
    /// Catalog's listener, bound before the manifest was loaded (its
    /// address is in the manifest), until Catalog first starts.
    catalog_listener: Option<TcpListener>,
    running: BTreeMap<Part, Running>,
    agent: Option<Arc<Agent>>,
    orders: Option<OrderService>,
    copies: Option<Copies>,
    relay: Option<Arc<RelayStats>>,
    /// The storefront's copies and agent (distributed shop).
    storefront: Option<Copies>,
    storefront_agent: Option<Arc<Agent>>,
    /// The feed the CDC source publishes to, for reading what it carried.
    cdc_feed: Option<Arc<JetStreamFeed>>,
    distributed: Option<Distributed>,
    /// Whether the distributed shop's schemas, role and streams still exist.
    needs_cleanup: bool,
    http: reqwest::Client,
}

/// A token nobody outside this process can guess (std's per-process random hash keys).
fn token(service: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let word = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(service.as_bytes());
        h.write_u64(salt);
        h.finish()
    };
    format!("demo-{service}-{:016x}{:016x}", word(1), word(2))
}

impl Shop {
    /// Starts the embedded shop in a new temporary directory, removed when
    /// the shop is dropped.
    pub async fn start() -> anyhow::Result<Shop> {
        let (temp, mut shop) = Shop::in_temp()?;
        shop._temp = Some(temp);
        shop.start_all().await?;
        Ok(shop)
    }

    /// Starts the embedded shop with its data in `dir` (kept).
    pub async fn start_in(dir: &Path) -> anyhow::Result<Shop> {
        let mut shop = Shop::new(dir)?;
        shop.start_all().await?;
        Ok(shop)
    }

    /// Starts the distributed shop on `backends`: schemas, a role and streams
    /// with names unique to this run, removed by [`Shop::shutdown`] (or when
    /// the shop is dropped). The services' own SQLite files (Customer
    /// Service, Catalog, Inventory, Payment) go in a temporary directory.
    pub async fn start_distributed(backends: Backends) -> anyhow::Result<Shop> {
        let (temp, mut shop) = Shop::in_temp()?;
        // Fail at once, not after the feed's startup patience, when NATS is not there.
        nats_reachable(&backends.nats).await?;
        let catalog_postgres = match &backends.catalog_postgres {
            Some(url) => url.clone(),
            None => {
                let dir = temp.path().join("catalog-postgres");
                let pg = tokio::task::spawn_blocking(move || {
                    spoke::testing::PrivatePostgres::start(&dir)
                })
                .await
                .map_err(|e| anyhow!("starting Catalog's private PostgreSQL: {e}"))?
                .ok_or_else(|| {
                    anyhow!(
                        "Catalog's PostgreSQL needs wal_level=logical: give one (--catalog-postgres), or install PostgreSQL's server binaries (initdb, pg_ctl; SPOKE_PG_BIN) so the shop starts a private one"
                    )
                })?;
                let url = pg.url();
                shop.catalog_pg = Some(pg);
                url
            }
        };
        shop._temp = Some(temp);
        let d = Distributed::new(backends, catalog_postgres);
        shop.distributed = Some(d.clone());
        d.create().await?;
        shop.needs_cleanup = true;
        shop.start_all().await?;
        Ok(shop)
    }

    fn in_temp() -> anyhow::Result<(tempfile::TempDir, Shop)> {
        let temp = tempfile::Builder::new()
            .prefix("spoke-shop-")
            .tempdir()
            .context("creating a temporary directory")?;
        let shop = Shop::new(temp.path())?;
        Ok((temp, shop))
    }

    fn new(dir: &Path) -> anyhow::Result<Shop> {
        let tokens = [customer::SERVICE, order::SERVICE]
            .into_iter()
            .map(|s| (s.to_owned(), token(s)))
            .collect();
        // Catalog's listener first: the manifest's owner_url for categories
        // must name the port it got.
        let catalog =
            web::bind(SocketAddr::from(([127, 0, 0, 1], 0))).context("binding catalog-service")?;
        let catalog_addr = catalog.local_addr()?;
        Ok(Shop {
            dir: dir.to_owned(),
            _temp: None,
            manifest: Arc::new(crate::manifest_with_catalog_at(catalog_addr)?),
            tokens,
            addrs: BTreeMap::from([(Part::Catalog, catalog_addr)]),
            catalog_listener: Some(catalog),
            running: BTreeMap::new(),
            agent: None,
            orders: None,
            copies: None,
            relay: None,
            storefront: None,
            storefront_agent: None,
            cdc_feed: None,
            catalog_pg: None,
            distributed: None,
            needs_cleanup: false,
            http: web::client()?,
        })
    }

    /// The parts this deployment runs, in start order.
    pub fn parts(&self) -> &'static [Part] {
        if self.distributed.is_some() {
            &Part::DISTRIBUTED
        } else {
            &Part::ALL
        }
    }

    async fn start_all(&mut self) -> anyhow::Result<()> {
        for &part in self.parts() {
            self.start_part(part).await?;
        }
        if self.distributed.is_some() {
            // And the storefront's copy of products holds the CDC snapshot.
            Shop::wait_until(
                Duration::from_secs(30),
                "the storefront's copy of products is bootstrapped",
                || async {
                    let status = self
                        .storefront()?
                        .status(catalog::DATASET, None, None)
                        .await;
                    Ok(matches!(&status, Ok(s) if s.position.is_some()).then_some(()))
                },
            )
            .await
            .map_err(|e| {
                anyhow!(
                    "{e:#} (agent: {})",
                    self.storefront_error().unwrap_or_else(|| "no error".into())
                )
            })?;
        }
        // Ready when the agent created the copy and bootstrapped it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.copies()?.status(order::CUSTOMERS, None, None).await;
            if matches!(&status, Ok(s) if s.position.is_some()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "the agent did not create the copy of customers within 10 s: {status:?} (agent: {})",
                    self.agent_error().unwrap_or_else(|| "no error".into())
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Where the shop keeps its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The distributed shop's backends and names; `None` when embedded.
    pub fn distributed(&self) -> Option<&Distributed> {
        self.distributed.as_ref()
    }

    /// The order database, holding Order Service's tables and the copy
    /// (embedded shop).
    pub fn order_db(&self) -> PathBuf {
        self.dir.join("order-service").join("order.db")
    }

    /// `http://127.0.0.1:PORT` of a part (also while it is stopped).
    pub fn url(&self, part: Part) -> String {
        self.addrs
            .get(&part)
            .map_or_else(String::new, |a| format!("http://{a}"))
    }

    pub fn is_running(&self, part: Part) -> bool {
        self.running.contains_key(&part)
    }

    /// Order Service, for calls on its own connection.
    pub fn orders(&self) -> anyhow::Result<&OrderService> {
        self.orders
            .as_ref()
            .ok_or_else(|| anyhow!("order-service has not been started"))
    }

    /// The read API over the copy (in the distributed shop over the
    /// agent's PostgreSQL connection, as an operator would read it).
    pub fn copies(&self) -> anyhow::Result<&Copies> {
        self.copies
            .as_ref()
            .ok_or_else(|| anyhow!("order-service has not been started"))
    }

    /// The storefront's read API over its copy of products (distributed shop).
    pub fn storefront(&self) -> anyhow::Result<&Copies> {
        self.storefront
            .as_ref()
            .ok_or_else(|| anyhow!("the storefront's agent has not been started"))
    }

    /// The storefront agent's current error for its copy of products, if any.
    pub fn storefront_error(&self) -> Option<String> {
        let agent = self.storefront_agent.as_ref()?;
        agent.progress().get(catalog::DATASET)?.last_error()
    }

    /// The latest change of a product the CDC source put in the feed.
    pub async fn captured_product(&self, sku: &str) -> anyhow::Result<Option<Change>> {
        let feed = self
            .cdc_feed
            .as_ref()
            .ok_or_else(|| anyhow!("the CDC source has not been started"))?;
        // The compacted state, read from the key just before `sku`: the
        // JetStream feed serves pages of its state, not single records.
        let mut after: Option<String> = None;
        loop {
            let page = feed
                .snapshot(catalog::DATASET, after.as_deref(), 100)
                .await?;
            if let Some(c) = page.records.iter().find(|c| c.key == sku) {
                return Ok(Some(c.clone()));
            }
            match page.next_after_key {
                Some(k) if k.as_str() < sku => after = Some(k),
                _ => return Ok(None),
            }
        }
    }

    /// The agent's current error for the copy of customers, if any.
    pub fn agent_error(&self) -> Option<String> {
        let agent = self.agent.as_ref()?;
        agent.progress().get(order::CUSTOMERS)?.last_error()
    }

    /// The counters of the distributed shop's relay (last started).
    pub fn relay_stats(&self) -> Option<Arc<RelayStats>> {
        self.relay.clone()
    }

    /// Runs `sql` in a privileged PostgreSQL session (the role the agent
    /// uses) that has *not* set the agent's mark; returns the rows changed or
    /// PostgreSQL's message. Distributed shop only.
    pub async fn privileged_execute(&self, sql: &str) -> anyhow::Result<Result<u64, String>> {
        let d = self.require_distributed()?;
        let admin = pg_connect(&d.backends.postgres).await?;
        Ok(admin
            .execute(sql, &[])
            .await
            .map_err(|e| order::postgres::message(&e)))
    }

    fn require_distributed(&self) -> anyhow::Result<&Distributed> {
        self.distributed
            .as_ref()
            .ok_or_else(|| anyhow!("the embedded shop has no PostgreSQL or JetStream"))
    }

    fn listen(&mut self, part: Part) -> anyhow::Result<TcpListener> {
        if part == Part::Catalog {
            if let Some(listener) = self.catalog_listener.take() {
                return Ok(listener);
            }
        }
        let addr = self
            .addrs
            .get(&part)
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener =
            web::bind(addr).with_context(|| format!("binding {} to {addr}", part.name()))?;
        self.addrs.insert(part, listener.local_addr()?);
        Ok(listener)
    }

    /// An operator's handle on Order Service's customers copy, beside the
    /// running agent (as `spoke reconcile` opens one): the store and the
    /// copy's spec. Embedded shop only.
    pub fn copy_handle(&self) -> anyhow::Result<(SqliteCopyStore, CopySpec)> {
        if self.distributed.is_some() {
            return Err(anyhow!(
                "the distributed shop's copy lives in PostgreSQL; this handle is for the embedded shop"
            ));
        }
        let sub = self
            .manifest
            .subscription(order::SERVICE, order::CUSTOMERS)
            .context("the shop manifest has order-service → customers")?;
        let spec =
            CopySpec::of(&self.manifest, sub).context("the copy's projection fits the schema")?;
        Ok((SqliteCopyStore::open(&self.order_db())?, spec))
    }

    /// Reconciles Order Service's customers copy against the hub, as
    /// `spoke reconcile` does. Embedded shop only.
    pub async fn reconcile_customers(&self) -> anyhow::Result<ReconcileReport> {
        let (store, spec) = self.copy_handle()?;
        let hub = HubClient::new(
            &self.url(Part::Hub),
            self.tokens.get(order::SERVICE).cloned(),
        );
        Reconciler::new(&hub, &store, &spec)
            .run(&|_| {})
            .await
            .context("reconciling the customers copy")
    }

    fn customer_db(&self) -> PathBuf {
        self.dir.join("customer-service").join("customer.db")
    }

    fn pg_copies(&self, d: &Distributed, readers: Vec<String>) -> PostgresOptions {
        PostgresOptions {
            url: d.backends.postgres.clone(),
            schema: d.copies_schema.clone(),
            readers,
        }
    }

    /// Starts `part` on its previous port (a free one the first time), with
    /// the same data.
    pub async fn start_part(&mut self, part: Part) -> anyhow::Result<()> {
        if self.running.contains_key(&part) {
            return Ok(());
        }
        let (trigger, shutdown) = shutdown_channel();
        let dir = self.dir.clone();
        let distributed = self.distributed.clone();
        let task: JoinHandle<anyhow::Result<()>> = match part {
            Part::Hub => {
                if distributed.is_some() {
                    return Err(anyhow!(
                        "the distributed shop has no hub: owners publish to JetStream"
                    ));
                }
                let listener = self.listen(part)?;
                let data = dir.join("hub");
                std::fs::create_dir_all(&data)?;
                let feed = Arc::new(SqliteFeed::open(&data.join("hub.db"), &self.manifest)?);
                let router = hub::router(feed, self.manifest.clone(), Tokens::new(&self.tokens));
                tokio::spawn(async move {
                    hub::serve(listener, router, shutdown.signal())
                        .await
                        .context("hub")
                })
            }
            Part::Catalog => {
                let storage = match &distributed {
                    None => catalog::Storage::Sqlite(dir.join("catalog").join("catalog.db")),
                    Some(d) => catalog::Storage::Postgres {
                        url: d.catalog_postgres.clone(),
                        schema: d.catalog_schema.clone(),
                    },
                };
                tokio::spawn(catalog::serve(
                    self.listen(part)?,
                    catalog::Config { storage },
                    shutdown,
                ))
            }
            Part::Cdc => {
                let d = distributed
                    .ok_or_else(|| anyhow!("the embedded shop's Catalog is not captured by CDC"))?;
                // Catalog creates its table before it answers.
                Shop::wait_until(
                    Duration::from_secs(10),
                    "catalog-service answers",
                    || async { Ok(self.product("kb-01").await.ok().map(|_| ())) },
                )
                .await?;
                let feed = Arc::new(JetStreamFeed::connect(d.jetstream(), &self.manifest).await?);
                let source = CdcSource::new(d.cdc_config()?, self.manifest.clone(), feed.clone())?
                    .with_reader(feed.clone());
                self.cdc_feed = Some(feed);
                tokio::spawn(async move { source.run(shutdown).await.context("cdc") })
            }
            Part::Storefront => {
                let d =
                    distributed.ok_or_else(|| anyhow!("the embedded shop has no storefront"))?;
                let listener = self.listen(part)?;
                let feed = Arc::new(JetStreamFeed::connect(d.jetstream(), &self.manifest).await?);
                let store: Arc<dyn CopyStore> = Arc::new(
                    PostgresCopyStore::open(PostgresOptions {
                        url: d.backends.postgres.clone(),
                        schema: d.storefront_schema.clone(),
                        readers: Vec::new(),
                    })
                    .await?,
                );
                let agent = Arc::new(
                    Agent::new(self.manifest.clone(), STOREFRONT, feed, store.clone())?
                        .with_options(AgentOptions {
                            backoff_max: BACKOFF_MAX,
                            ..AgentOptions::default()
                        }),
                );
                self.storefront = Some(Copies::new(
                    &self.manifest,
                    STOREFRONT,
                    store,
                    Clock::System,
                ));
                self.storefront_agent = Some(agent.clone());
                tokio::spawn(async move {
                    let api = agent_http::router(agent.clone(), Tokens::default());
                    let server = tokio::spawn(hub::serve(listener, api, shutdown.clone().signal()));
                    agent.run(shutdown).await.context("storefront agent")?;
                    server.await?.context("storefront agent HTTP API")?;
                    Ok(())
                })
            }
            Part::Inventory => tokio::spawn(inventory::serve(
                self.listen(part)?,
                inventory::Config {
                    db: dir.join("inventory").join("inventory.db"),
                },
                shutdown,
            )),
            Part::Payment => tokio::spawn(payment::serve(
                self.listen(part)?,
                payment::Config {
                    db: dir.join("payment").join("payment.db"),
                },
                shutdown,
            )),
            Part::Order => {
                let listener = self.listen(part)?;
                let storage = match &distributed {
                    None => Storage::Sqlite(self.order_db()),
                    Some(d) => Storage::Postgres(PostgresStorage {
                        url: d.app_url(),
                        orders_schema: d.orders_schema.clone(),
                        copies_schema: d.copies_schema.clone(),
                    }),
                };
                let svc = OrderService::open(order::Config {
                    storage,
                    catalog: self.url(Part::Catalog),
                    inventory: self.url(Part::Inventory),
                    payment: self.url(Part::Payment),
                    manifest: self.manifest.clone(),
                })
                .await?;
                // The operator's read view of the copy (Order Service has created order.db).
                let copies_store: Arc<dyn CopyStore> = match &distributed {
                    None => Arc::new(SqliteCopyStore::open_read_only(&self.order_db())?),
                    Some(d) => {
                        Arc::new(PostgresCopyStore::open(self.pg_copies(d, Vec::new())).await?)
                    }
                };
                self.copies = Some(Copies::new(
                    &self.manifest,
                    order::SERVICE,
                    copies_store,
                    Clock::System,
                ));
                self.orders = Some(svc.clone());
                tokio::spawn(svc.serve(listener, shutdown))
            }
            Part::Agent => {
                let listener = self.listen(part)?;
                let (feed, store): (Arc<dyn Feed>, Arc<dyn CopyStore>) = match &distributed {
                    None => (
                        Arc::new(HubClient::new(
                            &self.url(Part::Hub),
                            self.tokens.get(order::SERVICE).cloned(),
                        )),
                        Arc::new(SqliteCopyStore::open(&self.order_db())?),
                    ),
                    Some(d) => (
                        Arc::new(JetStreamFeed::connect(d.jetstream(), &self.manifest).await?),
                        Arc::new(
                            PostgresCopyStore::open(self.pg_copies(d, vec![d.app_role.clone()]))
                                .await?,
                        ),
                    ),
                };
                let options = AgentOptions {
                    backoff_max: BACKOFF_MAX,
                    ..AgentOptions::default()
                };
                let agent = Arc::new(
                    Agent::new(self.manifest.clone(), order::SERVICE, feed, store)?
                        .with_options(options),
                );
                self.agent = Some(agent.clone());
                tokio::spawn(async move {
                    let api = agent_http::router(agent.clone(), Tokens::default());
                    let server = tokio::spawn(hub::serve(listener, api, shutdown.clone().signal()));
                    agent.run(shutdown).await.context("agent")?;
                    server.await?.context("agent HTTP API")?;
                    Ok(())
                })
            }
            Part::Customer => {
                let publish = match &distributed {
                    None => Publish::Hub {
                        url: self.url(Part::Hub),
                        token: self.tokens.get(customer::SERVICE).cloned(),
                    },
                    // The relay runs as its own part, so it can be stopped alone.
                    Some(_) => Publish::External,
                };
                tokio::spawn(customer::serve(
                    self.listen(part)?,
                    customer::Config {
                        db: self.customer_db(),
                        publish,
                        relay: RelayOptions {
                            backoff_max: BACKOFF_MAX,
                            ..RelayOptions::default()
                        },
                    },
                    shutdown,
                ))
            }
            Part::Relay => {
                let d = distributed.ok_or_else(|| {
                    anyhow!("the embedded shop's relay runs inside customer-service")
                })?;
                let feed = Arc::new(JetStreamFeed::connect(d.jetstream(), &self.manifest).await?);
                let relay = customer::relay(
                    &self.customer_db(),
                    feed,
                    RelayOptions {
                        backoff_max: BACKOFF_MAX,
                        poll_every: EXTERNAL_RELAY_POLL,
                        ..RelayOptions::default()
                    },
                )?;
                self.relay = Some(relay.stats());
                tokio::spawn(async move { relay.run(shutdown).await.context("relay") })
            }
        };
        self.running.insert(part, Running { trigger, task });
        Ok(())
    }

    /// Stops `part` and waits until it finished its in-flight requests.
    pub async fn stop_part(&mut self, part: Part) -> anyhow::Result<()> {
        let Some(running) = self.running.remove(&part) else {
            return Ok(());
        };
        running.trigger.fire();
        match tokio::time::timeout(STOP_TIMEOUT, running.task).await {
            Ok(Ok(result)) => {
                result.with_context(|| format!("{} stopped with an error", part.name()))
            }
            Ok(Err(join)) => Err(anyhow!("{} failed: {join}", part.name())),
            Err(_) => Err(anyhow!(
                "{} did not stop within {STOP_TIMEOUT:?}",
                part.name()
            )),
        }
    }

    /// Stops every part, the consumer side first; then the distributed shop
    /// removes its schemas, role and streams.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        for &part in self.parts().iter().rev() {
            if let Err(e) = self.stop_part(part).await {
                first_error.get_or_insert(e);
            }
        }
        self.orders = None;
        self.copies = None;
        self.agent = None;
        self.storefront = None;
        self.storefront_agent = None;
        self.cdc_feed = None;
        if let Some(d) = self.distributed.clone().filter(|_| self.needs_cleanup) {
            match d.remove().await {
                Ok(()) => self.needs_cleanup = false,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether `part` answers HTTP at all (any status counts).
    pub async fn answers(&self, part: Part) -> bool {
        self.http
            .get(format!("{}/", self.url(part)))
            .send()
            .await
            .is_ok()
    }

    // --- Calls, as a client of each service would make them. ---

    pub async fn create_customer(&self, c: &Customer) -> Result<Written, CallError> {
        let url = format!("{}/customers", self.url(Part::Customer));
        web::call(self.http.post(url).json(c)).await
    }

    pub async fn update_customer(
        &self,
        id: &str,
        input: &CustomerInput,
    ) -> Result<Written, CallError> {
        let url = format!("{}/customers/{id}", self.url(Part::Customer));
        web::call(self.http.put(url).json(input)).await
    }

    pub async fn customer(&self, id: &str) -> Result<Customer, CallError> {
        let url = format!("{}/customers/{id}", self.url(Part::Customer));
        web::call(self.http.get(url)).await
    }

    pub async fn outbox(&self) -> Result<OutboxStatus, CallError> {
        let url = format!("{}/outbox", self.url(Part::Customer));
        web::call(self.http.get(url)).await
    }

    pub async fn product(&self, sku: &str) -> Result<Product, CallError> {
        let url = format!("{}/products/{sku}", self.url(Part::Catalog));
        web::call(self.http.get(url)).await
    }

    /// How many category reads Catalog has served.
    pub async fn catalog_stats(&self) -> Result<catalog::Stats, CallError> {
        let url = format!("{}/stats", self.url(Part::Catalog));
        web::call(self.http.get(url)).await
    }

    /// Order Service's read API with its owner source: `ttl` subscriptions
    /// (categories) read through their caches to Catalog, on `clock`, so
    /// the demo can move the caches' time by hand instead of waiting.
    pub fn read_through(&self, clock: Clock) -> anyhow::Result<Copies> {
        let owner = spoke::owner::HttpOwnerSource::from_manifest(
            &self.manifest,
            order::SERVICE,
            spoke::owner::DEFAULT_OWNER_TIMEOUT,
        )?;
        // A ttl subscription keeps no copy: the store is never read for it.
        let store: Arc<dyn CopyStore> = Arc::new(spoke::copy::memory::MemoryCopyStore::new());
        Ok(Copies::new(&self.manifest, order::SERVICE, store, clock).with_owner(Arc::new(owner)))
    }

    pub async fn set_price(&self, sku: &str, unit_price_cents: i64) -> Result<Product, CallError> {
        let url = format!("{}/products/{sku}/price", self.url(Part::Catalog));
        web::call(self.http.put(url).json(&PriceInput { unit_price_cents })).await
    }

    pub async fn stock(&self, sku: &str) -> Result<Stock, CallError> {
        let url = format!("{}/stock/{sku}", self.url(Part::Inventory));
        web::call(self.http.get(url)).await
    }

    pub async fn charges(&self) -> Result<Vec<Charge>, CallError> {
        let url = format!("{}/charges", self.url(Part::Payment));
        web::call(self.http.get(url)).await
    }

    pub async fn place_order(
        &self,
        customer_id: &str,
        lines: &[(&str, i64)],
    ) -> Result<OrderView, CallError> {
        let body = PlaceOrder {
            customer_id: customer_id.to_owned(),
            lines: lines
                .iter()
                .map(|(sku, qty)| LineRequest {
                    sku: (*sku).to_owned(),
                    qty: *qty,
                })
                .collect(),
        };
        let url = format!("{}/orders", self.url(Part::Order));
        web::call(self.http.post(url).json(&body)).await
    }

    pub async fn order(&self, id: i64) -> Result<OrderView, CallError> {
        let url = format!("{}/orders/{id}", self.url(Part::Order));
        web::call(self.http.get(url)).await
    }

    /// The customer as the copy holds it now.
    pub async fn copied(&self, id: &str) -> anyhow::Result<Option<Read>> {
        Ok(self.copies()?.get(order::CUSTOMERS, id).await?)
    }

    /// Polls the copy until `id`'s record satisfies `done`; returns it and
    /// the wall-clock time (ms) it was first seen so.
    pub async fn wait_for_copy(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Read) -> bool,
    ) -> anyhow::Result<(Read, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let read = self.copied(id).await?;
            let seen_at = spoke::clock::now_ms();
            match read {
                Some(r) if done(&r) => return Ok((r, seen_at)),
                other if Instant::now() > deadline => {
                    return Err(anyhow!(
                        "the copy of customer {id} did not catch up within {timeout:?} (it holds {:?}; agent: {})",
                        other.map(|r| (r.version, r.fields)),
                        self.agent_error().unwrap_or_else(|| "no error".into())
                    ))
                }
                _ => tokio::time::sleep(POLL_EVERY).await,
            }
        }
    }

    /// Polls `f` until it returns `Some`, for at most `timeout`.
    pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await? {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(anyhow!("{what}: not within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Shop {
    /// A shop dropped without [`Shop::shutdown`] (a failed test) still
    /// removes the distributed shop's schemas, role and streams.
    fn drop(&mut self) {
        let Some(d) = self.distributed.clone().filter(|_| self.needs_cleanup) else {
            return;
        };
        for running in std::mem::take(&mut self.running).into_values() {
            running.trigger.fire();
            running.task.abort();
        }
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(d.remove())
        });
        if let Ok(Err(e)) = cleanup.join() {
            eprintln!("spoke-shop: cleaning up the distributed shop: {e:#}");
        }
    }
}
