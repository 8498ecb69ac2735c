//! Parity of the GGUF-built tokenizer with the Hugging Face transformers oracle.
//!
//! `tests/fixtures/tokenizer_cases.json` is a copy of the oracle's `tokenizer_cases.json`: ids
//! produced by transformers (`add_special_tokens=False`) from the same GGUF.

use std::path::{Path, PathBuf};

use multilora::model::tokenizer::{ChatMessage, IncrementalDetokenizer, TextTokenizer};

fn manifest_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn gguf_tokenizer() -> TextTokenizer {
    let path = manifest_path("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .unwrap_or_else(|e| panic!("cannot read GGUF {}: {e}", path.display()));
    TextTokenizer::from_gguf(&content).expect("tokenizer from GGUF metadata")
}

struct Case {
    text: String,
    ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let path = manifest_path("tests/fixtures/tokenizer_cases.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read tokenizer cases"))
            .expect("tokenizer cases are JSON");
    let cases = json["cases"].as_array().expect("cases array");
    assert!(!cases.is_empty());
    cases
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_owned(),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|id| u32::try_from(id.as_u64().expect("id")).expect("u32 id"))
                .collect(),
        })
        .collect()
}

#[test]
#[ignore = "needs the real model: make test"]
fn gguf_tokenizer_matches_transformers() {
    let tok = gguf_tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_token_ids(), &[2]);
    for case in cases() {
        let ids = tok.encode(&case.text).expect("encode");
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        let text = tok.decode(&case.ids, false).expect("decode");
        assert_eq!(text, case.text, "decode of {:?}", case.ids);

        // Streaming the ids gives the same text as decoding them (special tokens skipped).
        let mut detok = IncrementalDetokenizer::new(&[]);
        let mut streamed = String::new();
        for &id in &case.ids {
            let delta = detok.push(&tok, id).expect("push");
            assert!(!delta.contains('\u{fffd}'), "{:?}: {delta:?}", case.text);
            streamed.push_str(&delta);
        }
        streamed.push_str(&detok.flush(&tok).expect("flush"));
        assert_eq!(
            streamed,
            tok.decode(&case.ids, true).expect("decode"),
            "streamed {:?}",
            case.text
        );
    }
}

#[test]
#[ignore = "needs the real model: make test"]
fn gguf_chat_template_renders_smollm2_format() {
    let tok = gguf_tokenizer();
    assert!(tok.has_chat_template());
    let prompt = tok
        .apply_chat_template(&[ChatMessage {
            role: "user".to_owned(),
            content: "Hi there".to_owned(),
        }])
        .expect("render chat template");
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(prompt.ends_with("<|im_start|>assistant\n"));
    let ids = tok.encode(&prompt).expect("encode prompt");
    assert_eq!(ids.first(), Some(&1), "starts with <|im_start|>");
    assert_eq!(
        ids.iter().filter(|&&id| id == 2).count(),
        2,
        "two <|im_end|>"
    );
}
