//! The CPU backend's paged K/V storage: for every layer, one f32 buffer of K and one of V,
//! `[num_blocks * block_size, kv_heads, head_dim]`, addressed through block tables. Which
//! blocks a sequence owns is the engine's business (its block allocator); this type only
//! stores values. Invariant: every buffer holds exactly the layout's slots.
use crate::model::backend::KvLayout;

/// K and V of one layer.
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Paged K/V storage in host memory.
pub struct CpuKvStore {
    layout: KvLayout,
    layers: Vec<LayerKv>,
}

impl CpuKvStore {
    /// Zeroed storage for `layout`.
    pub fn new(layout: KvLayout) -> Self {
        let values = layout.num_blocks * layout.block_size * layout.slot_len();
        let layers = (0..layout.num_layers)
            .map(|_| LayerKv {
                k: vec![0.0; values],
                v: vec![0.0; values],
            })
            .collect();
        Self { layout, layers }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Index of the first value of position `pos`'s slot in a layer's K or V, through
    /// the sequence's block `table`.
    #[inline]
    pub fn slot_offset(&self, table: &[u32], pos: usize) -> usize {
        let bs = self.layout.block_size;
        (table[pos / bs] as usize * bs + pos % bs) * self.layout.slot_len()
    }

    /// Whether every position `0..positions` of `table` addresses a block of this store.
    pub fn covers(&self, table: &[u32], positions: usize) -> bool {
        let blocks = positions.div_ceil(self.layout.block_size);
        blocks <= table.len()
            && table[..blocks]
                .iter()
                .all(|&b| (b as usize) < self.layout.num_blocks)
    }

    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerKv {
        &mut self.layers[layer]
    }
}
