//! `spoke status --config FILE`: one row per copy.
//!
//! Asks the running agent first (it knows the feed's head, so it can show
//! lag); when the agent is down, reads the copy store directly, which still
//! shows position and staleness — a stopped agent is exactly when staleness
//! matters.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::anyhow;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use spoke::clock::Clock;
use spoke::config::{DeploymentConfig, StoreConfig};
use spoke::copy::sqlite::SqliteCopyStore;
use spoke::read::{Copies, CopyStatus};
use spoke_core::Manifest;

use super::runtime;

fn fmt_ms(ms: Option<u64>) -> String {
    match ms {
        None => "never fresh".into(),
        Some(ms) if ms < 1_000 => format!("{ms}ms"),
        Some(ms) if ms < 120_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

pub fn run(config: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = DeploymentConfig::load(config)?.agent()?.clone();
    let manifest = Manifest::load(&cfg.manifest).map_err(|e| anyhow!("{e}"))?;
    let (source, statuses) = runtime()?.block_on(async {
        let url = format!("http://{}/v1/status", cfg.listen);
        let live = async {
            let resp = reqwest::Client::new()
                .get(&url)
                .timeout(std::time::Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            let body: serde_json::Value = resp.json().await.ok()?;
            serde_json::from_value::<Vec<CopyStatus>>(body.get("copies")?.clone()).ok()
        };
        if let Some(s) = live.await {
            return Ok::<_, anyhow::Error>((format!("agent at {}", cfg.listen), s));
        }
        let store: Arc<dyn spoke::copy::CopyStore> = match &cfg.store {
            StoreConfig::Sqlite(path) => Arc::new(SqliteCopyStore::open_read_only(path)?),
            pg => super::serve::open_store(pg).await?,
        };
        let path = super::serve::describe_store(&cfg.store);
        let copies = Copies::new(&manifest, &cfg.consumer, store, Clock::System);
        let mut out = Vec::new();
        for ds in copies.datasets().map(str::to_owned).collect::<Vec<_>>() {
            out.push(
                copies
                    .status(
                        &ds,
                        None,
                        Some("agent not reachable; read from the store".into()),
                    )
                    .await?,
            );
        }
        Ok((
            format!("store {path} (agent at {} not reachable)", cfg.listen),
            out,
        ))
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "consumer": cfg.consumer, "source": source, "copies": statuses })
        );
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY);
        t.set_header([
            "copy",
            "owner",
            "strategy",
            "position",
            "lag",
            "staleness",
            "budget",
            "ok",
            "records",
            "applied",
            "last error",
        ]);
        for s in &statuses {
            t.add_row([
                s.dataset.clone(),
                s.owner.clone(),
                s.strategy.clone(),
                s.position.map_or("-".into(), |p| p.to_string()),
                s.lag_positions.map_or("?".into(), |l| l.to_string()),
                fmt_ms(s.staleness_ms),
                s.staleness_budget.clone(),
                if s.within_budget {
                    "yes".into()
                } else {
                    "OVER".into()
                },
                s.records.to_string(),
                s.applied_total.to_string(),
                s.last_error.clone().unwrap_or_default(),
            ]);
        }
        println!("{} — from {source}\n{t}", cfg.consumer);
    }
    Ok(if statuses.iter().all(|s| s.within_budget) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
