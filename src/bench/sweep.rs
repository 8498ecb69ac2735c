//! `multilora bench-summary`: the JSON reports of a sweep (one `multilora bench --json`
//! per model and adapter count) turned into one markdown table, with each run's
//! throughput relative to its model's base-only run, and the sweep plots.
use super::plot::{write_sweep_plots, SweepPoint};
use super::report::Report;
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// One run of the sweep, read from its report.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepRow {
    /// The report's `setup.label` (the model).
    pub series: String,
    /// Adapters requests were drawn from (`setup.adapters`); 0 = base model only.
    pub adapters: usize,
    /// Distinct adapters the measured requests named.
    pub adapters_used: usize,
    pub requests: usize,
    pub errors: usize,
    /// Requests per second offered (`setup.rate`; None in a closed loop).
    pub offered: Option<f64>,
    pub req_per_s: f64,
    pub tok_per_s: f64,
    /// Seconds.
    pub ttft_p50: f64,
    pub ttft_p99: f64,
    pub tpot_p50: f64,
    pub tpot_p99: f64,
    /// The command line that produced the report.
    pub command: String,
}

impl SweepRow {
    /// Reads the fields of one `multilora bench --json` report given as JSON; a
    /// missing or mistyped field is an error naming it.
    pub fn from_report(report: &Value) -> Result<Self> {
        let report = Report::deserialize(report).context("reading the report")?;
        Ok(Self::of(&report))
    }

    /// The row of one report.
    pub fn of(report: &Report) -> Self {
        let (setup, s) = (&report.setup, &report.summary);
        Self {
            series: setup.label.clone(),
            adapters: setup.adapters,
            adapters_used: report.by_adapter.keys().filter(|k| !k.is_empty()).count(),
            requests: s.requests,
            errors: s.errors.values().sum(),
            offered: setup.rate,
            req_per_s: s.request_throughput,
            tok_per_s: s.token_throughput,
            ttft_p50: s.ttft.p50,
            ttft_p99: s.ttft.p99,
            tpot_p50: s.tpot.p50,
            tpot_p99: s.tpot.p99,
            command: setup.command.clone(),
        }
    }

    fn point(&self) -> SweepPoint {
        SweepPoint {
            series: self.series.clone(),
            adapters: self.adapters,
            throughput_tok_s: self.tok_per_s,
            ttft_p50: self.ttft_p50,
            ttft_p99: self.ttft_p99,
            tpot_p50: self.tpot_p50,
            tpot_p99: self.tpot_p99,
        }
    }
}

/// Rows grouped by series (in first-seen order), each group by adapter count with the
/// base-only run first.
pub fn order(mut rows: Vec<SweepRow>) -> Vec<SweepRow> {
    let mut series: Vec<String> = Vec::new();
    for r in &rows {
        if !series.contains(&r.series) {
            series.push(r.series.clone());
        }
    }
    rows.sort_by_key(|r| {
        let s = series.iter().position(|s| *s == r.series).unwrap_or(0);
        (s, r.adapters)
    });
    rows
}

/// The markdown table: one line per run; "vs base" is the run's output token
/// throughput over its model's base-only run.
pub fn markdown(rows: &[SweepRow]) -> String {
    let mut out = String::from(
        "| model | adapters | used | requests | errors | offered req/s | req/s | output tok/s | vs base | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.series == r.series && b.adapters == 0)
            .map(|b| b.tok_per_s);
        let vs_base = match base {
            Some(b) if b > 0.0 => format!("{:.2}", r.tok_per_s / b),
            _ => "-".into(),
        };
        let adapters = if r.adapters == 0 {
            "base only".to_string()
        } else {
            r.adapters.to_string()
        };
        let _ = writeln!(
            out,
            "| {} | {adapters} | {} | {} | {} | {} | {:.2} | {:.1} | {vs_base} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.series,
            r.adapters_used,
            r.requests,
            r.errors,
            r.offered.map_or("closed loop".into(), |o| format!("{o}")),
            r.req_per_s,
            r.tok_per_s,
            r.ttft_p50 * 1e3,
            r.ttft_p99 * 1e3,
            r.tpot_p50 * 1e3,
            r.tpot_p99 * 1e3,
        );
    }
    out
}

