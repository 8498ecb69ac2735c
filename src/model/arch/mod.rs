//! The architecture layer: what a model family changes in the one decoder forward pass
//! (`super::llama`) and in its checkpoint. Each family is one small file here that
//! reads its `config.json` keys into an [`Architecture`] (biases, norms, activation,
//! attention options, rope, sliding windows) and names its tensors; everything it does
//! not declare is the Llama default.
//!
//! Invariants: a `model_type` without a file here, and a config option a family does not
//! serve exactly, are refused by name when the config is read ([`refuse_unknown`]);
//! an [`Architecture`] is complete once read: the forward pass and the loader consult
//! nothing else.
mod gemma;
pub mod gguf;
mod llama;
mod phi3;
mod qwen;

use super::rope::{Rope, RopeScaling};
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

/// A model family: one `model_type` (or a few that differ only in their defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Family {
    /// Every family, in the README's order.
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
    ];

    /// The family of a Hugging Face `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        Ok(match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            other => {
                let known: Vec<&str> = Self::ALL.iter().map(|f| f.model_type()).collect();
                bail!("model_type {other:?} is not supported (supported: {known:?})")
            }
        })
    }

    /// The family called `name` ([`Family::name`] or its `model_type`).
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name || f.model_type() == name)
            .with_context(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
                format!("unknown model family {name:?}; use one of {names:?}")
            })
    }

    /// The Hugging Face `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
        }
    }

    /// The name users see (`GetModelInfo`'s architecture).
    pub fn name(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3",
            other => other.model_type(),
        }
    }

    /// Reads this family's options from its `config.json`.
    pub fn architecture(self, json: &Json, dims: &Dims) -> Result<Architecture> {
        match self {
            Family::Llama | Family::Mistral => llama::architecture(self, json, dims),
            Family::Qwen2 | Family::Qwen3 => qwen::architecture(self, json, dims),
            Family::Gemma2 | Family::Gemma3 => gemma::architecture(self, json, dims),
            Family::Phi3 => phi3::architecture(self, json, dims),
        }
    }
}

/// The shape keys every family shares, which some options depend on.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub num_layers: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub max_position_embeddings: usize,
}

/// The gated MLP's activation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU).
    #[default]
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU with the tanh approximation, Gemma).
    GeluTanh,
}

/// What one layer's attention looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LayerAttention {
    /// Every earlier position.
    #[default]
    Full,
    /// The last `window` positions, the query's own included, with the local rope.
    Sliding,
}

/// Everything a family changes in the decoder. The default is Llama's.
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    pub family: Family,
    /// q, k and v projections have biases (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// The o projection has a bias (Llama's `attention_bias`).
    pub o_bias: bool,
    /// gate, up and down have biases (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// RMS norm of each query and key head before the rope (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norm weights are offsets from one: `x * (1 + w)` (Gemma); folded at load.
    pub norm_offset: bool,
    /// Four norms per layer: the attention and MLP outputs are normed before their
    /// residual adds (Gemma 2 and 3).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// Embeddings times `sqrt(hidden_size)` (Gemma).
    pub embed_scale: bool,
    /// Attention scores times this; None: `1 / sqrt(head_dim)`.
    pub attention_scale: Option<f32>,
    /// Attention scores soft-capped: `c * tanh(s / c)` (Gemma 2).
    pub attention_softcap: Option<f32>,
    /// Final logits soft-capped the same way (Gemma 2).
    pub final_softcap: Option<f32>,
    /// The scaling of the global rope (its base is `ModelConfig::rope_theta`).
    pub rope_scaling: RopeScaling,
    /// The sliding layers' rope base, when it differs (Gemma 3's `rope_local_base_freq`).
    pub local_rope_theta: Option<f32>,
    /// Positions a sliding layer attends to.
    pub sliding_window: Option<usize>,
    /// Each layer's attention; empty: every layer [`LayerAttention::Full`].
    pub layers: Vec<LayerAttention>,
    /// q/k/v and gate/up are single modules in the checkpoint and to PEFT (Phi-3;
    /// `layout::FUSED_MODULES`).
    pub fused_projections: bool,
}

impl Default for Architecture {
    /// Llama's architecture.
    fn default() -> Self {
        Self {
            family: Family::Llama,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            norm_offset: false,
            sandwich_norms: false,
            activation: Activation::Silu,
            embed_scale: false,
            attention_scale: None,
            attention_softcap: None,
            final_softcap: None,
            rope_scaling: RopeScaling::None,
            local_rope_theta: None,
            sliding_window: None,
            layers: Vec::new(),
            fused_projections: false,
        }
    }
}

