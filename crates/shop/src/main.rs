//! `shop`: runs one of the shop's services as its own process.
//!
//! ```sh
//! export SPOKE_TOKEN_CUSTOMER_SERVICE=… SPOKE_TOKEN_ORDER_SERVICE=…
//! spoke hub --config examples/shop/spoke.toml                    # 127.0.0.1:7070
//! shop catalog-service   --listen 127.0.0.1:7102 --db data/catalog/catalog.db
//! shop inventory-service --listen 127.0.0.1:7103 --db data/inventory/inventory.db
//! shop payment-service   --listen 127.0.0.1:7104 --db data/payment/payment.db
//! shop order-service     --listen 127.0.0.1:7105 --db data/order-service/order.db \
//!      --catalog http://127.0.0.1:7102 --inventory http://127.0.0.1:7103 --payment http://127.0.0.1:7104
//! spoke agent --config examples/shop/spoke.toml                  # writes the copy into order.db
//! shop customer-service  --listen 127.0.0.1:7101 --db data/customer-service/customer.db --hub http://127.0.0.1:7070
//! ```
//!
//! Distributed (no hub): the agent reads JetStream into PostgreSQL (a config
//! with `jetstream = { url = … }` and `store = { postgres = …, schema = "spoke",
//! readers = ["order_app"] }`), Customer Service's relay publishes straight
//! into JetStream, and Order Service keeps its orders in PostgreSQL as its
//! own role, JOINing them with the copy:
//!
//! ```sh
//! shop order-service    --listen 127.0.0.1:7105 --postgres "host=127.0.0.1 user=order_app dbname=shop" --schema spoke \
//!      --catalog http://127.0.0.1:7102 --inventory http://127.0.0.1:7103 --payment http://127.0.0.1:7104
//! shop customer-service --listen 127.0.0.1:7101 --db data/customer-service/customer.db --jetstream nats://127.0.0.1:4222
//! ```
//!
//! Each service stops on Ctrl-C or SIGTERM after finishing its in-flight requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use spoke::feed::jetstream::JetStreamOptions;
use spoke::outbox::relay::RelayOptions;
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke_shop::{catalog, customer, inventory, order, payment, web};

const USAGE: &str = "usage: shop SERVICE --listen ADDR [options]

services:
  customer-service   --db FILE (--hub URL | --jetstream URL) [--manifest FILE]
                     --hub: its relay publishes to the hub (token from SPOKE_TOKEN_CUSTOMER_SERVICE;
                       unset: open hub); --jetstream: straight into JetStream (streams SPOKE_*)
  catalog-service    (--db FILE | --postgres URL [--schema S])
                     --postgres: products in schema S (default catalog, created if missing); give
                       the database wal_level=logical and run `spoke cdc` to publish them
  inventory-service  --db FILE
  payment-service    --db FILE
  order-service      (--db FILE | --postgres URL [--schema S] [--orders-schema O])
                     --catalog URL --inventory URL --payment URL [--manifest FILE]
                     --db: its tables in FILE; run `spoke agent` for order-service with FILE as its
                       copy store (store = { sqlite = FILE })
                     --postgres: its tables in schema O (default orders, created if missing), the
                       copy read from schema S (default spoke) of the same database, kept by
                       `spoke agent` with store = { postgres = ..., schema = S, readers = [its role] }";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shop: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` pairs.
struct Flags(BTreeMap<String, String>);

impl Flags {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut flags = BTreeMap::new();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let name = arg
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("unexpected argument '{arg}'\n\n{USAGE}"))?;
            let value = match name.split_once('=') {
                Some((n, v)) => {
                    flags.insert(n.to_owned(), v.to_owned());
                    continue;
                }
                None => args
                    .next()
                    .ok_or_else(|| anyhow!("--{name} needs a value\n\n{USAGE}"))?,
            };
            flags.insert(name.to_owned(), value);
        }
        Ok(Flags(flags))
    }

    fn take(&mut self, name: &str) -> anyhow::Result<String> {
        self.0
            .remove(name)
            .ok_or_else(|| anyhow!("--{name} is required\n\n{USAGE}"))
    }

    fn take_optional(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }

    fn done(self) -> anyhow::Result<()> {
        match self.0.keys().next() {
            Some(unknown) => bail!("unknown option --{unknown}\n\n{USAGE}"),
            None => Ok(()),
        }
    }
}

/// The manifest from `--manifest FILE`, or the shop's own.
fn manifest(flags: &mut Flags) -> anyhow::Result<spoke_core::Manifest> {
    match flags.take_optional("manifest") {
        Some(path) => {
            spoke_core::Manifest::load(std::path::Path::new(&path)).map_err(|e| anyhow!("{e}"))
        }
        None => spoke_shop::manifest(),
    }
}

