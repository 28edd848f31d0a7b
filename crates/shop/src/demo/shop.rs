//! The whole shop in one process, on the embedded default: every service and
//! the hub on its own loopback port (chosen by the OS) with real HTTP between
//! them, the hub with per-service tokens, and the agent writing the copy of
//! customers into Order Service's `order.db`. Any part can be stopped and
//! started again on the same port with the same data.
//!
//! ```text
//!  <dir>/hub/hub.db                      the hub's log and compacted state
//!  <dir>/customer-service/customer.db    customers + spoke_outbox
//!  <dir>/order-service/order.db          orders, order_lines + the copy (customers view)
//!  <dir>/{catalog,inventory,payment}/…   the other services' own files
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use spoke::agent::{http as agent_http, Agent, AgentOptions};
use spoke::clock::Clock;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::hub::{self, Tokens};
use spoke::outbox::relay::RelayOptions;
use spoke::read::{Copies, Read};
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke_core::Manifest;
use tokio::task::JoinHandle;

use crate::catalog::{self, PriceInput, Product};
use crate::customer::{self, Customer, CustomerInput, OutboxStatus, Written};
use crate::inventory::{self, Stock};
use crate::order::{self, LineRequest, OrderService, OrderView, PlaceOrder};
use crate::payment::{self, Charge};
use crate::web::{self, CallError};

/// How long a stopped part may take to finish its in-flight work.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a wait polls the copy.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Retry backoff ceiling for the relay and the agent: short, so a restarted
/// hub is noticed within half a second.
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The parts of the shop that run as servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Hub,
    Catalog,
    Inventory,
    Payment,
    Order,
    Agent,
    Customer,
}

impl Part {
    /// In start order.
    pub const ALL: [Part; 7] = [
        Part::Hub,
        Part::Catalog,
        Part::Inventory,
        Part::Payment,
        Part::Order,
        Part::Agent,
        Part::Customer,
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
        }
    }
}

struct Running {
    trigger: ShutdownTrigger,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The shop, running.
pub struct Shop {
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    manifest: Arc<Manifest>,
    tokens: BTreeMap<String, String>,
    addrs: BTreeMap<Part, SocketAddr>,
    running: BTreeMap<Part, Running>,
    agent: Option<Arc<Agent>>,
    orders: Option<OrderService>,
    copies: Option<Copies>,
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
    /// Starts the shop in a new temporary directory, removed when the shop is dropped.
    pub async fn start() -> anyhow::Result<Shop> {
        let temp = tempfile::Builder::new()
            .prefix("spoke-shop-")
            .tempdir()
            .context("creating a temporary directory")?;
        let dir = temp.path().to_owned();
        let mut shop = Shop::new(&dir)?;
        shop._temp = Some(temp);
        shop.start_all().await?;
        Ok(shop)
    }

    /// Starts the shop with its data in `dir` (kept).
    pub async fn start_in(dir: &Path) -> anyhow::Result<Shop> {
        let mut shop = Shop::new(dir)?;
        shop.start_all().await?;
        Ok(shop)
    }

    fn new(dir: &Path) -> anyhow::Result<Shop> {
        let tokens = [customer::SERVICE, order::SERVICE]
            .into_iter()
            .map(|s| (s.to_owned(), token(s)))
            .collect();
        Ok(Shop {
            dir: dir.to_owned(),
            _temp: None,
            manifest: Arc::new(crate::manifest()?),
            tokens,
            addrs: BTreeMap::new(),
            running: BTreeMap::new(),
            agent: None,
            orders: None,
            copies: None,
            http: web::client()?,
        })
    }

    async fn start_all(&mut self) -> anyhow::Result<()> {
        for part in Part::ALL {
            self.start_part(part).await?;
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
                    "the agent did not create the copy of customers within 10 s: {status:?}"
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

    /// The order database, holding Order Service's tables and the copy.
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

    /// The read API over the copy, as Order Service's code would use it.
    pub fn copies(&self) -> anyhow::Result<&Copies> {
        self.copies
            .as_ref()
            .ok_or_else(|| anyhow!("order-service has not been started"))
    }

    /// The agent's current error for the copy of customers, if any.
    pub fn agent_error(&self) -> Option<String> {
        let agent = self.agent.as_ref()?;
        agent.progress().get(order::CUSTOMERS)?.last_error()
    }

    /// Starts `part` on its previous port (a free one the first time), with
    /// the same data.
    pub async fn start_part(&mut self, part: Part) -> anyhow::Result<()> {
        if self.running.contains_key(&part) {
            return Ok(());
        }
        let addr = self
            .addrs
            .get(&part)
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener =
            web::bind(addr).with_context(|| format!("binding {} to {addr}", part.name()))?;
        self.addrs.insert(part, listener.local_addr()?);
        let (trigger, shutdown) = shutdown_channel();
        let dir = self.dir.clone();
        let task: JoinHandle<anyhow::Result<()>> = match part {
            Part::Hub => {
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
            Part::Catalog => tokio::spawn(catalog::serve(
                listener,
                catalog::Config {
                    db: dir.join("catalog").join("catalog.db"),
                },
                shutdown,
            )),
            Part::Inventory => tokio::spawn(inventory::serve(
                listener,
                inventory::Config {
                    db: dir.join("inventory").join("inventory.db"),
                },
                shutdown,
            )),
            Part::Payment => tokio::spawn(payment::serve(
                listener,
                payment::Config {
                    db: dir.join("payment").join("payment.db"),
                },
                shutdown,
            )),
            Part::Order => {
                let svc = OrderService::open(order::Config {
                    db: self.order_db(),
                    catalog: self.url(Part::Catalog),
                    inventory: self.url(Part::Inventory),
                    payment: self.url(Part::Payment),
                    manifest: self.manifest.clone(),
                })
                .await?;
                let store = SqliteCopyStore::open_read_only(&self.order_db())?;
                self.copies = Some(Copies::new(
                    &self.manifest,
                    order::SERVICE,
                    Arc::new(store),
                    Clock::System,
                ));
                self.orders = Some(svc.clone());
                tokio::spawn(svc.serve(listener, shutdown))
            }
            Part::Agent => {
                let feed = Arc::new(HubClient::new(
                    &self.url(Part::Hub),
                    self.tokens.get(order::SERVICE).cloned(),
                ));
                let store = Arc::new(SqliteCopyStore::open(&self.order_db())?);
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
                    let api = agent_http::router(agent.clone());
                    let server = tokio::spawn(hub::serve(listener, api, shutdown.clone().signal()));
                    agent.run(shutdown).await.context("agent")?;
                    server.await?.context("agent HTTP API")?;
                    Ok(())
                })
            }
            Part::Customer => tokio::spawn(customer::serve(
                listener,
                customer::Config {
                    db: dir.join("customer-service").join("customer.db"),
                    hub: self.url(Part::Hub),
                    token: self.tokens.get(customer::SERVICE).cloned(),
                    relay: RelayOptions {
                        backoff_max: BACKOFF_MAX,
                        ..RelayOptions::default()
                    },
                },
                shutdown,
            )),
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

    /// Stops every part, the consumer side first.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        for part in Part::ALL.into_iter().rev() {
            if let Err(e) = self.stop_part(part).await {
                first_error.get_or_insert(e);
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
