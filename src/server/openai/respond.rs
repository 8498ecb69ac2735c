//! Responses of the OpenAI front from the engine's events: one whole completion, or a
//! stream of Server-Sent Events (a chunk per token, a last chunk with the finish reason,
//! a usage chunk when `stream_options.include_usage`, then `data: [DONE]`), for
//! Completions and Chat Completions alike. An error after streaming began is sent as a
//! `data: {"error": ...}` event before `[DONE]` (the HTTP status is already sent).
use super::error::ApiError;
use crate::engine::sampler::TokenLogprob;
use crate::engine::sequence::{FinishReason, SeqEvent, TokenEvent, Usage};
use crate::error::RequestError;
use crate::model::TextTokenizer;
use crate::server::observe::ObservedEvents;
use axum::response::sse::Event;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// Which API a response belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Completion,
    Chat,
}

/// What every response and chunk of one request carries.
#[derive(Clone)]
pub struct Head {
    pub api: Api,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub tokenizer: Arc<TextTokenizer>,
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Eos => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(self.object(chunk)));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m.insert("choices".into(), Value::Array(choices));
        m
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Logprobs of `tokens` in this API's shape (`offset`: the text before them).
    fn logprobs(&self, tokens: &[TokenEvent], mut offset: usize) -> Value {
        let lps: Vec<&TokenLogprob> = tokens.iter().filter_map(|t| t.logprob.as_ref()).collect();
        if lps.is_empty() {
            return Value::Null;
        }
        match self.api {
            Api::Chat => {
                let entry = |id: u32, lp: f32| {
                    let token = self.token_text(id);
                    json!({"token": token, "logprob": lp, "bytes": token.as_bytes()})
                };
                let content: Vec<Value> = lps
                    .iter()
                    .map(|l| {
                        let mut e = entry(l.token_id, l.logprob);
                        let top: Vec<Value> = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                        e["top_logprobs"] = Value::Array(top);
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
            Api::Completion => {
                let (mut toks, mut lp, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
                for (t, l) in tokens.iter().zip(&lps) {
                    toks.push(self.token_text(l.token_id));
                    lp.push(l.logprob);
                    let alts: Map<String, Value> = l
                        .top
                        .iter()
                        .map(|&(id, p)| (self.token_text(id), json!(p)))
                        .collect();
                    top.push(Value::Object(alts));
                    offsets.push(offset);
                    offset += t.text.len();
                }
                json!({"tokens": toks, "token_logprobs": lp, "top_logprobs": top, "text_offset": offsets})
            }
        }
    }

    /// One choice: the text (or the chat delta / message), logprobs and finish reason.
    fn choice(&self, chunk: bool, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        let mut c = json!({"index": 0, "logprobs": logprobs, "finish_reason": finish});
        match (self.api, chunk) {
            (Api::Completion, _) => c["text"] = json!(text),
            (Api::Chat, false) => c["message"] = json!({"role": "assistant", "content": text}),
            (Api::Chat, true) if text.is_empty() => c["delta"] = json!({}),
            (Api::Chat, true) => c["delta"] = json!({"content": text}),
        }
        c
    }
}

/// Reads the events of one request to the end: the whole completion's JSON.
pub async fn collect(head: &Head, mut rx: ObservedEvents) -> Result<Value, ApiError> {
    let mut tokens = Vec::new();
    loop {
        match rx.recv().await {
            Some(SeqEvent::Token(t)) => tokens.push(t),
            Some(SeqEvent::Finished { reason, usage, .. }) => {
                let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
                let choice = head.choice(
                    false,
                    &text,
                    head.logprobs(&tokens, 0),
                    Some(finish_name(reason)),
                );
                let mut body = head.envelope(false, vec![choice]);
                body.insert("usage".into(), usage_json(&usage));
                return Ok(Value::Object(body));
            }
            Some(SeqEvent::Error(e)) => return Err(e.into()),
            None => return Err(vanished().into()),
        }
    }
}

fn vanished() -> RequestError {
    RequestError::Internal("the engine stopped before the sequence finished".into())
}

fn data(v: impl ToString) -> Event {
    Event::default().data(v.to_string())
}

/// Where a stream is.
struct StreamState {
    rx: Option<ObservedEvents>,
    /// Text sent so far (completions' `text_offset`).
    sent: usize,
    /// Whether the chat role chunk went out.
    started: bool,
}

/// The SSE events of one request, from its engine events.
pub fn event_stream(
    head: Head,
    include_usage: bool,
    rx: ObservedEvents,
) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send {
    let state = StreamState {
        rx: Some(rx),
        sent: 0,
        started: false,
    };
    let events = futures::stream::unfold(state, move |mut st| {
        let head = head.clone();
        async move {
            let mut rx = st.rx.take()?;
            let mut out = Vec::new();
            if head.api == Api::Chat && !st.started {
                st.started = true;
                let mut c = head.choice(true, "", Value::Null, None);
                c["delta"] = json!({"role": "assistant", "content": ""});
                out.push(data(Value::Object(head.envelope(true, vec![c]))));
            }
            match rx.recv().await {
                Some(SeqEvent::Token(t)) => {
                    let lp = head.logprobs(std::slice::from_ref(&t), st.sent);
                    st.sent += t.text.len();
                    let c = head.choice(true, &t.text, lp, None);
                    out.push(data(Value::Object(head.envelope(true, vec![c]))));
                    st.rx = Some(rx);
                }
                Some(SeqEvent::Finished { reason, usage, .. }) => {
                    let c = head.choice(true, "", Value::Null, Some(finish_name(reason)));
                    out.push(data(Value::Object(head.envelope(true, vec![c]))));
                    if include_usage {
                        let mut u = head.envelope(true, vec![]);
                        u.insert("usage".into(), usage_json(&usage));
                        out.push(data(Value::Object(u)));
                    }
                    out.push(data("[DONE]"));
                }
                Some(SeqEvent::Error(e)) => {
                    out.push(data(ApiError(e).body()));
                    out.push(data("[DONE]"));
                }
                None => {
                    out.push(data(ApiError(vanished()).body()));
                    out.push(data("[DONE]"));
                }
            }
            Some((out, st))
        }
    });
    use futures::StreamExt;
    events.flat_map(|batch| futures::stream::iter(batch.into_iter().map(Ok)))
}
