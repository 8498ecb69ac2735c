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
    let prefill_tenants: HashSet<&str> = running
        .iter()
        .filter(|s| s.pending() > 1)
        .map(|s| &*s.tenant.tenant)
        .collect();
    let their_waiting: HashSet<u64> = waiting
        .iter()
        .filter(|s| prefill_tenants.contains(&*s.tenant.tenant))
        .map(|s| s.id)
        .collect();
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
        pass.run(running, waiting, their_waiting);
    }
    schedule_prefills(running, pass.fair, &mut pass.plan, &mut pass.budget);
    pass.below = None;
    pass.run(running, waiting, HashSet::new());
    let plan = pass.plan;
    fair.settle(waiting, running);
    plan
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
mod tests {
    use super::*;
    use crate::engine::sampler::SamplingParams;
    use crate::engine::sequence::{EngineRequest, GenerationParams, SeqEvent};
    use tokio::sync::mpsc;

    fn seq(id: u64, prompt_len: usize) -> (Sequence, mpsc::UnboundedReceiver<SeqEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let req = EngineRequest {
            request_id: format!("r{id}"),
            adapters: Default::default(),
            tenant: Default::default(),
            deadline: None,
            prompt_ids: vec![1; prompt_len],
            params: GenerationParams {
                max_new_tokens: 100,
                sampling: SamplingParams::default(),
                stop: vec![],
                ignore_eos: true,
                logprobs: None,
            },
        };
        (Sequence::new(id, req, tx), rx)
    }

    fn cache(blocks: usize) -> BlockAllocator {
        BlockAllocator::new(blocks, 4)
    }

