//! LoRA through the model on the tiny random Llama: a token with an adapter gets the
//! same logits as a model whose weights have the adapter merged in (W + scale * B A),
//! a token without one is bit-identical to the base model, whatever the batch mixes; and
//! adapters stored in bf16 on a quantized base keep every token's logits batch-invariant.
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use multilora::engine::block_allocator::{Allocation, BlockAllocator};
use multilora::lora::peft::{
    load_peft_adapter, AdapterLimits, AdapterWeights, CONFIG_FILE, WEIGHTS_FILE,
};
use multilora::lora::values::AdapterDType;
use multilora::model::backend::cpu::CpuWeightFormat;
use multilora::model::backend::Backend;
use multilora::model::{CpuBackend, ForwardBatch, Llama, ModelConfig};
use multilora::rng::Xoshiro256;
use multilora::testing::{llama_from, llama_on, random_llama, random_weights, tiny_config};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const VOCAB: usize = 97;

type Model = Llama<CpuBackend>;

/// Writes a PEFT folder with rank `r` on `sites` of every layer; returns its A/B tensors.
fn write_adapter(
    dir: &Path,
    cfg: &ModelConfig,
    r: usize,
    alpha: f32,
    sites: &[&str],
    seed: u64,
) -> HashMap<String, Tensor> {
    let mut tensors = HashMap::new();
    let mut rng = Xoshiro256::from_seed(seed);
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    for l in 0..cfg.num_layers {
        for site in sites {
            let (parent, inp, out) = match *site {
                "q_proj" => ("self_attn", cfg.hidden_size, q),
                "k_proj" | "v_proj" => ("self_attn", cfg.hidden_size, kv),
                "o_proj" => ("self_attn", q, cfg.hidden_size),
                "gate_proj" | "up_proj" => ("mlp", cfg.hidden_size, cfg.intermediate_size),
                _ => ("mlp", cfg.intermediate_size, cfg.hidden_size),
            };
            let prefix = format!("base_model.model.model.layers.{l}.{parent}.{site}");
            let a =
                Tensor::from_vec(rng.symmetric_vec(r * inp, 0.3), (r, inp), &Device::Cpu).unwrap();
            let b =
                Tensor::from_vec(rng.symmetric_vec(out * r, 0.3), (out, r), &Device::Cpu).unwrap();
            tensors.insert(format!("{prefix}.lora_A.weight"), a);
            tensors.insert(format!("{prefix}.lora_B.weight"), b);
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE)).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sites,
        "bias": "none", "use_dora": false, "use_rslora": false, "task_type": "CAUSAL_LM",
    });
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
    tensors
}

/// The base weights with `scale * B @ A` added at every adapted site.
fn merged(cfg: &ModelConfig, adapter: &HashMap<String, Tensor>, scale: f64) -> Model {
    let mut w = random_weights(cfg, 3).unwrap();
    for (key, a) in adapter {
        let Some(prefix) = key.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = &adapter[&format!("{prefix}.lora_B.weight")];
        let name = format!("{}.weight", prefix.trim_start_matches("base_model.model."));
        let delta = (b.matmul(a).unwrap() * scale).unwrap();
        let merged = (&w[&name] + delta).unwrap();
        w.insert(name, merged);
    }
    llama_from(w, cfg).unwrap()
}

fn run(model: &Model, adapters: &[Arc<AdapterWeights>], seqs: &[(Vec<u32>, i32)]) -> Vec<Vec<f32>> {
    let mut alloc = BlockAllocator::new(64, 4);
    let mut kv = model.new_kv(64, 4).unwrap();
    let mut batch = ForwardBatch::default();
    let mut tables = Vec::new();
    for (tokens, slot) in seqs {
        let mut table = Vec::new();
        assert_eq!(alloc.allocate(&mut table, tokens.len()), Allocation::Ok);
        let start = batch.tokens.len();
        batch.push_adapter_chunk(tokens, 0, &table, *slot);
        batch.logit_rows.extend(start..start + tokens.len());
        tables.push(table);
    }
    let logits = model
        .forward_with_adapters(&batch, &mut kv, adapters)
        .unwrap();
    logits.chunks(VOCAB).map(|r| r.to_vec()).collect()
}

/// Every linear site of a layer.
const ALL_SITES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Adapter `a` (rank 4 on every site) and `b` (rank 2 on q and v) under `dir`; returns
/// their tensors.
fn write_two_adapters(
    dir: &Path,
    cfg: &ModelConfig,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let a = write_adapter(&dir.join("a"), cfg, 4, 8.0, &ALL_SITES, 1);
    let b = write_adapter(&dir.join("b"), cfg, 2, 8.0, &["q_proj", "v_proj"], 2);
    (a, b)
}

/// Adapters `a` and `b` under `dir`, loaded for `model` and stored as `dtype`.
fn load_two_adapters(dir: &Path, model: &Model, dtype: AdapterDType) -> Vec<Arc<AdapterWeights>> {
    ["a", "b"]
        .iter()
        .map(|n| {
            let limits = AdapterLimits::default();
            let w = load_peft_adapter(&dir.join(n), &model.base_shape(), &limits, dtype);
            Arc::new(w.unwrap())
        })
        .collect()
}

