//! The `spoke` command. It parses flags, builds configuration and wires the
//! library's parts together; every decision lives in the `spoke` and
//! `spoke-core` crates.

mod commands;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "spoke",
    version,
    about = "Managed, measured, read-only local copies of other services' data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the shop example end to end on the embedded default and narrate it.
    Demo(commands::demo::DemoArgs),
    /// Validate a manifest against every rule: exit 0 when valid (warnings allowed),
    /// 1 with one `file:line: problem (fix: hint)` per line otherwise.
    Check {
        manifest: PathBuf,
        /// Print problems as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Advise per consumer field: duplicate, call the owner or snapshot, with the
    /// reason; and each request path's availability with synchronous calls vs copies.
    Advise {
        manifest: PathBuf,
        /// Print the advice as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the hub: the owners' feeds over HTTP, kept in an embedded store.
    Hub(HubArgs),
    /// Run an agent: keep one consumer's copies in sync and serve them.
    Agent(AgentArgs),
    /// Show one row per copy: strategy, position, lag, staleness vs budget.
    Status {
        /// Deployment config: one row per copy of its agent.
        #[arg(long, required_unless_present = "cdc", conflicts_with = "cdc")]
        config: Option<PathBuf>,
        /// A `spoke cdc` config: the slot's retained WAL, lag and snapshot progress.
        #[arg(long)]
        cdc: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Compare each copy with its feed by digest and repair what differs: fetch
    /// missing and newer records, remove what the source does not have (never
    /// rolls a record back). Exit 2 when a copy holds records newer than its source.
    /// With --against-owner: compare feeds with their owner's PostgreSQL rows
    /// instead and report the drift (exit 1 on drift; nothing is changed).
    Reconcile {
        /// Deployment config: the copies of its agent, its store and its feed
        /// (with --against-owner: its snapshot_sql datasets).
        #[arg(long, required_unless_present = "cdc", conflicts_with = "cdc")]
        config: Option<PathBuf>,
        /// With --against-owner: a `spoke cdc` config, whose tables are
        /// compared with the feed they are captured into.
        #[arg(long, requires = "against_owner")]
        cdc: Option<PathBuf>,
        /// Only this dataset.
        dataset: Option<String>,
        /// Compare the feed with the owner's PostgreSQL rows (by digest when
        /// the owner keeps versions, by presence when versions are commit LSNs).
        #[arg(long)]
        against_owner: bool,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Changes a copy could not hold (a projected field missing or retyped by
    /// the owner), kept aside with their reason: list them, or replay them once
    /// they fit. Exit 1 from replay while any still does not fit.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Forward an SQLite or PostgreSQL outbox to a hub or JetStream (a sidecar for owners not linking the library).
    Relay(RelayArgs),
    /// Capture an owner's PostgreSQL tables from the WAL (logical replication) into its feed.
    Cdc(commands::cdc::CdcArgs),
    /// Measure Spoke on this machine.
    Bench(commands::bench::BenchArgs),
    /// Print the nats-server `authorization` block that enforces the manifest's
    /// ownership in NATS (each service's password from SPOKE_NATS_PASSWORD_<SERVICE>).
    NatsConfig {
        manifest: PathBuf,
        /// Prefix of stream names, as in the JetStream feed settings.
        #[arg(long, default_value = "SPOKE")]
        stream_prefix: String,
        /// Prefix of subjects, as in the JetStream feed settings.
        #[arg(long, default_value = "spoke")]
        subject_prefix: String,
    },
}

#[derive(Subcommand)]
enum QuarantineAction {
    /// The held changes of each copy, oldest first, with why each was held.
    List {
        /// Deployment config: the copies of its agent and their store.
        #[arg(long)]
        config: PathBuf,
        /// Only this dataset's copy.
        dataset: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Apply the held changes that fit the config's projections now (never
    /// rolling a record back) and forget them; report the ones that still do not.
    Replay {
        #[arg(long)]
        config: PathBuf,
        dataset: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct HubArgs {
    /// Deployment config file (uses its [hub] section).
    #[arg(long, conflicts_with_all = ["manifest", "listen", "data"])]
    pub config: Option<PathBuf>,
    #[arg(long, requires_all = ["listen", "data"])]
    pub manifest: Option<PathBuf>,
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Keep the feeds in NATS JetStream at this URL instead of the embedded store.
    #[arg(long)]
    pub jetstream: Option<String>,
}

#[derive(Args)]
pub struct AgentArgs {
    /// Deployment config file (uses its [agent] section).
    #[arg(long, conflicts_with_all = ["manifest", "consumer", "hub", "jetstream", "listen", "data"])]
    pub config: Option<PathBuf>,
    #[arg(long, requires_all = ["consumer", "listen", "data"])]
    pub manifest: Option<PathBuf>,
    #[arg(long)]
    pub consumer: Option<String>,
    /// The hub's URL, e.g. http://127.0.0.1:7070.
    #[arg(long, conflicts_with = "jetstream")]
    pub hub: Option<String>,
    /// Read the feeds from NATS JetStream at this URL instead of a hub.
    #[arg(long)]
    pub jetstream: Option<String>,
    /// Keep the copies in this PostgreSQL database (connection string) instead of SQLite.
    #[arg(long)]
    pub postgres: Option<String>,
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Environment variable holding this consumer's hub token.
    #[arg(long, conflicts_with = "token_file")]
    pub token_env: Option<String>,
    /// File holding this consumer's hub token (tokens never go on the command line).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https:// hub.
    #[arg(long, requires = "hub")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Args)]
pub struct RelayArgs {
    /// The owner's SQLite database holding the spoke_outbox table.
    #[arg(
        long,
        required_unless_present = "outbox_postgres",
        conflicts_with = "outbox_postgres"
    )]
    pub outbox: Option<PathBuf>,
    /// The owner's PostgreSQL (connection string) holding the outbox
    /// (spoke::outbox::postgres); woken by LISTEN/NOTIFY, polled as a fallback.
    #[arg(long, value_name = "CONNINFO")]
    pub outbox_postgres: Option<String>,
    /// Schema of the PostgreSQL outbox [default: spoke].
    #[arg(long, value_name = "SCHEMA", requires = "outbox_postgres")]
    pub outbox_schema: Option<String>,
    /// The hub's URL.
    #[arg(long, conflicts_with = "jetstream")]
    pub hub: Option<String>,
    /// Publish straight into NATS JetStream at this URL.
    #[arg(long, requires = "manifest")]
    pub jetstream: Option<String>,
    /// The manifest (needed with --jetstream).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Environment variable holding the owner's hub token.
    #[arg(long, conflicts_with = "token_file")]
    pub token_env: Option<String>,
    /// File holding the owner's hub token (tokens never go on the command line).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https:// hub.
    #[arg(long, requires = "hub")]
    pub tls_ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPOKE_LOG")
                .unwrap_or_else(|_| "warn,spoke=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { manifest, json } => return commands::check::run(&manifest, json),
        Command::Advise { manifest, json } => return commands::advise::run(&manifest, json),
        Command::Demo(args) => commands::demo::run(args),
        Command::Hub(args) => commands::serve::hub(args),
        Command::Agent(args) => commands::serve::agent(args),
        Command::Status { config, cdc, json } => match (config, cdc) {
            (Some(config), _) => commands::status::run(&config, json),
            (None, Some(cdc)) => commands::status::cdc(&cdc, json),
            (None, None) => Err(anyhow::anyhow!("give --config FILE or --cdc FILE")),
        },
        Command::Reconcile {
            config,
            cdc,
            dataset,
            against_owner,
            json,
        } => {
            use commands::reconcile::{against_owner as drift, run, OwnerConfig};
            let dataset = dataset.as_deref();
            match (config, cdc, against_owner) {
                (_, Some(cdc), _) => drift(OwnerConfig::Cdc(&cdc), dataset, json),
                (Some(config), None, true) => drift(OwnerConfig::Agent(&config), dataset, json),
                (Some(config), None, false) => run(&config, dataset, json),
                (None, None, _) => Err(anyhow::anyhow!("give --config FILE or --cdc FILE")),
            }
        }
        Command::Quarantine { action } => match action {
            QuarantineAction::List {
                config,
                dataset,
                json,
            } => commands::quarantine::list(&config, dataset.as_deref(), json),
            QuarantineAction::Replay {
                config,
                dataset,
                json,
            } => commands::quarantine::run_replay(&config, dataset.as_deref(), json),
        },
        Command::Relay(args) => commands::serve::relay(args),
        Command::Cdc(args) => commands::cdc::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::NatsConfig {
            manifest,
            stream_prefix,
            subject_prefix,
        } => commands::nats_config::run(&manifest, stream_prefix, subject_prefix),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
