//! `spoke hub`, `spoke agent` and `spoke relay`: the long-running roles.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use spoke::agent::{http as agent_http, Agent};
use spoke::config::{
    AgentConfig, DeploymentConfig, FeedConfig, HubConfig, HubFeedConfig, JetStreamConfig,
    SecretSource, StoreConfig,
};
use spoke::copy::postgres::PostgresCopyStore;
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::copy::CopyStore;
use spoke::feed::http::HubClient;
use spoke::feed::jetstream::JetStreamFeed;
use spoke::feed::sqlite::SqliteFeed;
use spoke::feed::{Feed, Publisher};
use spoke::hub::FeedBackend;
use spoke::hub::{self, Tokens};
use spoke::outbox::postgres::{Outbox, PostgresOutbox};
use spoke::outbox::relay::Relay;
use spoke::outbox::sqlite::SqliteOutbox;
use spoke::outbox::Source;
use spoke::registry::SchemaRegistry;
use spoke::shutdown::{shutdown_channel, Shutdown};
use spoke::tls;
use spoke_core::Manifest;

use super::runtime;
use crate::{AgentArgs, HubArgs, RelayArgs};

fn load_manifest(path: &std::path::Path) -> anyhow::Result<Manifest> {
    Manifest::load(path).map_err(|e| anyhow!("{e}"))
}

/// Fires the shutdown on Ctrl-C or SIGTERM.
fn on_signal(trigger: spoke::shutdown::ShutdownTrigger) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        trigger.fire();
    });
}

fn hub_config(args: HubArgs) -> anyhow::Result<HubConfig> {
    if let Some(config) = args.config {
        return Ok(DeploymentConfig::load(&config)?.hub()?.clone());
    }
    match (args.manifest, args.listen, args.data) {
        (Some(manifest), Some(listen), Some(data_dir)) => Ok(HubConfig {
            manifest,
            listen,
            data_dir,
            tokens: BTreeMap::new(),
            tls: None,
            feed: match args.jetstream {
                None => HubFeedConfig::Embedded,
                Some(url) => HubFeedConfig::JetStream(jetstream_flag(url)),
            },
        }),
        _ => Err(anyhow!(
            "give --config FILE, or --manifest M --listen ADDR --data DIR"
        )),
    }
}

