//! SentencePiece-style GGUF tokenizers (`tokenizer.ggml.model == "llama"`, as in Llama-2,
//! Mistral, Phi-3 and Gemma files): the Hugging Face `tokenizers` pipeline that mirrors how
//! transformers builds one from such a GGUF, and the merge list it derives from the scores.
//!
//! The model is BPE with byte fallback (`<0xXX>` tokens) over `tokenizer.ggml.tokens` (index =
//! id). A GGUF of this kind normally has no merges; like transformers' `generate_merges`, every
//! split of a token into two vocabulary tokens becomes a merge, ranked by the token's score
//! (best first), which reproduces SentencePiece's "merge the best-scoring pair" loop. Gemma
//! files rank by position instead and spell runs of spaces with real spaces, which are
//! respelled as `▁` runs (transformers' `gemma_tokenizer`).
//!
//! Spaces become `▁` (U+2581) in a normalizer, with a `▁` prepended to each piece of text
//! between special tokens when `tokenizer.ggml.add_space_prefix` is on (the default, as in
//! llama.cpp): that is transformers' Phi-3 shape and its 4.x `GGUFLlamaConverter`, and it
//! gives llama.cpp's ids for leading spaces, where transformers 5's `Metaspace` for
//! `general.architecture == "llama"` does not. The decoder is Replace(`▁`→` `), ByteFallback,
//! Fuse, and (with the prefix) Strip of the one prepended space. The post-processor adds BOS /
//! EOS per `tokenizer.ggml.add_bos_token` / `add_eos_token` (defaults on / off, as llama.cpp).

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use super::{added_token, gguf_array, gguf_int, GGUF_TOKEN_TYPE_CONTROL};
use super::{GgufMetadata, GGUF_TOKEN_TYPE_USER_DEFINED};

/// The SentencePiece word-boundary symbol that stands for a space.
const SPACE: &str = "\u{2581}";

/// Architectures whose GGUF vocabulary transformers reads the Gemma way.
const GEMMA_ARCHITECTURES: [&str; 3] = ["gemma", "gemma2", "gemma3"];

/// The special tokens transformers' `LlamaTokenizer` registers before it reads the file's own
/// (so `decode(.., skip_special_tokens)` skips them too, whatever their token type).
const LLAMA_CLASS_SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];
/// The same for `GemmaTokenizer`.
const GEMMA_CLASS_SPECIALS: [&str; 5] = ["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"];

/// The special tokens a "llama" GGUF names by id.
#[derive(Debug, Default, Clone, Copy)]
struct NamedIds {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

/// Build the tokenizer of a `tokenizer.ggml.model == "llama"` GGUF from its metadata, given
/// its already-read tokens and token types (empty when the file has none).
pub(super) fn spm_tokenizer(
    md: &GgufMetadata,
    tokens: &[String],
    token_types: &[i64],
    merges: Option<Vec<(String, String)>>,
) -> Result<Tokenizer> {
    let architecture = match md.get("general.architecture") {
        None => None,
        Some(v) => Some(
            v.to_string()
                .map_err(|e| anyhow!("GGUF general.architecture is not a string: {e}"))?
                .as_str(),
        ),
    };
    let gemma = architecture.is_some_and(|a| GEMMA_ARCHITECTURES.contains(&a));
    let ids = NamedIds {
        bos: token_id(md, "tokenizer.ggml.bos_token_id", tokens.len())?,
        eos: token_id(md, "tokenizer.ggml.eos_token_id", tokens.len())?,
        unk: token_id(md, "tokenizer.ggml.unknown_token_id", tokens.len())?,
        pad: token_id(md, "tokenizer.ggml.padding_token_id", tokens.len())?,
    };
    let add_space_prefix = gguf_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(!gemma);
    let add_bos = gguf_bool(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(true);
    let add_eos = gguf_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    let vocab_tokens: Vec<String> = if gemma {
        tokens.iter().map(|t| respell_gemma_spaces(t)).collect()
    } else {
        tokens.to_vec()
    };
    let merges = match merges {
        Some(merges) => merges,
        None => derived_merges(md, &vocab_tokens, gemma)?,
    };
    let mut vocab = serde_json::Map::with_capacity(vocab_tokens.len());
    for (id, token) in vocab_tokens.iter().enumerate() {
        // As a Python dict built from the list: a repeated token keeps its last id.
        vocab.insert(token.clone(), json!(id));
    }
    let class_specials: &[&str] = if gemma {
        &GEMMA_CLASS_SPECIALS
    } else {
        &LLAMA_CLASS_SPECIALS
    };
    let added_tokens = spm_added_tokens(tokens, token_types, &vocab, ids, class_specials);
    let unk_token = ids.unk.and_then(|id| vocab_tokens.get(id as usize));

    let config = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": spm_normalizer(add_space_prefix),
        "pre_tokenizer": if gemma { gemma_pre_tokenizer() } else { Json::Null },
        "post_processor": bos_eos_post_processor(tokens, ids, add_bos, add_eos),
        "decoder": spm_decoder(add_space_prefix),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk_token,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": Json::Object(vocab),
            "merges": merges.into_iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        },
    });
    serde_json::from_value(config).context("cannot build the SentencePiece-style BPE tokenizer")
}

