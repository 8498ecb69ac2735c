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
    for model in ["t5", "bert", "rwkv"] {
        let err = TextTokenizer::from_gguf(&synthetic_gguf(model)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("{model:?}")), "{msg}");
        assert!(
            msg.contains("\"gpt2\"") && msg.contains("\"llama\""),
            "{msg}"
        );
    }
}

// --- SentencePiece-style ("llama") GGUF vocabularies --------------------------------------

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizers")
        .join(name)
}

fn fixture_tokenizer(name: &str) -> TextTokenizer {
    let mut file = std::fs::File::open(fixture(name)).unwrap();
    TextTokenizer::from_gguf(&gguf_file::Content::read(&mut file).unwrap()).unwrap()
}

/// llama.cpp's reference tokenizations (`tests/test-tokenizer-0.cpp`'s format): inputs split
/// on "\n__ggml_vocab_test__\n", one line of space-separated ids per input.
fn llama_cpp_cases(vocab: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(fixture(&format!("{vocab}.inp"))).unwrap();
    let out = std::fs::read_to_string(fixture(&format!("{vocab}.out"))).unwrap();
    // As the C++ reader: a separator at the very end opens no further input.
    let inp = inp.strip_suffix("\n__ggml_vocab_test__\n").unwrap_or(&inp);
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let outputs: Vec<&str> = out.lines().collect();
    assert_eq!(inputs.len(), outputs.len());
    inputs
        .into_iter()
        .zip(outputs)
        .map(|(text, ids)| {
            let ids = ids.split_whitespace().map(|id| id.parse().unwrap());
            (text.to_owned(), ids.collect())
        })
        .collect()
}

#[test]
fn spm_gguf_matches_llama_cpp_reference() {
    for vocab in ["ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf"] {
        let t = fixture_tokenizer(vocab);
        let cases = llama_cpp_cases(vocab);
        assert!(cases.len() > 40, "{vocab}");
        for (text, expected) in &cases {
            let ids = t.encode(text).unwrap();
            assert_eq!(&ids, expected, "{vocab}: ids of {text:?}");
            assert_eq!(t.decode(&ids, false).unwrap(), *text, "{vocab}: decode");
            assert_eq!(stream(&t, &ids).concat(), *text, "{vocab}: streamed");
        }
    }
}

#[test]
fn spm_gguf_llama_shape() {
    let t = fixture_tokenizer("ggml-vocab-llama-spm.gguf");
    assert_eq!(t.vocab_size(), 32000);
    assert_eq!(t.eos_token_ids(), &[2]);
    assert_eq!(t.special_token_ids(), HashSet::from([0, 1, 2]));
    assert!(!t.has_chat_template());
    // Control tokens are recognised in text, each followed by a fresh space prefix (as llama.cpp).
    assert_eq!(t.encode("<s>Hello</s>").unwrap(), vec![1, 15043, 2]);
    // add_bos_token: the post-processor adds BOS when special tokens are asked for.
    let with_bos = t.inner().encode_fast("Hello", true).unwrap();
    assert_eq!(with_bos.get_ids(), &[1, 15043]);
}

