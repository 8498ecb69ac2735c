//! The `cuda` backend (cargo feature `cuda`): weights, activations, the paged K/V and the
//! active adapters resident on one CUDA device in bf16, f16 or f32. GEMMs, RMS norm and
//! SwiGLU run through candle's CUDA tensors (cuBLAS and candle's kernels); RoPE, the K/V
//! write, paged attention and the batched LoRA kernels are ours (`kernels`, compiled from
//! the `.cu` files beside the CPU kernels). Accumulation is f32 everywhere.
//!
//! Invariants: all work of a step is queued on the device's one stream, so stream order
//! is the only synchronisation; nothing crosses to the host during a step except the
//! step metadata (uploaded in `begin_step`, before the step's first kernel) and the
//! logits (`to_host`, the step's one synchronisation). Adapter copies run on a side
//! stream from a background thread (`adapters`), overlapping steps. Every operation is row-wise or
//! reads only the row's own sequence with a fixed reduction order, except cuBLAS GEMMs,
//! whose kernel choice may depend on the number of rows: a token's logits may differ in
//! the last bits with the batch size (not bit-identical across batch shapes, unlike the
//! CPU backend).
mod adapters;
pub mod kernels;
mod step;

use super::{Backend, HeadShape, HostWeight, KvLayout, SitePart};
use crate::lora::peft::AdapterWeights;
use crate::model::batch::ForwardBatch;
use adapters::AdapterCache;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use kernels::{device_ptr, Kernels, LoraLaunch};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
pub use step::CudaStep;

/// One CUDA device and the dtype weights and activations are kept in.
pub struct CudaBackend {
    device: Device,
    ordinal: usize,
    dtype: DType,
    kernels: Kernels,
    adapters: AdapterCache,
    /// The block size of the last K/V store made (the step metadata needs it).
    block_size: AtomicUsize,
}

/// The paged K/V of every layer: `[num_blocks * block_size, kv_heads * head_dim]` per
/// layer for K and for V.
pub struct CudaKvStore {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl CudaBackend {
    /// The backend on CUDA device `ordinal` in `dtype` (bf16, f16 or f32).
    pub fn new(ordinal: usize, dtype: DType) -> Result<Self> {
        let device = Device::new_cuda_with_stream(ordinal)
            .with_context(|| format!("opening CUDA device {ordinal}"))?;
        let cuda = device.as_cuda_device()?.clone();
        let kernels = Kernels::new(&cuda, dtype)?;
        let side_stream = cuda.cuda_stream().context().new_stream()?;
        Ok(Self {
            device,
            ordinal,
            dtype,
            kernels,
            adapters: AdapterCache::new(side_stream, dtype),
            block_size: AtomicUsize::new(1),
        })
    }

    /// The candle device tensors of this backend live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Adapter versions and bytes resident on the device.
    pub fn adapter_usage(&self) -> (usize, usize) {
        self.adapters.usage()
    }

    fn ptr(&self, t: &Tensor) -> Result<u64> {
        device_ptr(t, self.kernels.stream())
    }

    fn to_device(&self, host: &Tensor) -> Result<Tensor> {
        Ok(host.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
}

fn rows_cols(x: &Tensor) -> Result<(usize, usize)> {
    x.dims2().context("an activation must be [rows, cols]")
}

impl Backend for CudaBackend {
    type Matrix = Tensor;
    type Weight = Tensor;
    type Vector = Tensor;
    type Embedding = Tensor;
    type KvStore = CudaKvStore;
    type Step = CudaStep;

    fn device_name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn dtype_name(&self) -> String {
        format!("{:?}", self.dtype).to_lowercase()
    }

    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor> {
        ensure!(
            data.len() == rows * cols,
            "{} values are not {rows}x{cols}",
            data.len()
        );
        self.to_device(&Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
    }

    fn weight(&self, w: &HostWeight) -> Result<Tensor> {
        w.dims()?;
        self.to_device(&w.to_dense()?)
    }

    fn embedding(&self, w: &HostWeight, tied_head: Option<&Tensor>) -> Result<Tensor> {
        match tied_head {
            // The same values in the same dtype: share the device memory.
            Some(head) => Ok(head.clone()),
            None => self.weight(w),
        }
    }

    fn weight_bytes(&self, w: &Tensor) -> usize {
        w.elem_count() * w.dtype().size_in_bytes()
    }

    fn vector(&self, v: &Tensor) -> Result<Tensor> {
        self.to_device(v)
    }

    fn kv_store(&self, layout: KvLayout) -> Result<CudaKvStore> {
        self.block_size.store(layout.block_size, Ordering::Relaxed);
        let rows = (layout.num_blocks * layout.block_size).max(1);
        let shape = (rows, layout.slot_len());
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            k.push(Tensor::zeros(shape, self.dtype, &self.device)?);
            v.push(Tensor::zeros(shape, self.dtype, &self.device)?);
        }
        Ok(CudaKvStore { k, v })
    }

    fn kv_bytes_per_token(&self, layout: &KvLayout) -> usize {
        layout.values_per_token() * self.dtype.size_in_bytes()
    }

    fn embed(&self, step: &CudaStep, _batch: &ForwardBatch, table: &Tensor) -> Result<Tensor> {
        Ok(table.index_select(&step.tokens, 0)?)
    }

    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&w.t()?)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
    }

