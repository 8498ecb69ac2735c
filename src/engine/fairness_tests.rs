//! Tests of fair scheduling: the counters alone, and the scheduler driven step by step
//! in simulated time (a step "runs" by advancing its chunks; no model, no wall clock).
use super::*;
use crate::engine::block_allocator::BlockAllocator;
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{
    admit_all, schedule, Admission, AdmissionGate, SchedulerConfig, DEFAULT_ADAPTER_WAIT_BOUND,
};
use crate::engine::sequence::{EngineRequest, GenerationParams, TenantShare};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const PROMPT: usize = 24;
const GENERATED: usize = 16;
/// Simulated duration of one step.
const STEP: Duration = Duration::from_millis(20);

fn seq(id: u64, tenant: &str, weight: f64, prompt_len: usize) -> Sequence {
    let (tx, _rx) = mpsc::unbounded_channel();
    let req = EngineRequest {
        request_id: format!("r{id}"),
        adapters: Default::default(),
        tenant: TenantShare {
            tenant: Arc::from(tenant),
            weight,
        },
        deadline: None,
        prompt_ids: vec![1; prompt_len],
        params: GenerationParams {
            max_new_tokens: GENERATED,
            sampling: SamplingParams::default(),
            stop: vec![],
            ignore_eos: true,
            logprobs: None,
        },
    };
    Sequence::new(id, req, tx)
}

fn cfg(max_batch_tokens: usize, max_running: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens,
        max_running,
        watermark_blocks: 0,
        adapter_wait_bound: DEFAULT_ADAPTER_WAIT_BOUND,
    }
}

/// An engine without a model: steps are planned by [`schedule`] and then "run" by
/// advancing every planned chunk (a sampled token is appended; a sequence with
/// [`GENERATED`] tokens finishes).
struct Sim {
    cfg: SchedulerConfig,
    kv: BlockAllocator,
    fair: Fairness,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    next_id: u64,
    start: Instant,
    steps: u32,
    /// Weighted tokens served per tenant (prefill 1, decode 2; not divided by shares).
    served: HashMap<String, f64>,
    /// Step at which each tenant first had a sequence admitted.
    first_start: HashMap<String, u32>,
    /// Sequences running as the last step was planned.
    planned_running: usize,
    /// Steps at which some sequence was admitted.
    admitting_steps: Vec<u32>,
}

impl Sim {
    fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            kv: BlockAllocator::new(4096, 4),
            fair: Fairness::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: 1,
            start: Instant::now(),
            steps: 0,
            served: HashMap::new(),
            first_start: HashMap::new(),
            planned_running: 0,
            admitting_steps: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.start + STEP * self.steps
    }

    /// Keeps at least `depth` sequences of `tenant` waiting (a backlogged tenant).
    fn backlog(&mut self, tenant: &str, weight: f64, depth: usize) {
        let queued = self
            .waiting
            .iter()
            .filter(|s| &*s.tenant.tenant == tenant)
            .count();
        for _ in queued..depth {
            self.waiting
                .push_back(seq(self.next_id, tenant, weight, PROMPT));
            self.next_id += 1;
        }
    }

    fn served(&self, tenant: &str) -> f64 {
        self.served.get(tenant).copied().unwrap_or(0.0)
    }

    /// Plans and runs one step; returns the tokens it ran.
    fn step(&mut self, gate: &mut AdmissionGate<'_>) -> usize {
        let now = self.now();
        let before = self.running.len();
        let plan = schedule(
            &self.cfg,
            &mut self.running,
            &mut self.waiting,
            &mut self.kv,
            gate,
            &mut self.fair,
            now,
        );
        assert!(plan.impossible.is_empty() && plan.failed.is_empty());
        self.steps += 1;
        self.planned_running = self.running.len();
        if plan.preempted == 0 && self.running.len() > before {
            self.admitting_steps.push(self.steps);
        }
        let mut done = Vec::new();
        let mut tokens = 0;
        for s in &plan.scheduled {
            let seq = &mut self.running[s.index];
            let tenant = seq.tenant.tenant.to_string();
            let weighted = Fairness::cost(seq, s.len) * seq.tenant.weight;
            *self.served.entry(tenant.clone()).or_insert(0.0) += weighted;
            self.first_start.entry(tenant).or_insert(self.steps);
            tokens += s.len;
            seq.num_computed += s.len;
            if seq.pending() == 0 {
                seq.tokens.push(2);
                if seq.completion_len() >= GENERATED {
                    done.push(s.index);
                }
            }
        }
        for i in done.into_iter().rev() {
            let mut seq = self.running.remove(i);
            self.kv.release(&mut seq.block_table);
        }
        tokens
    }
}

