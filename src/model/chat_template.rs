//! Chat templates: the model's Jinja template compiled once (minijinja, with
//! transformers' settings and Python-compatible methods) and rendered for a list of
//! [`ChatMessage`]s.
use anyhow::{anyhow, bail, Result};
use minijinja::{context, Environment, ErrorKind};
use serde_json::Value as Json;

/// Name under which the chat template is registered in its minijinja environment.
const CHAT_TEMPLATE_NAME: &str = "chat_template";

/// One chat message: `role` ("system", "user", "assistant", ...) and its text.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// Convenience constructor.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The model's chat template, compiled once.
#[derive(Clone)]
pub enum ChatTemplate {
    /// The model ships no template.
    Missing,
    /// A compiled template, ready to render.
    Ready(Box<Environment<'static>>),
    /// The model ships a template that minijinja could not compile (the error message).
    Broken(String),
}

impl ChatTemplate {
    pub fn from_source(source: Option<String>) -> Self {
        match source {
            None => Self::Missing,
            Some(src) => match build_chat_env(src) {
                Ok(env) => Self::Ready(Box::new(env)),
                Err(e) => Self::Broken(format!("{e:#}")),
            },
        }
    }

    /// `messages` rendered with `add_generation_prompt = true` (so the result ends with
    /// the assistant turn's header), `bos_token` and `eos_token`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let env = match self {
            ChatTemplate::Ready(env) => env,
            ChatTemplate::Missing => bail!("this model has no chat template"),
            ChatTemplate::Broken(e) => bail!("this model's chat template does not compile: {e}"),
        };
        let template = env.get_template(CHAT_TEMPLATE_NAME)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => bos_token,
                eos_token => eos_token,
            })
            .map_err(|e| anyhow!("chat template rendering failed: {e:#}"))
    }
}

/// Compile a chat template the way transformers renders them (Jinja with `trim_blocks` and
/// `lstrip_blocks`, Python string/dict methods, `raise_exception`).
fn build_chat_env(source: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template_owned(CHAT_TEMPLATE_NAME, source)?;
    Ok(env)
}

/// A chat template in JSON: a string, or a list of named templates of which "default"
/// (else the first) is used.
pub fn json_chat_template(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Array(named) => {
            let template_named = |name: &str| {
                named.iter().find_map(|t| {
                    (t.get("name")?.as_str()? == name)
                        .then(|| t.get("template")?.as_str().map(str::to_owned))
                        .flatten()
                })
            };
            template_named("default").or_else(|| {
                named
                    .first()
                    .and_then(|t| t.get("template")?.as_str().map(str::to_owned))
            })
        }
        _ => None,
    }
}
