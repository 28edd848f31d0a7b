//! `spoke cdc`: captures an owner's PostgreSQL tables from the WAL and
//! publishes them to a hub or JetStream (the library's `spoke::cdc`).
//!
//! ```text
//!  --config FILE | flags ─▶ CdcConfig ─▶ CdcSource::run ─▶ HubClient / JetStreamFeed
//!                                          │ snapshot progress ─▶ progress bar (TTY) or log lines
//!                                          └ retained WAL, lag ─▶ log every status interval
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use spoke::cdc::file::{CdcFile, FeedTarget};
use spoke::cdc::{CdcConfig, CdcSource, SnapshotProgress, TableMapping};
use spoke::config::SecretSource;
use spoke::feed::http::HubClient;
use spoke::feed::jetstream::{JetStreamFeed, JetStreamOptions};
use spoke::feed::{Feed, Publisher};
use spoke::shutdown::shutdown_channel;
use spoke_core::Manifest;

use super::runtime;

#[derive(Args)]
pub struct CdcArgs {
    /// CDC config file (TOML; see `spoke::cdc::file`).
    #[arg(long, conflicts_with_all = ["manifest", "postgres", "datasets", "hub", "jetstream"])]
    pub config: Option<PathBuf>,
    #[arg(long, requires = "postgres")]
    pub manifest: Option<PathBuf>,
    /// The owner's database (connection string or URL).
    #[arg(long)]
    pub postgres: Option<String>,
    /// DATASET=schema.table:keycol[:versioncol], once per dataset.
    #[arg(long = "dataset", value_name = "MAPPING")]
    pub datasets: Vec<String>,
    #[arg(long, default_value = "spoke_cdc")]
    pub publication: String,
    #[arg(long, default_value = "spoke_cdc")]
    pub slot: String,
    /// The hub's URL.
    #[arg(long, conflicts_with = "jetstream")]
    pub hub: Option<String>,
    /// Publish straight into NATS JetStream at this URL.
    #[arg(long)]
    pub jetstream: Option<String>,
    /// Environment variable holding the owner's hub token.
    #[arg(long)]
    pub token_env: Option<String>,
    /// Drop the slot and its state, and publish a new snapshot (the recovery
    /// path after a lost slot).
    #[arg(long)]
    pub resnapshot: bool,
    /// Rows per snapshot chunk.
    #[arg(long)]
    pub snapshot_chunk: Option<usize>,
    /// Seconds between retained-WAL / lag log lines.
    #[arg(long)]
    pub status_every_secs: Option<u64>,
}

fn load_manifest(path: &std::path::Path) -> anyhow::Result<Manifest> {
    Manifest::load(path).map_err(|e| anyhow!("{e}"))
}

fn resolve(args: &CdcArgs) -> anyhow::Result<(PathBuf, CdcConfig, FeedTarget, Option<String>)> {
    let (manifest, mut cfg, feed, token_env) = if let Some(path) = &args.config {
        let f = CdcFile::load(path)?;
        (
            f.manifest,
            f.cdc,
            f.feed,
            f.token_env.or(args.token_env.clone()),
        )
    } else {
        let (Some(manifest), Some(postgres)) = (&args.manifest, &args.postgres) else {
            return Err(anyhow!(
                "give --config FILE, or --manifest M --postgres CONNINFO --dataset D=schema.table:key[:version] … (--hub URL | --jetstream URL)"
            ));
        };
        let tables = args
            .datasets
            .iter()
            .map(|d| TableMapping::parse_flag(d).map_err(anyhow::Error::from))
            .collect::<Result<Vec<_>, _>>()?;
        let feed = match (&args.hub, &args.jetstream) {
            (Some(h), None) => FeedTarget::Hub(h.clone()),
            (None, Some(j)) => FeedTarget::JetStream(j.clone()),
            _ => return Err(anyhow!("give exactly one of --hub URL or --jetstream URL")),
        };
        (
            manifest.clone(),
            CdcConfig::new(postgres, &args.publication, &args.slot, tables),
            feed,
            args.token_env.clone(),
        )
    };
    cfg.options.resnapshot = args.resnapshot;
    if let Some(n) = args.snapshot_chunk {
        cfg.options.snapshot_chunk = n;
    }
    if let Some(s) = args.status_every_secs {
        cfg.options.status_every = Duration::from_secs(s.max(1));
    }
    cfg.validate()?;
    Ok((manifest, cfg, feed, token_env))
}

/// A progress bar per table on a TTY; nothing otherwise (the library logs progress).
fn progress_reporter() -> Option<impl Fn(&SnapshotProgress) + Send + Sync + 'static> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bars =
        std::sync::Mutex::new(std::collections::HashMap::<String, indicatif::ProgressBar>::new());
    Some(move |p: &SnapshotProgress| {
        let mut bars = bars.lock().expect("progress bars");
        let bar = bars.entry(p.dataset.clone()).or_insert_with(|| {
            let bar = match p.rows_estimate {
                Some(n) if n > 0 => indicatif::ProgressBar::new(n),
                _ => indicatif::ProgressBar::new_spinner(),
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(format!("snapshot {} ({})", p.dataset, p.table));
            bar
        });
        if bar.length().is_some_and(|l| p.rows_done > l) {
            bar.set_length(p.rows_done);
        }
        bar.set_position(p.rows_done);
        if p.finished {
            bar.finish();
        }
    })
}

/// The feed a CDC config writes to, as a publisher and a reader (the
/// owner's token reads its own datasets), and its URL for messages.
pub async fn connect_feed(
    feed: &FeedTarget,
    token_env: Option<String>,
    manifest: &Manifest,
) -> anyhow::Result<(Arc<dyn Publisher>, Arc<dyn Feed>, String)> {
    Ok(match feed {
        FeedTarget::Hub(url) => {
            let url = spoke::config::check_url("--hub", url)?;
            let token = token_env
                .map(|v| SecretSource::Env(v).read("--token-env"))
                .transpose()?;
            let hub = Arc::new(HubClient::new(&url, token));
            (hub.clone(), hub, url)
        }
        FeedTarget::JetStream(url) => {
            let js = Arc::new(JetStreamFeed::connect(JetStreamOptions::new(url), manifest).await?);
            (js.clone(), js, url.clone())
        }
    })
}

pub fn run(args: CdcArgs) -> anyhow::Result<ExitCode> {
    let (manifest_path, cfg, feed, token_env) = resolve(&args)?;
    let manifest = Arc::new(load_manifest(&manifest_path)?);
    runtime()?.block_on(async move {
        let (publisher, reader, target) = connect_feed(&feed, token_env, &manifest).await?;
        let tables: Vec<String> = cfg
            .tables
            .iter()
            .map(|t| format!("{} ← {}", t.dataset, t.qualified()))
            .collect();
        eprintln!(
            "spoke cdc: slot {} publication {}: {} → {target}",
            cfg.slot,
            cfg.publication,
            tables.join(", ")
        );
        let mut source = CdcSource::new(cfg, manifest, publisher)?.with_reader(reader);
        if let Some(report) = progress_reporter() {
            source = source.on_progress(report);
        }
        let (trigger, shutdown) = shutdown_channel();
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
        source.run(shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}
