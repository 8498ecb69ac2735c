//! SVG plots of a run (latency CDFs, throughput over time) and of a sweep.
//!
//! Drawn with plotters' SVG backend and its built-in text-size estimate, so no font
//! library is needed: labels are `<text>` elements the viewer lays out. The output
//! depends only on the input (same records or points, same bytes). Long runs are
//! thinned to a few thousand vertices per line so the files stay small.
use super::metrics::RequestRecord;
use anyhow::{Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One run of a sweep over adapter counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepPoint {
    /// The model (one line per series).
    pub series: String,
    /// Adapters requests were drawn from; 0 = base model only.
    pub adapters: usize,
    pub throughput_tok_s: f64,
    pub ttft_p50: f64,
    pub ttft_p99: f64,
    pub tpot_p50: f64,
    pub tpot_p99: f64,
}

/// Most vertices drawn for one line; longer data is thinned (CDF ranks, time bins).
const MAX_POINTS: usize = 2000;

/// Line colours (matplotlib's tab10), picked in order.
const PALETTE: [u32; 10] = [
    0x1f77b4, 0xff7f0e, 0x2ca02c, 0xd62728, 0x9467bd, 0x8c564b, 0xe377c2, 0x7f7f7f, 0xbcbd22,
    0x17becf,
];

fn color(i: usize) -> RGBColor {
    let [_, r, g, b] = PALETTE[i % PALETTE.len()].to_be_bytes();
    RGBColor(r, g, b)
}

/// Writes the run's plots into `dir`; returns their paths.
///
/// `latency_cdf.svg`: empirical CDFs of TTFT, TPOT, ITL and end-to-end latency (ms, log
/// x) over successful requests. `throughput.svg`: output tokens per second in 1-second
/// buckets (top) and requests in flight (bottom), against seconds since the run began.
/// Empty input gives empty axes titled "(no data)".
pub fn write_run_plots(records: &[RequestRecord], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let horizon = (records.iter())
        .flat_map(|r| r.token_times.iter().chain([&r.start, &r.end]))
        .filter(|t| t.is_finite())
        .fold(1.0, |a, &b| f64::max(a, b));
    let why = "record times must be seconds since the run started";
    anyhow::ensure!(horizon <= 1e6, "run spans {horizon} s: {why}");
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
    let ms = |v: Vec<f64>| v.into_iter().map(|s| s * 1e3).collect::<Vec<_>>();
    let metrics = [
        ("TTFT", ms(ok.iter().filter_map(|r| r.ttft()).collect())),
        ("TPOT", ms(ok.iter().filter_map(|r| r.tpot()).collect())),
        ("ITL", ms(ok.iter().flat_map(|r| r.itls()).collect())),
        ("E2E", ms(ok.iter().map(|r| r.e2e()).collect())),
    ];
    let all = metrics.iter().flat_map(|(_, v)| v.iter().copied());
    let (lo, hi) = log_bounds(all.filter(|v| v.is_finite() && *v > 0.0), 1.2);
    let lines = (metrics.into_iter().enumerate()).map(|(i, (name, values))| {
        let n = values.iter().filter(|v| v.is_finite()).count();
        let points = cdf_points(values).into_iter();
        let points = points.map(|(x, y)| (x.clamp(lo, hi), y)).collect();
        Line::new(format!("{name} (n={n})"), color(i), points, Kind::Plain)
    });
    let title = "Latency CDF (successful requests)";
    let (x_desc, y_desc) = ("latency (ms, log scale)", "fraction of values <= x");
    let mut cdf = Panel::new(title, x_desc, y_desc, lines.collect());
    cdf.y_range = Some(0.0..1.02);
    let cdf_path = dir.join("latency_cdf.svg");
    let x = (lo..hi).log_scale();
    render(&cdf_path, (900, 600), |root| cdf.draw(&root, x))?;

    let title = "Output tokens per second (1 s buckets)";
    let x_desc = "seconds since start";
    let tokens = Line::new("output tok/s", color(0), token_rate(records), Kind::Plain);
    let rate = Panel::new(title, x_desc, "tokens/s", vec![tokens]);
    let busy = Line::new("in flight", color(1), in_flight(records), Kind::Plain);
    let flight = Panel::new("Requests in flight", x_desc, "requests", vec![busy]);
    let tp_path = dir.join("throughput.svg");
    render(&tp_path, (900, 700), |root| {
        let areas = root.split_evenly((2, 1));
        rate.draw(&areas[0], 0.0..horizon)?;
        flight.draw(&areas[1], 0.0..horizon)
    })?;
    Ok(vec![cdf_path, tp_path])
}

/// Writes the sweep's plots into `dir`; returns their paths.
///
/// `sweep_throughput.svg`: output tokens/s against adapters (log x), one line per
/// series; a series' base-only run (adapters = 0) is a dashed horizontal line in its
/// colour labelled "<series> base only". `sweep_latency.svg`: TTFT p50, TTFT p99 and
/// TPOT p50 (ms), one panel each, drawn the same way. Repeated (series, adapters)
/// points are averaged; non-finite values are left out.
pub fn write_sweep_plots(points: &[SweepPoint], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let groups = group_series(points);
    let adapters = points.iter().filter(|p| p.adapters >= 1);
    let (lo, hi) = log_bounds(adapters.map(|p| p.adapters as f64), 1.25);
    let panel = |y_desc: &'static str, metric: fn(&SweepPoint) -> f64| {
        let lines = sweep_lines(&groups, metric, (lo, hi));
        Panel::new(
            format!("{y_desc} vs adapters"),
            "adapters (log scale)",
            y_desc,
            lines,
        )
    };
    let x = || (lo..hi).log_scale().base(2.0);

    let tp = panel("Output tokens/s", |p| p.throughput_tok_s);
    let tp_path = dir.join("sweep_throughput.svg");
    render(&tp_path, (900, 600), |root| tp.draw(&root, x()))?;

    let panels = [
        panel("TTFT p50 (ms)", |p| p.ttft_p50 * 1e3),
        panel("TTFT p99 (ms)", |p| p.ttft_p99 * 1e3),
        panel("TPOT p50 (ms)", |p| p.tpot_p50 * 1e3),
    ];
    let lat_path = dir.join("sweep_latency.svg");
    render(&lat_path, (900, 1200), |root| {
        let areas = root.split_evenly((panels.len(), 1));
        for (area, p) in areas.iter().zip(&panels) {
            p.draw(area, x())?;
        }
        Ok(())
    })?;
    Ok(vec![tp_path, lat_path])
}

