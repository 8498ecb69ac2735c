//! The `cuda` backend (cargo feature `cuda`): weights, activations, the paged K/V and the
//! active adapters resident on one CUDA device in bf16, f16 or f32. GEMMs, RMS norm and
//! SwiGLU run through candle's CUDA tensors (cuBLAS and candle's kernels); RoPE, the K/V
//! write, paged attention and the batched LoRA kernels are ours (`kernels`, compiled from
//! the `.cu` files beside the CPU kernels). Accumulation is f32 everywhere.
//!
//! Invariants: all work of a step is queued on the device's one stream, so stream order
//! is the only synchronisation. cudarc's per-buffer event tracking is off (it records an
//! event per buffer use and makes a stream wait at every allocation and argument: driver
//! calls the host pays per kernel); buffers made on the step stream are freed in that
//! stream's order, and the one other stream, the adapter copies' side stream, is joined
//! explicitly both ways: a copy is synchronised before any step reads it, and a device
//! adapter's memory is freed only after the step stream's work enqueued before the release
//! (`adapters`). `MULTILORA_CUDA_EVENT_TRACKING=1` keeps the tracking on, to measure what it
//! costs. Nothing crosses to the host during a step except the
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

use super::plan::launch::{self, LoraSiteShape};
use super::{Backend, HeadShape, HostWeight, KvLayout, SitePart};
use crate::lora::peft::{AdapterWeights, LoraSite};
use crate::model::batch::ForwardBatch;
use adapters::AdapterCache;
use anyhow::{bail, ensure, Context, Result};
use candle_core::cuda::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::{DType, Device, Tensor};
use kernels::{device_ptr, Kernels};
use std::ops::Range;
use std::sync::{Arc, Mutex};
pub use step::CudaStep;

/// One CUDA device and the dtype weights and activations are kept in.
pub struct CudaBackend {
    device: Device,
    ordinal: usize,
    dtype: DType,
    kernels: Kernels,
    adapters: AdapterCache,
    /// What the last K/V store made fixes for every step's metadata.
    store: Mutex<StoreShape>,
    /// Whether attention runs the split decode kernel where it applies
    /// (`MULTILORA_CUDA_ATTENTION=split`; off until a GPU run has checked it against the
    /// CPU and measured it).
    split_attention: bool,
    /// Whether the residual add + RMS norm and the gated activations run as our fused
    /// kernels (`MULTILORA_CUDA_FUSED=1`; off until a GPU run has checked them).
    fused: bool,
}

