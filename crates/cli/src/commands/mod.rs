//! One module per subcommand.

pub mod advise;
pub mod bench;
pub mod cdc;
pub mod check;
pub mod demo;
pub mod nats_config;
pub mod quarantine;
pub mod reconcile;
pub mod serve;
pub mod status;

/// A multi-threaded runtime for the long-running roles.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
