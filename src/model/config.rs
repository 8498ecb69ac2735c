//! The base model's shape, read from a Hugging Face `config.json` or GGUF metadata.
use super::arch::{Architecture, Dims, Family};
use super::rope::{Rope, RopeScaling};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;

/// Everything the forward pass needs to know about a model: its shape, and what its
/// family changes ([`Architecture`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// End-of-sequence ids from the model config (the tokenizer may add more).
    pub eos_token_ids: Vec<u32>,
    /// What the model's family changes in the decoder (Llama's by default).
    pub arch: Architecture,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` of any family in [`Family`]; anything the
    /// family does not serve exactly is refused by name.
    pub fn from_hf_config(path: &Path, name: &str) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_hf_json(&json, name).with_context(|| format!("reading {}", path.display()))
    }

    /// As [`Self::from_hf_config`], from the parsed JSON.
    pub fn from_hf_json(json: &serde_json::Value, name: &str) -> Result<Self> {
        let model_type = json["model_type"].as_str().unwrap_or("llama");
        let family = Family::from_model_type(model_type)?;
        let size = |key: &str| -> Result<usize> {
            json[key]
                .as_u64()
                .map(|v| v as usize)
                .with_context(|| format!("config.json lacks {key} (a positive integer)"))
        };
        let hidden_size = size("hidden_size")?;
        let num_heads = size("num_attention_heads")?;
        let num_kv_heads = size("num_key_value_heads").unwrap_or(num_heads);
        let head_dim = match json.get("head_dim").and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None => hidden_size / num_heads.max(1),
        };
        let max_position_embeddings = size("max_position_embeddings")?;
        let num_layers = size("num_hidden_layers")?;
        let dims = Dims {
            num_layers,
            head_dim,
            hidden_size,
            max_position_embeddings,
        };
        let arch = family.architecture(json, &dims)?;
        let (rope_theta, _, _) = super::arch::read_rope(json, &dims)?;
        let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
        let eos_token_ids = match &json["eos_token_id"] {
            serde_json::Value::Number(n) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        };
        let out = Self {
            name: name.to_string(),
            hidden_size,
            intermediate_size: size("intermediate_size")?,
            vocab_size: size("vocab_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: json["rms_norm_eps"]
                .as_f64()
                .unwrap_or(if gemma { 1e-6 } else { 1e-5 }),
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings: json["tie_word_embeddings"].as_bool().unwrap_or(gemma),
            eos_token_ids,
            arch,
        };
        out.validate()?;
        Ok(out)
    }

    /// Reads the `{arch}.*` metadata of a GGUF file (llama.cpp's architecture names;
    /// [`super::arch::gguf`]).
    pub fn from_gguf(content: &gguf_file::Content, name: &str) -> Result<Self> {
        use super::arch::gguf::{architecture, family_of, GgufDims, GgufMetadata};
        let meta = GgufMetadata::new(&content.metadata)?;
        let family = family_of(&meta.arch)?;
        let hidden_size = meta.size("embedding_length")?;
        let num_heads = meta.size("attention.head_count")?;
        let num_kv_heads = meta.size("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = meta
            .size("attention.key_length")
            .or_else(|_| meta.size("rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match meta.size("vocab_size") {
            Ok(v) => v,
            Err(_) => match content.metadata.get("tokenizer.ggml.tokens") {
                Some(gguf_file::Value::Array(a)) => a.len(),
                _ => bail!("GGUF metadata lacks tokenizer.ggml.tokens (an array)"),
            },
        };
        let has = |t: &str| content.tensor_infos.contains_key(t);
        let num_layers = meta.size("block_count")?;
        let dims = GgufDims {
            num_layers,
            num_heads,
            hidden_size,
            head_dim,
            biases: [
                has("blk.0.attn_q.bias"),
                has("blk.0.attn_output.bias"),
                has("blk.0.ffn_down.bias"),
            ],
        };
        let eos_token_ids = content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .map(|e| vec![e])
            .unwrap_or_default();
        let out = Self {
            name: name.to_string(),
            hidden_size,
            intermediate_size: meta.size("feed_forward_length")?,
            vocab_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: meta
                .number("attention.layer_norm_rms_epsilon")?
                .context("GGUF metadata lacks attention.layer_norm_rms_epsilon")?
                as f64,
            rope_theta: meta.number("rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: meta.size("context_length")?,
            tie_word_embeddings: !has("output.weight"),
            eos_token_ids,
            arch: architecture(family, &meta, &dims)?,
        };
        out.validate()?;
        Ok(out)
    }

    /// Sets llama.cpp's per-frequency rope divisors (`rope_freqs.weight` of a GGUF).
    pub fn set_rope_factors(&mut self, factors: Vec<f32>) -> Result<()> {
        if factors.len() != self.head_dim / 2 {
            bail!(
                "rope_freqs.weight has {} factors for head_dim {}",
                factors.len(),
                self.head_dim
            );
        }
        if self.arch.rope_scaling != RopeScaling::None {
            bail!("rope_freqs.weight beside another rope scaling");
        }
        self.arch.rope_scaling = RopeScaling::Factors(factors);
        Ok(())
    }

    /// The rope of the full-attention layers (every layer but for Gemma 3's sliding ones).
    pub fn global_rope(&self) -> Rope {
        Rope {
            theta: self.rope_theta,
            scaling: self.arch.rope_scaling.clone(),
        }
    }

    /// Attention scores' scale.
    pub fn attention_scale(&self) -> f32 {
        self.arch
            .attention_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    fn validate(&self) -> Result<()> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            bail!(
                "num_heads {} must be a positive multiple of num_kv_heads {}",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            );
        }
        Ok(())
    }

    /// The dimensions adapters are validated against.
    pub fn base_shape(&self) -> crate::lora::peft::BaseShape {
        crate::lora::peft::BaseShape {
            num_layers: self.num_layers,
            hidden_size: self.hidden_size,
            q_out: self.num_heads * self.head_dim,
            kv_out: self.num_kv_heads * self.head_dim,
            intermediate_size: self.intermediate_size,
            modules: super::layout::modules(self),
        }
    }

    /// Bytes of K and V for one token across all layers (f32).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}
