//! The families in GGUF files: llama.cpp's architecture names and `{arch}.*` metadata
//! read into the same [`Architecture`] a `config.json` gives, with llama.cpp's own rules
//! where a GGUF file does not say (Gemma's attention scale and sliding-layer pattern,
//! Gemma 3's local rope base when `rope.freq_base_swa` is absent).
//!
//! Invariants: an architecture name without a family here is refused by name; what
//! llama.cpp's converter already folded into the weights is not applied again (Gemma's
//! `1 + w` norm weights are stored with the one added, so `norm_offset` is off); only
//! `llama` files have their Q/K rows permuted ([`permuted_qk`]).
use super::{Activation, Architecture, Family, LayerAttention};
use crate::model::rope::RopeScaling;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;

/// A GGUF file's metadata under its architecture's prefix.
pub struct GgufMetadata<'a> {
    md: &'a HashMap<String, Value>,
    pub arch: String,
}

impl<'a> GgufMetadata<'a> {
    pub fn new(md: &'a HashMap<String, Value>) -> Result<Self> {
        let arch = md
            .get("general.architecture")
            .context("GGUF metadata lacks general.architecture")?
            .to_string()?
            .clone();
        Ok(Self { md, arch })
    }

    /// The value of `{arch}.{key}`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(&format!("{}.{key}", self.arch))
    }

    /// `{arch}.{key}` as a size.
    pub fn size(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .with_context(|| format!("GGUF metadata lacks {}.{key}", self.arch))?;
        Ok(v.to_u32()
            .with_context(|| format!("GGUF {}.{key} is not a u32", self.arch))? as usize)
    }

    /// `{arch}.{key}` as a number, if present.
    pub fn number(&self, key: &str) -> Result<Option<f32>> {
        self.get(key)
            .map(|v| {
                v.to_f32()
                    .with_context(|| format!("GGUF {}.{key} is not an f32", self.arch))
            })
            .transpose()
    }
}

/// The family of a llama.cpp architecture name.
pub fn family_of(arch: &str) -> Result<Family> {
    Ok(match arch {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "gemma2" => Family::Gemma2,
        "gemma3" => Family::Gemma3,
        "phi3" => Family::Phi3,
        other => bail!(
            "GGUF architecture {other:?} is not supported \
             (llama, qwen2, qwen3, gemma2, gemma3, phi3)"
        ),
    })
}

/// Whether llama.cpp's converter permuted this family's Q/K rows (its `llama` rope
/// layout); the others are stored as the checkpoint has them.
pub fn permuted_qk(family: Family) -> bool {
    matches!(family, Family::Llama | Family::Mistral)
}

/// The shape keys an architecture's options depend on.
pub struct GgufDims {
    pub num_layers: usize,
    pub num_heads: usize,
    pub hidden_size: usize,
    pub head_dim: usize,
    /// The file holds the bias of q/k/v, o, and the MLP projections.
    pub biases: [bool; 3],
}

/// The [`Architecture`] of a GGUF file of `family`.
pub fn architecture(family: Family, meta: &GgufMetadata, dims: &GgufDims) -> Result<Architecture> {
    let rope_scaling = rope_scaling(meta)?;
    let [qkv_bias, o_bias, mlp_bias] = dims.biases;
    let mut arch = Architecture {
        family,
        qkv_bias,
        o_bias,
        mlp_bias,
        rope_scaling,
        ..Architecture::default()
    };
    match family {
        Family::Qwen3 => arch.qk_norm = true,
        Family::Phi3 => arch.fused_projections = true,
        Family::Gemma2 | Family::Gemma3 => gemma(&mut arch, meta, dims)?,
        _ => {}
    }
    if family == Family::Qwen2 && !qkv_bias {
        bail!("a qwen2 GGUF without attn_q/k/v biases");
    }
    if let (Family::Llama | Family::Qwen2 | Family::Qwen3 | Family::Phi3, Some(window)) =
        (family, meta.get("attention.sliding_window"))
    {
        // Phi-3's converter writes 0 for "no window".
        let window = window.to_u32()? as usize;
        if window > 0 {
            arch.sliding_window = Some(window);
            arch.layers = vec![LayerAttention::Sliding; dims.num_layers];
        }
    }
    Ok(arch)
}

/// Gemma 2 and 3 as llama.cpp runs them.
fn gemma(arch: &mut Architecture, meta: &GgufMetadata, dims: &GgufDims) -> Result<()> {
    let gemma3 = arch.family == Family::Gemma3;
    arch.sandwich_norms = true;
    arch.activation = Activation::GeluTanh;
    arch.embed_scale = true;
    arch.qk_norm = gemma3;
    // llama.cpp scales queries by 1/sqrt(head_dim), but by 1/sqrt(hidden / heads) for the
    // 27B models (46 layers for Gemma 2, 62 for Gemma 3), whose query_pre_attn_scalar
    // is that.
    let big = dims.num_layers == if gemma3 { 62 } else { 46 };
    let scalar = if big {
        dims.hidden_size / dims.num_heads
    } else {
        dims.head_dim
    };
    arch.attention_scale = Some(1.0 / (scalar as f32).sqrt());
    arch.attention_softcap = meta.number("attn_logit_softcapping")?;
    arch.final_softcap = meta.number("final_logit_softcapping")?;
    arch.sliding_window = Some(meta.size("attention.sliding_window")?);
    // llama.cpp's fixed patterns: every other layer sliding from the first (Gemma 2),
    // five sliding layers then a full one (Gemma 3).
    let pattern = if gemma3 { 6 } else { 2 };
    arch.layers = (0..dims.num_layers)
        .map(|i| match i % pattern < pattern - 1 {
            true => LayerAttention::Sliding,
            false => LayerAttention::Full,
        })
        .collect();
    if gemma3 {
        arch.local_rope_theta = Some(meta.number("rope.freq_base_swa")?.unwrap_or(10_000.0));
    }
    Ok(())
}

/// `{arch}.rope.scaling.*`; Llama 3's scaling comes as `rope_freqs.weight` instead,
/// which the loader reads.
fn rope_scaling(meta: &GgufMetadata) -> Result<RopeScaling> {
    let Some(kind) = meta.get("rope.scaling.type") else {
        return Ok(RopeScaling::None);
    };
    let factor = || -> Result<f32> {
        meta.number("rope.scaling.factor")?
            .context("GGUF rope scaling lacks its rope.scaling.factor")
    };
    match kind.to_string()?.as_str() {
        "none" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "yarn" => {
            let factor = factor()?;
            let original = meta.size("rope.scaling.original_context_length")?;
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original as f32,
                beta_fast: meta.number("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                beta_slow: meta.number("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                attention_factor: 0.1 * factor.ln() + 1.0,
                truncate: true,
            })
        }
        other => bail!("GGUF rope scaling type {other:?} is not supported (none, linear, yarn)"),
    }
}
