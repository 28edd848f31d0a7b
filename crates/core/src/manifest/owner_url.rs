//! The owner's read endpoint of a subscription: a URL template such as
//! `http://customers.internal/v1/customers/{key}`.
//!
//! A `ttl` subscription reads through it on every cache miss; an `events`,
//! `cdc` or `scheduled` subscription falls back to it when a bounded-staleness
//! read finds the copy too stale. The template is checked once, when the
//! manifest loads, so a request never meets a malformed one.

use std::fmt;

/// The placeholder the key replaces.
pub const KEY_PLACEHOLDER: &str = "{key}";

/// A checked owner URL template with exactly one `{key}` in its path or query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerUrl(String);

/// Checks what every owner URL in a manifest needs (no spaces or control
/// characters, `http://` or `https://`, a host, no fragment) and splits it
/// into its authority and the rest (path and query).
pub(crate) fn split_http_url(url: &str) -> Result<(&str, &str), String> {
    if let Some(c) = url.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "'{url}' contains {c:?}; a URL has no spaces or control characters"
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("'{url}' must start with http:// or https://"))?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(authority_end);
    if authority.is_empty() {
        return Err(format!("'{url}' has no host"));
    }
    if after.contains('#') {
        return Err(format!(
            "'{url}' has a fragment (#…), which is never sent to the owner"
        ));
    }
    Ok((authority, after))
}

impl OwnerUrl {
    /// Checks a template; the error says what is wrong (the caller adds where).
    pub fn parse(template: &str) -> Result<Self, String> {
        let (authority, after) = split_http_url(template)?;
        if authority.contains('{') || authority.contains('}') {
            return Err(format!(
                "'{template}': {KEY_PLACEHOLDER} belongs in the path or query, not the host"
            ));
        }
        let keys = after.matches(KEY_PLACEHOLDER).count();
        match keys {
            0 => {
                return Err(format!(
                    "'{template}' has no {KEY_PLACEHOLDER} placeholder for the record's key"
                ))
            }
            1 => {}
            n => {
                return Err(format!(
                    "'{template}' has {n} {KEY_PLACEHOLDER} placeholders; exactly one is replaced by the key"
                ))
            }
        }
        // Any other brace is a misspelt placeholder (`{id}`) that would be sent as is.
        let other = after.replacen(KEY_PLACEHOLDER, "", 1);
        if let Some(at) = other.find(['{', '}']) {
            let end = other[at..].find('}').map_or(other.len(), |e| at + e + 1);
            return Err(format!(
                "'{template}' has '{}', which is not a placeholder Spoke fills; the only one is {KEY_PLACEHOLDER}",
                &other[at..end]
            ));
        }
        Ok(OwnerUrl(template.to_owned()))
    }

    /// The URL of `key`'s record: the key percent-encoded into the template.
    pub fn url_for(&self, key: &str) -> String {
        self.0.replacen(KEY_PLACEHOLDER, &percent_encode(key), 1)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OwnerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Percent-encodes every byte but RFC 3986's unreserved characters, so a
/// key can never add a path segment (`/`), a query (`?`) or a fragment.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_encoded_into_the_one_placeholder() {
        let u = OwnerUrl::parse("http://127.0.0.1:8081/v1/customers/{key}?full=1").unwrap();
        assert_eq!(
            u.url_for("c-1"),
            "http://127.0.0.1:8081/v1/customers/c-1?full=1"
        );
        assert_eq!(
            u.url_for("a/b?c#d é"),
            "http://127.0.0.1:8081/v1/customers/a%2Fb%3Fc%23d%20%C3%A9?full=1"
        );
        let q = OwnerUrl::parse("https://owner.example/lookup?id={key}").unwrap();
        assert_eq!(
            q.url_for("x&y=z"),
            "https://owner.example/lookup?id=x%26y%3Dz"
        );
    }

    #[test]
    fn malformed_templates_say_what_is_wrong() {
        let err = |t: &str| OwnerUrl::parse(t).unwrap_err();
        assert!(err("ftp://h/{key}").contains("must start with http:// or https://"));
        assert!(err("127.0.0.1/{key}").contains("must start with http://"));
        assert!(err("http:///{key}").contains("has no host"));
        assert!(err("http://h/v1/customers").contains("has no {key} placeholder"));
        assert!(err("http://h/{key}/{key}").contains("has 2 {key} placeholders"));
        assert!(err("http://{key}.h/x").contains("not the host"));
        assert!(err("http://h/{id}/{key}").contains("'{id}', which is not a placeholder"));
        assert!(err("http://h/a b/{key}").contains("no spaces"));
        assert!(err("http://h/{key}#top").contains("fragment"));
    }
}
