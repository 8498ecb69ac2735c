//! The human-readable end-of-run table of a [`Report`].
use super::metrics::{Percentiles, Summary};
use super::runner::Report;
use std::fmt::Write;

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
