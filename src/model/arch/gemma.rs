//! Gemma 2 and Gemma 3 (text): `(1 + w)` RMS norms, four per layer, embeddings times
//! `sqrt(hidden)`, a GELU-tanh gated MLP, attention scaled by `query_pre_attn_scalar`,
//! sliding and full layers alternating (`layer_types`); Gemma 2 soft-caps attention
//! scores and the final logits; Gemma 3 norms each q/k head and gives its sliding layers
//! their own rope base (`rope_local_base_freq`).
use super::LayerAttention;
use super::{layer_types, read_rope, refuse_unknown, Activation, Architecture, Dims, Family};
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

pub(super) fn architecture(family: Family, json: &Json, dims: &Dims) -> Result<Architecture> {
    let mut served = vec![
        "sliding_window",
        "layer_types",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
    ];
    if family == Family::Gemma3 {
        served.push("rope_local_base_freq");
    }
    refuse_unknown(family, json, &served)?;
    let number = |key: &str| json.get(key).and_then(Json::as_f64);
    let gemma3 = family == Family::Gemma3;
    // transformers' defaults: Gemma 2 alternates from a sliding first layer; Gemma 3
    // has a full layer every `sliding_window_pattern` (6).
    let pattern = json
        .get("sliding_window_pattern")
        .and_then(Json::as_u64)
        .unwrap_or(6) as usize;
    let layers = layer_types(json, dims.num_layers, |i| {
        let sliding = if gemma3 {
            (i + 1) % pattern != 0
        } else {
            (i + 1) % 2 == 1
        };
        if sliding {
            LayerAttention::Sliding
        } else {
            LayerAttention::Full
        }
    })?;
    let window = number("sliding_window").context("Gemma configs have a sliding_window")?;
    let scalar = number("query_pre_attn_scalar").unwrap_or(dims.head_dim as f64);
    let (_, rope_scaling, local) = read_rope(json, dims)?;
    if !gemma3 && local.is_some() {
        bail!("gemma2 has no local rope");
    }
    let softcap = |key: &str| number(key).map(|v| v as f32);
    if gemma3 && json.get("use_bidirectional_attention") == Some(&Json::Bool(true)) {
        bail!("gemma3 option use_bidirectional_attention is not supported");
    }
    Ok(Architecture {
        family,
        qk_norm: gemma3,
        norm_offset: true,
        sandwich_norms: true,
        activation: Activation::GeluTanh,
        embed_scale: true,
        attention_scale: Some((1.0 / scalar.sqrt()) as f32),
        attention_softcap: softcap("attn_logit_softcapping"),
        final_softcap: softcap("final_logit_softcapping"),
        rope_scaling,
        local_rope_theta: if gemma3 {
            Some(local.unwrap_or(10_000.0))
        } else {
            None
        },
        sliding_window: Some(window as usize),
        layers,
        ..Architecture::default()
    })
}
