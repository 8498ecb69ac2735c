//! The base model: configuration, the checkpoint layout, weight loading, the tokenizer,
//! the backend seam with its backends, and the ragged forward pass written once against
//! it. Nothing here knows about the engine: the engine drives a [`BaseModel`].
pub mod arch;
pub mod backend;
pub mod batch;
pub mod block_rows;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod detokenizer;
pub mod layout;
pub mod llama;
pub mod placement;
pub mod rope;
pub mod runner;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use backend::cpu::CpuBackend;
pub use batch::{ForwardBatch, SeqChunk};
pub use config::ModelConfig;
pub use llama::Llama;
pub use runner::{BaseModel, ModelRunner};
pub use tokenizer::TextTokenizer;
