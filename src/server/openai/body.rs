//! The request bodies of OpenAI's Completions and Chat Completions APIs as the OpenAI
//! SDKs send them, and their one mapping onto a [`pb::GenerateRequest`], so the HTTP
//! front shares the gRPC path's validation, adapter lifecycle and errors. `model` names
//! the base model or an adapter; `adapters` (this server's extension, as in gRPC) names
//! a weighted mixture, with `model` the base. Parameters this server does not implement
//! are refused by name when set to anything but their neutral value, never ignored.
use crate::error::RequestError;
use crate::proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value};

/// `prompt`: one text or one list of token ids (a batch of prompts is refused).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or several.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// One member of a mixture (`adapters`).
#[derive(Deserialize, Debug)]
pub struct AdapterWeight {
    pub name: String,
    pub weight: f32,
}

/// What Completions and Chat Completions share.
#[derive(Deserialize, Debug)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub adapters: Vec<AdapterWeight>,
    /// Every other field, refused unless neutral ([`refuse_unsupported`]).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `POST /v1/completions`.
#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Top alternatives per token (0 to 20); unset: no logprobs.
    pub logprobs: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
}

/// A chat message's `content`: text, or parts of which only text is served.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize, Debug)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

/// `POST /v1/chat/completions`.
#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
}

/// Fields accepted with any value (they change nothing here).
const HARMLESS: [&str; 2] = ["user", "metadata"];

/// Fields accepted only with their neutral value.
fn neutral(field: &str, value: &Value) -> bool {
    match field {
        "frequency_penalty" | "presence_penalty" => value.as_f64() == Some(0.0),
        "echo" => value.as_bool() == Some(false),
        "best_of" => value.as_u64() == Some(1),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty),
        "suffix" | "response_format" | "tools" | "tool_choice" => false,
        _ => false,
    }
}

/// Refuses any field this server does not implement, unless null, harmless or neutral.
fn refuse_unsupported(other: &Map<String, Value>) -> Result<(), RequestError> {
    for (field, value) in other {
        if value.is_null() || HARMLESS.contains(&field.as_str()) || neutral(field, value) {
            continue;
        }
        return Err(RequestError::invalid(
            field.clone(),
            "is not supported by this server",
        ));
    }
    Ok(())
}

impl Common {
    /// The shared fields of `pb::GenerateRequest`; `base` is the base model's name.
    fn to_pb(
        &self,
        base: &str,
        max_tokens: Option<u32>,
    ) -> Result<pb::GenerateRequest, RequestError> {
        refuse_unsupported(&self.other)?;
        if self.n.is_some_and(|n| n != 1) {
            return Err(RequestError::invalid("n", "only n = 1 is served"));
        }
        let adapter = if self.model == base || self.model.is_empty() {
            String::new()
        } else {
            self.model.clone()
        };
        if !adapter.is_empty() && !self.adapters.is_empty() {
            return Err(RequestError::invalid(
                "adapters",
                "a mixture is given with `model` naming the base model, not an adapter",
            ));
        }
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok(pb::GenerateRequest {
            adapter,
            max_new_tokens: max_tokens,
            sampling: Some(pb::SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                ..Default::default()
            }),
            stop,
            adapters: self
                .adapters
                .iter()
                .map(|a| pb::AdapterWeight {
                    name: a.name.clone(),
                    weight: a.weight,
                })
                .collect(),
            ..Default::default()
        })
    }

    /// Whether a streamed response ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl CompletionRequest {
    pub fn to_pb(&self, base: &str) -> Result<pb::GenerateRequest, RequestError> {
        let mut req = self.common.to_pb(base, self.common.max_tokens)?;
        match &self.prompt {
            Prompt::Text(t) => req.prompt = Some(t.clone()),
            Prompt::Tokens(ids) => req.prompt_token_ids = ids.clone(),
            Prompt::Texts(v) if v.len() == 1 => req.prompt = Some(v[0].clone()),
            Prompt::TokenLists(v) if v.len() == 1 => req.prompt_token_ids = v[0].clone(),
            _ => {
                return Err(RequestError::invalid(
                    "prompt",
                    "a batch of prompts is not served; send one prompt per request",
                ))
            }
        }
        req.logprobs = self.logprobs;
        Ok(req)
    }
}

impl ChatRequest {
    pub fn to_pb(&self, base: &str) -> Result<pb::GenerateRequest, RequestError> {
        let max = self.max_completion_tokens.or(self.common.max_tokens);
        let mut req = self.common.to_pb(base, max)?;
        for (i, m) in self.messages.iter().enumerate() {
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => text_parts(parts, i)?,
            };
            req.messages.push(pb::ChatMessage {
                role: m.role.clone(),
                content,
            });
        }
        req.logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), top) => Some(top.unwrap_or(0)),
            (_, Some(_)) => {
                return Err(RequestError::invalid(
                    "top_logprobs",
                    "needs logprobs: true",
                ))
            }
            _ => None,
        };
        Ok(req)
    }
}

/// The text of a message given as content parts (`{"type": "text", "text": ...}`).
fn text_parts(parts: &[Value], message: usize) -> Result<String, RequestError> {
    let mut text = String::new();
    for part in parts {
        match (part["type"].as_str(), part["text"].as_str()) {
            (Some("text"), Some(t)) => text.push_str(t),
            _ => {
                return Err(RequestError::invalid(
                    format!("messages[{message}].content"),
                    "only text parts are served",
                ))
            }
        }
    }
    Ok(text)
}
