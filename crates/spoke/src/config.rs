//! Deployment configuration for the `hub` and `agent` roles (TOML).
//!
//! ```toml
//! manifest = "manifest.toml"          # relative to this file
//!
//! [hub]
//! listen = "127.0.0.1:7070"
//! data_dir = "data/hub"
//! tls_cert = "tls/hub.crt"             # optional: serve HTTPS (PEM chain and key)
//! tls_key = "tls/hub.key"
//! [hub.tokens]                         # service → where its token comes from
//! customer-service = { env = "SPOKE_TOKEN_CUSTOMER_SERVICE" }
//! order-service = { file = "secrets/order-service.token" }
//!
//! [agent]
//! consumer = "order-service"
//! listen = "127.0.0.1:7071"
//! data_dir = "data/order-service"
//! hub = "https://hub.internal:7070"
//! tls_ca = "tls/ca.crt"                # optional: trust this CA for the hub's certificate
//! store = { sqlite = "data/order-service/copies.db" }   # default: <data_dir>/copies.db
//! token = { file = "secrets/order-service.token" }      # this consumer's hub token
//! tls_cert = "tls/agent.crt"           # optional: serve the agent API over HTTPS
//! tls_key = "tls/agent.key"
//! [agent.api_tokens]                   # client → token for the agent's read API
//! order-app = { env = "SPOKE_AGENT_TOKEN_ORDER_APP" }
//! prometheus = { file = "secrets/prometheus.token" }
//!
//! [agent.owner_postgres.products]      # per `scheduled` dataset read with snapshot_sql
//! postgres = "host=catalog-db user=spoke_reader dbname=catalog"
//! password = { env = "CATALOG_DB_PASSWORD" }
//! ```
//!
//! Moving to the distributed deployment changes only this file: the feed
//! becomes JetStream (for the hub, which then serves its HTTP API in front of
//! JetStream, and for the agent) and the store becomes the consumer's
//! PostgreSQL:
//!
//! ```toml
//! [hub]
//! jetstream = { url = "nats://127.0.0.1:4222", replicas = 3 }
//! [agent]
//! jetstream = { url = "nats://127.0.0.1:4222", user = "order-service", password = { env = "NATS_PASSWORD" } }
//! store = { postgres = "host=127.0.0.1 user=order_agent dbname=orders", schema = "spoke", readers = ["order_app"] }
//! ```
//!
//! Raw TOML and the resolved config are separate stages: [`DeploymentConfig::load`]
//! validates everything once, with the field path in each error, and resolves
//! relative paths against the config file's folder. Secrets are read from the
//! environment or a file, never from the config itself, and never printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tls::TlsFiles;

/// Where a secret comes from.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Env(v) => write!(f, "env:{v}"),
            SecretSource::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl SecretSource {
    /// Reads the secret; `what` names it in errors.
    pub fn read(&self, what: &str) -> Result<String, ConfigError> {
        let value = match self {
            SecretSource::Env(var) => std::env::var(var).map_err(|_| {
                ConfigError::new(what, format!("environment variable {var} is not set"))
            })?,
            SecretSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(what, format!("cannot read {}: {e}", path.display()))
            })?,
        };
        let value = value.trim().to_owned();
        if value.is_empty() {
            return Err(ConfigError::new(
                what,
                format!("the token from {self:?} is empty"),
            ));
        }
        Ok(value)
    }
}

/// A config problem, with the field path it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    manifest: Option<PathBuf>,
    hub: Option<RawHub>,
    agent: Option<RawAgent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    tokens: BTreeMap<String, SecretSource>,
    jetstream: Option<RawJetStream>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJetStream {
    url: String,
    replicas: Option<usize>,
    #[serde(default)]
    memory: bool,
    stream_prefix: Option<String>,
    subject_prefix: Option<String>,
    user: Option<String>,
    password: Option<SecretSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    consumer: Option<String>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    hub: Option<String>,
    jetstream: Option<RawJetStream>,
    store: Option<RawStore>,
    token: Option<SecretSource>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    api_tokens: BTreeMap<String, SecretSource>,
    #[serde(default)]
    owner_postgres: BTreeMap<String, RawOwnerPostgres>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwnerPostgres {
    postgres: String,
    password: Option<SecretSource>,
}

/// An owner's PostgreSQL, where a `scheduled` subscription with
/// `snapshot_sql` reads its snapshot. The password is read when connecting.
#[derive(Clone, PartialEq, Eq)]
pub struct OwnerPostgres {
    pub url: String,
    pub password: Option<SecretSource>,
}

impl std::fmt::Debug for OwnerPostgres {
    // The connection string may carry a password of its own: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerPostgres")
            .field("password", &self.password)
            .finish_non_exhaustive()
    }
}

