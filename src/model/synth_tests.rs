//! Synthetic models: the named shapes have the right sizes, a written folder loads
//! through the normal `--model` path and runs, and the weights are seeded.
use super::*;
use crate::model::weights;
use crate::model::ForwardBatch;

fn write_tiny(dir: &Path, seed: u64) -> ModelConfig {
    let tok = TextTokenizer::byte_level_for_tests().unwrap();
    let cfg = shape("tiny", tok.vocab_size()).unwrap();
    write_synthetic_model(dir, &cfg, &tok, seed).unwrap();
    cfg
}

#[test]
fn named_shapes_have_their_parameter_counts() {
    // SmolLM2-135M's published parameter count, exactly.
    let smol = shape("135m", 49_152).unwrap();
    assert_eq!(parameter_count(&smol), 134_515_008);
    // Llama-3.2-1B's layout with SmolLM2's vocabulary: 1B-class.
    let one_b = shape("1b", 49_152).unwrap();
    let n = parameter_count(&one_b);
    assert!((1_000_000_000..1_200_000_000).contains(&n), "{n}");
    assert!(shape("7b", 100).is_err());
}

#[test]
fn written_model_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_tiny(dir.path(), 7);
    let dir_name = dir.path().to_str().unwrap();
    let mut loaded = weights::load_model(dir_name, None).unwrap();
    let got = loaded.model.config();
    assert_eq!(
        (
            got.hidden_size,
            got.num_layers,
            got.num_heads,
            got.num_kv_heads
        ),
        (
            cfg.hidden_size,
            cfg.num_layers,
            cfg.num_heads,
            cfg.num_kv_heads
        )
    );
    assert_eq!(got.vocab_size, 259);
    assert_eq!(got.eos_token_ids, vec![2]);
    // The tokenizer files round-trip: same ids, same EOS, the chat template kept.
    let tok = TextTokenizer::byte_level_for_tests().unwrap();
    assert_eq!(
        loaded.tokenizer.encode("harbour town").unwrap(),
        tok.encode("harbour town").unwrap()
    );
    assert_eq!(loaded.tokenizer.eos_token_ids(), tok.eos_token_ids());
    assert!(loaded.tokenizer.has_chat_template());

    loaded.model.allocate_kv(2, 16).unwrap();
    let blocks = vec![0];
    let mut batch = ForwardBatch::default();
    let last = batch.push_chunk(&[5, 9, 77, 3, 200, 14, 15, 92], 0, &blocks);
    batch.logit_rows.push(last);
    let logits = loaded.model.forward(&batch, &[]).unwrap();
    assert_eq!(logits.len(), 259);
    assert!(logits.iter().all(|x| x.is_finite()));
    let (lo, hi) = logits
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    assert!(hi - lo > 1e-3, "random weights give distinct logits");
}

