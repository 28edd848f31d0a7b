//! `spoke demo`: the shop example, narrated (the steps live in `spoke_shop::demo`).
//!
//! `spoke demo` runs it on the embedded default; `spoke demo --distributed`
//! on PostgreSQL (copies and orders; Catalog's products captured by CDC) and
//! NATS JetStream (the feed), with
//! names unique to the run that are removed at the end.

use std::process::ExitCode;

use tracing::Dispatch;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Print the report as JSON on stdout; the narration then goes to stderr.
    #[arg(long)]
    pub json: bool,
    /// Run on the distributed backends: Order Service's orders and its copy
    /// in PostgreSQL, the feed in NATS JetStream, no hub.
    #[arg(long)]
    pub distributed: bool,
    /// PostgreSQL for --distributed (a role that may create roles and schemas).
    #[arg(long, value_name = "URL", requires = "distributed", default_value = spoke_shop::demo::shop::DEFAULT_POSTGRES)]
    pub postgres: String,
    /// NATS with JetStream for --distributed.
    #[arg(long, value_name = "URL", requires = "distributed", default_value = spoke_shop::demo::shop::DEFAULT_NATS)]
    pub nats: String,
    /// Catalog's PostgreSQL for --distributed, with wal_level=logical (a role
    /// that may create schemas, publications and replication slots); by
    /// default the demo starts a private server with initdb.
    #[arg(long, value_name = "URL", requires = "distributed")]
    pub catalog_postgres: Option<String>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // The demo stops the hub on purpose, so the agent and the relay log a
    // retry warning every few hundred milliseconds; the narration reports
    // those errors itself. Unless SPOKE_LOG asks for logs, silence them on
    // the demo's threads so they do not interleave with the narration.
    let quiet = std::env::var_os("SPOKE_LOG").is_none();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if quiet {
        // A runtime thread keeps this default for its whole life.
        builder.on_thread_start(|| {
            std::mem::forget(tracing::dispatcher::set_default(&Dispatch::none()))
        });
    }
    let runtime = builder.build()?;
    let backends = args.distributed.then(|| spoke_shop::demo::Backends {
        postgres: args.postgres.clone(),
        nats: args.nats.clone(),
        catalog_postgres: args.catalog_postgres.clone(),
    });
    let demo = || {
        runtime.block_on(async {
            let mut stdout = std::io::stdout();
            let mut stderr = std::io::stderr();
            let out: &mut (dyn std::io::Write + Send) =
                if args.json { &mut stderr } else { &mut stdout };
            match backends {
                None => spoke_shop::demo::run(out).await,
                Some(b) => spoke_shop::demo::run_distributed(out, b).await,
            }
        })
    };
    let report = if quiet {
        tracing::dispatcher::with_default(&Dispatch::none(), demo)?
    } else {
        demo()?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(if report.all_held() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
