//! Per-request state inside the engine: tokens, KV block table, sampler, detokenizer,
//! stop conditions and the channel that streams events to the caller. Invariant: a
//! sequence sends at most one `Finished` event, and nothing after it.
use super::sampler::{token_logprob, Sampler, SamplingParams, TokenLogprob};
use super::stop::{StopMatcher, StopOutcome};
use crate::error::RequestError;
use crate::lora::registry::AdapterLease;
use crate::model::batch::VIRTUAL_TOKEN_BASE;
use crate::model::tokenizer::{IncrementalDetokenizer, TextTokenizer};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What a request asks of generation, already validated.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Top alternatives to report per token; None reports no logprobs at all.
    pub logprobs: Option<usize>,
}

/// The adapter versions a request runs with, each leased until it ends, with its weight:
/// none (the base model), one (weight 1), or a weighted mixture whose deltas are summed
/// (`sum w_i * delta_i`, LoRA-family adapters only: the server checks).
#[derive(Clone, Debug, Default)]
pub struct RequestAdapters(Vec<(AdapterLease, f32)>);

impl RequestAdapters {
    /// One adapter, weight 1.
    pub fn single(lease: AdapterLease) -> Self {
        Self(vec![(lease, 1.0)])
    }

    /// A weighted mixture (the leases of distinct versions).
    pub fn mixture(members: Vec<(AdapterLease, f32)>) -> Self {
        Self(members)
    }

    /// The base model alone.
    pub fn is_base(&self) -> bool {
        self.0.is_empty()
    }

    /// More than one adapter, or one with a weight other than 1.
    pub fn is_mixture(&self) -> bool {
        self.0.len() > 1 || self.0.iter().any(|(_, w)| *w != 1.0)
    }

    pub fn leases(&self) -> impl Iterator<Item = &AdapterLease> {
        self.0.iter().map(|(l, _)| l)
    }

    /// Each lease with its weight.
    pub fn entries(&self) -> &[(AdapterLease, f32)] {
        &self.0
    }

    /// Whether any member is adapter version id `key`.
    pub fn uses(&self, key: u64) -> bool {
        self.leases().any(|l| l.key() == key)
    }

    /// Bytes of every member's weights.
    pub fn bytes(&self) -> usize {
        self.leases().map(|l| l.version().bytes()).sum()
    }

    /// Virtual tokens the adapters put before the prompt (prompt tuning: one adapter).
    pub fn num_virtual_tokens(&self) -> usize {
        self.leases()
            .map(|l| l.weights().num_virtual_tokens())
            .sum()
    }

    /// The first member's version number (0 for the base model).
    pub fn first_version(&self) -> u64 {
        self.0.first().map_or(0, |(l, _)| l.version().version)
    }
}

/// Whose request this is, as the fair scheduler sees it: a tenant's name and its
/// fair-share weight (the open server's one anonymous tenant: "", weight 1).
#[derive(Clone, Debug, PartialEq)]
pub struct TenantShare {
    pub tenant: Arc<str>,
    /// Relative share of served tokens when tenants compete (> 0).
    pub weight: f64,
}

impl Default for TenantShare {
    fn default() -> Self {
        Self {
            tenant: Arc::from(""),
            weight: 1.0,
        }
    }
}

/// A validated request handed to the engine.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub request_id: String,
    /// Who asked (fair scheduling and per-tenant usage).
    pub tenant: TenantShare,
    /// When the caller stops waiting: a sequence still queued then never starts, and a
    /// running one stops within a step (DEADLINE_EXCEEDED).
    pub deadline: Option<Instant>,
    /// The adapter versions this request runs with, held until it ends.
    pub adapters: RequestAdapters,
    pub prompt_ids: Vec<u32>,
    pub params: GenerationParams,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
    Eos,
    Cancelled,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// The request's own prompt tokens.
    pub prompt_tokens: usize,
    /// Virtual tokens its adapter put before them (prompt tuning).
    pub virtual_tokens: usize,
    pub completion_tokens: usize,
    pub queue_time: Duration,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
}

/// One generated token, with the text it completed (possibly empty).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub token_id: u32,
    pub text: String,
    pub logprob: Option<TokenLogprob>,
}

/// Events a sequence streams to its caller.
#[derive(Clone, Debug, PartialEq)]
pub enum SeqEvent {
    Token(TokenEvent),
    Finished {
        reason: FinishReason,
        usage: Usage,
        matched_stop: Option<String>,
    },
    /// The engine failed this sequence; nothing follows.
    Error(RequestError),
}

pub struct Sequence {
    pub id: u64,
    pub request_id: String,
    /// The adapter's virtual tokens (ids from [`VIRTUAL_TOKEN_BASE`]), the prompt, then
    /// generated tokens.
    pub tokens: Vec<u32>,
    /// Virtual tokens plus prompt tokens.
    pub prompt_len: usize,
    /// Virtual tokens at the start of `tokens` (prompt tuning; else 0).
    pub virtual_len: usize,
    /// Leading positions of `tokens` whose K/V are in the cache.
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    /// The adapter versions of every token of this sequence (none: the base model). The
    /// leases are released when the sequence is dropped, however it ends.
    pub adapters: RequestAdapters,
    pub tenant: TenantShare,
    pub deadline: Option<Instant>,
    params: GenerationParams,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    events: mpsc::UnboundedSender<SeqEvent>,
    arrived: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
}

