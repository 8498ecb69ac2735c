//! Llama (1, 2, 3.x, SmolLM) and Mistral: the defaults, plus Llama's `attention_bias`
//! and `mlp_bias`, and Mistral's `sliding_window` over every layer.
use super::{layer_types, read_rope, refuse_unknown, Architecture, Dims, Family, LayerAttention};
use anyhow::{bail, Result};
use serde_json::Value as Json;

pub(super) fn architecture(family: Family, json: &Json, dims: &Dims) -> Result<Architecture> {
    let served: &[&str] = match family {
        Family::Mistral => &["sliding_window"],
        _ => &["attention_bias", "mlp_bias"],
    };
    refuse_unknown(family, json, served)?;
    let flag = |key: &str| json.get(key).and_then(Json::as_bool).unwrap_or(false);
    let (_, rope_scaling, local) = read_rope(json, dims)?;
    if local.is_some() {
        bail!("{} has no local rope", family.model_type());
    }
    let mut arch = Architecture {
        family,
        qkv_bias: flag("attention_bias"),
        o_bias: flag("attention_bias"),
        mlp_bias: flag("mlp_bias"),
        rope_scaling,
        ..Architecture::default()
    };
    if family == Family::Mistral {
        if let Some(window) = json.get("sliding_window").and_then(Json::as_u64) {
            arch.sliding_window = Some(window as usize);
            arch.layers = layer_types(json, dims.num_layers, |_| LayerAttention::Sliding)?;
        }
    }
    Ok(arch)
}
