//! Phi-3 (mini, small, medium; 4k context): Llama's decoder with q/k/v fused into one
//! `qkv_proj` (rows q, k, v) and gate/up into one `gate_up_proj` (rows gate, then up),
//! which its checkpoints and its PEFT adapters name as single modules; a
//! `sliding_window` over every layer when set. The 128k variants' `longrope` scaling is
//! refused (by the rope reader).
use super::{layer_types, read_rope, refuse_unknown, Architecture, Dims, Family, LayerAttention};
use anyhow::{bail, Result};
use serde_json::Value as Json;

pub(super) fn architecture(family: Family, json: &Json, dims: &Dims) -> Result<Architecture> {
    refuse_unknown(family, json, &["sliding_window"])?;
    let (_, rope_scaling, local) = read_rope(json, dims)?;
    if local.is_some() {
        bail!("phi3 has no local rope");
    }
    let mut arch = Architecture {
        family,
        fused_projections: true,
        rope_scaling,
        ..Architecture::default()
    };
    if let Some(window) = json.get("sliding_window").and_then(Json::as_u64) {
        arch.sliding_window = Some(window as usize);
        arch.layers = layer_types(json, dims.num_layers, |_| LayerAttention::Sliding)?;
    }
    Ok(arch)
}
