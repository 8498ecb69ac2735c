//! Tests of the scheduler: budgets, chunking, preemption, admission order, shared
//! prefixes and sequences larger than the pool.
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

/// One step that admits whatever fits, with fresh fair-sharing state.
fn schedule_open(
    cfg: &SchedulerConfig,
    running: &mut Vec<Sequence>,
    waiting: &mut VecDeque<Sequence>,
    kv: &mut BlockAllocator,
) -> Plan {
    schedule(
        cfg,
        running,
        waiting,
        kv,
        &mut admit_all,
        &mut Fairness::new(),
        Instant::now(),
    )
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
    let plan = schedule_open(&cfg(16), &mut running, &mut waiting, &mut kv);
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
    let plan = schedule_open(&cfg(16), &mut running, &mut waiting, &mut kv);
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
    let plan = schedule_open(&cfg(16), &mut running, &mut waiting, &mut kv);
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
    let plan = schedule_open(&cfg(64), &mut running, &mut waiting, &mut kv);
    // The first (5 blocks) fits; the second (1 block) fits in what is left.
    assert_eq!(plan.scheduled.len(), 2);
    assert_eq!(kv.num_free_blocks(), 0);
    let (late, _r3) = seq(3, 2);
    waiting.push_back(late);
    let plan = schedule_open(&cfg(64), &mut running, &mut waiting, &mut kv);
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
    let plan = schedule_open(&cfg(64), &mut running, &mut waiting, &mut kv);
    // 17 tokens need 5 blocks of 4; the pool has 4. It is taken out, and the
    // request behind it runs.
    assert_eq!(plan.impossible.len(), 1);
    assert_eq!(plan.impossible[0].id, 1);
    assert_eq!(plan.scheduled, vec![Scheduled { index: 0, len: 2 }]);
    assert_eq!(running[0].id, 2);
    assert!(waiting.is_empty());
    assert_eq!(kv.num_free_blocks(), 3);
}
