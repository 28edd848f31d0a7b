//! PostgreSQL helpers shared by the benches: connect, and quote names.

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

/// The default server of `--postgres` (the machine's local PostgreSQL).
pub const DEFAULT_POSTGRES: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// Connects one session; its connection task ends with the client.
pub async fn connect(conninfo: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at '{conninfo}'"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("bench postgres connection ended: {e}");
        }
    });
    Ok(client)
}

/// Runs `sql` in a fresh session (setup and cleanup).
pub async fn exec(conninfo: &str, sql: &str) -> anyhow::Result<()> {
    let client = connect(conninfo).await?;
    client
        .batch_execute(sql)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {sql}", db_message(&e)))
}

/// The server's message for a database error, the driver's otherwise.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

/// A fresh lowercase name for schemas, tables, slots and publications:
/// `prefix_<pid>_<n>_<random>`, at most 63 bytes.
pub fn unique(prefix: &str) -> String {
    let mut name = spoke::testing::unique_name(prefix);
    name.truncate(63);
    name
}

/// Quotes an SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_fresh_lowercase_identifiers() {
        let a = unique("spoke_bench");
        let b = unique("spoke_bench");
        assert_ne!(a, b);
        assert!(a.len() <= 63);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        assert!(spoke_core::manifest::is_identifier(&a), "{a}");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }
}