#[test]
fn adapter_tokens_match_merged_weights_and_base_tokens_are_untouched() {
    let cfg = tiny_config(VOCAB);
    let base = random_llama(&cfg, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = write_two_adapters(dir.path(), &cfg);
    let registry = load_two_adapters(dir.path(), &base, AdapterDType::F32);
    let none: Vec<Arc<AdapterWeights>> = Vec::new();
    let merged_a = merged(&cfg, &a, 2.0);
    let merged_b = merged(&cfg, &b, 4.0);

    let s1: Vec<u32> = (0..9).map(|i| (i * 7 % VOCAB) as u32).collect();
    let s2: Vec<u32> = (0..5).map(|i| (i * 11 % VOCAB) as u32).collect();
    let s3: Vec<u32> = (0..6).map(|i| (i * 5 % VOCAB) as u32).collect();
    let mixed = run(
        &base,
        &registry,
        &[(s1.clone(), 0), (s2.clone(), -1), (s3.clone(), 1)],
    );
    let want_a = run(&merged_a, &none, &[(s1.clone(), -1)]);
    let want_base = run(&base, &none, &[(s2.clone(), -1)]);
    let want_b = run(&merged_b, &none, &[(s3.clone(), -1)]);
    let close = |x: &[f32], y: &[f32], what: &str| {
        let m = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = x.iter().zip(y).fold(0f32, |d, (p, q)| d.max((p - q).abs()));
        assert!(d <= 1e-4 * (1.0 + m), "{what}: max diff {d} (scale {m})");
    };
    for (i, row) in want_a.iter().enumerate() {
        close(&mixed[i], row, &format!("adapter a, position {i}"));
    }
    for (i, row) in want_base.iter().enumerate() {
        assert_eq!(
            &mixed[s1.len() + i],
            row,
            "base token {i} must be bit-identical"
        );
    }
    for (i, row) in want_b.iter().enumerate() {
        close(
            &mixed[s1.len() + s2.len() + i],
            row,
            &format!("adapter b, position {i}"),
        );
    }
    // The adapters change the output at all (the test would be vacuous otherwise).
    let plain = run(&base, &none, &[(s1.clone(), -1)]);
    let moved = plain[0]
        .iter()
        .zip(&mixed[0])
        .fold(0f32, |d, (p, q)| d.max((p - q).abs()));
    assert!(moved > 1e-2, "adapter a barely changes logits: {moved}");
}

/// Adapters as the quantized base mode stores them (bf16, half the bytes): each token's
/// logits are bit-identical alone or in a mixed batch (base tokens included), and close
/// to the same adapters stored in f32 on the same quantized base.
#[test]
fn bf16_adapters_on_a_quantized_base_are_batch_invariant() {
    let cfg = tiny_config(VOCAB);
    let backend = CpuBackend::new(CpuWeightFormat::Quantized {
        dense_to: GgmlDType::Q8_0,
    });
    assert_eq!(backend.adapter_dtype(), AdapterDType::Bf16);
    let base = llama_on(backend, random_weights(&cfg, 3).unwrap(), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_two_adapters(dir.path(), &cfg);
    let load = |dtype| load_two_adapters(dir.path(), &base, dtype);
    let (bf16s, f32s) = (load(AdapterDType::Bf16), load(AdapterDType::F32));
    assert_eq!(2 * bf16s[0].bytes, f32s[0].bytes);
    let none: Vec<Arc<AdapterWeights>> = Vec::new();
    let s1: Vec<u32> = (0..9).map(|i| (i * 7 % VOCAB) as u32).collect();
    let s2: Vec<u32> = (0..5).map(|i| (i * 11 % VOCAB) as u32).collect();
    let s3: Vec<u32> = (0..6).map(|i| (i * 5 % VOCAB) as u32).collect();
    let mixed = run(
        &base,
        &bf16s,
        &[(s1.clone(), 0), (s2.clone(), -1), (s3.clone(), 1)],
    );
    let mut alone = run(&base, &bf16s, &[(s1.clone(), 0)]);
    alone.extend(run(&base, &none, &[(s2.clone(), -1)]));
    alone.extend(run(&base, &bf16s, &[(s3.clone(), 1)]));
    assert_eq!(mixed.len(), alone.len());
    for (i, (m, a)) in mixed.iter().zip(&alone).enumerate() {
        assert_eq!(m, a, "row {i} differs between the mixed batch and alone");
    }
    // bf16 storage rounds each adapter value by at most 2^-9 relative: the logits move
    // far less than the adapter itself moves them.
    let with_f32 = run(&base, &f32s, &[(s1.clone(), 0)]);
    let plain = run(&base, &none, &[(s1.clone(), -1)]);
    let max_diff = |x: &[Vec<f32>], y: &[Vec<f32>]| {
        let rows = x.iter().zip(y);
        rows.flat_map(|(p, q)| p.iter().zip(q).map(|(a, b)| (a - b).abs()))
            .fold(0f32, f32::max)
    };
    let rounding = max_diff(&alone[..s1.len()], &with_f32);
    let effect = max_diff(&plain, &with_f32);
    eprintln!("bf16 storage moves logits by {rounding}; the adapter moves them by {effect}");
    assert!(effect > 1e-2, "adapter a barely changes logits: {effect}");
    assert!(
        rounding < effect / 50.0,
        "bf16 storage moves logits by {rounding}, the adapter itself by {effect}"
    );
}
