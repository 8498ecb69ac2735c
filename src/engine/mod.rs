//! The engine: one thread that owns the model (with its K/V storage), the KV block
//! allocator and every sequence, and runs the continuous-batching step loop. Everything
//! else talks to it through an [`EngineHandle`] over a bounded command channel; failures
//! reach callers as typed [`RequestError`]s on their event streams.
pub mod adapter_gate;
pub mod adapter_pool;
pub mod block_allocator;
pub mod fairness;
mod handle;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod step_phases;
pub mod stop;

use crate::error::RequestError;
use crate::lora::peft::AdapterWeights;
use crate::lora::registry::AdapterVersion;
use crate::model::{BaseModel, ForwardBatch, TextTokenizer};
use adapter_gate::AdapterGate;
use adapter_pool::{ActivePool, ActiveStats};
use anyhow::{bail, Context, Result};
use block_allocator::BlockAllocator;
use fairness::Fairness;
use handle::{AliveGuard, Command};
pub use handle::{EngineHandle, EngineLimits, EngineProgress};
use scheduler::{schedule, Plan, SchedulerConfig, DEFAULT_ADAPTER_WAIT_BOUND};
use sequence::{FinishReason, SeqEvent, Sequence};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use step_phases::{PhaseLog, StepPhases};
use tokio::sync::mpsc;

/// Engine sizing, validated at start-up.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Bytes for the paged KV cache, which active adapters share.
    pub kv_cache_memory: usize,
    /// Most of that pool active adapters may hold (capped at half of it).
    pub adapter_memory: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Tokens per step (decode and prefill chunks together).
    pub max_batch_tokens: usize,
    /// Sequences decoded together at most.
    pub max_running: usize,
    /// Capacity of the command channel.
    pub command_queue: usize,
    /// Adapter versions active at once at most, beside `adapter_memory`.
    pub max_active_adapters: usize,
    /// How long a request waiting for its adapter may be passed by later requests
    /// whose adapters are ready; then admission stops at it until it can start.
    pub adapter_wait_bound: std::time::Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_cache_memory: 1 << 30,
            adapter_memory: 256 << 20,
            block_size: 16,
            max_batch_tokens: 512,
            max_running: 256,
            command_queue: 1024,
            max_active_adapters: 64,
            adapter_wait_bound: DEFAULT_ADAPTER_WAIT_BOUND,
        }
    }
}

/// Counters and gauges the engine publishes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub steps: u64,
    pub running_sequences: usize,
    pub waiting_sequences: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
    pub kv_block_size: usize,
    pub preemptions: u64,
    pub aborted_sequences: u64,
    pub finished_sequences: u64,
    pub generated_tokens: u64,
    pub prompt_tokens: u64,
    /// Sequences whose deadline passed before they started (never ran).
    pub deadline_expired_waiting: u64,
    /// Sequences whose deadline passed while they ran.
    pub deadline_expired_running: u64,
    /// The active adapter tier.
    pub adapters: ActiveStats,
    /// Sequences in the queue per adapter name.
    pub waiting_by_adapter: BTreeMap<String, usize>,
    /// Running sequences per adapter name.
    pub running_by_adapter: BTreeMap<String, usize>,
}

/// Sequences of `seqs` per adapter name (each member of a mixture counts).
fn by_adapter<'a>(seqs: impl IntoIterator<Item = &'a Sequence>) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for seq in seqs {
        for a in seq.adapters.leases() {
            *by.entry(a.version().name.clone()).or_insert(0) += 1;
        }
    }
    by
}

