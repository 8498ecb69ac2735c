//! One decode step of the real default model at batch sizes 1, 8, 32 and 64, in f32 mode
//! and in quantized mode (the file's Q4_1 blocks): tokens/s and the fraction of the
//! binding roofline (the bytes are the weights as each mode holds them), with the GEMM
//! rate and the read bandwidth measured in the same run, and quantized / f32 per batch.
//! Each step runs as the server runs it, on a worker of the CPU kernels' pool.
//! `cargo bench --bench decode_step` (needs `make model`). `DECODE_STEP_MODEL` may name a
//! model folder too (`model synth --arch qwen2 --shape 1b`).
//! Under `cargo test` it runs one quick pass as a smoke test. `DECODE_STEP_BATCHES=32`
//! selects batch sizes; `DECODE_STEP_MODEL=path` another model; `DECODE_STEP_FORMATS=f32`
//! or `quantized` one mode.
#[path = "support/roofline.rs"]
mod roofline;

use multilora::engine::block_allocator::{Allocation, BlockAllocator};
use multilora::model::backend::cpu::CpuWeightFormat;
use multilora::model::backend::Backend;
use multilora::model::{weights, CpuBackend, ForwardBatch, Llama, ModelConfig};
use roofline::{gemm_rate, median_time, read_bandwidth};

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const CONTEXT: usize = 128;
const BLOCK_SIZE: usize = 16;

/// Parameters of the linear layers and the LM head.
fn linear_params(c: &ModelConfig) -> f64 {
    let h = c.hidden_size;
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    let per_layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size;
    (c.num_layers * per_layer + c.vocab_size * h) as f64
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    // DECODE_STEP_MODEL=path runs another model (e.g. a `model synth --format gguf` 1B).
    let path = match std::env::var("DECODE_STEP_MODEL") {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(MODEL),
    };
    if !path.exists() {
        eprintln!(
            "decode_step: {} missing (run `make model`); skipping",
            path.display()
        );
        return;
    }
    // DECODE_STEP_ITERS=200 measures longer (e.g. to profile the steps, not the set-up).
    let iters = match std::env::var("DECODE_STEP_ITERS") {
        Ok(n) => n.parse().unwrap_or(20),
        Err(_) if quick => 1,
        Err(_) => 20,
    };
    let rates = Rates {
        gemm: gemm_rate(if quick { 1 } else { 10 }),
        bandwidth: read_bandwidth(if quick { 1 } else { 10 }),
    };
    println!(
        "threads {}  measured f32 GEMM {:.1} GFLOP/s  read bandwidth {:.1} GB/s",
        rayon::current_num_threads(),
        rates.gemm / 1e9,
        rates.bandwidth / 1e9
    );
    // DECODE_STEP_BATCHES=32 (comma-separated) limits the run, e.g. for profiling.
    let batches: Vec<usize> = match std::env::var("DECODE_STEP_BATCHES") {
        Ok(list) => list
            .split(',')
            .filter_map(|b| b.trim().parse().ok())
            .collect(),
        Err(_) if quick => vec![1],
        Err(_) => vec![1, 8, 32, 64],
    };
    let quantized = CpuWeightFormat::Quantized {
        dense_to: candle_core::quantized::GgmlDType::Q8_0,
    };
    // DECODE_STEP_FORMATS=quantized (or f32) runs one mode only, e.g. for profiling.
    let only = std::env::var("DECODE_STEP_FORMATS").ok();
    let formats = [CpuWeightFormat::F32, quantized]
        .into_iter()
        .filter(|f| only.as_deref().is_none_or(|o| f.name().starts_with(o)));
    let mut tokens_per_s = Vec::new();
    for format in formats {
        let path = path.to_str().unwrap_or(MODEL);
        let model = weights::load_llama(path, None, CpuBackend::new(format))
            .unwrap()
            .model;
        println!(
            "{}: linear weights {:.1} MB",
            format.name(),
            model.linear_weight_bytes() as f64 / 1e6
        );
        println!("batch  step_ms  tokens/s  GFLOP/s  compute_roof  memory_roof  binding  fraction");
        let row: Vec<f64> = batches
            .iter()
            .map(|&b| {
                let secs = step_seconds(&model, b, iters);
                report(&model, b, secs, &rates);
                b as f64 / secs
            })
            .collect();
        tokens_per_s.push(row);
    }
    if tokens_per_s.len() < 2 {
        return;
    }
    println!("quantized / f32 tokens/s, same run:");
    for (i, b) in batches.iter().enumerate() {
        println!("{b:>5}  {:>5.2}", tokens_per_s[1][i] / tokens_per_s[0][i]);
    }
}

/// The machine rates measured in this run.
struct Rates {
    /// f32 GEMM FLOP/s.
    gemm: f64,
    /// Read bytes/s.
    bandwidth: f64,
}

/// The median time of one decode step of `b` sequences, each with `CONTEXT` tokens
/// cached.
fn step_seconds(model: &Llama<CpuBackend>, b: usize, iters: usize) -> f64 {
    // Room for each sequence's context and one more block.
    let num_blocks = b * (CONTEXT + BLOCK_SIZE) / BLOCK_SIZE;
    let mut alloc = BlockAllocator::new(num_blocks, BLOCK_SIZE);
    let mut kv = model.new_kv(num_blocks, BLOCK_SIZE).unwrap();
    // Prefill each sequence's context once.
    let mut tables = Vec::new();
    for s in 0..b {
        let mut table = Vec::new();
        assert_eq!(alloc.allocate(&mut table, CONTEXT + 1), Allocation::Ok);
        let tokens: Vec<u32> = (0..CONTEXT)
            .map(|i| ((s * 31 + i * 7) % 1000) as u32)
            .collect();
        let mut batch = ForwardBatch::default();
        batch.push_chunk(&tokens, 0, &table);
        model.forward(&batch, &mut kv).unwrap();
        tables.push(table);
    }
    let mut step = ForwardBatch::default();
    for (s, table) in tables.iter().enumerate() {
        let last = step.push_chunk(&[(s % 1000) as u32], CONTEXT, table);
        step.logit_rows.push(last);
    }
    // As the server runs a step: on a worker of the kernels' pool (`Backend::run_step`).
    median_time(iters, || {
        CpuBackend::run_step(|| model.forward(&step, &mut kv)).unwrap();
    })
    .as_secs_f64()
}

/// One row: the step against the compute roof (f32 GEMM rate) and the memory roof (the
/// model's weight bytes at the measured bandwidth).
fn report(model: &Llama<CpuBackend>, b: usize, secs: f64, rates: &Rates) {
    let cfg = model.config();
    let attn_flops =
        4.0 * (b * (CONTEXT + 1) * cfg.num_heads * cfg.head_dim * cfg.num_layers) as f64;
    let flops = 2.0 * b as f64 * linear_params(cfg) + attn_flops;
    let bytes = model.linear_weight_bytes() as f64;
    let compute_roof = flops / rates.gemm;
    let memory_roof = bytes / rates.bandwidth;
    let (binding, roof) = if compute_roof > memory_roof {
        ("compute", compute_roof)
    } else {
        ("memory", memory_roof)
    };
    println!(
        "{b:>5}  {:>7.2}  {:>8.1}  {:>7.1}  {:>10.2}ms  {:>9.2}ms  {binding:>7}  {:>7.0}%",
        secs * 1e3,
        b as f64 / secs,
        flops / secs / 1e9,
        compute_roof * 1e3,
        memory_roof * 1e3,
        100.0 * roof / secs
    );
}
