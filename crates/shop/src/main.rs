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
//! Each service stops on Ctrl-C or SIGTERM after finishing its in-flight requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use spoke::outbox::relay::RelayOptions;
use spoke::shutdown::{shutdown_channel, ShutdownTrigger};
use spoke_shop::{catalog, customer, inventory, order, payment, web};

const USAGE: &str = "usage: shop SERVICE --listen ADDR --db FILE [options]

services:
  customer-service   --hub URL              (token from SPOKE_TOKEN_CUSTOMER_SERVICE; unset: open hub)
  catalog-service
  inventory-service
  payment-service
  order-service      --catalog URL --inventory URL --payment URL [--manifest FILE]
                     (run `spoke agent` for order-service with the same --db as its copy store)";

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
    let db = PathBuf::from(flags.take("db")?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (trigger, shutdown) = shutdown_channel();
        on_signal(trigger);
        let listener = web::bind(listen).with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr()?;
        let announce = |name: &str| {
            eprintln!(
                "{name} listening on http://{bound} (data in {})",
                db.display()
            )
        };
        match service.as_str() {
            customer::SERVICE => {
                let config = customer::Config {
                    db: db.clone(),
                    hub: flags.take("hub")?,
                    token: std::env::var(customer::TOKEN_ENV).ok(),
                    relay: RelayOptions::default(),
                };
                flags.done()?;
                announce(customer::SERVICE);
                customer::serve(listener, config, shutdown).await
            }
            catalog::SERVICE => {
                flags.done()?;
                announce(catalog::SERVICE);
                catalog::serve(listener, catalog::Config { db: db.clone() }, shutdown).await
            }
            inventory::SERVICE => {
                flags.done()?;
                announce(inventory::SERVICE);
                inventory::serve(listener, inventory::Config { db: db.clone() }, shutdown).await
            }
            payment::SERVICE => {
                flags.done()?;
                announce(payment::SERVICE);
                payment::serve(listener, payment::Config { db: db.clone() }, shutdown).await
            }
            order::SERVICE => {
                let manifest = match flags.take_optional("manifest") {
                    Some(path) => spoke_core::Manifest::load(std::path::Path::new(&path))
                        .map_err(|e| anyhow!("{e}"))?,
                    None => spoke_shop::manifest()?,
                };
                let config = order::Config {
                    db: db.clone(),
                    catalog: flags.take("catalog")?,
                    inventory: flags.take("inventory")?,
                    payment: flags.take("payment")?,
                    manifest: Arc::new(manifest),
                };
                flags.done()?;
                announce(order::SERVICE);
                order::serve(listener, config, shutdown).await
            }
            other => bail!("unknown service '{other}'\n\n{USAGE}"),
        }
    })
}
