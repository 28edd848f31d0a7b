//! `spoke cdc`: captures an owner's PostgreSQL tables from the WAL and
//! publishes them to a hub or JetStream (the library's `spoke::cdc`).
//!
//! ```text
//!  --config FILE | flags ─▶ CdcConfig ─▶ CdcSource::run ─▶ HubClient (--tls-ca for https) / JetStreamFeed
//!                                          │ snapshot progress ─▶ progress bar (TTY) or log lines
//!                                          └ retained WAL, lag ─▶ log every status interval
//!                                                              └▶ GET /metrics (--metrics-listen)
//! ```
//!
//! With a metrics listener, a source that stops with a definite error (a
//! lost slot, a schema change, a rejected change) keeps serving `/metrics`
//! (`spoke_cdc_stopped 1`, and `spoke_cdc_slot_lost 1` for a lost slot)
//! until it is told to stop (SIGTERM, Ctrl-C), and then exits with the
//! error: restarting would not fix it, and the alert should not vanish with
//! the process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use spoke::cdc::file::{CdcFile, FeedTarget};
use spoke::cdc::{metrics, CdcConfig, CdcSource, SnapshotProgress, TableMapping};
use spoke::config::SecretSource;
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
    /// Seconds between retained-WAL / lag measurements (log lines and metrics).
    #[arg(long)]
    pub status_every_secs: Option<u64>,
    /// CA certificate (PEM) to trust for an https:// hub (overrides the
    /// config file's tls_ca).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Serve GET /metrics (Prometheus text format) on this address, e.g.
    /// 127.0.0.1:9187 (overrides the config file's metrics_listen).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

fn load_manifest(path: &std::path::Path) -> anyhow::Result<Manifest> {
    Manifest::load(path).map_err(|e| anyhow!("{e}"))
}

/// What `spoke cdc` runs, from its config file or its flags.
struct Resolved {
    manifest: PathBuf,
    cfg: CdcConfig,
    feed: FeedTarget,
    token_env: Option<String>,
    tls_ca: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
}

fn resolve(args: &CdcArgs) -> anyhow::Result<Resolved> {
    let mut r = if let Some(path) = &args.config {
        let f = CdcFile::load(path)?;
        Resolved {
            manifest: f.manifest,
            cfg: f.cdc,
            feed: f.feed,
            token_env: f.token_env.or(args.token_env.clone()),
            tls_ca: f.tls_ca,
            metrics_listen: f.metrics_listen,
        }
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
        Resolved {
            manifest: manifest.clone(),
            cfg: CdcConfig::new(postgres, &args.publication, &args.slot, tables),
            feed,
            token_env: args.token_env.clone(),
            tls_ca: None,
            metrics_listen: None,
        }
    };
    r.cfg.options.resnapshot = args.resnapshot;
    if let Some(n) = args.snapshot_chunk {
        r.cfg.options.snapshot_chunk = n;
    }
    if let Some(s) = args.status_every_secs {
        r.cfg.options.status_every = Duration::from_secs(s.max(1));
    }
    if let Some(ca) = &args.tls_ca {
        r.tls_ca = Some(ca.clone());
    }
    if let Some(addr) = args.metrics_listen {
        r.metrics_listen = Some(addr);
    }
    if r.tls_ca.is_some() && !matches!(&r.feed, FeedTarget::Hub(h) if h.starts_with("https://")) {
        return Err(anyhow!(
            "--tls-ca: set, but the hub is not an https:// URL: there is no hub certificate to check"
        ));
    }
    r.cfg.validate()?;
    Ok(r)
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
    tls_ca: Option<&std::path::Path>,
    manifest: &Manifest,
) -> anyhow::Result<(Arc<dyn Publisher>, Arc<dyn Feed>, String)> {
    Ok(match feed {
        FeedTarget::Hub(url) => {
            let url = spoke::config::check_url("--hub", url)?;
            let token = token_env.map(SecretSource::Env);
            let hub = Arc::new(super::serve::hub_client(
                &url,
                token.as_ref(),
                tls_ca,
                "--token-env",
            )?);
            (hub.clone(), hub, url)
        }
        FeedTarget::JetStream(url) => {
            let js = Arc::new(JetStreamFeed::connect(JetStreamOptions::new(url), manifest).await?);
            (js.clone(), js, url.clone())
        }
    })
}

pub fn run(args: CdcArgs) -> anyhow::Result<ExitCode> {
    let Resolved {
        manifest: manifest_path,
        cfg,
        feed,
        token_env,
        tls_ca,
        metrics_listen,
    } = resolve(&args)?;
    let manifest = Arc::new(load_manifest(&manifest_path)?);
    runtime()?.block_on(async move {
        let (publisher, reader, target) =
            connect_feed(&feed, token_env, tls_ca.as_deref(), &manifest).await?;
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
        let server = match metrics_listen {
            None => None,
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("metrics listener: cannot listen on {addr}"))?;
                eprintln!(
                    "spoke cdc: metrics at http://{}/metrics",
                    listener.local_addr()?
                );
                let router = metrics::router(source.metrics());
                Some(tokio::spawn(spoke::tls::serve(
                    listener,
                    None,
                    router,
                    shutdown.clone().signal(),
                )))
            }
        };
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
        let result = source.run(shutdown.clone()).await;
        if let Some(server) = server {
            if let Err(e) = &result {
                eprintln!(
                    "spoke cdc stopped: {e}\nspoke cdc: still serving /metrics until stopped (SIGTERM or Ctrl-C)"
                );
                shutdown.clone().signal().await;
            }
            server
                .await
                .context("metrics listener")?
                .context("metrics listener")?;
        }
        result?;
        Ok(ExitCode::SUCCESS)
    })
}