    fn rms_norm_heads(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let (rows, cols) = rows_cols(x)?;
        let hd = w.dim(0)?;
        ensure!(
            hd > 0 && cols % hd == 0,
            "head norm width {hd} for rows of {cols}"
        );
        let heads = x.contiguous()?.reshape((rows * cols / hd, hd))?;
        Ok(candle_nn::ops::rms_norm(&heads, w, eps)?.reshape((rows, cols))?)
    }

    fn add_bias(&self, x: &mut Tensor, bias: &Tensor) -> Result<()> {
        *x = x.broadcast_add(bias)?;
        Ok(())
    }

    fn scale_embeddings(&self, _batch: &ForwardBatch, x: &mut Tensor, factor: f32) -> Result<()> {
        // No virtual tokens reach this backend (it serves no prompt learning).
        *x = x.affine(factor as f64, 0.0)?;
        Ok(())
    }

    fn gelu_tanh_mul(&self, gate_up: &Tensor) -> Result<Tensor> {
        let (_, cols) = rows_cols(gate_up)?;
        ensure!(cols % 2 == 0, "gate|up width {cols} is odd");
        let i = cols / 2;
        // candle's `gelu` is the tanh approximation (`gelu_erf` is the exact one).
        let gate = gate_up.narrow(1, 0, i)?.gelu()?;
        Ok(gate.mul(&gate_up.narrow(1, i, i)?)?)
    }

    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        *x = x.add(y)?;
        Ok(())
    }