impl OwnerPostgres {
    /// The connection string with the password from its source; `path`
    /// names the config entry in errors.
    pub fn conninfo(&self, path: &str) -> Result<String, ConfigError> {
        with_password(
            &self.url,
            self.password.as_ref(),
            &format!("{path}.password"),
        )
    }
}

/// A libpq connection string with the password from `password` (read now;
/// `what` names its config entry in errors) appended as a quoted value.
fn with_password(
    url: &str,
    password: Option<&SecretSource>,
    what: &str,
) -> Result<String, ConfigError> {
    Ok(match password {
        None => url.to_owned(),
        Some(p) => {
            let p = p.read(what)?;
            format!(
                "{url} password='{}'",
                p.replace('\\', "\\\\").replace('\'', "\\'")
            )
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    sqlite: Option<PathBuf>,
    postgres: Option<String>,
    password: Option<SecretSource>,
    schema: Option<String>,
    #[serde(default)]
    readers: Vec<String>,
}

/// A JetStream feed, resolved (the password is read when connecting).
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    pub url: String,
    pub replicas: usize,
    pub memory: bool,
    pub stream_prefix: Option<String>,
    pub subject_prefix: Option<String>,
    pub user: Option<String>,
    pub password: Option<SecretSource>,
}

impl JetStreamConfig {
    /// The connection options, with the password read from its source.
    pub fn options(
        &self,
        path: &str,
    ) -> Result<crate::feed::jetstream::JetStreamOptions, ConfigError> {
        let mut o = crate::feed::jetstream::JetStreamOptions::new(&self.url);
        o.replicas = self.replicas;
        o.memory_storage = self.memory;
        if let Some(p) = &self.stream_prefix {
            o.stream_prefix = p.clone();
        }
        if let Some(p) = &self.subject_prefix {
            o.subject_prefix = p.clone();
        }
        o.user = self.user.clone();
        o.password = self
            .password
            .as_ref()
            .map(|p| p.read(&format!("{path}.password")))
            .transpose()?;
        Ok(o)
    }
}

fn jetstream(path: &str, raw: RawJetStream) -> Result<JetStreamConfig, ConfigError> {
    if !raw.url.starts_with("nats://") && !raw.url.starts_with("tls://") {
        return Err(ConfigError::new(
            format!("{path}.url"),
            format!("'{}' must start with nats:// or tls://", raw.url),
        ));
    }
    let replicas = raw.replicas.unwrap_or(1);
    if !(1..=5).contains(&replicas) {
        return Err(ConfigError::new(
            format!("{path}.replicas"),
            format!("must be between 1 and 5, got {replicas}"),
        ));
    }
    if raw.password.is_some() && raw.user.is_none() {
        return Err(ConfigError::new(
            format!("{path}.password"),
            "given without a user",
        ));
    }
    Ok(JetStreamConfig {
        url: raw.url,
        replicas,
        memory: raw.memory,
        stream_prefix: raw.stream_prefix,
        subject_prefix: raw.subject_prefix,
        user: raw.user,
        password: raw.password,
    })
}

/// Where a hub keeps its feeds.
#[derive(Debug, Clone)]
pub enum HubFeedConfig {
    /// The embedded SQLite log in the hub's data directory.
    Embedded,
    /// JetStream; the hub serves its HTTP API in front of it.
    JetStream(JetStreamConfig),
}

/// Where an agent reads its feeds.
#[derive(Debug, Clone)]
pub enum FeedConfig {
    Hub {
        url: String,
        token: Option<SecretSource>,
        /// A CA certificate (PEM) to trust for an `https://` hub.
        tls_ca: Option<PathBuf>,
    },
    JetStream(JetStreamConfig),
}

/// The hub role, resolved.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub manifest: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tokens: BTreeMap<String, SecretSource>,
    pub feed: HubFeedConfig,
    /// Serve HTTPS with this certificate and key.
    pub tls: Option<TlsFiles>,
}

/// Where a consumer's copies live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Sqlite(PathBuf),
    Postgres {
        url: String,
        password: Option<SecretSource>,
        schema: String,
        readers: Vec<String>,
    },
}

