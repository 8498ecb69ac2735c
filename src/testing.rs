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
            TensorKind::Norm | TensorKind::HeadNorm if cfg.arch.norm_offset => (0.05, 0.0),
            TensorKind::Norm | TensorKind::HeadNorm => (0.05, 1.0),
            TensorKind::Bias(_) => (0.1, 0.0),
            TensorKind::LmHead => (0.1, 0.0),
            TensorKind::Linear(_) | TensorKind::FusedLinear => {
                (1.0 / (spec.shape[1] as f32).sqrt(), 0.0)
            }
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
        offsets: Vec::new(),
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

/// Writes a Hugging Face folder of the random Llama `cfg` from `seed` into `dir`:
/// config.json, the byte-level test tokenizer's tokenizer.json, and the weights of
/// [`random_weights`] as one model.safetensors or (`sharded`) two shards with an index.
pub fn write_model_folder(
    dir: &std::path::Path,
    cfg: &ModelConfig,
    seed: u64,
    sharded: bool,
) -> Result<()> {
    let tensors = random_weights(cfg, seed)?;
    if sharded {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let (a, b) = names.split_at(names.len() / 2);
        let mut map = serde_json::Map::new();
        for (file, part) in [
            ("model-00001-of-00002.safetensors", a),
            ("model-00002-of-00002.safetensors", b),
        ] {
            let subset: HashMap<&String, Tensor> =
                part.iter().map(|n| (*n, tensors[*n].clone())).collect();
            candle_core::safetensors::save(&subset, dir.join(file))?;
            for n in part {
                map.insert((*n).clone(), file.into());
            }
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    } else {
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    }
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    crate::model::TextTokenizer::byte_level_for_tests()?
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
    Ok(())
}

/// The logits of every position of `tokens`, prefilled as one sequence on a fresh cache.
pub fn prefill_logits(model: &Llama<CpuBackend>, tokens: &[u32]) -> Result<Vec<f32>> {
    use crate::engine::block_allocator::{Allocation, BlockAllocator};
    let block_size = 16;
    let blocks = tokens.len().div_ceil(block_size).max(1);
    let mut alloc = BlockAllocator::new(blocks, block_size);
    let mut kv = model.new_kv(blocks, block_size)?;
    let mut table = Vec::new();
    anyhow::ensure!(
        alloc.allocate(&mut table, tokens.len()) == Allocation::Ok,
        "{} tokens do not fit {blocks} blocks",
        tokens.len()
    );
    let mut batch = crate::model::ForwardBatch::default();
    batch.push_chunk(tokens, 0, &table);
    batch.logit_rows = (0..tokens.len()).collect();
    model.forward(&batch, &mut kv)
}
