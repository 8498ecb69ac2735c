//! Text tokenizer (Hugging Face `tokenizers`), with its chat template
//! (`super::chat_template`) and streaming detokenization (`super::detokenizer`).
//!
//! A [`TextTokenizer`] can be built from a Hugging Face model folder (`tokenizer.json` and
//! friends), from GGUF metadata (byte-level BPE, `tokenizer.ggml.model == "gpt2"`, or
//! SentencePiece-style BPE, `"llama"`, in `tokenizer_spm.rs`; both built the way Hugging Face
//! transformers builds them), or as a tiny byte-level tokenizer for tests.
//! [`IncrementalDetokenizer`] turns a stream of generated ids into text deltas that never end
//! in a broken UTF-8 sequence.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

pub use super::chat_template::ChatMessage;
use super::chat_template::{json_chat_template, ChatTemplate};
pub use super::detokenizer::IncrementalDetokenizer;

/// GGUF `tokenizer.ggml.token_type` value of a control (special) token.
const GGUF_TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `tokenizer.ggml.token_type` value of a user-defined token (matched in text, not special).
const GGUF_TOKEN_TYPE_USER_DEFINED: i64 = 4;
/// The `tokenizer.ggml.model`s [`TextTokenizer::from_gguf`] can build.
const SUPPORTED_GGUF_MODELS: [&str; 2] = ["gpt2", "llama"];

/// GGUF metadata, as `candle` reads it.
type GgufMetadata = HashMap<String, gguf_file::Value>;

