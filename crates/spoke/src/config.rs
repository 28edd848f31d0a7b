//! Deployment configuration for the `hub` and `agent` roles (TOML).
//!
//! ```toml
//! manifest = "manifest.toml"          # relative to this file
//!
//! [hub]
//! listen = "127.0.0.1:7070"
//! data_dir = "data/hub"
//! [hub.tokens]                         # service → where its token comes from
//! customer-service = { env = "SPOKE_TOKEN_CUSTOMER_SERVICE" }
//!
//! [agent]
//! consumer = "order-service"
//! listen = "127.0.0.1:7071"
//! data_dir = "data/order-service"
//! hub = "http://127.0.0.1:7070"
//! store = { sqlite = "data/order-service/copies.db" }   # default: <data_dir>/copies.db
//! token = { file = "secrets/order-service.token" }
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
            SecretSource::Env(var) => std::env::var(var).map_err(|_| ConfigError::new(what, format!("environment variable {var} is not set")))?,
            SecretSource::File(path) => std::fs::read_to_string(path).map_err(|e| ConfigError::new(what, format!("cannot read {}: {e}", path.display())))?,
        };
        let value = value.trim().to_owned();
        if value.is_empty() {
            return Err(ConfigError::new(what, format!("the token from {self:?} is empty")));
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
        ConfigError { path: path.into(), message: message.into() }
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    consumer: Option<String>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    hub: Option<String>,
    store: Option<RawStore>,
    token: Option<SecretSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawStore {
    Sqlite(PathBuf),
}

/// The hub role, resolved.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub manifest: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tokens: BTreeMap<String, SecretSource>,
}

/// Where a consumer's copies live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Sqlite(PathBuf),
}

/// The agent role, resolved.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub manifest: PathBuf,
    pub consumer: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub hub: String,
    pub store: StoreConfig,
    pub token: Option<SecretSource>,
}

/// A whole deployment config file.
#[derive(Debug, Clone)]
pub struct DeploymentConfig {
    pub file: PathBuf,
    pub hub: Option<HubConfig>,
    pub agent: Option<AgentConfig>,
}

fn listen(path: &str, v: Option<String>) -> Result<SocketAddr, ConfigError> {
    let v = v.ok_or_else(|| ConfigError::new(path, "missing (e.g. \"127.0.0.1:7070\")"))?;
    v.parse().map_err(|_| ConfigError::new(path, format!("'{v}' is not an address such as 127.0.0.1:7070")))
}

