//! The model-family fixtures (`tests/fixtures/families/`, written by
//! `scripts/family_fixtures/`) served and compared with their references: shared by
//! `model_families.rs` (safetensors against transformers and PEFT) and
//! `model_families_gguf.rs` (GGUF files written by llama.cpp's converter).
#![allow(dead_code)]
use multilora::engine::block_allocator::{Allocation, BlockAllocator};
use multilora::lora::peft::{load_peft_adapter_served, AdapterLimits, AdapterWeights};
use multilora::model::backend::Backend;
use multilora::model::batch::VIRTUAL_TOKEN_BASE;
use multilora::model::weights::{load_resolved, ModelSource};
use multilora::model::{CpuBackend, ForwardBatch, Llama};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub type Model = Llama<CpuBackend>;

pub const TOLERANCE: f64 = 2e-3;

pub fn family_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(name)
}

pub fn oracle(name: &str) -> Value {
    let text = std::fs::read_to_string(family_dir(name).join("oracle.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn load_model(dir: &Path) -> Model {
    load_resolved(
        "fixture",
        &ModelSource::HfDir(dir.to_path_buf()),
        CpuBackend::default(),
    )
    .unwrap()
    .model
}

pub fn load_adapter(model: &Model, dir: &Path) -> Arc<AdapterWeights> {
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
pub struct Seq {
    tokens: Vec<u32>,
    slot: i32,
    table: Vec<u32>,
    /// Tokens already in the cache.
    cached: usize,
    /// `(id, logprob)` of each generated token.
    out: Vec<(u32, f64)>,
}

pub fn log_softmax_at(logits: &[f32], id: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[id] as f64 - max - sum.ln()
}

pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// Decodes `new_tokens` greedily for every sequence together, one step each time.
pub fn decode(
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
pub fn seq_of(entry: &Value, slot: i32) -> Seq {
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
pub fn compare(what: &str, seq: &Seq, entry: &Value) -> f64 {
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
pub fn adapter_runs(oracle: &Value) -> Vec<String> {
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
pub fn check_family(name: &str, block_size: usize) -> f64 {
    let dir = family_dir(name);
    check_model(name, &load_model(&dir), &oracle(name), &dir, block_size)
}

/// Every run of `oracle` on `model` (adapters from the folders under `adapter_root`)
/// alone and all together at `block_size`; returns the worst logprob difference.
pub fn check_model(
    name: &str,
    model: &Model,
    oracle: &Value,
    adapter_root: &Path,
    block_size: usize,
) -> f64 {
    let runs = adapter_runs(oracle);
    let adapters: Vec<Arc<AdapterWeights>> = runs
        .iter()
        .map(|r| load_adapter(model, &adapter_root.join(r)))
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
            decode(model, &mut alone, &adapters, block_size, new_tokens);
            worst = worst.max(compare(
                &format!("{name} {run} prompt {i} alone"),
                &alone[0],
                entry,
            ));
            together.push(seq_of(entry, *slot));
            entries.push((format!("{name} {run} prompt {i} batched"), entry, alone));
        }
    }
    decode(model, &mut together, &adapters, block_size, new_tokens);
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

/// `oracle` with every run's steps replaced by `model`'s own greedy decode of its
/// prompts (adapters from the folders under `adapter_root`): a reference made by this
/// server, for comparing two sources of the same weights.
pub fn our_oracle(model: &Model, oracle: &Value, adapter_root: &Path) -> Value {
    let runs = adapter_runs(oracle);
    let adapters: Vec<Arc<AdapterWeights>> = runs
        .iter()
        .map(|r| load_adapter(model, &adapter_root.join(r)))
        .collect();
    let new_tokens = oracle["runs"]["base"][0]["steps"].as_array().unwrap().len();
    let mut out = oracle.clone();
    let names = std::iter::once("base".to_string()).chain(runs.iter().cloned());
    for (slot, run) in (-1..).zip(names) {
        for entry in out["runs"][&run].as_array_mut().unwrap() {
            let mut seq = [seq_of(entry, slot)];
            decode(model, &mut seq, &adapters, 16, new_tokens);
            let steps: Vec<Value> = seq[0]
                .out
                .iter()
                .map(|(id, lp)| serde_json::json!({"token": id, "logprob": lp}))
                .collect();
            entry["steps"] = Value::Array(steps);
        }
    }
    out
}

pub fn assert_family(name: &str, block_sizes: &[usize]) {
    for &bs in block_sizes {
        let worst = check_family(name, bs);
        assert!(
            worst <= TOLERANCE,
            "{name}: logprob difference {worst} over {TOLERANCE}"
        );
    }
}

/// A copy of fixture folder `name` under a fresh temporary folder, with `edit` applied
/// to its config.
pub fn edited_copy(name: &str, edit: impl Fn(&mut Value)) -> tempfile::TempDir {
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

pub fn load_error(dir: &Path) -> String {
    let Err(err) = load_resolved(
        "fixture",
        &ModelSource::HfDir(dir.to_path_buf()),
        CpuBackend::default(),
    ) else {
        panic!("{} loaded", dir.display());
    };
    format!("{err:#}")
}
