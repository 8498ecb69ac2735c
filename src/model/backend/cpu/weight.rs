//! How the CPU backend keeps a linear weight and the token embedding, decided once at
//! load by `--dtype`: dense panels (f32, bf16 or f16; [`super::linear`]) or quantized
//! blocks computed on directly ([`super::quant`]); the embedding is f32 rows, or its
//! blocks in quantized mode (a looked-up row is dequantized).
//!
//! Invariants: in `f32` mode every weight is f32 whatever the file holds (the oracle
//! mode); in `bf16`/`f16` mode every weight is rounded once to that type; in `quantized`
//! mode a GGUF weight of a type the kernels compute on keeps its blocks, a dense weight is
//! quantized once to the chosen type, and anything else (another GGUF type, a width
//! that is not whole blocks) stays dense in f32, logged once per weight.
use super::linear::{PackedWeight, PanelType};
use super::quant::QuantWeight;
use super::HostMatrix;
use crate::model::block_rows::BlockRows;
use crate::model::checkpoint::HostWeight;
use anyhow::{ensure, Result};
use candle_core::quantized::GgmlDType;
use candle_core::DType;
use std::ops::Range;
use std::sync::Arc;

/// What the CPU backend stores its linear weights as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuWeightFormat {
    #[default]
    F32,
    Bf16,
    F16,
    /// GGUF blocks as the file holds them; dense checkpoints quantized to `dense_to`.
    Quantized {
        dense_to: GgmlDType,
    },
}

impl CpuWeightFormat {
    /// For users: "f32", "bf16", "f16", "quantized (dense weights as q8_0)".
    pub fn name(self) -> String {
        match self {
            Self::F32 => "f32".into(),
            Self::Bf16 => "bf16".into(),
            Self::F16 => "f16".into(),
            Self::Quantized { dense_to } => {
                format!("quantized (dense weights as {})", quant_type_name(dense_to))
            }
        }
    }
}

/// `--quant-type` values: the types the quantized kernels compute on.
pub const QUANT_TYPES: [(&str, GgmlDType); 6] = [
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// The lower-case name of a GGUF type ("q4_k"), or its debug name if not in the list.
pub fn quant_type_name(t: GgmlDType) -> String {
    QUANT_TYPES
        .iter()
        .find(|(_, d)| *d == t)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| format!("{t:?}").to_lowercase())
}

/// `w` as blocks for the quantized kernels: the file's blocks, or dense values quantized
/// to `dense_to`; None (with a warning) where the kernels do not take them.
fn quantized(w: &HostWeight, dense_to: GgmlDType) -> Result<Option<QuantWeight>> {
    let (out, inp) = w.dims()?;
    let blocks = match w {
        HostWeight::Blocks(b) => Some(b.clone()),
        HostWeight::Dense(t) if inp.is_multiple_of(dense_to.block_size()) => {
            Some(BlockRows::quantize(t, dense_to)?)
        }
        HostWeight::Dense(_) => None,
    };
    match blocks.as_ref().map(QuantWeight::from_block_rows) {
        Some(Ok(Some(q))) => Ok(Some(q)),
        Some(Err(e)) => Err(e),
        _ => {
            tracing::warn!(
                out,
                inp,
                "a {} weight the quantized kernels do not take stays f32",
                blocks
                    .map(|b| quant_type_name(b.dtype))
                    .unwrap_or_else(|| "dense".into())
            );
            Ok(None)
        }
    }
}

/// The token embedding table on the CPU: f32 rows, or (quantized mode) the blocks, each
/// looked-up row dequantized to the values the quantized kernels see; a tied LM head's
/// blocks are shared, not held twice.
pub enum CpuEmbedding {
    Dense(HostMatrix),
    Quantized(Arc<QuantWeight>),
}

