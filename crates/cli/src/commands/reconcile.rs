//! `spoke reconcile --config FILE [DATASET] [--json]`: compare each copy of
//! the config's agent with its feed by digest and repair what differs.
//!
//! It opens the agent's copy store and feed itself (the agent may keep
//! running: writes are serialised by the store and go through the apply
//! rule), records each run in the store so the agent's status and metrics
//! show it, and draws a progress bar on stderr when stderr is a terminal.
//! Exit 0 when every copy was reconciled, 2 when a copy holds records newer
//! than its source (left alone: they need a person), 1 on errors.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use spoke::config::{DeploymentConfig, FeedConfig};
use spoke::copy::CopySpec;
use spoke::feed::jetstream::JetStreamFeed;
use spoke::feed::Feed;
use spoke::reconcile::{KeyState, Progress, ReconcileOptions, ReconcileReport, Reconciler};
use spoke_core::Manifest;

use super::runtime;

/// How many repairs the text output lists per copy (`--json` lists up to 1,000).
const LISTED: usize = 50;

fn bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} {msg:28} [{bar:30}] {pos}/{len} ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn state(s: Option<KeyState>) -> String {
    match s {
        None => "-".into(),
        Some(KeyState {
            version,
            deleted: true,
        }) => format!("v{version} (tombstone)"),
        Some(KeyState { version, .. }) => format!("v{version}"),
    }
}

fn print_text(r: &ReconcileReport, owner: &str) {
    let ms = r.duration_ms;
    if r.in_sync_before {
        println!(
            "{}: in sync with {owner}'s feed (digests equal; checked in {ms:.0} ms)",
            r.dataset
        );
        return;
    }
    println!(
        "{}: {} of {} buckets differed ({} entries in the copy, {} in the source); repaired {} in {ms:.0} ms: {} missing, {} stale, {} extra{}",
        r.dataset,
        r.buckets_differing,
        r.buckets_total,
        r.entries_copy,
        r.entries_source,
        r.repaired.total(),
        r.repaired.missing,
        r.repaired.stale,
        r.repaired.extra,
        if r.in_sync_after { "; now in sync" } else { "" },
    );
    for rep in r.repairs.iter().take(LISTED) {
        let what = match rep.source {
            None => "removed".to_owned(),
            Some(s) => format!("→ {}", state(Some(s))),
        };
        println!(
            "  {:8} {:24} {:18} {what}",
            rep.kind.as_str(),
            rep.key,
            state(rep.copy)
        );
    }
    let listed = r.repairs.len().min(LISTED) as u64;
    if r.repaired.total() > listed || !r.repairs_complete {
        println!(
            "  … {} more (all of them with --json, up to 1,000)",
            r.repaired.total().saturating_sub(listed)
        );
    }
    if r.collected_tombstones > 0 {
        println!(
            "  {} source tombstones past the horizon were already collected by the copy (left as is)",
            r.collected_tombstones
        );
    }
    for a in &r.ahead {
        println!(
            "  ahead    {:24} {:18} source has {} — left alone: the apply rule never rolls back; if the source was restored from a backup, rebuild the copy",
            a.key,
            state(Some(a.copy)),
            state(Some(a.source))
        );
    }
    if !r.in_sync_after && r.ahead.is_empty() {
        println!("  (digests still differ: changes arrived meanwhile; the agent applies them)");
    }
}

pub fn run(config: &Path, dataset: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = DeploymentConfig::load(config)?.agent()?.clone();
    let manifest = Manifest::load(&cfg.manifest).map_err(|e| anyhow!("{e}"))?;
    let subs: Vec<_> = manifest
        .subscriptions_of(&cfg.consumer)
        .filter(|s| s.strategy.follows_feed())
        .collect();
    let chosen: Vec<_> = match dataset {
        None => subs.clone(),
        Some(d) => subs.iter().filter(|s| s.dataset == d).cloned().collect(),
    };
    if chosen.is_empty() {
        if let Some(s) = dataset.and_then(|d| manifest.subscription(&cfg.consumer, d)) {
            if s.strategy == spoke_core::manifest::Strategy::Scheduled {
                return Err(anyhow!(
                    "{} keeps {} with strategy scheduled: every refresh already compares the copy's digest with the owner's snapshot and repairs what differs (every {}); see `spoke status`",
                    cfg.consumer,
                    s.dataset,
                    s.interval.map_or("interval".to_owned(), |i| i.to_string())
                ));
            }
        }
        let names: Vec<&str> = subs.iter().map(|s| s.dataset.as_str()).collect();
        return Err(anyhow!(
            "{} keeps no copy of {}; its copies: {}",
            cfg.consumer,
            dataset.unwrap_or("any dataset"),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ));
    }
    runtime()?.block_on(async {
        let store = super::serve::open_store(&cfg.store).await?;
        let feed: Arc<dyn Feed> = match &cfg.feed {
            FeedConfig::Hub { url, token, tls_ca } => Arc::new(super::serve::hub_client(
                url,
                token.as_ref(),
                tls_ca.as_deref(),
                "agent.token",
            )?),
            FeedConfig::JetStream(j) => {
                Arc::new(JetStreamFeed::connect(j.options("agent.jetstream")?, &manifest).await?)
            }
        };
        let mut reports = Vec::new();
        let mut ahead = false;
        for sub in chosen {
            let ds = manifest
                .datasets
                .get(&sub.dataset)
                .ok_or_else(|| anyhow!("dataset {} is not in the manifest", sub.dataset))?;
            let spec = CopySpec::of(&manifest, sub).ok_or_else(|| {
                anyhow!("the projection of {} does not match its schema", ds.name)
            })?;
            // Idempotent; builds the digest of a copy made before digests.
            store.ensure_copy(&spec).await?;
            if store.cursor(&ds.name).await?.position.is_none() {
                if !json {
                    println!(
                        "{}: not bootstrapped yet (the agent copies it first); skipped",
                        ds.name
                    );
                }
                continue;
            }
            let bar = bar();
            bar.set_prefix(ds.name.clone());
            let progress = {
                let bar = bar.clone();
                move |p: Progress| match p {
                    Progress::Comparing { level } => {
                        bar.set_message(format!("comparing digests (level {level})"))
                    }
                    Progress::Buckets { done, total } => {
                        bar.set_message("comparing differing buckets");
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    }
                    Progress::Repairing { done, total } => {
                        bar.set_message("repairing");
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    }
                }
            };
            let report = Reconciler::new(feed.as_ref(), store.as_ref(), &spec)
                .with_options(ReconcileOptions {
                    tombstone_horizon_ms: ds.tombstone_horizon.as_millis(),
                    ..ReconcileOptions::default()
                })
                .run(&progress)
                .await
                .with_context(|| format!("reconciling the copy of {}", ds.name))?;
            bar.finish_and_clear();
            ahead |= !report.ahead.is_empty();
            if !json {
                print_text(&report, &ds.owner);
            }
            reports.push(report);
        }
        if json {
            println!(
                "{}",
                serde_json::json!({ "consumer": cfg.consumer, "copies": reports })
            );
        }
        Ok(if ahead {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        })
    })
}
