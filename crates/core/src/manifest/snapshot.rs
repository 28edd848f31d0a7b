//! Where a `scheduled` subscription reads its owner's snapshot: a paged
//! HTTP endpoint (`snapshot_url`) or a query against the owner's PostgreSQL
//! (`snapshot_sql`). Both are checked once, when the manifest loads; what
//! the owner must answer is documented in `spoke::scheduled`.

use std::fmt;

/// The owner's snapshot source of a `scheduled` subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerSnapshot {
    /// `snapshot_url`: the owner's listing endpoint (`GET` lists keys and
    /// versions page by page, `POST` returns full records of given keys).
    Url(SnapshotUrl),
    /// `snapshot_sql`: one `SELECT` with a `key` and a `version` column and
    /// one column per projected field, run against the owner's PostgreSQL
    /// (the connection is in the agent's deployment config, never here).
    Sql(String),
}

impl OwnerSnapshot {
    /// The manifest key that declared it.
    pub fn key(&self) -> &'static str {
        match self {
            OwnerSnapshot::Url(_) => "snapshot_url",
            OwnerSnapshot::Sql(_) => "snapshot_sql",
        }
    }
}

/// A checked `snapshot_url`: http(s), a host, no fragment, no placeholder.
/// A query is allowed; Spoke appends its own parameters with `&`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotUrl(String);

impl SnapshotUrl {
    /// Checks a URL; the error says what is wrong (the caller adds where).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (authority, after) = super::owner_url::split_http_url(url)?;
        if authority.contains(['{', '}']) || after.contains(['{', '}']) {
            return Err(format!(
                "'{url}' has a placeholder; snapshot_url names the whole listing (Spoke adds ?fields=key,version&limit=…&after=…), unlike owner_url"
            ));
        }
        Ok(SnapshotUrl(url.to_owned()))
    }

    /// The URL with `query` (already encoded) appended.
    pub fn with_query(&self, query: &str) -> String {
        let sep = if self.0.contains('?') { '&' } else { '?' };
        format!("{}{sep}{query}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a `snapshot_sql` query: one statement Spoke can wrap as a
/// subquery (`SELECT key, version FROM (<query>) q`).
pub fn check_sql(sql: &str) -> Result<String, String> {
    let trimmed = sql.trim();
    if trimmed.is_empty() {
        return Err("is empty".into());
    }
    // Even a trailing ';' breaks the subquery; a ';' inside a string
    // literal is refused too (rare, and a rewrite avoids it).
    if trimmed.contains(';') {
        return Err("must be a single SELECT without ';' (Spoke wraps it as a subquery: SELECT key, version FROM (<query>) q)".into());
    }
    let first = trimmed
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if first != "select" && first != "with" && first != "values" && first != "table" {
        return Err(format!(
            "must be a query (SELECT … or WITH …), not '{}'",
            trimmed.chars().take(30).collect::<String>()
        ));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_take_spokes_parameters_after_their_own() {
        let u = SnapshotUrl::parse("http://owner:8080/v1/customers").unwrap();
        assert_eq!(
            u.with_query("limit=5"),
            "http://owner:8080/v1/customers?limit=5"
        );
        let q = SnapshotUrl::parse("https://owner/v1/customers?tenant=a").unwrap();
        assert_eq!(
            q.with_query("limit=5"),
            "https://owner/v1/customers?tenant=a&limit=5"
        );
        for (bad, why) in [
            ("ftp://owner/x", "must start with http:// or https://"),
            ("http:///x", "has no host"),
            ("http://owner/x#frag", "fragment"),
            ("http://owner/x/{key}", "placeholder"),
            ("http://owner/x y", "no spaces"),
        ] {
            let e = SnapshotUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn sql_must_be_one_query() {
        assert_eq!(
            check_sql("  SELECT id AS key, v AS version FROM t  ").unwrap(),
            "SELECT id AS key, v AS version FROM t"
        );
        assert!(check_sql("with x as (select 1) select * from x").is_ok());
        assert!(check_sql("   ").unwrap_err().contains("empty"));
        assert!(check_sql("SELECT 1;").unwrap_err().contains("without ';'"));
        assert!(check_sql("SELECT 1; DROP TABLE t")
            .unwrap_err()
            .contains("without ';'"));
        assert!(check_sql("DELETE FROM t")
            .unwrap_err()
            .contains("must be a query"));
    }
}
