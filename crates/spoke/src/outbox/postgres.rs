//! The transactional outbox for owners on PostgreSQL.
//!
//! The owner calls [`upsert`] or [`delete`] (or the same methods of an
//! [`Outbox`] in another schema) with the tokio-postgres [`Transaction`] that
//! writes its business row. One statement bumps the key's version in
//! `spoke_versions`, appends the change to `spoke_outbox` and queues a
//! `NOTIFY`, all inside that transaction: the business row, the outbox row,
//! the version bump and the notification commit together or not at all
//! (rule 3; PostgreSQL delivers a `NOTIFY` only on commit).
//! [`PostgresOutbox`] is the [`Source`] the relay reads, woken by
//! `LISTEN` on a dedicated connection and backed by the relay's polling.
//!
//! # Commit order: per-key row lock, exact-id acknowledgement
//!
//! Identity values are handed out when a row is inserted, not when its
//! transaction commits, so a row with a lower id can become visible after
//! one with a higher id. Two rules make that harmless:
//!
//! ```text
//!  owner T1: BEGIN ─ upsert(k) ─────────────── (slow) ──────────── COMMIT
//!                    │ INSERT … ON CONFLICT DO UPDATE spoke_versions (k)
//!                    │   → row lock on k, version 7
//!                    └ INSERT spoke_outbox → id 41 (after the lock)
//!  owner T2: BEGIN ─ upsert(k) ··· waits for T1's lock on k ···▶ version 8, id 57 ─ COMMIT
//!  owner T3: BEGIN ─ upsert(j) → version 3, id 42 ─ COMMIT          (another key: no wait)
//!
//!  relay:   pending() sees 42 (j), not 41 (k: T1 still open)
//!           publish [42]  ─▶  ack(42) deletes exactly {42}         (not `id <= 42`!)
//!           later: pending() sees 41, 57 ─▶ publish ─▶ ack deletes exactly {41, 57}
//! ```
//!
//! 1. **Per key, id order is commit order.** The version bump is an
//!    `INSERT … ON CONFLICT DO UPDATE … RETURNING` on the key's row in
//!    `spoke_versions`, which holds that row's lock until the owner's
//!    transaction ends; the outbox row is inserted (and its id drawn) only
//!    after the lock is held. A second writer of the same key waits for the
//!    first to commit or roll back, so it draws a higher id *and* a higher
//!    version, and it cannot commit first. Reading visible rows in id order
//!    therefore yields each key's versions in commit order. (The identity
//!    uses `CACHE 1`, so ids are drawn in global order across sessions.)
//! 2. **Acknowledge exactly what was forwarded.** A row with a low id that
//!    was still in flight when `pending` read the table may commit before
//!    the relay acknowledges, so `DELETE … WHERE id <= N` could delete a row
//!    that was never forwarded. [`PostgresOutbox`] remembers the ids it
//!    returned and `ack(upto)` deletes exactly those ids `<= upto`; a row
//!    that was invisible stays and is offered by a later `pending`.
//!
//! Across different keys the relay may forward in a different order than
//! the commits happened; the feed keeps versions per key, so copies
//! converge the same way. (The alternative, reading only rows whose
//! `xid8` is older than `pg_snapshot_xmin(pg_current_snapshot())`, gives a
//! global order but lets one long-running owner transaction hold back every
//! key; the row lock only delays other writers of the same key.)
//!
//! # Contract
//! - A change is in the outbox iff the owner's transaction committed; its
//!   version is the key's previous committed version plus one (a rolled-back
//!   version is reused).
//! - **At least once.** A relay crash between publish and ack republishes
//!   the rows; the feed ignores versions it already holds, so nothing is
//!   doubled in its log. A crash between the owner's commit and the publish
//!   delays the change, never loses it.
//! - **Per-key commit order**, as above. Changes must be written through
//!   [`upsert`] / [`delete`] (or [`Outbox`]): a raw `INSERT` into
//!   `spoke_outbox` skips the lock and the version bump.
//! - One relay per outbox is the intended deployment; a second one only
//!   republishes what the feed then ignores.
//!
//! # Wake-up
//! Every write calls `pg_notify('<schema>_outbox', '')` (one notification per
//! transaction after PostgreSQL's de-duplication). [`PostgresOutbox::listen`]
//! keeps a dedicated `LISTEN` connection that nudges the relay on each
//! notification and once after every (re)connect, so commits made while it
//! was down are picked up. The relay's poll interval stays as the fallback
//! for a lost notification or a lost `LISTEN` connection; both connections
//! reconnect after errors, which the relay sees as
//! [`SourceError::Unavailable`] and retries with backoff.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};
use spoke_core::manifest::is_identifier;
use spoke_core::{Op, Version};
use tokio::sync::Notify;
use tokio_postgres::types::{Json, Type};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Transaction};

