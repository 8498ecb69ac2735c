//! Every model family against transformers and PEFT: the tiny random checkpoints of
//! `tests/fixtures/families/` (written by `scripts/family_fixtures/`, weights rounded to
//! bf16) served from their folders in f32, each prompt's greedy ids equal to the
//! reference and each chosen token's logprob within 2e-3, base and with every adapter the
//! family's folder has; alone, and all prompts and adapters in one batch; at K/V block
//! sizes that do and do not divide the sliding window.
#[path = "common/families.rs"]
mod families;

use families::*;
use multilora::lora::peft::{load_peft_adapter_served, AdapterLimits};
use multilora::model::backend::Backend;
use serde_json::Value;

#[test]
fn llama3_with_rope_parameters_matches_transformers() {
    assert_family("llama3", &[16]);
}

#[test]
fn llama3_classic_config_reads_the_same_rope() {
    let dir = family_dir("llama3");
    let v5 = multilora::model::ModelConfig::from_hf_config(&dir.join("config.json"), "x").unwrap();
    let classic =
        multilora::model::ModelConfig::from_hf_config(&dir.join("config.classic.json"), "x")
            .unwrap();
    assert_eq!(v5, classic);
    assert!(v5.rope_theta == 500_000.0, "{v5:?}");
}

#[test]
fn llama_with_attention_and_mlp_biases_matches_transformers() {
    assert_family("llama-bias", &[16]);
}

#[test]
fn qwen2_matches_transformers() {
    assert_family("qwen2", &[16]);
}

#[test]
fn qwen2_yarn_matches_transformers() {
    assert_family("qwen2-yarn", &[16]);
}

#[test]
fn qwen3_matches_transformers() {
    assert_family("qwen3", &[16]);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    assert_family("mistral", &[4, 3, 16]);
}

#[test]
fn gemma2_matches_transformers() {
    assert_family("gemma2", &[4, 3]);
}

#[test]
fn gemma3_matches_transformers() {
    assert_family("gemma3", &[4, 3]);
}

#[test]
fn a_tensor_the_config_does_not_declare_is_refused_by_name() {
    // The biased checkpoint under a config that says it has no biases: served without
    // them it would be wrong, so it is refused, naming a bias.
    let dir = edited_copy("llama-bias", |c| {
        c["attention_bias"] = false.into();
        c["mlp_bias"] = false.into();
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("model.layers.0.") && err.contains(".bias"),
        "{err}"
    );
    // Qwen3's q/k norms under a Qwen2 config.
    let dir = edited_copy("qwen3", |c| c["model_type"] = "qwen2".into());
    let err = load_error(dir.path());
    assert!(
        err.contains("_norm.weight") || err.contains("bias"),
        "{err}"
    );
}

#[test]
fn phi3_fused_projections_match_transformers() {
    // qkv_proj and gate_up_proj are single modules to the checkpoint and to PEFT: a
    // LoRA on one is one A and one B over the fused output; (IA)³ scales gate_up_proj's
    // input (feed-forward) and qkv_proj's output.
    assert_family("phi3", &[4, 16]);
}

#[test]
fn phi3_longrope_is_refused_by_name() {
    let dir = edited_copy("phi3", |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": vec![1.0; 8], "long_factor": vec![2.0; 8]});
    });
    let err = load_error(dir.path());
    assert!(err.contains("longrope"), "{err}");
}

#[test]
fn phi3_adapters_name_its_fused_modules() {
    // A PEFT adapter for Phi-3 targets qkv_proj; one naming q_proj (a Llama module) is
    // refused by name, not silently applied to part of the fused projection.
    let model = load_model(&family_dir("phi3"));
    let dir = tempfile::tempdir().unwrap();
    let src = family_dir("phi3").join("lora");
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("adapter_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["target_modules"] = serde_json::json!(["q_proj", "v_proj"]);
    std::fs::write(&path, config.to_string()).unwrap();
    let served = model.served_base();
    let err = load_peft_adapter_served(
        dir.path(),
        &model.base_shape(),
        &AdapterLimits::default(),
        model.backend().adapter_dtype(),
        Some(&*served),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("q_proj"), "{err}");
}
