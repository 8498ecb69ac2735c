//! Plots from hand-made records and sweep points: files, lines, legends, known values.
use super::*;

fn rec(start: f64, tokens: &[f64], end: f64) -> RequestRecord {
    RequestRecord {
        adapter: "a".into(),
        tenant: "t".into(),
        start,
        token_times: tokens.to_vec(),
        end,
        error: None,
    }
}

fn failed(start: f64, end: f64) -> RequestRecord {
    RequestRecord {
        error: Some("UNAVAILABLE".into()),
        ..rec(start, &[], end)
    }
}

fn point(series: &str, adapters: usize, tok_s: f64, ttft: f64) -> SweepPoint {
    SweepPoint {
        series: series.into(),
        adapters,
        throughput_tok_s: tok_s,
        ttft_p50: ttft,
        ttft_p99: ttft * 3.0,
        tpot_p50: 0.02,
        tpot_p99: 0.05,
    }
}

fn read(path: &Path) -> String {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{svg:.80}"
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    svg
}

/// A `<text>` element holding exactly `label` (plotters puts it on its own line).
fn has_text(svg: &str, label: &str) -> bool {
    svg.contains(&format!(">\n{label}\n</text>"))
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    paths.iter().map(name).collect()
}

/// `<polyline` elements stroked in `color` (plotters writes `stroke="#RRGGBB"`).
fn lines_in(svg: &str, color: RGBColor) -> usize {
    let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
    let l = |l: &&str| l.contains("<polyline") && l.contains(&stroke);
    svg.split_inclusive("/>").filter(l).count()
}

fn sample_run() -> Vec<RequestRecord> {
    vec![
        rec(0.0, &[0.1, 0.2, 0.3], 0.3),
        rec(0.5, &[1.0, 1.2, 1.5, 1.6], 1.6),
        rec(1.1, &[1.4, 2.2], 2.5),
        failed(0.2, 0.4),
    ]
}

#[test]
fn cdf_points_are_hand_checked_and_end_at_one() {
    let p = cdf_points(vec![3.0, 1.0, f64::NAN, 2.0]);
    let want = [(1.0, 0.0), (1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)];
    assert_eq!(p.len(), want.len());
    for (a, b) in p.iter().zip(want) {
        assert!(
            (a.0 - b.0).abs() < 1e-12 && (a.1 - b.1).abs() < 1e-12,
            "{p:?}"
        );
    }
    assert!(cdf_points(Vec::new()).is_empty());
    // Thinned: bounded, first (min, 0) and last (max, 1) kept, fractions rising.
    let big = cdf_points((0..100_000).rev().map(f64::from).collect());
    assert!(big.len() <= MAX_POINTS + 1);
    assert_eq!(big[0], (0.0, 0.0));
    assert_eq!(big[big.len() - 1], (99_999.0, 1.0));
    assert!(big.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
}

#[test]
fn token_rate_counts_one_second_buckets() {
    // Tokens at 0.1 0.2 0.3 | 1.0 1.2 1.5 1.6 1.4 | 2.2 -> 3, 5, 1 per second.
    let p = token_rate(&sample_run());
    let want = [
        (0.0, 3.0),
        (1.0, 3.0),
        (1.0, 5.0),
        (2.0, 5.0),
        (2.0, 1.0),
        (3.0, 1.0),
    ];
    assert_eq!(p, want);
    assert!(token_rate(&[]).is_empty());
}

#[test]
fn in_flight_steps_at_starts_and_ends() {
    // In flight: [0, 1) 1, [1, 2) 2, [2, 2.5) 2 (one ends and one starts at 2), [2.5, 3) 1.
    let r = [rec(0.0, &[], 2.0), rec(1.0, &[], 3.0), rec(2.0, &[], 2.5)];
    let p = in_flight(&r);
    assert_eq!(p.len(), MAX_POINTS + 1);
    let at = |t: f64| p.chunks(2).find(|c| c[0].0 <= t && t < c[1].0).unwrap()[0].1;
    let got: Vec<f64> = [0.5, 0.99, 1.5, 2.25, 2.75].map(at).to_vec();
    assert_eq!(got, [1.0, 1.0, 2.0, 2.0, 1.0]);
    assert_eq!(p.iter().map(|q| q.1).fold(0.0, f64::max), 2.0);
    assert_eq!(p[p.len() - 1], (3.0, 0.0));
    // 5000 requests sent over 50 s, all ending at 100 s: peak kept, back to zero.
    let many: Vec<_> = (0..5000)
        .map(|i| rec(f64::from(i) * 0.01, &[], 100.0))
        .collect();
    let p = in_flight(&many);
    assert!(p.len() <= MAX_POINTS + 1);
    assert_eq!(p.iter().map(|q| q.1).fold(0.0, f64::max), 5000.0);
    assert_eq!(p[p.len() - 1], (100.0, 0.0));
    assert!(in_flight(&[]).is_empty());
}

#[test]
fn run_plots_have_a_line_and_legend_entry_per_metric() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plots");
    let paths = write_run_plots(&sample_run(), &out).unwrap();
    assert_eq!(names(&paths), ["latency_cdf.svg", "throughput.svg"]);
    let cdf = read(&paths[0]);
    // n counts successful requests only (3 TTFTs, 3 TPOTs, 6 ITLs, 3 E2Es).
    for label in [
        "TTFT (n=3)",
        "TPOT (n=3)",
        "ITL (n=6)",
        "E2E (n=3)",
        "latency (ms, log scale)",
    ] {
        assert!(has_text(&cdf, label), "missing {label}");
    }
    for color in &[color(0), color(1), color(2), color(3)] {
        // The line and its legend sample.
        assert_eq!(lines_in(&cdf, *color), 2, "{color:?}");
    }
    let tp = read(&paths[1]);
    for label in [
        "output tok/s",
        "in flight",
        "Requests in flight",
        "seconds since start",
    ] {
        assert!(tp.contains(label), "missing {label}");
    }
    assert_eq!(lines_in(&tp, color(0)), 2);
    assert_eq!(lines_in(&tp, color(1)), 2);
}

