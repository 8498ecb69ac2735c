//! Unit tests of the tokenizer module (kept apart so the module stays readable).
use super::*;
use std::io::Cursor;

fn tok() -> TextTokenizer {
    TextTokenizer::byte_level_for_tests().unwrap()
}

const SAMPLES: &[&str] = &[
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnewlines\r\n\n\nend\0nul",
    "Unicode: café naïve 日本語 中文 한국어 Ελληνικά русский",
    "Emoji: 🚀🔥👍🏽 and ZWJ 👨\u{200d}👩\u{200d}👧 flags 🇫🇷",
    "combining: e\u{301} a\u{308}\u{323}, \u{a0}nbsp, \u{feff}bom, \u{fffd} literal",
    "𝕄𝕒𝕥𝕙 \u{10ffff} \u{7f}\u{80}",
];

#[test]
fn byte_level_shape() {
    let t = tok();
    assert_eq!(t.vocab_size(), 259);
    assert_eq!(t.eos_token_ids(), &[2]);
    assert!(t.has_chat_template());
    assert_eq!(t.encode("a").unwrap(), vec![3 + u32::from(b'a')]);
    assert_eq!(t.encode("\u{0}").unwrap(), vec![3]);
    assert_eq!(t.encode("\u{ff}").unwrap(), vec![3 + 0xC3, 3 + 0xBF]);
    let specials = t.special_token_ids();
    assert_eq!(specials, HashSet::from([0, 1, 2]));
}

#[test]
fn byte_level_round_trips_utf8() {
    let t = tok();
    for text in SAMPLES {
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), text.len(), "one id per byte for {text:?}");
        assert!(ids.iter().all(|&id| (3..259).contains(&id)));
        assert_eq!(t.decode(&ids, false).unwrap(), *text);
        assert_eq!(t.decode(&ids, true).unwrap(), *text);
    }
}

#[test]
fn special_tokens_in_text_are_recognised() {
    let t = tok();
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    let mut expected = vec![1];
    expected.extend("user\nHi".bytes().map(|b| 3 + u32::from(b)));
    expected.push(2);
    assert_eq!(ids, expected);
    assert_eq!(
        t.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi");
}

fn stream(t: &TextTokenizer, ids: &[u32]) -> Vec<String> {
    let mut detok = IncrementalDetokenizer::new(&[1, 3 + u32::from(b'x')]);
    let mut deltas: Vec<String> = ids.iter().map(|&id| detok.push(t, id).unwrap()).collect();
    deltas.push(detok.flush(t).unwrap());
    assert_eq!(detok.ids(), ids);
    deltas
}

#[test]
fn incremental_matches_full_decode_without_broken_chars() {
    let t = tok();
    for text in SAMPLES {
        let ids = t.encode(text).unwrap();
        let deltas = stream(&t, &ids);
        let joined: String = deltas.concat();
        assert_eq!(joined, t.decode(&ids, true).unwrap());
        assert_eq!(joined, *text);
        // Only a literal U+FFFD in the text may show up, never a broken sequence.
        let fffd_in_text = text.matches('\u{fffd}').count();
        let fffd_in_deltas: usize = deltas.iter().map(|d| d.matches('\u{fffd}').count()).sum();
        assert_eq!(fffd_in_deltas, fffd_in_text, "{text:?}: {deltas:?}");
        assert_eq!(deltas.last().map(String::as_str), Some(""));
    }
}

#[test]
fn incremental_emits_each_char_when_complete() {
    let t = tok();
    let ids = t.encode("aé🚀").unwrap();
    let deltas = stream(&t, &ids);
    assert_eq!(deltas, ["a", "", "é", "", "", "", "🚀", ""]);
}

#[test]
fn incremental_skips_special_tokens() {
    let t = tok();
    let ids = t.encode("<|im_start|>a<|endoftext|>é<|im_end|>").unwrap();
    let deltas = stream(&t, &ids);
    assert_eq!(deltas.concat(), "aé");
    assert_eq!(deltas.concat(), t.decode(&ids, true).unwrap());
    // The special token between the two bytes of "é" does not break it.
    let e = "é".as_bytes();
    let ids = [3 + u32::from(e[0]), 0, 3 + u32::from(e[1])];
    let deltas = stream(&t, &ids);
    assert_eq!(deltas, ["", "", "é", ""]);
}

#[test]
fn incremental_flushes_invalid_tail_and_passes_invalid_middle() {
    let t = tok();
    // A lone leading byte at the end: held back, then flushed as U+FFFD.
    let ids = [3 + u32::from(b'o'), 3 + u32::from(b'k'), 3 + 0xF0];
    let deltas = stream(&t, &ids);
    assert_eq!(deltas, ["o", "k", "", "\u{fffd}"]);
    assert_eq!(deltas.concat(), t.decode(&ids, true).unwrap());
    // An invalid byte in the middle: released as soon as something valid follows.
    let ids = [3 + 0xFF, 3 + u32::from(b'a'), 3 + u32::from(b'b')];
    let deltas = stream(&t, &ids);
    assert_eq!(deltas, ["", "\u{fffd}a", "b", ""]);
    assert_eq!(deltas.concat(), t.decode(&ids, true).unwrap());
    // Flush twice is harmless; an empty stream yields nothing.
    let mut detok = IncrementalDetokenizer::new(&[]);
    assert_eq!(detok.flush(&t).unwrap(), "");
    assert_eq!(detok.push(&t, 3 + 0xE6).unwrap(), "");
    assert_eq!(detok.flush(&t).unwrap(), "\u{fffd}");
    assert_eq!(detok.flush(&t).unwrap(), "");
}

#[test]
fn chat_template_renders() {
    let t = tok();
    let out = t
        .apply_chat_template(&[ChatMessage::new("user", "Hi there")])
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let out = t
        .apply_chat_template(&[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Bye"),
        ])
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // The rendered prompt tokenizes with its special tokens recognised.
    let ids = t.encode(&out).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 4);
}