impl CpuEmbedding {
    /// Takes a checkpoint's `[vocab, hidden]` table in `format` (blocks only in quantized
    /// mode; f32 otherwise).
    pub fn from_host(w: &HostWeight, format: CpuWeightFormat) -> Result<Self> {
        if let CpuWeightFormat::Quantized { dense_to } = format {
            if let Some(q) = quantized(w, dense_to)? {
                return Ok(Self::Quantized(Arc::new(q)));
            }
        }
        let (_, cols) = w.dims()?;
        let values = w.to_dense()?.to_dtype(DType::F32)?.flatten_all()?;
        Ok(Self::Dense(HostMatrix::new(
            values.to_vec1::<f32>()?,
            cols,
        )?))
    }

    /// Values per row (the hidden size).
    pub fn cols(&self) -> usize {
        match self {
            Self::Dense(m) => m.cols(),
            Self::Quantized(q) => q.in_features(),
        }
    }

    /// Rows (the vocabulary).
    pub fn rows(&self) -> usize {
        match self {
            Self::Dense(m) => m.rows(),
            Self::Quantized(q) => q.out_features(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(m) => m.data.len() * std::mem::size_of::<f32>(),
            Self::Quantized(q) => q.bytes(),
        }
    }

    /// Appends row `id` (`< rows()`) to `out`.
    pub fn push_row(&self, id: usize, out: &mut Vec<f32>) {
        match self {
            Self::Dense(m) => out.extend_from_slice(&m.data[id * m.cols..(id + 1) * m.cols]),
            Self::Quantized(q) => {
                let start = out.len();
                out.resize(start + q.in_features(), 0.0);
                q.dequantize_row(id, &mut out[start..]);
            }
        }
    }
}

/// A linear weight on the CPU.
pub enum CpuWeight {
    Dense(PackedWeight),
    Quantized(Arc<QuantWeight>),
}

impl CpuWeight {
    /// Takes a checkpoint weight in `format`.
    pub fn from_host(w: &HostWeight, format: CpuWeightFormat) -> Result<Self> {
        let (out, inp) = w.dims()?;
        let dense = |ty: PanelType| -> Result<Self> {
            let values = w.to_dense()?.to_dtype(DType::F32)?.flatten_all()?;
            Ok(Self::Dense(PackedWeight::pack_as(
                &values.to_vec1::<f32>()?,
                out,
                inp,
                ty,
            )))
        };
        match format {
            CpuWeightFormat::F32 => dense(PanelType::F32),
            CpuWeightFormat::Bf16 => dense(PanelType::Bf16),
            CpuWeightFormat::F16 => dense(PanelType::F16),
            CpuWeightFormat::Quantized { dense_to } => match quantized(w, dense_to)? {
                Some(q) => Ok(Self::Quantized(Arc::new(q))),
                None => dense(PanelType::F32),
            },
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            Self::Dense(w) => w.in_features(),
            Self::Quantized(w) => w.in_features(),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Self::Dense(w) => w.out_features(),
            Self::Quantized(w) => w.out_features(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.bytes(),
            Self::Quantized(w) => w.bytes(),
        }
    }

    /// `x: [t, in]` -> `[t, out]`.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        match self {
            Self::Dense(w) => w.matmul(x, t),
            Self::Quantized(w) => w.matmul(x, t),
        }
    }

    /// Rows `rows` (`[rows.len(), in]`) with the values the kernels compute with.
    pub fn rows(&self, rows: Range<usize>) -> Result<Vec<f32>> {
        let (inp, out) = (self.in_features(), self.out_features());
        ensure!(
            rows.start <= rows.end && rows.end <= out,
            "rows {rows:?} of a weight with {out} rows"
        );
        let mut values = vec![0f32; rows.len() * inp];
        for (r, row) in rows.zip(values.chunks_exact_mut(inp)) {
            match self {
                Self::Dense(w) => w.row(r, row),
                Self::Quantized(w) => w.dequantize_row(r, row),
            }
        }
        Ok(values)
    }
}