impl StoreConfig {
    /// The PostgreSQL connection options, with the password read from its source.
    pub fn postgres_options(
        &self,
    ) -> Result<Option<crate::copy::postgres::PostgresOptions>, ConfigError> {
        let StoreConfig::Postgres {
            url,
            password,
            schema,
            readers,
        } = self
        else {
            return Ok(None);
        };
        Ok(Some(crate::copy::postgres::PostgresOptions {
            url: with_password(url, password.as_ref(), "agent.store.password")?,
            schema: schema.clone(),
            readers: readers.clone(),
        }))
    }
}

/// The agent role, resolved.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub manifest: PathBuf,
    pub consumer: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub feed: FeedConfig,
    pub store: StoreConfig,
    /// Dataset → the owner's PostgreSQL of a `snapshot_sql` subscription.
    pub owner_postgres: BTreeMap<String, OwnerPostgres>,
    /// Client → token source for the agent's read API; empty = open.
    pub api_tokens: BTreeMap<String, SecretSource>,
    /// Serve the agent API over HTTPS with this certificate and key.
    pub tls: Option<TlsFiles>,
}

/// A whole deployment config file.
#[derive(Debug, Clone)]
pub struct DeploymentConfig {
    pub file: PathBuf,
    pub hub: Option<HubConfig>,
    pub agent: Option<AgentConfig>,
}

/// `tls_cert` and `tls_key` of a section: both or neither.
fn tls_files(
    section: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    at: &impl Fn(PathBuf) -> PathBuf,
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: at(cert),
            key: at(key),
        })),
        (Some(_), None) => Err(ConfigError::new(
            format!("{section}.tls_key"),
            "missing: tls_cert is set, so name the PEM file of its private key too",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            format!("{section}.tls_cert"),
            "missing: tls_key is set, so name the PEM file of its certificate chain too",
        )),
    }
}

/// Checks the names of a token table (`hub.tokens`, `agent.api_tokens`).
fn token_names(path: &str, tokens: &BTreeMap<String, SecretSource>) -> Result<(), ConfigError> {
    for name in tokens.keys() {
        if !spoke_core::manifest::is_service_name(name) {
            return Err(ConfigError::new(
                format!("{path}.{name}"),
                "not a valid name: a lowercase letter, then lowercase letters, digits, '-' or '_'",
            ));
        }
    }
    Ok(())
}

fn listen(path: &str, v: Option<String>) -> Result<SocketAddr, ConfigError> {
    let v = v.ok_or_else(|| ConfigError::new(path, "missing (e.g. \"127.0.0.1:7070\")"))?;
    v.parse().map_err(|_| {
        ConfigError::new(
            path,
            format!("'{v}' is not an address such as 127.0.0.1:7070"),
        )
    })
}

