//! Prometheus primitives: a lock-free [`Histogram`] that any thread may observe into, and
//! [`TextWriter`], which writes the text exposition format (version 0.0.4): one `# HELP`
//! and `# TYPE` per family, then its samples, label values escaped.
//! Invariants: a histogram's buckets are cumulative only when written (each counter holds
//! its own bucket's observations), so an observation is one atomic add per field; a
//! family is written whole, once.
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) for request latencies: 1 ms to 5 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 320.0,
];

/// Upper bounds (seconds) for the time between two output tokens: 1 ms to 20 s.
pub const TOKEN_GAP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
];

/// A Prometheus histogram of non-negative values with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<AtomicU64>,
    /// The sum of observations in microunits (1e-6), so it can be one atomic add.
    sum_micros: AtomicU64,
}

/// A histogram's state at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound, cumulative count), ending with (+Inf, count).
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// `bounds` must be increasing.
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one value (negative and NaN values count as 0).
    pub fn observe(&self, v: f64) {
        let v = if v.is_nan() { 0.0 } else { v.max(0.0) };
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v * 1e6).round() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let bound = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        HistogramSnapshot {
            buckets,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: cumulative,
        }
    }
}

/// Writes families in the Prometheus text format.
#[derive(Default)]
pub struct TextWriter {
    out: String,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn number(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

impl TextWriter {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: Labels, value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", pairs.join(","));
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A gauge family: one sample per label set.
    pub fn gauge(&mut self, name: &str, help: &str, samples: &[(Labels, f64)]) {
        self.header(name, "gauge", help);
        for (labels, v) in samples {
            self.sample(name, labels, *v);
        }
    }

    /// A counter family; `name` without the `_total` suffix, which each sample gets.
    pub fn counter(&mut self, name: &str, help: &str, samples: &[(Labels, f64)]) {
        self.header(name, "counter", help);
        let total = format!("{name}_total");
        for (labels, v) in samples {
            self.sample(&total, labels, *v);
        }
    }

    /// A histogram family without labels.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for &(le, count) in &h.buckets {
            let le = number(le);
            self.sample(&bucket, &[("le", le.as_str())], count as f64);
        }
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_bounds_inclusive() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0, -1.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(1.0, 3), (2.0, 4), (f64::INFINITY, 5)]);
        assert_eq!(s.count, 5);
        assert!((s.sum - 6.0).abs() < 1e-9);
    }

    #[test]
    fn text_format_escapes_labels_and_suffixes_counters() {
        let mut w = TextWriter::default();
        w.gauge("g", "a gauge", &[(&[("a", "x\"y\\z\n")], 1.5)]);
        w.counter("c", "a counter", &[(&[], 2.0)]);
        let h = Histogram::new(&[1.0]);
        h.observe(0.25);
        w.histogram("h_seconds", "a histogram", &h.snapshot());
        let text = w.finish();
        assert!(
            text.contains("# TYPE g gauge\ng{a=\"x\\\"y\\\\z\\n\"} 1.5\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE c counter\nc_total 2\n"), "{text}");
        assert!(text.contains("h_seconds_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("h_seconds_bucket{le=\"+Inf\"} 1\n"), "{text}");
        assert!(
            text.contains("h_seconds_sum 0.25\nh_seconds_count 1\n"),
            "{text}"
        );
    }
}