/// One drawn line: its legend label, colour and data-space vertices.
struct Line {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    kind: Kind,
}

/// How a line is drawn.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Plain,
    /// With a dot at each point.
    Markers,
    /// A reference level.
    Dashed,
}

impl Line {
    fn new(label: impl Into<String>, color: RGBColor, points: Vec<(f64, f64)>, kind: Kind) -> Self {
        let label = label.into();
        Self {
            label,
            color,
            points,
            kind,
        }
    }
}

/// One chart: a titled mesh with lines and a legend.
struct Panel {
    title: String,
    x_desc: &'static str,
    y_desc: &'static str,
    /// None: from 0 to a little above the highest value.
    y_range: Option<Range<f64>>,
    lines: Vec<Line>,
}

impl Panel {
    fn new(
        title: impl Into<String>,
        x_desc: &'static str,
        y_desc: &'static str,
        lines: Vec<Line>,
    ) -> Self {
        let (title, y_range) = (title.into(), None);
        Self {
            title,
            x_desc,
            y_desc,
            y_range,
            lines,
        }
    }

    fn draw<X>(&self, area: &DrawingArea<SVGBackend<'_>, Shift>, x: X) -> Result<()>
    where
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let empty = self.lines.iter().all(|l| l.points.is_empty());
        let y_range = self.y_range.clone().unwrap_or_else(|| {
            let top = (self.lines.iter().flat_map(|l| &l.points))
                .map(|p| p.1)
                .filter(|y| y.is_finite())
                .fold(0.0, f64::max);
            0.0..if top > 0.0 { top * 1.1 } else { 1.0 }
        });
        let title = format!("{}{}", self.title, if empty { " (no data)" } else { "" });
        let area = area
            .titled(&title, ("sans-serif", 24))
            .context("drawing the title")?;
        let longest = self.lines.iter().map(|l| l.label.chars().count()).max();
        let legend_w = (longest.unwrap_or(0) as u32 * 8 + 50).clamp(200, 360);
        let (plot, side) = area.split_horizontally(area.dim_in_pixel().0.saturating_sub(legend_w));
        let mut chart = ChartBuilder::on(&plot)
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x, RangedCoordf64::from(y_range))
            .context("laying out the chart")?;
        chart
            .configure_mesh()
            .x_desc(self.x_desc)
            .y_desc(self.y_desc)
            .x_label_formatter(&fmt_num)
            .y_label_formatter(&fmt_num)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .light_line_style(BLACK.mix(0.05))
            .draw()
            .context("drawing the axes")?;
        for line in self.lines.iter().filter(|l| !l.points.is_empty()) {
            let style = line.color.stroke_width(2);
            let pts = line.points.iter().copied();
            if line.kind == Kind::Dashed {
                chart.draw_series(DashedLineSeries::new(pts, 8, 6, style))
            } else {
                chart.draw_series(LineSeries::new(pts, style))
            }
            .context("drawing a line")?;
            if line.kind == Kind::Markers {
                let dot = |&p| Circle::new(p, 3, line.color.filled());
                chart
                    .draw_series(line.points.iter().map(dot))
                    .context("drawing markers")?;
            }
        }
        draw_legend(&side, &self.lines).context("drawing the legend")
    }
}

