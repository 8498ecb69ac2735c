//! Backpressure at the front door: a request is admitted only while the waiting queue is
//! under its bounds (requests, and prompt tokens) and its tenant is under its concurrency
//! and rate limits; anything beyond is refused at once with RESOURCE_EXHAUSTED and a
//! retry hint ([`RequestError::Overloaded`]), never queued without bound. Each admitted
//! request holds a [`Ticket`] for its whole life: "waiting" from admission until its
//! first event from the engine (adapter load and engine queue included), "in flight"
//! until the ticket drops. Per-tenant usage (requests, refusals, tokens) is counted here.
//! Invariants: the waiting counters never exceed their bounds (a reservation that would
//! is rolled back before anyone sees it); every slot a ticket takes is given back
//! exactly once, however the request ends.
use super::tenants::{TenantSpec, Tenants};
use crate::engine::sequence::Usage;
use crate::error::RequestError;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The retry hint of a full queue or a tenant at its concurrency limit: about how long a
/// short request takes to leave the queue.
const BUSY_RETRY_MS: u64 = 1000;

/// A token bucket refilled continuously at `per_minute`, which may go into debt (a
/// request's generated tokens are only known at its end).
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: f64, now: Instant) -> Self {
        Self {
            per_minute,
            level: per_minute,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// Milliseconds until the level reaches `need` (0: now).
    fn wait_ms(&self, need: f64) -> u64 {
        if self.level >= need {
            return 0;
        }
        ((need - self.level) * 60_000.0 / self.per_minute).ceil() as u64
    }
}

/// Counters of one tenant's use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantUsage {
    pub requests: u64,
    pub refused: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub in_flight: usize,
}

/// One tenant's limits and usage.
#[derive(Debug)]
pub struct TenantGate {
    max_concurrent: Option<usize>,
    in_flight: AtomicUsize,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
    admitted: AtomicU64,
    refused: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

fn lock(b: &Mutex<Bucket>) -> std::sync::MutexGuard<'_, Bucket> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

impl TenantGate {
    pub fn new(spec: &TenantSpec) -> Self {
        let now = Instant::now();
        let bucket = |n: f64| Mutex::new(Bucket::new(n, now));
        Self {
            max_concurrent: spec.max_concurrent_requests.map(|n| n as usize),
            in_flight: AtomicUsize::new(0),
            requests: spec.requests_per_minute.map(|n| bucket(n as f64)),
            tokens: spec.tokens_per_minute.map(|n| bucket(n as f64)),
            admitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
        }
    }

