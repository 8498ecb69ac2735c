//! The `cpu` backend: weights, activations and the paged K/V in host memory; linear
//! layers in the format `--dtype` chose (`weight`: f32, bf16 or f16 panels through our
//! pre-packed AVX2/FMA kernel in `linear`, or quantized blocks through the integer
//! kernels in `quant`), activations in f32, paged attention (`attention`), row-wise ops
//! (`ops`) and the batched adapter kernels of `crate::lora::kernels` (LoRA deltas and the
//! column scales of DoRA and (IA)³). Every operation gives a
//! token bit-identical results whatever else is in the batch (on one machine and ISA).
pub mod attention;
pub mod kv;
pub mod linear;
pub mod ops;
pub mod quant;
pub mod weight;
pub mod zeroed;

use super::{Backend, HeadShape, HostWeight, KvLayout, SitePart};
use crate::lora::batch::LoraBatch;
use crate::lora::kernels::{
    add_output_offset, lora_apply, scale_input, scale_output, SiteShape, SlotWeights,
};
use crate::lora::peft::{AdapterKind, AdapterWeights, KvPrefix, LoraSite, SiteScale};
use crate::lora::values::AdapterDType;
use crate::model::batch::{virtual_row, ForwardBatch};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
pub use kv::{CpuKvStore, KvDType};
use std::ops::Range;
use std::sync::Arc;
pub use weight::{CpuEmbedding, CpuWeight, CpuWeightFormat};

/// The CPU backend: the weight format and the K/V cache's value type; the kernels use
/// rayon's global pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    format: CpuWeightFormat,
    kv_dtype: KvDType,
}

impl CpuBackend {
    /// A backend keeping linear weights in `format` and K/V in f32.
    pub fn new(format: CpuWeightFormat) -> Self {
        Self {
            format,
            kv_dtype: KvDType::F32,
        }
    }

    /// The same backend with its K/V cache in `kv_dtype`.
    pub fn with_kv_dtype(self, kv_dtype: KvDType) -> Self {
        Self { kv_dtype, ..self }
    }

    pub fn format(&self) -> CpuWeightFormat {
        self.format
    }

    pub fn kv_dtype(&self) -> KvDType {
        self.kv_dtype
    }
}

/// A row-major `[rows, cols]` f32 matrix in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMatrix {
    data: Vec<f32>,
    cols: usize,
}

