//! In-process metrics rendered in the Prometheus text format for `GET /metrics`. Labels carry
//! only sources, states, event types, HTTP statuses and error kinds, never PHI.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Inbox items newly stored, by source and origin (`webhook` or `poll`); duplicates excluded.
pub const EVENTS_RECEIVED: &str = "patient_sync_events_received_total";
pub const EVENTS_RECEIVED_HELP: &str =
    "Inbox items newly stored, by source and origin (duplicates excluded).";
/// Inbox items finished by the worker, by source and outcome (`done`, `ignored`, `retried`,
/// `dead`).
pub const EVENTS_PROCESSED: &str = "patient_sync_events_processed_total";
pub const EVENTS_PROCESSED_HELP: &str = "Inbox items finished, by source and outcome.";

/// Bucket bounds, in seconds, of every histogram.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A registry of counters, gauges and histograms.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, Labels), u64>>,
    gauges: Mutex<BTreeMap<(&'static str, Labels), f64>>,
    histograms: Mutex<BTreeMap<(&'static str, Labels), Histogram>>,
    help: Mutex<BTreeMap<&'static str, (&'static str, &'static str)>>,
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn describe(&self, name: &'static str, kind: &'static str, help: &'static str) {
        self.help
            .lock()
            .unwrap()
            .entry(name)
            .or_insert((kind, help));
    }

    /// Adds `by` to a counter.
    pub fn inc(
        &self,
        name: &'static str,
        help: &'static str,
        pairs: &[(&'static str, &str)],
        by: u64,
    ) {
        self.describe(name, "counter", help);
        *self
            .counters
            .lock()
            .unwrap()
            .entry((name, labels(pairs)))
            .or_insert(0) += by;
    }

    /// Sets a gauge.
    pub fn set(
        &self,
        name: &'static str,
        help: &'static str,
        pairs: &[(&'static str, &str)],
        value: f64,
    ) {
        self.describe(name, "gauge", help);
        self.gauges
            .lock()
            .unwrap()
            .insert((name, labels(pairs)), value);
    }

    /// Records one observation, in seconds.
    pub fn observe(
        &self,
        name: &'static str,
        help: &'static str,
        pairs: &[(&'static str, &str)],
        seconds: f64,
    ) {
        self.describe(name, "histogram", help);
        let mut histograms = self.histograms.lock().unwrap();
        let h = histograms.entry((name, labels(pairs))).or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// Creates the per-source event counters at zero, so every series exists (and rates and
    /// alerts work) before the first event of its kind.
    pub fn init_source(&self, source: &str) {
        for origin in ["webhook", "poll"] {
            self.inc(
                EVENTS_RECEIVED,
                EVENTS_RECEIVED_HELP,
                &[("source", source), ("origin", origin)],
                0,
            );
        }
        for outcome in ["done", "ignored", "retried", "dead"] {
            self.inc(
                EVENTS_PROCESSED,
                EVENTS_PROCESSED_HELP,
                &[("source", source), ("outcome", outcome)],
                0,
            );
        }
    }

    /// The current value of a counter (tests and summaries).
    pub fn counter(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(&(name, labels(pairs)))
            .copied()
            .unwrap_or(0)
    }

    /// Sum of a counter over every label set.
    pub fn counter_total(&self, name: &'static str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, _), _)| *n == name)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Sum of a counter over every label set that has `label = value` (e.g. every status of
    /// one source).
    pub fn counter_where(&self, name: &'static str, label: &str, value: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, l), _)| *n == name && l.iter().any(|(k, v)| *k == label && v == value))
            .map(|(_, v)| *v)
            .sum()
    }

    /// Sum of a histogram's observations (seconds) for one exact label set.
    pub fn histogram_sum(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> f64 {
        self.histograms
            .lock()
            .unwrap()
            .get(&(name, labels(pairs)))
            .map_or(0.0, |h| h.sum)
    }

    /// Renders everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let help = self.help.lock().unwrap().clone();
        let mut out = String::new();
        let fmt_labels = |l: &Labels, extra: Option<(&str, String)>| -> String {
            let mut parts: Vec<String> = l
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            if let Some((k, v)) = extra {
                parts.push(format!("{k}=\"{v}\""));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(","))
            }
        };
        let header = |out: &mut String, name: &str| {
            if let Some((kind, text)) = help.get(name) {
                let _ = writeln!(out, "# HELP {name} {text}");
                let _ = writeln!(out, "# TYPE {name} {kind}");
            }
        };
        let mut last = "";
        for ((name, l), v) in self.counters.lock().unwrap().iter() {
            if *name != last {
                header(&mut out, name);
                last = name;
            }
            let _ = writeln!(out, "{name}{} {v}", fmt_labels(l, None));
        }
        last = "";
        for ((name, l), v) in self.gauges.lock().unwrap().iter() {
            if *name != last {
                header(&mut out, name);
                last = name;
            }
            let _ = writeln!(out, "{name}{} {v}", fmt_labels(l, None));
        }
        last = "";
        for ((name, l), h) in self.histograms.lock().unwrap().iter() {
            if *name != last {
                header(&mut out, name);
                last = name;
            }
            for (bound, count) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {count}",
                    fmt_labels(l, Some(("le", bound.to_string())))
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                fmt_labels(l, Some(("le", "+Inf".into()))),
                h.count
            );
            let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(l, None), h.sum);
            let _ = writeln!(out, "{name}_count{} {}", fmt_labels(l, None), h.count);
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_in_text_format() {
        let m = Metrics::new();
        m.inc("events_total", "Events.", &[("source", "healthie")], 2);
        m.set("queue_depth", "Depth.", &[], 3.0);
        m.observe("latency_seconds", "Latency.", &[("source", "hint")], 0.02);
        let text = m.render();
        assert!(text.contains("# TYPE events_total counter"));
        assert!(text.contains("events_total{source=\"healthie\"} 2"));
        assert!(text.contains("queue_depth 3"));
        assert!(text.contains("latency_seconds_bucket{source=\"hint\",le=\"0.025\"} 1"));
        assert!(text.contains("latency_seconds_count{source=\"hint\"} 1"));
        assert_eq!(m.counter("events_total", &[("source", "healthie")]), 2);
    }
}
