//! CUDA kernel and step benchmark (built with `--features cuda`, run on a GPU by
//! `scripts/gpu-check.sh`): ratios measured in one run.
//! - HBM bandwidth of a plain device-to-device copy (the roofline of this device);
//! - decode-shape LoRA (256 distinct adapters, one token each, ranks 16 to 64, gate|up of
//!   a hidden-4096 model: more adapter bytes per call than the L2 holds): our BGMV
//!   kernels' achieved bandwidth against the copy, and against the obvious reference loop
//!   on the GPU (per adapter: gather, two candle matmuls, scatter-add);
//! - prefill-shape LoRA (8 adapters x 256 tokens, rank 64): TFLOP/s, ours vs reference;
//! - the synthetic 1B model's decode step at batch 64: base only against its GEMMs alone
//!   through cuBLAS (same weights, same shapes), and with 64 distinct adapters.
//!
//! `cargo bench --features cuda --bench cuda_lora` (prints one line per figure);
//! `-- --step-only` measures only the decode step (for a kernel profiler).
#[cfg(feature = "cuda")]
mod gpu;

fn main() {
    #[cfg(feature = "cuda")]
    if let Err(e) = gpu::run(std::env::args().any(|a| a == "--step-only")) {
        eprintln!("cuda_lora: {e:#}");
        std::process::exit(1);
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda_lora: built without the `cuda` feature; nothing to measure");
}
