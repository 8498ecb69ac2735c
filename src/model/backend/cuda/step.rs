//! One step's metadata on the device, uploaded at the start of the step (before its
//! first kernel, so no copy waits on device work): the token ids and logit rows, and in
//! one packed copy everything our kernels read of the batch (`plan::meta`: positions,
//! K/V cache rows, chunks and block tables, LoRA segments, sorted tokens and weights, the
//! slot table of adapter descriptor addresses). Every layer's launches are planned
//! against this buffer's layout (`plan::launch`); nothing of the batch is copied again
//! during the step.
//!
//! Invariant: the step owns the metadata buffer and `Arc`s to the device adapters its
//! slot table points into, so everything its kernels read outlives its launches (the
//! buffer is freed in the step stream's order; see `adapters` for the copies).
use super::adapters::DeviceAdapter;
use crate::lora::batch::LoraBatch;
use crate::model::backend::plan::meta::{MetaLayout, StepMeta};
use crate::model::backend::plan::StepCapacity;
use crate::model::batch::ForwardBatch;
use anyhow::Result;
use candle_core::cuda::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// A step as the CUDA kernels read it.
pub struct CudaStep {
    /// The batch's token ids (the embedding rows), u32.
    pub tokens: Tensor,
    /// The rows whose logits the step returns, u32.
    pub logit_rows: Tensor,
    _meta: CudaSlice<i32>,
    /// The device address of the metadata buffer's first word.
    pub meta_base: u64,
    /// Where each array is in it (the launches' metadata offsets).
    pub layout: MetaLayout,
    /// The K/V store's block size.
    pub block_size: usize,
    adapters: Vec<Arc<DeviceAdapter>>,
    /// Whether any token has an adapter.
    pub has_lora: bool,
}

impl CudaStep {
    /// Builds and uploads the step's metadata, packed at exactly the batch's capacity.
    /// `block_size` is the K/V store's; `adapters[s]` is slot s's device copy and
    /// `null_descs` the address of the all-zero descriptor table.
    pub fn new(
        device: &Device,
        batch: &ForwardBatch,
        block_size: usize,
        adapters: Vec<Arc<DeviceAdapter>>,
        null_descs: u64,
    ) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        let rows: Vec<u32> = batch.logit_rows.iter().map(|&r| r as u32).collect();
        let logit_rows = Tensor::from_vec(rows, batch.logit_rows.len(), device)?;
        let tokens = Tensor::from_slice(&batch.tokens, batch.tokens.len(), device)?;
        let lora = LoraBatch::new(&batch.slots);
        let max_rank = adapters.iter().map(|a| a.rank_max).max().unwrap_or(0);
        let capacity = StepCapacity::exact(batch, &lora, adapters.len(), max_rank);
        let tables: Vec<u64> = adapters.iter().map(|a| a.descs_ptr(&stream)).collect();
        let packed = StepMeta::pack(batch, &lora, block_size, capacity, &tables, null_descs)?;
        // An empty buffer cannot be allocated; a step always has rows, so it never is.
        let meta = cuda.clone_htod(&packed.words)?;
        let meta_base = meta.device_ptr(&stream).0;
        Ok(Self {
            tokens,
            logit_rows,
            _meta: meta,
            meta_base,
            layout: packed.layout,
            block_size,
            adapters,
            has_lora: !lora.is_empty(),
        })
    }

    /// Whether any adapter of the step has weights at `site` of `layer`.
    pub fn any_adapter_at(&self, layer: usize, site: usize) -> bool {
        self.adapters.iter().any(|a| a.has_site(layer, site))
    }
}