/// Checks a hub URL: http(s), a host, no trailing junk.
pub fn check_url(path: &str, url: &str) -> Result<String, ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            ConfigError::new(path, format!("'{url}' must start with http:// or https://"))
        })?;
    if rest.trim_end_matches('/').is_empty() || rest.contains(char::is_whitespace) {
        return Err(ConfigError::new(path, format!("'{url}' has no host")));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl DeploymentConfig {
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(&shown, format!("cannot read: {e}")))?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&shown, &text, &base)
    }

    /// Parses config text; relative paths resolve against `base`.
    pub fn parse(file: &str, text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start].matches('\n').count() + 1)
                .unwrap_or(0);
            ConfigError::new(
                format!("{file}:{line}"),
                e.message().trim().replace('\n', " "),
            )
        })?;
        let at = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let manifest = raw
            .manifest
            .map(at)
            .ok_or_else(|| ConfigError::new("manifest", "missing: the path of the manifest"))?;
        let hub = raw
            .hub
            .map(|h| -> Result<HubConfig, ConfigError> {
                token_names("hub.tokens", &h.tokens)?;
                Ok(HubConfig {
                    tls: tls_files("hub", h.tls_cert, h.tls_key, &at)?,
                    manifest: manifest.clone(),
                    listen: listen("hub.listen", h.listen)?,
                    data_dir: at(h.data_dir.ok_or_else(|| {
                        ConfigError::new("hub.data_dir", "missing: where the hub keeps its log")
                    })?),
                    tokens: h
                        .tokens
                        .into_iter()
                        .map(|(k, v)| (k, resolve_secret(v, &at)))
                        .collect(),
                    feed: match h.jetstream {
                        None => HubFeedConfig::Embedded,
                        Some(j) => HubFeedConfig::JetStream(jetstream("hub.jetstream", j)?),
                    },
                })
            })
            .transpose()?;
        let agent = raw
            .agent
            .map(|a| -> Result<AgentConfig, ConfigError> {
                let data_dir = at(a.data_dir.ok_or_else(|| ConfigError::new("agent.data_dir", "missing: where the agent keeps its state"))?);
                let store = match a.store {
                    None => StoreConfig::Sqlite(data_dir.join("copies.db")),
                    Some(RawStore { sqlite: Some(p), postgres: None, password: None, schema: None, readers }) if readers.is_empty() => StoreConfig::Sqlite(at(p)),
                    Some(RawStore { sqlite: None, postgres: Some(url), password, schema, readers }) => {
                        let schema = schema.unwrap_or_else(|| crate::copy::postgres::DEFAULT_SCHEMA.to_owned());
                        if !spoke_core::manifest::is_identifier(&schema) {
                            return Err(ConfigError::new("agent.store.schema", format!("'{schema}' must be a lowercase identifier")));
                        }
                        if let Some(r) = readers.iter().find(|r| !spoke_core::manifest::is_identifier(r)) {
                            return Err(ConfigError::new("agent.store.readers", format!("role '{r}' must be a lowercase identifier")));
                        }
                        StoreConfig::Postgres { url, password: password.map(|p| resolve_secret(p, &at)), schema, readers }
                    }
                    Some(_) => return Err(ConfigError::new("agent.store", "give either sqlite = \"PATH\" or postgres = \"CONNECTION\" (with optional password, schema, readers)")),
                };
                let token = a.token.map(|t| resolve_secret(t, &at));
                token_names("agent.api_tokens", &a.api_tokens)?;
                let tls_ca = a.tls_ca.map(&at);
                if tls_ca.is_some() && !a.hub.as_deref().is_some_and(|h| h.starts_with("https://")) {
                    return Err(ConfigError::new("agent.tls_ca", "set, but agent.hub is not an https:// URL: there is no hub certificate to check"));
                }
                let mut owner_postgres = BTreeMap::new();
                for (dataset, o) in a.owner_postgres {
                    if !spoke_core::manifest::is_identifier(&dataset) {
                        return Err(ConfigError::new(format!("agent.owner_postgres.{dataset}"), "not a dataset name"));
                    }
                    if o.postgres.trim().is_empty() {
                        return Err(ConfigError::new(format!("agent.owner_postgres.{dataset}.postgres"), "empty: the owner's connection, e.g. \"host=customer-db user=spoke_reader dbname=customers\""));
                    }
                    owner_postgres.insert(dataset, OwnerPostgres { url: o.postgres, password: o.password.map(|p| resolve_secret(p, &at)) });
                }
                let feed = match (a.hub, a.jetstream) {
                    (Some(hub), None) => FeedConfig::Hub { url: check_url("agent.hub", &hub)?, token, tls_ca },
                    (None, Some(j)) => FeedConfig::JetStream(jetstream("agent.jetstream", j)?),
                    (Some(_), Some(_)) => return Err(ConfigError::new("agent", "give either hub or jetstream, not both")),
                    (None, None) => return Err(ConfigError::new("agent.hub", "missing: the hub's URL (or a jetstream = { url = … } table)")),
                };
                Ok(AgentConfig {
                    manifest: manifest.clone(),
                    consumer: a.consumer.ok_or_else(|| ConfigError::new("agent.consumer", "missing: the service whose copies this agent keeps"))?,
                    listen: listen("agent.listen", a.listen)?,
                    data_dir,
                    feed,
                    store,
                    owner_postgres,
                    api_tokens: a.api_tokens.into_iter().map(|(k, v)| (k, resolve_secret(v, &at))).collect(),
                    tls: tls_files("agent", a.tls_cert, a.tls_key, &at)?,
                })
            })
            .transpose()?;
        Ok(DeploymentConfig {
            file: PathBuf::from(file),
            hub,
            agent,
        })
    }

    pub fn hub(&self) -> Result<&HubConfig, ConfigError> {
        self.hub.as_ref().ok_or_else(|| {
            ConfigError::new(
                "hub",
                format!("{} has no [hub] section", self.file.display()),
            )
        })
    }

    pub fn agent(&self) -> Result<&AgentConfig, ConfigError> {
        self.agent.as_ref().ok_or_else(|| {
            ConfigError::new(
                "agent",
                format!("{} has no [agent] section", self.file.display()),
            )
        })
    }
}

