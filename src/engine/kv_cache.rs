//! Paged KV cache: a fixed pool of blocks of `block_size` token slots per layer, a free
//! list, and per-sequence block tables owned by the sequences. Invariant: a block is
//! either on the free list or in exactly one sequence's table.
use anyhow::{bail, Result};

/// Shape of the cache: how many blocks and what one token slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCacheShape {
    /// How many blocks fit in `budget_bytes` (f32 K and V for every layer).
    pub fn from_budget(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        budget_bytes: usize,
    ) -> Result<Self> {
        let per_block = 2 * num_layers * num_kv_heads * head_dim * block_size * 4;
        let num_blocks = budget_bytes / per_block.max(1);
        if num_blocks == 0 {
            bail!(
                "--kv-cache-memory {budget_bytes} bytes holds no block of {block_size} tokens \
                 ({per_block} bytes each)"
            );
        }
        Ok(Self {
            num_layers,
            num_kv_heads,
            head_dim,
            block_size,
            num_blocks,
        })
    }

    /// Floats in one token slot of one layer (K or V).
    pub fn slot_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn bytes(&self) -> usize {
        2 * self.num_layers * self.num_blocks * self.block_size * self.slot_len() * 4
    }
}

/// K and V storage for one layer: `[num_blocks * block_size, num_kv_heads, head_dim]`.
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The block pool and its storage.
pub struct KvCache {
    shape: KvCacheShape,
    layers: Vec<LayerKv>,
    free: Vec<u32>,
}

impl KvCache {
    pub fn new(shape: KvCacheShape) -> Self {
        let floats = shape.num_blocks * shape.block_size * shape.slot_len();
        let layers = (0..shape.num_layers)
            .map(|_| LayerKv {
                k: vec![0.0; floats],
                v: vec![0.0; floats],
            })
            .collect();
        // Pop from the end: hand out low block ids first.
        let free = (0..shape.num_blocks as u32).rev().collect();
        Self {
            shape,
            layers,
            free,
        }
    }

    pub fn shape(&self) -> KvCacheShape {
        self.shape
    }

    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.shape.block_size)
    }

    /// Grows `table` so it covers `tokens` positions; false (and no change) if the pool
    /// lacks blocks.
    pub fn ensure_capacity(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop() {
                table.push(b);
            }
        }
        true
    }

    /// Takes `n` blocks off the free list for another use (an active adapter's share of
    /// the pool); None (and no change) if fewer are free.
    pub fn take_blocks(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    /// Bytes one block stands for (K and V of every layer).
    pub fn block_bytes(&self) -> usize {
        self.shape.bytes() / self.shape.num_blocks.max(1)
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }

    /// Index of the first float of token `pos`'s slot in a layer's K or V.
    #[inline]
    pub fn slot_offset(&self, table: &[u32], pos: usize) -> usize {
        let bs = self.shape.block_size;
        (table[pos / bs] as usize * bs + pos % bs) * self.shape.slot_len()
    }

    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerKv {
        &mut self.layers[layer]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvCacheShape {
        KvCacheShape {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 2,
            block_size: 4,
            num_blocks: 3,
        }
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut c = KvCache::new(shape());
        let mut a = Vec::new();
        assert!(c.ensure_capacity(&mut a, 9));
        assert_eq!(a.len(), 3);
        let mut b = Vec::new();
        assert!(!c.ensure_capacity(&mut b, 1));
        assert!(b.is_empty());
        c.release(&mut a);
        assert_eq!(c.num_free_blocks(), 3);
        assert!(c.ensure_capacity(&mut b, 4));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn budget_rounds_down() {
        let s = KvCacheShape::from_budget(2, 1, 2, 4, 2 * 2 * 2 * 4 * 4 * 5 + 7).unwrap();
        assert_eq!(s.num_blocks, 5);
        assert!(KvCacheShape::from_budget(2, 1, 2, 4, 10).is_err());
    }
}
