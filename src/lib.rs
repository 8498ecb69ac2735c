//! multilora: a gRPC inference server for many fine-tuned adapters on one resident
//! base model, with continuous batching.
pub mod bench;
pub mod byte_size;
pub mod engine;
pub mod error;
pub mod heap;
pub mod hub;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod proto;
pub mod rng;
pub mod server;
pub mod simd;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
