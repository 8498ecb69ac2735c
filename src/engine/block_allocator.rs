//! The KV block allocator, owned by the engine's scheduler: which of the pool's
//! `num_blocks` blocks (of `block_size` token slots each) are free, and who holds the
//! rest. The blocks' contents live in the model backend's paged K/V storage; this type
//! only hands out block ids. Besides sequences' block tables, it lends blocks to the
//! active adapter tier (the unified KV/adapter budget) and can share a block read-only
//! between several holders with a reference count (prefix tuning, prefix caching).
//!
//! Invariants: a block is either free (reference count 0, on the free list once) or held
//! (count >= 1, not on the free list); every hold is released exactly once, and a block
//! returns to the free list when its last holder releases it. Allocation is all or
//! nothing.

/// The answer to a request for blocks (as mistral.rs's block engine gives it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Done: the blocks are held.
    Ok,
    /// Not now: fewer blocks are free than needed; nothing changed.
    Later,
    /// Never: more blocks than the whole pool; nothing changed.
    Impossible,
}

/// The block pool's bookkeeping.
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    /// Free block ids; popped from the end, so low ids go first.
    free: Vec<u32>,
    /// Holders of each block.
    refs: Vec<u32>,
}

impl BlockAllocator {
    /// A pool of `num_blocks` free blocks of `block_size` token slots.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Whether `n` more blocks can be had now, later, or never.
    pub fn can_allocate(&self, n: usize) -> Allocation {
        if n > self.num_blocks() {
            Allocation::Impossible
        } else if n > self.free.len() {
            Allocation::Later
        } else {
            Allocation::Ok
        }
    }

    /// Grows `table` so it covers `tokens` positions (all or nothing).
    pub fn allocate(&mut self, table: &mut Vec<u32>, tokens: usize) -> Allocation {
        let blocks = self.blocks_for(tokens);
        if blocks > self.num_blocks() {
            return Allocation::Impossible;
        }
        let need = blocks.saturating_sub(table.len());
        match self.take(need) {
            Some(mut blocks) => {
                table.append(&mut blocks);
                Allocation::Ok
            }
            None => Allocation::Later,
        }
    }

    /// Takes `n` free blocks for one holder (an active adapter's share of the pool);
    /// None (and no change) if fewer are free.
    pub fn take(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let blocks: Vec<u32> = (0..n).filter_map(|_| self.free.pop()).collect();
        for &b in &blocks {
            self.refs[b as usize] = 1;
        }
        Some(blocks)
    }

    /// Adds one holder to each of `blocks` (held already), for a read-only share: the
    /// new holder gets its own copy of the ids and must release them like any others.
    pub fn share(&mut self, blocks: &[u32]) -> Vec<u32> {
        for &b in blocks {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "sharing free block {b}");
            *r += 1;
        }
        blocks.to_vec()
    }

    /// Holders of `block` (0: free).
    pub fn ref_count(&self, block: u32) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// Releases one hold on every block of `table` and empties it; blocks without
    /// holders go back to the free list.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..) {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "releasing free block {b}");
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut c = BlockAllocator::new(3, 4);
        let mut a = Vec::new();
        assert_eq!(c.allocate(&mut a, 9), Allocation::Ok);
        assert_eq!(a, vec![0, 1, 2]);
        let mut b = Vec::new();
        assert_eq!(c.allocate(&mut b, 1), Allocation::Later);
        assert!(b.is_empty());
        assert_eq!(c.allocate(&mut b, 13), Allocation::Impossible);
        assert!(b.is_empty());
        c.release(&mut a);
        assert!(a.is_empty());
        assert_eq!(c.num_free_blocks(), 3);
        assert_eq!(c.allocate(&mut b, 4), Allocation::Ok);
        assert_eq!(b.len(), 1);
        // Growing an existing table takes only the missing blocks.
        assert_eq!(c.allocate(&mut b, 8), Allocation::Ok);
        assert_eq!(b.len(), 2);
        assert_eq!(c.num_free_blocks(), 1);
    }

    #[test]
    fn shared_blocks_return_after_their_last_holder() {
        let mut c = BlockAllocator::new(4, 2);
        let mut prefix = c.take(2).unwrap();
        let mut first = c.share(&prefix);
        let mut second = c.share(&prefix);
        assert_eq!(c.ref_count(prefix[0]), 3);
        assert_eq!(c.num_free_blocks(), 2);
        c.release(&mut prefix);
        c.release(&mut first);
        assert_eq!(c.num_free_blocks(), 2, "still held by one sequence");
        assert_eq!(c.ref_count(second[1]), 1);
        c.release(&mut second);
        assert_eq!(c.num_free_blocks(), 4);
        assert_eq!(c.ref_count(0), 0);
    }

    #[test]
    fn can_allocate_answers_ok_later_impossible() {
        let mut c = BlockAllocator::new(2, 16);
        assert_eq!(c.can_allocate(2), Allocation::Ok);
        let _held = c.take(1).unwrap();
        assert_eq!(c.can_allocate(2), Allocation::Later);
        assert_eq!(c.can_allocate(3), Allocation::Impossible);
        assert!(c.take(2).is_none());
        assert_eq!(c.num_free_blocks(), 1);
    }
}
