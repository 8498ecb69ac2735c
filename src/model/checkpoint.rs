//! The tensors of a loaded checkpoint, as the model builder reads them: dense tensors
//! (safetensors, norms) through candle's `VarBuilder`, and 2-D GGUF tensors kept as
//! their blocks ([`BlockRows`]) so a backend that computes on blocks gets them as the
//! file holds them, and one that does not dequantizes them itself.
//!
//! Invariant: a name is in at most one of the two stores, and a block tensor is already
//! in the Hugging Face row order (the loader undid llama.cpp's Q/K permutation). The
//! checkpoint remembers which of its tensors the model took, so a tensor the model's
//! family does not use is refused by name ([`Checkpoint::refuse_unused`]) instead of
//! silently left out.
use super::block_rows::BlockRows;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

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
    /// Names of the tensors the model has not taken yet.
    untaken: Mutex<BTreeSet<String>>,
}

/// Tensors a checkpoint may hold that no model reads: rotary tables transformers once
/// saved (the model computes its own).
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

impl Checkpoint {
    /// A checkpoint whose tensors are all dense; `names` are every tensor `vb` holds.
    pub fn dense(vb: VarBuilder<'static>, names: impl IntoIterator<Item = String>) -> Self {
        Self::with_blocks(vb, names, HashMap::new())
    }

    /// Dense tensors (`vb`, holding `names`) plus block tensors (names not in `vb`).
    pub fn with_blocks(
        vb: VarBuilder<'static>,
        names: impl IntoIterator<Item = String>,
        blocks: HashMap<String, BlockRows>,
    ) -> Self {
        let untaken = names
            .into_iter()
            .chain(blocks.keys().cloned())
            .filter(|n| !is_ignorable(n))
            .collect();
        Self {
            dense: vb,
            blocks,
            untaken: Mutex::new(untaken),
        }
    }

    /// Dense host tensors from a map (tests, synthetic models).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Self {
        let names: Vec<String> = tensors.keys().cloned().collect();
        let vb = VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu);
        Self::dense(vb, names)
    }

    /// Whether the checkpoint holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.blocks.contains_key(name) || self.dense.contains_tensor(name)
    }

    fn take(&self, name: &str) {
        if let Ok(mut untaken) = self.untaken.lock() {
            untaken.remove(name);
        }
    }

    /// Marks `name` as read without reading it (a tied LM head the model does not use).
    pub fn skip(&self, name: &str) {
        self.take(name);
    }

    /// Fails, naming them, when the model left tensors of the checkpoint unread: the
    /// checkpoint is of a shape its config does not describe (a bias, a norm, a tensor
    /// of another family), and serving it without them would be wrong.
    pub fn refuse_unused(&self, family: &str) -> Result<()> {
        let untaken = self
            .untaken
            .lock()
            .map_err(|_| anyhow::anyhow!("checkpoint bookkeeping poisoned"))?;
        if let Some(first) = untaken.iter().next() {
            let more = untaken.len() - 1;
            let others = if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            };
            bail!(
                "the checkpoint has tensor {first}{others}, which a {family} model with this \
                 config does not use; refusing to serve it without them"
            );
        }
        Ok(())
    }

    /// Tensor `name` of `shape`, dense (blocks dequantized).
    pub fn tensor(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.take(name);
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
        self.take(name);
        match self.blocks.get(name) {
            Some(b) if (b.rows, b.cols) == (out, inp) => Ok(HostWeight::Blocks(b.clone())),
            Some(b) => bail!("{name} is {}x{}, expected {out}x{inp}", b.rows, b.cols),
            None => Ok(HostWeight::Dense(self.dense.get((out, inp), name)?)),
        }
    }
}