impl HostMatrix {
    /// `data` holds whole rows of `cols` values.
    pub fn new(data: Vec<f32>, cols: usize) -> Result<Self> {
        ensure!(
            cols > 0 && data.len().is_multiple_of(cols),
            "{} values are not rows of {cols}",
            data.len()
        );
        Ok(Self { data, cols })
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.cols
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// One step as the CPU kernels read it: the token-to-slot metadata (built once, shared
/// by every layer and site) and each slot's weights. Everything else is read from the
/// host-side batch itself.
pub struct CpuStep {
    batch: LoraBatch,
    adapters: Vec<Arc<AdapterWeights>>,
    /// Some adapter scales a site's input or output (DoRA, (IA)³): else the scale
    /// passes are skipped at every layer.
    scaled: bool,
    /// Some adapter adds a per-site output offset (DoRA on a biased projection).
    offset: bool,
}

/// The f32 values of a host tensor, flattened.
fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Backend for CpuBackend {
    type Matrix = HostMatrix;
    type Weight = CpuWeight;
    type Vector = Vec<f32>;
    type Embedding = CpuEmbedding;
    type KvStore = CpuKvStore;
    type Step = CpuStep;

    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn dtype_name(&self) -> String {
        self.format.name()
    }

    fn adapter_dtype(&self) -> AdapterDType {
        match self.format {
            CpuWeightFormat::F32 => AdapterDType::F32,
            _ => AdapterDType::Bf16,
        }
    }

    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<HostMatrix> {
        ensure!(
            data.len() == rows * cols,
            "{} values are not {rows}x{cols}",
            data.len()
        );
        HostMatrix::new(data, cols)
    }

    fn weight(&self, w: &HostWeight) -> Result<CpuWeight> {
        CpuWeight::from_host(w, self.format)
    }

    fn embedding(&self, w: &HostWeight, tied_head: Option<&CpuWeight>) -> Result<CpuEmbedding> {
        if let Some(CpuWeight::Quantized(q)) = tied_head {
            return Ok(CpuEmbedding::Quantized(Arc::clone(q)));
        }
        CpuEmbedding::from_host(w, self.format)
    }

    fn weight_rows(&self, w: &CpuWeight, rows: Range<usize>) -> Result<Vec<f32>> {
        w.rows(rows)
    }

    fn serves(&self, _kind: AdapterKind) -> bool {
        true
    }

    fn serves_mixtures(&self) -> bool {
        true
    }

    fn weight_bytes(&self, w: &CpuWeight) -> usize {
        w.bytes()
    }

    fn vector(&self, v: &Tensor) -> Result<Vec<f32>> {
        host_values(v)
    }

    fn kv_store(&self, layout: KvLayout) -> Result<CpuKvStore> {
        CpuKvStore::new(layout, self.kv_dtype)
    }

    fn kv_bytes_per_token(&self, layout: &KvLayout) -> usize {
        layout.values_per_token() * self.kv_dtype.size()
    }

    fn embed(
        &self,
        step: &CpuStep,
        batch: &ForwardBatch,
        table: &CpuEmbedding,
    ) -> Result<HostMatrix> {
        let h = table.cols();
        let mut x = Vec::with_capacity(batch.tokens.len() * h);
        for (&id, &slot) in batch.tokens.iter().zip(&batch.slots) {
            if let Some(row) = virtual_row(id) {
                let adapter = usize::try_from(slot)
                    .ok()
                    .and_then(|s| step.adapters.get(s));
                let values = adapter.and_then(|a| a.prompt.as_ref()?.row(row));
                let values =
                    values.with_context(|| format!("virtual token {row} of slot {slot}"))?;
                ensure!(
                    values.len() == h,
                    "virtual token {row} has {} values, not {h}",
                    values.len()
                );
                x.extend_from_slice(values);
                continue;
            }
            let id = id as usize;
            ensure!(id < table.rows(), "token id {id} is outside the embedding");
            table.push_row(id, &mut x);
        }
        HostMatrix::new(x, h)
    }

    fn linear(&self, x: &HostMatrix, w: &CpuWeight) -> Result<HostMatrix> {
        ensure!(
            x.cols == w.in_features(),
            "linear input has {} columns, the weight takes {}",
            x.cols,
            w.in_features()
        );
        HostMatrix::new(w.matmul(&x.data, x.rows()), w.out_features())
    }

    fn rms_norm(&self, x: &HostMatrix, w: &Vec<f32>, eps: f32) -> Result<HostMatrix> {
        ensure!(
            x.cols == w.len(),
            "norm width {} for rows of {}",
            w.len(),
            x.cols
        );
        HostMatrix::new(ops::rms_norm(&x.data, w, eps), x.cols)
    }

    fn rms_norm_heads(&self, x: &HostMatrix, w: &Vec<f32>, eps: f32) -> Result<HostMatrix> {
        ensure!(
            !w.is_empty() && x.cols.is_multiple_of(w.len()),
            "head norm width {} for rows of {}",
            w.len(),
            x.cols
        );
        HostMatrix::new(ops::rms_norm(&x.data, w, eps), x.cols)
    }

    fn add_bias(&self, x: &mut HostMatrix, bias: &Vec<f32>) -> Result<()> {
        ensure!(
            x.cols == bias.len(),
            "a bias of {} for rows of {}",
            bias.len(),
            x.cols
        );
        ops::add_bias(&mut x.data, bias);
        Ok(())
    }

    fn scale_embeddings(
        &self,
        batch: &ForwardBatch,
        x: &mut HostMatrix,
        factor: f32,
    ) -> Result<()> {
        ensure!(
            batch.tokens.len() == x.rows(),
            "embedding rows for another batch"
        );
        let rows = x.data.chunks_exact_mut(x.cols).zip(&batch.tokens);
        for (row, _) in rows.filter(|(_, &id)| virtual_row(id).is_none()) {
            row.iter_mut().for_each(|v| *v *= factor);
        }
        Ok(())
    }

    fn gelu_tanh_mul(&self, gate_up: &HostMatrix) -> Result<HostMatrix> {
        ensure!(
            gate_up.cols.is_multiple_of(2),
            "gate|up width {} is odd",
            gate_up.cols
        );
        let i = gate_up.cols / 2;
        HostMatrix::new(ops::gelu_tanh_mul(&gate_up.data, i), i)
    }

    fn add_assign(&self, x: &mut HostMatrix, y: &HostMatrix) -> Result<()> {
        ensure!(
            x.data.len() == y.data.len(),
            "adding matrices of different sizes"
        );
        ops::add_in_place(&mut x.data, &y.data);
        Ok(())
    }

    fn silu_mul(&self, gate_up: &HostMatrix) -> Result<HostMatrix> {
        ensure!(
            gate_up.cols.is_multiple_of(2),
            "gate|up width {} is odd",
            gate_up.cols
        );
        let i = gate_up.cols / 2;
        HostMatrix::new(ops::silu_mul(&gate_up.data, i), i)
    }

    fn copy_columns(
        &self,
        dst: &mut HostMatrix,
        src: &HostMatrix,
        cols: Range<usize>,
    ) -> Result<()> {
        ensure!(
            dst.cols == src.cols && dst.data.len() == src.data.len() && cols.end <= dst.cols,
            "copying columns {cols:?} between matrices of {} and {} columns",
            dst.cols,
            src.cols
        );
        let n = dst.cols;
        for (d, s) in dst.data.chunks_exact_mut(n).zip(src.data.chunks_exact(n)) {
            d[cols.clone()].copy_from_slice(&s[cols.clone()]);
        }
        Ok(())
    }

    fn split_columns(&self, x: &HostMatrix, widths: &[usize]) -> Result<Vec<HostMatrix>> {
        ensure!(
            widths.iter().sum::<usize>() == x.cols,
            "column widths {widths:?} do not add up to {}",
            x.cols
        );
        let t = x.rows();
        let mut out: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(t * w)).collect();
        for row in x.data.chunks_exact(x.cols) {
            let mut c = 0;
            for (o, &w) in out.iter_mut().zip(widths) {
                o.extend_from_slice(&row[c..c + w]);
                c += w;
            }
        }
        out.into_iter()
            .zip(widths)
            .map(|(data, &w)| HostMatrix::new(data, w))
            .collect()
    }

    fn rope(
        &self,
        _step: &CpuStep,
        batch: &ForwardBatch,
        x: &mut HostMatrix,
        (cos, sin): (&HostMatrix, &HostMatrix),
        heads: usize,
    ) -> Result<()> {
        let positions = &batch.positions;
        let half = cos.cols;
        ensure!(
            x.cols == heads * 2 * half && positions.len() == x.rows(),
            "rope over {} rows of {} columns with {heads} heads of {}",
            x.rows(),
            x.cols,
            2 * half
        );
        if let Some(&p) = positions.iter().max() {
            ensure!(p < cos.rows(), "position {p} is past the rope tables");
        }
        ops::rope_in_place(&mut x.data, &cos.data, &sin.data, half, positions, heads);
        Ok(())
    }

    fn paged_attention(
        &self,
        _step: &CpuStep,
        batch: &ForwardBatch,
        kv: &mut CpuKvStore,
        layer: usize,
        q: &HostMatrix,
        k: &HostMatrix,
        v: &HostMatrix,
        shape: HeadShape,
    ) -> Result<HostMatrix> {
        let out = attention::paged_attention(batch, layer, &q.data, &k.data, &v.data, kv, shape)?;
        HostMatrix::new(out, shape.num_heads * shape.head_dim)
    }

    fn gather_logit_rows(
        &self,
        _step: &CpuStep,
        batch: &ForwardBatch,
        x: &HostMatrix,
    ) -> Result<HostMatrix> {
        let mut out = Vec::with_capacity(batch.logit_rows.len() * x.cols);
        for &r in &batch.logit_rows {
            ensure!(r < x.rows(), "row {r} of {}", x.rows());
            out.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        HostMatrix::new(out, x.cols)
    }

    fn to_host(&self, x: HostMatrix) -> Result<Vec<f32>> {
        Ok(x.data)
    }

    fn run_step<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        // From outside the pool this runs `f` on one of its workers (the caller blocks
        // once); from inside, on the current thread.
        rayon::scope(|_| f())
    }

    fn begin_step(
        &self,
        batch: &ForwardBatch,
        adapters: &[Arc<AdapterWeights>],
    ) -> Result<CpuStep> {
        let lora_batch = if batch.mixtures.is_empty() {
            LoraBatch::new(&batch.slots)
        } else {
            LoraBatch::from_weighted(&batch.mixtures)
        };
        Ok(CpuStep {
            batch: lora_batch,
            adapters: adapters.to_vec(),
            scaled: adapters.iter().any(|a| !a.scales.is_empty()),
            offset: adapters.iter().any(|a| !a.offsets.is_empty()),
        })
    }

    fn write_kv_prefix(&self, kv: &mut CpuKvStore, table: &[u32], prefix: &KvPrefix) -> Result<()> {
        let layers = kv.layout().num_layers;
        for layer in 0..layers {
            let mut k = Vec::with_capacity(prefix.count * prefix.kv_width);
            let mut v = Vec::with_capacity(k.capacity());
            for row in 0..prefix.count {
                let (Some(key), Some(value)) = (prefix.key(row, layer), prefix.value(row, layer))
                else {
                    bail!("virtual token {row} has no prefix at layer {layer}");
                };
                k.extend_from_slice(key);
                v.extend_from_slice(value);
            }
            kv.write_positions(layer, table, &k, &v)
                .with_context(|| format!("prefix of layer {layer}"))?;
        }
        Ok(())
    }

    fn copy_kv_blocks(&self, kv: &mut CpuKvStore, pairs: &[(u32, u32)]) -> Result<()> {
        pairs
            .iter()
            .try_for_each(|&(src, dst)| kv.copy_block(src, dst))
    }

    fn adapter_input(
        &self,
        step: &CpuStep,
        layer: usize,
        parts: &[SitePart],
        x: &HostMatrix,
    ) -> Result<Option<HostMatrix>> {
        // The model asks a stacked layer's parts one at a time.
        let [part] = parts else {
            return Ok(None);
        };
        if !step.scaled || step.batch.is_empty() {
            return Ok(None);
        }
        let scales = step.scales(layer, part.site, |s| matches!(s, SiteScale::Input(_)));
        let scaled = scale_input(step.batch.slots(), &x.data, x.cols, &scales)
            .with_context(|| format!("(IA)³ input at layer {layer} {}", part.site.module_name()))?;
        scaled.map(|data| HostMatrix::new(data, x.cols)).transpose()
    }

    fn lora(
        &self,
        step: &CpuStep,
        layer: usize,
        parts: &[SitePart],
        x: &HostMatrix,
        y: &mut HostMatrix,
    ) -> Result<()> {
        if step.batch.is_empty() {
            return Ok(());
        }
        let y_stride: usize = parts.iter().map(|p| p.out_features).sum();
        if y_stride != y.cols {
            bail!("LoRA parts cover {y_stride} columns of {}", y.cols);
        }
        let mut y_offset = 0;
        for part in parts {
            let shape = SiteShape {
                in_features: x.cols,
                out_features: part.out_features,
                y_stride,
                y_offset,
            };
            let at = || format!("adapters at layer {layer} {}", part.site.module_name());
            let slots: Vec<Option<SlotWeights>> = step
                .adapters
                .iter()
                .map(|a| {
                    let pair = a.layers.get(layer)?[part.site.index()].as_ref()?;
                    Some(SlotWeights {
                        rank: pair.rank,
                        scale: pair.scale,
                        a: pair.a.view(),
                        b: pair.b.view(),
                        rank_scale: pair.rank_scale.as_deref(),
                        out_scale: pair.out_scale.as_deref(),
                    })
                })
                .collect();
            if slots.iter().any(Option::is_some) {
                lora_apply(&step.batch, &x.data, &mut y.data, shape, &slots).with_context(at)?;
            }
            if step.scaled {
                let scales = step.scales(layer, part.site, |s| matches!(s, SiteScale::Output(_)));
                if scales.iter().any(Option::is_some) {
                    let slots = step.batch.slots();
                    scale_output(slots, &mut y.data, shape, &scales).with_context(at)?;
                }
            }
            if step.offset {
                let offsets: Vec<Option<&[f32]>> = step
                    .adapters
                    .iter()
                    .map(|a| a.offset(layer, part.site))
                    .collect();
                if offsets.iter().any(Option::is_some) {
                    let slots = step.batch.slots();
                    add_output_offset(slots, &mut y.data, shape, &offsets).with_context(at)?;
                }
            }
            y_offset += part.out_features;
        }
        Ok(())
    }
}

impl CpuStep {
    /// Each slot's scale values at `site` of `layer` when `side` accepts that scale.
    fn scales(
        &self,
        layer: usize,
        site: LoraSite,
        side: impl Fn(&SiteScale) -> bool,
    ) -> Vec<Option<&[f32]>> {
        self.adapters
            .iter()
            .map(|a| {
                a.scale(layer, site)
                    .filter(|s| side(s))
                    .map(SiteScale::values)
            })
            .collect()
    }
}