/// The chat template of SmolLM2-Instruct, also used by [`TextTokenizer::byte_level_for_tests`].
#[cfg(any(test, feature = "test-support"))]
const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A tokenizer plus what generation needs around it: EOS ids, the chat template and the
/// special tokens used to render it.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    eos_token_ids: Vec<u32>,
    bos_token: String,
    eos_token: String,
    chat_template: ChatTemplate,
    /// The template's source text, kept so the tokenizer can be written back out.
    chat_template_source: Option<String>,
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.eos_token_ids)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("has_chat_template", &self.has_chat_template())
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// From a Hugging Face model folder: `tokenizer.json` (required), plus if present
    /// `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`), `chat_template.jinja`
    /// / `chat_template.json`, and the `eos_token_id` of `generation_config.json` and
    /// `config.json`. The EOS ids are the union of all of these, in that order of preference.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("cannot load {}: {e}", tokenizer_path.display()))?;

        let tokenizer_config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_json_if_exists(&dir.join("generation_config.json"))?;
        let model_config = read_json_if_exists(&dir.join("config.json"))?;

        let config_token = |key: &str| -> Option<String> {
            tokenizer_config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(special_token_content)
        };
        let bos_token = config_token("bos_token");
        let eos_token = config_token("eos_token");

        let mut eos_token_ids = Vec::new();
        for config in [&generation_config, &model_config].into_iter().flatten() {
            if let Some(v) = config.get("eos_token_id") {
                for id in json_token_ids(v) {
                    push_unique(&mut eos_token_ids, id);
                }
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            push_unique(&mut eos_token_ids, id);
        }

        let chat_template = read_hf_chat_template(dir, tokenizer_config.as_ref())?;
        Ok(Self::assemble(
            inner,
            eos_token_ids,
            bos_token,
            eos_token,
            chat_template,
        ))
    }

    /// From GGUF metadata, built exactly like Hugging Face transformers builds it from a GGUF.
    /// Two `tokenizer.ggml.model`s are supported:
    /// - `"gpt2"`, byte-level BPE: BPE over `tokenizer.ggml.tokens` (index = id) and
    ///   `tokenizer.ggml.merges`, GPT-2 byte-level pre-tokenizer and decoder;
    /// - `"llama"`, SentencePiece-style BPE with byte fallback (Llama-2, Mistral, Phi-3, Gemma),
    ///   merges derived from `tokenizer.ggml.scores`; see `tokenizer_spm.rs`.
    ///
    /// Every control token (`token_type` 3) is a special added token, recognised in text; a
    /// user-defined one (4) a plain added token. EOS ids come from `tokenizer.ggml.eos_token_id`
    /// (plus `eot_token_id` / `eom_token_id` when present), the template from
    /// `tokenizer.chat_template`. Any other tokenizer model is refused by name.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let model = md
            .get("tokenizer.ggml.model")
            .context("GGUF has no tokenizer.ggml.model: no tokenizer in this file")?
            .to_string()
            .map_err(|e| anyhow!("GGUF tokenizer.ggml.model is not a string: {e}"))?;
        if !SUPPORTED_GGUF_MODELS.contains(&model.as_str()) {
            bail!(
                "unsupported GGUF tokenizer model {model:?}: supported are {}",
                SUPPORTED_GGUF_MODELS.map(|m| format!("{m:?}")).join(", ")
            );
        }
        let tokens = gguf_tokens(md)?;
        let token_types = gguf_token_types(md, tokens.len())?;
        let merges = gguf_merges(md)?;
        let inner = if model == "llama" {
            spm::spm_tokenizer(md, &tokens, &token_types, merges)?
        } else {
            gpt2_tokenizer(&tokens, &token_types, merges.unwrap_or_default())?
        };

        let token_of = |key: &str| -> Result<Option<(u32, String)>> {
            let Some(v) = md.get(key) else {
                return Ok(None);
            };
            let id = gguf_int(v)
                .and_then(|id| u32::try_from(id).ok())
                .with_context(|| format!("GGUF {key} is not a token id"))?;
            let token = tokens
                .get(id as usize)
                .with_context(|| format!("GGUF {key} = {id} is out of the vocabulary"))?;
            Ok(Some((id, token.clone())))
        };
        let eos = token_of("tokenizer.ggml.eos_token_id")?;
        let bos = token_of("tokenizer.ggml.bos_token_id")?;
        let mut eos_token_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some((id, _)) = token_of(key)? {
                push_unique(&mut eos_token_ids, id);
            }
        }

        let chat_template = match md.get("tokenizer.chat_template") {
            None => None,
            Some(v) => Some(
                v.to_string()
                    .map_err(|e| anyhow!("GGUF tokenizer.chat_template is not a string: {e}"))?
                    .clone(),
            ),
        };
        Ok(Self::assemble(
            inner,
            eos_token_ids,
            bos.map(|(_, t)| t),
            eos.map(|(_, t)| t),
            chat_template,
        ))
    }

    /// A tiny byte-level tokenizer for tests with random tiny models: ids 0, 1, 2 are the
    /// special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`; id `3 + b` is byte `b`
    /// (as its GPT-2 byte-level symbol), so the vocabulary has 259 entries. No merges, so every
    /// byte of the text is one token. EOS is `[2]`; the chat template is SmolLM2's.
    #[cfg(any(test, feature = "test-support"))]
    pub fn byte_level_for_tests() -> Result<Self> {
        const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        let mut vocab = serde_json::Map::new();
        let mut added_tokens = Vec::new();
        for (id, token) in SPECIALS.iter().enumerate() {
            vocab.insert((*token).to_owned(), json!(id));
            added_tokens.push(added_token(id, token, true));
        }
        for (b, symbol) in byte_level_symbols()?.iter().enumerate() {
            vocab.insert(symbol.to_string(), json!(SPECIALS.len() + b));
        }
        let inner = byte_level_bpe(Json::Object(vocab), Vec::new(), added_tokens)?;
        Ok(Self::assemble(
            inner,
            vec![2],
            Some(SPECIALS[1].to_owned()),
            Some(SPECIALS[2].to_owned()),
            Some(SMOLLM2_CHAT_TEMPLATE.to_owned()),
        ))
    }

    fn assemble(
        inner: Tokenizer,
        eos_token_ids: Vec<u32>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Self {
        let eos_token = eos_token
            .or_else(|| eos_token_ids.first().and_then(|&id| inner.id_to_token(id)))
            .unwrap_or_default();
        Self {
            inner,
            eos_token_ids,
            bos_token: bos_token.unwrap_or_default(),
            eos_token,
            chat_template: ChatTemplate::from_source(chat_template.clone()),
            chat_template_source: chat_template,
        }
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (BOS/EOS tokens, chat
    /// template) into `dir`, so that [`Self::from_hf_dir`] reads back the same tokenizer.
    pub fn save_hf_files(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        let mut config = json!({
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        if let Some(template) = &self.chat_template_source {
            config["chat_template"] = json!(template);
        }
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, config.to_string())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation (may be empty when the model declares none).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Encode without adding special tokens (no BOS); special tokens written in the text, such
    /// as `<|im_start|>`, are recognised as their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizer encode failed: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decode ids to text; unknown ids are skipped. Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("tokenizer decode failed: {e}"))
    }

    /// Render `messages` with the model's chat template, with `add_generation_prompt = true`
    /// (so the result ends with the assistant turn's header), `bos_token` and `eos_token`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        self.chat_template
            .render(messages, &self.bos_token, &self.eos_token)
    }

    /// Whether [`Self::apply_chat_template`] can work (the model ships a template that compiles).
    pub fn has_chat_template(&self) -> bool {
        matches!(self.chat_template, ChatTemplate::Ready(_))
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Ids of the special added tokens (those `decode(.., true)` skips).
    pub fn special_token_ids(&self) -> HashSet<u32> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect()
    }
}

/// The byte-level BPE tokenizer of a `"gpt2"` GGUF: every control token special, every
/// user-defined one a plain added token.
fn gpt2_tokenizer(
    tokens: &[String],
    token_types: &[i64],
    merges: Vec<(String, String)>,
) -> Result<Tokenizer> {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added_tokens = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.clone(), json!(id)).is_some() {
            bail!("GGUF token {token:?} appears twice in tokenizer.ggml.tokens");
        }
        let special = match token_types.get(id).copied() {
            Some(GGUF_TOKEN_TYPE_CONTROL) => true,
            Some(GGUF_TOKEN_TYPE_USER_DEFINED) => false,
            _ => continue,
        };
        added_tokens.push(added_token(id, token, special));
    }
    let merges = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    byte_level_bpe(Json::Object(vocab), merges, added_tokens)
}