/// Checks a tokenizer against `transformers_oracle.py`'s output for the same GGUF.
fn check_against_transformers(gguf: &str, cases: &str, eos: &[u32]) {
    let t = fixture_tokenizer(gguf);
    let oracle: Json =
        serde_json::from_str(&std::fs::read_to_string(fixture(cases)).unwrap()).unwrap();
    let ids = |v: &Json| -> Vec<u32> {
        let ids = v.as_array().unwrap().iter();
        ids.map(|id| u32::try_from(id.as_u64().unwrap()).unwrap())
            .collect()
    };
    assert_eq!(
        t.vocab_size() as u64,
        oracle["vocab_size"].as_u64().unwrap()
    );
    let specials: HashSet<u32> = ids(&oracle["special_ids"]).into_iter().collect();
    assert_eq!(t.special_token_ids(), specials, "{gguf}");
    assert_eq!(t.eos_token_ids(), eos, "{gguf}");
    for case in oracle["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(t.encode(text).unwrap(), expected, "{gguf}: ids of {text:?}");
        let with_special = t.inner().encode_fast(text, true).unwrap();
        assert_eq!(
            with_special.get_ids(),
            ids(&case["ids_with_special"]),
            "{text:?}"
        );
        assert_eq!(
            t.decode(&expected, false).unwrap(),
            case["decoded"],
            "{text:?}"
        );
        let skipped = t.decode(&expected, true).unwrap();
        assert_eq!(skipped, case["decoded_skip_special"], "{text:?}");
        assert_eq!(
            stream(&t, &expected).concat(),
            skipped,
            "{gguf}: streamed {text:?}"
        );
    }
    for case in oracle["decodes"].as_array().unwrap() {
        let case_ids = ids(&case["ids"]);
        assert_eq!(
            t.decode(&case_ids, false).unwrap(),
            case["decoded"],
            "{case}"
        );
        let skipped = t.decode(&case_ids, true).unwrap();
        assert_eq!(skipped, case["decoded_skip_special"], "{case}");
    }
    let chat = &oracle["chat"];
    let user = chat["user"].as_str().unwrap();
    let rendered = t
        .apply_chat_template(&[ChatMessage::new("user", user)])
        .unwrap();
    assert_eq!(rendered, chat["rendered"], "{gguf}: chat template");
    assert_eq!(
        t.encode(&rendered).unwrap(),
        ids(&chat["ids"]),
        "{gguf}: chat ids"
    );
}

#[test]
fn spm_gguf_phi3_matches_transformers() {
    check_against_transformers(
        "ggml-vocab-phi-3.gguf",
        "phi3_transformers_cases.json",
        &[32000],
    );
}

#[test]
fn spm_gguf_gemma_matches_transformers() {
    // No space prefix, space runs respelled as `▁` runs, merges ranked by position.
    check_against_transformers("gemma_synthetic.gguf", "gemma_synthetic_cases.json", &[1]);
}

#[test]
fn spm_merges_match_transformers_generate_merges() {
    // Expected: transformers' `generate_merges(vocab, dict(zip(tokens, scores)))` on this input.
    let tokens = [
        "▁", "a", "b", "c", "ab", "bc", "abc", "▁a", "▁ab", "ca", "é", "aé", "ab",
    ];
    let scores = [
        0.0, 0.0, 0.0, 0.0, -1.0, -1.0, -2.0, -0.5, -3.0, -1.0, 0.0, -2.0, -0.25,
    ];
    let tokens: Vec<String> = tokens.map(str::to_owned).to_vec();
    let merges = spm::generate_merges(&tokens, &scores);
    let expected = [
        ("a", "b"),
        ("▁", "a"),
        ("b", "c"),
        ("c", "a"),
        ("ab", "c"),
        ("a", "bc"),
        ("a", "é"),
        ("▁a", "b"),
        ("▁", "ab"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    assert_eq!(merges, expected);
}

#[test]
fn spm_gguf_needs_scores_or_merges() {
    use gguf_file::Value as V;
    let tokens = ["<unk>", "<s>", "</s>", "▁", "a"].map(|t| V::String(t.to_owned()));
    let metadata = [
        ("tokenizer.ggml.model", V::String("llama".to_owned())),
        ("tokenizer.ggml.tokens", V::Array(tokens.to_vec())),
    ];
    let refs: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[]).unwrap();
    buf.set_position(0);
    let content = gguf_file::Content::read(&mut buf).unwrap();
    let err = TextTokenizer::from_gguf(&content).unwrap_err();
    assert!(
        format!("{err:#}").contains("tokenizer.ggml.scores"),
        "{err:#}"
    );
}

#[test]
fn is_send_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<TextTokenizer>();
    assert_send_sync::<IncrementalDetokenizer>();
}

#[test]
fn spm_gguf_survives_hf_files_round_trip() {
    let t = fixture_tokenizer("ggml-vocab-phi-3.gguf");
    let dir = tempfile::tempdir().unwrap();
    t.save_hf_files(dir.path()).unwrap();
    let back = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(back.vocab_size(), t.vocab_size());
    assert_eq!(back.special_token_ids(), t.special_token_ids());
    for (text, ids) in llama_cpp_cases("ggml-vocab-phi-3.gguf") {
        assert_eq!(back.encode(&text).unwrap(), ids, "{text:?}");
    }
    let text = "<|user|>\nHi<|end|>\n<|assistant|>\n";
    assert_eq!(back.encode(text).unwrap(), t.encode(text).unwrap());
}