impl Sequence {
    pub fn new(id: u64, req: EngineRequest, events: mpsc::UnboundedSender<SeqEvent>) -> Self {
        let detok = IncrementalDetokenizer::new(&req.prompt_ids);
        let virtual_len = req.adapters.num_virtual_tokens();
        let mut tokens: Vec<u32> = (0..virtual_len as u32)
            .map(|i| VIRTUAL_TOKEN_BASE + i)
            .collect();
        tokens.extend_from_slice(&req.prompt_ids);
        Self {
            id,
            request_id: req.request_id,
            prompt_len: tokens.len(),
            virtual_len,
            tokens,
            num_computed: 0,
            block_table: Vec::new(),
            adapters: req.adapters,
            tenant: req.tenant,
            deadline: req.deadline,
            sampler: Sampler::new(req.params.sampling.clone()),
            stop: StopMatcher::new(req.params.stop.clone()),
            params: req.params,
            detok,
            events,
            arrived: Instant::now(),
            first_scheduled: None,
            first_token: None,
        }
    }

    /// Tokens still to run through the model before the next one can be sampled (>= 1).
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    pub fn completion_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The caller went away (its receiver is dropped).
    pub fn is_disconnected(&self) -> bool {
        self.events.is_closed()
    }

    /// Its deadline has passed.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Whether any of it has run (a prefill chunk or more).
    pub fn has_started(&self) -> bool {
        self.first_scheduled.is_some()
    }

    /// When it arrived at the engine.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    pub fn mark_scheduled(&mut self) {
        self.first_scheduled.get_or_insert_with(Instant::now);
    }

    /// Forgets the cached K/V (after preemption): everything will be recomputed.
    pub fn reset_computed(&mut self) {
        self.num_computed = 0;
    }

    /// Samples the next token from `logits`, streams it, and says whether the sequence
    /// is finished (the `Finished` event is then already sent).
    pub fn accept_logits(
        &mut self,
        tokenizer: &TextTokenizer,
        logits: &[f32],
        context_limit: usize,
    ) -> Option<FinishReason> {
        let id = self
            .sampler
            .sample(logits, &self.tokens[self.virtual_len..]);
        let logprob = self.params.logprobs.map(|k| token_logprob(logits, id, k));
        self.tokens.push(id);
        self.first_token.get_or_insert_with(Instant::now);
        let is_eos = !self.params.ignore_eos && tokenizer.eos_token_ids().contains(&id);
        let mut text = match self.detok.push(tokenizer, id) {
            Ok(t) => t,
            Err(e) => {
                self.fail(RequestError::Internal(format!(
                    "detokenizing token {id}: {e:#}"
                )));
                return Some(FinishReason::Cancelled);
            }
        };
        let length_reached = self.completion_len() >= self.params.max_new_tokens
            || self.tokens.len() >= context_limit;
        if is_eos || length_reached {
            text.push_str(&self.detok.flush(tokenizer).unwrap_or_default());
        }
        let (emit, stopped) = match self.stop.push(&text) {
            StopOutcome::Continue { emit } => (emit, None),
            StopOutcome::Stopped { emit, matched } => (emit, Some(matched)),
        };
        let reason = match (&stopped, is_eos, length_reached) {
            (Some(_), _, _) => Some(FinishReason::Stop),
            (None, true, _) => Some(FinishReason::Eos),
            (None, false, true) => Some(FinishReason::Length),
            _ => None,
        };
        let emit = if reason.is_some() && stopped.is_none() {
            emit + &self.stop.finish()
        } else {
            emit
        };
        let _ = self.events.send(SeqEvent::Token(TokenEvent {
            token_id: id,
            text: emit,
            logprob,
        }));
        if let Some(r) = reason {
            self.finish(r, stopped);
        }
        reason
    }

    /// Sends the final event with usage.
    pub fn finish(&mut self, reason: FinishReason, matched_stop: Option<String>) {
        let now = Instant::now();
        let usage = Usage {
            prompt_tokens: self.prompt_len - self.virtual_len,
            virtual_tokens: self.virtual_len,
            completion_tokens: self.completion_len(),
            queue_time: self
                .first_scheduled
                .unwrap_or(now)
                .saturating_duration_since(self.arrived),
            time_to_first_token: self
                .first_token
                .unwrap_or(now)
                .saturating_duration_since(self.arrived),
            total_time: now.saturating_duration_since(self.arrived),
        };
        let _ = self.events.send(SeqEvent::Finished {
            reason,
            usage,
            matched_stop,
        });
    }

    /// Sends an error event (the last event of this sequence).
    pub fn fail(&mut self, error: RequestError) {
        let _ = self.events.send(SeqEvent::Error(error));
    }
}
