//! The host side of a device step, computed without a device: which decode bucket a
//! batch runs in and the batch padded to it ([`pad_decode`]), the layout and contents of
//! the step's one metadata buffer ([`meta`]), and every launch of our kernels with its
//! grid, shared memory and arguments ([`launch`]). The CUDA backend launches exactly these
//! plans; tests check them on any machine.
//!
//! Invariants:
//! - For one [`StepCapacity`] the metadata layout and every planned launch depend only on
//!   the capacity and the model's shape, never on the batch packed into it: a decode step
//!   padded to its bucket and packed at the bucket's capacity launches the same kernels
//!   with the same grids and arguments (metadata offsets included) as any other batch of
//!   that bucket. That is what lets one captured CUDA graph per bucket replay every such
//!   step, with only the metadata buffer's contents changing.
//! - A padded row is a base-model token (slot -1) at position 0 of its own one-row chunk,
//!   whose block table is the scratch block: it writes K/V only there (a block no sequence
//!   owns) and reads only what it wrote, so real rows' results are those of the unpadded
//!   batch (bit for bit on a batch-invariant backend).
pub mod decode_attention;
pub mod launch;
pub mod meta;
#[cfg(test)]
mod tests;

use super::super::batch::ForwardBatch;
use anyhow::{ensure, Result};

/// The batch sizes a decode step is padded to (vLLM's capture sizes, to 256): one
/// captured graph each.
pub const DECODE_BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256];

/// The smallest bucket holding `rows` decode rows, or None past the largest (such a step
/// runs eagerly).
pub fn decode_bucket(rows: usize) -> Option<usize> {
    DECODE_BUCKETS.iter().copied().find(|&b| b >= rows)
}

/// Whether `batch` is a plain decode step: every chunk one row, every row's logits
/// returned in order, no adapter mixtures. Only such steps are padded to a bucket.
pub fn is_decode_step(batch: &ForwardBatch) -> bool {
    !batch.tokens.is_empty()
        && batch.chunks.iter().all(|c| c.len == 1)
        && batch.chunks.len() == batch.tokens.len()
        && batch.mixtures.is_empty()
        && batch.logit_rows.iter().copied().eq(0..batch.tokens.len())
}

/// `batch` (a decode step, [`is_decode_step`]) with rows appended up to `bucket`: each a
/// base token (id 0) at position 0 of its own chunk, writing its K/V into `scratch_block`,
/// with its logits returned after the real rows'.
pub fn pad_decode(batch: &ForwardBatch, bucket: usize, scratch_block: u32) -> Result<ForwardBatch> {
    ensure!(
        is_decode_step(batch),
        "only a decode step (one row per sequence, every row's logits) is padded"
    );
    ensure!(
        batch.tokens.len() <= bucket,
        "{} rows do not fit a bucket of {bucket}",
        batch.tokens.len()
    );
    let mut padded = batch.clone();
    for _ in batch.tokens.len()..bucket {
        let row = padded.push_chunk(&[0], 0, &[scratch_block]);
        padded.logit_rows.push(row);
    }
    Ok(padded)
}

/// The sizes of the arrays of a step's metadata buffer (and so of its launch grids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepCapacity {
    /// Rows of the step (tokens).
    pub rows: usize,
    /// Sequence chunks.
    pub chunks: usize,
    /// Width of the block-table matrix (blocks of the longest sequence).
    pub max_blocks: usize,
    /// SGMV segment tiles (runs of several tokens of one adapter).
    pub sgmv_segments: usize,
    /// BGMV segments (single tokens).
    pub bgmv_segments: usize,
    /// Entries of the slot table: the step's adapters, then the null adapter padded
    /// segments point at.
    pub slots: usize,
    /// Width of the LoRA intermediate (the largest rank a step may hold).
    pub max_rank: usize,
}

impl StepCapacity {
    /// The capacity of a bucket of `rows` decode rows whose sequences have at most
    /// `max_blocks` blocks and whose adapters have rank at most `max_rank`: every row may
    /// be its own sequence, its own segment and its own adapter.
    pub fn bucket(rows: usize, max_blocks: usize, max_rank: usize) -> Self {
        Self {
            rows,
            chunks: rows,
            max_blocks,
            sgmv_segments: rows / 2,
            bgmv_segments: rows,
            slots: rows + 1,
            max_rank,
        }
    }
}
