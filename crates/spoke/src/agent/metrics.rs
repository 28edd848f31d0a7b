//! The agent's Prometheus metrics, rendered from copy status on each scrape.
//!
//! `ttl` subscriptions also report their cache (`spoke_cache_*`).
//! Names are defined once here; the labels are `dataset`, bounded by the
//! manifest, and `kind` (missing | stale | extra) on the repair counter.
//! Reconcile figures come from the copy store's bookkeeping, so runs made
//! by `spoke reconcile` beside the agent count too.

use crate::metrics::{Exposition, Kind};
use crate::read::CopyStatus;

pub const APPLIED_TOTAL: &str = "spoke_applied_changes_total";
pub const RECEIVED_TOTAL: &str = "spoke_received_changes_total";
pub const FEED_LAG: &str = "spoke_feed_lag_positions";
pub const STALENESS: &str = "spoke_staleness_seconds";
pub const WITHIN_BUDGET: &str = "spoke_within_budget";
pub const BUDGET_SECONDS: &str = "spoke_staleness_budget_seconds";
pub const BUDGET_BREACHES: &str = "spoke_budget_breaches_total";
pub const RECORDS: &str = "spoke_copy_records";
pub const COPY_ERROR: &str = "spoke_copy_error";
pub const QUARANTINED: &str = "spoke_quarantined_changes";
pub const RECONCILE_RUNS: &str = "spoke_reconcile_runs_total";
pub const RECONCILE_REPAIRED: &str = "spoke_reconcile_repaired_total";
pub const RECONCILE_LAST_RUN: &str = "spoke_reconcile_last_run_timestamp_seconds";
pub const RECONCILE_LAST_DURATION: &str = "spoke_reconcile_last_duration_seconds";
pub const CACHE_ENTRIES: &str = "spoke_cache_entries";
pub const CACHE_HITS: &str = "spoke_cache_hits_total";
pub const CACHE_MISSES: &str = "spoke_cache_misses_total";
pub const CACHE_OWNER_CALLS: &str = "spoke_cache_owner_calls_total";
pub const CACHE_OWNER_ERRORS: &str = "spoke_cache_owner_errors_total";
pub const CACHE_STALE_SERVED: &str = "spoke_cache_stale_served_total";
pub const CACHE_EVICTIONS: &str = "spoke_cache_evictions_total";

/// One copy's numbers for the scrape.
pub struct Sample<'a> {
    pub status: &'a CopyStatus,
    pub budget_ms: u64,
    pub breaches: u64,
}

