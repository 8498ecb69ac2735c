//! The engine: one thread that owns the model, the KV cache and every sequence, and
//! runs the continuous-batching step loop. Everything else talks to it through an
//! [`EngineHandle`] over a bounded command channel.
pub mod kv_cache;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stop;

use crate::lora::peft::AdapterWeights;
use crate::model::{ForwardBatch, Llama, TextTokenizer};
use anyhow::{Context, Result};
use kv_cache::{KvCache, KvCacheShape};
use scheduler::{schedule, Plan, SchedulerConfig};
use sequence::{EngineRequest, FinishReason, SeqEvent, Sequence};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Engine sizing, validated at start-up.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Bytes for the paged KV cache.
    pub kv_cache_memory: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Tokens per step (decode and prefill chunks together).
    pub max_batch_tokens: usize,
    /// Sequences decoded together at most.
    pub max_running: usize,
    /// Capacity of the command channel.
    pub command_queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_cache_memory: 1 << 30,
            block_size: 16,
            max_batch_tokens: 512,
            max_running: 256,
            command_queue: 1024,
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
}

/// Limits a request must respect, known without asking the engine thread.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    /// Positions the model supports (prompt + generated).
    pub context_length: usize,
    /// Tokens one sequence can hold in the KV cache when it runs alone.
    pub kv_capacity_tokens: usize,
    pub vocab_size: usize,
}

enum Command {
    Add(Box<EngineRequest>, mpsc::UnboundedSender<SeqEvent>),
    Stats(oneshot::Sender<EngineStats>),
    CancelAll,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine has stopped")]
    Stopped,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    alive: Arc<AtomicBool>,
    limits: EngineLimits,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver aborts the sequence within one step.
    pub async fn submit(
        &self,
        req: EngineRequest,
    ) -> Result<mpsc::UnboundedReceiver<SeqEvent>, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Command::Add(Box::new(req), tx))
            .await
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    pub async fn stats(&self) -> Result<EngineStats, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Stats(tx))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Finishes every sequence now with reason `Cancelled` (shutdown drain deadline).
    pub async fn cancel_all(&self) -> Result<(), EngineError> {
        self.tx
            .send(Command::CancelAll)
            .await
            .map_err(|_| EngineError::Stopped)
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }
}

/// Clears the alive flag when the engine thread ends, even by panic.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Starts the engine thread over `model` and the adapters of `adapters` (slot `i` is
/// `adapters[i]`). It stops when every handle is dropped.
pub fn spawn(
    model: Llama,
    tokenizer: Arc<TextTokenizer>,
    adapters: Vec<Arc<AdapterWeights>>,
    cfg: EngineConfig,
) -> Result<EngineHandle> {
    let mc = model.config().clone();
    let shape = KvCacheShape::from_budget(
        mc.num_layers,
        mc.num_kv_heads,
        mc.head_dim,
        cfg.block_size,
        cfg.kv_cache_memory,
    )?;
    let limits = EngineLimits {
        context_length: mc.max_position_embeddings,
        kv_capacity_tokens: shape.num_blocks * shape.block_size,
        vocab_size: mc.vocab_size,
    };
    let (tx, rx) = mpsc::channel(cfg.command_queue.max(1));
    let alive = Arc::new(AtomicBool::new(true));
    let guard = AliveGuard(alive.clone());
    let sched = SchedulerConfig {
        max_batch_tokens: cfg.max_batch_tokens.max(1),
        max_running: cfg.max_running.clamp(1, cfg.max_batch_tokens.max(1)),
        watermark_blocks: shape.num_blocks / 100,
    };
    tracing::info!(
        kv_blocks = shape.num_blocks,
        block_size = shape.block_size,
        kv_bytes = shape.bytes(),
        "engine starting"
    );
    std::thread::Builder::new()
        .name("multilora-engine".into())
        .spawn(move || {
            let _guard = guard;
            let mut engine = Engine::new(model, tokenizer, KvCache::new(shape), sched, rx);
            engine.adapters = adapters;
            engine.run();
            tracing::info!("engine stopped");
        })
        .context("spawning the engine thread")?;
    Ok(EngineHandle { tx, alive, limits })
}

