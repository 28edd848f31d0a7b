//! Bearer tokens: who is calling the hub or an agent's API.
//!
//! ```text
//!  Authorization: Bearer <token> ──BLAKE3──▶ hash ──lookup──▶ Caller::Service(name)
//!        missing / not Bearer / too long / unknown ──▶ AuthError (401)
//! ```
//!
//! Tokens are read from the environment or a file named in the deployment
//! config ([`crate::config::SecretSource`]), hashed at once, and only the
//! hashes are kept: a memory dump or a `Debug` print shows service names,
//! never a token. Comparing 32-byte hashes instead of the tokens themselves
//! means the time a lookup takes says nothing useful about a token's prefix.
//!
//! An empty [`Tokens`] means the server runs open ([`Caller::Open`]): that is
//! the quick-start mode, and the servers log it once when they start.

use std::collections::{BTreeMap, HashMap};

use axum::http::{header, HeaderMap};

use crate::config::{ConfigError, SecretSource};

/// Longest bearer token accepted, in bytes. Longer headers are refused
/// before hashing, so a hostile client cannot make every request expensive.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No tokens are configured: everyone may do everything.
    Open,
    /// The service (or, for an agent's API, the named client) whose token
    /// was presented.
    Service(String),
}

/// Why a request could not be authenticated (always answered 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization: Bearer <token>")]
    Missing,
    #[error("Authorization must be 'Bearer <token>' (printable ASCII)")]
    Malformed,
    #[error("the bearer token is {len} bytes, longer than the limit of {MAX_TOKEN_BYTES}")]
    TooLong { len: usize },
    #[error("unknown token")]
    Unknown,
}

/// Named bearer tokens, kept as BLAKE3 hashes.
#[derive(Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.by_hash.values().collect();
        names.sort();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

impl Tokens {
    /// From name → plaintext token (tests and in-process wiring; servers
    /// use [`Tokens::read`]).
    pub fn new(tokens: &BTreeMap<String, String>) -> Self {
        Tokens {
            by_hash: tokens
                .iter()
                .map(|(name, tok)| (hash(tok.trim()), name.clone()))
                .collect(),
        }
    }

    /// Reads every token from its source; `path` is the config table the
    /// sources came from (e.g. `hub.tokens`), named in errors. Two names
    /// with the same token are refused: the caller would be ambiguous.
    pub fn read(sources: &BTreeMap<String, SecretSource>, path: &str) -> Result<Self, ConfigError> {
        let mut by_hash = HashMap::new();
        for (name, source) in sources {
            let token = source.read(&format!("{path}.{name}"))?;
            if token.len() > MAX_TOKEN_BYTES {
                return Err(ConfigError::new(
                    format!("{path}.{name}"),
                    format!("the token is longer than {MAX_TOKEN_BYTES} bytes"),
                ));
            }
            if let Some(other) = by_hash.insert(hash(&token), name.clone()) {
                return Err(ConfigError::new(
                    format!("{path}.{name}"),
                    format!("has the same token as {path}.{other}: give each its own"),
                ));
            }
        }
        Ok(Tokens { by_hash })
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The names tokens are configured for, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_hash.values().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Resolves the `Authorization` header to a caller.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        if self.is_empty() {
            return Ok(Caller::Open);
        }
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong { len: token.len() });
        }
        self.by_hash
            .get(&hash(token))
            .map(|s| Caller::Service(s.clone()))
            .ok_or(AuthError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(v: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(v).expect("header value"),
        );
        h
    }

    #[test]
    fn resolves_each_header_shape() {
        let t = Tokens::new(&BTreeMap::from([("svc".to_owned(), "s3cret".to_owned())]));
        assert_eq!(
            t.authenticate(&with_auth(b"Bearer s3cret")),
            Ok(Caller::Service("svc".into()))
        );
        assert_eq!(t.authenticate(&HeaderMap::new()), Err(AuthError::Missing));
        assert_eq!(
            t.authenticate(&with_auth(b"Basic s3cret")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            t.authenticate(&with_auth(b"Bearer ")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            t.authenticate(&with_auth(b"Bearer \xff\xfe")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            t.authenticate(&with_auth(b"Bearer s3cre")),
            Err(AuthError::Unknown)
        );
        let long = format!("Bearer {}", "x".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(
            t.authenticate(&with_auth(long.as_bytes())),
            Err(AuthError::TooLong {
                len: MAX_TOKEN_BYTES + 1
            })
        );
        assert_eq!(
            Tokens::default().authenticate(&HeaderMap::new()),
            Ok(Caller::Open)
        );
    }

    #[test]
    fn debug_shows_names_never_tokens() {
        let t = Tokens::new(&BTreeMap::from([(
            "svc".to_owned(),
            "very-secret-value".to_owned(),
        )]));
        let shown = format!("{t:?}");
        assert!(shown.contains("svc"), "{shown}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
    }

    #[test]
    fn reading_refuses_a_shared_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t");
        std::fs::write(&file, "same\n").expect("write");
        let sources = BTreeMap::from([
            ("a".to_owned(), SecretSource::File(file.clone())),
            ("b".to_owned(), SecretSource::File(file)),
        ]);
        let e = Tokens::read(&sources, "hub.tokens").unwrap_err();
        assert_eq!(
            e.to_string(),
            "hub.tokens.b: has the same token as hub.tokens.a: give each its own"
        );
    }
}