#[test]
fn cdf_lines_reach_the_top_of_the_y_range() {
    // Every CDF ends at fraction 1: all four lines end on the same pixel row, which is
    // the highest (smallest y) vertex of each.
    let dir = tempfile::tempdir().unwrap();
    let paths = write_run_plots(&sample_run(), dir.path()).unwrap();
    let cdf = read(&paths[0]);
    let mut ends = Vec::new();
    for el in cdf
        .split_inclusive("/>")
        .filter(|l| l.contains("<polyline"))
    {
        let pts = el
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let ys: Vec<i32> = pts
            .split_whitespace()
            .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
            .collect();
        if ys.len() > 2 {
            assert_eq!(ys[ys.len() - 1], *ys.iter().min().unwrap());
            ends.push(ys[ys.len() - 1]);
        }
    }
    assert_eq!(ends.len(), 4);
    assert!(ends.iter().all(|&y| y == ends[0]), "{ends:?}");
}

#[test]
fn run_plots_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_run_plots(&sample_run(), &dir.path().join("a")).unwrap();
    let b = write_run_plots(&sample_run(), &dir.path().join("b")).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
    }
}

#[test]
fn degenerate_runs_still_write_valid_plots_or_clear_errors() {
    let cases: [Vec<RequestRecord>; 5] = [
        Vec::new(),
        vec![rec(0.0, &[0.5], 0.5)],
        vec![failed(0.0, 1.0), failed(0.5, 2.0)],
        vec![rec(0.0, &[0.0, 0.0], 0.0)],
        vec![rec(f64::NAN, &[f64::INFINITY], f64::NAN)],
    ];
    for (i, records) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_run_plots(records, dir.path()).unwrap();
        assert_eq!(paths.len(), 2, "case {i}");
        let cdf = read(&paths[0]);
        read(&paths[1]);
        if i == 0 || i == 2 {
            assert!(cdf.contains("(no data)"), "case {i}");
        }
    }
    // Absolute (epoch) times instead of run-relative ones: an error, not a huge plot.
    let epoch = [rec(1.7e9, &[1.7e9 + 0.1], 1.7e9 + 0.2)];
    let err = write_run_plots(&epoch, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(
        format!("{err:#}").contains("seconds since the run started"),
        "{err:#}"
    );
}

