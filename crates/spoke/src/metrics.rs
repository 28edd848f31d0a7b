//! The Prometheus text exposition format (version 0.0.4), shared by every
//! Spoke process that serves `GET /metrics`: the agent's copies
//! ([`crate::agent::metrics`]) and the CDC source ([`crate::cdc::metrics`]).
//!
//! Each process defines its metric names once, as constants, and renders
//! its figures on every scrape with an [`Exposition`]: one `# HELP` /
//! `# TYPE` header per family, then its samples with their labels.

use std::fmt::Write;

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A scrape's text, written family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its help text and type. Samples written after it
    /// belong to it.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample, `name{label="value",…} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// The text to answer the scrape with.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_and_escaped_labels() {
        let mut e = Exposition::new();
        e.family("spoke_x_total", Kind::Counter, "Things.")
            .sample("spoke_x_total", &[("dataset", "a\"b\\c\nd")], 3.0)
            .sample("spoke_x_total", &[], 0.5);
        e.family("spoke_y", Kind::Gauge, "A level.").sample(
            "spoke_y",
            &[("slot", "s"), ("dataset", "d")],
            1.0,
        );
        assert_eq!(
            e.finish(),
            "# HELP spoke_x_total Things.\n# TYPE spoke_x_total counter\n\
             spoke_x_total{dataset=\"a\\\"b\\\\c\\nd\"} 3\nspoke_x_total 0.5\n\
             # HELP spoke_y A level.\n# TYPE spoke_y gauge\nspoke_y{slot=\"s\",dataset=\"d\"} 1\n"
        );
    }
}
