//! The active adapter pool: the adapter versions a step may read, owned by the engine
//! thread. It shares one memory pool with the KV cache (S-LoRA's unified paging): an
//! active adapter of `b` bytes holds `ceil(b / block_bytes)` KV blocks, so a burst of
//! adapters shrinks KV capacity and KV pressure evicts idle adapters before any
//! sequence is preempted. On the CPU the weights stay where the registry loaded them
//! (host memory is also what the kernels read); on a GPU activation is the copy to the
//! device. Invariants: a version used by a running sequence (`pinned`) is never
//! evicted; the blocks held stay within `budget_blocks`; every held block is off the
//! KV free list and goes back exactly once.
use super::block_allocator::BlockAllocator;
use crate::lora::peft::AdapterWeights;
use crate::lora::registry::AdapterVersion;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

/// Counters and gauges of the active tier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActiveStats {
    pub active: usize,
    pub active_bytes: usize,
    pub budget_bytes: usize,
    pub kv_blocks: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

struct Slot {
    version: Weak<AdapterVersion>,
    bytes: usize,
    blocks: Vec<u32>,
    last_used: u64,
}

pub struct ActivePool {
    budget_blocks: usize,
    block_bytes: usize,
    used_blocks: usize,
    slots: HashMap<u64, Slot>,
    stats: ActiveStats,
    /// Weights of versions removed since the last [`ActivePool::take_evicted`]: the
    /// model drops its device copies of them.
    evicted: Vec<Arc<AdapterWeights>>,
}

impl ActivePool {
    /// A pool that may lend adapters up to `budget_blocks` KV blocks of `block_bytes`.
    pub fn new(budget_blocks: usize, block_bytes: usize) -> Self {
        Self {
            budget_blocks,
            block_bytes: block_bytes.max(1),
            used_blocks: 0,
            slots: HashMap::new(),
            evicted: Vec::new(),
            stats: ActiveStats {
                budget_bytes: budget_blocks * block_bytes,
                ..Default::default()
            },
        }
    }

    pub fn stats(&self) -> ActiveStats {
        ActiveStats {
            active: self.slots.len(),
            active_bytes: self.slots.values().map(|s| s.bytes).sum(),
            kv_blocks: self.used_blocks,
            ..self.stats.clone()
        }
    }

    /// Whether `v` can ever be active (it is not larger than the whole budget).
    /// Whether `versions` (a request's adapters) can be active at once.
    pub fn fits_together(&self, versions: &[&AdapterVersion]) -> bool {
        versions.iter().map(|v| self.blocks_for(v)).sum::<usize>() <= self.budget_blocks
    }

    fn blocks_for(&self, v: &AdapterVersion) -> usize {
        v.bytes().div_ceil(self.block_bytes).max(1)
    }

    /// Drops versions that were freed, unloaded or replaced and are not pinned.
    pub fn purge(&mut self, pinned: &HashSet<u64>, blocks: &mut BlockAllocator) {
        let dead: Vec<u64> = self
            .slots
            .iter()
            .filter(|(key, s)| {
                !pinned.contains(key) && s.version.upgrade().is_none_or(|v| v.is_retired())
            })
            .map(|(key, _)| *key)
            .collect();
        for key in dead {
            self.remove(key, blocks);
        }
    }

    /// Makes `v` active (a hit if it already is), evicting idle versions least recently
    /// used first. False if its blocks cannot be found without touching `pinned`.
    pub fn activate(
        &mut self,
        v: &Arc<AdapterVersion>,
        pinned: &HashSet<u64>,
        blocks: &mut BlockAllocator,
        now: u64,
    ) -> bool {
        if let Some(slot) = self.slots.get_mut(&v.id) {
            slot.last_used = now;
            self.stats.hits += 1;
            return true;
        }
        let need = self.blocks_for(v);
        if need > self.budget_blocks {
            return false;
        }
        while self.used_blocks + need > self.budget_blocks || blocks.num_free_blocks() < need {
            if !self.evict_lru(pinned, blocks) {
                return false;
            }
        }
        let Some(held) = blocks.take(need) else {
            return false;
        };
        self.stats.misses += 1;
        self.used_blocks += need;
        self.slots.insert(
            v.id,
            Slot {
                version: Arc::downgrade(v),
                bytes: v.bytes(),
                blocks: held,
                last_used: now,
            },
        );
        v.set_active(true);
        true
    }

    /// The weights of versions that left the pool since the last call.
    pub fn take_evicted(&mut self) -> Vec<Arc<AdapterWeights>> {
        std::mem::take(&mut self.evicted)
    }

    /// Evicts idle versions until the KV cache has `free` free blocks, or none is left.
    pub fn evict_for_kv(
        &mut self,
        free: usize,
        pinned: &HashSet<u64>,
        blocks: &mut BlockAllocator,
    ) {
        while blocks.num_free_blocks() < free && self.evict_lru(pinned, blocks) {}
    }

    fn evict_lru(&mut self, pinned: &HashSet<u64>, blocks: &mut BlockAllocator) -> bool {
        let victim = self
            .slots
            .iter()
            .filter(|(key, _)| !pinned.contains(key))
            .min_by_key(|(_, s)| s.last_used)
            .map(|(key, _)| *key);
        match victim {
            Some(key) => {
                self.remove(key, blocks);
                self.stats.evictions += 1;
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, key: u64, blocks: &mut BlockAllocator) {
        if let Some(mut slot) = self.slots.remove(&key) {
            self.used_blocks -= slot.blocks.len();
            blocks.release(&mut slot.blocks);
            if let Some(v) = slot.version.upgrade() {
                v.set_active(false);
                self.evicted.push(v.weights.clone());
            }
        }
    }
}
