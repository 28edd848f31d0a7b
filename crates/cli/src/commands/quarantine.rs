//! `spoke quarantine list|replay --config FILE [DATASET]`: the changes an
//! agent's copies hold aside because they cannot hold them (see
//! `spoke::quarantine`), and applying them once they fit.
//!
//! Both open the agent's copy store directly. `replay` checks each held
//! change against the projection in the config's manifest *now*: after a
//! consumer changed its subscription's fields, restart the agent with the
//! new manifest first (it narrows the copy in place), then replay. Exit 0
//! when nothing is left held, 1 when something still does not fit.

use std::path::Path;
use std::process::ExitCode;

use anyhow::anyhow;
use spoke::config::DeploymentConfig;
use spoke::copy::{CopySpec, CopyStore, Held};
use spoke::quarantine::{replay, ReplayReport};
use spoke_core::Manifest;

use super::runtime;

/// How many held changes `list` prints per copy as text (`--json`: all).
const LISTED: usize = 50;

/// The copies of the config's agent that `dataset` selects, with specs.
fn copies(
    manifest: &Manifest,
    consumer: &str,
    dataset: Option<&str>,
) -> anyhow::Result<Vec<(CopySpec, u32)>> {
    let chosen = super::chosen_copies(manifest, consumer, dataset, |s| s.strategy.stores_copy())?;
    chosen
        .into_iter()
        .map(|s| {
            let spec = CopySpec::of(manifest, s).ok_or_else(|| {
                anyhow!("the projection of {} does not match its schema", s.dataset)
            })?;
            let version = manifest.datasets[&s.dataset].schema.version;
            Ok((spec, version))
        })
        .collect()
}

fn print_held(h: &Held) {
    let at = h
        .position
        .map_or("snapshot".to_owned(), |p| format!("position {p}"));
    println!(
        "  {:24} v{:<6} {at:16} {}",
        h.change.key, h.change.version, h.reason
    );
}

pub fn list(config: &Path, dataset: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = DeploymentConfig::load(config)?.agent()?.clone();
    let manifest = Manifest::load(&cfg.manifest).map_err(|e| anyhow!("{e}"))?;
    let chosen = copies(&manifest, &cfg.consumer, dataset)?;
    runtime()?.block_on(async {
        let store = super::serve::open_store(&cfg.store).await?;
        let mut out = serde_json::Map::new();
        for (spec, _) in &chosen {
            let ds = &spec.dataset;
            let limit = if json { usize::MAX } else { LISTED };
            let held = store.held(ds, limit).await?;
            let total = store.held_count(ds).await?;
            if json {
                out.insert(ds.clone(), serde_json::to_value(&held)?);
                continue;
            }
            if total == 0 {
                println!("{ds}: nothing quarantined");
                continue;
            }
            println!("{ds}: {total} change(s) quarantined; the copy is not fresh until they are replayed");
            held.iter().for_each(print_held);
            if total > held.len() as u64 {
                println!("  … {} more (all of them with --json)", total - held.len() as u64);
            }
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_replay(config: &Path, dataset: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = DeploymentConfig::load(config)?.agent()?.clone();
    let manifest = Manifest::load(&cfg.manifest).map_err(|e| anyhow!("{e}"))?;
    let chosen = copies(&manifest, &cfg.consumer, dataset)?;
    runtime()?.block_on(async {
        let store = super::serve::open_store(&cfg.store).await?;
        let mut reports: Vec<ReplayReport> = Vec::new();
        for (spec, version) in &chosen {
            reports.push(replay(store.as_ref() as &dyn CopyStore, spec, *version).await?);
        }
        let left: usize = reports.iter().map(|r| r.still_held.len()).sum();
        if json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        } else {
            for r in &reports {
                println!(
                    "{}: replayed {} ({} applied, {} superseded by newer versions in the copy); {} still held",
                    r.dataset,
                    r.applied + r.superseded,
                    r.applied,
                    r.superseded,
                    r.still_held.len()
                );
                r.still_held.iter().take(LISTED).for_each(print_held);
            }
            if left > 0 {
                println!("{left} change(s) still do not fit: change the subscription's fields (and restart the agent), or have the owner publish records that fit, then replay again");
            }
        }
        Ok(if left == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}
