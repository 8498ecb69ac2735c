//! Qwen2 / Qwen2.5 (biases on q, k and v) and Qwen3 (per-head q/k RMS norms, a
//! `head_dim` of its own, no biases unless `attention_bias`). Sliding layers when
//! `use_sliding_window`: the layers from `max_window_layers` on (or `layer_types`).
use super::{layer_types, read_rope, refuse_unknown, Architecture, Dims, Family, LayerAttention};
use anyhow::{bail, Result};
use serde_json::Value as Json;

pub(super) fn architecture(family: Family, json: &Json, dims: &Dims) -> Result<Architecture> {
    let served: &[&str] = match family {
        Family::Qwen3 => &[
            "attention_bias",
            "use_sliding_window",
            "sliding_window",
            "layer_types",
        ],
        _ => &["use_sliding_window", "sliding_window", "layer_types"],
    };
    refuse_unknown(family, json, served)?;
    let (_, rope_scaling, local) = read_rope(json, dims)?;
    if local.is_some() {
        bail!("{} has no local rope", family.model_type());
    }
    let sliding = json
        .get("use_sliding_window")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let max_window_layers = json
        .get("max_window_layers")
        .and_then(Json::as_u64)
        .map_or(dims.num_layers, |v| v as usize);
    let layers = layer_types(json, dims.num_layers, |i| {
        if sliding && i >= max_window_layers {
            LayerAttention::Sliding
        } else {
            LayerAttention::Full
        }
    })?;
    let window = json.get("sliding_window").and_then(Json::as_u64);
    let any_sliding = layers.contains(&LayerAttention::Sliding);
    if any_sliding && (!sliding || window.is_none()) {
        bail!(
            "{}: sliding layers without use_sliding_window and a sliding_window",
            family.model_type()
        );
    }
    let qwen3 = family == Family::Qwen3;
    let bias = json
        .get("attention_bias")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    Ok(Architecture {
        family,
        qkv_bias: !qwen3 || bias,
        o_bias: qwen3 && bias,
        qk_norm: qwen3,
        rope_scaling,
        sliding_window: if any_sliding {
            window.map(|w| w as usize)
        } else {
            None
        },
        layers,
        ..Architecture::default()
    })
}
