//! Fair sharing of the engine between tenants: the Virtual Token Counter (VTC) of
//! "Fairness in Serving Large Language Models" (Sheng et al., OSDI 2024), weighted.
//!
//! Each tenant has a counter of the service it has had, in weighted tokens divided by
//! its share: a chunk of `p` prefill tokens and `q` decode tokens costs
//! `(PREFILL_WEIGHT * p + DECODE_WEIGHT * q) / weight` (the paper's defaults, 1 and 2:
//! a decode token costs about twice a prompt token). Tokens are charged as the
//! scheduler plans them (decodes, prefill chunks, admissions), so an admission pass
//! sees the counters its own admissions moved. Recomputation after preemption is
//! prefill like any other (the model does the work). Admission takes the oldest waiting
//! sequence of the backlogged tenant (one with waiting sequences) whose counter is
//! smallest; a tenant alone is served first come first served.
//!
//! Counter lift (the paper's Algorithm 2): a tenant that joins the queue with nothing
//! waiting is lifted to at least the smallest counter of the tenants already waiting,
//! or, when none is, to the counter of the last tenant to leave the queue, so it
//! cannot bank credit while idle. Lifts happen when a step starts (arrivals since the
//! last step) and when it is planned (a tenant put back by preemption with nothing else
//! waiting joins the queue like an arrival).
//!
//! Invariants: counters only grow; the floor (the smallest counter of the waiting
//! tenants, or the last to leave when none waits) never decreases, so forgetting an
//! idle tenant (nothing waiting or running) at or below the floor loses nothing: it
//! would be lifted to the floor anyway. Idle tenants above it are kept, at most
//! [`MAX_IDLE_TENANTS`] of them (the lowest forgotten first), so many tenant names do
//! not grow the state without bound.
use super::sequence::Sequence;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Cost of one prefill token (prompt, or recomputation after preemption).
pub const PREFILL_WEIGHT: f64 = 1.0;
/// Cost of one decode token.
pub const DECODE_WEIGHT: f64 = 2.0;
/// Idle tenants whose counters are kept above the floor, at most.
pub const MAX_IDLE_TENANTS: usize = 1024;
/// Shares are clamped to this range (a zero, negative or NaN share counts as 1).
const SHARE_RANGE: (f64, f64) = (1e-3, 1e3);

/// The virtual token counters of the tenants the engine serves.
#[derive(Debug, Default)]
pub struct Fairness {
    counters: HashMap<Arc<str>, f64>,
    /// Tenants with waiting sequences when the queue was last looked at.
    queued: HashSet<Arc<str>>,
    /// Counter of the last tenant to leave the queue.
    last_left: f64,
}

impl Fairness {
    /// No tenant tracked yet; every counter starts at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// `tenant`'s counter (None: not tracked; it would start at the floor).
    pub fn counter(&self, tenant: &str) -> Option<f64> {
        self.counters.get(tenant).copied()
    }

    /// The counter of `seq`'s tenant (an untracked one would start at the floor).
    pub fn counter_of(&self, seq: &Sequence) -> f64 {
        self.counter(&seq.tenant.tenant).unwrap_or(self.last_left)
    }

    /// Tenants tracked (waiting, running, or idle above the floor).
    pub fn tracked(&self) -> usize {
        self.counters.len()
    }

    /// What `len` tokens of `seq` from `seq.num_computed` cost its tenant: one token
    /// past the prompt with nothing else pending is a decode, anything else prefill.
    pub fn cost(seq: &Sequence, len: usize) -> f64 {
        let decode = len == 1 && seq.pending() == 1 && seq.num_computed >= seq.prompt_len;
        let tokens = if decode {
            DECODE_WEIGHT
        } else {
            PREFILL_WEIGHT * len as f64
        };
        tokens / share(seq.tenant.weight)
    }

    /// Charges `seq`'s tenant for `len` tokens planned from `seq.num_computed`.
    pub fn charge(&mut self, seq: &Sequence, len: usize) {
        let cost = Self::cost(seq, len);
        let floor = self.last_left;
        *self
            .counters
            .entry(seq.tenant.tenant.clone())
            .or_insert(floor) += cost;
    }