#[test]
fn chat_template_python_methods_and_errors() {
    let t = tok();
    let mut t2 = t.clone();
    t2.chat_template = ChatTemplate::from_source(Some(
        "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: {{ m.content.strip() }}\n{% endfor %}\
         {% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}{{ eos_token }}"
            .to_owned(),
    ));
    assert!(t2.has_chat_template());
    assert_eq!(
        t2.apply_chat_template(&[ChatMessage::new("user", "  hi  ")])
            .unwrap(),
        "<|im_start|>USER: hi\n<|im_end|>"
    );
    let err = t2
        .apply_chat_template(&[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")])
        .unwrap_err();
    assert!(format!("{err:#}").contains("only one message"), "{err:#}");

    t2.chat_template = ChatTemplate::from_source(None);
    assert!(!t2.has_chat_template());
    assert!(t2.apply_chat_template(&[]).is_err());
    t2.chat_template = ChatTemplate::from_source(Some("{% for %}".to_owned()));
    assert!(!t2.has_chat_template());
    let err = t2.apply_chat_template(&[]).unwrap_err();
    assert!(format!("{err}").contains("does not compile"), "{err}");
}

#[test]
fn from_hf_dir_reads_configs() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        t.inner().to_string(false).unwrap(),
    )
    .unwrap();
    // No configs: no EOS, no template.
    let bare = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(bare.vocab_size(), 259);
    assert!(bare.eos_token_ids().is_empty());
    assert!(!bare.has_chat_template());
    assert_eq!(bare.encode("hé").unwrap(), t.encode("hé").unwrap());

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string(&json!({
            "bos_token": {"content": "<|im_start|>", "special": true},
            "eos_token": "<|im_end|>",
            "chat_template": "{{ bos_token }}|{{ messages[0].content }}|{{ eos_token }}",
        }))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [0, 2]}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"eos_token_id": 1}"#).unwrap();
    let full = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(full.eos_token_ids(), &[0, 2, 1]);
    assert_eq!(
        full.apply_chat_template(&[ChatMessage::new("user", "x")])
            .unwrap(),
        "<|im_start|>|x|<|im_end|>"
    );

    // chat_template.jinja wins over tokenizer_config.json.
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
    let jinja = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(jinja.apply_chat_template(&[]).unwrap(), "J<|im_end|>");

    assert!(TextTokenizer::from_hf_dir(&dir.path().join("missing")).is_err());
}

/// A GGUF with a byte-level vocabulary (the 3 specials + 256 byte symbols) and a few merges.
fn synthetic_gguf(model: &str) -> gguf_file::Content {
    use gguf_file::Value as V;
    let symbols = byte_level_symbols().unwrap();
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(symbols.iter().map(|c| c.to_string()));
    let merges = ["Ġ t", "h e", "Ġt he"];
    tokens.extend(["Ġt", "he", "Ġthe"].map(str::to_owned));
    let mut types = vec![V::I32(3); 3];
    types.extend(std::iter::repeat_n(V::I32(1), tokens.len() - 3));
    let metadata: Vec<(&str, V)> = vec![
        ("tokenizer.ggml.model", V::String(model.to_owned())),
        (
            "tokenizer.ggml.tokens",
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.token_type", V::Array(types)),
        (
            "tokenizer.ggml.merges",
            V::Array(merges.iter().map(|m| V::String(m.to_string())).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.eot_token_id", V::U32(0)),
        (
            "tokenizer.chat_template",
            V::String(SMOLLM2_CHAT_TEMPLATE.to_owned()),
        ),
    ];
    let refs: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[]).unwrap();
    buf.set_position(0);
    gguf_file::Content::read(&mut buf).unwrap()
}

#[test]
fn from_gguf_synthetic() {
    let t = TextTokenizer::from_gguf(&synthetic_gguf("gpt2")).unwrap();
    assert_eq!(t.vocab_size(), 262);
    assert_eq!(t.eos_token_ids(), &[2, 0]);
    assert_eq!(t.special_token_ids(), HashSet::from([0, 1, 2]));
    let ids = t.encode("<|im_start|>the the").unwrap();
    assert_eq!(ids, vec![1, 3 + u32::from(b't'), 260, 261]);
    assert_eq!(t.decode(&ids, false).unwrap(), "<|im_start|>the the");
    assert_eq!(t.decode(&ids, true).unwrap(), "the the");
    assert!(t
        .apply_chat_template(&[ChatMessage::new("user", "Hi there")])
        .unwrap()
        .ends_with("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"));
}

#[test]
fn from_gguf_rejects_other_models() {
    let err = TextTokenizer::from_gguf(&synthetic_gguf("llama")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("\"llama\"") && msg.contains("gpt2"), "{msg}");
}

#[test]
fn is_send_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<TextTokenizer>();
    assert_send_sync::<IncrementalDetokenizer>();
}
