//! Synthetic PEFT LoRA adapters for benchmarks and load tests: a PEFT folder
//! (`adapter_config.json` + `adapter_model.safetensors`) with seeded random weights
//! large enough to change outputs visibly, for any base shape.
use super::peft::{BaseShape, LoraSite, CONFIG_FILE, WEIGHTS_FILE};
use crate::rng::Xoshiro256;
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
    let mut bytes = 0;
    for layer in 0..base.num_layers {
        for &site in &spec.sites {
            let (inp, out) = base.dims(site);
            let (a, b) = synthetic_pair(&mut rng, spec.rank, inp, out);
            bytes += 4 * (a.len() + b.len());
            tensors.insert(
                site.peft_key(layer, "lora_A"),
                Tensor::from_vec(a, (spec.rank, inp), &Device::Cpu)?,
            );
            tensors.insert(
                site.peft_key(layer, "lora_B"),
                Tensor::from_vec(b, (out, spec.rank), &Device::Cpu)?,
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))
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
    std::fs::write(dir.join(CONFIG_FILE), config.to_string())
        .with_context(|| format!("writing {}/{CONFIG_FILE}", dir.display()))?;
    Ok(bytes)
}
