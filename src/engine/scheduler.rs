//! Chooses the work of one step within a token budget: decode tokens of running
//! sequences first (preempting the newest sequence when KV blocks run out), then
//! prefill chunks of running sequences, then admission of waiting sequences in fair
//! order ([`Fairness`]: the oldest of the tenant served least, by weighted tokens; one
//! tenant alone is first come first served). Every planned chunk is charged to its
//! tenant as it is planned. A sequence whose adapter cannot be made active yet (the
//! gate says wait) lets the sequences behind it try, until it has waited
//! [`SchedulerConfig::adapter_wait_bound`] since it arrived: then admission stops at it
//! until it can start, so it cannot be passed for ever. One that the gate admits but
//! whose blocks are not free stops admission too (as in arrival order): small prompts
//! do not pass a large one for ever. Preemption still takes the
//! newest running sequence whatever its tenant (a preempted sequence goes back to the
//! queue and is readmitted in fair order).
//! A sequence whose adapter holds a K/V prefix (prefix tuning) starts from it:
//! its table begins with shared references to the prefix's whole blocks and its own copy
//! of a partly filled last one (in [`Plan::copies`]), and only its real tokens run.
//! Invariant: every scheduled chunk has KV blocks for all its positions, and writes only
//! blocks no one else holds; a sequence that could never get its blocks (more than the
//! whole pool) is taken out and handed back in [`Plan::impossible`] rather than holding
//! up the others.
use super::block_allocator::{Allocation, BlockAllocator};
use super::fairness::Fairness;
use super::sequence::Sequence;
use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long a sequence waiting for its adapter may be passed by later ones, by default.
pub const DEFAULT_ADAPTER_WAIT_BOUND: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Tokens (prefill and decode together) in one step.
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Blocks kept free at admission so running sequences can grow.
    pub watermark_blocks: usize,
    /// A sequence whose adapter cannot be made active yet lets later ones start until
    /// it is this old (since it arrived); then no one passes it.
    pub adapter_wait_bound: Duration,
}

/// One sequence's share of a step: `len` tokens of `running[index]` from `num_computed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub index: usize,
    pub len: usize,
}

#[derive(Default)]
pub struct Plan {
    pub scheduled: Vec<Scheduled>,
    pub preempted: usize,
    /// Sequences that need more KV blocks than the pool has (to be failed).
    pub impossible: Vec<Sequence>,
    /// Sequences the admission gate failed, with why.
    pub failed: Vec<(Sequence, String)>,
    /// Blocks to copy (`src`, `dst`) before the step runs: a shared prefix's partly
    /// filled last block into a sequence's own block.
    pub copies: Vec<(u32, u32)>,
    /// References to the copies' sources, held until they are copied (then released).
    pub copy_sources: Vec<u32>,
}

/// K/V a sequence starts from: its adapter's prefix (prefix tuning) in blocks the
/// active pool holds, filling positions `0..tokens`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedPrefix {
    pub blocks: Vec<u32>,
    pub tokens: usize,
}

/// What the admission gate says of a waiting sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Keep it, and everyone behind it, waiting.
    Wait,
    /// It may start, from a shared prefix if its adapter has one.
    Start(Option<SharedPrefix>),
    /// It cannot run (its adapter could not be prepared): hand it back with this message.
    Fail(String),
}

/// Prepares a waiting sequence to start: makes its adapter active (which may take KV
/// blocks) and tries to have the given number of KV blocks free (by evicting idle
/// adapters).
pub type AdmissionGate<'a> = dyn FnMut(&Sequence, &mut BlockAllocator, usize) -> Admission + 'a;

/// Admits everyone (no adapters to activate).
pub fn admit_all(_: &Sequence, _: &mut BlockAllocator, _: usize) -> Admission {
    Admission::Start(None)
}

