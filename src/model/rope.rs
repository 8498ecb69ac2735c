//! Rotary position embeddings: the rope settings of a config (both forms found in the
//! wild: the classic `rope_theta` + `rope_scaling`, and transformers 5's
//! `rope_parameters`, flat or per layer type) and the cos/sin tables they give, with
//! transformers' arithmetic (f32 inverse frequencies, `angle = position * inv_freq` in
//! f32, cos and sin times the variant's attention factor).
//!
//! Invariant: a rope type or option this module does not compute exactly is refused by
//! name when the config is read, never approximated.
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

/// How the inverse frequencies are scaled (transformers' `rope_type`).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// `default`: `inv_freq = 1 / theta^(2i/d)`.
    #[default]
    None,
    /// `linear`: every frequency divided by `factor` (position interpolation).
    Linear { factor: f32 },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp
    /// between (Llama 3.1+).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
    /// `yarn`: interpolation below the correction range, extrapolation above, a linear
    /// ramp between, and cos/sin times `attention_factor` (Qwen2.5 long context).
    Yarn {
        factor: f32,
        original_max_position_embeddings: f32,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        truncate: bool,
    },
    /// Each frequency divided by its own factor: llama.cpp's `rope_freqs.weight`, how
    /// its GGUF files carry Llama 3's scaling (`[head_dim / 2]`).
    Factors(Vec<f32>),
}

/// One rope: its base and scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scaling: RopeScaling,
}

impl Rope {
    /// The default rope of base `theta`.
    pub fn plain(theta: f32) -> Self {
        Self {
            theta,
            scaling: RopeScaling::None,
        }
    }

    /// Reads one rope-parameter object: transformers 5's `rope_parameters` entry, or the
    /// classic `rope_scaling` object with `theta` beside it (`params` may be null: the
    /// default rope). `max_positions` is the config's `max_position_embeddings`.
    pub fn from_params(params: &Json, theta: Option<f32>, max_positions: usize) -> Result<Self> {
        let number = |key: &str| params.get(key).and_then(Json::as_f64).map(|v| v as f32);
        let theta = number("rope_theta")
            .or(theta)
            .context("the rope has no rope_theta")?;
        if params.is_null() {
            return Ok(Self::plain(theta));
        }
        let Some(obj) = params.as_object() else {
            bail!("rope parameters must be an object, not {params}");
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Json::as_str)
            .unwrap_or("default");
        let need = |key: &str| number(key).with_context(|| format!("rope {kind:?} lacks {key}"));
        let known: &[&str] = match kind {
            "default" => &[],
            "linear" => &["factor"],
            "llama3" => &[
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ],
            "yarn" => &[
                "factor",
                "original_max_position_embeddings",
                "beta_fast",
                "beta_slow",
                "attention_factor",
                "truncate",
            ],
            other => bail!("rope type {other:?} is not supported (default, linear, llama3, yarn)"),
        };
        for key in obj.keys() {
            let general = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
            if !general.contains(&key.as_str()) && !known.contains(&key.as_str()) {
                bail!("rope option {key:?} of rope type {kind:?} is not supported");
            }
        }
        if let Some(p) = number("partial_rotary_factor") {
            if p != 1.0 {
                bail!("partial_rotary_factor {p} is not supported yet (only 1.0)");
            }
        }
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: need("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            },
            _ => yarn(params, max_positions)?,
        };
        Ok(Self { theta, scaling })
    }

    /// `(inv_freq [head_dim / 2], attention factor)`, as transformers computes them.
    pub fn inv_freq(&self, head_dim: usize) -> (Vec<f32>, f32) {
        let d = head_dim as f32;
        let base: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f32 / d))
            .collect();
        match &self.scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Factors(factors) => {
                (base.iter().zip(factors).map(|(f, d)| f / d).collect(), 1.0)
            }
            &RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let scaled = base.iter().map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let llama = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if !medium {
                        return llama;
                    }
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * llama / factor + smooth * llama
                });
                (scaled.collect(), 1.0)
            }
            &RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let dim = head_dim as f64;
                let theta = self.theta as f64;
                let orig = original_max_position_embeddings as f64;
                let correction = |rotations: f64| {
                    dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) =
                    (correction(beta_fast as f64), correction(beta_slow as f64));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let inv = base.iter().enumerate().map(|(i, &extrapolation)| {
                    let pos_freq = self.theta.powf((2 * i) as f32 / d);
                    let interpolation = 1.0 / (factor * pos_freq);
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_factor)
                        + extrapolation * extrapolation_factor
                });
                (inv.collect(), attention_factor)
            }
        }
    }

    /// Cos and sin tables `[max_positions, head_dim / 2]`, row `p` for position `p`.
    pub fn tables(&self, head_dim: usize, max_positions: usize) -> (Vec<f32>, Vec<f32>) {
        let (inv_freq, attention_factor) = self.inv_freq(head_dim);
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * attention_factor);
                sin.push(angle.sin() * attention_factor);
            }
        }
        (cos, sin)
    }
}

