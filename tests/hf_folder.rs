//! Loading a Hugging Face folder (config.json, tokenizer.json, safetensors single or
//! sharded) gives the same model as the in-memory weights it was written from.
use multilora::engine::block_allocator::{Allocation, BlockAllocator};
use multilora::model::{weights, CpuBackend, ForwardBatch, Llama, ModelConfig, TextTokenizer};
use multilora::testing::{random_llama, random_weights, tiny_config};
use std::collections::HashMap;
use std::path::Path;

fn write_folder(dir: &Path, cfg: &ModelConfig, sharded: bool) {
    let tensors = random_weights(cfg, 5).unwrap();
    if sharded {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let (a, b) = names.split_at(names.len() / 2);
        let mut map = serde_json::Map::new();
        for (file, part) in [
            ("model-00001-of-00002.safetensors", a),
            ("model-00002-of-00002.safetensors", b),
        ] {
            let subset: HashMap<String, candle_core::Tensor> = part
                .iter()
                .map(|n| ((*n).clone(), tensors[*n].clone()))
                .collect();
            candle_core::safetensors::save(&subset, dir.join(file)).unwrap();
            for n in part {
                map.insert((*n).clone(), file.into());
            }
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    } else {
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    }
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    TextTokenizer::byte_level_for_tests()
        .unwrap()
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
}

fn logits(model: &Llama<CpuBackend>, tokens: &[u32]) -> Vec<f32> {
    let mut alloc = BlockAllocator::new(4, 16);
    let mut kv = model.new_kv(4, 16).unwrap();
    let mut table = Vec::new();
    assert_eq!(alloc.allocate(&mut table, tokens.len()), Allocation::Ok);
    let mut b = ForwardBatch::default();
    b.push_chunk(tokens, 0, &table);
    b.logit_rows = (0..tokens.len()).collect();
    model.forward(&b, &mut kv).unwrap()
}

#[test]
fn hf_folder_single_and_sharded_load_the_same_model() {
    let vocab = TextTokenizer::byte_level_for_tests().unwrap().vocab_size();
    let cfg = tiny_config(vocab);
    let reference = random_llama(&cfg, 5).unwrap();
    let tokens = [3u32, 70, 71, 72, 10];
    let expected = logits(&reference, &tokens);
    for sharded in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), &cfg, sharded);
        let loaded =
            weights::load_llama(dir.path().to_str().unwrap(), None, CpuBackend::default()).unwrap();
        assert_eq!(loaded.model.config().num_layers, cfg.num_layers);
        assert_eq!(loaded.tokenizer.eos_token_ids(), &[2]);
        assert_eq!(
            logits(&loaded.model, &tokens),
            expected,
            "sharded={sharded}"
        );
    }
}

#[test]
fn missing_or_bad_model_paths_fail_with_a_clear_error() {
    let err = weights::resolve("/nonexistent/model.gguf", None).unwrap_err();
    assert!(format!("{err:#}").contains("no such file"), "{err:#}");
    let dir = tempfile::tempdir().unwrap();
    let err = weights::load_model(dir.path().to_str().unwrap(), None)
        .err()
        .expect("an empty folder is not a model");
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
}
