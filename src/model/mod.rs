//! The base model: configuration, weight loading, tokenizer and the ragged forward pass.
pub mod attention;
pub mod batch;
pub mod config;
pub mod cpu_ops;
pub mod llama;
pub mod packed_linear;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use batch::{ForwardBatch, SeqChunk};
pub use config::ModelConfig;
pub use llama::Llama;
pub use tokenizer::TextTokenizer;