/// Starts the engine thread over `model`, sizing its paged K/V storage from
/// `cfg.kv_cache_memory`. Requests bring their adapter versions (as leases). It stops
/// when every handle is dropped.
pub fn spawn(
    mut model: Box<dyn BaseModel>,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
) -> Result<EngineHandle> {
    let mc = model.config().clone();
    let block_size = cfg.block_size.max(1);
    let block_bytes = block_size * model.kv_bytes_per_token();
    let num_blocks = cfg.kv_cache_memory / block_bytes.max(1);
    if num_blocks == 0 {
        bail!(
            "a KV cache of {} bytes holds no block of {block_size} tokens ({block_bytes} bytes each)",
            cfg.kv_cache_memory
        );
    }
    model.allocate_kv(num_blocks, block_size)?;
    // Active adapters may hold at most half the pool. A request's length is checked
    // against the pool less its own adapter's share, so it can always run alone.
    let adapter_blocks = (cfg.adapter_memory / block_bytes).min(num_blocks / 2);
    let limits = EngineLimits {
        context_length: mc.max_position_embeddings,
        kv_capacity_tokens: num_blocks * block_size,
        vocab_size: mc.vocab_size,
        max_adapter_bytes: adapter_blocks * block_bytes,
        block_size,
        kv_block_bytes: block_bytes,
        mixtures: model.serves_mixtures(),
    };
    let (tx, rx) = mpsc::channel(cfg.command_queue.max(1));
    let alive = Arc::new(AtomicBool::new(true));
    let guard = AliveGuard(alive.clone());
    let progress = Arc::new(EngineProgress::default());
    let beats = progress.clone();
    let sched = SchedulerConfig {
        max_batch_tokens: cfg.max_batch_tokens.max(1),
        max_running: cfg.max_running.clamp(1, cfg.max_batch_tokens.max(1)),
        watermark_blocks: num_blocks / 100,
        adapter_wait_bound: cfg.adapter_wait_bound,
    };
    tracing::info!(
        kv_blocks = num_blocks,
        block_size,
        kv_bytes = num_blocks * block_bytes,
        device = %model.device_name(),
        "engine starting"
    );
    std::thread::Builder::new()
        .name("multilora-engine".into())
        .spawn(move || {
            let _guard = guard;
            let blocks = BlockAllocator::new(num_blocks, block_size);
            let mut engine = Engine::new(model, tokenizer, blocks, sched, rx);
            engine.pool = ActivePool::new(adapter_blocks, block_bytes, block_size)
                .with_max_active(cfg.max_active_adapters);
            engine.run(&beats);
            tracing::info!("engine stopped");
        })
        .context("spawning the engine thread")?;
    Ok(EngineHandle {
        tx,
        alive,
        limits,
        progress,
    })
}

struct Engine {
    /// The base model and its paged K/V storage.
    model: Box<dyn BaseModel>,
    /// The adapter versions steps may read (shares the KV pool).
    pool: ActivePool,
    tokenizer: Arc<TextTokenizer>,
    /// Which KV blocks are free and who holds the rest.
    blocks: BlockAllocator,
    sched: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    /// Tenants' fair-share counters (charged as steps are planned).
    fair: Fairness,
    next_id: AtomicU64,
    stats: EngineStats,
    /// Where steps' time goes (logged every few seconds).
    phases: PhaseLog,
}

impl Engine {
    fn new(
        model: Box<dyn BaseModel>,
        tokenizer: Arc<TextTokenizer>,
        blocks: BlockAllocator,
        sched: SchedulerConfig,
        rx: mpsc::Receiver<Command>,
    ) -> Self {
        let stats = EngineStats {
            kv_blocks_total: blocks.num_blocks(),
            kv_block_size: blocks.block_size(),
            ..Default::default()
        };
        Self {
            model,
            pool: ActivePool::new(0, 1, 1),
            tokenizer,
            blocks,
            sched,
            rx,
            running: Vec::new(),
            waiting: VecDeque::new(),
            fair: Fairness::new(),
            next_id: AtomicU64::new(1),
            stats,
            phases: PhaseLog::default(),
        }
    }

