//! The shape of a load test's traffic, all seeded: when requests arrive (Poisson or
//! gamma inter-arrival times), which adapter each names (uniform, S-LoRA's power law,
//! Zipf, Punica's distinct and identical), and how long prompts and outputs are (fixed,
//! uniform range, log-normal). Each parses from its command-line form.
use crate::rng::Xoshiro256;
use anyhow::{bail, Context, Result};

/// Exponential with rate 1.
fn exponential(rng: &mut Xoshiro256) -> f64 {
    // 1 - u is in (0, 1]: the log is finite.
    -(1.0 - rng.next_f64()).ln()
}

/// Standard normal (Box-Muller).
fn normal(rng: &mut Xoshiro256) -> f64 {
    let u1 = 1.0 - rng.next_f64();
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Gamma(shape, 1) by Marsaglia and Tsang (shape < 1 through the boost
/// `Gamma(k) = Gamma(k + 1) * U^(1/k)`).
fn gamma(rng: &mut Xoshiro256, shape: f64) -> f64 {
    if shape < 1.0 {
        let boost = rng.next_f64().max(f64::MIN_POSITIVE).powf(1.0 / shape);
        return gamma(rng, shape + 1.0) * boost;
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.next_f64();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Inter-arrival times of an open loop at `rate` requests per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrivals {
    /// Exponential gaps: coefficient of variation 1.
    Poisson { rate: f64 },
    /// Gamma gaps with the given coefficient of variation (above 1: bursty).
    Gamma { rate: f64, cv: f64 },
}

impl Arrivals {
    /// `rate` > 0; `cv` 1 is Poisson.
    pub fn new(rate: f64, cv: f64) -> Result<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a positive number of requests per second, got {rate}");
        }
        if !(cv.is_finite() && cv > 0.0) {
            bail!("--cv must be positive, got {cv}");
        }
        Ok(if cv == 1.0 {
            Self::Poisson { rate }
        } else {
            Self::Gamma { rate, cv }
        })
    }

    /// Seconds until the next arrival.
    pub fn next_gap(&self, rng: &mut Xoshiro256) -> f64 {
        match *self {
            Self::Poisson { rate } => exponential(rng) / rate,
            Self::Gamma { rate, cv } => {
                // Mean 1/rate, variance cv^2/rate^2: shape 1/cv^2, scale cv^2/rate.
                let shape = 1.0 / (cv * cv);
                gamma(rng, shape) * cv * cv / rate
            }
        }
    }
}

/// Which adapter a request names, among `n`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Popularity {
    Uniform,
    /// S-LoRA's: index = floor(X * n) with X ~ power(alpha) (density alpha x^(alpha-1)
    /// on [0, 1]); alpha < 1 concentrates on low indices, 1 is uniform.
    PowerLaw {
        alpha: f64,
    },
    /// P(i) proportional to 1 / (i + 1)^s.
    Zipf {
        s: f64,
    },
    /// Punica's: request j names adapter j mod n (every adapter equally, in turn).
    Distinct,
    /// Punica's: every request names adapter 0.
    Identical,
}

impl Popularity {
    /// `uniform`, `powerlaw:ALPHA`, `zipf:S`, `distinct` or `identical`.
    pub fn parse(spec: &str) -> Result<Self> {
        let param = |v: &str| -> Result<f64> {
            let x: f64 = v
                .parse()
                .with_context(|| format!("--popularity {spec:?}: {v:?} is not a number"))?;
            if !(x.is_finite() && x > 0.0) {
                bail!("--popularity {spec:?}: the parameter must be positive");
            }
            Ok(x)
        };
        Ok(match spec.split_once(':') {
            None if spec == "uniform" => Self::Uniform,
            None if spec == "distinct" => Self::Distinct,
            None if spec == "identical" => Self::Identical,
            Some(("powerlaw", a)) => Self::PowerLaw { alpha: param(a)? },
            Some(("zipf", s)) => Self::Zipf { s: param(s)? },
            _ => bail!(
                "--popularity {spec:?}: use uniform, powerlaw:ALPHA, zipf:S, distinct or identical"
            ),
        })
    }

    /// A sampler over `n` adapters (`n` >= 1).
    pub fn sampler(&self, n: usize) -> AdapterPicker {
        let n = n.max(1);
        let cdf = match *self {
            Self::Zipf { s } => {
                let w: Vec<f64> = (0..n).map(|i| ((i + 1) as f64).powf(-s)).collect();
                let total: f64 = w.iter().sum();
                let mut acc = 0.0;
                w.iter()
                    .map(|x| {
                        acc += x / total;
                        acc
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        AdapterPicker {
            kind: *self,
            n,
            cdf,
            next: 0,
        }
    }
}

/// Draws adapter indices for successive requests.
#[derive(Clone, Debug)]
pub struct AdapterPicker {
    kind: Popularity,
    n: usize,
    cdf: Vec<f64>,
    next: usize,
}

impl AdapterPicker {
    pub fn pick(&mut self, rng: &mut Xoshiro256) -> usize {
        let n = self.n;
        match self.kind {
            Popularity::Uniform => ((rng.next_f64() * n as f64) as usize).min(n - 1),
            Popularity::PowerLaw { alpha } => {
                let x = rng.next_f64().powf(1.0 / alpha);
                ((x * n as f64) as usize).min(n - 1)
            }
            Popularity::Zipf { .. } => {
                let u = rng.next_f64();
                self.cdf.partition_point(|c| *c <= u).min(n - 1)
            }
            Popularity::Distinct => {
                let i = self.next % n;
                self.next += 1;
                i
            }
            Popularity::Identical => 0,
        }
    }
}

/// A length in tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Length {
    Fixed(usize),
    /// Uniform over `lo..=hi`.
    Uniform {
        lo: usize,
        hi: usize,
    },
    /// exp(N(mu, sigma)) rounded, with the given mean (`mu` derived from it), at least 1.
    LogNormal {
        mean: f64,
        sigma: f64,
    },
}

impl Length {
    /// `N`, `LO-HI` or `lognormal:MEAN,SIGMA`.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || format!("length {spec:?}: use N, LO-HI or lognormal:MEAN,SIGMA");
        if let Some(rest) = spec.strip_prefix("lognormal:") {
            let (m, s) = rest.split_once(',').with_context(bad)?;
            let mean: f64 = m.trim().parse().with_context(bad)?;
            let sigma: f64 = s.trim().parse().with_context(bad)?;
            if !(mean >= 1.0 && mean.is_finite() && sigma >= 0.0 && sigma.is_finite()) {
                bail!("{}: the mean must be >= 1 and sigma >= 0", bad());
            }
            return Ok(Self::LogNormal { mean, sigma });
        }
        if let Some((lo, hi)) = spec.split_once('-') {
            let lo: usize = lo.trim().parse().with_context(bad)?;
            let hi: usize = hi.trim().parse().with_context(bad)?;
            if lo == 0 || hi < lo {
                bail!("{}: need 1 <= LO <= HI", bad());
            }
            return Ok(Self::Uniform { lo, hi });
        }
        let n: usize = spec.trim().parse().with_context(bad)?;
        if n == 0 {
            bail!("{}: must be at least 1", bad());
        }
        Ok(Self::Fixed(n))
    }

    pub fn sample(&self, rng: &mut Xoshiro256) -> usize {
        match *self {
            Self::Fixed(n) => n,
            Self::Uniform { lo, hi } => {
                lo + ((rng.next_f64() * (hi - lo + 1) as f64) as usize).min(hi - lo)
            }
            Self::LogNormal { mean, sigma } => {
                // E[exp(N(mu, s))] = exp(mu + s^2 / 2).
                let mu = mean.ln() - sigma * sigma / 2.0;
                ((mu + sigma * normal(rng)).exp().round() as usize).max(1)
            }
        }
    }
}

#[cfg(test)]
#[path = "workload_tests.rs"]
mod tests;
