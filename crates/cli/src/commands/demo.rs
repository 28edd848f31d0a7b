//! `spoke demo`: the shop example, narrated (the steps live in `spoke_shop::demo`).

use std::process::ExitCode;

use tracing::Dispatch;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Print the report as JSON on stdout; the narration then goes to stderr.
    #[arg(long)]
    pub json: bool,
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
    let demo = || {
        runtime.block_on(async {
            if args.json {
                spoke_shop::demo::run(&mut std::io::stderr()).await
            } else {
                spoke_shop::demo::run(&mut std::io::stdout()).await
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
