//! The CDC source's Prometheus metrics, rendered from [`CdcStats`] on each
//! scrape and served by `spoke cdc --metrics-listen ADDR` (`GET /metrics`).
//!
//! ```text
//!  CdcSource ──▶ CdcStats (atomics) ◀── measure_slot every status_every: pg_replication_slots
//!                     │
//!  GET /metrics ──▶ render ──▶ spoke_cdc_* in the text format (crate::metrics)
//! ```
//!
//! Names are defined once here. Labels: `slot` (one per source) and
//! `dataset` (bounded by the manifest). The slot's figures (retained WAL,
//! lag, confirmed position, `wal_status`) are those of the last measurement,
//! taken every `status_every` (and once before the snapshot); they are absent
//! until the first one. `spoke_cdc_retained_wal_alarm` uses the same
//! threshold (`wal_alarm_bytes`) as `spoke status --cdc`. LSNs are exported as
//! numbers (exact up to 2^53 bytes of WAL).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::{CdcConfig, CdcStats};
use crate::metrics::{Exposition, Kind, CONTENT_TYPE};

pub const RETAINED_WAL: &str = "spoke_cdc_retained_wal_bytes";
pub const LAG: &str = "spoke_cdc_lag_bytes";
pub const WAL_ALARM_THRESHOLD: &str = "spoke_cdc_wal_alarm_threshold_bytes";
pub const RETAINED_WAL_ALARM: &str = "spoke_cdc_retained_wal_alarm";
pub const CONFIRMED_FLUSH_LSN: &str = "spoke_cdc_confirmed_flush_lsn";
pub const ACKNOWLEDGED_LSN: &str = "spoke_cdc_acknowledged_lsn";
pub const LAST_COMMIT_LSN: &str = "spoke_cdc_last_commit_lsn";
pub const WAL_STATUS: &str = "spoke_cdc_slot_wal_status";
pub const SLOT_MEASURED: &str = "spoke_cdc_slot_measured_timestamp_seconds";
pub const SLOT_LOST: &str = "spoke_cdc_slot_lost";
pub const STOPPED: &str = "spoke_cdc_stopped";
pub const PUBLISHED_TOTAL: &str = "spoke_cdc_changes_published_total";
pub const IGNORED_TOTAL: &str = "spoke_cdc_changes_ignored_total";
pub const PUBLISHES_TOTAL: &str = "spoke_cdc_publishes_total";
pub const TRANSACTIONS_TOTAL: &str = "spoke_cdc_transactions_total";
pub const SNAPSHOT_ROWS_TOTAL: &str = "spoke_cdc_snapshot_rows_total";
pub const RECONNECTS_TOTAL: &str = "spoke_cdc_reconnects_total";

/// The `wal_status` values PostgreSQL reports for a slot.
const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// One source's figures for the scrape.
#[derive(Debug, Clone)]
pub struct CdcMetrics {
    slot: String,
    wal_alarm_bytes: u64,
    stats: Arc<CdcStats>,
}