struct Engine {
    model: Llama,
    /// Adapter weights by slot.
    adapters: Vec<Arc<AdapterWeights>>,
    tokenizer: Arc<TextTokenizer>,
    kv: KvCache,
    sched: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    next_id: AtomicU64,
    stats: EngineStats,
}

impl Engine {
    fn new(
        model: Llama,
        tokenizer: Arc<TextTokenizer>,
        kv: KvCache,
        sched: SchedulerConfig,
        rx: mpsc::Receiver<Command>,
    ) -> Self {
        let shape = kv.shape();
        let stats = EngineStats {
            kv_blocks_total: shape.num_blocks,
            kv_block_size: shape.block_size,
            ..Default::default()
        };
        Self {
            model,
            adapters: Vec::new(),
            tokenizer,
            kv,
            sched,
            rx,
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: AtomicU64::new(1),
            stats,
        }
    }

    fn run(&mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
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
            self.reap_disconnected();
            self.step();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(req, events) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.stats.prompt_tokens += req.prompt_ids.len() as u64;
                self.waiting.push_back(Sequence::new(id, *req, events));
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::CancelAll => {
                let mut all: Vec<Sequence> = self.running.drain(..).collect();
                all.extend(self.waiting.drain(..));
                for mut seq in all {
                    seq.finish(FinishReason::Cancelled, None);
                    self.kv.release(&mut seq.block_table);
                    self.stats.aborted_sequences += 1;
                }
            }
        }
    }

    fn snapshot(&self) -> EngineStats {
        EngineStats {
            running_sequences: self.running.len(),
            waiting_sequences: self.waiting.len(),
            kv_blocks_free: self.kv.num_free_blocks(),
            ..self.stats.clone()
        }
    }

    /// Aborts sequences whose caller has gone, freeing their blocks.
    fn reap_disconnected(&mut self) {
        let kv = &mut self.kv;
        let mut aborted = 0;
        let mut keep = |seq: &mut Sequence| {
            if seq.is_disconnected() {
                kv.release(&mut seq.block_table);
                aborted += 1;
                false
            } else {
                true
            }
        };
        self.running.retain_mut(&mut keep);
        self.waiting.retain_mut(&mut keep);
        self.stats.aborted_sequences += aborted;
    }

    fn step(&mut self) {
        let plan = schedule(
            &self.sched,
            &mut self.running,
            &mut self.waiting,
            &mut self.kv,
        );
        self.stats.preemptions += plan.preempted as u64;
        if plan.scheduled.is_empty() {
            return;
        }
        self.stats.steps += 1;
        let (batch, sampled) = self.build_batch(&plan);
        match self
            .model
            .forward_with_adapters(&batch, &mut self.kv, &self.adapters)
        {
            Ok(logits) => self.finish_step(&plan, &sampled, &logits),
            Err(e) => self.fail_step(&plan, &format!("{e:#}")),
        }
    }

    /// The ragged batch of a plan, and for each scheduled entry whether it samples.
    fn build_batch(&self, plan: &Plan) -> (ForwardBatch, Vec<bool>) {
        let mut batch = ForwardBatch::default();
        let mut sampled = Vec::with_capacity(plan.scheduled.len());
        for s in &plan.scheduled {
            let seq = &self.running[s.index];
            let from = seq.num_computed;
            let last = batch.push_adapter_chunk(
                &seq.tokens[from..from + s.len],
                from,
                &seq.block_table,
                seq.adapter_slot,
            );
            let samples = from + s.len == seq.tokens.len();
            if samples {
                batch.logit_rows.push(last);
            }
            sampled.push(samples);
        }
        (batch, sampled)
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
            self.running[i].fail(format!("model step failed: {message}"));
        }
        self.remove(indices, |stats| stats.aborted_sequences += 1);
    }

    /// Removes running sequences by index, freeing their blocks.
    fn remove(&mut self, mut indices: Vec<usize>, count: impl Fn(&mut EngineStats)) {
        indices.sort_unstable();
        indices.dedup();
        for i in indices.into_iter().rev() {
            let mut seq = self.running.remove(i);
            self.kv.release(&mut seq.block_table);
            count(&mut self.stats);
        }
    }
}
