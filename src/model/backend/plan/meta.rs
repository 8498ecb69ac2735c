//! A step's metadata buffer: its layout for a [`StepCapacity`] ([`MetaLayout`]) and its
//! contents for one batch ([`StepMeta::pack`]), as i32 words uploaded in one copy. It
//! holds the positions, each token's K/V cache row, each row's chunk and the chunks'
//! block tables (attention and RoPE), and the LoRA segments (SGMV tiles, then BGMV
//! singles), sorted tokens, their weights and the slot table of adapter descriptor
//! addresses (u64, 8-byte aligned).
//!
//! Invariants: the layout is a function of the capacity alone; every array is filled to
//! its capacity (unused entries zero, unused segments empty and pointing at the null
//! adapter, the slot table's last entry, whose descriptors are all zero, so a kernel block
//! given one returns at once); packing refuses a batch that exceeds the capacity instead of
//! writing past an array.
use super::StepCapacity;
use crate::lora::batch::{LoraBatch, Segment};
use crate::model::batch::ForwardBatch;
use anyhow::{ensure, Context, Result};

/// Tokens per SGMV tile: a segment of several tokens is cut into tiles of at most this
/// many, one thread block each. Must match `SGMV_TILE` in sgmv.cu.
pub const SGMV_TILE: usize = 8;

/// Word offsets of one segment group's arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    pub start: usize,
    pub len: usize,
    pub slot: usize,
    /// Segments the arrays hold (the launch grid).
    pub capacity: usize,
}

/// Word offsets of every array of the metadata buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaLayout {
    pub capacity: StepCapacity,
    pub positions: usize,
    pub kv_slot: usize,
    pub row_chunk: usize,
    pub block_tables: usize,
    pub sgmv: GroupLayout,
    pub bgmv: GroupLayout,
    pub sorted_tokens: usize,
    pub sorted_weights: usize,
    /// u64 entries, at an even word offset.
    pub slot_tables: usize,
    /// Words in the buffer.
    pub words: usize,
}

impl MetaLayout {
    /// The layout of a buffer of `capacity`.
    pub fn new(capacity: StepCapacity) -> Self {
        let c = capacity;
        let mut at = Words(0);
        let positions = at.take(c.rows);
        let kv_slot = at.take(c.rows);
        let row_chunk = at.take(c.rows);
        let block_tables = at.take(c.chunks * c.max_blocks);
        let sgmv = at.group(c.sgmv_segments);
        let bgmv = at.group(c.bgmv_segments);
        // A token appears once per entry: at most once per row without mixtures.
        let sorted_tokens = at.take(c.rows);
        let sorted_weights = at.take(c.rows);
        at.take(at.0 % 2);
        let slot_tables = at.take(2 * c.slots);
        Self {
            capacity,
            positions,
            kv_slot,
            row_chunk,
            block_tables,
            sgmv,
            bgmv,
            sorted_tokens,
            sorted_weights,
            slot_tables,
            words: at.0,
        }
    }
}

/// The next free word offset while laying a buffer out.
struct Words(usize);

impl Words {
    fn take(&mut self, n: usize) -> usize {
        let offset = self.0;
        self.0 += n;
        offset
    }

    fn group(&mut self, n: usize) -> GroupLayout {
        GroupLayout {
            start: self.take(n),
            len: self.take(n),
            slot: self.take(n),
            capacity: n,
        }
    }
}

/// The SGMV tiles (runs of several tokens, cut into `SGMV_TILE`s) and the BGMV singles
/// of a step's segments.
fn split_segments(lora: &LoraBatch) -> (Vec<Segment>, Vec<Segment>) {
    let (long, single): (Vec<Segment>, Vec<Segment>) =
        lora.segments().iter().partition(|s| s.len > 1);
    let tiles = long
        .into_iter()
        .flat_map(|s| s.tiles(SGMV_TILE as u32))
        .collect();
    (tiles, single)
}

impl StepCapacity {
    /// The capacity that holds exactly `batch` (`lora` its token -> adapter map, over
    /// `adapters` slots of rank at most `max_rank`): an eagerly launched step.
    pub fn exact(batch: &ForwardBatch, lora: &LoraBatch, adapters: usize, max_rank: usize) -> Self {
        let (tiles, single) = split_segments(lora);
        Self {
            rows: batch.tokens.len(),
            chunks: batch.chunks.len(),
            max_blocks: batch
                .chunks
                .iter()
                .map(|c| c.block_table.len())
                .max()
                .unwrap_or(0),
            sgmv_segments: tiles.len(),
            bgmv_segments: single.len(),
            slots: adapters + 1,
            max_rank,
        }
    }
}