/// Plans one step at time `now`, moving sequences between `waiting` and `running` as
/// needed and charging what it plans to the tenants in `fair`.
pub fn schedule(
    cfg: &SchedulerConfig,
    running: &mut Vec<Sequence>,
    waiting: &mut VecDeque<Sequence>,
    blocks: &mut BlockAllocator,
    gate: &mut AdmissionGate<'_>,
    fair: &mut Fairness,
    now: Instant,
) -> Plan {
    fair.observe_arrivals(waiting);
    let mut plan = Plan::default();
    let mut budget = cfg.max_batch_tokens;
    schedule_decodes(running, waiting, blocks, fair, &mut plan, &mut budget);
    // Waiting tenants with no prefill under way, served no more than every tenant
    // with one, are admitted before those prefills' next chunks, so a flood of long
    // prompts does not hold a light tenant's first token back for the length of its
    // prefills. (One tenant alone: its prefills go first, as they always did.)
    let prefilling = running
        .iter()
        .filter(|s| s.pending() > 1)
        .map(|s| fair.counter_of(s))
        .min_by(f64::total_cmp);
    let mut pass = Admit {
        cfg,
        blocks,
        gate,
        fair,
        now,
        plan,
        budget,
        below: prefilling,
    };
    if prefilling.is_some() {
        let theirs = waiting_of_prefilling_tenants(running, waiting);
        pass.run(running, waiting, theirs);
    }
    schedule_prefills(running, pass.fair, &mut pass.plan, &mut pass.budget);
    pass.below = None;
    pass.run(running, waiting, HashSet::new());
    let plan = pass.plan;
    fair.settle(waiting, running);
    plan
}

/// Ids of the waiting sequences whose tenant has a prefill under way.
fn waiting_of_prefilling_tenants(
    running: &[Sequence],
    waiting: &VecDeque<Sequence>,
) -> HashSet<u64> {
    let tenants: HashSet<&str> = running
        .iter()
        .filter(|s| s.pending() > 1)
        .map(|s| &*s.tenant.tenant)
        .collect();
    waiting
        .iter()
        .filter(|s| tenants.contains(&*s.tenant.tenant))
        .map(|s| s.id)
        .collect()
}

/// Plans the next prefill chunk of each running sequence not yet in the plan, in order,
/// within the budget.
fn schedule_prefills(
    running: &[Sequence],
    fair: &mut Fairness,
    plan: &mut Plan,
    budget: &mut usize,
) {
    for (index, seq) in running.iter().enumerate() {
        if *budget == 0 {
            break;
        }
        if seq.pending() > 1 && !plan.scheduled.iter().any(|s| s.index == index) {
            let len = seq.pending().min(*budget);
            fair.charge(seq, len);
            plan.scheduled.push(Scheduled { index, len });
            *budget -= len;
        }
    }
}

fn schedule_decodes(
    running: &mut Vec<Sequence>,
    waiting: &mut VecDeque<Sequence>,
    blocks: &mut BlockAllocator,
    fair: &mut Fairness,
    plan: &mut Plan,
    budget: &mut usize,
) {
    let mut i = 0;
    while i < running.len() && *budget > 0 {
        if running[i].pending() != 1 {
            i += 1;
            continue;
        }
        let need = running[i].num_computed + 1;
        loop {
            let seq = &mut running[i];
            match blocks.allocate(&mut seq.block_table, need) {
                Allocation::Ok => {
                    fair.charge(seq, 1);
                    plan.scheduled.push(Scheduled { index: i, len: 1 });
                    *budget -= 1;
                    i += 1;
                    break;
                }
                Allocation::Impossible => {
                    let mut seq = running.remove(i);
                    blocks.release(&mut seq.block_table);
                    plan.impossible.push(seq);
                    break;
                }
                Allocation::Later => {}
            }
            // Out of blocks: preempt the newest running sequence (possibly this one).
            let victim = running.len() - 1;
            preempt(running, waiting, blocks, victim);
            plan.preempted += 1;
            if victim == i {
                break;
            }
        }
    }
}

fn preempt(
    running: &mut Vec<Sequence>,
    waiting: &mut VecDeque<Sequence>,
    blocks: &mut BlockAllocator,
    index: usize,
) {
    let mut seq = running.remove(index);
    blocks.release(&mut seq.block_table);
    seq.reset_computed();
    tracing::debug!(seq = seq.id, "preempted; will recompute");
    waiting.push_front(seq);
}

/// What trying one waiting sequence came to.
enum Tried {
    /// It started, or was taken out (impossible, or failed by the gate).
    Done,
    /// Its adapter cannot be made active yet; later sequences may go ahead of it.
    Passed(u64),
    /// Admission stops for this step.
    Stop,
}

