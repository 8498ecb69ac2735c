//! The Llama checkpoint layout: the one source of truth for the names and shapes of the
//! base model's tensors in the Hugging Face layout, and for their names in llama.cpp's
//! GGUF files. Loading, the GGUF mapping, synthetic models and test weights all read it.
//!
//! Invariant: [`tensor_specs`] lists every tensor a model of that config has, once, in a
//! fixed order (embedding, final norm, the untied LM head, then per layer the
//! projection modules of [`modules`] (the seven sites in [`LoraSite::ALL`] order, or
//! Phi-3's fused ones), the two norms, and what the family adds:
//! biases, Gemma's two extra norms, per-head q/k norms); a checkpoint tensor not in it
//! is not served, and the loader refuses it by name.
use super::config::ModelConfig;
use crate::lora::peft::LoraSite;

/// The token embedding `[vocab, hidden]`.
pub const EMBEDDING: &str = "model.embed_tokens.weight";
/// The final RMS norm `[hidden]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The LM head `[vocab, hidden]` (absent when tied to the embedding).
pub const LM_HEAD: &str = "lm_head.weight";

/// One projection module of a decoder layer as the checkpoint and PEFT name it, and the
/// adapter sites it computes, stacked in this order (output rows). Most families have
/// one module per site; Phi-3 fuses q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`).
#[derive(Debug, PartialEq, Eq)]
pub struct ProjectionModule {
    /// `self_attn` or `mlp`.
    pub parent: &'static str,
    pub name: &'static str,
    pub sites: &'static [LoraSite],
}

impl ProjectionModule {
    /// `model.layers.{layer}.self_attn.qkv_proj` and the like.
    pub fn path(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent, self.name)
    }
}

const fn module(
    parent: &'static str,
    name: &'static str,
    sites: &'static [LoraSite],
) -> ProjectionModule {
    ProjectionModule {
        parent,
        name,
        sites,
    }
}

/// One module per site (every family but Phi-3), in [`LoraSite::ALL`] order.
pub const SEPARATE_MODULES: [ProjectionModule; 7] = [
    module("self_attn", "q_proj", &[LoraSite::Q]),
    module("self_attn", "k_proj", &[LoraSite::K]),
    module("self_attn", "v_proj", &[LoraSite::V]),
    module("self_attn", "o_proj", &[LoraSite::O]),
    module("mlp", "gate_proj", &[LoraSite::Gate]),
    module("mlp", "up_proj", &[LoraSite::Up]),
    module("mlp", "down_proj", &[LoraSite::Down]),
];

/// Phi-3's modules: q/k/v and gate/up fused.
pub const FUSED_MODULES: [ProjectionModule; 4] = [
    module(
        "self_attn",
        "qkv_proj",
        &[LoraSite::Q, LoraSite::K, LoraSite::V],
    ),
    module("self_attn", "o_proj", &[LoraSite::O]),
    module("mlp", "gate_up_proj", &[LoraSite::Gate, LoraSite::Up]),
    module("mlp", "down_proj", &[LoraSite::Down]),
];

/// The projection modules of a model of `cfg`'s family.
pub fn modules(cfg: &ModelConfig) -> &'static [ProjectionModule] {
    if cfg.arch.fused_projections {
        &FUSED_MODULES
    } else {
        &SEPARATE_MODULES
    }
}

/// The module of `modules` computing exactly `sites`, when one does.
pub fn module_of<'a>(
    modules: &'a [ProjectionModule],
    sites: &[LoraSite],
) -> Option<&'a ProjectionModule> {
    modules.iter().find(|m| m.sites == sites)
}

/// What a tensor is, which decides how it is used (and initialised, for random models).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    Embedding,
    /// An RMS-norm weight vector.
    Norm,
    /// A linear projection `[out, in]` at an adapter site.
    Linear(LoraSite),
    /// A fused projection `[sum of out, in]` of several sites (Phi-3).
    FusedLinear,
    /// The bias `[out]` of a site's projection.
    Bias(LoraSite),
    /// A per-head RMS-norm weight `[head_dim]` (q or k).
    HeadNorm,
    LmHead,
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// `[out, in]` for projections, `[n]` for norms.
    pub shape: Vec<usize>,
    pub kind: TensorKind,
}