use super::{Pending, Source, SourceError};
use crate::feed::ChangeInput;
use crate::shutdown::Shutdown;

/// The driver this API takes transactions from, re-exported so owners use
/// the same version as Spoke.
pub use tokio_postgres;

/// Schema holding the outbox tables unless another is chosen.
pub const DEFAULT_SCHEMA: &str = "spoke";

/// Longest schema name: the notification channel `<schema>_outbox` must fit
/// PostgreSQL's 63-byte identifiers.
pub const MAX_SCHEMA_LEN: usize = 56;

/// A schema name that cannot hold an outbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outbox schema '{0}' must be a lowercase identifier (a-z, 0-9, _) of at most {MAX_SCHEMA_LEN} characters")]
pub struct InvalidSchema(pub String);

/// Where an outbox lives in the owner's database: `<schema>.spoke_outbox`,
/// `<schema>.spoke_versions` and the channel `<schema>_outbox`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbox {
    schema: String,
    channel: String,
    write_sql: String,
}

impl Default for Outbox {
    fn default() -> Self {
        default_outbox().clone()
    }
}

fn default_outbox() -> &'static Outbox {
    static DEFAULT: std::sync::OnceLock<Outbox> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| Outbox::new(DEFAULT_SCHEMA).expect("the default schema is valid"))
}

impl Outbox {
    pub fn new(schema: &str) -> Result<Outbox, InvalidSchema> {
        if !is_identifier(schema) || schema.len() > MAX_SCHEMA_LEN {
            return Err(InvalidSchema(schema.to_owned()));
        }
        // The outbox row reads the version row, so its id is drawn only once
        // the key's row lock is held (see "Commit order" above). pg_notify
        // is transactional: it is delivered on commit, dropped on rollback.
        let write_sql = format!(
            "WITH v AS (
                INSERT INTO \"{schema}\".spoke_versions AS cur (dataset, key, version)
                VALUES ($1, $2, 1)
                ON CONFLICT (dataset, key) DO UPDATE SET version = cur.version + 1
                RETURNING cur.version
            ), o AS (
                INSERT INTO \"{schema}\".spoke_outbox (dataset, key, version, op, fields, ts)
                SELECT $1, $2, v.version, $3, $4, $5 FROM v
                RETURNING version
            )
            SELECT o.version FROM o CROSS JOIN LATERAL pg_notify($6, '') AS n"
        );
        Ok(Outbox {
            schema: schema.to_owned(),
            channel: format!("{schema}_outbox"),
            write_sql,
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The `LISTEN`/`NOTIFY` channel writes signal on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    fn table(&self) -> String {
        format!("\"{}\".spoke_outbox", self.schema)
    }

    /// Creates the schema and the outbox tables (idempotent). Run it once,
    /// e.g. with the owner's migrations; not concurrently with itself.
    pub async fn install(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<(), tokio_postgres::Error> {
        let s = &self.schema;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{s}\";
                CREATE TABLE IF NOT EXISTS \"{s}\".spoke_outbox (
                    id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
                    dataset text NOT NULL,
                    key text NOT NULL,
                    version bigint NOT NULL CHECK (version > 0),
                    op text NOT NULL CHECK (op IN ('upsert', 'delete')),
                    fields jsonb NOT NULL CHECK (jsonb_typeof(fields) = 'object'),
                    ts bigint NOT NULL
                );
                CREATE TABLE IF NOT EXISTS \"{s}\".spoke_versions (
                    dataset text NOT NULL,
                    key text NOT NULL,
                    version bigint NOT NULL,
                    PRIMARY KEY (dataset, key)
                );"
            ))
            .await
    }

    async fn write(
        &self,
        tx: &Transaction<'_>,
        dataset: &str,
        key: &str,
        op: Op,
        fields: &Map<String, Value>,
    ) -> Result<Version, tokio_postgres::Error> {
        let ts = i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX);
        let row = tx
            .query_typed_one(
                &self.write_sql,
                &[
                    (&dataset, Type::TEXT),
                    (&key, Type::TEXT),
                    (&op.as_str(), Type::TEXT),
                    (&Json(fields), Type::JSONB),
                    (&ts, Type::INT8),
                    (&self.channel.as_str(), Type::TEXT),
                ],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as Version)
    }

    /// Records an upsert of `key`'s full state in the caller's transaction;
    /// returns the new version. Waits while another open transaction holds
    /// a change of the same key.
    pub async fn upsert(
        &self,
        tx: &Transaction<'_>,
        dataset: &str,
        key: &str,
        fields: &Map<String, Value>,
    ) -> Result<Version, tokio_postgres::Error> {
        self.write(tx, dataset, key, Op::Upsert, fields).await
    }

    /// Records a delete of `key` in the caller's transaction; returns the new version.
    pub async fn delete(
        &self,
        tx: &Transaction<'_>,
        dataset: &str,
        key: &str,
    ) -> Result<Version, tokio_postgres::Error> {
        self.write(tx, dataset, key, Op::Delete, &Map::new()).await
    }
}