#[test]
fn backlogged_tenants_are_served_in_proportion_to_their_weights() {
    let mut sim = Sim::new(cfg(64, 8));
    for _ in 0..3000 {
        sim.backlog("light", 1.0, 4);
        sim.backlog("heavy", 3.0, 4);
        sim.step(&mut admit_all);
    }
    let ratio = sim.served("heavy") / sim.served("light");
    println!(
        "weighted tokens: heavy {} light {} ratio {ratio:.3}",
        sim.served("heavy"),
        sim.served("light")
    );
    assert!((ratio - 3.0).abs() <= 0.3, "ratio {ratio}");
    // The counters (service over share) stay close.
    let (h, l) = (sim.fair.counter("heavy"), sim.fair.counter("light"));
    let (h, l) = (h.unwrap_or(0.0), l.unwrap_or(0.0));
    assert!((h - l).abs() < 0.02 * h, "counters {h} {l}");
}

#[test]
fn an_idle_tenants_share_goes_to_the_others() {
    let mut sim = Sim::new(cfg(64, 8));
    // The heavy tenant works for a while, then goes idle; the light one stays busy.
    for _ in 0..200 {
        sim.backlog("heavy", 3.0, 4);
        sim.backlog("light", 1.0, 4);
        sim.step(&mut admit_all);
    }
    // Its queued and running sequences finish within the next steps.
    for _ in 0..100 {
        sim.backlog("light", 1.0, 4);
        sim.step(&mut admit_all);
    }
    let (heavy, light) = (sim.served("heavy"), sim.served("light"));
    for _ in 0..1000 {
        sim.backlog("light", 1.0, 4);
        let tokens = sim.step(&mut admit_all);
        // Work conserving: no step leaves both room and queued work unused.
        assert!(
            tokens == sim.cfg.max_batch_tokens || sim.planned_running == sim.cfg.max_running,
            "step {}: {tokens} tokens, {} running",
            sim.steps,
            sim.planned_running
        );
    }
    assert_eq!(sim.served("heavy"), heavy, "the idle tenant got nothing");
    // The light tenant alone gets what one tenant gets from the same engine.
    let mut alone = Sim::new(cfg(64, 8));
    for _ in 0..1300 {
        alone.backlog("light", 1.0, 4);
        alone.step(&mut admit_all);
    }
    let before = alone.served("light");
    for _ in 0..1000 {
        alone.backlog("light", 1.0, 4);
        alone.step(&mut admit_all);
    }
    let got = sim.served("light") - light;
    let alone_got = alone.served("light") - before;
    println!("idle tenant's share: light got {got}, alone {alone_got}");
    assert!((got / alone_got - 1.0).abs() < 0.02, "{got} vs {alone_got}");
}

