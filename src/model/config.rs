//! The base model's shape, read from a Hugging Face `config.json` or GGUF metadata.
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;

/// Everything the forward pass needs to know about a Llama-family model.
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
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (Llama architecture only).
    pub fn from_hf_config(path: &Path, name: &str) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let model_type = json["model_type"].as_str().unwrap_or("llama");
        if model_type != "llama" {
            bail!("model_type {model_type:?} is not supported (only llama)");
        }
        if !json["rope_scaling"].is_null() {
            bail!(
                "rope_scaling is not supported yet: {}",
                json["rope_scaling"]
            );
        }
        let cfg: candle_transformers::models::llama::LlamaConfig =
            serde_json::from_value(json.clone())
                .with_context(|| format!("{}: not a Llama config", path.display()))?;
        let num_kv_heads = cfg.num_key_value_heads();
        let head_dim = json["head_dim"]
            .as_u64()
            .map(|d| d as usize)
            .unwrap_or(cfg.hidden_size / cfg.num_attention_heads);
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
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            vocab_size: cfg.vocab_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            max_position_embeddings: cfg.max_position_embeddings,
            tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(false),
            eos_token_ids,
        };
        out.validate()?;
        Ok(out)
    }

    /// Reads the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(content: &gguf_file::Content, name: &str) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| -> Result<&gguf_file::Value> {
            md.get(key)
                .with_context(|| format!("GGUF metadata lacks {key}"))
        };
        let arch = get("general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            bail!("GGUF architecture {arch:?} is not supported (only llama)");
        }
        let u = |key: &str| -> Result<usize> { Ok(get(key)?.to_u32()? as usize) };
        let hidden_size = u("llama.embedding_length")?;
        let num_heads = u("llama.attention.head_count")?;
        let num_kv_heads = u("llama.attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = u("llama.rope.dimension_count").unwrap_or(hidden_size / num_heads);
        let vocab_size = match u("llama.vocab_size") {
            Ok(v) => v,
            Err(_) => match get("tokenizer.ggml.tokens")? {
                gguf_file::Value::Array(a) => a.len(),
                _ => bail!("tokenizer.ggml.tokens is not an array"),
            },
        };
        let has_output = content.tensor_infos.contains_key("output.weight");
        let eos_token_ids = u("tokenizer.ggml.eos_token_id")
            .map(|e| vec![e as u32])
            .unwrap_or_default();
        let out = Self {
            name: name.to_string(),
            hidden_size,
            intermediate_size: u("llama.feed_forward_length")?,
            vocab_size,
            num_layers: u("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: get("llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_theta: get("llama.rope.freq_base")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(10_000.0),
            max_position_embeddings: u("llama.context_length")?,
            tie_word_embeddings: !has_output,
            eos_token_ids,
        };
        out.validate()?;
        Ok(out)
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
        }
    }

    /// Bytes of K and V for one token across all layers (f32).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}