    fn cfg(max_batch_tokens: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_batch_tokens,
            max_running: 8,
            watermark_blocks: 0,
            adapter_wait_bound: DEFAULT_ADAPTER_WAIT_BOUND,
        }
    }

    /// Makes `s` a decoding sequence: all but its last token computed, blocks held.
    fn decoding(s: &mut Sequence, kv: &mut BlockAllocator) {
        s.num_computed = s.tokens.len() - 1;
        assert_eq!(
            kv.allocate(&mut s.block_table, s.num_computed),
            Allocation::Ok
        );
    }

    #[test]
    fn decode_tokens_come_first_and_prefill_is_chunked_to_the_budget() {
        let mut kv = cache(64);
        let (mut a, _ra) = seq(1, 6);
        decoding(&mut a, &mut kv);
        let (b, _rb) = seq(2, 100);
        let mut running = vec![a];
        let mut waiting = VecDeque::from(vec![b]);
        let plan = schedule(
            &cfg(16),
            &mut running,
            &mut waiting,
            &mut kv,
            &mut admit_all,
            &mut Fairness::new(),
            Instant::now(),
        );
        assert_eq!(
            plan.scheduled,
            vec![
                Scheduled { index: 0, len: 1 },
                Scheduled { index: 1, len: 15 }
            ]
        );
        // The long prompt reserved blocks for all its tokens at admission.
        assert_eq!(running[1].block_table.len(), 25);
        // Next step: the rest of the prompt continues in chunks after the decode.
        running[0].num_computed += 1;
        running[0].tokens.push(7);
        running[1].num_computed += 15;
        let plan = schedule(
            &cfg(16),
            &mut running,
            &mut waiting,
            &mut kv,
            &mut admit_all,
            &mut Fairness::new(),
            Instant::now(),
        );
        assert_eq!(
            plan.scheduled,
            vec![
                Scheduled { index: 0, len: 1 },
                Scheduled { index: 1, len: 15 }
            ]
        );
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_sequence_for_recompute() {
        // Two sequences each exactly filling two blocks; the pool has four.
        let mut kv = cache(4);
        let (mut a, _ra) = seq(1, 9);
        let (mut b, _rb) = seq(2, 9);
        decoding(&mut a, &mut kv);
        decoding(&mut b, &mut kv);
        assert_eq!(kv.num_free_blocks(), 0);
        let mut running = vec![a, b];
        let mut waiting = VecDeque::new();
        let plan = schedule(
            &cfg(16),
            &mut running,
            &mut waiting,
            &mut kv,
            &mut admit_all,
            &mut Fairness::new(),
            Instant::now(),
        );
        // The older sequence decodes; the newer one went back to the queue's front.
        assert_eq!(plan.scheduled, vec![Scheduled { index: 0, len: 1 }]);
        assert_eq!(plan.preempted, 1);
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].id, 1);
        let b = waiting.front().expect("preempted sequence waits");
        assert_eq!((b.id, b.num_computed, b.block_table.len()), (2, 0, 0));
        assert_eq!(running[0].block_table.len(), 3);
    }

    #[test]
    fn admission_is_first_come_first_served_within_free_blocks() {
        let mut kv = cache(6);
        let (big, _r1) = seq(1, 20);
        let (small, _r2) = seq(2, 2);
        let mut running = Vec::new();
        let mut waiting = VecDeque::from(vec![big, small]);
        let plan = schedule(
            &cfg(64),
            &mut running,
            &mut waiting,
            &mut kv,
            &mut admit_all,
            &mut Fairness::new(),
            Instant::now(),
        );
        // The first (5 blocks) fits; the second (1 block) fits in what is left.
        assert_eq!(plan.scheduled.len(), 2);
        assert_eq!(kv.num_free_blocks(), 0);
        let (late, _r3) = seq(3, 2);
        waiting.push_back(late);
        let plan = schedule(
            &cfg(64),
            &mut running,
            &mut waiting,
            &mut kv,
            &mut admit_all,
            &mut Fairness::new(),
            Instant::now(),
        );
        // No blocks: the newcomer waits; running sequences continue their prefill.
        assert_eq!(waiting.len(), 1);
        assert!(plan.scheduled.iter().all(|s| s.index < 2));
    }

    #[test]
    fn a_prefix_is_shared_whole_blocks_and_copied_partial_block() {
        let mut kv = cache(16);
        // A prefix of 6 tokens in blocks of 4: one whole block and one partly filled.
        let held = kv.take(2).unwrap();
        let prefix = SharedPrefix {
            blocks: held.clone(),
            tokens: 6,
        };
        let mut gate =
            |_: &Sequence, _: &mut BlockAllocator, _: usize| Admission::Start(Some(prefix.clone()));
        let mut waiting = VecDeque::new();
        let mut receivers = Vec::new();
        for id in 1..=2 {
            let (mut s, rx) = seq(id, 3);
            s.virtual_len = 6;
            s.tokens.splice(0..0, [0; 6]);
            waiting.push_back(s);
            receivers.push(rx);
        }
        let mut running = Vec::new();
        let plan = schedule(
            &cfg(64),
            &mut running,
            &mut waiting,
            &mut kv,
            &mut gate,
            &mut Fairness::new(),
            Instant::now(),
        );
        // Only the real tokens run; each sequence has its own copy of the second block.
        assert_eq!(
            plan.scheduled,
            vec![
                Scheduled { index: 0, len: 3 },
                Scheduled { index: 1, len: 3 }
            ]
        );
        for (s, &(src, dst)) in running.iter().zip(&plan.copies) {
            assert_eq!(s.num_computed, 6);
            assert_eq!(s.block_table.len(), 3);
            assert_eq!((s.block_table[0], src), (held[0], held[1]));
            assert_eq!(dst, s.block_table[1]);
        }
        assert_eq!(kv.ref_count(held[0]), 3);
        assert_eq!(kv.ref_count(held[1]), 3, "held for the two copies");
        // 2 held + 2 tables x (copy + one more block).
        assert_eq!(kv.num_free_blocks(), 16 - 2 - 4);
        // Preempted, a sequence gives back only its references.
        preempt(&mut running, &mut waiting, &mut kv, 1);
        assert_eq!(kv.ref_count(held[0]), 2);
        assert_eq!(waiting[0].num_computed, 0);
        assert_eq!(kv.num_free_blocks(), 16 - 2 - 2);
    }

    #[test]
    fn a_sequence_larger_than_the_pool_is_handed_back_not_waited_on() {
        let mut kv = cache(4);
        let (huge, _r1) = seq(1, 17);
        let (small, _r2) = seq(2, 2);
        let mut running = Vec::new();
        let mut waiting = VecDeque::from(vec![huge, small]);
        let plan = schedule(
            &cfg(64),
            &mut running,
            &mut waiting,
            &mut kv,
            &mut admit_all,
            &mut Fairness::new(),
            Instant::now(),
        );
        // 17 tokens need 5 blocks of 4; the pool has 4. It is taken out, and the
        // request behind it runs.
        assert_eq!(plan.impossible.len(), 1);
        assert_eq!(plan.impossible[0].id, 1);
        assert_eq!(plan.scheduled, vec![Scheduled { index: 0, len: 2 }]);
        assert_eq!(running[0].id, 2);
        assert!(waiting.is_empty());
        assert_eq!(kv.num_free_blocks(), 3);
    }
}