#[test]
fn a_late_tenant_is_served_promptly_and_does_not_starve_the_early_one() {
    let mut sim = Sim::new(cfg(64, 8));
    for _ in 0..500 {
        sim.backlog("early", 1.0, 4);
        sim.step(&mut admit_all);
    }
    let arrival = sim.steps;
    let early_before = sim.served("early");
    let mut window = (0.0, 0.0);
    for i in 0..1000 {
        sim.backlog("early", 1.0, 4);
        sim.backlog("late", 1.0, 4);
        sim.step(&mut admit_all);
        if i == 99 {
            window = (sim.served("early") - early_before, sim.served("late"));
        }
    }
    let waited = sim.first_start["late"] - arrival;
    let first_admission = sim.admitting_steps.iter().find(|&&s| s > arrival);
    let early = sim.served("early") - early_before;
    let late = sim.served("late");
    println!(
        "late tenant: first start after {waited} steps; first 100 steps early {} late {}; \
         1000 steps early {early} late {late}",
        window.0, window.1
    );
    // Slots free as running sequences finish: the late tenant starts at the first
    // admission after it arrives.
    assert_eq!(first_admission, Some(&sim.first_start["late"]));
    assert!(
        waited <= GENERATED as u32,
        "the late tenant waited {waited} steps"
    );
    // Lifted to the early tenant's counter, it banks no credit: both are served from
    // the start, then alike.
    let first_share = window.0 / (window.0 + window.1);
    assert!(
        first_share > 0.35,
        "early tenant got {first_share} at first"
    );
    let ratio = late / early;
    assert!((ratio - 1.0).abs() <= 0.1, "ratio {ratio}");
}

#[test]
fn a_light_tenant_starts_before_a_heavy_tenants_long_prefills_finish() {
    // Tenant a floods long prompts (400 tokens: 7 steps of 64 each); b sends one short
    // request while they prefill. b is admitted the step it arrives, ahead of a's next
    // chunks; a's prefills keep the rest of the step.
    let mut sim = Sim::new(cfg(64, 8));
    for id in 1..=3 {
        sim.waiting.push_back(seq(id, "a", 1.0, 400));
    }
    sim.next_id = 4;
    sim.step(&mut admit_all);
    sim.step(&mut admit_all);
    sim.waiting.push_back(seq(99, "b", 1.0, 8));
    sim.step(&mut admit_all);
    assert_eq!(
        sim.first_start.get("b"),
        Some(&3),
        "b starts the step it arrives"
    );
    assert!(
        sim.served("a") > 128.0,
        "a's prefills went on in the same steps"
    );
    // One tenant alone: its running prefills go before its own waiting sequences.
    let mut alone = Sim::new(cfg(64, 8));
    alone.waiting.push_back(seq(1, "a", 1.0, 400));
    alone.step(&mut admit_all);
    alone.waiting.push_back(seq(2, "a", 1.0, 8));
    alone.step(&mut admit_all);
    assert_eq!(
        alone.running.len(),
        1,
        "the running prefill took the whole step"
    );
}

#[test]
fn admission_alternates_between_tenants_by_served_tokens() {
    let mut sim = Sim::new(cfg(1000, 4));
    for id in 1..=3 {
        sim.waiting.push_back(seq(id, "a", 1.0, 8));
    }
    for id in 4..=6 {
        sim.waiting.push_back(seq(id, "b", 1.0, 8));
    }
    sim.step(&mut admit_all);
    let ids: Vec<u64> = sim.running.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![1, 4, 2, 5]);
}

#[test]
fn a_sequence_waiting_for_its_adapter_is_passed_only_until_the_age_bound() {
    let mut sim = Sim::new(cfg(1000, 8));
    for id in 1..=3 {
        sim.waiting.push_back(seq(id, "", 1.0, 8));
    }
    sim.next_id = 4;
    let mut gate = |s: &Sequence, _: &mut BlockAllocator, _: usize| {
        if s.id == 1 {
            Admission::Wait
        } else {
            Admission::Start(None)
        }
    };
    // Young: the sequences behind it (adapters active) go ahead.
    sim.step(&mut gate);
    let ids: Vec<u64> = sim.running.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![2, 3]);
    assert_eq!(sim.waiting.len(), 1);
    // Past the bound, no one passes it.
    sim.steps = (DEFAULT_ADAPTER_WAIT_BOUND.as_millis() / STEP.as_millis()) as u32 + 10;
    sim.backlog("", 1.0, 3);
    sim.step(&mut gate);
    assert_eq!(sim.running.len(), 2, "no admission past the old sequence");
    // Once its adapter is ready it starts first.
    sim.step(&mut admit_all);
    assert_eq!(sim.running[2].id, 1);
    assert_eq!(sim.running.len(), 5);
}