impl CdcMetrics {
    pub fn new(cfg: &CdcConfig, stats: Arc<CdcStats>) -> Self {
        CdcMetrics {
            slot: cfg.slot.clone(),
            wal_alarm_bytes: cfg.options.wal_alarm_bytes,
            stats,
        }
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let s = &self.stats;
        let slot: &[(&str, &str)] = &[("slot", &self.slot)];
        let get = |c: &std::sync::atomic::AtomicU64| CdcStats::get(c) as f64;
        let measured = CdcStats::get(&s.slot_measured_ms);
        let mut out = Exposition::new();
        let mut gauge = |name: &str, help: &str, value: Option<f64>| {
            out.family(name, Kind::Gauge, help);
            if let Some(v) = value {
                out.sample(name, slot, v);
            }
        };
        let slot_figure = |v: f64| (measured > 0).then_some(v);
        gauge(
            RETAINED_WAL,
            "WAL the slot keeps the server from removing (current WAL position - restart_lsn), bytes, as last measured.",
            slot_figure(get(&s.retained_wal_bytes)),
        );
        gauge(
            LAG,
            "WAL not yet confirmed by the source (current WAL position - confirmed_flush_lsn), bytes, as last measured.",
            slot_figure(get(&s.lag_bytes)),
        );
        gauge(
            WAL_ALARM_THRESHOLD,
            "Retained WAL above which the alarm is raised (wal_alarm_bytes), bytes.",
            Some(self.wal_alarm_bytes as f64),
        );
        gauge(
            RETAINED_WAL_ALARM,
            "1 when the slot retains more WAL than wal_alarm_bytes, else 0.",
            slot_figure(
                if CdcStats::get(&s.retained_wal_bytes) > self.wal_alarm_bytes {
                    1.0
                } else {
                    0.0
                },
            ),
        );
        gauge(
            CONFIRMED_FLUSH_LSN,
            "The slot's confirmed_flush_lsn as a number, as last measured.",
            slot_figure(get(&s.confirmed_flush_lsn)),
        );
        gauge(
            ACKNOWLEDGED_LSN,
            "The last position the source confirmed to the server, as a number.",
            Some(get(&s.acked_lsn)),
        );
        gauge(
            LAST_COMMIT_LSN,
            "End LSN of the last transaction the feed accepted, as a number.",
            Some(get(&s.last_commit_lsn)),
        );
        gauge(
            SLOT_MEASURED,
            "When the slot was last measured, Unix seconds.",
            slot_figure(measured as f64 / 1000.0),
        );
        gauge(
            SLOT_LOST,
            "1 once the slot was found dropped or invalidated: the source stopped; recover with spoke cdc --resnapshot.",
            Some(if s.slot_lost.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            }),
        );
        gauge(
            STOPPED,
            "1 once the source stopped with an error that retrying does not fix (see its log), else 0.",
            Some(if s.stopped.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            }),
        );
        out.family(
            WAL_STATUS,
            Kind::Gauge,
            "1 for the slot's wal_status as last measured (reserved, extended, unreserved, lost).",
        );
        if measured > 0 {
            let current = s.wal_status.lock().expect("cdc stats").clone();
            for status in WAL_STATUSES {
                let on = current.as_deref() == Some(status);
                out.sample(
                    WAL_STATUS,
                    &[("slot", &self.slot), ("status", status)],
                    if on { 1.0 } else { 0.0 },
                );
            }
        }
        let mut counter = |name: &str, help: &str, value: f64| {
            out.family(name, Kind::Counter, help);
            out.sample(name, slot, value);
        };
        counter(
            TRANSACTIONS_TOTAL,
            "Owner transactions streamed and published.",
            get(&s.transactions),
        );
        counter(
            PUBLISHES_TOTAL,
            "Publishes the feed accepted (several transactions can share one).",
            get(&s.publishes),
        );
        counter(
            SNAPSHOT_ROWS_TOTAL,
            "Rows published by the initial snapshot.",
            get(&s.snapshot_rows),
        );
        counter(
            RECONNECTS_TOTAL,
            "New sessions after a transient error.",
            get(&s.reconnects),
        );
        let datasets = s.dataset_counts();
        out.family(
            PUBLISHED_TOTAL,
            Kind::Counter,
            "Changes the feed appended (snapshot and stream).",
        );
        for (dataset, c) in &datasets {
            out.sample(PUBLISHED_TOTAL, &[("dataset", dataset)], c.published as f64);
        }
        out.family(
            IGNORED_TOTAL,
            Kind::Counter,
            "Changes the feed already held (replays after a restart).",
        );
        for (dataset, c) in &datasets {
            out.sample(IGNORED_TOTAL, &[("dataset", dataset)], c.ignored as f64);
        }
        out.finish()
    }
}

/// `GET /metrics` and `GET /v1/health` of a CDC source.
pub fn router(metrics: CdcMetrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(m): axum::extract::State<CdcMetrics>| async move {
                    ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.render())
                },
            ),
        )
        .route("/v1/health", get(|| async { "ok" }))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "no such endpoint; the CDC source serves GET /metrics and GET /v1/health\n",
            )
                .into_response()
        })
        .with_state(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::TableMapping;

    fn metrics(alarm: u64) -> CdcMetrics {
        let mut cfg = CdcConfig::new(
            "host=x",
            "p",
            "s_metrics",
            vec![TableMapping::parse_flag("items=t:id").unwrap()],
        );
        cfg.options.wal_alarm_bytes = alarm;
        CdcMetrics::new(&cfg, Arc::default())
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn slot_figures_appear_once_measured_and_the_alarm_follows_the_threshold() {
        let m = metrics(1000);
        let text = m.render();
        assert_eq!(
            value(&text, "spoke_cdc_retained_wal_bytes{slot=\"s_metrics\"}"),
            None,
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "spoke_cdc_wal_alarm_threshold_bytes{slot=\"s_metrics\"}"
            ),
            Some(1000.0)
        );
        assert_eq!(
            value(&text, "spoke_cdc_slot_lost{slot=\"s_metrics\"}"),
            Some(0.0)
        );

        m.stats
            .slot_measured_ms
            .store(1_700_000_000_000, Ordering::Relaxed);
        m.stats.retained_wal_bytes.store(1000, Ordering::Relaxed);
        *m.stats.wal_status.lock().unwrap() = Some("unreserved".into());
        let text = m.render();
        assert_eq!(
            value(&text, "spoke_cdc_retained_wal_alarm{slot=\"s_metrics\"}"),
            Some(0.0),
            "at the threshold is not over it"
        );
        assert_eq!(
            value(
                &text,
                "spoke_cdc_slot_wal_status{slot=\"s_metrics\",status=\"unreserved\"}"
            ),
            Some(1.0)
        );
        m.stats.retained_wal_bytes.store(1001, Ordering::Relaxed);
        m.stats.count_publish("items", 5, 2);
        m.stats.slot_lost.store(true, Ordering::Relaxed);
        let text = m.render();
        assert_eq!(
            value(&text, "spoke_cdc_retained_wal_alarm{slot=\"s_metrics\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "spoke_cdc_changes_published_total{dataset=\"items\"}"
            ),
            Some(5.0)
        );
        assert_eq!(
            value(&text, "spoke_cdc_changes_ignored_total{dataset=\"items\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "spoke_cdc_publishes_total{slot=\"s_metrics\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "spoke_cdc_slot_lost{slot=\"s_metrics\"}"),
            Some(1.0)
        );
    }
}
