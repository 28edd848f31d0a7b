//! `spoke reconcile --config FILE [DATASET] [--json]`: compare each copy of
//! the config's agent with its feed by digest and repair what differs.
//!
//! It opens the agent's copy store and feed itself (the agent may keep
//! running: writes are serialised by the store and go through the apply
//! rule), records each run in the store so the agent's status and metrics
//! show it, and draws a progress bar on stderr when stderr is a terminal.
//! Exit 0 when every copy was reconciled, 2 when a copy holds records newer
//! than its source (left alone: they need a person), 1 on errors.
//!
//! With `--against-owner` it checks the feed against the owner's PostgreSQL
//! instead ([`spoke::drift`]; reads only, repairs nothing): with `--config`
//! for the agent's `snapshot_sql` datasets (connections from
//! `[agent.owner_postgres.<dataset>]`), with `--cdc FILE` for the tables a
//! `spoke cdc` config captures. Exit 0 when every feed matches its owner, 1
//! on drift or errors.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use spoke::cdc::file::CdcFile;
use spoke::config::{AgentConfig, DeploymentConfig, FeedConfig};
use spoke::copy::CopySpec;
use spoke::drift::{Compare, DriftKind, DriftProgress, DriftReport, OwnerRows};
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

/// The feed an agent's config reads.
async fn agent_feed(cfg: &AgentConfig, manifest: &Manifest) -> anyhow::Result<Arc<dyn Feed>> {
    Ok(match &cfg.feed {
        FeedConfig::Hub { url, token, tls_ca } => Arc::new(super::serve::hub_client(
            url,
            token.as_ref(),
            tls_ca.as_deref(),
            "agent.token",
        )?),
        FeedConfig::JetStream(j) => {
            Arc::new(JetStreamFeed::connect(j.options("agent.jetstream")?, manifest).await?)
        }
    })
}

