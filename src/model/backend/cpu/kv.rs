//! The CPU backend's paged K/V storage: for every layer, one buffer of K and one of V,
//! `[num_blocks * block_size, kv_heads, head_dim]`, addressed through block tables, in
//! f32 (the default, exact) or bf16 (`--kv-dtype bf16`: half the memory; values rounded
//! to nearest-even when written, widened exactly when read). Which blocks a sequence
//! owns is the engine's business (its block allocator); this type only stores values,
//! in fresh anonymous memory that becomes resident as blocks are written.
//! Invariant: every buffer holds exactly the layout's slots, all in one element type.
use super::zeroed::{ZeroIsValid, ZeroedBuffer};
use crate::model::backend::KvLayout;
use crate::simd::Widen;
use anyhow::{ensure, Result};
use half::bf16;

/// How the cache stores K and V values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDType {
    #[default]
    F32,
    Bf16,
}

impl KvDType {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

/// A value the cache can hold: written from f32, read back as f32.
pub trait KvValue: Widen + ZeroIsValid {
    fn narrow(v: f32) -> Self;
}

impl KvValue for f32 {
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
}

impl KvValue for bf16 {
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// K and V of one layer, each in its own zeroed mapping (resident as it fills).
pub struct LayerKv<E> {
    pub k: ZeroedBuffer<E>,
    pub v: ZeroedBuffer<E>,
}

impl<E: KvValue> LayerKv<E> {
    /// Stores one token's K and V rows (as f32, narrowed to `E`) at slot offset `off`.
    pub fn write_slot(&mut self, off: usize, k: &[f32], v: &[f32]) {
        for (dst, src) in [(&mut self.k, k), (&mut self.v, v)] {
            for (d, s) in dst[off..off + src.len()].iter_mut().zip(src) {
                *d = E::narrow(*s);
            }
        }
    }
}

/// Every layer's K and V, in one element type.
pub enum KvLayers {
    F32(Vec<LayerKv<f32>>),
    Bf16(Vec<LayerKv<bf16>>),
}

fn zeroed<E: KvValue>(layers: usize, values: usize) -> Result<Vec<LayerKv<E>>> {
    (0..layers)
        .map(|_| {
            Ok(LayerKv {
                k: ZeroedBuffer::new(values)?,
                v: ZeroedBuffer::new(values)?,
            })
        })
        .collect()
}

/// Index of the first value of position `pos`'s slot in a layer's K or V of `layout`,
/// through the sequence's block `table`.
#[inline]
pub fn slot_offset(layout: KvLayout, table: &[u32], pos: usize) -> usize {
    let bs = layout.block_size;
    (table[pos / bs] as usize * bs + pos % bs) * layout.slot_len()
}

fn write_layer<E: KvValue>(
    lkv: &mut LayerKv<E>,
    layout: KvLayout,
    table: &[u32],
    k: &[f32],
    v: &[f32],
) {
    let width = layout.slot_len();
    for (pos, (kr, vr)) in k.chunks_exact(width).zip(v.chunks_exact(width)).enumerate() {
        lkv.write_slot(slot_offset(layout, table, pos), kr, vr);
    }
}

fn copy_in_layers<E: KvValue>(layers: &mut [LayerKv<E>], from: usize, to: usize, len: usize) {
    for lkv in layers {
        lkv.k.copy_within(from..from + len, to);
        lkv.v.copy_within(from..from + len, to);
    }
}

/// Paged K/V storage in host memory.
pub struct CpuKvStore {
    layout: KvLayout,
    layers: KvLayers,
}

impl CpuKvStore {
    /// Zeroed storage for `layout`, holding values as `dtype`; memory becomes resident
    /// as blocks are written.
    pub fn new(layout: KvLayout, dtype: KvDType) -> Result<Self> {
        let values = layout.num_blocks * layout.block_size * layout.slot_len();
        let layers = match dtype {
            KvDType::F32 => KvLayers::F32(zeroed(layout.num_layers, values)?),
            KvDType::Bf16 => KvLayers::Bf16(zeroed(layout.num_layers, values)?),
        };
        Ok(Self { layout, layers })
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn dtype(&self) -> KvDType {
        match self.layers {
            KvLayers::F32(_) => KvDType::F32,
            KvLayers::Bf16(_) => KvDType::Bf16,
        }
    }

    /// Index of the first value of position `pos`'s slot in a layer's K or V, through
    /// the sequence's block `table`.
    #[inline]
    pub fn slot_offset(&self, table: &[u32], pos: usize) -> usize {
        slot_offset(self.layout, table, pos)
    }

    /// Whether every position `0..positions` of `table` addresses a block of this store.
    pub fn covers(&self, table: &[u32], positions: usize) -> bool {
        let blocks = positions.div_ceil(self.layout.block_size);
        blocks <= table.len()
            && table[..blocks]
                .iter()
                .all(|&b| (b as usize) < self.layout.num_blocks)
    }

    /// Writes `layer`'s K and V rows (`[n, slot_len]` each, written as they are: a
    /// prefix's keys are not rotated) at positions `0..n` of `table`.
    pub fn write_positions(
        &mut self,
        layer: usize,
        table: &[u32],
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let width = self.layout.slot_len();
        let n = k.len() / width.max(1);
        ensure!(
            k.len() == n * width && v.len() == k.len() && layer < self.layout.num_layers,
            "{} K and {} V values are not whole rows of layer {layer} of {:?}",
            k.len(),
            v.len(),
            self.layout
        );
        ensure!(
            self.covers(table, n),
            "a block table does not cover positions 0..{n}"
        );
        let layout = self.layout;
        match &mut self.layers {
            KvLayers::F32(layers) => write_layer(&mut layers[layer], layout, table, k, v),
            KvLayers::Bf16(layers) => write_layer(&mut layers[layer], layout, table, k, v),
        }
        Ok(())
    }

    /// Copies every layer's K and V of block `src` into block `dst` (copy on write of a
    /// shared block a sequence goes on filling).
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        let blocks = self.layout.num_blocks;
        ensure!(
            (src as usize) < blocks && (dst as usize) < blocks,
            "copying block {src} to {dst} of {blocks}"
        );
        let len = self.layout.block_size * self.layout.slot_len();
        let (from, to) = (src as usize * len, dst as usize * len);
        match &mut self.layers {
            KvLayers::F32(layers) => copy_in_layers(layers, from, to, len),
            KvLayers::Bf16(layers) => copy_in_layers(layers, from, to, len),
        }
        Ok(())
    }

    pub fn layers(&self) -> &KvLayers {
        &self.layers
    }

    pub fn layers_mut(&mut self) -> &mut KvLayers {
        &mut self.layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_halves_the_bytes_and_rounds_to_nearest() {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 2,
            num_blocks: 3,
        };
        let store = CpuKvStore::new(layout, KvDType::Bf16).unwrap();
        assert_eq!(store.dtype(), KvDType::Bf16);
        let KvLayers::Bf16(layers) = store.layers() else {
            panic!("not bf16")
        };
        assert_eq!((layers.len(), layers[1].k.len()), (2, 24));
        assert_eq!(KvDType::Bf16.size() * 2, KvDType::F32.size());
        // 1 + 2^-8 lies halfway between two bf16 values: to even (1.0); just above: up.
        assert_eq!(bf16::narrow(1.0 + 1.0 / 256.0).widen(), 1.0);
        let up = 1.0 + 1.0 / 256.0 + 1.0 / 1024.0;
        assert_eq!(bf16::narrow(up).widen(), 1.0 + 1.0 / 128.0);
    }
}