impl Architecture {
    /// What layer `layer` attends to.
    pub fn layer_attention(&self, layer: usize) -> LayerAttention {
        self.layers.get(layer).copied().unwrap_or_default()
    }

    /// The window of layer `layer`, if it slides.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.layer_attention(layer) {
            LayerAttention::Full => None,
            LayerAttention::Sliding => self.sliding_window,
        }
    }

    /// The rope of the sliding layers where it differs from the global one (Gemma 3),
    /// so they need tables of their own.
    pub fn local_rope(&self) -> Option<crate::model::rope::Rope> {
        let theta = self.local_rope_theta?;
        self.layers
            .contains(&LayerAttention::Sliding)
            .then(|| crate::model::rope::Rope::plain(theta))
    }
}

/// The per-layer attention of `layer_types` (transformers 5 writes it for every family
/// with sliding layers), or `default` for each layer when the key is absent.
pub(crate) fn layer_types(
    json: &Json,
    num_layers: usize,
    default: impl Fn(usize) -> LayerAttention,
) -> Result<Vec<LayerAttention>> {
    let Some(types) = json.get("layer_types").filter(|v| !v.is_null()) else {
        return Ok((0..num_layers).map(default).collect());
    };
    let Some(types) = types.as_array() else {
        bail!("layer_types must be a list, not {types}");
    };
    if types.len() != num_layers {
        bail!(
            "layer_types has {} entries for {num_layers} layers",
            types.len()
        );
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            Some("full_attention") => Ok(LayerAttention::Full),
            Some("sliding_attention") => Ok(LayerAttention::Sliding),
            _ => bail!("layer type {t} is not supported (full_attention, sliding_attention)"),
        })
        .collect()
}

/// The global rope's scaling and the local rope's base, from either form: classic
/// (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) or transformers 5's
/// `rope_parameters` (one object, or one per layer type). Returns `(theta, scaling,
/// local theta)`.
pub(crate) fn read_rope(json: &Json, dims: &Dims) -> Result<(f32, RopeScaling, Option<f32>)> {
    let max = dims.max_position_embeddings;
    let theta = json
        .get("rope_theta")
        .and_then(Json::as_f64)
        .map(|v| v as f32);
    if let Some(params) = json.get("rope_parameters").filter(|v| !v.is_null()) {
        if let Some(full) = params.get("full_attention") {
            let global = Rope::from_params(full, theta, max)?;
            let local = match params.get("sliding_attention") {
                Some(p) => Some(Rope::from_params(p, None, max)?),
                None => None,
            };
            if let Some(local) = &local {
                if local.scaling != RopeScaling::None {
                    bail!("a scaled rope on sliding layers is not supported: {params}");
                }
            }
            return Ok((global.theta, global.scaling, local.map(|l| l.theta)));
        }
        let rope = Rope::from_params(params, theta, max)?;
        let local = json
            .get("rope_local_base_freq")
            .and_then(Json::as_f64)
            .map(|v| v as f32);
        return Ok((rope.theta, rope.scaling, local));
    }
    let scaling = json.get("rope_scaling").cloned().unwrap_or(Json::Null);
    let rope = Rope::from_params(&scaling, Some(theta.unwrap_or(10_000.0)), max)?;
    let local = json
        .get("rope_local_base_freq")
        .and_then(Json::as_f64)
        .map(|v| v as f32);
    Ok((rope.theta, rope.scaling, local))
}

/// Refuses a config key that changes the computation when the family does not read it:
/// `served` lists what this family reads; every other key of [`OPTIONS`] must be absent,
/// null, false or its neutral value.
pub(crate) fn refuse_unknown(family: Family, json: &Json, served: &[&str]) -> Result<()> {
    for &(key, neutral) in OPTIONS {
        if served.contains(&key) {
            continue;
        }
        let Some(value) = json.get(key) else { continue };
        let is_neutral = value.is_null()
            || *value == Json::Bool(false)
            || neutral.is_some_and(|n| value.as_f64() == Some(n));
        if !is_neutral {
            bail!(
                "{} option {key} = {value} is not supported",
                family.model_type()
            );
        }
    }
    let act = json
        .get("hidden_act")
        .or_else(|| json.get("hidden_activation"))
        .and_then(Json::as_str);
    let expected = match family {
        Family::Gemma2 | Family::Gemma3 => ["gelu_pytorch_tanh", "gelu_pytorch_tanh"],
        _ => ["silu", "swish"],
    };
    if let Some(act) = act {
        if !expected.contains(&act) {
            bail!(
                "{} activation {act:?} is not supported (only {})",
                family.model_type(),
                expected[0]
            );
        }
    }
    Ok(())
}