fn on_signal(trigger: ShutdownTrigger) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        trigger.fire();
    });
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let service = match args.next() {
        Some(s) if s != "--help" && s != "-h" => s,
        _ => {
            println!("{USAGE}");
            return Ok(());
        }
    };
    let mut flags = Flags::parse(args)?;
    let listen: SocketAddr = flags
        .take("listen")?
        .parse()
        .context("--listen must be an address such as 127.0.0.1:7101")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (trigger, shutdown) = shutdown_channel();
        on_signal(trigger);
        let listener = web::bind(listen).with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr()?;
        let announce = |name: &str, data: &str| {
            eprintln!("{name} listening on http://{bound} (data in {data})")
        };
        match service.as_str() {
            customer::SERVICE => {
                let db = PathBuf::from(flags.take("db")?);
                let publish = match (flags.take_optional("hub"), flags.take_optional("jetstream")) {
                    (Some(url), None) => customer::Publish::Hub {
                        url,
                        token: std::env::var(customer::TOKEN_ENV).ok(),
                    },
                    (None, Some(url)) => customer::Publish::JetStream {
                        options: JetStreamOptions::new(&url),
                        manifest: Arc::new(manifest(&mut flags)?),
                    },
                    _ => bail!("give exactly one of --hub URL or --jetstream URL\n\n{USAGE}"),
                };
                let config = customer::Config {
                    db: db.clone(),
                    publish,
                    relay: RelayOptions::default(),
                };
                flags.done()?;
                announce(customer::SERVICE, &db.display().to_string());
                customer::serve(listener, config, shutdown).await
            }
            catalog::SERVICE => {
                let (config, place) = match (flags.take_optional("db"), flags.take_optional("postgres")) {
                    (Some(db), None) => {
                        if flags.take_optional("schema").is_some() {
                            bail!("--schema goes with --postgres, not --db\n\n{USAGE}");
                        }
                        (catalog::Config::sqlite(PathBuf::from(&db)), db)
                    }
                    (None, Some(url)) => {
                        let schema = flags.take_optional("schema").unwrap_or_else(|| "catalog".to_owned());
                        let place = format!("PostgreSQL schema {schema}");
                        (
                            catalog::Config {
                                storage: catalog::Storage::Postgres { url, schema },
                            },
                            place,
                        )
                    }
                    _ => bail!("give exactly one of --db FILE or --postgres URL\n\n{USAGE}"),
                };
                flags.done()?;
                announce(catalog::SERVICE, &place);
                catalog::serve(listener, config, shutdown).await
            }
            inventory::SERVICE => {
                let db = PathBuf::from(flags.take("db")?);
                flags.done()?;
                announce(inventory::SERVICE, &db.display().to_string());
                inventory::serve(listener, inventory::Config { db }, shutdown).await
            }
            payment::SERVICE => {
                let db = PathBuf::from(flags.take("db")?);
                flags.done()?;
                announce(payment::SERVICE, &db.display().to_string());
                payment::serve(listener, payment::Config { db }, shutdown).await
            }
            order::SERVICE => {
                let storage = match (flags.take_optional("db"), flags.take_optional("postgres")) {
                    (Some(db), None) => {
                        if flags.0.contains_key("schema") || flags.0.contains_key("orders-schema") {
                            bail!("--schema and --orders-schema go with --postgres, not --db\n\n{USAGE}");
                        }
                        order::Storage::Sqlite(PathBuf::from(db))
                    }
                    (None, Some(url)) => order::Storage::Postgres(order::PostgresStorage {
                        url,
                        orders_schema: flags
                            .take_optional("orders-schema")
                            .unwrap_or_else(|| order::DEFAULT_ORDERS_SCHEMA.to_owned()),
                        copies_schema: flags
                            .take_optional("schema")
                            .unwrap_or_else(|| spoke::copy::postgres::DEFAULT_SCHEMA.to_owned()),
                    }),
                    _ => bail!("give exactly one of --db FILE or --postgres URL\n\n{USAGE}"),
                };
                let config = order::Config {
                    storage,
                    catalog: flags.take("catalog")?,
                    inventory: flags.take("inventory")?,
                    payment: flags.take("payment")?,
                    manifest: Arc::new(manifest(&mut flags)?),
                };
                flags.done()?;
                let svc = order::OrderService::open(config).await?;
                announce(order::SERVICE, &svc.describe());
                svc.serve(listener, shutdown).await
            }
            other => bail!("unknown service '{other}'\n\n{USAGE}"),
        }
    })
}