impl TensorSpec {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `model.layers.{layer}.self_attn.q_proj.weight` and the like.
pub fn linear_weight(layer: usize, site: LoraSite) -> String {
    format!("{}.weight", site.module_path(layer))
}

/// The RMS norm before attention of `layer`.
pub fn input_norm(layer: usize) -> String {
    format!("model.layers.{layer}.input_layernorm.weight")
}

/// The RMS norm before the MLP of `layer`.
pub fn post_attention_norm(layer: usize) -> String {
    format!("model.layers.{layer}.post_attention_layernorm.weight")
}

/// The bias of a site's projection.
pub fn linear_bias(layer: usize, site: LoraSite) -> String {
    format!("{}.bias", site.module_path(layer))
}

/// Gemma's norm before the MLP of `layer` (Llama's `post_attention_layernorm` plays
/// that part there; in Gemma that one norms the attention output).
pub fn pre_feedforward_norm(layer: usize) -> String {
    format!("model.layers.{layer}.pre_feedforward_layernorm.weight")
}

/// Gemma's norm of the MLP output of `layer`.
pub fn post_feedforward_norm(layer: usize) -> String {
    format!("model.layers.{layer}.post_feedforward_layernorm.weight")
}

/// The per-head RMS norm of the queries (`q`) or keys (`k`) of `layer`.
pub fn head_norm(layer: usize, which: char) -> String {
    format!("model.layers.{layer}.self_attn.{which}_norm.weight")
}

/// Whether the family gives `site` a bias.
pub fn has_bias(cfg: &ModelConfig, site: LoraSite) -> bool {
    let a = &cfg.arch;
    match site {
        LoraSite::Q | LoraSite::K | LoraSite::V => a.qkv_bias,
        LoraSite::O => a.o_bias,
        LoraSite::Gate | LoraSite::Up | LoraSite::Down => a.mlp_bias,
    }
}

/// Every tensor of a model with config `cfg`, in the fixed order of the module docs.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let h = cfg.hidden_size;
    let base = cfg.base_shape();
    let norm = |name: String| TensorSpec {
        name,
        shape: vec![h],
        kind: TensorKind::Norm,
    };
    let mut specs = vec![
        TensorSpec {
            name: EMBEDDING.into(),
            shape: vec![cfg.vocab_size, h],
            kind: TensorKind::Embedding,
        },
        norm(FINAL_NORM.into()),
    ];
    if !cfg.tie_word_embeddings {
        specs.push(TensorSpec {
            name: LM_HEAD.into(),
            shape: vec![cfg.vocab_size, h],
            kind: TensorKind::LmHead,
        });
    }
    for layer in 0..cfg.num_layers {
        for module in modules(cfg) {
            let (inp, _) = base.dims(module.sites[0]);
            let out = module.sites.iter().map(|&s| base.dims(s).1).sum();
            let kind = match module.sites {
                [site] => TensorKind::Linear(*site),
                _ => TensorKind::FusedLinear,
            };
            specs.push(TensorSpec {
                name: format!("{}.weight", module.path(layer)),
                shape: vec![out, inp],
                kind,
            });
        }
        for site in LoraSite::ALL.into_iter().filter(|s| has_bias(cfg, *s)) {
            specs.push(TensorSpec {
                name: linear_bias(layer, site),
                shape: vec![base.dims(site).1],
                kind: TensorKind::Bias(site),
            });
        }
        specs.push(norm(input_norm(layer)));
        specs.push(norm(post_attention_norm(layer)));
        if cfg.arch.sandwich_norms {
            specs.push(norm(pre_feedforward_norm(layer)));
            specs.push(norm(post_feedforward_norm(layer)));
        }
        if cfg.arch.qk_norm {
            for which in ['q', 'k'] {
                specs.push(TensorSpec {
                    name: head_norm(layer, which),
                    shape: vec![cfg.head_dim],
                    kind: TensorKind::HeadNorm,
                });
            }
        }
    }
    specs
}

/// llama.cpp's name of a module inside `blk.N.` (`rest` being the Hugging Face name
/// inside `model.layers.N.`), for a model of `cfg`'s family.
fn gguf_module(cfg: &ModelConfig, rest: &str) -> Option<&'static str> {
    Some(match rest {
        "input_layernorm" => "attn_norm",
        // Gemma's post_attention_layernorm norms the attention output; Llama's is the
        // norm before the MLP.
        "post_attention_layernorm" if cfg.arch.sandwich_norms => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // Phi-3's fused gate/up (gate rows first) is llama.cpp's ffn_up.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    })
}

/// The GGUF (llama.cpp) name of a Hugging Face tensor name of a model of `cfg`.
pub fn to_gguf(cfg: &ModelConfig, hf: &str) -> Option<String> {
    match hf {
        EMBEDDING => return Some("token_embd.weight".into()),
        FINAL_NORM => return Some("output_norm.weight".into()),
        LM_HEAD => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    Some(format!(
        "blk.{layer}.{}.{suffix}",
        gguf_module(cfg, module)?
    ))
}

/// Every tensor of a model of `cfg` by its GGUF name (the inverse of [`to_gguf`] over
/// [`tensor_specs`]): a GGUF tensor not here is not one the model uses.
pub fn gguf_specs(cfg: &ModelConfig) -> std::collections::HashMap<String, TensorSpec> {
    tensor_specs(cfg)
        .into_iter()
        .filter_map(|spec| Some((to_gguf(cfg, &spec.name)?, spec)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf() {
        let cfg = crate::model::synth::shape("tiny", 100).unwrap();
        let specs = gguf_specs(&cfg);
        assert_eq!(
            specs["blk.1.attn_q.weight"].name,
            "model.layers.1.self_attn.q_proj.weight"
        );
        assert_eq!(
            specs["blk.0.ffn_norm.weight"].name,
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert!(!specs.contains_key("rope_freqs.weight"));
        assert_eq!(specs.len(), tensor_specs(&cfg).len());
        assert_eq!(to_gguf(&cfg, "model.layers.0.mlp.nothing.weight"), None);
        // Gemma's four norms: ffn_norm is the one before the MLP there.
        let gemma =
            crate::model::synth::with_family(&cfg, crate::model::arch::Family::Gemma2).unwrap();
        let specs = gguf_specs(&gemma);
        assert_eq!(
            specs["blk.0.ffn_norm.weight"].name,
            "model.layers.0.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            specs["blk.0.post_attention_norm.weight"].name,
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(specs.len(), tensor_specs(&gemma).len());
    }

    #[test]
    fn specs_cover_every_tensor_once() {
        let mut cfg = crate::model::synth::shape("tiny", 100).unwrap();
        let tied = tensor_specs(&cfg);
        assert_eq!(tied.len(), 2 + cfg.num_layers * 9);
        cfg.tie_word_embeddings = false;
        let untied = tensor_specs(&cfg);
        assert_eq!(untied[2].name, LM_HEAD);
        let mut names: Vec<&str> = untied.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), untied.len());
    }
}
