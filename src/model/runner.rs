//! What the engine drives: a base model with its paged K/V storage, behind one
//! object-safe trait ([`BaseModel`]) so that the engine, the server and the CLI are the
//! same whatever backend the weights live on. [`ModelRunner`] implements it for a
//! [`Llama`] on any [`Backend`].
//!
//! Invariant: the runner owns the K/V storage its model's steps write; the engine owns
//! which blocks belong to whom (its block allocator) and sizes the storage once, with
//! [`BaseModel::allocate_kv`], before the first step.
use super::backend::Backend;
use super::batch::ForwardBatch;
use super::config::ModelConfig;
use super::llama::Llama;
use crate::lora::peft::{AdapterWeights, BaseShape, ServedBase};
use crate::lora::values::AdapterDType;
use anyhow::{ensure, Context, Result};
use std::sync::Arc;

/// A base model as the engine drives it.
pub trait BaseModel: Send {
    fn config(&self) -> &ModelConfig;

    /// Dimensions adapters are validated against.
    fn base_shape(&self) -> BaseShape {
        self.config().base_shape()
    }

    /// Where the weights live ("cpu").
    fn device_name(&self) -> String;

    /// How the weights are computed on ("f32").
    fn dtype_name(&self) -> String;

    /// How adapters for this model are stored in host memory (see
    /// [`Backend::adapter_dtype`]); the registry loads them so.
    fn adapter_dtype(&self) -> AdapterDType;

    /// Bytes of K/V storage one token takes.
    fn kv_bytes_per_token(&self) -> usize;

    /// The weights as served, for adapter loads that need them (DoRA) and to say which
    /// adapter kinds the backend applies; None where they cannot be read back.
    fn served_base(&self) -> Option<Arc<dyn ServedBase>> {
        None
    }

    /// Whether steps apply weighted adapter mixtures ([`Backend::serves_mixtures`]).
    fn serves_mixtures(&self) -> bool {
        false
    }

    /// (Re)creates the paged K/V storage: `num_blocks` blocks of `block_size` tokens.
    /// Anything stored before is gone.
    fn allocate_kv(&mut self, num_blocks: usize, block_size: usize) -> Result<()>;

    /// The engine evicted `adapter` from its active pool (see
    /// [`Backend::release_adapter`]).
    fn release_adapter(&mut self, _adapter: &Arc<AdapterWeights>) {}

    /// Whether `adapter` is ready for a step (see [`Backend::prepare_adapter`]).
    fn adapter_ready(&self, _adapter: &Arc<AdapterWeights>) -> bool {
        true
    }

    /// Writes `adapter`'s K/V prefix (prefix tuning) into `blocks` (positions
    /// `0..count`), which the engine then shares read-only among its sequences.
    fn write_kv_prefix(&mut self, adapter: &AdapterWeights, blocks: &[u32]) -> Result<()>;

    /// Copies every layer's K/V of block `src` into block `dst`, for each pair.
    fn copy_kv_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()>;

    /// One step (see [`Llama::forward_with_adapters`]) over the storage of
    /// [`Self::allocate_kv`].
    fn forward(
        &mut self,
        batch: &ForwardBatch,
        adapters: &[Arc<AdapterWeights>],
    ) -> Result<Vec<f32>>;
}

/// A [`Llama`] on backend `B` with its paged K/V storage.
pub struct ModelRunner<B: Backend> {
    model: Llama<B>,
    kv: B::KvStore,
}

impl<B: Backend> ModelRunner<B> {
    /// A runner with no K/V storage yet (see [`BaseModel::allocate_kv`]).
    pub fn new(model: Llama<B>) -> Result<Self> {
        let kv = model.new_kv(0, 1)?;
        Ok(Self { model, kv })
    }
}

impl<B: Backend> BaseModel for ModelRunner<B> {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn device_name(&self) -> String {
        self.model.backend().device_name()
    }

    fn dtype_name(&self) -> String {
        self.model.backend().dtype_name()
    }

    fn adapter_dtype(&self) -> AdapterDType {
        self.model.backend().adapter_dtype()
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.model.kv_bytes_per_token()
    }

    fn served_base(&self) -> Option<Arc<dyn ServedBase>> {
        Some(self.model.served_base())
    }

    fn serves_mixtures(&self) -> bool {
        self.model.backend().serves_mixtures()
    }

    fn allocate_kv(&mut self, num_blocks: usize, block_size: usize) -> Result<()> {
        self.kv = self
            .model
            .new_kv(num_blocks, block_size)
            .with_context(|| format!("allocating {num_blocks} K/V blocks of {block_size}"))?;
        Ok(())
    }

    fn release_adapter(&mut self, adapter: &Arc<AdapterWeights>) {
        self.model.backend().release_adapter(adapter);
    }

    fn adapter_ready(&self, adapter: &Arc<AdapterWeights>) -> bool {
        self.model.backend().prepare_adapter(adapter)
    }

    fn write_kv_prefix(&mut self, adapter: &AdapterWeights, blocks: &[u32]) -> Result<()> {
        let prefix = adapter
            .prefix
            .as_ref()
            .context("the adapter has no K/V prefix")?;
        let layout = self.model.kv_layout(0, 1);
        ensure!(
            prefix.kv_width == layout.slot_len()
                && prefix.values.len() == prefix.count * layout.values_per_token(),
            "a prefix of {} values per token does not fit K/V slots of {}",
            prefix.values.len() / prefix.count.max(1),
            layout.values_per_token()
        );
        self.model
            .backend()
            .write_kv_prefix(&mut self.kv, blocks, prefix)
    }

    fn copy_kv_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()> {
        self.model.backend().copy_kv_blocks(&mut self.kv, pairs)
    }

    fn forward(
        &mut self,
        batch: &ForwardBatch,
        adapters: &[Arc<AdapterWeights>],
    ) -> Result<Vec<f32>> {
        let this = &mut *self;
        B::run_step(move || {
            this.model
                .forward_with_adapters(batch, &mut this.kv, adapters)
        })
    }
}