pub fn run(config: &Path, dataset: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = DeploymentConfig::load(config)?.agent()?.clone();
    let manifest = Manifest::load(&cfg.manifest).map_err(|e| anyhow!("{e}"))?;
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
    let chosen = super::chosen_copies(&manifest, &cfg.consumer, dataset, |s| {
        s.strategy.follows_feed()
    })?;
    runtime()?.block_on(async {
        let store = super::serve::open_store(&cfg.store).await?;
        let feed = agent_feed(&cfg, &manifest).await?;
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

/// Where `--against-owner` reads the owner's rows.
pub enum OwnerConfig<'a> {
    /// An agent's deployment config: its `snapshot_sql` datasets.
    Agent(&'a Path),
    /// A `spoke cdc` config: the tables it captures.
    Cdc(&'a Path),
}

/// `spoke reconcile … --against-owner`: each chosen dataset's feed against
/// its owner's rows. Exit 0 when all match, 1 on drift.
pub fn against_owner(
    config: OwnerConfig<'_>,
    dataset: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let (feed, checks) = match config {
            OwnerConfig::Agent(path) => agent_owner_rows(path, dataset).await?,
            OwnerConfig::Cdc(path) => cdc_owner_rows(path, dataset).await?,
        };
        let mut reports = Vec::new();
        for (owner_name, rows, ds) in checks {
            let bar = bar();
            bar.set_prefix(ds.clone());
            let progress = {
                let bar = bar.clone();
                move |p: DriftProgress| match p {
                    DriftProgress::Listing { keys } => {
                        bar.set_message(format!("listing the owner's rows ({keys})"))
                    }
                    DriftProgress::Comparing { level } => {
                        bar.set_message(format!("comparing digests (level {level})"))
                    }
                    DriftProgress::Buckets { done, total } => {
                        bar.set_message("comparing differing buckets");
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    }
                }
            };
            let report = spoke::drift::check(feed.as_ref(), &ds, &rows, &progress)
                .await
                .with_context(|| {
                    format!("checking the feed of {ds} against {owner_name}'s rows")
                })?;
            bar.finish_and_clear();
            if !json {
                print_drift(&report, &owner_name);
            }
            reports.push(report);
        }
        if json {
            println!("{}", serde_json::json!({ "datasets": reports }));
        }
        Ok(if reports.iter().all(|r| r.in_sync) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

/// (owner service, its rows, dataset) per dataset to check.
type Checks = Vec<(String, OwnerRows, String)>;

async fn agent_owner_rows(
    path: &Path,
    dataset: Option<&str>,
) -> anyhow::Result<(Arc<dyn Feed>, Checks)> {
    use spoke::scheduled::postgres::PostgresSnapshot;
    use spoke_core::manifest::OwnerSnapshot;
    let cfg = DeploymentConfig::load(path)?.agent()?.clone();
    let manifest = Manifest::load(&cfg.manifest).map_err(|e| anyhow!("{e}"))?;
    let mut checks = Checks::new();
    for sub in manifest.subscriptions_of(&cfg.consumer) {
        if dataset.is_some_and(|d| d != sub.dataset) {
            continue;
        }
        let Some(OwnerSnapshot::Sql(sql)) = &sub.snapshot else {
            continue;
        };
        let at = format!("agent.owner_postgres.{}", sub.dataset);
        let owner = cfg.owner_postgres.get(&sub.dataset).ok_or_else(|| {
            anyhow!("{}: {at}: missing: add the owner's connection (postgres = \"host=… dbname=…\") to check {} against its owner", path.display(), sub.dataset)
        })?;
        let ds = &manifest.datasets[&sub.dataset];
        // Keys and versions only: no field leaves the owner.
        let source = PostgresSnapshot::new(
            &sub.dataset,
            owner.conninfo(&at)?,
            &at,
            sql,
            spoke_core::Projection::none(),
        );
        checks.push((
            ds.owner.clone(),
            OwnerRows::snapshot(Arc::new(source)),
            sub.dataset.clone(),
        ));
    }
    if checks.is_empty() {
        return Err(anyhow!(
            "{}: {} reads no dataset{} with snapshot_sql, so the agent's config names no owner database to check against; for a table captured by CDC give --cdc FILE (its `spoke cdc` config)",
            path.display(),
            cfg.consumer,
            dataset.map(|d| format!(" {d}")).unwrap_or_default()
        ));
    }
    let feed = agent_feed(&cfg, &manifest).await?;
    Ok((feed, checks))
}

async fn cdc_owner_rows(
    path: &Path,
    dataset: Option<&str>,
) -> anyhow::Result<(Arc<dyn Feed>, Checks)> {
    let file = CdcFile::load(path)?;
    let manifest = Manifest::load(&file.manifest).map_err(|e| anyhow!("{e}"))?;
    let mut checks = Checks::new();
    for t in &file.cdc.tables {
        if dataset.is_some_and(|d| d != t.dataset) {
            continue;
        }
        let ds = manifest.datasets.get(&t.dataset).ok_or_else(|| {
            anyhow!(
                "{}: datasets.{}: not a dataset of {}",
                path.display(),
                t.dataset,
                file.manifest.display()
            )
        })?;
        let at = format!("{}: datasets.{}", path.display(), t.dataset);
        checks.push((
            ds.owner.clone(),
            OwnerRows::table(t, file.cdc.postgres.clone(), &at),
            t.dataset.clone(),
        ));
    }
    if checks.is_empty() {
        let names: Vec<&str> = file.cdc.tables.iter().map(|t| t.dataset.as_str()).collect();
        return Err(anyhow!(
            "{}: captures no table for dataset {}; it captures: {}",
            path.display(),
            dataset.unwrap_or("any"),
            names.join(", ")
        ));
    }
    let (_, feed, _) = super::cdc::connect_feed(
        &file.feed,
        file.token_env.clone(),
        file.tls_ca.as_deref(),
        &manifest,
    )
    .await?;
    Ok((feed, checks))
}

fn version(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("v{v}"))
}

fn print_drift(r: &DriftReport, owner: &str) {
    let ms = r.duration_ms;
    let presence = r.compare == Compare::PresenceOnly;
    if presence {
        println!(
            "{}: versions are commit LSNs (no version column), which the table cannot show: compared presence only, every bucket read",
            r.dataset
        );
    }
    if r.in_sync {
        println!(
            "{}: the feed matches {owner}'s rows in {} ({} rows; {} of {} buckets read; {ms:.0} ms)",
            r.dataset, r.owner, r.owner_rows, r.buckets_read, r.buckets_total
        );
        return;
    }
    let c = &r.counts;
    println!(
        "{}: DRIFT between {owner}'s rows in {} and the feed: {} keys differ ({} missing from the feed, {} stale in the feed, {} feed ahead, {} gone from the owner); {} rows, {} of {} buckets read, {ms:.0} ms",
        r.dataset,
        r.owner,
        c.total(),
        c.missing_from_feed,
        c.stale_in_feed,
        c.feed_ahead,
        c.gone_from_owner,
        r.owner_rows,
        r.buckets_read,
        r.buckets_total,
    );
    for d in r.differences.iter().take(LISTED) {
        let feed = match (d.feed_version, d.feed_tombstone) {
            (Some(v), true) => format!("v{v} (tombstone)"),
            (v, _) => version(v),
        };
        println!(
            "  {:22} {:24} owner {:10} feed {feed}",
            d.kind.as_str(),
            d.key,
            match d.kind {
                DriftKind::GoneFromOwner => "-".to_owned(),
                _ if presence => "present".to_owned(),
                _ => version(d.owner_version),
            },
        );
    }
    let listed = r.differences.len().min(LISTED) as u64;
    if c.total() > listed {
        println!("  … {} more (with --json, up to 1,000)", c.total() - listed);
    }
    println!("  (nothing was changed; republish from the owner, e.g. `spoke cdc … --resnapshot`, or fix the owner's rows; a key written during the check may differ for one run: rerun to confirm)");
}
