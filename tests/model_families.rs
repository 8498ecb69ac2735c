//! Every model family against transformers and PEFT: the tiny random checkpoints of
//! `tests/fixtures/families/` (written by `scripts/family_fixtures/`, weights rounded to
//! bf16) served from their folders in f32, each prompt's greedy ids equal to the
//! reference and each chosen token's logprob within 2e-3, base and with every adapter the
//! family's folder has; alone, and all prompts and adapters in one batch; at K/V block
//! sizes that do and do not divide the sliding window.
use multilora::engine::block_allocator::{Allocation, BlockAllocator};
use multilora::lora::peft::{load_peft_adapter_served, AdapterLimits, AdapterWeights};
use multilora::model::backend::Backend;
use multilora::model::batch::VIRTUAL_TOKEN_BASE;
use multilora::model::weights::{load_resolved, ModelSource};
use multilora::model::{CpuBackend, ForwardBatch, Llama};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Model = Llama<CpuBackend>;

const TOLERANCE: f64 = 2e-3;

fn family_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(name)
}

fn oracle(name: &str) -> Value {
    let text = std::fs::read_to_string(family_dir(name).join("oracle.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load_model(dir: &Path) -> Model {
    load_resolved(
        "fixture",
        &ModelSource::HfDir(dir.to_path_buf()),
        CpuBackend::default(),
    )
    .unwrap()
    .model
}

fn load_adapter(model: &Model, dir: &Path) -> Arc<AdapterWeights> {
    let served = model.served_base();
    let dtype = model.backend().adapter_dtype();
    let w = load_peft_adapter_served(
        dir,
        &model.base_shape(),
        &AdapterLimits::default(),
        dtype,
        Some(&*served),
    );
    Arc::new(w.unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
}

/// One sequence of a lockstep greedy decode.
struct Seq {
    tokens: Vec<u32>,
    slot: i32,
    table: Vec<u32>,
    /// Tokens already in the cache.
    cached: usize,
    /// `(id, logprob)` of each generated token.
    out: Vec<(u32, f64)>,
}

fn log_softmax_at(logits: &[f32], id: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[id] as f64 - max - sum.ln()
}

fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// Decodes `new_tokens` greedily for every sequence together, one step each time.
fn decode(
    model: &Model,
    seqs: &mut [Seq],
    adapters: &[Arc<AdapterWeights>],
    block_size: usize,
    new_tokens: usize,
) {
    let longest = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0) + new_tokens;
    let blocks = seqs.len() * longest.div_ceil(block_size) + 1;
    let mut alloc = BlockAllocator::new(blocks, block_size);
    let mut kv = model.new_kv(blocks, block_size).unwrap();
    let vocab = model.config().vocab_size;
    for _ in 0..new_tokens {
        let mut batch = ForwardBatch::default();
        for s in seqs.iter_mut() {
            assert_eq!(alloc.allocate(&mut s.table, s.tokens.len()), Allocation::Ok);
            let fresh = &s.tokens[s.cached..];
            let last = batch.push_adapter_chunk(fresh, s.cached, &s.table, s.slot);
            batch.logit_rows.push(last);
        }
        let logits = model
            .forward_with_adapters(&batch, &mut kv, adapters)
            .unwrap();
        for (s, row) in seqs.iter_mut().zip(logits.chunks_exact(vocab)) {
            let id = argmax(row);
            s.out.push((id as u32, log_softmax_at(row, id)));
            s.cached = s.tokens.len();
            s.tokens.push(id as u32);
        }
    }
}

/// A sequence of reference entry `entry` on `slot` (with its virtual tokens, if any).
fn seq_of(entry: &Value, slot: i32) -> Seq {
    let virtual_tokens = entry["num_virtual_tokens"].as_u64().unwrap_or(0) as u32;
    let mut tokens: Vec<u32> = (0..virtual_tokens)
        .map(|i| VIRTUAL_TOKEN_BASE + i)
        .collect();
    tokens.extend(
        entry["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32),
    );
    Seq {
        tokens,
        slot,
        table: Vec::new(),
        cached: 0,
        out: Vec::new(),
    }
}

/// The worst chosen-token logprob difference, after checking every id.
fn compare(what: &str, seq: &Seq, entry: &Value) -> f64 {
    let steps = entry["steps"].as_array().unwrap();
    let ids: Vec<u32> = seq.out.iter().map(|o| o.0).collect();
    if std::env::var("FAMILY_DEBUG").is_ok() {
        for (o, s) in seq.out.iter().zip(steps) {
            eprintln!(
                "{what}: ours {} {:.5} reference {} {:.5}",
                o.0, o.1, s["token"], s["logprob"]
            );
        }
    }
    let want: Vec<u32> = steps
        .iter()
        .map(|s| s["token"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want, "{what}: greedy ids differ from transformers");
    seq.out
        .iter()
        .zip(steps)
        .map(|(o, s)| (o.1 - s["logprob"].as_f64().unwrap()).abs())
        .fold(0.0, f64::max)
}

/// Runs of the family's oracle other than `base`, each with its adapter folder.
fn adapter_runs(oracle: &Value) -> Vec<String> {
    let mut runs: Vec<String> = oracle["runs"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "base")
        .cloned()
        .collect();
    runs.sort();
    runs
}

/// Every run of family `name` alone and all together at `block_size`; returns the worst
/// logprob difference.
fn check_family(name: &str, block_size: usize) -> f64 {
    let dir = family_dir(name);
    let model = load_model(&dir);
    let oracle = oracle(name);
    let runs = adapter_runs(&oracle);
    let adapters: Vec<Arc<AdapterWeights>> = runs
        .iter()
        .map(|r| load_adapter(&model, &dir.join(r)))
        .collect();
    let mut all = vec![("base".to_string(), -1)];
    all.extend(runs.iter().enumerate().map(|(i, r)| (r.clone(), i as i32)));
    let new_tokens = oracle["runs"]["base"][0]["steps"].as_array().unwrap().len();
    let mut worst: f64 = 0.0;
    let mut together = Vec::new();
    let mut entries = Vec::new();
    for (run, slot) in &all {
        for (i, entry) in oracle["runs"][run].as_array().unwrap().iter().enumerate() {
            let mut alone = [seq_of(entry, *slot)];
            decode(&model, &mut alone, &adapters, block_size, new_tokens);
            worst = worst.max(compare(
                &format!("{name} {run} prompt {i} alone"),
                &alone[0],
                entry,
            ));
            together.push(seq_of(entry, *slot));
            entries.push((format!("{name} {run} prompt {i} batched"), entry, alone));
        }
    }
    decode(&model, &mut together, &adapters, block_size, new_tokens);
    for (seq, (what, entry, alone)) in together.iter().zip(&entries) {
        compare(what, seq, entry);
        let a: Vec<u64> = alone[0].out.iter().map(|o| o.1.to_bits()).collect();
        let b: Vec<u64> = seq.out.iter().map(|o| o.1.to_bits()).collect();
        assert_eq!(a, b, "{what}: the batch changed a logprob");
    }
    eprintln!(
        "{name} (block size {block_size}): runs {all:?}, worst logprob difference {worst:.2e}"
    );
    worst
}

fn assert_family(name: &str, block_sizes: &[usize]) {
    for &bs in block_sizes {
        let worst = check_family(name, bs);
        assert!(
            worst <= TOLERANCE,
            "{name}: logprob difference {worst} over {TOLERANCE}"
        );
    }
}

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

/// A copy of fixture folder `name` under a fresh temporary folder, with `edit` applied
/// to its config.
fn edited_copy(name: &str, edit: impl Fn(&mut Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(family_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let config = tmp.path().join("config.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&config, json.to_string()).unwrap();
    tmp
}

fn load_error(dir: &Path) -> String {
    let Err(err) = load_resolved(
        "fixture",
        &ModelSource::HfDir(dir.to_path_buf()),
        CpuBackend::default(),
    ) else {
        panic!("{} loaded", dir.display());
    };
    format!("{err:#}")
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
