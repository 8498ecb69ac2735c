//! Validation first: [`validate`] turns a raw `GenerateRequest` into a [`ValidRequest`]
//! with every check that does not depend on the adapter (exactly one input, sampling
//! parameters and options in range, tokenization, lengths within the context and the
//! whole KV pool), before any adapter lease or load is taken. The one adapter-dependent
//! check, the sequence against the pool less the adapter's own share, runs in
//! [`ValidRequest::into_engine_request`] once the lease is held. Every error names the
//! offending field.
use crate::engine::sampler::SamplingParams;
use crate::engine::sequence::{EngineRequest, GenerationParams, RequestAdapters};
use crate::engine::EngineLimits;
use crate::error::RequestError;
use crate::model::tokenizer::{ChatMessage, TextTokenizer};
use crate::proto::v1 as pb;

pub const MAX_LOGPROBS: u32 = 20;
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_CHARS: usize = 256;
pub const MAX_REQUEST_ID_CHARS: usize = 256;
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;
/// Most adapters one mixture may name.
pub const MAX_MIXTURE_ADAPTERS: usize = 8;

/// Which adapters a request asks for, before any lease is taken.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterChoice {
    /// The base model alone (`adapter` empty, no `adapters`).
    Base,
    /// `adapter`.
    One(String),
    /// `adapters`: distinct names with finite weights.
    Mixture(Vec<(String, f32)>),
}

impl AdapterChoice {
    /// The adapters' names (none: the base model).
    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::Base => vec![],
            Self::One(name) => vec![name.as_str()],
            Self::Mixture(members) => members.iter().map(|(n, _)| n.as_str()).collect(),
        }
    }
}

/// `adapter` or `adapters`, checked (exclusive, at most 8, names given and distinct,
/// weights finite, and mixtures served by the backend).
fn adapter_choice(
    req: &pb::GenerateRequest,
    limits: &EngineLimits,
) -> Result<AdapterChoice, RequestError> {
    if req.adapters.is_empty() {
        return Ok(match req.adapter.as_str() {
            "" => AdapterChoice::Base,
            name => AdapterChoice::One(name.to_string()),
        });
    }
    let invalid = |message: String| RequestError::invalid("adapters", message);
    if !req.adapter.is_empty() {
        return Err(invalid(
            "is exclusive with adapter; name one or the other".into(),
        ));
    }
    if !limits.mixtures {
        return Err(invalid(
            "this server's backend does not serve adapter mixtures".into(),
        ));
    }
    if req.adapters.len() > MAX_MIXTURE_ADAPTERS {
        return Err(invalid(format!(
            "{} entries; a mixture names at most {MAX_MIXTURE_ADAPTERS}",
            req.adapters.len()
        )));
    }
    let mut members: Vec<(String, f32)> = Vec::with_capacity(req.adapters.len());
    for (i, a) in req.adapters.iter().enumerate() {
        if a.name.is_empty() {
            return Err(invalid(format!("entry {i} has no name")));
        }
        if !a.weight.is_finite() {
            return Err(invalid(format!("entry {i} has weight {}", a.weight)));
        }
        if members.iter().any(|(n, _)| *n == a.name) {
            let shown: String = a.name.chars().take(64).collect();
            return Err(invalid(format!("{shown:?} is named twice")));
        }
        members.push((a.name.clone(), a.weight));
    }
    Ok(AdapterChoice::Mixture(members))
}