/// A packed metadata buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMeta {
    pub layout: MetaLayout,
    pub words: Vec<i32>,
}

fn i32_of(v: usize) -> Result<i32> {
    i32::try_from(v).context("step metadata does not fit in i32")
}

impl StepMeta {
    /// Packs `batch` (`lora` is its token -> adapter map) into a buffer of `capacity`.
    /// `block_size` is the K/V store's; `slot_tables[s]` is the device address of slot
    /// s's descriptor table and `null_table` that of the all-zero table.
    pub fn pack(
        batch: &ForwardBatch,
        lora: &LoraBatch,
        block_size: usize,
        capacity: StepCapacity,
        slot_tables: &[u64],
        null_table: u64,
    ) -> Result<Self> {
        let layout = MetaLayout::new(capacity);
        let c = capacity;
        let rows = batch.tokens.len();
        ensure!(
            rows <= c.rows && batch.chunks.len() <= c.chunks && slot_tables.len() < c.slots,
            "a step of {rows} rows, {} chunks and {} adapters exceeds its capacity {c:?}",
            batch.chunks.len(),
            slot_tables.len()
        );
        let mut words = vec![0i32; layout.words];
        for (t, &p) in batch.positions.iter().enumerate() {
            words[layout.positions + t] = i32_of(p)?;
        }
        let mut row = 0;
        for (ci, chunk) in batch.chunks.iter().enumerate() {
            ensure!(
                chunk.block_table.len() <= c.max_blocks,
                "a block table of {} blocks exceeds the capacity of {}",
                chunk.block_table.len(),
                c.max_blocks
            );
            for pos in chunk.context_len..chunk.context_len + chunk.len {
                let block = *chunk
                    .block_table
                    .get(pos / block_size)
                    .with_context(|| format!("position {pos} is past its block table"))?;
                let slot = block as usize * block_size + pos % block_size;
                ensure!(
                    row < rows && row == chunk.start + (pos - chunk.context_len),
                    "chunks do not tile the batch's rows in order"
                );
                words[layout.kv_slot + row] = i32_of(slot)?;
                words[layout.row_chunk + row] = i32_of(ci)?;
                row += 1;
            }
            let table = layout.block_tables + ci * c.max_blocks;
            for (k, &b) in chunk.block_table.iter().enumerate() {
                words[table + k] = i32::try_from(b).context("block id does not fit in i32")?;
            }
        }
        ensure!(row == rows, "chunks do not cover the batch");
        pack_lora(&mut words, &layout, lora, slot_tables, null_table)?;
        Ok(Self { layout, words })
    }
}

/// Segments of more than one token go to the SGMV group (cut into tiles of `SGMV_TILE`),
/// single tokens to BGMV; unused segments are empty and point at the null adapter.
fn pack_lora(
    words: &mut [i32],
    layout: &MetaLayout,
    lora: &LoraBatch,
    slot_tables: &[u64],
    null_table: u64,
) -> Result<()> {
    let (tiles, single) = split_segments(lora);
    let null_slot = i32_of(layout.capacity.slots - 1)?;
    for (group, segs) in [(&layout.sgmv, &tiles), (&layout.bgmv, &single)] {
        ensure!(
            segs.len() <= group.capacity,
            "{} LoRA segments exceed the capacity of {}",
            segs.len(),
            group.capacity
        );
        for i in 0..group.capacity {
            let (start, len, slot) = match segs.get(i) {
                Some(s) => (s.start as i32, s.len as i32, s.slot as i32),
                None => (0, 0, null_slot),
            };
            words[group.start + i] = start;
            words[group.len + i] = len;
            words[group.slot + i] = slot;
        }
    }
    let entries = lora.sorted_tokens().len();
    ensure!(
        entries <= layout.capacity.rows,
        "{entries} adapter entries exceed {} rows",
        layout.capacity.rows
    );
    for (i, (&t, w)) in lora
        .sorted_tokens()
        .iter()
        .zip(lora.sorted_weights())
        .enumerate()
    {
        words[layout.sorted_tokens + i] = t as i32;
        words[layout.sorted_weights + i] = w.to_bits() as i32;
    }
    let mut table: Vec<u64> = slot_tables.to_vec();
    table.resize(layout.capacity.slots, null_table);
    for (i, v) in table.iter().enumerate() {
        let at = layout.slot_tables + 2 * i;
        words[at] = *v as u32 as i32;
        words[at + 1] = (*v >> 32) as u32 as i32;
    }
    Ok(())
}