#[test]
fn weights_follow_the_seed_and_their_distribution() {
    let read = |seed: u64| {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), seed);
        std::fs::read(dir.path().join("model.safetensors")).unwrap()
    };
    let a = read(1);
    assert_eq!(a, read(1), "same seed, same bytes");
    assert_ne!(a, read(2), "another seed, other weights");

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_tiny(dir.path(), 3);
    let files = [dir.path().join("model.safetensors")];
    let t = candle_core::safetensors::load(&files[0], &candle_core::Device::Cpu).unwrap();
    let q = t["model.layers.0.self_attn.q_proj.weight"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(q.len(), cfg.hidden_size * cfg.hidden_size);
    // Uniform(-b, b) with b = sqrt(3 / fan_in): mean 0, standard deviation 1/sqrt(64).
    let mean = q.iter().sum::<f32>() / q.len() as f32;
    let var = q.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / q.len() as f32;
    assert!(mean.abs() < 0.01, "{mean}");
    assert!((var.sqrt() - 0.125).abs() < 0.005, "{}", var.sqrt());
    let bound = (3.0f32 / 64.0).sqrt() * 1.01;
    assert!(q.iter().all(|x| x.abs() <= bound));
    let norm = t["model.norm.weight"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(norm.iter().all(|x| (0.89..=1.11).contains(x)));
}

#[test]
fn bf16_rounds_to_nearest_even() {
    assert_eq!(bf16_bits(1.0), 0x3F80);
    assert_eq!(bf16_bits(-2.0), 0xC000);
    // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even one (1.0).
    assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
    // Just above halfway rounds up.
    assert_eq!(bf16_bits(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3F81);
}

/// Logits after a short prompt of the model at `path`, loaded in f32 mode.
fn prompt_logits(path: &Path) -> Vec<f32> {
    let backend = crate::model::CpuBackend::default();
    let loaded = weights::load_llama(path.to_str().unwrap(), None, backend).unwrap();
    let model = loaded.model;
    let mut kv = model.new_kv(2, 16).unwrap();
    let mut batch = ForwardBatch::default();
    let last = batch.push_chunk(&[5, 9, 77, 3, 200, 14, 15, 92], 0, &[0]);
    batch.logit_rows.push(last);
    model.forward(&batch, &mut kv).unwrap()
}

#[test]
#[ignore = "needs the real model (its GGUF tokenizer): make test"]
fn gguf_holds_the_same_model_as_the_folder() {
    let gguf_source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let source = weights::resolve(gguf_source.to_str().unwrap(), None).unwrap();
    let tok = weights::load_tokenizer(&source).unwrap();
    let cfg = shape("tiny", tok.vocab_size()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("folder");
    write_synthetic_model(&folder, &cfg, &tok, 11).unwrap();
    let file = dir.path().join("tiny.gguf");
    let params = write_synthetic_gguf(&file, &cfg, &gguf_source, GgmlDType::Q8_0, 11).unwrap();
    assert_eq!(params, parameter_count(&cfg));
    let want = prompt_logits(&folder);
    let got = prompt_logits(&file);
    // Q8_0 rounds each weight by at most half a step of max|w|/127: the logits move a
    // little; a wrong Q/K order or tensor name would move them by their whole range.
    let range = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = want
        .iter()
        .zip(&got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst < 0.05 * range, "worst {worst} of range {range}");
    // Q8_0 holds 34 bytes per 32 values, bf16 64.
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&file) < size(&folder.join("model.safetensors")));
}

#[test]
fn every_family_writes_a_folder_that_loads_as_that_family_and_runs() {
    let tok = TextTokenizer::byte_level_for_tests().unwrap();
    let tiny = shape("tiny", tok.vocab_size()).unwrap();
    for family in Family::ALL {
        let cfg = with_family(&tiny, family).unwrap();
        assert_eq!(cfg.arch.family, family);
        let dir = tempfile::tempdir().unwrap();
        write_synthetic_model(dir.path(), &cfg, &tok, 3).unwrap();
        let loaded = weights::load_model(dir.path().to_str().unwrap(), None)
            .unwrap_or_else(|e| panic!("{family:?}: {e:#}"));
        assert_eq!(loaded.model.config().arch, cfg.arch, "{family:?}");
        let mut batch = ForwardBatch::default();
        batch.push_chunk(&[5, 6, 7], 0, &[0]);
        batch.logit_rows = vec![2];
        let model = crate::testing::random_llama(&cfg, 1).unwrap();
        let mut kv = model.new_kv(1, 16).unwrap();
        let logits = model.forward(&batch, &mut kv).unwrap();
        assert!(logits.iter().all(|l| l.is_finite()), "{family:?}");
    }
}

#[test]
fn every_family_writes_a_gguf_that_serves_as_its_folder() {
    // The tokenizer of a committed llama.cpp-converted fixture (320 ids).
    let tokenizer_from =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/gguf/qwen2.gguf");
    let source = weights::resolve(tokenizer_from.to_str().unwrap(), None).unwrap();
    let tok = weights::load_tokenizer(&source).unwrap();
    let tiny = shape("tiny", tok.vocab_size()).unwrap();
    for family in Family::ALL {
        let mut cfg = with_family(&tiny, family).unwrap();
        cfg.arch.attention_scale = None;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("folder");
        write_synthetic_model(&folder, &cfg, &tok, 5).unwrap();
        let file = dir.path().join("model.gguf");
        write_synthetic_gguf(&file, &cfg, &tokenizer_from, GgmlDType::F32, 5)
            .unwrap_or_else(|e| panic!("{family:?}: {e:#}"));
        // The same weights, the same model: equal logits (a wrong name, norm or row order
        // would move them by their whole range).
        let a = weights::load_model(folder.to_str().unwrap(), None).unwrap();
        let b = weights::load_model(file.to_str().unwrap(), None).unwrap();
        let mut want_arch = a.model.config().arch.clone();
        if family == Family::Mistral {
            // A GGUF file of a Mistral is a `llama` without its window (llama.cpp's).
            want_arch = Default::default();
        }
        if family == Family::Gemma2 || family == Family::Gemma3 {
            // The GGUF's norms hold their one; the attention scale is llama.cpp's rule.
            want_arch.norm_offset = false;
        }
        let mut got_arch = b.model.config().arch.clone();
        for arch in [&mut want_arch, &mut got_arch] {
            // No layer kinds means every layer full.
            if arch.layers.iter().all(|l| *l == Default::default()) {
                arch.layers.clear();
            }
        }
        assert_eq!(want_arch, got_arch, "{family:?}");
        let want = prompt_logits(&folder);
        let got = prompt_logits(&file);
        let worst = want
            .iter()
            .zip(&got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-4, "{family:?}: worst logit difference {worst}");
    }
}
