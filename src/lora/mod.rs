//! Everything adapter-shaped: PEFT loading, the registry of served adapters, per-step
//! batch metadata, batched low-rank kernels, the adapters' storage types and synthetic
//! adapters for benchmarks.
pub mod batch;
pub mod kernels;
pub mod peft;
pub mod registry;
pub mod synth;
pub mod values;