/// The merges of a file that lists none (transformers' `get_merges`): ranked by
/// `tokenizer.ggml.scores`, or for Gemma by position (its scores do not follow its merge
/// order; the file's order does).
fn derived_merges(
    md: &GgufMetadata,
    vocab_tokens: &[String],
    gemma: bool,
) -> Result<Vec<(String, String)>> {
    let ranks: Vec<f64> = if gemma {
        (0..vocab_tokens.len()).map(|i| -(i as f64)).collect()
    } else {
        gguf_scores(md, vocab_tokens.len())?
    };
    Ok(generate_merges(vocab_tokens, &ranks))
}

/// transformers' `generate_merges(vocab, vocab_scores)`: for each token (in vocabulary order,
/// a repeated token at its first place), every split into two vocabulary tokens, ordered by
/// the two halves' ids; then all of them stably sorted by (score, left length, right length)
/// in descending order, lengths in characters.
pub(super) fn generate_merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        ids.insert(token.as_str(), id);
    }
    // A Python dict's value for a repeated key is its last one, its place the first one.
    let mut seen = HashSet::with_capacity(tokens.len());
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for token in tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let score = ids
            .get(token.as_str())
            .and_then(|&id| scores.get(id).copied())
            .unwrap_or(0.0);
        // -0.0 and 0.0 compare equal in Python; NaN does not occur in real files.
        let score = if score == 0.0 { 0.0 } else { score };
        let mut local: Vec<(usize, usize, &str, &str)> = Vec::new();
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                local.push((l, r, left, right));
            }
        }
        local.sort_by_key(|&(l, r, _, _)| (l, r));
        merges.extend(local.into_iter().map(|(_, _, left, right)| {
            (
                left,
                right,
                score,
                left.chars().count(),
                right.chars().count(),
            )
        }));
    }
    // Stable, so equal keys keep their order, as Python's `sorted(..., reverse=True)` does.
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then_with(|| b.3.cmp(&a.3))
            .then_with(|| b.4.cmp(&a.4))
    });
    merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_owned(), r.to_owned()))
        .collect()
}

/// transformers' Gemma respelling: a token made only of whitespace that holds a space is
/// written as that many `▁`.
fn respell_gemma_spaces(token: &str) -> String {
    if token.contains(' ') && token.chars().all(python_whitespace) {
        SPACE.repeat(token.chars().count())
    } else {
        token.to_owned()
    }
}

/// Python's `str.isspace` (what `str.strip()` removes), close enough for vocabulary tokens.
fn python_whitespace(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}')
}