/// Creates the outbox in the default schema ([`DEFAULT_SCHEMA`]).
pub async fn install(
    client: &impl tokio_postgres::GenericClient,
) -> Result<(), tokio_postgres::Error> {
    default_outbox().install(client).await
}

/// [`Outbox::upsert`] in the default schema.
pub async fn upsert(
    tx: &Transaction<'_>,
    dataset: &str,
    key: &str,
    fields: &Map<String, Value>,
) -> Result<Version, tokio_postgres::Error> {
    default_outbox().upsert(tx, dataset, key, fields).await
}

/// [`Outbox::delete`] in the default schema.
pub async fn delete(
    tx: &Transaction<'_>,
    dataset: &str,
    key: &str,
) -> Result<Version, tokio_postgres::Error> {
    default_outbox().delete(tx, dataset, key).await
}

/// A PostgreSQL error as a relay sees it: always worth retrying (a lost
/// connection, a restarting server, a table someone is fixing), with the
/// SQLSTATE in the message so a person can tell which.
fn unavailable(context: &str, e: &tokio_postgres::Error) -> SourceError {
    SourceError::Unavailable(match e.as_db_error() {
        Some(db) => format!(
            "postgres outbox: {context}: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        ),
        None => {
            let cause = std::error::Error::source(e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("postgres outbox: {context}: {e}{cause}")
        }
    })
}

fn config(url: &str, application_name: &str) -> Result<Config, SourceError> {
    let mut config = Config::from_str(url).map_err(|e| {
        SourceError::Unavailable(format!("postgres outbox: bad connection string: {e}"))
    })?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok(config)
}

/// The outbox as a [`Source`], over its own connection (reconnected after
/// errors).
pub struct PostgresOutbox {
    config: Config,
    outbox: Outbox,
    client: tokio::sync::Mutex<Option<Client>>,
    /// Ids returned by `pending` and not yet acknowledged.
    offered: Mutex<BTreeSet<i64>>,
    pending_sql: String,
    ack_sql: String,
}

impl PostgresOutbox {
    /// Connects (failing at once on a wrong URL or an unreachable server)
    /// and installs the outbox tables if they are missing.
    pub async fn connect(url: &str, outbox: Outbox) -> Result<Self, SourceError> {
        let config = config(url, "spoke relay")?;
        let client = connect(&config).await?;
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&outbox.table()])
            .await
            .map_err(|e| unavailable("looking for the outbox table", &e))?
            .get(0);
        if !exists {
            outbox.install(&client).await.map_err(|e| {
                unavailable(
                    &format!("creating the outbox in schema {}", outbox.schema()),
                    &e,
                )
            })?;
        }
        let table = outbox.table();
        Ok(PostgresOutbox {
            config,
            pending_sql: format!(
                "SELECT id, dataset, key, version, op, fields, ts FROM {table} ORDER BY id LIMIT $1"
            ),
            ack_sql: format!("DELETE FROM {table} WHERE id = ANY($1)"),
            outbox,
            client: tokio::sync::Mutex::new(Some(client)),
            offered: Mutex::default(),
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Rows not yet acknowledged.
    pub async fn backlog(&self) -> Result<u64, SourceError> {
        let sql = format!("SELECT count(*) FROM {}", self.outbox.table());
        let row = self
            .with_client("counting the backlog", async |c| {
                c.query_one(&sql, &[]).await
            })
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Spawns the `LISTEN` task: nudges `nudge` (the relay's
    /// [`super::relay::Relay::nudger`]) on every notification and after
    /// every (re)connect, until `shutdown`.
    pub fn listen(&self, nudge: Arc<Notify>, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        let mut config = self.config.clone();
        let name = format!(
            "{} (listen)",
            config.get_application_name().unwrap_or("spoke relay")
        );
        config.application_name(name);
        let channel = self.outbox.channel().to_owned();
        tokio::spawn(listen_loop(config, channel, nudge, shutdown))
    }

    async fn with_client<R>(
        &self,
        context: &str,
        f: impl AsyncFnOnce(&Client) -> Result<R, tokio_postgres::Error>,
    ) -> Result<R, SourceError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(connect(&self.config).await?);
        }
        let client = slot
            .as_ref()
            .ok_or_else(|| SourceError::Unavailable("postgres outbox: no connection".into()))?;
        match f(client).await {
            Ok(r) => Ok(r),
            Err(e) => {
                // Start over on a fresh connection: cheap, and never wrong.
                *slot = None;
                Err(unavailable(context, &e))
            }
        }
    }
}

async fn connect(config: &Config) -> Result<Client, SourceError> {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .map_err(|e| unavailable("connecting", &e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("postgres outbox connection ended: {e}");
        }
    });
    Ok(client)
}

type Row = (i64, String, String, i64, String, Value, i64);

fn decode((id, dataset, key, version, op, fields, ts): Row) -> Result<Pending, SourceError> {
    let uid = id as u64;
    let corrupt = |message: String| SourceError::Corrupt { id: uid, message };
    let op = match op.as_str() {
        "upsert" => Op::Upsert,
        "delete" => Op::Delete,
        other => return Err(corrupt(format!("unknown op '{other}'"))),
    };
    let Value::Object(fields) = fields else {
        return Err(corrupt("fields are not a JSON object".into()));
    };
    if version <= 0 {
        return Err(corrupt(format!("version {version} is not positive")));
    }
    Ok(Pending {
        id: uid,
        dataset,
        change: ChangeInput {
            key,
            version: version as Version,
            op,
            fields,
            ts: u64::try_from(ts).ok(),
        },
    })
}

#[async_trait]
impl Source for PostgresOutbox {
    async fn pending(&self, max: usize) -> Result<Vec<Pending>, SourceError> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = self
            .with_client("reading the outbox", async |c| {
                let rows = c.query(&self.pending_sql, &[&limit]).await?;
                rows.iter()
                    .map(|r| {
                        Ok((
                            r.try_get(0)?,
                            r.try_get(1)?,
                            r.try_get(2)?,
                            r.try_get(3)?,
                            r.try_get(4)?,
                            r.try_get(5)?,
                            r.try_get(6)?,
                        ))
                    })
                    .collect::<Result<Vec<Row>, tokio_postgres::Error>>()
            })
            .await?;
        self.offered
            .lock()
            .expect("offered ids")
            .extend(rows.iter().map(|r| r.0));
        rows.into_iter().map(decode).collect()
    }

    async fn ack(&self, upto: u64) -> Result<(), SourceError> {
        let upto = i64::try_from(upto).unwrap_or(i64::MAX);
        // Exactly the ids offered, never a range: a lower id that was still
        // in flight when `pending` read the table stays for the next round.
        let ids: Vec<i64> = {
            let mut offered = self.offered.lock().expect("offered ids");
            let rest = offered.split_off(&upto.saturating_add(1));
            std::mem::replace(&mut *offered, rest).into_iter().collect()
        };
        if ids.is_empty() {
            return Ok(());
        }
        let result = self
            .with_client("acknowledging", async |c| {
                c.execute(&self.ack_sql, &[&ids]).await
            })
            .await;
        if result.is_err() {
            // Unknown whether the delete committed: offering them again is
            // safe (the feed ignores what it holds), forgetting them is too
            // (a later `pending` returns any that are still there).
            self.offered
                .lock()
                .expect("offered ids")
                .extend(ids.iter().copied());
        }
        result.map(|_| ())
    }
}

/// Keeps a `LISTEN` connection up until `shutdown`, reconnecting with backoff.
async fn listen_loop(config: Config, channel: String, nudge: Arc<Notify>, mut shutdown: Shutdown) {
    const BACKOFF_MIN: Duration = Duration::from_millis(100);
    const BACKOFF_MAX: Duration = Duration::from_secs(5);
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = std::time::Instant::now();
        let e = tokio::select! {
            e = listen_once(&config, &channel, &nudge) => e,
            _ = shutdown.wait() => return,
        };
        tracing::warn!(
            "outbox LISTEN {channel}: {e}; reconnecting in {backoff:?} (polling meanwhile)"
        );
        if started.elapsed() > BACKOFF_MAX * 2 {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// How often an idle `LISTEN` connection is checked, so a silently dead
/// one (no FIN from a crashed host) is replaced.
const LISTEN_HEALTH_EVERY: Duration = Duration::from_secs(10);

/// One `LISTEN` session; runs until its connection fails and returns why.
async fn listen_once(config: &Config, channel: &str, nudge: &Notify) -> SourceError {
    let (client, mut conn) = match config.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => return unavailable("connecting for LISTEN", &e),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Drives the connection and hands notifications (and its end) over.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if tx.send(Ok(())).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = tx.send(Err(e));
                    return;
                }
                None => return,
            }
        }
    });
    // Dropped on return or when the caller stops waiting (shutdown).
    let _abort = AbortOnDrop(driver);
    if let Err(e) = client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
        return unavailable("LISTEN", &e);
    }
    tracing::debug!("outbox listening on {channel}");
    // Commits made while nobody listened: look once now.
    nudge.notify_one();
    let mut health = tokio::time::interval(LISTEN_HEALTH_EVERY);
    health.reset();
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(Ok(())) => nudge.notify_one(),
                Some(Err(e)) => return unavailable("LISTEN connection", &e),
                None => return SourceError::Unavailable("postgres outbox: LISTEN connection closed".into()),
            },
            _ = health.tick() => {
                match tokio::time::timeout(LISTEN_HEALTH_EVERY, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return unavailable("LISTEN health check", &e),
                    Err(_) => return SourceError::Unavailable("postgres outbox: LISTEN connection stopped answering".into()),
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        assert!(Outbox::new("spoke").is_ok());
        assert_eq!(Outbox::new("spoke").unwrap().channel(), "spoke_outbox");
        for bad in [
            "",
            "Spoke",
            "a-b",
            "x\"; DROP",
            &"s".repeat(MAX_SCHEMA_LEN + 1),
        ] {
            let e = Outbox::new(bad).unwrap_err().to_string();
            assert!(e.contains("lowercase identifier"), "{bad}: {e}");
        }
        assert!(Outbox::new(&"s".repeat(MAX_SCHEMA_LEN)).is_ok());
    }
}
