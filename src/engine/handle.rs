//! The engine's side door: [`EngineHandle`], the cloneable handle every caller talks to
//! the engine thread through (a bounded command channel), the [`Command`]s it sends, and
//! the [`EngineLimits`] known without asking the thread. Invariant: a handle never
//! blocks the engine; a send that fails means the thread is gone
//! ([`RequestError::engine_stopped`]).
use super::sequence::{EngineRequest, SeqEvent};
use super::EngineStats;
use crate::error::RequestError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Limits a request must respect, known without asking the engine thread.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    /// Positions the model supports (prompt + generated).
    pub context_length: usize,
    /// Tokens one sequence can hold in the KV cache when it runs alone.
    pub kv_capacity_tokens: usize,
    pub vocab_size: usize,
    /// The largest adapter the active pool can hold.
    pub max_adapter_bytes: usize,
    pub block_size: usize,
    pub kv_block_bytes: usize,
    /// Whether the model's backend serves weighted adapter mixtures.
    pub mixtures: bool,
}

impl EngineLimits {
    /// KV token slots an active adapter of `bytes` takes from the shared pool.
    pub fn adapter_tokens(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.kv_block_bytes.max(1)).max(1) * self.block_size
    }
}

/// The engine loop's heartbeat, for the health watchdog: a beat per loop turn (a step,
/// or a command handled after idling), and whether work is pending.
#[derive(Debug, Default)]
pub struct EngineProgress {
    beats: AtomicU64,
    busy: AtomicBool,
}

impl EngineProgress {
    /// Loop turns so far.
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::Acquire)
    }

    /// Whether sequences were running or waiting at the last beat.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub(super) fn beat(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
        self.beats.fetch_add(1, Ordering::AcqRel);
    }
}

pub(super) enum Command {
    Add(Box<EngineRequest>, mpsc::UnboundedSender<SeqEvent>),
    Stats(oneshot::Sender<EngineStats>),
    CancelAll,
    /// Finishes the sequences holding adapter version id `.0`; replies how many.
    CancelAdapter(u64, oneshot::Sender<usize>),
    /// A test-only fault: the loop sleeps this long (alive, but making no progress).
    #[cfg(feature = "test-support")]
    Stall(std::time::Duration),
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) alive: Arc<AtomicBool>,
    pub(super) limits: EngineLimits,
    pub(super) progress: Arc<EngineProgress>,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver aborts the sequence within one step.
    pub async fn submit(
        &self,
        req: EngineRequest,
    ) -> Result<mpsc::UnboundedReceiver<SeqEvent>, RequestError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Command::Add(Box::new(req), tx))
            .await
            .map_err(|_| RequestError::engine_stopped())?;
        Ok(rx)
    }

    pub async fn stats(&self) -> Result<EngineStats, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Stats(tx))
            .await
            .map_err(|_| RequestError::engine_stopped())?;
        rx.await.map_err(|_| RequestError::engine_stopped())
    }

    /// Finishes every sequence now with reason `Cancelled` (shutdown drain deadline).
    pub async fn cancel_all(&self) -> Result<(), RequestError> {
        self.tx
            .send(Command::CancelAll)
            .await
            .map_err(|_| RequestError::engine_stopped())
    }

    /// Finishes every sequence using adapter version id `version` now with reason
    /// `Cancelled` (an unload's drain deadline); returns how many there were.
    pub async fn cancel_adapter(&self, version: u64) -> Result<usize, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::CancelAdapter(version, tx))
            .await
            .map_err(|_| RequestError::engine_stopped())?;
        rx.await.map_err(|_| RequestError::engine_stopped())
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// The loop's heartbeat.
    pub fn progress(&self) -> &EngineProgress {
        &self.progress
    }

    /// A test-only fault: the engine loop stops making progress for `duration` (the
    /// thread stays alive), as a hung kernel or a deadlock would.
    #[cfg(feature = "test-support")]
    pub async fn inject_stall(&self, duration: std::time::Duration) -> Result<(), RequestError> {
        self.tx
            .send(Command::Stall(duration))
            .await
            .map_err(|_| RequestError::engine_stopped())
    }
}

/// Clears the alive flag when the engine thread ends, even by panic.
pub(super) struct AliveGuard(pub(super) Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
