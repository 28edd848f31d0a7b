//! The `spoke cdc --config FILE` file (TOML).
//!
//! ```toml
//! manifest = "manifest.toml"                 # relative to this file
//! postgres = { env = "CATALOG_DATABASE_URL" } # or a plain connection string
//! publication = "spoke_catalog"
//! slot = "spoke_catalog"
//! # state_table = "public.spoke_cdc_state"
//! hub = "http://127.0.0.1:7070"               # or: jetstream = "nats://127.0.0.1:4222"
//! token_env = "SPOKE_TOKEN_CATALOG_SERVICE"   # the owner's hub token
//! # tls_ca = "tls/ca.crt"                     # trust this CA for an https:// hub
//! # metrics_listen = "127.0.0.1:9187"         # serve GET /metrics (Prometheus)
//! # batch = 5000 (changes per publish; default 5000 to a hub, 1000 to JetStream),
//! # snapshot_chunk = 5000, heartbeat_secs = 30,
//! # status_every_secs = 10, wal_alarm_bytes = 1073741824
//!
//! [datasets.products]
//! table = "public.products"
//! key = "id"
//! version = "version"                         # optional: else commit LSNs
//! ```
//!
//! Paths (`manifest`, `tls_ca`) are relative to the file's folder. Every
//! problem names the field it is in; secrets come from the
//! environment or a file, never from the file itself when given as
//! `{ env = … }` / `{ file = … }`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{CdcConfig, CdcError, CdcOptions, TableMapping};
use crate::config::SecretSource;

/// Where the changes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedTarget {
    Hub(String),
    JetStream(String),
}

/// A loaded `spoke cdc` config.
#[derive(Debug, Clone)]
pub struct CdcFile {
    pub manifest: PathBuf,
    pub cdc: CdcConfig,
    pub feed: FeedTarget,
    pub token_env: Option<String>,
    /// CA certificate (PEM) to trust for an `https://` hub.
    pub tls_ca: Option<PathBuf>,
    /// Where to serve `GET /metrics`; `None`: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Conn {
    Plain(String),
    Secret(SecretSource),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    table: String,
    key: String,
    version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    manifest: PathBuf,
    postgres: Conn,
    publication: String,
    slot: String,
    state_table: Option<String>,
    hub: Option<String>,
    jetstream: Option<String>,
    token_env: Option<String>,
    tls_ca: Option<PathBuf>,
    metrics_listen: Option<String>,
    batch: Option<usize>,
    snapshot_chunk: Option<usize>,
    heartbeat_secs: Option<u64>,
    status_every_secs: Option<u64>,
    wal_alarm_bytes: Option<u64>,
    #[serde(default)]
    datasets: BTreeMap<String, RawTable>,
}