pub fn hub(args: HubArgs) -> anyhow::Result<ExitCode> {
    let cfg = hub_config(args)?;
    let manifest = Arc::new(load_manifest(&cfg.manifest)?);
    let tokens = Tokens::read(&cfg.tokens, "hub.tokens")?;
    let tls = cfg.tls.as_ref().map(tls::server_config).transpose()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    runtime()?.block_on(async move {
        let feed: Arc<dyn FeedBackend> = match &cfg.feed {
            HubFeedConfig::Embedded => {
                Arc::new(SqliteFeed::open(&cfg.data_dir.join("hub.db"), &manifest)?)
            }
            HubFeedConfig::JetStream(j) => {
                Arc::new(JetStreamFeed::connect(j.options("hub.jetstream")?, &manifest).await?)
            }
        };
        let mut registry = SchemaRegistry::open(
            Some(&cfg.data_dir),
            manifest.clone(),
            spoke::clock::now_ms(),
        )?;
        if let Some(c) = feed.catalog() {
            registry = registry.with_catalog(c.clone())?;
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        eprintln!(
            "spoke hub listening on {}://{} ({} datasets, data in {}{})",
            tls::scheme(cfg.tls.as_ref()),
            listener.local_addr()?,
            manifest.datasets.len(),
            cfg.data_dir.display(),
            if tokens.is_empty() {
                "; open: no tokens configured"
            } else {
                ""
            }
        );
        let (trigger, shutdown) = shutdown_channel();
        on_signal(trigger);
        tls::serve(
            listener,
            tls,
            hub::router_with_registry(feed, manifest, tokens, Arc::new(registry)),
            shutdown.signal(),
        )
        .await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn agent_config(args: AgentArgs) -> anyhow::Result<AgentConfig> {
    if let Some(config) = args.config {
        return Ok(DeploymentConfig::load(&config)?.agent()?.clone());
    }
    match (args.manifest, args.consumer, args.listen, args.data) {
        (Some(manifest), Some(consumer), Some(listen), Some(data_dir)) => Ok(AgentConfig {
            manifest,
            consumer,
            listen,
            feed: match (args.hub, args.jetstream) {
                (Some(hub), None) => FeedConfig::Hub {
                    url: spoke::config::check_url("--hub", &hub)?,
                    token: token_flags(args.token_env, args.token_file),
                    tls_ca: args.tls_ca,
                },
                (None, Some(url)) => FeedConfig::JetStream(jetstream_flag(url)),
                _ => return Err(anyhow!("give exactly one of --hub URL or --jetstream URL")),
            },
            store: match args.postgres {
                None => StoreConfig::Sqlite(data_dir.join("copies.db")),
                Some(url) => StoreConfig::Postgres { url, password: None, schema: spoke::copy::postgres::DEFAULT_SCHEMA.to_owned(), readers: Vec::new() },
            },
            data_dir,
            // snapshot_sql sources need connections: only a config file gives them.
            owner_postgres: BTreeMap::new(),
            api_tokens: BTreeMap::new(),
            tls: None,
        }),
        _ => Err(anyhow!("give --config FILE, or --manifest M --consumer NAME (--hub URL | --jetstream URL) --listen ADDR --data DIR")),
    }
}

/// Runs an agent until `shutdown`; used by the CLI and by in-process wiring.
pub async fn run_agent(cfg: AgentConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let manifest = Arc::new(load_manifest(&cfg.manifest)?);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let store = open_store(&cfg.store).await?;
    let (feed, feed_name): (Arc<dyn Feed>, String) = match &cfg.feed {
        FeedConfig::Hub { url, token, tls_ca } => (
            Arc::new(hub_client(
                url,
                token.as_ref(),
                tls_ca.as_deref(),
                "agent.token",
            )?),
            format!("hub {url}"),
        ),
        FeedConfig::JetStream(j) => (
            Arc::new(JetStreamFeed::connect(j.options("agent.jetstream")?, &manifest).await?),
            format!("jetstream {}", j.url),
        ),
    };
    let api_tokens = Tokens::read(&cfg.api_tokens, "agent.api_tokens")?;
    let tls = cfg.tls.as_ref().map(tls::server_config).transpose()?;
    let agent = Arc::new(with_snapshot_sql(
        Agent::new(manifest.clone(), &cfg.consumer, feed, store)?,
        &manifest,
        &cfg,
    )?);
    agent.ensure_copies().await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    eprintln!(
        "spoke agent for {} listening on {}://{} ({feed_name}, copies in {}{})",
        cfg.consumer,
        tls::scheme(cfg.tls.as_ref()),
        listener.local_addr()?,
        describe_store(&cfg.store),
        if api_tokens.is_empty() {
            "; API open: no api_tokens configured"
        } else {
            ""
        }
    );
    let server = tokio::spawn(tls::serve(
        listener,
        tls,
        agent_http::router(agent.clone(), api_tokens),
        shutdown.clone().signal(),
    ));
    agent.run(shutdown).await?;
    server.await??;
    Ok(())
}

/// Gives every `scheduled` subscription with `snapshot_sql` its owner's
/// PostgreSQL from `[agent.owner_postgres.<dataset>]`.
fn with_snapshot_sql(
    mut agent: Agent,
    manifest: &Manifest,
    cfg: &AgentConfig,
) -> anyhow::Result<Agent> {
    use spoke::scheduled::postgres::PostgresSnapshot;
    use spoke_core::manifest::OwnerSnapshot;
    for sub in manifest.subscriptions_of(&cfg.consumer) {
        let Some(OwnerSnapshot::Sql(sql)) = &sub.snapshot else {
            continue;
        };
        let path = format!("agent.owner_postgres.{}", sub.dataset);
        let owner = cfg.owner_postgres.get(&sub.dataset).ok_or_else(|| {
            anyhow!("{path}: missing: {}→{} reads its owner with snapshot_sql; add [{path}] with postgres = \"host=… dbname=…\" (and password = {{ env = \"…\" }}) to the deployment config", cfg.consumer, sub.dataset)
        })?;
        let ds = &manifest.datasets[&sub.dataset];
        let projection = spoke_core::Projection::new(&ds.schema, &sub.fields)
            .ok_or_else(|| anyhow!("{}: the projection does not fit the schema", sub.dataset))?;
        let source =
            PostgresSnapshot::new(&sub.dataset, owner.conninfo(&path)?, &path, sql, projection);
        agent = agent.with_snapshot_source(&sub.dataset, Arc::new(source));
    }
    for dataset in cfg.owner_postgres.keys() {
        let used = manifest
            .subscription(&cfg.consumer, dataset)
            .is_some_and(|s| matches!(s.snapshot, Some(OwnerSnapshot::Sql(_))));
        if !used {
            eprintln!("warning: agent.owner_postgres.{dataset}: {} has no scheduled subscription to {dataset} with snapshot_sql; the connection is not used", cfg.consumer);
        }
    }
    Ok(agent)
}

/// A token source from the `--token-env VAR` / `--token-file PATH` flags.
fn token_flags(env: Option<String>, file: Option<std::path::PathBuf>) -> Option<SecretSource> {
    env.map(SecretSource::Env).or(file.map(SecretSource::File))
}

/// The HTTP client of a hub: its token read from its source (`what` names
/// the source in errors), and `tls_ca` trusted when given.
pub fn hub_client(
    url: &str,
    token: Option<&SecretSource>,
    tls_ca: Option<&std::path::Path>,
    what: &str,
) -> anyhow::Result<HubClient> {
    let token = token.map(|t| t.read(what)).transpose()?;
    Ok(match tls_ca {
        None => HubClient::new(url, token),
        Some(ca) => HubClient::with_tls_ca(url, token, ca)?,
    })
}

/// Opens the copy store a config names.
pub async fn open_store(cfg: &StoreConfig) -> anyhow::Result<Arc<dyn CopyStore>> {
    Ok(match cfg {
        StoreConfig::Sqlite(path) => Arc::new(SqliteCopyStore::open(path)?),
        StoreConfig::Postgres { .. } => Arc::new(
            PostgresCopyStore::open(
                cfg.postgres_options()?
                    .ok_or_else(|| anyhow!("not a postgres store"))?,
            )
            .await?,
        ),
    })
}

/// A store's location for messages, without secrets.
pub fn describe_store(cfg: &StoreConfig) -> String {
    match cfg {
        StoreConfig::Sqlite(path) => path.display().to_string(),
        StoreConfig::Postgres { schema, .. } => format!("postgres schema {schema}"),
    }
}

/// JetStream settings from a bare `--jetstream URL` flag.
fn jetstream_flag(url: String) -> JetStreamConfig {
    JetStreamConfig {
        url,
        replicas: 1,
        memory: false,
        stream_prefix: None,
        subject_prefix: None,
        user: None,
        password: None,
    }
}

pub fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let cfg = agent_config(args)?;
    runtime()?.block_on(async move {
        let (trigger, shutdown) = shutdown_channel();
        on_signal(trigger);
        run_agent(cfg, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn relay(args: RelayArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let (source, listener, origin): (Arc<dyn Source>, Option<Arc<PostgresOutbox>>, String) =
            match (&args.outbox, &args.outbox_postgres) {
                (Some(_), None) if args.outbox_schema.is_some() => {
                    return Err(anyhow!("--outbox-schema goes with --outbox-postgres"))
                }
                (Some(path), None) => (
                    Arc::new(SqliteOutbox::open(path)?),
                    None,
                    path.display().to_string(),
                ),
                (None, Some(url)) => {
                    let outbox = Outbox::new(
                        args.outbox_schema
                            .as_deref()
                            .unwrap_or(spoke::outbox::postgres::DEFAULT_SCHEMA),
                    )?;
                    let origin = format!("the PostgreSQL outbox in schema {}", outbox.schema());
                    let source = Arc::new(PostgresOutbox::connect(url, outbox).await?);
                    (source.clone(), Some(source), origin)
                }
                _ => {
                    return Err(anyhow!(
                        "give exactly one of --outbox DB or --outbox-postgres CONNINFO"
                    ))
                }
            };
        let (publisher, target): (Arc<dyn Publisher>, String) =
            match (args.hub, args.jetstream, args.manifest) {
                (Some(hub), None, _) => {
                    let url = spoke::config::check_url("--hub", &hub)?;
                    let token = token_flags(args.token_env, args.token_file);
                    let what = if token
                        .as_ref()
                        .is_some_and(|t| matches!(t, SecretSource::File(_)))
                    {
                        "--token-file"
                    } else {
                        "--token-env"
                    };
                    (
                        Arc::new(hub_client(
                            &url,
                            token.as_ref(),
                            args.tls_ca.as_deref(),
                            what,
                        )?),
                        url,
                    )
                }
                (None, Some(url), Some(manifest)) => {
                    let manifest = load_manifest(&manifest)?;
                    (
                        Arc::new(
                            JetStreamFeed::connect(
                                jetstream_flag(url.clone()).options("--jetstream")?,
                                &manifest,
                            )
                            .await?,
                        ),
                        url,
                    )
                }
                (None, Some(_), None) => {
                    return Err(anyhow!(
                "--jetstream needs --manifest (the relay validates changes against the schemas)"
            ))
                }
                _ => return Err(anyhow!("give exactly one of --hub URL or --jetstream URL")),
            };
        eprintln!("spoke relay forwarding {origin} to {target}");
        let (trigger, shutdown) = shutdown_channel();
        on_signal(trigger);
        let relay = Relay::new(source, publisher);
        if let Some(pg) = listener {
            pg.listen(relay.nudger(), shutdown.clone());
        }
        relay.run(shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}
