//! NATS users and subject permissions that enforce the manifest in JetStream.
//!
//! The manifest says who owns and who reads each dataset; this module turns
//! that into a nats-server `authorization` block, so NATS itself refuses a
//! publish from anyone but the owner (rule 4) and a read by anyone who does
//! not subscribe:
//!
//! ```text
//!  owner of d      publish  spoke.d.log.*                       (its changes)
//!                           $JS.API.STREAM.INFO/MSG.GET of d's streams (version checks)
//!  subscriber of d publish  $JS.API.STREAM.INFO, CONSUMER.CREATE/MSG.NEXT/DELETE/INFO,
//!                           STREAM.MSG.GET of d's streams        (read the log and state)
//!  every service   subscribe _INBOX.>                           (replies)
//!  spoke-admin     everything                                   (creates the streams)
//! ```
//!
//! Passwords are not invented here: the caller supplies them (from the
//! environment or files), and the generated text holds them in the clear, as
//! nats-server configuration does; keep the file readable by the server only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use spoke_core::Manifest;

use super::JetStreamOptions;

/// The user that may create and change streams.
pub const ADMIN_USER: &str = "spoke-admin";

/// Subjects one service may publish to.
pub fn publish_allow(
    manifest: &Manifest,
    options: &JetStreamOptions,
    service: &str,
) -> Vec<String> {
    let mut allow = BTreeSet::new();
    for ds in manifest.datasets.values().filter(|d| d.owner == service) {
        let log = options.log_stream(&ds.name);
        allow.insert(options.log_subjects(&ds.name));
        allow.insert(format!("$JS.API.STREAM.INFO.{log}"));
        allow.insert(format!(
            "$JS.API.STREAM.INFO.{}",
            options.state_stream(&ds.name)
        ));
        allow.insert(format!("$JS.API.STREAM.MSG.GET.{log}"));
    }
    for sub in manifest
        .subscriptions_of(service)
        .filter(|s| s.strategy.follows_feed())
    {
        for stream in [
            options.log_stream(&sub.dataset),
            options.state_stream(&sub.dataset),
        ] {
            for api in [
                "STREAM.INFO",
                "STREAM.MSG.GET",
                "CONSUMER.CREATE",
                "CONSUMER.DELETE",
                "CONSUMER.INFO",
            ] {
                allow.insert(format!("$JS.API.{api}.{stream}"));
            }
            for api in [
                "CONSUMER.CREATE",
                "CONSUMER.DELETE",
                "CONSUMER.INFO",
                "CONSUMER.MSG.NEXT",
            ] {
                allow.insert(format!("$JS.API.{api}.{stream}.>"));
            }
        }
    }
    allow.into_iter().collect()
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The nats-server `authorization` block for `manifest`. `passwords` holds
/// one entry per service plus [`ADMIN_USER`]; services without a password
/// are left out (they cannot connect).
pub fn authorization_block(
    manifest: &Manifest,
    options: &JetStreamOptions,
    passwords: &BTreeMap<String, String>,
) -> String {
    let mut out = String::from("authorization {\n  users = [\n");
    if let Some(p) = passwords.get(ADMIN_USER) {
        let _ = writeln!(
            out,
            "    {{ user: {}, password: {} }}",
            quote(ADMIN_USER),
            quote(p)
        );
    }
    for service in manifest.services.keys() {
        let Some(p) = passwords.get(service) else {
            continue;
        };
        let publish: Vec<String> = publish_allow(manifest, options, service)
            .iter()
            .map(|s| quote(s))
            .collect();
        let _ = writeln!(
            out,
            "    {{ user: {}, password: {}, permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }} }}",
            quote(service),
            quote(p),
            publish.join(", ")
        );
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest::parse(
            "m.toml",
            include_str!("../../../../../examples/shop/manifest.toml"),
        )
        .unwrap()
    }

    #[test]
    fn only_the_owner_may_publish_a_datasets_log() {
        let o = JetStreamOptions::new("nats://x");
        let m = manifest();
        assert!(
            publish_allow(&m, &o, "customer-service").contains(&"spoke.customers.log.*".to_owned())
        );
        let order = publish_allow(&m, &o, "order-service");
        assert!(
            !order.iter().any(|s| s.starts_with("spoke.")),
            "a consumer publishes no changes: {order:?}"
        );
        assert!(order.contains(&"$JS.API.CONSUMER.MSG.NEXT.SPOKE_CUSTOMERS_LOG.>".to_owned()));
        assert!(
            !order.iter().any(|s| s.contains("PRODUCTS")),
            "strategy none reads nothing from the feed"
        );
        // Inventory owns `stock` (called synchronously, never copied): it may
        // publish its own log and nothing of anyone else's.
        let inventory = publish_allow(&m, &o, "inventory-service");
        assert!(
            inventory.contains(&"spoke.stock.log.*".to_owned()),
            "{inventory:?}"
        );
        assert!(
            inventory
                .iter()
                .all(|s| s.contains("STOCK") || s.starts_with("spoke.stock.")),
            "{inventory:?}"
        );
    }

    #[test]
    fn the_block_lists_users_with_passwords_only() {
        let o = JetStreamOptions::new("nats://x");
        let mut p = BTreeMap::new();
        p.insert("customer-service".to_owned(), "s\"ecret".to_owned());
        p.insert(ADMIN_USER.to_owned(), "root".to_owned());
        let block = authorization_block(&manifest(), &o, &p);
        assert!(
            block.contains("{ user: \"customer-service\", password: \"s\\\"ecret\""),
            "{block}"
        );
        assert!(block.contains("{ user: \"spoke-admin\", password: \"root\" }"));
        assert!(!block.contains("order-service"));
    }
}
