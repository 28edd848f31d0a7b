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

/// The subscriptions of `consumer` that `keep` selects, only `dataset`'s
/// when one is named; an error naming the copies it does keep when none is
/// selected.
pub fn chosen_copies<'a>(
    manifest: &'a spoke_core::Manifest,
    consumer: &'a str,
    dataset: Option<&str>,
    keep: impl Fn(&spoke_core::manifest::Subscription) -> bool,
) -> anyhow::Result<Vec<&'a spoke_core::manifest::Subscription>> {
    let all: Vec<_> = manifest
        .subscriptions_of(consumer)
        .filter(|s| keep(s))
        .collect();
    let chosen: Vec<_> = all
        .iter()
        .copied()
        .filter(|s| dataset.is_none_or(|d| s.dataset == d))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|s| s.dataset.as_str()).collect();
        anyhow::bail!(
            "{consumer} keeps no copy of {}; its copies: {}",
            dataset.unwrap_or("any dataset"),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
    }
    Ok(chosen)
}