/// `tokenizer.ggml.tokens`, index = id.
fn gguf_tokens(md: &GgufMetadata) -> Result<Vec<String>> {
    gguf_array(md, "tokenizer.ggml.tokens")?
        .context("GGUF has no tokenizer.ggml.tokens")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.to_string()
                .cloned()
                .map_err(|e| anyhow!("GGUF tokenizer.ggml.tokens[{i}] is not a string: {e}"))
        })
        .collect()
}

/// `tokenizer.ggml.token_type`, one per token, or empty when the file has none.
fn gguf_token_types(md: &GgufMetadata, token_count: usize) -> Result<Vec<i64>> {
    let token_types: Vec<i64> = match gguf_array(md, "tokenizer.ggml.token_type")? {
        None => return Ok(Vec::new()),
        Some(values) => values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                gguf_int(v).with_context(|| {
                    format!("GGUF tokenizer.ggml.token_type[{i}] is not an integer")
                })
            })
            .collect::<Result<_>>()?,
    };
    if token_types.len() != token_count {
        bail!(
            "GGUF has {token_count} tokens but {} token types",
            token_types.len()
        );
    }
    Ok(token_types)
}

/// `tokenizer.ggml.merges` ("a b" strings) as pairs, if the file has them.
fn gguf_merges(md: &GgufMetadata) -> Result<Option<Vec<(String, String)>>> {
    let Some(values) = gguf_array(md, "tokenizer.ggml.merges")? else {
        return Ok(None);
    };
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = v
                .to_string()
                .map_err(|e| anyhow!("GGUF tokenizer.ggml.merges[{i}] is not a string: {e}"))?;
            let (a, b) = s.split_once(' ').with_context(|| {
                format!("GGUF tokenizer.ggml.merges[{i}] = {s:?} is not \"a b\"")
            })?;
            Ok((a.to_owned(), b.to_owned()))
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// An `added_tokens` entry of a tokenizer.json: matched whole, never normalised.
fn added_token(id: usize, content: &str, special: bool) -> Json {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

/// Build a byte-level BPE tokenizer with exactly the configuration Hugging Face transformers
/// gives a GGUF "gpt2" tokenizer.
fn byte_level_bpe(vocab: Json, merges: Vec<Json>, added_tokens: Vec<Json>) -> Result<Tokenizer> {
    let config = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {},
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    serde_json::from_value(config).context("cannot build the byte-level BPE tokenizer")
}

/// The GPT-2 byte-level alphabet: the printable symbol standing for each byte value.
#[cfg(any(test, feature = "test-support"))]
fn byte_level_symbols() -> Result<Vec<char>> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                Ok(char::from(b))
            } else {
                let c = char::from_u32(next).context("byte-level symbol out of range")?;
                next += 1;
                Ok(c)
            }
        })
        .collect()
}

/// The chat template of a Hugging Face folder: `chat_template.jinja`, else
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
/// "default" is used), else `chat_template.json`.
fn read_hf_chat_template(dir: &Path, tokenizer_config: Option<&Json>) -> Result<Option<String>> {
    let jinja_path = dir.join("chat_template.jinja");
    if jinja_path.is_file() {
        let source = std::fs::read_to_string(&jinja_path)
            .with_context(|| format!("cannot read {}", jinja_path.display()))?;
        return Ok(Some(source));
    }
    if let Some(t) = tokenizer_config
        .and_then(|c| c.get("chat_template"))
        .and_then(json_chat_template)
    {
        return Ok(Some(t));
    }
    Ok(read_json_if_exists(&dir.join("chat_template.json"))?
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(json_chat_template))
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn special_token_content(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Token ids from an `eos_token_id` field: an integer or a list of integers.
fn json_token_ids(v: &Json) -> Vec<u32> {
    let one = |v: &Json| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match v {
        Json::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(value))
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

/// An array-valued GGUF metadata entry, if present.
fn gguf_array<'a>(md: &'a GgufMetadata, key: &str) -> Result<Option<&'a Vec<gguf_file::Value>>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_vec()
            .map(Some)
            .map_err(|e| anyhow!("GGUF {key} is not an array: {e}")),
    }
}

/// Any integer-valued GGUF metadata value as an i64.
fn gguf_int(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    match v {
        V::U8(x) => Some(i64::from(*x)),
        V::I8(x) => Some(i64::from(*x)),
        V::U16(x) => Some(i64::from(*x)),
        V::I16(x) => Some(i64::from(*x)),
        V::U32(x) => Some(i64::from(*x)),
        V::I32(x) => Some(i64::from(*x)),
        V::U64(x) => i64::try_from(*x).ok(),
        V::I64(x) => Some(*x),
        _ => None,
    }
}

#[path = "tokenizer_spm.rs"]
mod spm;

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;
