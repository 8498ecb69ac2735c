//! Tests of the typed JSON report: the reports stored in bench/results/runs still read,
//! and write back to the same JSON; churn operations round-trip.
use super::*;
use crate::bench::churn::{ChurnKind, ChurnOp, ChurnSummary};
use crate::bench::metrics::RequestRecord;
use crate::bench::sweep::SweepRow;
use std::path::PathBuf;

fn runs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results/runs")
}

#[test]
fn a_stored_report_reads_into_its_fields() {
    let r = Report::read(&runs_dir().join("SmolLM2-135M-8.json")).unwrap();
    assert_eq!(r.setup.label, "SmolLM2-135M");
    assert_eq!(
        (r.setup.adapters, r.setup.requests, r.setup.warmup),
        (8, 120, 8)
    );
    assert_eq!(r.setup.popularity, "powerlaw:1.0");
    assert_eq!((r.setup.rate, r.setup.duration), (Some(3.0), None));
    assert!(r.setup.command.contains("--num-adapters 8"));
    let s = &r.summary;
    assert_eq!((s.requests, s.succeeded, s.output_tokens), (112, 112, 3584));
    assert_eq!(s.ttft.count, 112);
    assert!((s.ttft.p50 - 0.1911678255000009).abs() < 1e-12);
    assert_eq!(r.records.len(), 112);
    assert_eq!(r.records[0].adapter, "a8-5");
    assert_eq!(r.records[0].token_times.len(), 32);
    assert_eq!(r.by_tenant.keys().collect::<Vec<_>>(), ["tenant-0"]);
    assert!(r.churn.is_none() && r.churn_ops.is_empty());
    let row = SweepRow::of(&r);
    assert_eq!(
        (row.series.as_str(), row.adapters, row.adapters_used),
        ("SmolLM2-135M", 8, 8)
    );
}

/// Every stored report reads, and writing it gives back the same JSON: the typed report
/// has the layout the reports were written with.
#[test]
fn every_stored_report_reads_and_writes_back_the_same() {
    let mut seen = 0;
    for entry in std::fs::read_dir(runs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let typed = Report::read(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let untyped: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            serde_json::to_value(&typed).unwrap(),
            untyped,
            "{}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 1, "no reports in {}", runs_dir().display());
}

fn with_churn() -> Report {
    let op = |kind, error: Option<&str>| ChurnOp {
        kind,
        name: "churn-0".into(),
        start: 1.0,
        end: 1.5,
        error: error.map(str::to_string),
    };
    Report {
        setup: Setup {
            label: "m".into(),
            churn: 2.0,
            ..Default::default()
        },
        summary: Default::default(),
        by_adapter: Default::default(),
        by_tenant: Default::default(),
        fairness_gap_tokens: Some(3),
        verify_mismatches: Some(0),
        churn: Some(ChurnSummary {
            loads: 2,
            unloads: 1,
            errors: [("INVALID_ARGUMENT".to_string(), 1)].into(),
            ..Default::default()
        }),
        churn_ops: vec![
            op(ChurnKind::Load, None),
            op(ChurnKind::Unload, None),
            op(ChurnKind::Load, Some("INVALID_ARGUMENT")),
        ],
        records: vec![RequestRecord {
            adapter: "a".into(),
            tenant: "tenant-0".into(),
            start: 0.5,
            token_times: vec![0.75, 1.0],
            end: 1.25,
            error: None,
        }],
    }
}

#[test]
fn a_written_report_reads_back_equal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    let report = with_churn();
    report.write(&path).unwrap();
    assert_eq!(Report::read(&path).unwrap(), report);
    // The layout: setup beside the runner's fields, all at the top level.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "by_adapter",
            "by_tenant",
            "churn",
            "churn_ops",
            "fairness_gap_tokens",
            "records",
            "setup",
            "summary",
            "verify_mismatches"
        ]
    );
    assert_eq!(v["churn_ops"][1]["kind"], "unload");
    assert_eq!(v["setup"]["churn"], 2.0);
}

#[test]
fn an_unknown_churn_kind_is_an_error() {
    let mut v = serde_json::to_value(with_churn()).unwrap();
    v["churn_ops"][0]["kind"] = "reload".into();
    let err = Report::deserialize(&v).unwrap_err().to_string();
    assert!(err.contains("`reload`") && err.contains("unload"), "{err}");
}