/// The block size of the K/V store, and the all-zero adapter descriptor table (one per
/// site of every layer) that unused slot-table entries point at.
struct StoreShape {
    block_size: usize,
    null_descs: Option<Arc<CudaSlice<u64>>>,
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
        let step_stream = cuda.cuda_stream();
        if !event_tracking_requested() {
            // SAFETY: every buffer made from here on lives on the step stream (candle's
            // tensors, the step metadata) and is freed in its order, or belongs to the
            // adapter cache, which orders its side stream against the step stream
            // explicitly (see the module invariants and `adapters`).
            unsafe { step_stream.context().disable_event_tracking() };
        }
        let kernels = Kernels::new(&cuda, dtype)?;
        let side_stream = step_stream.context().new_stream()?;
        Ok(Self {
            device,
            ordinal,
            dtype,
            kernels,
            adapters: AdapterCache::new(side_stream, step_stream, dtype),
            store: Mutex::new(StoreShape {
                block_size: 1,
                null_descs: None,
            }),
            split_attention: std::env::var("MULTILORA_CUDA_ATTENTION").is_ok_and(|v| v == "split"),
            fused: std::env::var("MULTILORA_CUDA_FUSED").is_ok_and(|v| v == "1"),
        })
    }

    /// The backend with the split decode attention kernel on or off where it applies
    /// (the default is `MULTILORA_CUDA_ATTENTION=split`, else off).
    pub fn with_split_attention(mut self, on: bool) -> Self {
        self.split_attention = on;
        self
    }

    /// The backend with the fused row-wise kernels on or off (the default is
    /// `MULTILORA_CUDA_FUSED=1`, else off).
    pub fn with_fused_kernels(mut self, on: bool) -> Self {
        self.fused = on;
        self
    }

    /// `act(gate) * up` of `[gate | up]` rows by the fused kernel.
    fn fused_gated(&self, gate_up: &Tensor, gelu: bool) -> Result<Tensor> {
        let (rows, cols) = rows_cols(gate_up)?;
        ensure!(cols % 2 == 0, "gate|up width {cols} is odd");
        let gate_up = gate_up.contiguous()?;
        // SAFETY: the kernel writes every element of every row before anything reads it.
        let out = unsafe { Tensor::empty((rows, cols / 2), self.dtype, &self.device) }?;
        let plan = launch::gated(rows, cols / 2, gelu)?;
        let bound = [("gate_up", self.ptr(&gate_up)?), ("out", self.ptr(&out)?)];
        // SAFETY: gate_up is [rows, 2 inter] and out [rows, inter], both contiguous.
        unsafe { self.kernels.launch(&plan, 0, &bound) }?;
        Ok(out)
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

    fn elem(&self) -> usize {
        self.dtype.size_in_bytes()
    }

    fn lock_store(&self) -> std::sync::MutexGuard<'_, StoreShape> {
        // Every mutation replaces the whole value, so a poisoned lock is still consistent.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn to_device(&self, host: &Tensor) -> Result<Tensor> {
        Ok(host.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
}

/// Whether `MULTILORA_CUDA_EVENT_TRACKING` asks to keep cudarc's event tracking on.
fn event_tracking_requested() -> bool {
    std::env::var("MULTILORA_CUDA_EVENT_TRACKING").is_ok_and(|v| v == "1")
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
        let sites = layout.num_layers * LoraSite::ALL.len() * adapters::DESC_WORDS;
        let stream = self.kernels.stream();
        let null_descs = stream.alloc_zeros::<u64>(sites.max(1))?;
        *self.lock_store() = StoreShape {
            block_size: layout.block_size,
            null_descs: Some(Arc::new(null_descs)),
        };
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
        if self.fused {
            return self.fused_gated(gate_up, true);
        }
        let (_, cols) = rows_cols(gate_up)?;
        ensure!(cols % 2 == 0, "gate|up width {cols} is odd");
        let i = cols / 2;
        // candle's `gelu` is the tanh approximation (`gelu_erf` is the exact one).
        let gate = gate_up.narrow(1, 0, i)?.gelu()?;
        Ok(gate.mul(&gate_up.narrow(1, i, i)?)?)
    }

    fn add_rms_norm(&self, x: &mut Tensor, y: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        if !self.fused {
            self.add_assign(x, y)?;
            return self.rms_norm(x, w, eps);
        }
        let (rows, cols) = rows_cols(x)?;
        ensure!(
            rows_cols(y)? == (rows, cols) && w.dims1()? == cols,
            "a residual of {rows}x{cols} with a norm of {:?}",
            w.dims()
        );
        *x = x.contiguous()?;
        let y = y.contiguous()?;
        // SAFETY: the kernel writes every element of every row before anything reads it.
        let out = unsafe { Tensor::empty((rows, cols), self.dtype, &self.device) }?;
        let plan = launch::add_rms_norm(rows, cols, eps)?;
        let bound = [
            ("x", self.ptr(x)?),
            ("y", self.ptr(&y)?),
            ("w", self.ptr(w)?),
            ("out", self.ptr(&out)?),
        ];
        // SAFETY: x, y and out are contiguous [rows, cols]; w has cols values.
        unsafe { self.kernels.launch(&plan, 0, &bound) }?;
        Ok(out)
    }

    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        *x = x.add(y)?;
        Ok(())
    }

    fn silu_mul(&self, gate_up: &Tensor) -> Result<Tensor> {
        if self.fused {
            return self.fused_gated(gate_up, false);
        }
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
        let plan = launch::rope(&step.layout, heads, half)?;
        let bound = [
            ("x", self.ptr(x)?),
            ("cos", self.ptr(cos)?),
            ("sin", self.ptr(sin)?),
        ];
        // SAFETY: x has the step's rows of `heads` heads and the tables cover every
        // position (checked above).
        unsafe { self.kernels.launch(&plan, step.meta_base, &bound) }
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
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let caches = [("k_cache", self.ptr(kc)?), ("v_cache", self.ptr(vc)?)];
        let write = launch::kv_write(&step.layout, width)?;
        let bound = [
            ("k", self.ptr(&k)?),
            ("v", self.ptr(&v)?),
            caches[0],
            caches[1],
        ];
        // SAFETY: k and v have the step's rows of `width`; every cache row the metadata
        // names is in the store (the engine's block tables are in range).
        unsafe { self.kernels.launch(&write, step.meta_base, &bound) }?;
        let q = q.contiguous()?;
        let out_shape = (rows, shape.num_heads * shape.head_dim);
        // SAFETY: the attention kernel writes every element of `out` (each block writes
        // its row and head) before anything reads it.
        let out = unsafe { Tensor::empty(out_shape, self.dtype, &self.device) }?;
        let split = match self.split_attention {
            true => launch::decode_attention(&step.layout, step.block_size, shape, self.elem())?,
            false => None,
        };
        let mut bound = vec![
            ("out", self.ptr(&out)?),
            ("q", self.ptr(&q)?),
            caches[0],
            caches[1],
        ];
        // The split kernel's f32 scratch, held until its launches are queued.
        let mut _partials = None;
        let plans = match split {
            Some(plans) => {
                let len = launch::decode_partials_len(&step.layout, step.block_size, &shape);
                // SAFETY: the merge reads only partials the attention kernel wrote (every
                // split block writes its heads' entries, empty splits included).
                let partials = unsafe { Tensor::empty(len, DType::F32, &self.device) }?;
                bound.push(("partials", self.ptr(&partials)?));
                _partials = Some(partials);
                plans
            }
            None => vec![launch::attention(&step.layout, step.block_size, shape)?],
        };
        for plan in &plans {
            // SAFETY: q and out have the step's rows of every head; the block tables cover
            // every position of their chunks; `partials` holds every (row, head, split)
            // entry of the split kernel.
            unsafe { self.kernels.launch(plan, step.meta_base, &bound) }?;
        }
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
        let (block_size, null_descs) = {
            let store = self.lock_store();
            let null = store
                .null_descs
                .as_ref()
                .context("a step before the K/V store was made")?
                .device_ptr(self.kernels.stream())
                .0;
            (store.block_size, null)
        };
        CudaStep::new(&self.device, batch, block_size, device_adapters, null_descs)
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
        if !step.has_lora
            || !parts
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
        let max_rank = step.layout.capacity.max_rank;
        // SAFETY: expand reads h[t, r] only for tokens of segments whose slot has weights
        // at the site and r below that slot's rank: exactly what shrink wrote before it.
        let h = unsafe { Tensor::empty((rows, max_rank), DType::F32, &self.device) }?;
        let bound = [
            ("x", self.ptr(&x)?),
            ("h", self.ptr(&h)?),
            ("y", self.ptr(y)?),
        ];
        let mut y_offset = 0;
        for part in parts {
            if step.any_adapter_at(layer, part.site.index()) {
                let site = LoraSiteShape {
                    in_features,
                    y_stride,
                    y_offset,
                    out_features: part.out_features,
                    site: layer * LoraSite::ALL.len() + part.site.index(),
                    x_aligned: bound[0].1.is_multiple_of(16),
                    elem_bytes: self.elem(),
                };
                for plan in launch::lora(&step.layout, &site)? {
                    // SAFETY: x, h and y have the step's rows ([rows, in], [rows,
                    // max_rank] f32, [rows, y_stride]); every descriptor of the slot
                    // table points into a live adapter copy the step holds, or is null.
                    unsafe { self.kernels.launch(&plan, step.meta_base, &bound) }.with_context(
                        || format!("LoRA at layer {layer} {}", part.site.module_name()),
                    )?;
                }
            }
            y_offset += part.out_features;
        }
        Ok(())
    }
}
