//! Synthetic PEFT LoRA adapters for benchmarks and load tests: a PEFT folder
//! (`adapter_config.json` + `adapter_model.safetensors`) with seeded random weights
//! large enough to change outputs visibly, for any base shape.
use super::peft::{BaseShape, LoraSite};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub rank: usize,
    pub alpha: f32,
    pub sites: Vec<LoraSite>,
    pub seed: u64,
}

/// Writes one adapter folder at `dir` (created if needed); returns its f32 bytes.
pub fn write_synthetic_adapter(dir: &Path, base: &BaseShape, spec: &SynthSpec) -> Result<usize> {
    let mut state = spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = |n: usize, bound: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect()
    };
    let mut tensors = HashMap::new();
    let mut bytes = 0;
    for layer in 0..base.num_layers {
        for &site in &spec.sites {
            let (inp, out) = base.dims(site);
            let prefix = format!(
                "base_model.model.model.layers.{layer}.{}.{}",
                site.parent(),
                site.module_name()
            );
            // A like PEFT's kaiming init; B non-zero (a trained adapter), sized so the
            // delta is a visible fraction of the base projection.
            let a = uniform(spec.rank * inp, (3.0 / inp as f32).sqrt());
            let b = uniform(out * spec.rank, 0.5 / spec.rank as f32);
            bytes += 4 * (a.len() + b.len());
            tensors.insert(
                format!("{prefix}.lora_A.weight"),
                Tensor::from_vec(a, (spec.rank, inp), &Device::Cpu)?,
            );
            tensors.insert(
                format!("{prefix}.lora_B.weight"),
                Tensor::from_vec(b, (out, spec.rank), &Device::Cpu)?,
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))
        .with_context(|| format!("writing {}", dir.display()))?;
    let targets: Vec<&str> = spec.sites.iter().map(|s| s.module_name()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": targets,
        "bias": "none",
        "use_dora": false,
        "use_rslora": false,
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "inference_mode": true,
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string())
        .with_context(|| format!("writing {}/adapter_config.json", dir.display()))?;
    Ok(bytes)
}
