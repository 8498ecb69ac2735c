//! The tensors of a loaded checkpoint, as the model builder reads them: dense tensors
//! (safetensors, norms) through candle's `VarBuilder`, and 2-D GGUF tensors kept as
//! their blocks ([`BlockRows`]) so a backend that computes on blocks gets them as the
//! file holds them, and one that does not dequantizes them itself.
//!
//! Invariant: a name is in at most one of the two stores, and a block tensor is already
//! in the Hugging Face row order (the loader undid llama.cpp's Q/K permutation).
use super::block_rows::BlockRows;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;

/// A linear weight `[out, in]` as the checkpoint holds it, before a backend takes it.
#[derive(Clone, Debug)]
pub enum HostWeight {
    /// Dense values (any float dtype).
    Dense(Tensor),
    /// Quantized blocks, row by row.
    Blocks(BlockRows),
}

impl HostWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(t) => Ok(t.dims2().context("a linear weight must be [out, in]")?),
            Self::Blocks(b) => Ok((b.rows, b.cols)),
        }
    }

    /// The values as a dense host tensor (blocks dequantized to f32).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Blocks(b) => b.dequantize(),
        }
    }

    /// `parts` stacked row-wise: blocks when they are all blocks of one type and width,
    /// else dense values.
    pub fn stack(parts: Vec<HostWeight>) -> Result<HostWeight> {
        if parts.iter().all(|p| matches!(p, Self::Blocks(_))) {
            let blocks: Vec<BlockRows> = parts
                .into_iter()
                .filter_map(|p| match p {
                    Self::Blocks(b) => Some(b),
                    Self::Dense(_) => None,
                })
                .collect();
            if let Some(stacked) = BlockRows::stack(&blocks) {
                return Ok(Self::Blocks(stacked));
            }
            let dense = blocks
                .iter()
                .map(BlockRows::dequantize)
                .collect::<Result<Vec<_>>>()?;
            return Ok(Self::Dense(Tensor::cat(&dense, 0)?));
        }
        let dense = parts
            .iter()
            .map(HostWeight::to_dense)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::Dense(Tensor::cat(&dense, 0)?))
    }
}

/// Every tensor of a checkpoint, by Hugging Face name.
pub struct Checkpoint {
    dense: VarBuilder<'static>,
    blocks: HashMap<String, BlockRows>,
}

impl Checkpoint {
    /// A checkpoint whose tensors are all dense.
    pub fn dense(vb: VarBuilder<'static>) -> Self {
        Self {
            dense: vb,
            blocks: HashMap::new(),
        }
    }

    /// Dense tensors plus block tensors (names not in `vb`).
    pub fn with_blocks(vb: VarBuilder<'static>, blocks: HashMap<String, BlockRows>) -> Self {
        Self { dense: vb, blocks }
    }

    /// Dense host tensors from a map (tests, synthetic models).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Self {
        Self::dense(VarBuilder::from_tensors(
            tensors,
            candle_core::DType::F32,
            &Device::Cpu,
        ))
    }

    /// Tensor `name` of `shape`, dense (blocks dequantized).
    pub fn tensor(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let t = match self.blocks.get(name) {
            Some(b) => b.dequantize()?,
            None => self.dense.get(shape, name)?,
        };
        if t.dims() != shape {
            bail!("{name} is {:?}, expected {shape:?}", t.dims());
        }
        Ok(t)
    }

    /// Linear weight `name` of `(out, in)`, as the checkpoint holds it.
    pub fn linear(&self, (out, inp): (usize, usize), name: &str) -> Result<HostWeight> {
        match self.blocks.get(name) {
            Some(b) if (b.rows, b.cols) == (out, inp) => Ok(HostWeight::Blocks(b.clone())),
            Some(b) => bail!("{name} is {}x{}, expected {out}x{inp}", b.rows, b.cols),
            None => Ok(HostWeight::Dense(self.dense.get((out, inp), name)?)),
        }
    }
}
