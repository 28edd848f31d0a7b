//! `spoke nats-config MANIFEST`: NATS users and permissions from the manifest.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::anyhow;
use spoke::feed::jetstream::permissions::{authorization_block, ADMIN_USER};
use spoke::feed::jetstream::JetStreamOptions;
use spoke_core::Manifest;

/// The environment variable holding `service`'s NATS password.
pub fn password_var(service: &str) -> String {
    format!(
        "SPOKE_NATS_PASSWORD_{}",
        service.to_uppercase().replace('-', "_")
    )
}

pub fn run(
    manifest: &Path,
    stream_prefix: String,
    subject_prefix: String,
) -> anyhow::Result<ExitCode> {
    let m = Manifest::load(manifest).map_err(|e| anyhow!("{e}"))?;
    let mut options = JetStreamOptions::new("nats://unused");
    options.stream_prefix = stream_prefix;
    options.subject_prefix = subject_prefix;
    let mut passwords = BTreeMap::new();
    let mut missing = Vec::new();
    for user in std::iter::once(ADMIN_USER).chain(m.services.keys().map(String::as_str)) {
        match std::env::var(password_var(user)) {
            Ok(p) if !p.is_empty() => {
                passwords.insert(user.to_owned(), p);
            }
            _ => missing.push(password_var(user)),
        }
    }
    if !missing.is_empty() {
        eprintln!(
            "note: no password for {} (those users are left out)",
            missing.join(", ")
        );
    }
    print!("{}", authorization_block(&m, &options, &passwords));
    Ok(ExitCode::SUCCESS)
}
