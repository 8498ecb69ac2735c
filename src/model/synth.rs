//! Synthetic base models for scale runs: a Hugging Face Llama folder (`config.json`,
//! tokenizer files, `model.safetensors` in bf16) or a quantized GGUF file of a named
//! shape with seeded random weights, written tensor by tensor so a 1B-class model needs
//! no download and little RAM. Both formats hold the same values for a seed (the GGUF's
//! before quantization).
use super::arch::Family;
use super::config::ModelConfig;
use super::layout::{tensor_specs, to_gguf, TensorKind, TensorSpec};
use super::tokenizer::TextTokenizer;
use super::weights::permute_qk;
use crate::lora::peft::LoraSite;
use crate::rng::Xoshiro256;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde_json::json;
use std::io::{BufWriter, Write};
use std::path::Path;

/// The shapes `model synth` knows, by name.
pub const SHAPES: [&str; 3] = ["tiny", "135m", "1b"];

/// The Llama shape called `name` with `vocab_size` (the tokenizer's):
/// `tiny` (2 layers, hidden 64: tests), `135m` (SmolLM2-135M), `1b` (Llama-3.2-1B's
/// layout: 16 layers, hidden 2048, MLP 8192, 32 query and 8 KV heads; about 1.07 B
/// parameters with SmolLM2's 49,152-token vocabulary).
pub fn shape(name: &str, vocab_size: usize) -> Result<ModelConfig> {
    let (hidden, intermediate, layers, heads, kv_heads, theta) = match name {
        "tiny" => (64, 128, 2, 4, 2, 10_000.0),
        "135m" => (576, 1536, 30, 9, 3, 100_000.0),
        "1b" => (2048, 8192, 16, 32, 8, 500_000.0),
        other => bail!("unknown model shape {other:?}; use one of {SHAPES:?}"),
    };
    Ok(ModelConfig {
        name: format!("synth-{name}"),
        hidden_size: hidden,
        intermediate_size: intermediate,
        vocab_size,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        eos_token_ids: Vec::new(),
        arch: Default::default(),
    })
}

/// `cfg` as a model of `family`: the family's options on the same shape (Qwen2's q/k/v
/// biases, Qwen3's q/k norms, Mistral's and Gemma's sliding windows, Gemma's norms,
/// activation, embedding scale and attention scalar), read back through the family's
/// own config parsing so the written `config.json` says exactly that.
pub fn with_family(cfg: &ModelConfig, family: Family) -> Result<ModelConfig> {
    let mut json = hf_config_json(cfg, family);
    json["vocab_size"] = cfg.vocab_size.into();
    let mut out = ModelConfig::from_hf_json(&json, &cfg.name)
        .with_context(|| format!("a {} of this shape", family.model_type()))?;
    out.eos_token_ids = cfg.eos_token_ids.clone();
    Ok(out)
}

/// The model's parameter count.
pub fn parameter_count(cfg: &ModelConfig) -> usize {
    tensor_specs(cfg).iter().map(TensorSpec::len).sum()
}

/// The uniform distribution `offset + uniform(-bound, bound)` a tensor's values are
/// drawn from: PyTorch's default Linear init scale (std 1/sqrt(fan_in)) for
/// projections, so activations keep their size through the layers.
fn distribution(spec: &TensorSpec, norm_offset: bool) -> (f32, f32) {
    match spec.kind {
        TensorKind::Embedding => (0.0, 0.5),
        // Gemma's norm weights are offsets from one.
        TensorKind::Norm | TensorKind::HeadNorm if norm_offset => (0.0, 0.1),
        TensorKind::Norm | TensorKind::HeadNorm => (1.0, 0.1),
        TensorKind::Bias(_) => (0.0, 0.1),
        TensorKind::Linear(_) | TensorKind::FusedLinear | TensorKind::LmHead => {
            (0.0, (3.0 / spec.shape[1] as f32).sqrt())
        }
    }
}

