//! One step's metadata on the device, uploaded at the start of the step (before its
//! first kernel, so no copy waits on device work): the token ids and logit rows, and in
//! one packed copy the positions,
//! each token's K/V cache row, each row's chunk and the chunks' block tables (attention
//! and RoPE), and the LoRA segments (SGMV group, then BGMV group), sorted tokens, their
//! weights and the slot table of adapter descriptor addresses. Every layer's kernels read
//! these addresses; nothing of the batch is copied again during the step.
//!
//! Invariant: the step owns the metadata buffer and `Arc`s to the device adapters its
//! slot table points into, so everything its kernels read outlives its launches.
use super::adapters::DeviceAdapter;
use super::kernels::{AttentionMeta, LoraTables, SegmentGroup, SGMV_TILE};
use crate::lora::batch::{LoraBatch, Segment};
use crate::model::batch::ForwardBatch;
use anyhow::{ensure, Context, Result};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// A step as the CUDA kernels read it.
pub struct CudaStep {
    /// The batch's token ids (the embedding rows), u32.
    pub tokens: Tensor,
    /// The rows whose logits the step returns, u32.
    pub logit_rows: Tensor,
    _meta: CudaSlice<i32>,
    adapters: Vec<Arc<DeviceAdapter>>,
    pub attention: AttentionMeta,
    pub lora: Option<StepLora>,
}

impl CudaStep {
    /// Whether any adapter of the step has weights at `site` of `layer`.
    pub fn any_adapter_at(&self, layer: usize, site: usize) -> bool {
        self.adapters.iter().any(|a| a.has_site(layer, site))
    }
}

/// The LoRA part of a step (absent when no token has an adapter).
pub struct StepLora {
    pub sgmv: SegmentGroup,
    pub bgmv: SegmentGroup,
    pub tables: LoraTables,
    /// The largest rank of the step's adapters (h buffer width, rank grid).
    pub max_rank: usize,
}

/// Host-side layout of the metadata buffer: offsets (in i32 words) of each array.
#[derive(Default)]
struct Packer {
    words: Vec<i32>,
}

impl Packer {
    fn push(&mut self, values: impl IntoIterator<Item = i32>) -> usize {
        let at = self.words.len();
        self.words.extend(values);
        at
    }

    /// u64 values at an 8-byte aligned offset, as pairs of little-endian words.
    fn push_u64(&mut self, values: &[u64]) -> usize {
        if self.words.len() % 2 == 1 {
            self.words.push(0);
        }
        self.push(
            values
                .iter()
                .flat_map(|v| [*v as u32 as i32, (*v >> 32) as u32 as i32]),
        )
    }
}

fn i32_of(v: usize) -> Result<i32> {
    i32::try_from(v).context("step metadata does not fit in i32")
}

