//! Chooses the work of one step within a token budget: decode tokens of running
//! sequences first (preempting the newest sequence when KV blocks run out), then
//! prefill chunks of running sequences, then admission of waiting sequences in arrival
//! order. Invariant: every scheduled chunk has KV blocks for all its positions.
use super::kv_cache::KvCache;
use super::sequence::Sequence;
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Tokens (prefill and decode together) in one step.
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Blocks kept free at admission so running sequences can grow.
    pub watermark_blocks: usize,
}

/// One sequence's share of a step: `len` tokens of `running[index]` from `num_computed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub index: usize,
    pub len: usize,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub scheduled: Vec<Scheduled>,
    pub preempted: usize,
}

/// Plans one step, moving sequences between `waiting` and `running` as needed.
pub fn schedule(
    cfg: &SchedulerConfig,
    running: &mut Vec<Sequence>,
    waiting: &mut VecDeque<Sequence>,
    kv: &mut KvCache,
) -> Plan {
    let mut plan = Plan::default();
    let mut budget = cfg.max_batch_tokens;
    schedule_decodes(running, waiting, kv, &mut plan, &mut budget);
    for (index, seq) in running.iter().enumerate() {
        if budget == 0 {
            break;
        }
        if seq.pending() > 1 && !plan.scheduled.iter().any(|s| s.index == index) {
            let len = seq.pending().min(budget);
            plan.scheduled.push(Scheduled { index, len });
            budget -= len;
        }
    }
    admit(cfg, running, waiting, kv, &mut plan, &mut budget);
    plan
}

fn schedule_decodes(
    running: &mut Vec<Sequence>,
    waiting: &mut VecDeque<Sequence>,
    kv: &mut KvCache,
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
            if kv.ensure_capacity(&mut seq.block_table, need) {
                plan.scheduled.push(Scheduled { index: i, len: 1 });
                *budget -= 1;
                i += 1;
                break;
            }
            // Out of blocks: preempt the newest running sequence (possibly this one).
            let victim = running.len() - 1;
            preempt(running, waiting, kv, victim);
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
    kv: &mut KvCache,
    index: usize,
) {
    let mut seq = running.remove(index);
    kv.release(&mut seq.block_table);
    seq.reset_computed();
    tracing::debug!(seq = seq.id, "preempted; will recompute");
    waiting.push_front(seq);
}

fn admit(
    cfg: &SchedulerConfig,
    running: &mut Vec<Sequence>,
    waiting: &mut VecDeque<Sequence>,
    kv: &mut KvCache,
    plan: &mut Plan,
    budget: &mut usize,
) {
    while *budget > 0 && running.len() < cfg.max_running {
        let Some(seq) = waiting.front_mut() else {
            break;
        };
        let need = kv.blocks_for(seq.tokens.len());
        let watermark = if running.is_empty() {
            0
        } else {
            cfg.watermark_blocks
        };
        if need + watermark > kv.num_free_blocks() {
            break;
        }
        let len = seq.tokens.len();
        if !kv.ensure_capacity(&mut seq.block_table, len) {
            break;
        }
        let Some(mut seq) = waiting.pop_front() else {
            break;
        };
        seq.mark_scheduled();
        let chunk = seq.pending().min(*budget);
        *budget -= chunk;
        plan.scheduled.push(Scheduled {
            index: running.len(),
            len: chunk,
        });
        running.push(seq);
    }
}
