//! `spoke hub`, `spoke agent` and `spoke relay`: the long-running roles.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use spoke::agent::{http as agent_http, Agent};
use spoke::config::{AgentConfig, DeploymentConfig, HubConfig, SecretSource, StoreConfig};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::feed::http::HubClient;
use spoke::feed::sqlite::SqliteFeed;
use spoke::hub::{self, Tokens};
use spoke::outbox::relay::Relay;
use spoke::outbox::sqlite::SqliteOutbox;
use spoke::shutdown::{shutdown_channel, Shutdown};
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
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
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
        (Some(manifest), Some(listen), Some(data_dir)) => Ok(HubConfig { manifest, listen, data_dir, tokens: BTreeMap::new() }),
        _ => Err(anyhow!("give --config FILE, or --manifest M --listen ADDR --data DIR")),
    }
}

pub fn hub(args: HubArgs) -> anyhow::Result<ExitCode> {
    let cfg = hub_config(args)?;
    let manifest = Arc::new(load_manifest(&cfg.manifest)?);
    let tokens: BTreeMap<String, String> = cfg.tokens.iter().map(|(svc, src)| Ok((svc.clone(), src.read(&format!("hub.tokens.{svc}"))?))).collect::<anyhow::Result<_>>()?;
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    runtime()?.block_on(async move {
        let feed = Arc::new(SqliteFeed::open(&cfg.data_dir.join("hub.db"), &manifest)?);
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
        eprintln!("spoke hub listening on http://{} ({} datasets, data in {})", listener.local_addr()?, manifest.datasets.len(), cfg.data_dir.display());
        let (trigger, shutdown) = shutdown_channel();
        on_signal(trigger);
        hub::serve(listener, hub::router(feed, manifest, Tokens::new(&tokens)), shutdown.signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn agent_config(args: AgentArgs) -> anyhow::Result<AgentConfig> {
    if let Some(config) = args.config {
        return Ok(DeploymentConfig::load(&config)?.agent()?.clone());
    }
    match (args.manifest, args.consumer, args.hub, args.listen, args.data) {
        (Some(manifest), Some(consumer), Some(hub), Some(listen), Some(data_dir)) => Ok(AgentConfig {
            manifest,
            consumer,
            listen,
            hub: spoke::config::check_url("--hub", &hub)?,
            store: StoreConfig::Sqlite(data_dir.join("copies.db")),
            data_dir,
            token: args.token_env.map(SecretSource::Env),
        }),
        _ => Err(anyhow!("give --config FILE, or --manifest M --consumer NAME --hub URL --listen ADDR --data DIR")),
    }
}

/// Runs an agent until `shutdown`; used by the CLI and by in-process wiring.
pub async fn run_agent(cfg: AgentConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let manifest = Arc::new(load_manifest(&cfg.manifest)?);
    let token = cfg.token.as_ref().map(|t| t.read("agent.token")).transpose()?;
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let StoreConfig::Sqlite(path) = &cfg.store;
    let store = Arc::new(SqliteCopyStore::open(path)?);
    let feed = Arc::new(HubClient::new(&cfg.hub, token));
    let agent = Arc::new(Agent::new(manifest, &cfg.consumer, feed, store)?);
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    eprintln!("spoke agent for {} listening on http://{} (hub {}, copies in {})", cfg.consumer, listener.local_addr()?, cfg.hub, path.display());
    let server = tokio::spawn(hub::serve(listener, agent_http::router(agent.clone()), shutdown.clone().signal()));
    agent.run(shutdown).await?;
    server.await??;
    Ok(())
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
    let hub_url = spoke::config::check_url("--hub", &args.hub)?;
    let token = args.token_env.map(|v| SecretSource::Env(v).read("--token-env")).transpose()?;
    runtime()?.block_on(async move {
        let source = Arc::new(SqliteOutbox::open(&args.outbox)?);
        let publisher = Arc::new(HubClient::new(&hub_url, token));
        eprintln!("spoke relay forwarding {} to {hub_url}", args.outbox.display());
        let (trigger, shutdown) = shutdown_channel();
        on_signal(trigger);
        Relay::new(source, publisher).run(shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}