    fn silu_mul(&self, gate_up: &Tensor) -> Result<Tensor> {
        let (_, cols) = rows_cols(gate_up)?;
        ensure!(cols % 2 == 0, "gate|up width {cols} is odd");
        let i = cols / 2;
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, i)?)?;
        Ok(gate.mul(&gate_up.narrow(1, i, i)?)?)
    }

    fn copy_columns(&self, dst: &mut Tensor, src: &Tensor, cols: Range<usize>) -> Result<()> {
        let (rows, _) = rows_cols(dst)?;
        let part = src.narrow(1, cols.start, cols.len())?;
        *dst = dst.slice_assign(&[0..rows, cols], &part)?;
        Ok(())
    }

    fn split_columns(&self, x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
        let (_, cols) = rows_cols(x)?;
        ensure!(
            widths.iter().sum::<usize>() == cols,
            "column widths {widths:?} do not add up to {cols}"
        );
        let mut start = 0;
        let mut out = Vec::with_capacity(widths.len());
        for &w in widths {
            out.push(x.narrow(1, start, w)?.contiguous()?);
            start += w;
        }
        Ok(out)
    }

    fn rope(
        &self,
        step: &CudaStep,
        batch: &ForwardBatch,
        x: &mut Tensor,
        (cos, sin): (&Tensor, &Tensor),
        heads: usize,
    ) -> Result<()> {
        let (rows, cols) = rows_cols(x)?;
        let (max_positions, half) = rows_cols(cos)?;
        ensure!(
            cols == heads * 2 * half && rows == batch.positions.len(),
            "rope over {rows} rows of {cols} columns with {heads} heads of {}",
            2 * half
        );
        if let Some(&p) = batch.positions.iter().max() {
            ensure!(p < max_positions, "position {p} is past the rope tables");
        }
        *x = x.contiguous()?;
        let tables = (self.ptr(cos)?, self.ptr(sin)?);
        let positions = step.attention.positions;
        self.kernels
            .rope(self.ptr(x)?, rows, tables, positions, heads, half)
    }

    fn paged_attention(
        &self,
        step: &CudaStep,
        batch: &ForwardBatch,
        kv: &mut CudaKvStore,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: HeadShape,
    ) -> Result<Tensor> {
        let rows = batch.tokens.len();
        let width = shape.num_kv_heads * shape.head_dim;
        ensure!(
            rows_cols(k)? == (rows, width) && rows_cols(v)? == (rows, width),
            "K/V of {rows} rows of {width} expected"
        );
        let (Some(kc), Some(vc)) = (kv.k.get(layer), kv.v.get(layer)) else {
            bail!("layer {layer} has no K/V storage");
        };
        let caches = (self.ptr(kc)?, self.ptr(vc)?);
        let meta = step.attention;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        self.kernels.kv_write(
            (self.ptr(&k)?, self.ptr(&v)?),
            caches,
            meta.kv_slot,
            rows,
            width,
        )?;
        let q = q.contiguous()?;
        let out_shape = (rows, shape.num_heads * shape.head_dim);
        // SAFETY: the attention kernel writes every element of `out` (each block writes
        // its row and head) before anything reads it.
        let out = unsafe { Tensor::empty(out_shape, self.dtype, &self.device) }?;
        self.kernels
            .paged_attention(self.ptr(&out)?, self.ptr(&q)?, caches, meta, rows, shape)?;
        Ok(out)
    }

    fn gather_logit_rows(
        &self,
        step: &CudaStep,
        batch: &ForwardBatch,
        x: &Tensor,
    ) -> Result<Tensor> {
        let (n, _) = rows_cols(x)?;
        if let Some(&r) = batch.logit_rows.iter().find(|&&r| r >= n) {
            bail!("row {r} of {n}");
        }
        Ok(x.index_select(&step.logit_rows, 0)?)
    }

    fn to_host(&self, x: Tensor) -> Result<Vec<f32>> {
        Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn begin_step(
        &self,
        batch: &ForwardBatch,
        adapters: &[Arc<AdapterWeights>],
    ) -> Result<CudaStep> {
        // The server refuses mixtures where `serves_mixtures` is false (here).
        ensure!(
            batch.mixtures.is_empty(),
            "adapter mixtures are not served on the CUDA backend"
        );
        let device_adapters = adapters
            .iter()
            .map(|a| self.adapters.get(a))
            .collect::<Result<Vec<_>>>()
            .context("copying adapters to the device")?;
        let block_size = self.block_size.load(Ordering::Relaxed);
        CudaStep::new(&self.device, batch, block_size, device_adapters)
    }

    fn release_adapter(&self, adapter: &Arc<AdapterWeights>) {
        self.adapters.release(adapter);
    }

    fn prepare_adapter(&self, adapter: &Arc<AdapterWeights>) -> bool {
        self.adapters.prepare(adapter)
    }

    fn lora(
        &self,
        step: &CudaStep,
        layer: usize,
        parts: &[SitePart],
        x: &Tensor,
        y: &mut Tensor,
    ) -> Result<()> {
        let Some(lora) = &step.lora else {
            return Ok(());
        };
        if !parts
            .iter()
            .any(|p| step.any_adapter_at(layer, p.site.index()))
        {
            return Ok(());
        }
        let (rows, in_features) = rows_cols(x)?;
        let (_, y_stride) = rows_cols(y)?;
        let widths: usize = parts.iter().map(|p| p.out_features).sum();
        ensure!(
            widths == y_stride,
            "LoRA parts cover {widths} columns of {y_stride}"
        );
        let x = x.contiguous()?;
        *y = y.contiguous()?;
        // SAFETY: expand reads h[t, r] only for tokens of segments whose slot has weights
        // at the site and r below that slot's rank: exactly what shrink wrote before it.
        let h = unsafe { Tensor::empty((rows, lora.max_rank), DType::F32, &self.device) }?;
        let mut y_offset = 0;
        for part in parts {
            if !step.any_adapter_at(layer, part.site.index()) {
                y_offset += part.out_features;
                continue;
            }
            let site = LoraLaunch {
                x: self.ptr(&x)?,
                in_features,
                h: self.ptr(&h)?,
                h_stride: lora.max_rank,
                y: self.ptr(y)?,
                y_stride,
                y_offset,
                out_features: part.out_features,
                site: layer * 7 + part.site.index(),
                max_rank: lora.max_rank,
            };
            for (group, sgmv) in [(lora.sgmv, true), (lora.bgmv, false)] {
                self.kernels
                    .lora(&site, group, lora.tables, sgmv)
                    .with_context(|| {
                        format!("LoRA at layer {layer} {}", part.site.module_name())
                    })?;
            }
            y_offset += part.out_features;
        }
        Ok(())
    }
}