/// The prompt in one of its accepted forms.
enum Input {
    Text(String),
    Ids(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

/// Checks everything that does not need the tokenizer.
fn check_input(req: &pb::GenerateRequest) -> Result<Input, RequestError> {
    let given = [
        req.prompt.is_some(),
        !req.prompt_token_ids.is_empty(),
        !req.messages.is_empty(),
    ];
    match given.iter().filter(|g| **g).count() {
        0 => {
            return Err(RequestError::invalid(
                "input",
                "one of prompt, prompt_token_ids or messages is required",
            ))
        }
        1 => {}
        n => {
            return Err(RequestError::invalid(
                "input",
                format!("exactly one of prompt, prompt_token_ids or messages may be set, got {n}"),
            ))
        }
    }
    if let Some(p) = &req.prompt {
        if p.is_empty() {
            return Err(RequestError::invalid("prompt", "is empty"));
        }
        return Ok(Input::Text(p.clone()));
    }
    if !req.prompt_token_ids.is_empty() {
        return Ok(Input::Ids(req.prompt_token_ids.clone()));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if m.role.is_empty() {
            return Err(RequestError::invalid(
                format!("messages[{i}].role"),
                "is empty",
            ));
        }
        msgs.push(ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        });
    }
    Ok(Input::Chat(msgs))
}

fn finite_or(field: &str, v: Option<f32>, default: f32) -> Result<f32, RequestError> {
    let v = v.unwrap_or(default);
    if !v.is_finite() {
        return Err(RequestError::invalid(
            field,
            format!("must be a finite number, got {v}"),
        ));
    }
    Ok(v)
}

/// Validates the sampling block.
pub fn sampling_params(s: Option<&pb::SamplingParams>) -> Result<SamplingParams, RequestError> {
    let d = pb::SamplingParams::default();
    let s = s.unwrap_or(&d);
    let temperature = finite_or("sampling.temperature", s.temperature, 1.0)?;
    if temperature < 0.0 {
        return Err(RequestError::invalid(
            "sampling.temperature",
            format!("must be >= 0, got {temperature}"),
        ));
    }
    let top_p = finite_or("sampling.top_p", s.top_p, 1.0)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RequestError::invalid(
            "sampling.top_p",
            format!("must be in (0, 1], got {top_p}"),
        ));
    }
    let repetition_penalty = finite_or("sampling.repetition_penalty", s.repetition_penalty, 1.0)?;
    if repetition_penalty <= 0.0 {
        return Err(RequestError::invalid(
            "sampling.repetition_penalty",
            format!("must be > 0, got {repetition_penalty}"),
        ));
    }
    Ok(SamplingParams {
        temperature,
        top_k: s.top_k.unwrap_or(0) as usize,
        top_p,
        seed: s.seed,
        repetition_penalty,
    })
}

fn check_options(req: &pb::GenerateRequest) -> Result<(), RequestError> {
    if req.request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        return Err(RequestError::invalid(
            "request_id",
            format!("longer than {MAX_REQUEST_ID_CHARS} characters"),
        ));
    }
    if let Some(k) = req.logprobs {
        if k > MAX_LOGPROBS {
            return Err(RequestError::invalid(
                "logprobs",
                format!("must be between 0 and {MAX_LOGPROBS}, got {k}"),
            ));
        }
    }
    if req.stop.len() > MAX_STOP_STRINGS {
        return Err(RequestError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                req.stop.len()
            ),
        ));
    }
    for (i, s) in req.stop.iter().enumerate() {
        if s.is_empty() || s.chars().count() > MAX_STOP_CHARS {
            return Err(RequestError::invalid(
                format!("stop[{i}]"),
                format!("must be 1 to {MAX_STOP_CHARS} characters"),
            ));
        }
    }
    if req.max_new_tokens == Some(0) {
        return Err(RequestError::invalid(
            "max_new_tokens",
            "must be at least 1",
        ));
    }
    Ok(())
}

/// A request that passed every check that does not depend on its adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    pub request_id: String,
    /// The adapters to take leases on.
    pub adapters: AdapterChoice,
    pub prompt_ids: Vec<u32>,
    /// `max_new_tokens` resolved against the whole KV pool.
    pub params: GenerationParams,
    /// The request gave `max_new_tokens` (else it is the default, fitted to the room).
    max_new_tokens_given: bool,
}

impl ValidRequest {
    /// The engine request, once the adapters' leases are held: the sequence must also
    /// fit the KV pool less the adapters' share of it (so it can always run alone), and
    /// the context and pool less the adapter's virtual tokens.
    pub fn into_engine_request(
        mut self,
        adapters: RequestAdapters,
        limits: &EngineLimits,
    ) -> Result<EngineRequest, RequestError> {
        if !adapters.is_base() {
            // The adapters' share of the pool, and any virtual tokens (prompt tuning),
            // which take positions and KV slots like prompt tokens.
            let mut fitted = *limits;
            let reserved = limits.adapter_tokens(adapters.bytes());
            let virtual_tokens = adapters.num_virtual_tokens();
            fitted.kv_capacity_tokens = limits
                .kv_capacity_tokens
                .saturating_sub(reserved + virtual_tokens);
            fitted.context_length = limits.context_length.saturating_sub(virtual_tokens);
            let requested = self
                .max_new_tokens_given
                .then_some(self.params.max_new_tokens as u32);
            self.params.max_new_tokens = max_new_tokens(requested, self.prompt_ids.len(), &fitted)?;
        }
        Ok(EngineRequest {
            request_id: self.request_id,
            adapters,
            tenant: Default::default(),
            deadline: None,
            prompt_ids: self.prompt_ids,
            params: self.params,
        })
    }
}