#[test]
fn sweep_plots_draw_series_and_dashed_base_lines() {
    let points = [
        point("llama-1b", 0, 1000.0, 0.05),
        point("llama-1b", 1, 950.0, 0.06),
        point("llama-1b", 8, 900.0, 0.07),
        point("llama-1b", 64, 700.0, 0.09),
        point("qwen-0.5b", 1, 1500.0, 0.04),
        point("qwen-0.5b", 64, 1200.0, 0.05),
        point("qwen-0.5b", 64, 1000.0, f64::NAN), // averaged with the one above
        point("qwen-0.5b", 0, 1600.0, 0.03),
    ];
    let dir = tempfile::tempdir().unwrap();
    let paths = write_sweep_plots(&points, dir.path()).unwrap();
    assert_eq!(names(&paths), ["sweep_throughput.svg", "sweep_latency.svg"]);
    let tp = read(&paths[0]);
    for label in [
        "llama-1b",
        "qwen-0.5b",
        "llama-1b base only",
        "qwen-0.5b base only",
    ] {
        assert!(has_text(&tp, label), "missing {label}");
    }
    assert!(has_text(&tp, "adapters (log scale)") && has_text(&tp, "Output tokens/s"));
    // Solid line + legend + base dashes (several polylines) + dashed legend (two).
    assert!(lines_in(&tp, color(0)) >= 6, "{}", lines_in(&tp, color(0)));
    assert!(lines_in(&tp, color(1)) >= 6);
    // One marker per adapter count (3 for llama, 2 for qwen) and one per legend entry.
    assert_eq!(tp.matches("<circle").count(), 5 + 2);
    let lat = read(&paths[1]);
    for label in [
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "TPOT p50 (ms)",
        "qwen-0.5b base only",
    ] {
        assert!(has_text(&lat, label), "missing {label}");
    }
    assert_eq!(lat.matches("<circle").count(), 3 * (5 + 2));
    // The averaged qwen point: (1200 + 1000) / 2 = 1100 tok/s, between its neighbours.
    let groups = group_series(&points);
    let lines = sweep_lines(&groups, |p| p.throughput_tok_s, (0.5, 100.0));
    let qwen = lines.iter().find(|l| l.label == "qwen-0.5b").unwrap();
    assert_eq!(qwen.points, [(1.0, 1500.0), (64.0, 1100.0)]);
    let base = lines
        .iter()
        .find(|l| l.label == "llama-1b base only")
        .unwrap();
    assert!(base.kind == Kind::Dashed && base.color == color(0));
    assert_eq!(base.points, [(0.5, 1000.0), (100.0, 1000.0)]);
    // Deterministic.
    let again = write_sweep_plots(&points, &dir.path().join("again")).unwrap();
    assert_eq!(
        std::fs::read(&paths[0]).unwrap(),
        std::fs::read(&again[0]).unwrap()
    );
}

#[test]
fn degenerate_sweeps_still_write_valid_plots() {
    let cases: [Vec<SweepPoint>; 4] = [
        Vec::new(),
        vec![point("m", 0, 100.0, 0.1)],
        vec![point("m", 4, 100.0, 0.1)],
        vec![point("m", 2, f64::NAN, f64::NAN), point("m", 0, 0.0, 0.0)],
    ];
    for (i, points) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_sweep_plots(points, dir.path()).unwrap();
        assert_eq!(paths.len(), 2, "case {i}");
        let tp = read(&paths[0]);
        read(&paths[1]);
        assert_eq!(tp.contains("(no data)"), i == 0, "case {i}");
    }
}

#[test]
fn tick_labels_are_short() {
    let f = |v: f64| fmt_num(&v);
    assert_eq!(f(0.0), "0");
    assert_eq!(f(1.0), "1");
    assert_eq!(f(1024.0), "1024");
    assert_eq!(f(0.25), "0.25");
    assert_eq!(f(12.345), "12.3");
    assert_eq!(f(0.001234), "0.00123");
}