/// Reads `files`, writes `results.md` (the table and every run's command line) and the
/// sweep plots into `out`; returns the paths written.
pub fn summarize_files(files: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    let mut rows = Vec::new();
    for f in files {
        rows.push(SweepRow::of(&Report::read(f)?));
    }
    let rows = order(rows);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut md = markdown(&rows);
    md.push_str("\nCommand lines:\n\n```\n");
    for r in &rows {
        let _ = writeln!(md, "{}", r.command);
    }
    md.push_str("```\n");
    let table = out.join("results.md");
    std::fs::write(&table, md).with_context(|| format!("writing {}", table.display()))?;
    let points: Vec<SweepPoint> = rows.iter().map(SweepRow::point).collect();
    let mut written = vec![table];
    written.extend(write_sweep_plots(&points, out)?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::metrics::{Percentiles, Summary};
    use crate::bench::report::Setup;
    use serde_json::json;

    fn report(label: &str, adapters: usize, tok_s: f64, used: &[&str]) -> Report {
        let latency = |p50, p99| Percentiles {
            p50,
            p99,
            ..Default::default()
        };
        let summary = Summary {
            requests: 10,
            errors: [("UNAVAILABLE".to_string(), 1)].into(),
            request_throughput: 2.0,
            token_throughput: tok_s,
            ttft: latency(0.1, 0.25),
            tpot: latency(0.02, 0.03),
            ..Default::default()
        };
        Report {
            setup: Setup {
                label: label.into(),
                adapters,
                rate: Some(2.5),
                command: format!("bench {label} {adapters}"),
                ..Default::default()
            },
            summary,
            by_adapter: used
                .iter()
                .map(|a| (a.to_string(), Summary::default()))
                .collect(),
            by_tenant: Default::default(),
            fairness_gap_tokens: None,
            verify_mismatches: None,
            churn: None,
            churn_ops: Vec::new(),
            records: Vec::new(),
        }
    }

    #[test]
    fn rows_read_order_and_compare_with_base() {
        let rows: Vec<SweepRow> = [
            report("big", 8, 40.0, &["a", "b"]),
            report("small", 8, 150.0, &["a"]),
            report("small", 0, 200.0, &[""]),
            report("big", 0, 50.0, &[""]),
        ]
        .iter()
        .map(|r| SweepRow::from_report(&serde_json::to_value(r).unwrap()).unwrap())
        .collect();
        let rows = order(rows);
        let order: Vec<(&str, usize)> = rows
            .iter()
            .map(|r| (r.series.as_str(), r.adapters))
            .collect();
        assert_eq!(order, [("big", 0), ("big", 8), ("small", 0), ("small", 8)]);
        assert_eq!((rows[1].adapters_used, rows[0].adapters_used), (2, 0));
        assert_eq!(rows[1].errors, 1);
        let md = markdown(&rows);
        // 40 / 50 and 150 / 200.
        assert!(
            md.contains(
                "| big | 8 | 2 | 10 | 1 | 2.5 | 2.00 | 40.0 | 0.80 | 100 | 250 | 20 | 30 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| small | 8 | 1 | 10 | 1 | 2.5 | 2.00 | 150.0 | 0.75 |"),
            "{md}"
        );
        assert!(md.contains("| small | base only | 0 |"), "{md}");
    }

    #[test]
    fn a_report_without_its_figures_is_an_error() {
        // Serde names the first field it misses.
        let err = SweepRow::from_report(&json!({"setup": {"adapters": 1}})).unwrap_err();
        assert!(
            format!("{err:#}").contains("missing field `label`"),
            "{err:#}"
        );
        let mut r = serde_json::to_value(report("m", 1, 1.0, &[])).unwrap();
        r.as_object_mut().unwrap().remove("summary");
        let err = SweepRow::from_report(&r).unwrap_err();
        assert!(format!("{err:#}").contains("summary"), "{err:#}");
        let mut r = serde_json::to_value(report("m", 1, 1.0, &[])).unwrap();
        r["summary"]["ttft"].as_object_mut().unwrap().remove("p50");
        let err = SweepRow::from_report(&r).unwrap_err();
        assert!(
            format!("{err:#}").contains("missing field `p50`"),
            "{err:#}"
        );
        r["summary"]["ttft"]["p50"] = json!("fast");
        let err = SweepRow::from_report(&r).unwrap_err();
        assert!(format!("{err:#}").contains("\"fast\""), "{err:#}");
    }

    #[test]
    fn a_file_missing_a_field_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = serde_json::to_value(report("m", 1, 1.0, &[])).unwrap();
        r["summary"]["tpot"].as_object_mut().unwrap().remove("p99");
        let text = serde_json::to_string_pretty(&r).unwrap();
        let p = dir.path().join("broken.json");
        std::fs::write(&p, &text).unwrap();
        let err = summarize_files(&[p], &dir.path().join("out")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("broken.json"), "{msg}");
        assert!(msg.contains("missing field `p99` at line"), "{msg}");
        // The line is the end of the `tpot` object that lacks it.
        let line: usize = msg
            .rsplit("at line ")
            .next()
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        let tpot = 1 + text.lines().position(|l| l.contains("\"tpot\"")).unwrap();
        assert!((tpot..tpot + 8).contains(&line), "{msg}\n{text}");
    }

    #[test]
    fn files_become_a_table_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (i, r) in [report("m", 0, 10.0, &[""]), report("m", 4, 9.0, &["x"])]
            .iter()
            .enumerate()
        {
            let p = dir.path().join(format!("r{i}.json"));
            r.write(&p).unwrap();
            files.push(p);
        }
        let out = dir.path().join("out");
        let written = summarize_files(&files, &out).unwrap();
        let md = std::fs::read_to_string(out.join("results.md")).unwrap();
        assert!(md.contains("| m | 4 | 1 |") && md.contains("0.90"), "{md}");
        assert!(md.contains("bench m 4"));
        assert!(written.iter().all(|p| p.is_file()));
    }
}
