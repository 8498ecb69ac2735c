//! The same weights as safetensors and as a GGUF file written by llama.cpp's own
//! converter (`convert_hf_to_gguf.py` of the llama.cpp vendored in the llama-cpp-python
//! sdist; `tests/fixtures/families/gguf/`, made by
//! `scripts/family_fixtures/make_family_gguf.py`, f32): an independent writer, so a
//! mapping mistake in our GGUF reader shows (a round trip through our own writer could
//! not). Where a GGUF file carries everything the config says, the GGUF model is held to
//! transformers' reference itself; where llama.cpp has rules of its own (Gemma's
//! attention scale and layer pattern, no Mistral window), to our safetensors model
//! under a config saying the same.
#[path = "common/families.rs"]
mod families;

use families::*;
use multilora::model::weights::{load_resolved, ModelSource};
use multilora::model::CpuBackend;
use serde_json::Value;
use std::path::PathBuf;

fn gguf_path(name: &str) -> PathBuf {
    family_dir("gguf").join(format!("{name}.gguf"))
}

fn gguf_model(name: &str) -> Model {
    load_resolved(
        "fixture",
        &ModelSource::Gguf(gguf_path(name)),
        CpuBackend::default(),
    )
    .unwrap_or_else(|e| panic!("{name}.gguf: {e:#}"))
    .model
}

/// The GGUF of `name` against transformers' reference, base and every adapter.
fn assert_gguf_matches_transformers(name: &str, block_size: usize) {
    let worst = check_model(
        &format!("{name}.gguf"),
        &gguf_model(name),
        &oracle(name),
        &family_dir(name),
        block_size,
    );
    assert!(worst <= TOLERANCE, "{name}.gguf: {worst} over {TOLERANCE}");
}

/// The GGUF of `name` against our safetensors model of the same weights under the
/// config `edit` makes (what llama.cpp runs for that file).
fn assert_gguf_matches_safetensors(name: &str, block_size: usize, edit: impl Fn(&mut Value)) {
    let dir = edited_copy(name, edit);
    let reference = our_oracle(&load_model(dir.path()), &oracle(name), &family_dir(name));
    let worst = check_model(
        &format!("{name}.gguf"),
        &gguf_model(name),
        &reference,
        &family_dir(name),
        block_size,
    );
    assert!(worst <= TOLERANCE, "{name}.gguf: {worst} over {TOLERANCE}");
}

#[test]
fn llama3_gguf_with_rope_freqs_matches_transformers() {
    // llama.cpp stores Llama 3's rope scaling as rope_freqs.weight.
    assert_gguf_matches_transformers("llama3", 16);
}

#[test]
fn llama_gguf_with_biases_matches_transformers() {
    assert_gguf_matches_transformers("llama-bias", 16);
}

#[test]
fn qwen2_gguf_matches_transformers() {
    assert_gguf_matches_transformers("qwen2", 16);
}

#[test]
fn qwen2_yarn_gguf_matches_transformers() {
    assert_gguf_matches_transformers("qwen2-yarn", 16);
}

#[test]
fn qwen3_gguf_matches_transformers() {
    assert_gguf_matches_transformers("qwen3", 16);
}

#[test]
fn phi3_gguf_matches_transformers() {
    assert_gguf_matches_transformers("phi3", 16);
}

#[test]
fn gemma2_gguf_matches_safetensors_under_llama_cpp_rules() {
    // llama.cpp scales queries by 1/sqrt(head_dim) (the fixture's
    // query_pre_attn_scalar is 24, its head_dim 16).
    assert_gguf_matches_safetensors("gemma2", 4, |c| c["query_pre_attn_scalar"] = 16.into());
}

#[test]
fn gemma3_gguf_matches_safetensors_under_llama_cpp_rules() {
    // llama.cpp's Gemma 3: five sliding layers then a full one (so all four of the
    // fixture's), local rope base 10000, 1/sqrt(head_dim).
    assert_gguf_matches_safetensors("gemma3", 4, |c| {
        c["query_pre_attn_scalar"] = 16.into();
        c["layer_types"] = serde_json::json!(vec!["sliding_attention"; 4]);
    });
}

#[test]
fn mistral_gguf_is_served_as_llama_cpp_runs_it() {
    // llama.cpp's converter writes a Mistral checkpoint as `llama` without its
    // sliding_window, and llama.cpp attends to every position: so do we, for that file.
    assert_gguf_matches_safetensors("mistral", 16, |c| c["sliding_window"] = Value::Null);
}