    pub fn usage(&self) -> TenantUsage {
        TenantUsage {
            requests: self.admitted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Takes a concurrency slot and charges the rates, or says why not (nothing taken).
    fn take(&self, prompt_tokens: usize, now: Instant) -> Result<(), RequestError> {
        let in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Some(max) = self.max_concurrent.filter(|&m| in_flight >= m) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(overloaded(
                format!("this API key has {max} requests in flight, its limit"),
                BUSY_RETRY_MS,
            ));
        }
        if let Err(e) = self.charge_rates(prompt_tokens, now) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }

    /// One request and its prompt tokens against the per-minute buckets: the request
    /// needs a whole request credit, and the token bucket must not be in debt.
    fn charge_rates(&self, prompt_tokens: usize, now: Instant) -> Result<(), RequestError> {
        let mut requests = self.requests.as_ref().map(lock);
        let mut tokens = self.tokens.as_ref().map(lock);
        if let Some(r) = requests.as_deref_mut() {
            r.refill(now);
            if r.level < 1.0 {
                return Err(overloaded(
                    format!("over this API key's {} requests per minute", r.per_minute),
                    r.wait_ms(1.0),
                ));
            }
        }
        if let Some(t) = tokens.as_deref_mut() {
            t.refill(now);
            if t.level <= 0.0 {
                return Err(overloaded(
                    format!("over this API key's {} tokens per minute", t.per_minute),
                    t.wait_ms(1.0),
                ));
            }
        }
        if let Some(r) = requests.as_deref_mut() {
            r.level -= 1.0;
        }
        if let Some(t) = tokens.as_deref_mut() {
            t.level -= prompt_tokens as f64;
        }
        Ok(())
    }

    fn charge_completion(&self, tokens: usize) {
        self.completion_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        if let Some(t) = &self.tokens {
            lock(t).level -= tokens as f64;
        }
    }
}

fn overloaded(message: String, retry_after_ms: u64) -> RequestError {
    RequestError::Overloaded {
        message,
        retry_after_ms: retry_after_ms.max(1),
    }
}

/// The waiting queue's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueBounds {
    pub max_waiting_requests: usize,
    /// Prompt tokens of the waiting requests together.
    pub max_waiting_tokens: usize,
}

/// The front door: queue bounds and the tenants' gates.
#[derive(Debug)]
pub struct Admission {
    bounds: QueueBounds,
    waiting_requests: AtomicUsize,
    waiting_tokens: AtomicUsize,
    refused: AtomicU64,
}

impl Admission {
    pub fn new(bounds: QueueBounds) -> Self {
        Self {
            bounds,
            waiting_requests: AtomicUsize::new(0),
            waiting_tokens: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub fn bounds(&self) -> QueueBounds {
        self.bounds
    }

    /// Requests admitted and not yet started, and their prompt tokens.
    pub fn waiting(&self) -> (usize, usize) {
        (
            self.waiting_requests.load(Ordering::Acquire),
            self.waiting_tokens.load(Ordering::Acquire),
        )
    }

    /// Requests refused for a bound or a limit.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Admits a request of `tenant` with `prompt_tokens`, or refuses it at once.
    pub fn admit(
        self: &Arc<Self>,
        tenant: &Arc<super::tenants::Tenant>,
        prompt_tokens: usize,
    ) -> Result<Ticket, RequestError> {
        let result = self.reserve(prompt_tokens).and_then(|()| {
            tenant
                .gate
                .take(prompt_tokens, Instant::now())
                .inspect_err(|_| self.unreserve(prompt_tokens))
        });
        let gate = &tenant.gate;
        match result {
            Ok(()) => {
                gate.admitted.fetch_add(1, Ordering::Relaxed);
                gate.prompt_tokens
                    .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                Ok(Ticket {
                    admission: self.clone(),
                    tenant: tenant.clone(),
                    prompt_tokens,
                    waiting: true,
                    charged: false,
                })
            }
            Err(e) => {
                gate.refused.fetch_add(1, Ordering::Relaxed);
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// A waiting-queue place for a request of `tokens` prompt tokens.
    fn reserve(&self, tokens: usize) -> Result<(), RequestError> {
        let b = self.bounds;
        let n = self.waiting_requests.fetch_add(1, Ordering::AcqRel);
        if n >= b.max_waiting_requests {
            self.waiting_requests.fetch_sub(1, Ordering::AcqRel);
            return Err(overloaded(
                format!("the server's waiting queue is full ({n} requests)"),
                BUSY_RETRY_MS,
            ));
        }
        let t = self.waiting_tokens.fetch_add(tokens, Ordering::AcqRel);
        // One request is always let in when the queue is empty, however long it is
        // (validation has already bounded it by the KV cache).
        if t > 0 && t + tokens > b.max_waiting_tokens {
            self.unreserve(tokens);
            return Err(overloaded(
                format!(
                    "the server's waiting queue holds {t} prompt tokens; {tokens} more \
                     would pass its bound of {}",
                    b.max_waiting_tokens
                ),
                BUSY_RETRY_MS,
            ));
        }
        Ok(())
    }

    fn unreserve(&self, tokens: usize) {
        self.waiting_requests.fetch_sub(1, Ordering::AcqRel);
        self.waiting_tokens.fetch_sub(tokens, Ordering::AcqRel);
    }

    /// Usage of every tenant, by name.
    pub fn usage(tenants: &Tenants) -> BTreeMap<String, TenantUsage> {
        tenants
            .all()
            .iter()
            .map(|t| (t.name().to_string(), t.gate.usage()))
            .collect()
    }
}

/// An admitted request's places: in the waiting queue until it starts, and in its
/// tenant's concurrency until it drops.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    tenant: Arc<super::tenants::Tenant>,
    prompt_tokens: usize,
    waiting: bool,
    charged: bool,
}

impl Ticket {
    /// The request has left the waiting queue (its first event came from the engine).
    pub fn started(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.admission.unreserve(self.prompt_tokens);
        }
    }

    /// The request finished having generated `usage.completion_tokens`.
    pub fn finished(&mut self, usage: &Usage) {
        self.started();
        self.charge_generated(usage.completion_tokens);
    }

    /// The request ended without finishing (an error, a deadline, the client gone)
    /// after `tokens` were generated for it: they are charged all the same, so a
    /// deadline or a disconnect is no way around `tokens_per_minute`.
    pub fn ended_early(&mut self, tokens: usize) {
        self.started();
        self.charge_generated(tokens);
    }

    /// Charges the generated tokens once, whichever way the request ends first.
    fn charge_generated(&mut self, tokens: usize) {
        if !std::mem::replace(&mut self.charged, true) {
            self.tenant.gate.charge_completion(tokens);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.started();
        self.tenant.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
