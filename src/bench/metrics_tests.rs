//! Metric arithmetic on hand-made timings with known answers.
use super::*;

fn rec(tenant: &str, start: f64, tokens: &[f64], end: f64) -> RequestRecord {
    RequestRecord {
        adapter: format!("adapter-{tenant}"),
        tenant: tenant.into(),
        start,
        token_times: tokens.to_vec(),
        end,
        error: None,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn per_request_latencies() {
    // Sent at 1.0; tokens at 1.5, 1.7, 2.0, 2.1; final at 2.1.
    let r = rec("a", 1.0, &[1.5, 1.7, 2.0, 2.1], 2.1);
    assert!(close(r.ttft().unwrap(), 0.5));
    assert!(close(r.e2e(), 1.1));
    // (1.1 - 0.5) / 3
    assert!(close(r.tpot().unwrap(), 0.2));
    let itl: Vec<f64> = r.itls().collect();
    assert_eq!(itl.len(), 3);
    assert!(close(itl[0], 0.2) && close(itl[1], 0.3) && close(itl[2], 0.1));
    let one = rec("a", 0.0, &[0.4], 0.5);
    assert_eq!(one.tpot(), None);
    assert_eq!(rec("a", 0.0, &[], 0.5).ttft(), None);
}

#[test]
fn percentiles_interpolate_like_numpy() {
    let v: Vec<f64> = (1..=10).map(f64::from).collect();
    // numpy.percentile(range(1, 11), [50, 90, 99, 99.9]) = 5.5, 9.1, 9.91, 9.991
    assert!(close(percentile(&v, 0.5), 5.5));
    assert!(close(percentile(&v, 0.9), 9.1));
    assert!(close(percentile(&v, 0.99), 9.91));
    assert!(close(percentile(&v, 0.999), 9.991));
    assert!(close(percentile(&v, 1.0), 10.0));
    assert!(close(percentile(&[3.0], 0.9), 3.0));
    assert!(percentile(&[], 0.5).is_nan());
    let p = Percentiles::of([4.0, 1.0, 3.0, 2.0]);
    assert_eq!((p.count, p.max), (4, 4.0));
    assert!(close(p.mean, 2.5) && close(p.p50, 2.5));
}

#[test]
fn summary_throughput_goodput_and_errors() {
    let mut failed = rec("b", 0.0, &[], 0.2);
    failed.error = Some("NOT_FOUND".into());
    let mut cancelled = rec("b", 0.0, &[], 0.3);
    cancelled.error = Some("CANCELLED".into());
    let records = [
        rec("a", 0.0, &[0.1, 0.2, 0.3], 0.3),      // ttft 0.1, tpot 0.1
        rec("a", 1.0, &[1.5, 1.6], 1.6),           // ttft 0.5, tpot 0.1
        rec("b", 2.0, &[2.2, 2.6, 3.0, 3.4], 3.4), // ttft 0.2, tpot 0.4
        failed.clone(),
        cancelled.clone(),
    ];
    let refs: Vec<&RequestRecord> = records.iter().collect();
    let slo = Slo::parse("ttft=300ms,tpot=0.2").unwrap();
    let s = summarize(&refs, 4.0, Some(&slo));
    assert_eq!((s.requests, s.succeeded, s.output_tokens), (5, 3, 9));
    assert_eq!(s.errors.get("NOT_FOUND"), Some(&1));
    assert_eq!(s.errors.get("CANCELLED"), Some(&1));
    assert!(close(s.request_throughput, 0.75));
    assert!(close(s.token_throughput, 2.25));
    // Only the first request meets both targets.
    assert!(close(s.goodput.unwrap(), 0.25));
    assert_eq!(s.ttft.count, 3);
    assert!(close(s.ttft.p50, 0.2) && close(s.ttft.max, 0.5));
    assert!(close(s.tpot.max, 0.4));
    assert_eq!(s.itl.count, 2 + 1 + 3);
    assert!(close(s.e2e.max, 1.4));

    let by_tenant = summarize_by(&records, |r| &r.tenant, 4.0, None);
    assert_eq!(by_tenant["a"].succeeded, 2);
    assert_eq!(by_tenant["b"].requests, 3);
    assert_eq!(by_tenant["b"].errors.len(), 2);
    assert_eq!(by_tenant["b"].goodput, None);
}

#[test]
fn slo_parsing() {
    let s = Slo::parse("ttft=1.5,tpot=20ms").unwrap();
    assert!(close(s.ttft, 1.5) && close(s.tpot, 0.02));
    assert_eq!(Slo::parse("tpot=2s").unwrap().ttft, f64::INFINITY);
    for bad in ["", "ttft", "ttft=-1", "latency=1", "ttft=abc"] {
        assert!(Slo::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn fairness_gap_counts_only_tenants_backlogged_all_window() {
    let records = [
        // a: backlogged over [0, 10] in two back-to-back requests, 6 tokens in window.
        rec("a", 0.0, &[1.0, 2.0, 3.0], 5.0),
        rec("a", 5.0, &[6.0, 7.0, 8.0], 10.0),
        // b: backlogged all window, 2 tokens (one before the window is not counted).
        rec("b", -1.0, &[-0.5, 4.0, 9.0], 10.5),
        // c: idle between 3 and 4: not backlogged, ignored however little it got.
        rec("c", 0.0, &[1.0], 3.0),
        rec("c", 4.0, &[5.0], 10.0),
    ];
    assert_eq!(fairness_gap(&records, 0.0, 10.0), Some(4));
    assert_eq!(fairness_gap(&records[..2], 0.0, 10.0), None);
}
