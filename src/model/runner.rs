//! What the engine drives: a base model with its paged K/V storage, behind one
//! object-safe trait ([`BaseModel`]) so that the engine, the server and the CLI are the
//! same whatever backend the weights live on. [`ModelRunner`] implements it for a
//! [`Llama`] on any [`Backend`].
//!
//! Invariant: the runner owns the K/V storage its model's steps write; the engine owns
//! which blocks belong to whom (its block allocator) and sizes the storage once, with
//! [`BaseModel::allocate_kv`], before the first step. The storage has one block more than
//! the engine asked for, the scratch block no sequence owns: with decode padding on
//! ([`ModelRunner::with_decode_padding`], what a captured CUDA graph per batch bucket
//! needs) a decode step is padded to its bucket (`backend::plan::pad_decode`) with base
//! rows that write only there, and only the real rows' logits are returned.
use super::backend::plan::{decode_bucket, is_decode_step, pad_decode};
use super::backend::Backend;
use super::batch::ForwardBatch;
use super::config::ModelConfig;
use super::llama::{ForwardPhases, Llama};
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

    /// The phases of the last [`Self::forward`] that succeeded, where the model measures
    /// them.
    fn last_phases(&self) -> Option<ForwardPhases> {
        None
    }
}

/// A [`Llama`] on backend `B` with its paged K/V storage.
pub struct ModelRunner<B: Backend> {
    model: Llama<B>,
    kv: B::KvStore,
    /// The block after the engine's blocks (see the module invariants).
    scratch_block: u32,
    pad_decode: bool,
    last_phases: Option<ForwardPhases>,
}

impl<B: Backend> ModelRunner<B> {
    /// A runner with no K/V storage yet (see [`BaseModel::allocate_kv`]).
    pub fn new(model: Llama<B>) -> Result<Self> {
        let kv = model.new_kv(1, 1)?;
        Ok(Self {
            model,
            kv,
            scratch_block: 0,
            pad_decode: false,
            last_phases: None,
        })
    }

    /// Pads every decode step of up to the largest bucket to its bucket with base rows
    /// (see the module invariants): the fixed shapes a captured graph replays.
    pub fn with_decode_padding(mut self) -> Self {
        self.pad_decode = true;
        self
    }

    /// `batch` padded to its bucket when padding is on and it is a decode step.
    fn padded(&self, batch: &ForwardBatch) -> Result<Option<ForwardBatch>> {
        if !self.pad_decode || !is_decode_step(batch) {
            return Ok(None);
        }
        let Some(bucket) = decode_bucket(batch.tokens.len()) else {
            return Ok(None);
        };
        Ok(Some(pad_decode(batch, bucket, self.scratch_block)?))
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
        let scratch_block =
            u32::try_from(num_blocks).context("the K/V block count does not fit in u32")?;
        self.kv = self
            .model
            .new_kv(num_blocks + 1, block_size)
            .with_context(|| format!("allocating {num_blocks} K/V blocks of {block_size}"))?;
        self.scratch_block = scratch_block;
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
        let padded = self.padded(batch)?;
        let real_rows = batch.logit_rows.len();
        let vocab = self.model.config().vocab_size;
        let this = &mut *self;
        let step = padded.as_ref().unwrap_or(batch);
        let (mut logits, phases) =
            B::run_step(move || this.model.forward_timed(step, &mut this.kv, adapters))?;
        self.last_phases = Some(phases);
        logits.truncate(real_rows * vocab);
        Ok(logits)
    }

    fn last_phases(&self) -> Option<ForwardPhases> {
        self.last_phases
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_llama, tiny_config};

    #[test]
    fn decode_steps_are_padded_to_their_bucket_into_the_scratch_block() {
        let cfg = tiny_config(32);
        let mut runner = ModelRunner::new(random_llama(&cfg, 1).unwrap()).unwrap();
        runner.allocate_kv(8, 4).unwrap();
        let mut batch = ForwardBatch::default();
        for s in 0..3 {
            let row = batch.push_chunk(&[1], 2, &[s]);
            batch.logit_rows.push(row);
        }
        assert!(runner.padded(&batch).unwrap().is_none(), "off by default");
        let runner = runner.with_decode_padding();
        let padded = runner.padded(&batch).unwrap().unwrap();
        assert_eq!(padded.tokens.len(), 4);
        assert_eq!(
            padded.chunks[3].block_table,
            vec![8],
            "the block after the engine's"
        );
        let mut prefill = ForwardBatch::default();
        let row = prefill.push_chunk(&[1, 2], 0, &[0]);
        prefill.logit_rows.push(row);
        assert!(
            runner.padded(&prefill).unwrap().is_none(),
            "prefill is not padded"
        );
    }
}