    /// The step starts: tenants that joined the queue since it was last looked at are
    /// lifted (Algorithm 2), those that left it recorded.
    pub fn observe_arrivals(&mut self, waiting: &VecDeque<Sequence>) {
        self.sync_queue(waiting);
    }

    /// The step is planned: records who still waits (lifting tenants put back by
    /// preemption) and forgets idle tenants that carry nothing.
    pub fn settle(&mut self, waiting: &VecDeque<Sequence>, running: &[Sequence]) {
        self.sync_queue(waiting);
        self.forget_idle(running);
    }

    /// The index in `waiting` to admit next: the oldest sequence, not in `skipped`, of
    /// the tenant with the smallest counter (ties: the earlier in the queue).
    pub fn pick(&self, waiting: &VecDeque<Sequence>, skipped: &HashSet<u64>) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        let mut last: Option<(&Arc<str>, f64)> = None;
        for (i, seq) in waiting.iter().enumerate() {
            if skipped.contains(&seq.id) {
                continue;
            }
            let tenant = &seq.tenant.tenant;
            let c = match last {
                Some((t, c)) if Arc::ptr_eq(t, tenant) => c,
                _ => self.counter(tenant).unwrap_or(self.last_left),
            };
            last = Some((tenant, c));
            if best.is_none_or(|(b, _)| c < b) {
                best = Some((c, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// Brings `queued` up to date with `waiting`: tenants gone set `last_left`; new
    /// ones are lifted to the floor.
    fn sync_queue(&mut self, waiting: &VecDeque<Sequence>) {
        let now: HashSet<Arc<str>> = waiting.iter().map(|s| s.tenant.tenant.clone()).collect();
        let left = self
            .queued
            .difference(&now)
            .filter_map(|t| self.counter(t))
            .max_by(f64::total_cmp);
        if let Some(c) = left {
            self.last_left = c;
        }
        let floor = self
            .queued
            .intersection(&now)
            .filter_map(|t| self.counter(t))
            .min_by(f64::total_cmp)
            .unwrap_or(self.last_left);
        for tenant in now.difference(&self.queued) {
            let c = self.counters.entry(tenant.clone()).or_insert(floor);
            *c = c.max(floor);
        }
        self.queued = now;
    }

    /// The smallest counter of the waiting tenants, or the last to leave when none is.
    fn floor(&self) -> f64 {
        self.queued
            .iter()
            .filter_map(|t| self.counter(t))
            .min_by(f64::total_cmp)
            .unwrap_or(self.last_left)
    }

    /// Drops idle tenants at or below the floor, then the lowest idle ones beyond
    /// [`MAX_IDLE_TENANTS`].
    fn forget_idle(&mut self, running: &[Sequence]) {
        let floor = self.floor();
        let busy: HashSet<&str> = running
            .iter()
            .map(|s| &*s.tenant.tenant)
            .chain(self.queued.iter().map(|t| &**t))
            .collect();
        self.counters
            .retain(|t, c| busy.contains(&**t) || *c > floor);
        let idle = self
            .counters
            .keys()
            .filter(|t| !busy.contains(&***t))
            .count();
        if idle <= MAX_IDLE_TENANTS {
            return;
        }
        let mut lowest: Vec<(f64, Arc<str>)> = self
            .counters
            .iter()
            .filter(|(t, _)| !busy.contains(&***t))
            .map(|(t, &c)| (c, t.clone()))
            .collect();
        lowest.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, tenant) in lowest.iter().take(idle - MAX_IDLE_TENANTS) {
            self.counters.remove(tenant);
        }
    }
}

/// A tenant's share as a divisor: clamped to [`SHARE_RANGE`]; not positive or NaN: 1.
fn share(weight: f64) -> f64 {
    if weight > 0.0 {
        weight.clamp(SHARE_RANGE.0, SHARE_RANGE.1)
    } else {
        1.0
    }
}

#[cfg(test)]
#[path = "fairness_tests.rs"]
mod tests;