fn resolve_secret(s: SecretSource, at: &impl Fn(PathBuf) -> PathBuf) -> SecretSource {
    match s {
        SecretSource::File(p) => SecretSource::File(at(p)),
        env => env,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
manifest = "manifest.toml"
[hub]
listen = "127.0.0.1:7070"
data_dir = "data/hub"
[hub.tokens]
customer-service = { env = "SPOKE_TEST_TOKEN" }
[agent]
consumer = "order-service"
listen = "127.0.0.1:7071"
data_dir = "data/order"
hub = "http://127.0.0.1:7070/"
token = { file = "secrets/order.token" }
"#;

    /// The deployment and CDC configs shipped in examples/ load, and each
    /// names a manifest that is valid and declares the consumer it serves.
    #[test]
    fn the_example_configs_load_with_valid_manifests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for dir in ["shop", "distributed"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if !name.ends_with(".toml") || name == "manifest.toml" {
                    continue;
                }
                seen += 1;
                let manifest = if name == "cdc.toml" {
                    crate::cdc::file::CdcFile::load(&path)
                        .unwrap_or_else(|e| panic!("{name}: {e}"))
                        .manifest
                } else {
                    let c = DeploymentConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                    let m = c
                        .agent()
                        .map(|a| a.manifest.clone())
                        .or_else(|_| c.hub().map(|h| h.manifest.clone()));
                    let m = m.unwrap_or_else(|e| panic!("{name}: {e}"));
                    if let Ok(a) = c.agent() {
                        let manifest = spoke_core::Manifest::load(&m).unwrap();
                        assert!(
                            manifest.services.contains_key(&a.consumer),
                            "{name}: {}",
                            a.consumer
                        );
                    }
                    m
                };
                spoke_core::Manifest::load(&manifest).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        assert!(seen >= 4, "found {seen} example configs");
    }

    #[test]
    fn resolves_paths_against_the_config_folder() {
        let c = DeploymentConfig::parse("spoke.toml", FULL, Path::new("/etc/spoke")).unwrap();
        let hub = c.hub().unwrap();
        assert_eq!(hub.manifest, Path::new("/etc/spoke/manifest.toml"));
        assert_eq!(hub.data_dir, Path::new("/etc/spoke/data/hub"));
        let agent = c.agent().unwrap();
        match &agent.feed {
            FeedConfig::Hub { url, token, .. } => {
                assert_eq!(url, "http://127.0.0.1:7070");
                assert_eq!(
                    token,
                    &Some(SecretSource::File("/etc/spoke/secrets/order.token".into()))
                );
            }
            other => panic!("expected a hub feed, got {other:?}"),
        }
        assert_eq!(
            agent.store,
            StoreConfig::Sqlite("/etc/spoke/data/order/copies.db".into())
        );
    }

    #[test]
    fn switches_to_jetstream_and_postgres_by_config_alone() {
        let text = r#"
manifest = "m.toml"
[hub]
listen = "127.0.0.1:7070"
data_dir = "d"
jetstream = { url = "nats://127.0.0.1:4222", replicas = 3 }
[agent]
consumer = "order-service"
listen = "127.0.0.1:7071"
data_dir = "d2"
jetstream = { url = "nats://127.0.0.1:4222", user = "order-service", password = { env = "X" } }
store = { postgres = "host=127.0.0.1 dbname=orders", schema = "copies", readers = ["order_app"] }
"#;
        let c = DeploymentConfig::parse("spoke.toml", text, Path::new("/")).unwrap();
        assert!(matches!(&c.hub().unwrap().feed, HubFeedConfig::JetStream(j) if j.replicas == 3));
        let a = c.agent().unwrap();
        assert!(
            matches!(&a.feed, FeedConfig::JetStream(j) if j.user.as_deref() == Some("order-service"))
        );
        assert!(
            matches!(&a.store, StoreConfig::Postgres { schema, readers, .. } if schema == "copies" && readers == &["order_app"])
        );
        let e = |t: &str| {
            DeploymentConfig::parse("spoke.toml", t, Path::new("/"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            e(&text.replace("replicas = 3", "replicas = 9")),
            "hub.jetstream.replicas: must be between 1 and 5, got 9"
        );
        assert_eq!(
            e(&text.replace("nats://127.0.0.1:4222\", user", "http://x\", user")),
            "agent.jetstream.url: 'http://x' must start with nats:// or tls://"
        );
        assert_eq!(
            e(&text.replace("schema = \"copies\"", "schema = \"Bad Name\"")),
            "agent.store.schema: 'Bad Name' must be a lowercase identifier"
        );
        assert!(e(&text.replace(
            "store = { postgres",
            "hub = \"http://h\"\nstore = { postgres"
        ))
        .contains("either hub or jetstream"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = |text: &str| {
            DeploymentConfig::parse("spoke.toml", text, Path::new("/"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(e("[hub]\n"), "manifest: missing: the path of the manifest");
        assert_eq!(
            e("manifest = \"m\"\n[hub]\nlisten = \"nowhere\"\ndata_dir = \"d\"\n"),
            "hub.listen: 'nowhere' is not an address such as 127.0.0.1:7070"
        );
        assert!(e("manifest = \"m\"\n[agent]\ncolour = 1\n")
            .starts_with("spoke.toml:3: unknown field `colour`"));
        let bad_hub = FULL.replace("http://127.0.0.1:7070/", "ftp://x");
        assert_eq!(
            e(&bad_hub),
            "agent.hub: 'ftp://x' must start with http:// or https://"
        );
        let c =
            DeploymentConfig::parse("spoke.toml", "manifest = \"m\"\n", Path::new("/")).unwrap();
        assert_eq!(
            c.agent().unwrap_err().to_string(),
            "agent: spoke.toml has no [agent] section"
        );
    }

    #[test]
    fn owner_postgres_connections_are_per_dataset_and_never_print() {
        let text = format!(
            "{FULL}\n[agent.owner_postgres.customers]\npostgres = \"host=db user=reader password=inline-secret\"\npassword = {{ env = \"SPOKE_TEST_OWNER_PG_PASSWORD_UNSET\" }}\n"
        );
        let c = DeploymentConfig::parse("spoke.toml", &text, Path::new("/")).unwrap();
        let a = c.agent().unwrap();
        let o = &a.owner_postgres["customers"];
        assert_eq!(o.url, "host=db user=reader password=inline-secret");
        assert!(!format!("{c:?}").contains("inline-secret"), "never printed");
        assert_eq!(
            o.conninfo("agent.owner_postgres.customers").unwrap_err().to_string(),
            "agent.owner_postgres.customers.password: environment variable SPOKE_TEST_OWNER_PG_PASSWORD_UNSET is not set"
        );
        let plain = OwnerPostgres {
            url: "host=db".into(),
            password: None,
        };
        assert_eq!(plain.conninfo("x").unwrap(), "host=db");
        let bad = format!("{FULL}\n[agent.owner_postgres.Customers]\npostgres = \"host=db\"\n");
        assert_eq!(
            DeploymentConfig::parse("spoke.toml", &bad, Path::new("/"))
                .unwrap_err()
                .to_string(),
            "agent.owner_postgres.Customers: not a dataset name"
        );
        let empty = format!("{FULL}\n[agent.owner_postgres.customers]\npostgres = \" \"\n");
        assert!(
            DeploymentConfig::parse("spoke.toml", &empty, Path::new("/"))
                .unwrap_err()
                .to_string()
                .starts_with("agent.owner_postgres.customers.postgres: empty")
        );
    }

    #[test]
    fn secrets_never_print() {
        let c = DeploymentConfig::parse("spoke.toml", FULL, Path::new("/")).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("env:SPOKE_TEST_TOKEN"));
        let e = SecretSource::Env("SPOKE_TEST_SURELY_UNSET_VAR".into())
            .read("hub.tokens.x")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "hub.tokens.x: environment variable SPOKE_TEST_SURELY_UNSET_VAR is not set"
        );
    }

    #[test]
    fn tls_and_api_tokens_resolve_and_are_checked() {
        let text = r#"
manifest = "m.toml"
[hub]
listen = "127.0.0.1:7070"
data_dir = "d"
tls_cert = "tls/hub.pem"
tls_key = "tls/hub.key"
[agent]
consumer = "order-service"
listen = "127.0.0.1:7071"
data_dir = "d2"
hub = "https://hub.internal:7070"
tls_ca = "tls/ca.pem"
tls_cert = "tls/agent.pem"
tls_key = "/abs/agent.key"
[agent.api_tokens]
order-app = { env = "ORDER_APP_TOKEN" }
prometheus = { file = "secrets/prom.token" }
"#;
        let c = DeploymentConfig::parse("spoke.toml", text, Path::new("/etc/spoke")).unwrap();
        assert_eq!(
            c.hub().unwrap().tls,
            Some(TlsFiles {
                cert: "/etc/spoke/tls/hub.pem".into(),
                key: "/etc/spoke/tls/hub.key".into()
            })
        );
        let a = c.agent().unwrap();
        assert_eq!(
            a.tls,
            Some(TlsFiles {
                cert: "/etc/spoke/tls/agent.pem".into(),
                key: "/abs/agent.key".into()
            })
        );
        assert!(
            matches!(&a.feed, FeedConfig::Hub { tls_ca: Some(ca), .. } if ca == Path::new("/etc/spoke/tls/ca.pem"))
        );
        assert_eq!(
            a.api_tokens.get("prometheus"),
            Some(&SecretSource::File("/etc/spoke/secrets/prom.token".into()))
        );
        let e = |t: String| {
            DeploymentConfig::parse("spoke.toml", &t, Path::new("/"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            e(text.replace("tls_key = \"tls/hub.key\"\n", "")),
            "hub.tls_key: missing: tls_cert is set, so name the PEM file of its private key too"
        );
        assert_eq!(
            e(text.replace("tls_cert = \"tls/agent.pem\"\n", "")),
            "agent.tls_cert: missing: tls_key is set, so name the PEM file of its certificate chain too"
        );
        assert_eq!(
            e(text.replace("https://hub.internal", "http://hub.internal")),
            "agent.tls_ca: set, but agent.hub is not an https:// URL: there is no hub certificate to check"
        );
        assert!(e(text.replace("order-app = {", "\"Order App\" = {"))
            .starts_with("agent.api_tokens.Order App: not a valid name"));
        assert!(
            e(text.replace("tls_ca = ", "tls_ca_file = ")).contains("unknown field `tls_ca_file`")
        );
    }
}