/// One step's admission pass, after the running sequences' work is planned.
struct Admit<'s, 'g> {
    cfg: &'s SchedulerConfig,
    blocks: &'s mut BlockAllocator,
    gate: &'s mut AdmissionGate<'g>,
    fair: &'s mut Fairness,
    now: Instant,
    plan: Plan,
    budget: usize,
    /// Admit only tenants whose counter is at most this (None: any).
    below: Option<f64>,
}

impl Admit<'_, '_> {
    /// Admits waiting sequences, except those in `passed`, in fair order while budget,
    /// room and blocks last (and, with `below`, while the next one's tenant is served
    /// no more than that).
    fn run(
        &mut self,
        running: &mut Vec<Sequence>,
        waiting: &mut VecDeque<Sequence>,
        mut passed: HashSet<u64>,
    ) {
        while self.budget > 0 && running.len() < self.cfg.max_running {
            let Some(i) = self.fair.pick(waiting, &passed) else {
                break;
            };
            if self
                .below
                .is_some_and(|cap| self.fair.counter_of(&waiting[i]) > cap)
            {
                break;
            }
            match self.try_start(i, running, waiting) {
                Tried::Done => {}
                Tried::Passed(id) => {
                    passed.insert(id);
                }
                Tried::Stop => break,
            }
        }
    }

    /// Tries to start `waiting[i]`.
    fn try_start(
        &mut self,
        i: usize,
        running: &mut Vec<Sequence>,
        waiting: &mut VecDeque<Sequence>,
    ) -> Tried {
        let (blocks, plan) = (&mut *self.blocks, &mut self.plan);
        let Some(seq) = waiting.get_mut(i) else {
            return Tried::Stop;
        };
        let need = blocks.blocks_for(seq.tokens.len());
        if blocks.can_allocate(need) == Allocation::Impossible {
            plan.impossible.extend(waiting.remove(i));
            return Tried::Done;
        }
        let watermark = if running.is_empty() {
            0
        } else {
            self.cfg.watermark_blocks
        };
        let prefix = match (self.gate)(seq, blocks, need + watermark) {
            Admission::Start(prefix) => prefix,
            Admission::Wait => {
                let age = self.now.saturating_duration_since(seq.arrived());
                return if age < self.cfg.adapter_wait_bound {
                    Tried::Passed(seq.id)
                } else {
                    Tried::Stop
                };
            }
            Admission::Fail(message) => {
                plan.failed.extend(waiting.remove(i).map(|s| (s, message)));
                return Tried::Done;
            }
        };
        let shared = prefix
            .as_ref()
            .map_or(0, |p| p.tokens / blocks.block_size());
        if need - shared + watermark > blocks.num_free_blocks() {
            return Tried::Stop;
        }
        if let Some(prefix) = prefix {
            start_from_prefix(seq, &prefix, blocks, plan);
        }
        let len = seq.tokens.len();
        if blocks.allocate(&mut seq.block_table, len) != Allocation::Ok {
            return Tried::Stop;
        }
        let Some(mut seq) = waiting.remove(i) else {
            return Tried::Stop;
        };
        seq.mark_scheduled();
        let chunk = seq.pending().min(self.budget);
        self.fair.charge(&seq, chunk);
        self.budget -= chunk;
        plan.scheduled.push(Scheduled {
            index: running.len(),
            len: chunk,
        });
        running.push(seq);
        Tried::Done
    }
}

/// Starts `seq`'s table (empty) with `prefix`: shared references to its whole blocks,
/// then its own copy of a partly filled last block; its first `prefix.tokens` positions
/// are then computed. The caller has checked one free block is there for the copy.
fn start_from_prefix(
    seq: &mut Sequence,
    prefix: &SharedPrefix,
    blocks: &mut BlockAllocator,
    plan: &mut Plan,
) {
    let whole = prefix.tokens / blocks.block_size();
    seq.block_table = blocks.share(&prefix.blocks[..whole]);
    if let Some(&partial) = prefix.blocks.get(whole) {
        if blocks.allocate(&mut seq.block_table, prefix.tokens) != Allocation::Ok {
            blocks.release(&mut seq.block_table);
            return;
        }
        plan.copies.push((partial, seq.block_table[whole]));
        plan.copy_sources.extend(blocks.share(&[partial]));
    }
    seq.num_computed = prefix.tokens;
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
