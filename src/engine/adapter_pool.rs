//! The active adapter pool: the adapter versions a step may read, owned by the engine
//! thread. It shares one memory pool with the KV cache (S-LoRA's unified paging): an
//! active adapter of `b` bytes holds `ceil(b / block_bytes)` KV blocks, so a burst of
//! adapters shrinks KV capacity and KV pressure evicts idle adapters before any
//! sequence is preempted. On the CPU the weights stay where the registry loaded them
//! (host memory is also what the kernels read); on a GPU activation is the copy to the
//! device. A prefix-tuning adapter's K/V prefix lives in the first of its blocks,
//! written once when it becomes active ([`ActivePool::take_prefix_write`]) and shared
//! read-only by its sequences, which hold their own references to those blocks.
//! Invariants: a version used by a running sequence (`pinned`) is never evicted; the
//! blocks held stay within `budget_blocks` and the versions within `max_active`; every held block is off the KV free list and
//! goes back exactly once; a prefix is written before any sequence starts from it (the
//! engine writes it as it admits the first), and never into blocks the pool gave back.
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
    /// Versions active at once at most.
    pub max_active: usize,
    pub kv_blocks: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

struct Slot {
    version: Weak<AdapterVersion>,
    bytes: usize,
    blocks: Vec<u32>,
    /// Leading blocks of `blocks` that hold the version's K/V prefix.
    prefix_blocks: usize,
    last_used: u64,
}

/// A prefix to write into the K/V storage before any sequence reads it.
pub struct PrefixWrite {
    pub weights: Arc<AdapterWeights>,
    pub blocks: Vec<u32>,
}

pub struct ActivePool {
    budget_blocks: usize,
    /// Versions active at once at most.
    max_active: usize,
    block_bytes: usize,
    /// Token slots per KV block.
    block_size: usize,
    used_blocks: usize,
    slots: HashMap<u64, Slot>,
    stats: ActiveStats,
    /// Weights of versions removed since the last [`ActivePool::take_evicted`]: the
    /// model drops its device copies of them.
    evicted: Vec<Arc<AdapterWeights>>,
    /// Active versions whose prefix is not written yet.
    unwritten: HashSet<u64>,
}

impl ActivePool {
    /// A pool that may lend adapters up to `budget_blocks` KV blocks of `block_bytes`
    /// (`block_size` token slots each).
    pub fn new(budget_blocks: usize, block_bytes: usize, block_size: usize) -> Self {
        Self {
            budget_blocks,
            max_active: usize::MAX,
            block_bytes: block_bytes.max(1),
            block_size: block_size.max(1),
            used_blocks: 0,
            slots: HashMap::new(),
            evicted: Vec::new(),
            unwritten: HashSet::new(),
            stats: ActiveStats {
                budget_bytes: budget_blocks * block_bytes,
                ..Default::default()
            },
        }
    }

    /// The same pool holding at most `max_active` versions at once (at least 1).
    pub fn with_max_active(mut self, max_active: usize) -> Self {
        self.max_active = max_active.max(1);
        self.stats.max_active = self.max_active;
        self
    }

    pub fn stats(&self) -> ActiveStats {
        ActiveStats {
            active: self.slots.len(),
            active_bytes: self.slots.values().map(|s| s.bytes).sum(),
            kv_blocks: self.used_blocks,
            ..self.stats.clone()
        }
    }

    /// Whether `versions` (a request's adapters) can be active at once.
    pub fn fits_together(&self, versions: &[&AdapterVersion]) -> bool {
        versions.len() <= self.max_active
            && versions.iter().map(|v| self.blocks_for(v).0).sum::<usize>() <= self.budget_blocks
    }

    /// Blocks `v` holds when active, and how many of them its K/V prefix fills: the
    /// prefix's tokens in KV slots, the rest of its bytes in blocks' worth of bytes.
    fn blocks_for(&self, v: &AdapterVersion) -> (usize, usize) {
        let (prefix_blocks, prefix_bytes) = v.weights.prefix.as_ref().map_or((0, 0), |p| {
            let bytes = p.values.len() * std::mem::size_of::<f32>();
            (p.count.div_ceil(self.block_size), bytes)
        });
        let rest = v
            .bytes()
            .saturating_sub(prefix_bytes)
            .div_ceil(self.block_bytes);
        ((prefix_blocks + rest).max(1), prefix_blocks)
    }

    /// The blocks holding active version `key`'s K/V prefix (None: not active, or no
    /// prefix).
    pub fn prefix(&self, key: u64) -> Option<&[u32]> {
        let slot = self.slots.get(&key)?;
        (slot.prefix_blocks > 0).then(|| &slot.blocks[..slot.prefix_blocks])
    }

    /// The prefix to write for version `key` if it became active since it was last
    /// asked for (None: nothing to write).
    pub fn take_prefix_write(&mut self, key: u64) -> Option<PrefixWrite> {
        if !self.unwritten.remove(&key) {
            return None;
        }
        let slot = self.slots.get(&key)?;
        Some(PrefixWrite {
            weights: slot.version.upgrade()?.weights.clone(),
            blocks: slot.blocks[..slot.prefix_blocks].to_vec(),
        })
    }

    /// Takes version `key` out of the pool whatever uses it (its prefix could not be
    /// written); its blocks return once their other holders release them.
    pub fn discard(&mut self, key: u64, blocks: &mut BlockAllocator) {
        self.remove(key, blocks);
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
        let (need, prefix_blocks) = self.blocks_for(v);
        if need > self.budget_blocks {
            return false;
        }
        while self.slots.len() >= self.max_active
            || self.used_blocks + need > self.budget_blocks
            || blocks.num_free_blocks() < need
        {
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
                prefix_blocks,
                last_used: now,
            },
        );
        if prefix_blocks > 0 {
            self.unwritten.insert(v.id);
        }
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
        self.unwritten.remove(&key);
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
