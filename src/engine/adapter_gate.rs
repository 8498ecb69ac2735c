//! Admission's adapter side: before a waiting sequence starts, each of its adapter
//! versions is made active in the pool (which may evict idle ones), ready on the backend
//! (a device copy may still be in flight), and, for prefix tuning, its K/V prefix
//! written once into the blocks the pool holds for it. Invariants: a sequence's members
//! are pinned as they activate (ready or not), so neither a later member nor a sequence
//! admitted after it in the step can evict one; a prefix is written before the first
//! sequence that reads it is admitted.
use super::adapter_pool::ActivePool;
use super::block_allocator::BlockAllocator;
use super::scheduler::{Admission, SharedPrefix};
use super::sequence::Sequence;
use crate::model::BaseModel;
use std::collections::HashSet;

/// The engine's pool and model, borrowed for one step's admissions.
pub struct AdapterGate<'a> {
    pub pool: &'a mut ActivePool,
    pub model: &'a mut dyn BaseModel,
    /// Versions no admission may evict: running sequences' and those admitted so far.
    pub pinned: HashSet<u64>,
    /// The step's number (least recently used order).
    pub now: u64,
}

impl AdapterGate<'_> {
    /// Prepares `seq`'s adapters and tries to have `free_blocks` KV blocks free (by
    /// evicting idle adapters); says whether it may start, and from which prefix.
    pub fn admit(
        &mut self,
        seq: &Sequence,
        blocks: &mut BlockAllocator,
        free_blocks: usize,
    ) -> Admission {
        let mut prefix = None;
        for lease in seq.adapters.leases() {
            let key = lease.key();
            if !self
                .pool
                .activate(lease.version(), &self.pinned, blocks, self.now)
            {
                return Admission::Wait;
            }
            // Pinned once active, ready or not: sequences admitted after this one in the
            // step (it may be passed) cannot evict it while its copy is in flight.
            self.pinned.insert(key);
            if !self.model.adapter_ready(lease.weights()) {
                return Admission::Wait;
            }
            if let Some(write) = self.pool.take_prefix_write(key) {
                if let Err(e) = self.model.write_kv_prefix(&write.weights, &write.blocks) {
                    self.pool.discard(key, blocks);
                    return Admission::Fail(format!("writing the adapter's K/V prefix: {e:#}"));
                }
            }
            prefix = prefix.or_else(|| {
                Some(SharedPrefix {
                    blocks: self.pool.prefix(key)?.to_vec(),
                    tokens: seq.virtual_len,
                })
            });
        }
        // Idle adapters give their blocks back before a sequence has to wait.
        self.pool.evict_for_kv(free_blocks, &self.pinned, blocks);
        Admission::Start(prefix)
    }
}
