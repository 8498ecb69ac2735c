//! The backend seam: the operations the model is written against, once, for every place
//! its weights and activations can live. The model (`super::llama`) decides *what* runs
//! (which tensors, in which order, with which adapter sites); a [`Backend`] decides
//! *where and how*: the memory that holds weights, activations and the paged K/V, and the
//! kernels that compute on them. `cpu` (f32 host buffers, our packed AVX2/FMA linears and
//! LoRA kernels) is the default; `cuda` (feature `cuda`: candle's CUDA tensors, our SGMV
//! and paged-attention kernels) keeps everything in device memory.
//!
//! # Contract
//! - **Shapes.** A [`Backend::Matrix`] is a row-major `[rows, cols]` matrix of f32 values
//!   (its storage may be narrower, e.g. bf16 on a GPU). Row `t` of every activation is
//!   token `t` of the step's [`ForwardBatch`]. A [`Backend::Weight`] is a linear layer's
//!   `[out, in]` weight (PyTorch layout) and [`Backend::linear`] computes `x W^T`.
//! - **Batch invariance.** Every operation except attention is row-wise, and attention
//!   reads only the row's own sequence: a token's result must not depend on which other
//!   tokens share the step. The CPU backend makes it bit-identical (a fixed reduction
//!   order per output element); a backend that cannot must say how far it drifts.
//! - **One step.** [`Backend::begin_step`] turns the step's [`ForwardBatch`] (positions,
//!   block tables, token-to-slot map) and the slots' adapter weights into whatever the
//!   kernels read, once per step (on a GPU: one upload of the step's metadata); every
//!   operation of that step that needs them gets both the batch and this
//!   [`Backend::Step`].
//! - **Adapters.** [`Backend::lora`] adds, for one linear layer, the deltas of each of its
//!   [`SitePart`]s (the layer's output columns are the parts' columns, in order), then
//!   multiplies the columns of each part by its adapters' output scales (DoRA, (IA)³);
//!   [`Backend::adapter_input`] multiplies the input rows by their adapters' input scales
//!   ((IA)³ on feed-forward modules) before the linear. Tokens of slot -1, slots without
//!   weights at a site, and columns of other parts are left bit-identical. Slots index
//!   `adapters` as given to `begin_step`. A backend says which [`AdapterKind`]s it applies
//!   ([`Backend::serves`]); the registry refuses the others at load.
//! - **Paged K/V.** [`Backend::kv_store`] allocates the storage of a [`KvLayout`]; its
//!   blocks are addressed through the block tables of the batch's chunks, which the
//!   caller (the engine's block allocator) guarantees are in range and not shared by two
//!   writers. [`Backend::paged_attention`] first writes the step's K and V rows at their
//!   positions, then computes causal attention of each query over its own sequence's
//!   positions `0..=pos` (or the last `window` of them on a sliding layer), with the
//!   [`HeadShape`]'s scale and soft-cap.
//! - **Host traffic.** Only [`Backend::upload`] (at load) and [`Backend::to_host`] (the
//!   step's logits) cross between host and backend memory; nothing else needs to.
//! - **Errors.** Operations return errors instead of panicking on shapes they cannot
//!   handle; the model validates token ids, positions and slots before any operation.
//!
//! # Adding a backend
//! Implement [`Backend`] for a type that owns its device handle (e.g. a CUDA device with
//! candle tensors as `Matrix` and bf16 weights), then build the model with
//! `Llama::<YourBackend>::load(backend, &checkpoint, cfg)` and hand `ModelRunner::new(model)` to the
//! engine as a `Box<dyn BaseModel>` (see `super::runner`). Nothing in the model, engine or
//! server changes. The oracle for a new backend is the CPU backend on the same weights.
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod plan;

use super::batch::ForwardBatch;
pub use super::checkpoint::HostWeight;
use crate::lora::peft::{AdapterKind, AdapterWeights, KvPrefix, LoraSite};
use crate::lora::values::AdapterDType;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::ops::Range;
use std::sync::Arc;