impl CdcFile {
    pub fn load(path: &Path) -> Result<CdcFile, CdcError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CdcError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(
            &path.display().to_string(),
            &text,
            path.parent().unwrap_or(Path::new(".")),
        )
    }

    pub fn parse(file: &str, text: &str, base: &Path) -> Result<CdcFile, CdcError> {
        let raw: Raw =
            toml::from_str(text).map_err(|e| CdcError::Config(format!("{file}: {e}")))?;
        let postgres = match raw.postgres {
            Conn::Plain(s) => s,
            Conn::Secret(s) => s
                .read("postgres")
                .map_err(|e| CdcError::Config(format!("{file}: {e}")))?,
        };
        let feed = match (raw.hub, raw.jetstream) {
            (Some(h), None) => FeedTarget::Hub(h),
            (None, Some(j)) => FeedTarget::JetStream(j),
            _ => {
                return Err(CdcError::Config(format!(
                    "{file}: give exactly one of hub = URL or jetstream = URL"
                )))
            }
        };
        let tls_ca = raw.tls_ca.map(|p| base.join(p));
        if tls_ca.is_some() && !matches!(&feed, FeedTarget::Hub(h) if h.starts_with("https://")) {
            return Err(CdcError::Config(format!(
                "{file}: tls_ca is set, but hub is not an https:// URL: there is no hub certificate to check"
            )));
        }
        let metrics_listen = raw
            .metrics_listen
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| {
                    CdcError::Config(format!(
                        "{file}: metrics_listen: '{a}' is not an address such as 127.0.0.1:9187"
                    ))
                })
            })
            .transpose()?;
        let tables = raw
            .datasets
            .iter()
            .map(|(name, t)| TableMapping::new(name, &t.table, &t.key, t.version.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CdcError::Config(format!("{file}: {e}")))?;
        let mut cdc = CdcConfig::new(&postgres, &raw.publication, &raw.slot, tables);
        if let Some(s) = raw.state_table {
            cdc.state_table = s;
        }
        let d = CdcOptions::default();
        cdc.options = CdcOptions {
            batch: raw.batch.or(d.batch),
            snapshot_chunk: raw.snapshot_chunk.unwrap_or(d.snapshot_chunk),
            heartbeat: match raw.heartbeat_secs {
                Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
                None => d.heartbeat,
            },
            status_every: raw
                .status_every_secs
                .map_or(d.status_every, |s| Duration::from_secs(s.max(1))),
            wal_alarm_bytes: raw.wal_alarm_bytes.unwrap_or(d.wal_alarm_bytes),
            ..d
        };
        cdc.validate()
            .map_err(|e| CdcError::Config(format!("{file}: {e}")))?;
        Ok(CdcFile {
            manifest: base.join(raw.manifest),
            cdc,
            feed,
            token_env: raw.token_env,
            tls_ca,
            metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
manifest = "m.toml"
postgres = "host=127.0.0.1 user=postgres dbname=shop"
publication = "spoke_pub"
slot = "spoke_slot"
hub = "http://127.0.0.1:7070"
heartbeat_secs = 0
[datasets.products]
table = "catalog.products"
key = "id"
version = "v"
"#;

    #[test]
    fn parses_a_config_file() {
        let f = CdcFile::parse("c.toml", GOOD, Path::new("/etc/spoke")).unwrap();
        assert_eq!(f.manifest, Path::new("/etc/spoke/m.toml"));
        assert_eq!(f.feed, FeedTarget::Hub("http://127.0.0.1:7070".into()));
        assert_eq!(f.cdc.tables[0].schema, "catalog");
        assert_eq!(f.cdc.tables[0].version.as_deref(), Some("v"));
        assert_eq!(f.cdc.options.heartbeat, None);
        assert_eq!((f.tls_ca, f.metrics_listen), (None, None));
        let f = CdcFile::parse(
            "c.toml",
            &GOOD.replace(
                "hub = \"http://127.0.0.1:7070\"",
                "hub = \"https://hub.internal:7070\"\ntls_ca = \"tls/ca.pem\"\nmetrics_listen = \"127.0.0.1:9187\"",
            ),
            Path::new("/etc/spoke"),
        )
        .unwrap();
        assert_eq!(
            f.tls_ca.as_deref(),
            Some(Path::new("/etc/spoke/tls/ca.pem"))
        );
        assert_eq!(f.metrics_listen, Some("127.0.0.1:9187".parse().unwrap()));
    }

    #[test]
    fn names_what_is_wrong() {
        let e = CdcFile::parse("c.toml", &GOOD.replace("hub =", "bogus ="), Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml") && e.contains("bogus"), "{e}");
        let e = CdcFile::parse(
            "c.toml",
            &GOOD.replace("hub = \"http://127.0.0.1:7070\"", ""),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("exactly one of hub"), "{e}");
        let e = CdcFile::parse(
            "c.toml",
            &GOOD.replace("spoke_slot", "Bad Slot"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("slot name"), "{e}");
        let e = CdcFile::parse(
            "c.toml",
            &GOOD.replace(
                "heartbeat_secs",
                "metrics_listen = \"nowhere\"\nheartbeat_secs",
            ),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.toml: metrics_listen: 'nowhere'"), "{e}");
        let e = CdcFile::parse(
            "c.toml",
            &GOOD.replace("heartbeat_secs", "tls_ca = \"ca.pem\"\nheartbeat_secs"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tls_ca is set, but hub is not an https:// URL"),
            "{e}"
        );
    }
}