#[test]
fn a_tenant_joining_the_queue_is_lifted_to_the_least_served_waiting_tenant() {
    let mut fair = Fairness::new();
    let mut waiting = VecDeque::from(vec![seq(1, "a", 1.0, 100), seq(2, "b", 2.0, 100)]);
    fair.observe_arrivals(&waiting);
    fair.charge(&waiting[0], 100);
    fair.charge(&waiting[1], 60);
    assert_eq!(
        (fair.counter("a"), fair.counter("b")),
        (Some(100.0), Some(30.0))
    );
    // c joins (never seen): lifted to b's counter, the smallest waiting.
    waiting.push_back(seq(3, "c", 1.0, 10));
    fair.observe_arrivals(&waiting);
    assert_eq!(fair.counter("c"), Some(30.0));
    // Everyone leaves; the queue is empty: d starts at the last to leave's counter.
    let all: Vec<Sequence> = waiting.drain(..).collect();
    fair.settle(&waiting, &all);
    waiting.push_back(seq(4, "d", 1.0, 10));
    fair.observe_arrivals(&waiting);
    assert_eq!(fair.counter("d"), Some(100.0));
    // a (kept: running, above the floor) joins again: not lowered.
    fair.charge(&all[0], 10);
    waiting.push_back(seq(5, "a", 1.0, 10));
    fair.observe_arrivals(&waiting);
    assert_eq!(fair.counter("a"), Some(110.0));
}

#[test]
fn idle_tenants_are_forgotten_or_bounded() {
    let mut fair = Fairness::new();
    // One tenant waits throughout, never served: the floor stays at 0.
    let mut waiting = VecDeque::from(vec![seq(0, "stuck", 1.0, 10)]);
    for i in 0..(MAX_IDLE_TENANTS as u64 + 500) {
        waiting.push_back(seq(i + 1, &format!("t{i}"), 1.0, 10));
        fair.observe_arrivals(&waiting);
        let gone = waiting.pop_back().into_iter().collect::<Vec<_>>();
        fair.charge(&gone[0], 10);
        fair.settle(&waiting, &[]);
    }
    assert_eq!(fair.tracked(), MAX_IDLE_TENANTS + 1);
    // Served tenants at or below the floor carry nothing and are dropped.
    let mut fair = Fairness::new();
    let mut waiting = VecDeque::from(vec![seq(1, "x", 1.0, 10)]);
    fair.observe_arrivals(&waiting);
    fair.charge(&waiting[0], 10);
    waiting.clear();
    fair.settle(&waiting, &[]);
    assert_eq!(fair.tracked(), 0, "x left last: its counter is the floor");
    waiting.push_back(seq(2, "y", 1.0, 10));
    fair.observe_arrivals(&waiting);
    assert_eq!(fair.counter("y"), Some(10.0));
}

#[test]
fn shares_are_clamped() {
    let s = seq(1, "t", 0.0, 4);
    assert_eq!(Fairness::cost(&s, 4), 4.0);
    let s = seq(1, "t", f64::NAN, 4);
    assert_eq!(Fairness::cost(&s, 4), 4.0);
    let mut s = seq(1, "t", 2.0, 4);
    s.num_computed = 4;
    s.tokens.push(9);
    assert_eq!(Fairness::cost(&s, 1), DECODE_WEIGHT / 2.0);
}
