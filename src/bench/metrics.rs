//! What a load test reports, from per-request records: TTFT, TPOT, ITL and end-to-end
//! latency percentiles, request and token throughput, goodput against an SLO, errors by
//! gRPC code, the same per adapter and per tenant, and the fairness gap between
//! backlogged tenants. Definitions follow vLLM's benchmark so numbers compare:
//! TPOT = (end-to-end - TTFT) / (output tokens - 1); ITL = every gap between streamed
//! tokens; percentiles interpolate linearly between ranks (numpy's default).
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One request as the client saw it; times are seconds since the run started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub adapter: String,
    pub tenant: String,
    /// When the request was sent.
    pub start: f64,
    /// When each output token arrived.
    pub token_times: Vec<f64>,
    /// When the final message (or the error) arrived.
    pub end: f64,
    /// The gRPC code name of a failure (`NOT_FOUND`, ...); None on success.
    pub error: Option<String>,
}

impl RequestRecord {
    pub fn ttft(&self) -> Option<f64> {
        self.token_times.first().map(|t| t - self.start)
    }

    pub fn e2e(&self) -> f64 {
        self.end - self.start
    }

    /// Time per output token after the first; None with fewer than two tokens.
    pub fn tpot(&self) -> Option<f64> {
        let n = self.token_times.len();
        (n >= 2).then(|| (self.e2e() - self.ttft().unwrap_or(0.0)) / (n - 1) as f64)
    }

    pub fn itls(&self) -> impl Iterator<Item = f64> + '_ {
        self.token_times.windows(2).map(|w| w[1] - w[0])
    }
}

/// A latency target: a request meets it if its TTFT and its TPOT are within it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    pub ttft: f64,
    pub tpot: f64,
}

impl Slo {
    /// `ttft=500ms,tpot=50ms` (units `s` or `ms`; a bare number is seconds).
    pub fn parse(spec: &str) -> Result<Self> {
        let (mut ttft, mut tpot) = (None, None);
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .with_context(|| format!("--slo {spec:?}: expected ttft=..,tpot=.."))?;
            let secs = parse_seconds(value.trim())
                .with_context(|| format!("--slo {spec:?}: bad time {value:?}"))?;
            match key.trim() {
                "ttft" => ttft = Some(secs),
                "tpot" => tpot = Some(secs),
                other => bail!("--slo {spec:?}: unknown key {other:?} (ttft, tpot)"),
            }
        }
        Ok(Self {
            ttft: ttft.unwrap_or(f64::INFINITY),
            tpot: tpot.unwrap_or(f64::INFINITY),
        })
    }

    /// A successful request within both targets (one without a TPOT meets that part).
    pub fn met_by(&self, r: &RequestRecord) -> bool {
        r.error.is_none()
            && r.ttft().is_some_and(|t| t <= self.ttft)
            && r.tpot().is_none_or(|t| t <= self.tpot)
    }
}

fn parse_seconds(v: &str) -> Result<f64> {
    let (num, scale) = match v.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (v.strip_suffix('s').unwrap_or(v), 1.0),
    };
    let x: f64 = num.trim().parse()?;
    if !(x.is_finite() && x > 0.0) {
        bail!("must be positive");
    }
    Ok(x * scale)
}

/// The `q`-quantile (0..=1) of sorted values, interpolating linearly between ranks.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let (lo, frac) = (pos.floor() as usize, pos.fract());
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        }
    }
}

/// Summary statistics of one latency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        Self {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile(&v, 0.5),
            p90: percentile(&v, 0.9),
            p99: percentile(&v, 0.99),
            p999: percentile(&v, 0.999),
            max: v[v.len() - 1],
        }
    }
}

/// What a set of requests amounted to over a window of `duration` seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: usize,
    pub succeeded: usize,
    /// Failed requests by gRPC code name.
    pub errors: BTreeMap<String, usize>,
    pub output_tokens: usize,
    pub duration: f64,
    pub request_throughput: f64,
    pub token_throughput: f64,
    /// Requests per second that succeeded within the SLO (when one is given).
    pub goodput: Option<f64>,
    pub ttft: Percentiles,
    pub tpot: Percentiles,
    pub itl: Percentiles,
    pub e2e: Percentiles,
}

pub fn summarize(records: &[&RequestRecord], duration: f64, slo: Option<&Slo>) -> Summary {
    let ok: Vec<&&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
    let mut errors = BTreeMap::new();
    for r in records {
        if let Some(code) = &r.error {
            *errors.entry(code.clone()).or_insert(0) += 1;
        }
    }
    let output_tokens = records.iter().map(|r| r.token_times.len()).sum();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    Summary {
        requests: records.len(),
        succeeded: ok.len(),
        errors,
        output_tokens,
        duration,
        request_throughput: per_s(ok.len() as f64),
        token_throughput: per_s(output_tokens as f64),
        goodput: slo.map(|s| per_s(records.iter().filter(|r| s.met_by(r)).count() as f64)),
        ttft: Percentiles::of(ok.iter().filter_map(|r| r.ttft())),
        tpot: Percentiles::of(ok.iter().filter_map(|r| r.tpot())),
        itl: Percentiles::of(ok.iter().flat_map(|r| r.itls())),
        e2e: Percentiles::of(ok.iter().map(|r| r.e2e())),
    }
}

/// One summary per value of `key` (adapter, tenant).
pub fn summarize_by(
    records: &[RequestRecord],
    key: impl Fn(&RequestRecord) -> &str,
    duration: f64,
    slo: Option<&Slo>,
) -> BTreeMap<String, Summary> {
    let mut groups: BTreeMap<String, Vec<&RequestRecord>> = BTreeMap::new();
    for r in records {
        groups.entry(key(r).to_string()).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|(k, rs)| (k, summarize(&rs, duration, slo)))
        .collect()
}

/// Whether the union of `intervals` covers `[from, to]`.
fn covers(mut intervals: Vec<(f64, f64)>, from: f64, to: f64) -> bool {
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut reached = from;
    for (s, e) in intervals {
        if s > reached {
            break;
        }
        reached = reached.max(e);
    }
    reached >= to
}

/// The largest difference in output tokens served within `[from, to]` between tenants
/// that were backlogged (had a request in flight) for the whole window; None with fewer
/// than two such tenants.
pub fn fairness_gap(records: &[RequestRecord], from: f64, to: f64) -> Option<usize> {
    let mut by_tenant: BTreeMap<&str, Vec<&RequestRecord>> = BTreeMap::new();
    for r in records {
        by_tenant.entry(r.tenant.as_str()).or_default().push(r);
    }
    let served: Vec<usize> = by_tenant
        .values()
        .filter(|rs| covers(rs.iter().map(|r| (r.start, r.end)).collect(), from, to))
        .map(|rs| {
            rs.iter()
                .flat_map(|r| &r.token_times)
                .filter(|t| (from..=to).contains(*t))
                .count()
        })
        .collect();
    if served.len() < 2 {
        return None;
    }
    Some(served.iter().max()? - served.iter().min()?)
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