/// f32 to bf16 bits, rounding to nearest even (finite inputs).
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Values per independently seeded chunk (so generation runs in parallel and the
/// result does not depend on the thread count).
const CHUNK: usize = 1 << 16;

/// The bf16 bytes of one tensor, deterministic in (`seed`, `index`).
fn tensor_bytes(spec: &TensorSpec, norm_offset: bool, seed: u64, index: usize) -> Vec<u8> {
    let (offset, bound) = distribution(spec, norm_offset);
    let mut out = vec![0u8; 2 * spec.len()];
    out.par_chunks_mut(2 * CHUNK)
        .enumerate()
        .for_each(|(chunk, bytes)| {
            let mut rng = Xoshiro256::from_seed(
                seed ^ (((index as u64) << 32) | chunk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            for pair in bytes.chunks_exact_mut(2) {
                let u = rng.next_f64() as f32 * 2.0 - 1.0;
                let v = bf16_bits(offset + bound * u);
                pair.copy_from_slice(&v.to_le_bytes());
            }
        });
    out
}

/// The Hugging Face `config.json` of `cfg`.
fn hf_config(cfg: &ModelConfig, tokenizer: &TextTokenizer) -> serde_json::Value {
    let mut json = hf_config_json(cfg, cfg.arch.family);
    json["eos_token_id"] = tokenizer.eos_token_ids().into();
    json
}

/// The `config.json` keys of `cfg` as a model of `family` (its own options at their
/// usual values: a 4,096-token window, Gemma's alternating layers).
fn hf_config_json(cfg: &ModelConfig, family: Family) -> serde_json::Value {
    let mut json = json!({
        "model_type": family.model_type(),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    });
    let arch_name = match family {
        Family::Llama => "LlamaForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        Family::Qwen3 => "Qwen3ForCausalLM",
        Family::Gemma2 => "Gemma2ForCausalLM",
        Family::Gemma3 => "Gemma3ForCausalLM",
        Family::Phi3 => "Phi3ForCausalLM",
    };
    json["architectures"] = json!([arch_name]);
    let a = &cfg.arch;
    match family {
        Family::Llama => {
            json["attention_bias"] = a.qkv_bias.into();
            json["mlp_bias"] = a.mlp_bias.into();
        }
        Family::Mistral => json["sliding_window"] = 4096.into(),
        Family::Phi3 => json["sliding_window"] = serde_json::Value::Null,
        Family::Qwen2 | Family::Qwen3 => json["use_sliding_window"] = false.into(),
        Family::Gemma2 | Family::Gemma3 => {
            if let Some(obj) = json.as_object_mut() {
                obj.remove("hidden_act");
            }
            json["hidden_activation"] = "gelu_pytorch_tanh".into();
            json["sliding_window"] = 4096.into();
            json["query_pre_attn_scalar"] = cfg.head_dim.into();
            let sliding = |i: usize| match family {
                Family::Gemma2 => i.is_multiple_of(2),
                _ => !(i + 1).is_multiple_of(6),
            };
            let types: Vec<&str> = (0..cfg.num_layers)
                .map(|i| {
                    if sliding(i) {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            json["layer_types"] = json!(types);
        }
    }
    json
}

/// Writes a model folder at `dir`: `config.json`, the tokenizer's files and
/// `model.safetensors` (bf16, seeded uniform weights). Returns the parameter count.
pub fn write_synthetic_model(
    dir: &Path,
    cfg: &ModelConfig,
    tokenizer: &TextTokenizer,
    seed: u64,
) -> Result<usize> {
    if cfg.vocab_size < tokenizer.vocab_size() {
        bail!(
            "vocabulary {} is smaller than the tokenizer's {}",
            cfg.vocab_size,
            tokenizer.vocab_size()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, hf_config(cfg, tokenizer).to_string())
        .with_context(|| format!("writing {}", config_path.display()))?;
    tokenizer.save_hf_files(dir)?;

    let specs = tensor_specs(cfg);
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for t in &specs {
        let end = offset + 2 * t.len();
        header.insert(
            t.name.clone(),
            json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::Value::Object(header).to_string();
    // The data starts 8-byte aligned, as the safetensors writers do.
    while !(8 + header.len()).is_multiple_of(8) {
        header.push(' ');
    }
    // Written under a temporary name and renamed, so a killed run leaves no
    // half-written model that a later run would take for a complete one.
    let final_path = dir.join("model.safetensors");
    let tmp_path = dir.join("model.safetensors.partial");
    let file = std::fs::File::create(&tmp_path)
        .with_context(|| format!("creating {}", tmp_path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let write_err = || format!("writing {}", tmp_path.display());
    w.write_all(&(header.len() as u64).to_le_bytes())
        .with_context(write_err)?;
    w.write_all(header.as_bytes()).with_context(write_err)?;
    for (index, t) in specs.iter().enumerate() {
        w.write_all(&tensor_bytes(t, cfg.arch.norm_offset, seed, index))
            .with_context(write_err)?;
    }
    w.flush().with_context(write_err)?;
    drop(w);
    std::fs::rename(&tmp_path, &final_path)
        .with_context(|| format!("renaming {} into place", tmp_path.display()))?;
    Ok(specs.iter().map(|t| t.len()).sum())
}

/// One tensor's seeded values (the bf16 values of [`tensor_bytes`]) as an f32 tensor.
fn tensor_values(spec: &TensorSpec, norm_offset: bool, seed: u64, index: usize) -> Result<Tensor> {
    let values: Vec<f32> = tensor_bytes(spec, norm_offset, seed, index)
        .chunks_exact(2)
        .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
        .collect();
    Ok(Tensor::from_vec(
        values,
        spec.shape.as_slice(),
        &Device::Cpu,
    )?)
}

/// The metadata of `cfg` under llama.cpp's architecture name of its family, as
/// llama.cpp's converter writes it (what a GGUF cannot say, such as Mistral's window,
/// is left out, as the converter does).
fn gguf_metadata(cfg: &ModelConfig) -> Result<Vec<(String, gguf_file::Value)>> {
    use gguf_file::Value::{String as S, F32, U32};
    let a = &cfg.arch;
    if a.rope_scaling != Default::default()
        || a.attention_scale
            .is_some_and(|s| (s - 1.0 / (cfg.head_dim as f32).sqrt()).abs() > 1e-7)
    {
        bail!("a GGUF file of this config would not say its rope scaling or attention scale");
    }
    let arch = match a.family {
        Family::Llama | Family::Mistral => "llama",
        f => f.name(),
    };
    let u = |v: usize| U32(v as u32);
    let mut md = vec![
        ("general.architecture".to_string(), S(arch.into())),
        ("general.name".into(), S(cfg.name.clone())),
    ];
    let mut put = |key: &str, v: gguf_file::Value| md.push((format!("{arch}.{key}"), v));
    put("context_length", u(cfg.max_position_embeddings));
    put("embedding_length", u(cfg.hidden_size));
    put("feed_forward_length", u(cfg.intermediate_size));
    put("block_count", u(cfg.num_layers));
    put("attention.head_count", u(cfg.num_heads));
    put("attention.head_count_kv", u(cfg.num_kv_heads));
    put("attention.key_length", u(cfg.head_dim));
    put("attention.value_length", u(cfg.head_dim));
    put("rope.dimension_count", u(cfg.head_dim));
    put("vocab_size", u(cfg.vocab_size));
    put(
        "attention.layer_norm_rms_epsilon",
        F32(cfg.rms_norm_eps as f32),
    );
    put("rope.freq_base", F32(cfg.rope_theta));
    if let (Some(theta), Family::Gemma3) = (a.local_rope_theta, a.family) {
        put("rope.freq_base_swa", F32(theta));
    }
    if matches!(a.family, Family::Gemma2 | Family::Gemma3 | Family::Phi3) {
        put("attention.sliding_window", u(a.sliding_window.unwrap_or(0)));
    }
    for (key, cap) in [
        ("attn_logit_softcapping", a.attention_softcap),
        ("final_logit_softcapping", a.final_softcap),
    ] {
        if let Some(cap) = cap {
            put(key, F32(cap));
        }
    }
    Ok(md)
}

/// One tensor as the GGUF holds it: norms and biases in f32 (Gemma's norms with their one
/// added); matrices quantized to `dtype`, a `llama` file's Q/K rows permuted as
/// llama.cpp's converter does (the loader undoes it).
fn gguf_tensor(
    cfg: &ModelConfig,
    spec: &TensorSpec,
    dtype: GgmlDType,
    seed: u64,
    index: usize,
) -> Result<QTensor> {
    let t = tensor_values(spec, cfg.arch.norm_offset, seed, index)?;
    let norm = matches!(spec.kind, TensorKind::Norm | TensorKind::HeadNorm);
    let permuted = crate::model::arch::gguf::permuted_qk(cfg.arch.family);
    if spec.shape.len() != 2 {
        // Gemma's norms are stored with their one added, as llama.cpp's converter does.
        let t = match spec.kind {
            _ if norm && cfg.arch.norm_offset => (t + 1.0)?,
            TensorKind::Bias(site @ (LoraSite::Q | LoraSite::K)) if permuted => {
                let heads = match site {
                    LoraSite::Q => cfg.num_heads,
                    _ => cfg.num_kv_heads,
                };
                permute_qk(&t.unsqueeze(1)?, heads)?.squeeze(1)?
            }
            _ => t,
        };
        return Ok(QTensor::quantize(&t, GgmlDType::F32)?);
    }
    let t = match spec.kind {
        TensorKind::Linear(LoraSite::Q) if permuted => permute_qk(&t, cfg.num_heads)?,
        TensorKind::Linear(LoraSite::K) if permuted => permute_qk(&t, cfg.num_kv_heads)?,
        _ => t,
    };
    QTensor::quantize(&t, dtype).with_context(|| format!("quantizing {} to {dtype:?}", spec.name))
}

/// Writes a GGUF file at `path`: `cfg` with the seeded weights of
/// [`write_synthetic_model`], matrices quantized to `dtype` (whose block must divide the
/// rows), and the tokenizer (`tokenizer.*` metadata) of the GGUF `tokenizer_from`.
/// Returns the parameter count.
pub fn write_synthetic_gguf(
    path: &Path,
    cfg: &ModelConfig,
    tokenizer_from: &Path,
    dtype: GgmlDType,
    seed: u64,
) -> Result<usize> {
    let mut source = std::fs::File::open(tokenizer_from)
        .with_context(|| format!("opening {}", tokenizer_from.display()))?;
    let content = gguf_file::Content::read(&mut source)
        .with_context(|| format!("reading GGUF header of {}", tokenizer_from.display()))?;
    let vocab = TextTokenizer::from_gguf(&content)?.vocab_size();
    if cfg.vocab_size < vocab {
        bail!(
            "vocabulary {} is smaller than the tokenizer's {vocab}",
            cfg.vocab_size
        );
    }
    let mut metadata = gguf_metadata(cfg)?;
    let mut tokenizer: Vec<_> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tokenizer.sort_by(|a, b| a.0.cmp(&b.0));
    metadata.extend(tokenizer);
    let specs = tensor_specs(cfg);
    let tensors = specs
        .par_iter()
        .enumerate()
        .map(|(index, spec)| {
            let name = to_gguf(cfg, &spec.name)
                .with_context(|| format!("no GGUF name for {}", spec.name))?;
            Ok((name, gguf_tensor(cfg, spec, dtype, seed, index)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Written under a temporary name and renamed, as for the safetensors folder.
    let tmp_path = path.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp_path)
        .with_context(|| format!("creating {}", tmp_path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    gguf_file::write(&mut w, &metadata, &tensors)
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    w.flush()
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    drop(w);
    std::fs::rename(&tmp_path, path)
        .with_context(|| format!("renaming {} into place", tmp_path.display()))?;
    Ok(specs.iter().map(|t| t.len()).sum())
}

#[cfg(test)]
#[path = "synth_tests.rs"]
mod tests;
