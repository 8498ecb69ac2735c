//! What a run reports: [`Report`] (the run's [`Setup`], its figures and records), the
//! one typed shape that the runner fills, `multilora bench --json` writes and
//! `multilora bench-summary` reads back, and its human-readable end-of-run table.
use super::churn::{ChurnOp, ChurnSummary};
use super::metrics::{Percentiles, RequestRecord, Summary};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// The parameters of a run as given on the command line (the JSON report's `setup`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// A name for the run (`--label`, e.g. the model); a sweep's series.
    pub label: String,
    /// Adapters requests were drawn from; 0 = base model only.
    pub adapters: usize,
    pub popularity: String,
    pub base_share: f64,
    pub tenants: usize,
    /// Requests per second offered (open loop); None in a closed loop.
    pub rate: Option<f64>,
    pub cv: f64,
    pub concurrency: usize,
    pub input_len: String,
    pub output_len: String,
    pub ignore_eos: bool,
    pub requests: usize,
    pub duration: Option<f64>,
    pub warmup: usize,
    pub seed: u64,
    /// Adapter load/unload operations per second (0: none).
    pub churn: f64,
    /// The command line that produced the report.
    pub command: String,
}

/// What a run produced, and the JSON report of `multilora bench --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The parameters of the run (filled in by the command line; default in the runner).
    pub setup: Setup,
    pub summary: Summary,
    pub by_adapter: BTreeMap<String, Summary>,
    pub by_tenant: BTreeMap<String, Summary>,
    pub fairness_gap_tokens: Option<usize>,
    /// Requests whose output under load differed from their solo run (`--verify`).
    pub verify_mismatches: Option<usize>,
    /// Adapter churn during the run (all of it, warm-up included).
    pub churn: Option<ChurnSummary>,
    pub churn_ops: Vec<ChurnOp>,
    /// Measured requests (warm-up excluded), in plan order.
    pub records: Vec<RequestRecord>,
}

impl Report {
    /// Writes the report as pretty-printed JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("encoding the report")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a report `write` wrote; a missing or mistyped field is an error naming
    /// it, with its line and column.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Per-adapter and per-tenant lines shown at most.
const MAX_GROUP_LINES: usize = 20;

fn ms(x: f64) -> String {
    format!("{:.1}", x * 1e3)
}

fn latency_row(name: &str, p: &Percentiles) -> String {
    format!(
        "{name:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        ms(p.mean),
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.max)
    )
}

fn one_line(name: &str, s: &Summary) -> String {
    let errors: usize = s.errors.values().sum();
    format!(
        "{name:<24} {:>8} {:>6} {:>10.1} {:>10.1} {:>10.1}\n",
        s.requests,
        errors,
        s.token_throughput,
        s.ttft.p50 * 1e3,
        s.tpot.p50 * 1e3
    )
}

/// The summary, latency percentiles (ms), errors by code, and per-adapter and
/// per-tenant lines.
pub fn render(r: &Report) -> String {
    let s = &r.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "requests {} ok {} failed {} in {:.2} s: {:.2} req/s, {:.1} output tokens/s{}",
        s.requests,
        s.succeeded,
        s.requests - s.succeeded,
        s.duration,
        s.request_throughput,
        s.token_throughput,
        s.goodput
            .map(|g| format!(", goodput {g:.2} req/s"))
            .unwrap_or_default()
    );
    for (code, n) in &s.errors {
        let _ = writeln!(out, "  error {code}: {n}");
    }
    if let Some(m) = r.verify_mismatches {
        let _ = writeln!(out, "verify: {m} responses differ from their solo run");
    }
    if let Some(c) = &r.churn {
        let _ = writeln!(
            out,
            "churn: {} loads, {} unloads ({:.2} ops/s), load p50 {} ms p99 {} ms, unload p50 {} ms{}",
            c.loads,
            c.unloads,
            c.ops_per_s,
            ms(c.load_latency.p50),
            ms(c.load_latency.p99),
            ms(c.unload_latency.p50),
            c.errors
                .iter()
                .map(|(code, n)| format!(", {n} {code}"))
                .collect::<String>()
        );
    }
    if let Some(g) = r.fairness_gap_tokens {
        let _ = writeln!(out, "fairness gap between backlogged tenants: {g} tokens");
    }
    let _ = writeln!(
        out,
        "\n{:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "ms", "mean", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, p) in [
        ("ttft", &s.ttft),
        ("tpot", &s.tpot),
        ("itl", &s.itl),
        ("e2e", &s.e2e),
    ] {
        out.push_str(&latency_row(name, p));
    }
    for (title, groups) in [("adapter", &r.by_adapter), ("tenant", &r.by_tenant)] {
        let _ = writeln!(
            out,
            "\n{title:<24} {:>8} {:>6} {:>10} {:>10} {:>10}",
            "requests", "errors", "tok/s", "ttft p50", "tpot p50"
        );
        // The busiest groups first; a run over thousands of adapters lists the top ones.
        let mut sorted: Vec<_> = groups.iter().collect();
        sorted.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(b.0)));
        for (name, g) in sorted.iter().take(MAX_GROUP_LINES) {
            let shown = if name.is_empty() { "(base)" } else { name };
            out.push_str(&one_line(shown, g));
        }
        if sorted.len() > MAX_GROUP_LINES {
            let rest = sorted.len() - MAX_GROUP_LINES;
            let _ = writeln!(out, "... and {rest} more (all of them in --json)");
        }
    }
    out
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
