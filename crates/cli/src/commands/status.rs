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
use spoke::config::{DeploymentConfig, FeedConfig, StoreConfig};
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

/// The last reconcile run: "never", or its age, duration and repairs. A
/// `scheduled` copy's runs are its refreshes from the owner's snapshot.
fn fmt_reconcile(strategy: &str, r: &spoke::copy::ReconcileStats) -> String {
    let scheduled = strategy == "scheduled";
    if r.runs_total == 0 {
        return if scheduled {
            "never refreshed"
        } else {
            "never"
        }
        .into();
    }
    let age = Clock::System.now_ms().saturating_sub(r.last_run_ms);
    format!(
        "{}{} ago, {}ms, {} {}",
        if scheduled { "refreshed " } else { "" },
        fmt_ms(Some(age)),
        r.last_duration_ms,
        r.last_repaired,
        if scheduled { "changed" } else { "repaired" }
    )
}

pub fn run(config: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = DeploymentConfig::load(config)?.agent()?.clone();
    let manifest = Manifest::load(&cfg.manifest).map_err(|e| anyhow!("{e}"))?;
    let (source, statuses) = runtime()?.block_on(async {
        let url = format!(
            "{}://{}/v1/status",
            spoke::tls::scheme(cfg.tls.as_ref()),
            cfg.listen
        );
        // The agent's API may need a token (the first of its api_tokens, by
        // name: every API token grants the same reads) and, over HTTPS, trust
        // in the agent's own certificate or the deployment's CA.
        let token = cfg
            .api_tokens
            .iter()
            .next()
            .map(|(name, src)| src.read(&format!("agent.api_tokens.{name}")))
            .transpose()?;
        let mut client = reqwest::Client::builder();
        let ca = match &cfg.feed {
            FeedConfig::Hub { tls_ca, .. } => tls_ca.clone(),
            FeedConfig::JetStream(_) => None,
        };
        for pem in cfg.tls.iter().map(|t| t.cert.clone()).chain(ca) {
            for root in spoke::tls::client_roots(&pem)? {
                client = client.add_root_certificate(root);
            }
        }
        let client = client.build()?;
        let live = async {
            let mut req = client.get(&url).timeout(std::time::Duration::from_secs(2));
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.ok()?;
            if !resp.status().is_success() {
                tracing::warn!(
                    status = resp.status().as_u16(),
                    "the agent refused the status request; reading the store"
                );
                return None;
            }
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
            "last reconcile / refresh",
            "attention",
        ]);
        for s in &statuses {
            t.add_row([
                s.dataset.clone(),
                s.owner.clone(),
                s.strategy.clone(),
                s.position.map_or("-".into(), |p| p.to_string()),
                match s.strategy.as_str() {
                    // No feed: a scheduled copy's lag is its staleness.
                    "scheduled" => "-".into(),
                    _ => s.lag_positions.map_or("?".into(), |l| l.to_string()),
                },
                match &s.cache {
                    // A ttl cache: each entry carries its own age, kept within the ttl.
                    Some(c) => format!(
                        "per entry ({} hits, {} owner calls)",
                        c.hits_total, c.owner_calls_total
                    ),
                    None if s.strategy == "ttl" => "per entry".into(),
                    None => fmt_ms(s.staleness_ms),
                },
                s.staleness_budget.clone(),
                if s.within_budget {
                    "yes".into()
                } else {
                    "OVER".into()
                },
                s.records.to_string(),
                s.applied_total.to_string(),
                fmt_reconcile(&s.strategy, &s.reconcile),
                attention(s),
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

/// What needs a person: quarantined changes (why the copy stopped being
/// fresh), the last error, fields the owner added that are not copied.
fn attention(s: &spoke::read::CopyStatus) -> String {
    let mut parts = Vec::new();
    if s.quarantined > 0 {
        parts.push(format!(
            "{} quarantined (spoke quarantine list): {}",
            s.quarantined,
            s.quarantine_reason.as_deref().unwrap_or("")
        ));
    }
    if let Some(e) = &s.last_error {
        parts.push(e.clone());
    }
    if !s.new_fields.is_empty() {
        parts.push(format!(
            "owner offers fields not projected: {}",
            s.new_fields.join(", ")
        ));
    }
    parts.join("; ")
}

/// `spoke status --cdc FILE`: the CDC slot's standing, read from the owner's
/// database (works whether or not `spoke cdc` is running). Exit 2 when the
/// slot is lost, missing, or retains more WAL than the alarm threshold.
pub fn cdc(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    use spoke::cdc::{file::CdcFile, fmt_lsn, slot};
    let f = CdcFile::load(file)?;
    let cfg = f.cdc;
    let (info, state) = runtime()?.block_on(async {
        let client = slot::connect(&cfg.postgres).await?;
        let info = slot::slot_info(&client, &cfg.slot).await?;
        let state = slot::load_state(&client, &cfg).await.unwrap_or_default();
        Ok::<_, spoke::cdc::CdcError>((info, state))
    })?;
    let alarm = cfg.options.wal_alarm_bytes;
    let problem = match &info {
        None if state.is_empty() => Some("no slot yet: start spoke cdc".to_owned()),
        None => Some(format!(
            "slot {} is gone: run spoke cdc --resnapshot",
            cfg.slot
        )),
        Some(i) if i.wal_status.as_deref() == Some("lost") => Some(format!(
            "slot {} lost its WAL: run spoke cdc --resnapshot",
            cfg.slot
        )),
        Some(i) if i.retained_bytes.unwrap_or(0) > alarm => Some(format!(
            "retains {} bytes of WAL, over the alarm of {alarm}",
            i.retained_bytes.unwrap_or(0)
        )),
        Some(_) => None,
    };
    if json {
        let datasets: Vec<_> = state
            .values()
            .map(|r| serde_json::json!({ "dataset": r.dataset, "table": r.table, "snapshot_done": r.snapshot_done, "rows_done": r.rows_done }))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "slot": cfg.slot,
                "exists": info.is_some(),
                "active": info.as_ref().is_some_and(|i| i.active_pid.is_some()),
                "wal_status": info.as_ref().and_then(|i| i.wal_status.clone()),
                "confirmed_flush_lsn": info.as_ref().and_then(|i| i.confirmed_flush).map(fmt_lsn),
                "retained_wal_bytes": info.as_ref().and_then(|i| i.retained_bytes),
                "lag_bytes": info.as_ref().and_then(|i| i.lag_bytes),
                "wal_alarm_bytes": alarm,
                "problem": problem,
                "datasets": datasets,
            })
        );
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY);
        t.set_header([
            "slot",
            "active",
            "wal status",
            "confirmed",
            "retained WAL",
            "lag",
            "alarm at",
            "problem",
        ]);
        t.add_row([
            cfg.slot.clone(),
            info.as_ref().map_or("-".into(), |i| {
                if i.active_pid.is_some() {
                    "yes".into()
                } else {
                    "no".into()
                }
            }),
            info.as_ref()
                .and_then(|i| i.wal_status.clone())
                .unwrap_or_else(|| "-".into()),
            info.as_ref()
                .and_then(|i| i.confirmed_flush)
                .map_or("-".into(), fmt_lsn),
            info.as_ref()
                .and_then(|i| i.retained_bytes)
                .map_or("-".into(), |b| format!("{b} B")),
            info.as_ref()
                .and_then(|i| i.lag_bytes)
                .map_or("-".into(), |b| format!("{b} B")),
            format!("{alarm} B"),
            problem.clone().unwrap_or_default(),
        ]);
        println!("{t}");
        for r in state.values() {
            println!(
                "  {} ← {}: snapshot {} ({} rows)",
                r.dataset,
                r.table,
                if r.snapshot_done {
                    "done"
                } else {
                    "in progress"
                },
                r.rows_done
            );
        }
    }
    Ok(if problem.is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