/// Config keys that change the forward pass, with their neutral number (if any): a
/// family that does not read one refuses it unless it is neutral.
const OPTIONS: &[(&str, Option<f64>)] = &[
    ("attention_bias", None),
    ("mlp_bias", None),
    ("sliding_window", None),
    ("use_sliding_window", None),
    ("layer_types", None),
    ("attn_logit_softcapping", None),
    ("final_logit_softcapping", None),
    ("query_pre_attn_scalar", None),
    ("partial_rotary_factor", Some(1.0)),
    ("rope_local_base_freq", None),
    ("use_bidirectional_attention", None),
    ("attention_chunk_size", None),
    ("no_rope_layers", None),
    ("logits_scaling", Some(1.0)),
    ("embedding_multiplier", Some(1.0)),
    ("residual_multiplier", Some(1.0)),
    ("attention_multiplier", None),
];

#[cfg(test)]
mod tests {
    use crate::model::ModelConfig;
    use serde_json::json;

    fn config(extra: serde_json::Value) -> anyhow::Result<ModelConfig> {
        let mut j = json!({"hidden_size": 64, "intermediate_size": 128, "vocab_size": 100,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256});
        for (k, v) in extra.as_object().unwrap() {
            j[k] = v.clone();
        }
        ModelConfig::from_hf_json(&j, "t")
    }

    fn err(extra: serde_json::Value) -> String {
        format!("{:#}", config(extra).unwrap_err())
    }

    #[test]
    fn families_read_what_they_change() {
        let qwen2 = config(json!({"model_type": "qwen2"})).unwrap();
        assert!(qwen2.arch.qkv_bias && !qwen2.arch.o_bias && !qwen2.arch.qk_norm);
        let qwen3 = config(json!({"model_type": "qwen3", "head_dim": 32})).unwrap();
        assert!(qwen3.arch.qk_norm && !qwen3.arch.qkv_bias && qwen3.head_dim == 32);
        let gemma2 = config(json!({"model_type": "gemma2", "sliding_window": 8,
            "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0}))
        .unwrap();
        assert_eq!(gemma2.attention_scale(), 1.0 / 16.0);
        assert_eq!(gemma2.arch.window(0), Some(8));
        assert_eq!(
            gemma2.arch.window(1),
            None,
            "Gemma 2 alternates from a sliding layer"
        );
        assert!(gemma2.tie_word_embeddings && gemma2.arch.norm_offset);
        let mistral = config(json!({"model_type": "mistral", "sliding_window": 16})).unwrap();
        assert!((0..4).all(|l| mistral.arch.window(l) == Some(16)));
        let no_window = config(json!({"model_type": "mistral", "sliding_window": null})).unwrap();
        assert_eq!(no_window.arch.window(0), None);
        let llama = config(json!({"model_type": "llama", "attention_bias": true})).unwrap();
        assert!(llama.arch.qkv_bias && llama.arch.o_bias && !llama.arch.mlp_bias);
    }

    #[test]
    fn what_a_family_does_not_serve_is_refused_by_name() {
        assert!(err(json!({"model_type": "phi4"})).contains("\"phi4\" is not supported"));
        let longrope = json!({"model_type": "phi3", "rope_scaling": {"type": "longrope",
            "short_factor": [1.0], "long_factor": [1.0]}});
        assert!(err(longrope).contains("longrope"));
        assert!(err(json!({"model_type": "llama", "sliding_window": 8})).contains("sliding_window"));
        assert!(
            err(json!({"model_type": "qwen2", "attn_logit_softcapping": 30.0}))
                .contains("attn_logit_softcapping")
        );
        assert!(err(json!({"model_type": "llama", "hidden_act": "gelu"})).contains("gelu"));
        assert!(
            err(json!({"model_type": "llama", "partial_rotary_factor": 0.5}))
                .contains("partial_rotary_factor")
        );
        assert!(err(json!({"rope_scaling": {"rope_type": "longrope"}})).contains("longrope"));
        // A neutral value of an option is no change.
        config(json!({"model_type": "llama", "mlp_bias": false, "partial_rotary_factor": 1.0}))
            .unwrap();
    }
}