/// Every check that does not need the adapter, including tokenization (call off the
/// async threads).
pub fn validate(
    req: &pb::GenerateRequest,
    tokenizer: &TextTokenizer,
    limits: &EngineLimits,
) -> Result<ValidRequest, RequestError> {
    let input = check_input(req)?;
    let adapters = adapter_choice(req, limits)?;
    check_options(req)?;
    let sampling = sampling_params(req.sampling.as_ref())?;
    let prompt_ids = tokenize_input(input, tokenizer, limits)?;
    let max_new_tokens = max_new_tokens(req.max_new_tokens, prompt_ids.len(), limits)?;
    Ok(ValidRequest {
        request_id: req.request_id.clone(),
        adapters,
        prompt_ids,
        params: GenerationParams {
            max_new_tokens,
            sampling,
            stop: req.stop.clone(),
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs.map(|k| k as usize),
        },
        max_new_tokens_given: req.max_new_tokens.is_some(),
    })
}

fn tokenize_input(
    input: Input,
    tokenizer: &TextTokenizer,
    limits: &EngineLimits,
) -> Result<Vec<u32>, RequestError> {
    let internal = |e: anyhow::Error| RequestError::Internal(format!("tokenizer: {e:#}"));
    let (field, ids) = match input {
        Input::Text(t) => ("prompt", tokenizer.encode(&t).map_err(internal)?),
        Input::Ids(ids) => {
            if let Some((i, id)) = ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= limits.vocab_size)
            {
                return Err(RequestError::invalid(
                    format!("prompt_token_ids[{i}]"),
                    format!(
                        "{id} is not below the vocabulary size {}",
                        limits.vocab_size
                    ),
                ));
            }
            ("prompt_token_ids", ids)
        }
        Input::Chat(msgs) => {
            if !tokenizer.has_chat_template() {
                return Err(RequestError::FailedPrecondition(
                    "messages: this model has no chat template; send a prompt instead".into(),
                ));
            }
            let text = tokenizer.apply_chat_template(&msgs).map_err(|e| {
                RequestError::invalid("messages", format!("chat template failed: {e:#}"))
            })?;
            ("messages", tokenizer.encode(&text).map_err(internal)?)
        }
    };
    if ids.is_empty() {
        return Err(RequestError::invalid(field, "encodes to no tokens"));
    }
    if ids.len() >= limits.context_length {
        return Err(RequestError::invalid(
            field,
            format!(
                "{} tokens leave no room in the context length {}",
                ids.len(),
                limits.context_length
            ),
        ));
    }
    Ok(ids)
}

fn max_new_tokens(
    requested: Option<u32>,
    prompt_len: usize,
    limits: &EngineLimits,
) -> Result<usize, RequestError> {
    let room = limits.context_length.min(limits.kv_capacity_tokens);
    let available = room.saturating_sub(prompt_len);
    let Some(n) = requested else {
        if available == 0 {
            return Err(RequestError::invalid(
                "prompt",
                format!("{prompt_len} tokens do not fit in the KV cache ({room} tokens)"),
            ));
        }
        return Ok(DEFAULT_MAX_NEW_TOKENS.min(available));
    };
    let n = n as usize;
    if prompt_len + n > limits.context_length {
        return Err(RequestError::invalid(
            "max_new_tokens",
            format!(
                "prompt ({prompt_len} tokens) + max_new_tokens ({n}) exceeds the context length {}",
                limits.context_length
            ),
        ));
    }
    if prompt_len + n > limits.kv_capacity_tokens {
        return Err(RequestError::invalid(
            "max_new_tokens",
            format!(
                "prompt ({prompt_len} tokens) + max_new_tokens ({n}) exceeds the KV cache capacity of {} tokens",
                limits.kv_capacity_tokens
            ),
        ));
    }
    Ok(n)
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
