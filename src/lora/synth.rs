//! Synthetic PEFT adapters for benchmarks and load tests: a PEFT folder
//! (`adapter_config.json` + `adapter_model.safetensors`) of any served [`AdapterKind`]
//! with seeded random weights large enough to change outputs visibly, for any base
//! shape. DoRA magnitudes are drawn near 1 (the row norm of a weight with entries of
//! std `1/sqrt(in)`), not from a base model, so on a real base their scales are
//! arbitrary; (IA)³ vectors are drawn in `1 +- 0.2`, `down_proj` feed-forward as PEFT's
//! Llama default; prompt tuning, P-tuning and prefix tuning write `rank` virtual tokens
//! drawn in `+- 0.5`. AdaLoRA keeps every rank (`lora_E` drawn in `1 +- 0.2`). VeRA's
//! projections come from one fixed seed for every adapter (as PEFT's do from
//! `projection_prng_key` for one base and `r`), so synthetic VeRA adapters share them;
//! their lambdas are drawn in `1 +- 0.2` per adapter.
use super::peft::{AdapterKind, BaseShape, LoraSite, CONFIG_FILE, WEIGHTS_FILE};
use crate::rng::Xoshiro256;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub kind: AdapterKind,
    /// Ignored for (IA)³; the number of virtual tokens for prompt and prefix tuning.
    pub rank: usize,
    pub alpha: f32,
    pub sites: Vec<LoraSite>,
    pub seed: u64,
}

/// One site's seeded `(A [rank, in], B [out, rank])`: A like PEFT's kaiming init, B
/// non-zero (a trained adapter), sized so the delta is a visible fraction of the base
/// projection.
pub fn synthetic_pair(
    rng: &mut Xoshiro256,
    rank: usize,
    inp: usize,
    out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let a = rng.symmetric_vec(rank * inp, (3.0 / inp as f32).sqrt());
    let b = rng.symmetric_vec(out * rank, 0.5 / rank as f32);
    (a, b)
}

/// Writes one adapter folder at `dir` (created if needed); returns its f32 bytes.
pub fn write_synthetic_adapter(dir: &Path, base: &BaseShape, spec: &SynthSpec) -> Result<usize> {
    let mut rng = Xoshiro256::from_seed(spec.seed);
    let mut tensors = HashMap::new();
    let prompt_learning = matches!(
        spec.kind,
        AdapterKind::PromptTuning | AdapterKind::PTuning | AdapterKind::PrefixTuning
    );
    if prompt_learning {
        let width = match spec.kind {
            AdapterKind::PrefixTuning => base.num_layers * 2 * base.kv_out,
            _ => base.hidden_size,
        };
        let rows = rng.symmetric_vec(spec.rank * width, 0.5);
        let t = Tensor::from_vec(rows, (spec.rank, width), &Device::Cpu)?;
        tensors.insert("prompt_embeddings".to_string(), t);
    }
    let sites: &[LoraSite] = if prompt_learning { &[] } else { &spec.sites };
    if spec.kind == AdapterKind::Vera {
        insert_vera_projections(&mut tensors, base, sites, spec.rank)?;
    }
    for layer in 0..base.num_layers {
        for &site in sites {
            let (inp, out) = base.dims(site);
            if spec.kind == AdapterKind::Ia3 {
                let l = rng.symmetric_vec(inp.max(out), 0.2);
                let (shape, n) = if site == LoraSite::Down {
                    ((1, inp), inp)
                } else {
                    ((out, 1), out)
                };
                let l: Vec<f32> = l[..n].iter().map(|v| 1.0 + v).collect();
                tensors.insert(
                    site.peft_name(layer, "ia3_l"),
                    Tensor::from_vec(l, shape, &Device::Cpu)?,
                );
                continue;
            }
            if spec.kind == AdapterKind::Vera {
                for (name, n) in [("vera_lambda_d", spec.rank), ("vera_lambda_b", out)] {
                    let l: Vec<f32> = rng.symmetric_vec(n, 0.2).iter().map(|v| 1.0 + v).collect();
                    let t = Tensor::from_vec(l, n, &Device::Cpu)?;
                    tensors.insert(site.peft_name(layer, name), t);
                }
                continue;
            }
            let (a, b) = synthetic_pair(&mut rng, spec.rank, inp, out);
            if spec.kind == AdapterKind::AdaLora {
                let e: Vec<f32> = rng
                    .symmetric_vec(spec.rank, 0.2)
                    .iter()
                    .map(|v| 1.0 + v)
                    .collect();
                let names = ["lora_A", "lora_B", "lora_E"].map(|n| site.peft_name(layer, n));
                let [ka, kb, ke] = names;
                tensors.insert(ka, Tensor::from_vec(a, (spec.rank, inp), &Device::Cpu)?);
                tensors.insert(kb, Tensor::from_vec(b, (out, spec.rank), &Device::Cpu)?);
                tensors.insert(ke, Tensor::from_vec(e, (spec.rank, 1), &Device::Cpu)?);
                continue;
            }
            tensors.insert(
                site.peft_key(layer, "lora_A"),
                Tensor::from_vec(a, (spec.rank, inp), &Device::Cpu)?,
            );
            tensors.insert(
                site.peft_key(layer, "lora_B"),
                Tensor::from_vec(b, (out, spec.rank), &Device::Cpu)?,
            );
            if spec.kind == AdapterKind::Dora {
                let m: Vec<f32> = rng
                    .symmetric_vec(out, 0.1)
                    .iter()
                    .map(|v| 1.0 + v)
                    .collect();
                tensors.insert(
                    site.peft_name(layer, "lora_magnitude_vector"),
                    Tensor::from_vec(m, out, &Device::Cpu)?,
                );
            }
        }
    }
    let bytes = tensors.values().map(|t| 4 * t.elem_count()).sum();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))
        .with_context(|| format!("writing {}", dir.display()))?;
    std::fs::write(dir.join(CONFIG_FILE), config(spec).to_string())
        .with_context(|| format!("writing {}/{CONFIG_FILE}", dir.display()))?;
    Ok(bytes)
}