    fn idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The step loop: commands, reaping, a step, a heartbeat; blocks while idle.
    fn run(&mut self, progress: &EngineProgress) {
        loop {
            if self.idle() {
                progress.beat(false);
                match self.rx.blocking_recv() {
                    Some(cmd) => {
                        progress.beat(true);
                        self.handle(cmd);
                    }
                    None => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        if self.running.is_empty() && self.waiting.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.reap_gone();
            self.step();
            progress.beat(!self.idle());
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(req, events) => {
                let versions: Vec<&AdapterVersion> = req
                    .adapters
                    .leases()
                    .map(|l| l.version().as_ref())
                    .collect();
                if !self.pool.fits_together(&versions) {
                    let names: Vec<&str> = versions.iter().map(|v| v.name.as_str()).collect();
                    let pool = self.pool.stats();
                    let _ = events.send(SeqEvent::Error(RequestError::ResourceExhausted(format!(
                        "adapters {names:?} ({} bytes) do not fit the active adapter tier \
                         ({} bytes, {} adapters at once)",
                        req.adapters.bytes(),
                        pool.budget_bytes,
                        pool.max_active
                    ))));
                    return;
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.stats.prompt_tokens += req.prompt_ids.len() as u64;
                self.waiting.push_back(Sequence::new(id, *req, events));
            }
            Command::Stats(reply) => {
                let pinned = self.pinned();
                self.pool.purge(&pinned, &mut self.blocks);
                let _ = reply.send(self.snapshot());
            }
            Command::CancelAll => {
                self.cancel_where(|_| true);
            }
            Command::CancelAdapter(version, reply) => {
                let n = self.cancel_where(|s| s.adapters.uses(version));
                let _ = reply.send(n);
            }
            #[cfg(feature = "test-support")]
            Command::Stall(duration) => std::thread::sleep(duration),
        }
    }

    /// Finishes (reason `Cancelled`) and drops every sequence matching `pred`.
    fn cancel_where(&mut self, pred: impl Fn(&Sequence) -> bool) -> usize {
        let mut cancelled = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if pred(&self.running[i]) {
                cancelled.push(self.running.remove(i));
            } else {
                i += 1;
            }
        }
        let (gone, kept): (Vec<Sequence>, Vec<Sequence>) =
            self.waiting.drain(..).partition(|s| pred(s));
        self.waiting = kept.into();
        cancelled.extend(gone);
        let n = cancelled.len();
        for mut seq in cancelled {
            seq.finish(FinishReason::Cancelled, None);
            self.blocks.release(&mut seq.block_table);
            self.stats.aborted_sequences += 1;
        }
        n
    }

    fn snapshot(&self) -> EngineStats {
        EngineStats {
            running_sequences: self.running.len(),
            waiting_sequences: self.waiting.len(),
            kv_blocks_free: self.blocks.num_free_blocks(),
            adapters: self.pool.stats(),
            waiting_by_adapter: by_adapter(&self.waiting),
            running_by_adapter: by_adapter(&self.running),
            ..self.stats.clone()
        }
    }

    /// Adapter versions of running sequences: never evicted from the active pool.
    fn pinned(&self) -> HashSet<u64> {
        self.running
            .iter()
            .flat_map(|s| s.adapters.leases().map(|a| a.key()))
            .collect()
    }

    /// Aborts sequences whose caller has gone, and fails those whose deadline passed
    /// (DEADLINE_EXCEEDED), freeing their blocks.
    fn reap_gone(&mut self) {
        let now = std::time::Instant::now();
        let blocks = &mut self.blocks;
        let stats = &mut self.stats;
        let mut keep = |seq: &mut Sequence| {
            if seq.is_disconnected() {
                stats.aborted_sequences += 1;
            } else if seq.is_expired(now) {
                let (when, counter) = if seq.has_started() {
                    ("while it ran", &mut stats.deadline_expired_running)
                } else {
                    ("before it started", &mut stats.deadline_expired_waiting)
                };
                *counter += 1;
                stats.aborted_sequences += 1;
                seq.fail(RequestError::DeadlineExceeded(format!(
                    "the request's deadline passed {when} ({} ms after it arrived)",
                    now.saturating_duration_since(seq.arrived()).as_millis()
                )));
            } else {
                return true;
            }
            blocks.release(&mut seq.block_table);
            false
        };
        self.running.retain_mut(&mut keep);
        self.waiting.retain_mut(&mut keep);
    }

    fn step(&mut self) {
        let started = std::time::Instant::now();
        let now = self.stats.steps + 1;
        let pinned = self.pinned();
        self.pool.purge(&pinned, &mut self.blocks);
        // KV before idle adapters: decodes that need a new block get it from idle
        // adapters' share before anything is preempted.
        let decode_blocks = self
            .running
            .iter()
            .filter(|s| {
                s.pending() == 1 && self.blocks.blocks_for(s.num_computed + 1) > s.block_table.len()
            })
            .count();
        self.pool
            .evict_for_kv(decode_blocks, &pinned, &mut self.blocks);
        let mut gate = AdapterGate {
            pool: &mut self.pool,
            model: &mut *self.model,
            pinned,
            now,
        };
        let mut gate = |seq: &Sequence, blocks: &mut BlockAllocator, free: usize| {
            gate.admit(seq, blocks, free)
        };
        let mut plan = schedule(
            &self.sched,
            &mut self.running,
            &mut self.waiting,
            &mut self.blocks,
            &mut gate,
            &mut self.fair,
            std::time::Instant::now(),
        );
        self.stats.preemptions += plan.preempted as u64;
        self.release_evicted();
        self.fail_unadmitted(&mut plan);
        if let Err(e) = self.copy_blocks(&mut plan) {
            self.fail_step(&plan, &format!("{e:#}"));
            return;
        }
        if plan.scheduled.is_empty() {
            return;
        }
        self.stats.steps += 1;
        let (batch, sampled, adapters) = self.build_batch(&plan);
        let planned = started.elapsed();
        match self.model.forward(&batch, &adapters) {
            Ok(logits) => {
                let sampling = std::time::Instant::now();
                self.finish_step(&plan, &sampled, &logits);
                self.phases.record(StepPhases {
                    plan: planned,
                    model: self.model.last_phases().unwrap_or_default(),
                    sample: sampling.elapsed(),
                    rows: batch.tokens.len(),
                });
            }
            Err(e) => self.fail_step(&plan, &format!("{e:#}")),
        }
    }

    /// Fails the sequences the plan took out: too long for the pool, or whose adapter
    /// could not be prepared.
    fn fail_unadmitted(&mut self, plan: &mut Plan) {
        for mut seq in plan.impossible.drain(..) {
            seq.fail(RequestError::ResourceExhausted(format!(
                "{} tokens need more KV blocks than the cache has ({} blocks of {} tokens)",
                seq.tokens.len(),
                self.blocks.num_blocks(),
                self.blocks.block_size()
            )));
            self.stats.aborted_sequences += 1;
        }
        for (mut seq, message) in plan.failed.drain(..) {
            seq.fail(RequestError::Internal(message));
            self.stats.aborted_sequences += 1;
        }
    }

    /// Makes the plan's block copies (a shared prefix's partly filled block into a
    /// sequence's own) before the step reads them, then releases their sources.
    fn copy_blocks(&mut self, plan: &mut Plan) -> Result<()> {
        if plan.copies.is_empty() {
            return Ok(());
        }
        let copied = self.model.copy_kv_blocks(&plan.copies);
        self.blocks.release(&mut plan.copy_sources);
        plan.copies.clear();
        copied.context("copying the partly filled block of a shared prefix")
    }

    /// Lets the model drop its copies (device memory) of adapters the pool evicted.
    fn release_evicted(&mut self) {
        for weights in self.pool.take_evicted() {
            self.model.release_adapter(&weights);
        }
    }

    /// The ragged batch of a plan, for each scheduled entry whether it samples, and the
    /// step's adapter table (slot `i` is `adapters[i]`, one per version in the batch).
    /// Slots follow the versions' ids, so a mixture token adds its members' deltas in
    /// one order whatever else is in the batch (its result stays batch-invariant).
    fn build_batch(&self, plan: &Plan) -> (ForwardBatch, Vec<bool>, Vec<Arc<AdapterWeights>>) {
        let mut batch = ForwardBatch::default();
        let mut sampled = Vec::with_capacity(plan.scheduled.len());
        let mut versions: BTreeMap<u64, Arc<AdapterWeights>> = BTreeMap::new();
        for s in &plan.scheduled {
            for lease in self.running[s.index].adapters.leases() {
                versions.insert(lease.key(), lease.weights().clone());
            }
        }
        let slots: HashMap<u64, u32> = versions
            .keys()
            .enumerate()
            .map(|(slot, &key)| (key, slot as u32))
            .collect();
        let adapters: Vec<Arc<AdapterWeights>> = versions.into_values().collect();
        for s in &plan.scheduled {
            let seq = &self.running[s.index];
            let from = seq.num_computed;
            let entries: Vec<(u32, f32)> = seq
                .adapters
                .entries()
                .iter()
                .map(|(lease, weight)| (slots[&lease.key()], *weight))
                .collect();
            let tokens = &seq.tokens[from..from + s.len];
            let last = if seq.adapters.is_mixture() {
                batch.push_mixture_chunk(tokens, from, &seq.block_table, &entries)
            } else {
                let slot = entries.first().map_or(-1, |&(s, _)| s as i32);
                batch.push_adapter_chunk(tokens, from, &seq.block_table, slot)
            };
            let samples = from + s.len == seq.tokens.len();
            if samples {
                batch.logit_rows.push(last);
            }
            sampled.push(samples);
        }
        (batch, sampled, adapters)
    }

    fn finish_step(&mut self, plan: &Plan, sampled: &[bool], logits: &[f32]) {
        let vocab = self.model.config().vocab_size;
        let limit = self.model.config().max_position_embeddings;
        let mut row = 0;
        let mut done = Vec::new();
        for (s, &samples) in plan.scheduled.iter().zip(sampled) {
            let seq = &mut self.running[s.index];
            seq.num_computed += s.len;
            if !samples {
                continue;
            }
            let l = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            self.stats.generated_tokens += 1;
            if seq.accept_logits(&self.tokenizer, l, limit).is_some() {
                done.push(s.index);
            }
        }
        self.remove(done, |stats| stats.finished_sequences += 1);
    }

    fn fail_step(&mut self, plan: &Plan, message: &str) {
        tracing::error!(error = message, "model step failed; failing its sequences");
        let indices: Vec<usize> = plan.scheduled.iter().map(|s| s.index).collect();
        for &i in &indices {
            self.running[i].fail(RequestError::Internal(format!(
                "model step failed: {message}"
            )));
        }
        self.remove(indices, |stats| stats.aborted_sequences += 1);
    }

    /// Removes running sequences by index, freeing their blocks.
    fn remove(&mut self, mut indices: Vec<usize>, count: impl Fn(&mut EngineStats)) {
        indices.sort_unstable();
        indices.dedup();
        for i in indices.into_iter().rev() {
            let mut seq = self.running.remove(i);
            self.blocks.release(&mut seq.block_table);
            count(&mut self.stats);
        }
    }
}