impl CudaStep {
    /// Builds and uploads the step's metadata. `block_size` is the K/V store's;
    /// `adapters[s]` is slot s's device copy.
    pub fn new(
        device: &Device,
        batch: &ForwardBatch,
        block_size: usize,
        adapters: Vec<Arc<DeviceAdapter>>,
    ) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        let rows: Vec<u32> = batch.logit_rows.iter().map(|&r| r as u32).collect();
        let logit_rows = Tensor::from_vec(rows, batch.logit_rows.len(), device)?;
        let tokens = Tensor::from_slice(&batch.tokens, batch.tokens.len(), device)?;
        let mut p = Packer::default();
        let positions = p.push(batch.positions.iter().map(|&x| x as i32));
        let mut kv_slot = Vec::with_capacity(batch.tokens.len());
        let max_blocks = batch
            .chunks
            .iter()
            .map(|c| c.block_table.len())
            .max()
            .unwrap_or(0);
        // Row c of the tables: chunk c's block table, padded to `max_blocks`.
        let mut tables = vec![0i32; batch.chunks.len() * max_blocks];
        for (c, chunk) in batch.chunks.iter().enumerate() {
            for pos in chunk.context_len..chunk.context_len + chunk.len {
                let block = *chunk
                    .block_table
                    .get(pos / block_size)
                    .with_context(|| format!("position {pos} is past its block table"))?;
                kv_slot.push(i32_of(block as usize * block_size + pos % block_size)?);
            }
            for (dst, &b) in tables[c * max_blocks..].iter_mut().zip(&chunk.block_table) {
                *dst = i32::try_from(b).context("block id does not fit in i32")?;
            }
        }
        ensure!(
            kv_slot.len() == batch.tokens.len(),
            "chunks do not cover the batch"
        );
        let kv_slot = p.push(kv_slot);
        let row_chunk = p.push(batch.row_chunks().into_iter().map(|c| c as i32));
        let block_tables = p.push(tables);
        let lora = LoraBatch::new(&batch.slots);
        let lora_layout = if lora.is_empty() {
            None
        } else {
            Some(pack_lora(&mut p, &lora, &adapters, &stream)?)
        };
        let meta = cuda.clone_htod(&p.words)?;
        let base = meta.device_ptr(&stream).0;
        let at = |offset: usize| base + 4 * offset as u64;
        let attention = AttentionMeta {
            positions: at(positions),
            row_chunk: at(row_chunk),
            block_tables: at(block_tables),
            kv_slot: at(kv_slot),
            max_blocks,
            block_size,
        };
        let lora = lora_layout.map(|l| l.resolve(&at, &adapters));
        Ok(Self {
            tokens,
            logit_rows,
            _meta: meta,
            adapters,
            attention,
            lora,
        })
    }
}

/// Word offsets of the LoRA arrays in the packed buffer.
struct LoraLayout {
    groups: [(usize, usize, usize, usize); 2],
    sorted_tokens: usize,
    sorted_weights: usize,
    slot_tables: usize,
}

impl LoraLayout {
    fn resolve(&self, at: &impl Fn(usize) -> u64, adapters: &[Arc<DeviceAdapter>]) -> StepLora {
        let group = |(count, start, len, slot): (usize, usize, usize, usize)| SegmentGroup {
            count,
            start: at(start),
            len: at(len),
            slot: at(slot),
        };
        StepLora {
            sgmv: group(self.groups[0]),
            bgmv: group(self.groups[1]),
            tables: LoraTables {
                sorted_tokens: at(self.sorted_tokens),
                sorted_weights: at(self.sorted_weights),
                slot_tables: at(self.slot_tables),
            },
            max_rank: adapters.iter().map(|a| a.rank_max).max().unwrap_or(0),
        }
    }
}

/// Segments of more than one token go to the SGMV kernels, single tokens to BGMV. The
/// SGMV kernels give each segment one thread block per rank (shrink) or column (expand)
/// slice, so a long segment (one adapter's decode rows, or a prompt) is cut into tiles
/// of `SGMV_TILE` tokens here: one block per tile, and a step of one adapter fills the
/// device instead of a handful of blocks looping over every token.
fn pack_lora(
    p: &mut Packer,
    lora: &LoraBatch,
    adapters: &[Arc<DeviceAdapter>],
    stream: &CudaStream,
) -> Result<LoraLayout> {
    let (long, single): (Vec<Segment>, Vec<Segment>) =
        lora.segments().iter().partition(|s| s.len > 1);
    let multi: Vec<Segment> = long
        .into_iter()
        .flat_map(|s| s.tiles(SGMV_TILE as u32))
        .collect();
    let mut groups = [(0, 0, 0, 0); 2];
    for (g, segs) in [multi, single].iter().enumerate() {
        let start = p.push(segs.iter().map(|s| s.start as i32));
        let len = p.push(segs.iter().map(|s| s.len as i32));
        let slot = p.push(segs.iter().map(|s| s.slot as i32));
        groups[g] = (segs.len(), start, len, slot);
    }
    let sorted_tokens = p.push(lora.sorted_tokens().iter().map(|&t| t as i32));
    let sorted_weights = p.push(lora.sorted_weights().iter().map(|w| w.to_bits() as i32));
    let table: Vec<u64> = adapters.iter().map(|a| a.descs_ptr(stream)).collect();
    let slot_tables = p.push_u64(&table);
    Ok(LoraLayout {
        groups,
        sorted_tokens,
        sorted_weights,
        slot_tables,
    })
}