/// The legend, in its own column right of the chart so it never hides data: a sample
/// of each line (dashed, with a marker, as drawn) and its label.
fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>, lines: &[Line]) -> Result<()> {
    let text =
        TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, line) in lines.iter().enumerate() {
        let y = 30 + 24 * i as i32;
        let style = line.color.stroke_width(2);
        let seg = |a: i32, b: i32| PathElement::new([(a, y), (b, y)], style);
        if line.kind == Kind::Dashed {
            area.draw(&seg(4, 13))?;
            area.draw(&seg(19, 28))?;
        } else {
            area.draw(&seg(4, 28))?;
        }
        if line.kind == Kind::Markers {
            area.draw(&Circle::new((16, y), 3, line.color.filled()))?;
        }
        area.draw(&Text::new(line.label.as_str(), (34, y), &text))?;
    }
    Ok(())
}

/// Draws into an in-memory SVG of `size` pixels and writes it to `path`.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(DrawingArea<SVGBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).context("filling the background")?;
        draw(root.clone()).with_context(|| format!("plotting {}", path.display()))?;
        root.present().context("finishing the SVG")?;
    }
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// A log axis range around positive `values`, widened by `pad` on both sides
/// (a decade around a single value; 1..10 when there are none).
fn log_bounds(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, 0.0_f64), |(l, h), v| (l.min(v), h.max(v)));
    if !(lo.is_finite() && lo > 0.0) {
        (1.0, 10.0)
    } else if hi <= lo {
        (lo / 3.0, hi * 3.0)
    } else {
        (lo / pad, hi * pad)
    }
}

/// The empirical CDF of `values` as (value, fraction <= value), starting at (min, 0)
/// and ending at (max, 1); more than `MAX_POINTS` values are thinned to evenly spaced
/// ranks, always keeping the first and last. Non-finite values are dropped.
fn cdf_points(mut values: Vec<f64>) -> Vec<(f64, f64)> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return Vec::new();
    }
    let ranks: Vec<usize> = if n <= MAX_POINTS {
        (0..n).collect()
    } else {
        (0..MAX_POINTS)
            .map(|k| k * (n - 1) / (MAX_POINTS - 1))
            .collect()
    };
    let steps = ranks
        .iter()
        .map(|&i| (values[i], (i + 1) as f64 / n as f64));
    std::iter::once((values[0], 0.0)).chain(steps).collect()
}