/// The added tokens: control tokens, the named BOS / EOS / unknown / padding tokens and the
/// tokenizer class's own special tokens (when the vocabulary has them) as special;
/// user-defined tokens (found in the vocabulary as spelled) as plain added tokens.
fn spm_added_tokens(
    tokens: &[String],
    token_types: &[i64],
    vocab: &serde_json::Map<String, Json>,
    ids: NamedIds,
    class_specials: &[&str],
) -> Vec<Json> {
    let class_ids = class_specials
        .iter()
        .filter_map(|t| vocab.get(*t)?.as_u64())
        .filter_map(|id| u32::try_from(id).ok());
    let named: HashSet<u32> = [ids.bos, ids.eos, ids.unk, ids.pad]
        .into_iter()
        .flatten()
        .chain(class_ids)
        .collect();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let token_type = token_types.get(id).copied();
        let special = token_type == Some(GGUF_TOKEN_TYPE_CONTROL)
            || u32::try_from(id).is_ok_and(|id| named.contains(&id));
        let user_defined = token_type == Some(GGUF_TOKEN_TYPE_USER_DEFINED);
        if (special || user_defined) && vocab.get(token) == Some(&json!(id)) {
            added.push(added_token(id, token, special));
        }
    }
    added
}

/// Spaces as `▁`, with one `▁` first when the vocabulary adds a space prefix.
fn spm_normalizer(add_space_prefix: bool) -> Json {
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
    if add_space_prefix {
        json!({
            "type": "Sequence",
            "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace],
        })
    } else {
        replace
    }
}

/// transformers' `GemmaTokenizer` pre-tokenizer (a no-op once spaces are `▁`, kept to match).
fn gemma_pre_tokenizer() -> Json {
    json!({
        "type": "Split",
        "pattern": {"String": " "},
        "behavior": "MergedWithPrevious",
        "invert": false,
    })
}

/// `▁` back to spaces, `<0xXX>` tokens back to bytes, and the prepended space dropped.
fn spm_decoder(add_space_prefix: bool) -> Json {
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({"type": "Sequence", "decoders": decoders})
}

/// transformers' `update_post_processor`: `[BOS] $A [EOS]` (and the pair form), each only when
/// the file asks for it and names the token.
fn bos_eos_post_processor(tokens: &[String], ids: NamedIds, add_bos: bool, add_eos: bool) -> Json {
    let named = |on: bool, id: Option<u32>| {
        on.then_some(id)
            .flatten()
            .and_then(|id| Some((id, tokens.get(id as usize)?.clone())))
    };
    let bos = named(add_bos, ids.bos);
    let eos = named(add_eos, ids.eos);
    let piece =
        |token: &str, type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
    let sequence = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let with_specials = |name: &str, type_id: u32| {
        let mut out = Vec::new();
        out.extend(bos.iter().map(|(_, t)| piece(t, type_id)));
        out.push(sequence(name, type_id));
        out.extend(eos.iter().map(|(_, t)| piece(t, type_id)));
        out
    };
    let single = with_specials("A", 0);
    let mut pair = single.clone();
    pair.extend(with_specials("B", 1));
    let mut special_tokens = serde_json::Map::new();
    for (id, token) in bos.iter().chain(eos.iter()) {
        special_tokens.insert(
            token.clone(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}

/// `tokenizer.ggml.scores`, one per token.
fn gguf_scores(md: &GgufMetadata, count: usize) -> Result<Vec<f64>> {
    let values = gguf_array(md, "tokenizer.ggml.scores")?
        .context("GGUF has neither tokenizer.ggml.scores nor tokenizer.ggml.merges")?;
    if values.len() != count {
        bail!("GGUF has {count} tokens but {} scores", values.len());
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            gguf_file::Value::F32(x) => Ok(f64::from(*x)),
            gguf_file::Value::F64(x) => Ok(*x),
            other => gguf_int(other)
                .map(|x| x as f64)
                .with_context(|| format!("GGUF tokenizer.ggml.scores[{i}] is not a number")),
        })
        .collect()
}

/// A token-id metadata entry, checked against the vocabulary size.
fn token_id(md: &GgufMetadata, key: &str, vocab_size: usize) -> Result<Option<u32>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let id = gguf_int(v)
        .and_then(|id| u32::try_from(id).ok())
        .with_context(|| format!("GGUF {key} is not a token id"))?;
    if id as usize >= vocab_size {
        bail!("GGUF {key} = {id} is out of the vocabulary");
    }
    Ok(Some(id))
}

/// A boolean metadata entry, if present.
fn gguf_bool(md: &GgufMetadata, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => gguf_int(other)
            .map(|x| Some(x != 0))
            .with_context(|| format!("GGUF {key} is not a boolean")),
    }
}
