//! Prompt tuning, P-tuning and prefix tuning folders (`peft_type` `PROMPT_TUNING`,
//! `P_TUNING`, `PREFIX_TUNING`): the learned virtual tokens PEFT puts before every
//! request's tokens, as input embeddings or as every layer's keys and values.
//!
//! Semantics (PEFT's `PeftModelForCausalLM.forward` for prompt learning): the
//! `num_virtual_tokens` rows of `prompt_embeddings` come before the real tokens'
//! embeddings, so they take positions `0..n` and the real tokens `n..`; every layer
//! attends to them like prompt tokens. A P-tuning folder saved for inference holds the
//! prompt encoder's output (PEFT's `get_prompt_embedding_to_save`), which is what its
//! inference uses: no encoder runs here.
//!
//! Prefix tuning (PEFT's `get_prompt` for `PREFIX_TUNING`): `prompt_embeddings` is
//! `[n, layers * 2 * kv_width]`; for virtual token t, layer l's key is the `kv_width`
//! values from `2 l kv_width` and its value those from `(2 l + 1) kv_width` (KV heads,
//! head-major). They fill the cache's first n slots unrotated; real tokens take positions
//! from n and attend to them as to earlier tokens.
//!
//! Invariants: the table is `[num_virtual_tokens, hidden]` (prefix: `[n, layers * 2 *
//! kv_width]`) f32, every value finite; `token_dim` matches the base; a config for an
//! encoder-decoder model (`num_transformer_submodules` 2) is refused.
use super::config::{positive_int, RawConfig};
use super::tensors::{finite, SafeTensors};
use super::AdapterError::{self, Invalid, Unsupported};
use super::{AdapterKind, AdapterWeights, BaseShape, KvPrefix, VirtualTokens};
use serde_json::Value;

/// The tensor PEFT saves the virtual-token embeddings under.
const PROMPT_KEY: &str = "prompt_embeddings";

/// Loads the virtual-token embeddings of a prompt-learning folder of `kind`.
pub(super) fn load(
    raw: &RawConfig,
    file: &SafeTensors,
    base: &BaseShape,
    kind: AdapterKind,
) -> Result<AdapterWeights, AdapterError> {
    let n = match raw.get("num_virtual_tokens") {
        None => return Err(Invalid("config: missing num_virtual_tokens".into())),
        Some(v) => positive_int("num_virtual_tokens", v)?,
    };
    // Prefix tuning's token dimension is the K/V width (PEFT uses the KV heads).
    let token_dim = match kind {
        AdapterKind::PrefixTuning => base.kv_out,
        _ => base.hidden_size,
    };
    if let Some(dim) = raw.get("token_dim").and_then(Value::as_u64) {
        if dim as usize != token_dim {
            return Err(Invalid(format!(
                "config: token_dim {dim} is not the base model's {token_dim}"
            )));
        }
    }
    match raw
        .get("num_transformer_submodules")
        .and_then(Value::as_u64)
    {
        None | Some(1) => {}
        Some(other) => {
            return Err(Unsupported(format!(
                "num_transformer_submodules = {other} (a decoder-only base has 1)"
            )))
        }
    }
    let width = match kind {
        AdapterKind::PrefixTuning => {
            if let Some(layers) = raw.get("num_layers").and_then(Value::as_u64) {
                if layers as usize != base.num_layers {
                    return Err(Invalid(format!(
                        "config: num_layers {layers} is not the base model's {}",
                        base.num_layers
                    )));
                }
            }
            base.num_layers * 2 * base.kv_out
        }
        _ => base.hidden_size,
    };
    let mut table = None;
    for t in &file.tensors {
        if t.name != PROMPT_KEY {
            return Err(Invalid(format!(
                "unexpected key {} (a {} folder holds only {PROMPT_KEY})",
                t.name,
                kind.name()
            )));
        }
        table = Some(finite(&t.name, t.values(file, &[n, width])?)?);
    }
    let table = table.ok_or_else(|| Invalid(format!("missing key {PROMPT_KEY}")))?;
    let (prompt, prefix) = match kind {
        AdapterKind::PrefixTuning => (
            None,
            Some(KvPrefix {
                count: n,
                kv_width: base.kv_out,
                values: table,
            }),
        ),
        _ => (
            Some(VirtualTokens {
                count: n,
                embeddings: table,
            }),
            None,
        ),
    };
    Ok(AdapterWeights {
        layers: (0..base.num_layers)
            .map(|_| std::array::from_fn(|_| None))
            .collect(),
        bytes: 4 * n * width,
        prompt,
        prefix,
        ..AdapterWeights::empty(kind)
    })
}
