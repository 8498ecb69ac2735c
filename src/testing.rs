//! Test-only constructors: a tiny Llama shape and seeded random models, for unit tests
//! and (through the `test-support` cargo feature, which integration tests, benches and
//! examples of this crate turn on) for the tests in `tests/`. Not part of the served
//! program: a plain build leaves this module out.
use crate::lora::peft::{AdapterKind, AdapterWeights, BaseShape, LoraPair, LoraSite};
use crate::lora::values::LoraValues;
use crate::model::backend::Backend;
use crate::model::checkpoint::Checkpoint;
use crate::model::layout::{tensor_specs, TensorKind};
use crate::model::{CpuBackend, Llama, ModelConfig, ModelRunner};
use crate::rng::Xoshiro256;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// The `tiny` shape of `model synth` (2 layers, hidden 64, 4 heads over 2 KV heads), with
/// a 512-token context and EOS id 2 (the byte-level test tokenizer's), for tests with
/// random weights.
pub fn tiny_config(vocab_size: usize) -> ModelConfig {
    let tiny = crate::model::synth::shape("tiny", vocab_size).expect("tiny is a known shape");
    ModelConfig {
        name: "tiny-random-llama".into(),
        max_position_embeddings: 512,
        eos_token_ids: vec![2],
        ..tiny
    }
}

/// Seeded random weights for every tensor of `cfg` (named as in `model::layout`), about
/// normal: embeddings with std 0.5, norms 1 +- 0.05, linear layers with std
/// 1/sqrt(in), an untied LM head with std 0.1.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = Xoshiro256::from_seed(seed);
    let mut tensors = HashMap::new();
    for spec in tensor_specs(cfg) {
        let (std, offset) = match spec.kind {
            TensorKind::Embedding => (0.5, 0.0),
            TensorKind::Norm => (0.05, 1.0),
            TensorKind::LmHead => (0.1, 0.0),
            TensorKind::Linear(_) => (1.0 / (spec.shape[1] as f32).sqrt(), 0.0),
        };
        let data: Vec<f32> = (0..spec.len())
            .map(|_| offset + std * rng.approx_normal())
            .collect();
        tensors.insert(
            spec.name.clone(),
            Tensor::from_vec(data, spec.shape.as_slice(), &Device::Cpu)?,
        );
    }
    Ok(tensors)
}

/// A CPU model over `weights` (e.g. [`random_weights`], perhaps modified).
pub fn llama_from(
    weights: HashMap<String, Tensor>,
    cfg: &ModelConfig,
) -> Result<Llama<CpuBackend>> {
    llama_on(CpuBackend::default(), weights, cfg)
}

/// A model on `backend` over `weights`: the same weights on two backends for parity.
pub fn llama_on<B: Backend>(
    backend: B,
    weights: HashMap<String, Tensor>,
    cfg: &ModelConfig,
) -> Result<Llama<B>> {
    Llama::load(backend, &Checkpoint::from_tensors(weights), cfg)
}

/// Seeded random LoRA weights of `rank` at `sites` of every layer (in memory, as
/// `lora::synth` writes them to a folder), scale 16 / rank.
pub fn random_adapter(
    base: &BaseShape,
    rank: usize,
    sites: &[LoraSite],
    seed: u64,
) -> AdapterWeights {
    let mut rng = Xoshiro256::from_seed(seed);
    let mut bytes = 0;
    let layers = (0..base.num_layers)
        .map(|_| {
            std::array::from_fn(|i| {
                let site = *sites.iter().find(|s| s.index() == i)?;
                let (inp, out) = base.dims(site);
                let (a, b) = crate::lora::synth::synthetic_pair(&mut rng, rank, inp, out);
                bytes += 4 * (a.len() + b.len());
                Some(LoraPair::new(
                    rank,
                    16.0 / rank as f32,
                    LoraValues::F32(a),
                    LoraValues::F32(b),
                ))
            })
        })
        .collect();
    let mut target_modules: Vec<String> =
        sites.iter().map(|s| s.module_name().to_string()).collect();
    target_modules.sort();
    AdapterWeights {
        kind: AdapterKind::Lora,
        rank_max: rank,
        target_modules,
        layers,
        scales: Vec::new(),
        bytes,
        prompt: None,
        prefix: None,
    }
}

/// A CPU model with [`random_weights`].
pub fn random_llama(cfg: &ModelConfig, seed: u64) -> Result<Llama<CpuBackend>> {
    llama_from(random_weights(cfg, seed)?, cfg)
}

/// A random CPU model ready for the engine.
pub fn random_model(cfg: &ModelConfig, seed: u64) -> Result<Box<dyn crate::model::BaseModel>> {
    random_model_on(CpuBackend::default(), cfg, seed)
}

/// A random model on `backend` (its weight format and K/V type), ready for the engine.
pub fn random_model_on(
    backend: CpuBackend,
    cfg: &ModelConfig,
    seed: u64,
) -> Result<Box<dyn crate::model::BaseModel>> {
    let model = llama_on(backend, random_weights(cfg, seed)?, cfg)?;
    Ok(Box::new(ModelRunner::new(model)?))
}