/// Output tokens received in each 1-second bucket `[k, k+1)`, as a step line.
fn token_rate(records: &[RequestRecord]) -> Vec<(f64, f64)> {
    let times = records.iter().flat_map(|r| &r.token_times);
    let mut counts: Vec<usize> = Vec::new();
    for &t in times.filter(|t| t.is_finite()) {
        let k = t.max(0.0).floor() as usize;
        if counts.len() <= k {
            counts.resize(k + 1, 0);
        }
        counts[k] += 1;
    }
    let steps = counts
        .iter()
        .enumerate()
        .map(|(k, &c)| (k as f64, c as f64));
    steps.flat_map(|(k, c)| [(k, c), (k + 1.0, c)]).collect()
}

/// Requests sent but not finished, as a step line: the peak of each of `MAX_POINTS / 2`
/// equal time bins up to the last end (under a pixel wide at the drawn size), then the
/// count after the last end.
fn in_flight(records: &[RequestRecord]) -> Vec<(f64, f64)> {
    let mut events: Vec<(f64, i64)> = records
        .iter()
        .filter(|r| r.start.is_finite() && r.end.is_finite() && r.end >= r.start)
        .flat_map(|r| [(r.start, 1), (r.end, -1)])
        .collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let Some(&(last, _)) = events.last() else {
        return Vec::new();
    };
    let bins = MAX_POINTS / 2;
    let width = last.max(f64::MIN_POSITIVE) / bins as f64;
    let (mut points, mut cur, mut next) = (Vec::new(), 0i64, events.iter().peekable());
    for b in 0..bins {
        let (from, to) = (b as f64 * width, (b + 1) as f64 * width);
        let mut peak = cur;
        while let Some(e) = next.next_if(|e| e.0 < to || b + 1 == bins) {
            cur += e.1;
            peak = peak.max(cur);
        }
        points.extend([(from, peak as f64), (to, peak as f64)]);
    }
    points.push((last, cur as f64));
    points
}

/// Sweep points grouped by series (in order of first appearance), then by adapters.
type Groups<'a> = Vec<(&'a str, BTreeMap<usize, Vec<&'a SweepPoint>>)>;

fn group_series(points: &[SweepPoint]) -> Groups<'_> {
    let mut groups: Groups<'_> = Vec::new();
    for p in points {
        let i = groups.iter().position(|g| g.0 == p.series);
        let i = i.unwrap_or_else(|| {
            groups.push((&p.series, BTreeMap::new()));
            groups.len() - 1
        });
        groups[i].1.entry(p.adapters).or_default().push(p);
    }
    groups
}

/// Per series: `metric` against adapters (>= 1) with markers, and the base-only value
/// as a dashed line across `span`, in the series' colour.
fn sweep_lines(groups: &Groups<'_>, metric: fn(&SweepPoint) -> f64, span: (f64, f64)) -> Vec<Line> {
    let mean = |pts: &[&SweepPoint]| {
        let v: Vec<f64> = pts
            .iter()
            .map(|p| metric(p))
            .filter(|v| v.is_finite())
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut lines = Vec::new();
    for (i, (name, by_adapters)) in groups.iter().enumerate() {
        let color = color(i);
        let points = (by_adapters.range(1..))
            .filter_map(|(&a, pts)| Some((a as f64, mean(pts)?)))
            .collect();
        lines.push(Line::new(*name, color, points, Kind::Markers));
        if let Some(base) = by_adapters.get(&0).and_then(|pts| mean(pts)) {
            let label = format!("{name} base only");
            let flat = vec![(span.0, base), (span.1, base)];
            lines.push(Line::new(label, color, flat, Kind::Dashed));
        }
    }
    lines
}

/// A tick label with about three significant digits and no trailing zeros.
fn fmt_num(v: &f64) -> String {
    if *v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    }
}

#[cfg(test)]
#[path = "plot_tests.rs"]
mod tests;