/// Head layout and options of one attention call (one layer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Scores `q . k` times this (`1 / sqrt(head_dim)` for most families).
    pub scale: f32,
    /// Scaled scores soft-capped to `c * tanh(s / c)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// A query at position `p` attends to positions `p + 1 - window ..= p` only (a
    /// sliding layer); None: to `0..=p`.
    pub window: Option<usize>,
}

impl HeadShape {
    /// Plain causal attention with the `1 / sqrt(head_dim)` scale.
    pub fn causal(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
            window: None,
        }
    }

    /// The first position a query at `pos` attends to.
    pub fn first_position(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

/// The paged K/V storage of a model: `num_blocks` blocks of `block_size` token slots, each
/// slot holding K and V of every KV head of every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvLayout {
    /// Values in one token slot of one layer (K or V).
    pub fn slot_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Values (K and V, every layer) one token takes.
    pub fn values_per_token(&self) -> usize {
        2 * self.num_layers * self.slot_len()
    }
}

/// One adapter site of a linear layer: the site and how many output columns it owns.
/// A layer whose weight stacks several projections (q, k, v) has one part per projection,
/// in the order of its output columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SitePart {
    pub site: LoraSite,
    pub out_features: usize,
}

/// Where a model's weights and activations live and how its operations run there. See
/// the module documentation for the contract.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A row-major `[rows, cols]` activation matrix.
    type Matrix: Send;
    /// A linear layer's `[out, in]` weight, stored for [`Backend::linear`].
    type Weight: Send + Sync;
    /// A vector (RMS-norm weights).
    type Vector: Send + Sync;
    /// The token embedding table `[vocab, hidden]`, for [`Backend::embed`].
    type Embedding: Send + Sync;
    /// The paged K/V storage of every layer.
    type KvStore: Send;
    /// One step's batch metadata and adapters, prepared for this backend's kernels.
    type Step: Send;

    /// Where the weights live, for users ("cpu", "cuda:0").
    fn device_name(&self) -> String;
    /// How the weights are stored, for users ("f32").
    fn dtype_name(&self) -> String;
    /// How adapter matrices should be stored in host memory for this backend's weights:
    /// f32 beside f32 weights (exact parity), bf16 beside narrower ones.
    fn adapter_dtype(&self) -> AdapterDType {
        AdapterDType::F32
    }

    /// A matrix from host values (`data.len() == rows * cols`).
    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Self::Matrix>;
    /// A linear weight `[out, in]` from the checkpoint: dense values of any float dtype,
    /// or quantized blocks (a backend that does not compute on them dequantizes them).
    fn weight(&self, w: &HostWeight) -> Result<Self::Weight>;
    /// The token embedding table from the checkpoint (dense or blocks, as for
    /// [`Backend::weight`]). `tied_head` is the LM head built from the same tensor when
    /// the embeddings are tied: a backend may share its storage instead of a copy.
    fn embedding(
        &self,
        w: &HostWeight,
        tied_head: Option<&Self::Weight>,
    ) -> Result<Self::Embedding>;
    /// Bytes a weight holds (what a step reads to compute with it).
    fn weight_bytes(&self, w: &Self::Weight) -> usize;
    /// Rows `rows` of `w` (`[rows.len(), in]`, row-major f32) with the values
    /// [`Backend::linear`] computes with: what DoRA's norms are taken over.
    fn weight_rows(&self, _w: &Self::Weight, _rows: Range<usize>) -> Result<Vec<f32>> {
        anyhow::bail!(
            "the {} backend cannot read its weights back",
            self.device_name()
        )
    }
    /// Whether this backend's steps apply adapters of `kind` (output and input scales
    /// as well as LoRA deltas). LoRA alone unless a backend says more.
    fn serves(&self, kind: AdapterKind) -> bool {
        kind == AdapterKind::Lora
    }
    /// Whether steps apply weighted mixtures (a token with several `(slot, weight)`
    /// entries, `ForwardBatch::mixtures`); the server refuses mixtures otherwise.
    fn serves_mixtures(&self) -> bool {
        false
    }
    /// A vector from a host tensor `[n]` (any float dtype).
    fn vector(&self, v: &Tensor) -> Result<Self::Vector>;
    /// Empty K/V storage of `layout`.
    fn kv_store(&self, layout: KvLayout) -> Result<Self::KvStore>;
    /// Bytes of K/V storage one token takes in `layout`'s shape.
    fn kv_bytes_per_token(&self, layout: &KvLayout) -> usize;

    /// Rows `batch.tokens` of `table` (the embedding lookup); the caller checked every
    /// id. A device backend reads the ids `begin_step` uploaded.
    fn embed(
        &self,
        step: &Self::Step,
        batch: &ForwardBatch,
        table: &Self::Embedding,
    ) -> Result<Self::Matrix>;
    /// `x W^T`: `[t, in]` -> `[t, out]`.
    fn linear(&self, x: &Self::Matrix, w: &Self::Weight) -> Result<Self::Matrix>;
    /// `x / sqrt(mean(x^2) + eps) * w`, per row.
    fn rms_norm(&self, x: &Self::Matrix, w: &Self::Vector, eps: f32) -> Result<Self::Matrix>;
    /// RMS norm of every `w.len()`-wide head of every row (`x` is `[t, heads * w.len()]`):
    /// per-head q/k norms.
    fn rms_norm_heads(&self, x: &Self::Matrix, w: &Self::Vector, eps: f32) -> Result<Self::Matrix>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Matrix, y: &Self::Matrix) -> Result<()>;
    /// `x += y`, then the RMS norm of the new `x` with `w` (the residual add and the norm
    /// after it; a backend may fuse them).
    fn add_rms_norm(
        &self,
        x: &mut Self::Matrix,
        y: &Self::Matrix,
        w: &Self::Vector,
        eps: f32,
    ) -> Result<Self::Matrix> {
        self.add_assign(x, y)?;
        self.rms_norm(x, w, eps)
    }
    /// `x[t] += bias` for every row `t` (a linear layer's bias, `[cols]`).
    fn add_bias(&self, x: &mut Self::Matrix, bias: &Self::Vector) -> Result<()>;
    /// Rows of vocabulary tokens of `batch` times `factor` (Gemma's embedding scale,
    /// part of its embedding lookup in transformers); virtual-token rows, which PEFT puts
    /// beside the looked-up embeddings, are left as they are.
    fn scale_embeddings(
        &self,
        batch: &ForwardBatch,
        x: &mut Self::Matrix,
        factor: f32,
    ) -> Result<()>;
    /// SwiGLU: rows of `[gate | up]` (width `2 i`) to `silu(gate) * up` (width `i`).
    fn silu_mul(&self, gate_up: &Self::Matrix) -> Result<Self::Matrix>;
    /// GeGLU: rows of `[gate | up]` to `gelu_tanh(gate) * up`, with GELU's tanh
    /// approximation `0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))`.
    fn gelu_tanh_mul(&self, gate_up: &Self::Matrix) -> Result<Self::Matrix>;
    /// Columns `cols` of `src` written over the same columns of `dst` (same shape).
    fn copy_columns(
        &self,
        dst: &mut Self::Matrix,
        src: &Self::Matrix,
        cols: Range<usize>,
    ) -> Result<()>;
    /// The column blocks of `x` of the given widths (which sum to its width), in order.
    fn split_columns(&self, x: &Self::Matrix, widths: &[usize]) -> Result<Vec<Self::Matrix>>;
    /// Rotates every head of every row in place (rotate-half convention): `x` is
    /// `[t, heads * head_dim]`, `cos` and `sin` are `[max_positions, head_dim / 2]` and
    /// row `t` uses the tables' row `batch.positions[t]`.
    fn rope(
        &self,
        step: &Self::Step,
        batch: &ForwardBatch,
        x: &mut Self::Matrix,
        tables: (&Self::Matrix, &Self::Matrix),
        heads: usize,
    ) -> Result<()>;
    /// Writes this step's K and V (`[t, kv_heads * head_dim]`) of `layer` into `kv` at the
    /// batch's positions, then returns causal attention of `q` (`[t, heads * head_dim]`)
    /// over each row's own sequence.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        step: &Self::Step,
        batch: &ForwardBatch,
        kv: &mut Self::KvStore,
        layer: usize,
        q: &Self::Matrix,
        k: &Self::Matrix,
        v: &Self::Matrix,
        shape: HeadShape,
    ) -> Result<Self::Matrix>;
    /// Rows `batch.logit_rows` of `x`, in that order (the rows whose logits the step
    /// returns).
    fn gather_logit_rows(
        &self,
        step: &Self::Step,
        batch: &ForwardBatch,
        x: &Self::Matrix,
    ) -> Result<Self::Matrix>;
    /// The matrix's values on the host, row-major.
    fn to_host(&self, x: Self::Matrix) -> Result<Vec<f32>>;

    /// Runs one whole step `f` where this backend's operations are cheapest to launch.
    /// The CPU backend runs it on a thread of its worker pool, so each operation's
    /// parallel region starts there instead of waking the pool from outside and waiting
    /// for it (a sleep and a wake-up per operation, hundreds per step).
    fn run_step<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }
    /// Prepares one step: the batch's metadata and its adapters (`batch.slots[t]` is
    /// token t's index into `adapters`, or -1 for the base model alone). The caller
    /// checked every slot, position and token id is in range.
    fn begin_step(
        &self,
        batch: &ForwardBatch,
        adapters: &[Arc<AdapterWeights>],
    ) -> Result<Self::Step>;
    /// The engine evicted `adapter` from its active pool: a backend that keeps a copy
    /// of active adapters (device memory) drops it. Steps already prepared keep theirs.
    fn release_adapter(&self, _adapter: &Arc<AdapterWeights>) {}
    /// Whether `adapter` can be used by a step without waiting; a backend that copies
    /// adapters to device memory starts the copy here (off the engine thread) and says
    /// no until it is done. The engine asks before scheduling a request's first step.
    fn prepare_adapter(&self, _adapter: &Arc<AdapterWeights>) -> bool {
        true
    }
    /// `x` (`[t, in]`, the input of the linear layer of `parts`) with each token's row
    /// multiplied by its adapter's input scale at those sites, or None when no token of
    /// the step has one there (the caller then uses `x`). Asked with one part at a time
    /// (a stacked layer's parts one by one: the model then runs that part's columns on
    /// the scaled input). A backend that serves only LoRA has none.
    fn adapter_input(
        &self,
        _step: &Self::Step,
        _layer: usize,
        _parts: &[SitePart],
        _x: &Self::Matrix,
    ) -> Result<Option<Self::Matrix>> {
        Ok(None)
    }
    /// Writes a prefix-tuning adapter's keys and values (unrotated) of every layer at
    /// positions `0..prefix.count` of `table`, once per active adapter version: the
    /// sequences of that adapter then share those blocks read-only. A backend that serves
    /// no prefix tuning refuses.
    fn write_kv_prefix(
        &self,
        _kv: &mut Self::KvStore,
        _table: &[u32],
        _prefix: &KvPrefix,
    ) -> Result<()> {
        bail!("this backend does not serve prefix tuning")
    }
    /// Copies every layer's K and V of block `src` into block `dst`, for each pair (a
    /// sequence's own copy of a shared block it goes on writing).
    fn copy_kv_blocks(&self, _kv: &mut Self::KvStore, _pairs: &[(u32, u32)]) -> Result<()> {
        bail!("this backend does not copy K/V blocks")
    }
    /// Adds each part's LoRA delta of `layer` to its columns of `y` (`[t, sum of the
    /// parts' widths]`), for input `x` (`[t, in]`), then multiplies those columns by each
    /// token's adapter output scale at that part's site and adds its output offset.
    fn lora(
        &self,
        step: &Self::Step,
        layer: usize,
        parts: &[SitePart],
        x: &Self::Matrix,
        y: &mut Self::Matrix,
    ) -> Result<()>;
}