/// Renders the Prometheus text exposition format.
pub fn render(samples: &[Sample<'_>]) -> String {
    let mut out = Exposition::new();
    let mut family =
        |name: &str, kind: Kind, help: &str, value: &dyn Fn(&Sample<'_>) -> Option<f64>| {
            out.family(name, kind, help);
            for s in samples {
                if let Some(v) = value(s) {
                    out.sample(name, &[("dataset", &s.status.dataset)], v);
                }
            }
        };
    family(
        APPLIED_TOTAL,
        Kind::Counter,
        "Changes that changed the copy (bootstrap included).",
        &|s| Some(s.status.applied_total as f64),
    );
    family(
        RECEIVED_TOTAL,
        Kind::Counter,
        "Feed entries received after bootstrap, applied or ignored as stale.",
        &|s| Some(s.status.received_total as f64),
    );
    family(
        FEED_LAG,
        Kind::Gauge,
        "Feed positions not yet applied (head minus position).",
        &|s| s.status.lag_positions.map(|l| l as f64),
    );
    family(
        STALENESS,
        Kind::Gauge,
        "Seconds since the copy last held everything the feed held.",
        &|s| s.status.staleness_ms.map(|ms| ms as f64 / 1000.0),
    );
    family(
        BUDGET_SECONDS,
        Kind::Gauge,
        "The subscription's staleness budget in seconds.",
        &|s| Some(s.budget_ms as f64 / 1000.0),
    );
    family(
        WITHIN_BUDGET,
        Kind::Gauge,
        "1 when staleness is within the budget, else 0.",
        &|s| Some(if s.status.within_budget { 1.0 } else { 0.0 }),
    );
    family(
        BUDGET_BREACHES,
        Kind::Counter,
        "Times the copy went over its staleness budget.",
        &|s| Some(s.breaches as f64),
    );
    family(RECORDS, Kind::Gauge, "Live records in the copy.", &|s| {
        Some(s.status.records as f64)
    });
    family(
        COPY_ERROR,
        Kind::Gauge,
        "1 while the copy's last attempt failed, else 0.",
        &|s| {
            Some(if s.status.last_error.is_some() {
                1.0
            } else {
                0.0
            })
        },
    );
    family(
        QUARANTINED,
        Kind::Gauge,
        "Changes held in quarantine because the copy cannot hold them (spoke quarantine list).",
        &|s| Some(s.status.quarantined as f64),
    );
    family(
        RECONCILE_RUNS,
        Kind::Counter,
        "Reconcile runs (spoke reconcile) of the copy.",
        &|s| Some(s.status.reconcile.runs_total as f64),
    );
    family(
        RECONCILE_LAST_RUN,
        Kind::Gauge,
        "Start of the last reconcile run, Unix seconds (absent: never ran).",
        &|s| {
            let r = &s.status.reconcile;
            (r.runs_total > 0).then(|| r.last_run_ms as f64 / 1000.0)
        },
    );
    family(
        RECONCILE_LAST_DURATION,
        Kind::Gauge,
        "Duration of the last reconcile run in seconds.",
        &|s| {
            let r = &s.status.reconcile;
            (r.runs_total > 0).then(|| r.last_duration_ms as f64 / 1000.0)
        },
    );
    type CacheFigure = fn(&crate::ttl::CacheStats) -> u64;
    let cache_families: [(&str, Kind, &str, CacheFigure); 7] = [
        (
            CACHE_ENTRIES,
            Kind::Gauge,
            "Entries in a ttl subscription's cache.",
            |c| c.entries,
        ),
        (
            CACHE_HITS,
            Kind::Counter,
            "Reads answered by a ttl cache entry within its ttl.",
            |c| c.hits_total,
        ),
        (
            CACHE_MISSES,
            Kind::Counter,
            "Reads a ttl cache could not answer from an entry within its ttl.",
            |c| c.misses_total,
        ),
        (
            CACHE_OWNER_CALLS,
            Kind::Counter,
            "Reads of the owner made by a ttl cache (concurrent misses of one key share one).",
            |c| c.owner_calls_total,
        ),
        (
            CACHE_OWNER_ERRORS,
            Kind::Counter,
            "Owner reads of a ttl cache that failed.",
            |c| c.owner_errors_total,
        ),
        (
            CACHE_STALE_SERVED,
            Kind::Counter,
            "Expired ttl cache entries served because the owner failed.",
            |c| c.stale_served_total,
        ),
        (
            CACHE_EVICTIONS,
            Kind::Counter,
            "ttl cache entries evicted to stay within max_entries.",
            |c| c.evictions_total,
        ),
    ];
    for (name, kind, help, value) in cache_families {
        family(name, kind, help, &|s| {
            s.status.cache.as_ref().map(|c| value(c) as f64)
        });
    }
    out.family(
        RECONCILE_REPAIRED,
        Kind::Counter,
        "Records repaired by reconcile: missing (fetched), stale (newer version fetched) or extra (removed).",
    );
    for s in samples {
        let r = &s.status.reconcile;
        for (kind, n) in [
            ("missing", r.repaired_missing_total),
            ("stale", r.repaired_stale_total),
            ("extra", r.repaired_extra_total),
        ] {
            out.sample(
                RECONCILE_REPAIRED,
                &[("dataset", &s.status.dataset), ("kind", kind)],
                n as f64,
            );
        }
    }
    out.finish()
}