/// YaRN's settings with transformers' defaults (`beta_fast` 32, `beta_slow` 1, the
/// attention factor `0.1 ln(factor) + 1`, `truncate` true).
fn yarn(params: &Json, max_positions: usize) -> Result<RopeScaling> {
    let number = |key: &str| params.get(key).and_then(Json::as_f64);
    let factor = number("factor").context("rope \"yarn\" lacks factor")?;
    let original = number("original_max_position_embeddings").unwrap_or(max_positions as f64);
    let attention_factor = match number("attention_factor") {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => 0.1 * factor.ln() + 1.0,
    };
    Ok(RopeScaling::Yarn {
        factor: factor as f32,
        original_max_position_embeddings: original as f32,
        beta_fast: number("beta_fast").unwrap_or(32.0) as f32,
        beta_slow: number("beta_slow").unwrap_or(1.0) as f32,
        attention_factor: attention_factor as f32,
        truncate: params
            .get("truncate")
            .and_then(Json::as_bool)
            .unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_rope_matches_the_closed_form() {
        let (inv, af) = Rope::plain(10_000.0).inv_freq(8);
        assert_eq!(af, 1.0);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn both_config_forms_read_the_same_rope() {
        let classic = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = classic.clone();
        v5["rope_theta"] = json!(500000.0);
        let a = Rope::from_params(&classic, Some(500_000.0), 131072).unwrap();
        let b = Rope::from_params(&v5, None, 131072).unwrap();
        assert_eq!(a, b);
        assert!(matches!(a.scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn llama3_scales_only_low_frequencies() {
        let rope = Rope::from_params(
            &json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}),
            None,
            131072,
        )
        .unwrap();
        let (scaled, _) = rope.inv_freq(64);
        let (plain, _) = Rope::plain(500_000.0).inv_freq(64);
        assert_eq!(scaled[0], plain[0], "the highest frequency is kept");
        assert_eq!(
            scaled[31],
            plain[31] / 8.0,
            "the lowest is divided by the factor"
        );
    }

    /// llama.cpp's converter writes Llama 3's scaling as per-frequency divisors
    /// (`rope_freqs.weight`, computed as in its `convert_hf_to_gguf.py`); read back as
    /// [`RopeScaling::Factors`] they give transformers' `llama3` frequencies.
    #[test]
    fn llama_cpp_rope_factors_reproduce_llama3_scaling() {
        let (theta, dim, factor, low, high, old) = (500_000f32, 64, 8f32, 1f32, 4f32, 8192f32);
        let (freqs, _) = Rope::plain(theta).inv_freq(dim);
        let factors: Vec<f32> = freqs
            .iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        let gguf = Rope {
            theta,
            scaling: RopeScaling::Factors(factors),
        }
        .inv_freq(dim)
        .0;
        let hf = Rope {
            theta,
            scaling: RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            },
        }
        .inv_freq(dim)
        .0;
        for (a, b) in gguf.iter().zip(&hf) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
        }
        assert_ne!(gguf[dim / 2 - 1], freqs[dim / 2 - 1], "the factors apply");
    }

    #[test]
    fn unknown_rope_types_and_options_are_refused_by_name() {
        let err = Rope::from_params(&json!({"rope_type": "longrope"}), Some(1e4), 64);
        assert!(format!("{:#}", err.unwrap_err()).contains("longrope"));
        let err = Rope::from_params(
            &json!({"rope_type": "linear", "factor": 2.0, "mystery": 1}),
            Some(1e4),
            64,
        );
        assert!(format!("{:#}", err.unwrap_err()).contains("mystery"));
        let err = Rope::from_params(&json!({"type": "dynamic", "factor": 2.0}), Some(1e4), 64);
        assert!(format!("{:#}", err.unwrap_err()).contains("dynamic"));
    }
}