/// Checks a hub URL: http(s), a host, no trailing junk.
pub fn check_url(path: &str, url: &str) -> Result<String, ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| ConfigError::new(path, format!("'{url}' must start with http:// or https://")))?;
    if rest.trim_end_matches('/').is_empty() || rest.contains(char::is_whitespace) {
        return Err(ConfigError::new(path, format!("'{url}' has no host")));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl DeploymentConfig {
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::new(&shown, format!("cannot read: {e}")))?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&shown, &text, &base)
    }

    /// Parses config text; relative paths resolve against `base`.
    pub fn parse(file: &str, text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1).unwrap_or(0);
            ConfigError::new(format!("{file}:{line}"), e.message().trim().replace('\n', " "))
        })?;
        let at = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let manifest = raw.manifest.map(at).ok_or_else(|| ConfigError::new("manifest", "missing: the path of the manifest"))?;
        let hub = raw
            .hub
            .map(|h| -> Result<HubConfig, ConfigError> {
                for name in h.tokens.keys() {
                    if !spoke_core::manifest::is_service_name(name) {
                        return Err(ConfigError::new(format!("hub.tokens.{name}"), "not a valid service name"));
                    }
                }
                Ok(HubConfig {
                    manifest: manifest.clone(),
                    listen: listen("hub.listen", h.listen)?,
                    data_dir: at(h.data_dir.ok_or_else(|| ConfigError::new("hub.data_dir", "missing: where the hub keeps its log"))?),
                    tokens: h.tokens.into_iter().map(|(k, v)| (k, resolve_secret(v, &at))).collect(),
                })
            })
            .transpose()?;
        let agent = raw
            .agent
            .map(|a| -> Result<AgentConfig, ConfigError> {
                let data_dir = at(a.data_dir.ok_or_else(|| ConfigError::new("agent.data_dir", "missing: where the agent keeps its state"))?);
                let store = match a.store {
                    Some(RawStore::Sqlite(p)) => StoreConfig::Sqlite(at(p)),
                    None => StoreConfig::Sqlite(data_dir.join("copies.db")),
                };
                Ok(AgentConfig {
                    manifest: manifest.clone(),
                    consumer: a.consumer.ok_or_else(|| ConfigError::new("agent.consumer", "missing: the service whose copies this agent keeps"))?,
                    listen: listen("agent.listen", a.listen)?,
                    data_dir,
                    hub: check_url("agent.hub", &a.hub.ok_or_else(|| ConfigError::new("agent.hub", "missing: the hub's URL"))?)?,
                    store,
                    token: a.token.map(|t| resolve_secret(t, &at)),
                })
            })
            .transpose()?;
        Ok(DeploymentConfig { file: PathBuf::from(file), hub, agent })
    }

    pub fn hub(&self) -> Result<&HubConfig, ConfigError> {
        self.hub.as_ref().ok_or_else(|| ConfigError::new("hub", format!("{} has no [hub] section", self.file.display())))
    }

    pub fn agent(&self) -> Result<&AgentConfig, ConfigError> {
        self.agent.as_ref().ok_or_else(|| ConfigError::new("agent", format!("{} has no [agent] section", self.file.display())))
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

    #[test]
    fn resolves_paths_against_the_config_folder() {
        let c = DeploymentConfig::parse("spoke.toml", FULL, Path::new("/etc/spoke")).unwrap();
        let hub = c.hub().unwrap();
        assert_eq!(hub.manifest, Path::new("/etc/spoke/manifest.toml"));
        assert_eq!(hub.data_dir, Path::new("/etc/spoke/data/hub"));
        let agent = c.agent().unwrap();
        assert_eq!(agent.hub, "http://127.0.0.1:7070");
        assert_eq!(agent.store, StoreConfig::Sqlite("/etc/spoke/data/order/copies.db".into()));
        assert_eq!(agent.token, Some(SecretSource::File("/etc/spoke/secrets/order.token".into())));
    }

    #[test]
    fn errors_name_the_field() {
        let e = |text: &str| DeploymentConfig::parse("spoke.toml", text, Path::new("/")).unwrap_err().to_string();
        assert_eq!(e("[hub]\n"), "manifest: missing: the path of the manifest");
        assert_eq!(e("manifest = \"m\"\n[hub]\nlisten = \"nowhere\"\ndata_dir = \"d\"\n"), "hub.listen: 'nowhere' is not an address such as 127.0.0.1:7070");
        assert!(e("manifest = \"m\"\n[agent]\ncolour = 1\n").starts_with("spoke.toml:3: unknown field `colour`"));
        let bad_hub = FULL.replace("http://127.0.0.1:7070/", "ftp://x");
        assert_eq!(e(&bad_hub), "agent.hub: 'ftp://x' must start with http:// or https://");
        let c = DeploymentConfig::parse("spoke.toml", "manifest = \"m\"\n", Path::new("/")).unwrap();
        assert_eq!(c.agent().unwrap_err().to_string(), "agent: spoke.toml has no [agent] section");
    }

    #[test]
    fn secrets_never_print() {
        let c = DeploymentConfig::parse("spoke.toml", FULL, Path::new("/")).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("env:SPOKE_TEST_TOKEN"));
        let e = SecretSource::Env("SPOKE_TEST_SURELY_UNSET_VAR".into()).read("hub.tokens.x").unwrap_err();
        assert_eq!(e.to_string(), "hub.tokens.x: environment variable SPOKE_TEST_SURELY_UNSET_VAR is not set");
    }
}