/// VeRA's shared projections for `sites`: `vera_A` `[r, max_in]` and `vera_B`
/// `[max_out, r]`, drawn from one fixed seed (the same for every synthetic adapter).
fn insert_vera_projections(
    tensors: &mut HashMap<String, Tensor>,
    base: &BaseShape,
    sites: &[LoraSite],
    rank: usize,
) -> Result<()> {
    let max_in = sites.iter().map(|&s| base.dims(s).0).max().unwrap_or(1);
    let max_out = sites.iter().map(|&s| base.dims(s).1).max().unwrap_or(1);
    let mut rng = Xoshiro256::from_seed(0x7e7a);
    let (a, b) = synthetic_pair(&mut rng, rank, max_in, max_out);
    let a = Tensor::from_vec(a, (rank, max_in), &Device::Cpu)?;
    tensors.insert("base_model.vera_A".to_string(), a);
    let b = Tensor::from_vec(b, (max_out, rank), &Device::Cpu)?;
    tensors.insert("base_model.vera_B".to_string(), b);
    Ok(())
}

/// The `adapter_config.json` of `spec`.
fn config(spec: &SynthSpec) -> serde_json::Value {
    let targets: Vec<&str> = spec.sites.iter().map(|s| s.module_name()).collect();
    if matches!(
        spec.kind,
        AdapterKind::PromptTuning | AdapterKind::PTuning | AdapterKind::PrefixTuning
    ) {
        return serde_json::json!({
            "peft_type": spec.kind.name(),
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": spec.rank,
            "num_transformer_submodules": 1,
            "inference_mode": true,
        });
    }
    if spec.kind == AdapterKind::Vera {
        return serde_json::json!({
            "peft_type": "VERA",
            "task_type": "CAUSAL_LM",
            "r": spec.rank,
            "target_modules": targets,
            "save_projection": true,
            "projection_prng_key": 0,
            "vera_dropout": 0.0,
            "fan_in_fan_out": false,
            "bias": "none",
            "inference_mode": true,
        });
    }
    if spec.kind == AdapterKind::AdaLora {
        return serde_json::json!({
            "peft_type": "ADALORA",
            "task_type": "CAUSAL_LM",
            "r": spec.rank,
            "init_r": spec.rank,
            "target_r": spec.rank,
            "lora_alpha": spec.alpha,
            "target_modules": targets,
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": false,
            "inference_mode": true,
        });
    }
    if spec.kind == AdapterKind::Ia3 {
        let feedforward: Vec<&str> = targets
            .iter()
            .copied()
            .filter(|t| *t == "down_proj")
            .collect();
        return serde_json::json!({
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "target_modules": targets,
            "feedforward_modules": feedforward,
            "fan_in_fan_out": false,
            "inference_mode": true,
        });
    }
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": targets,
        "bias": "none",
        "use_dora": spec.kind == AdapterKind::Dora,
        "use_rslora": false,
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "inference_mode": true,
    })
}
