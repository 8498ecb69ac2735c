//! Loading a Hugging Face folder (config.json, tokenizer.json, safetensors single or
//! sharded) gives the same model as the in-memory weights it was written from.
use multilora::model::{weights, CpuBackend, TextTokenizer};
use multilora::testing::{prefill_logits, random_llama, tiny_config, write_model_folder};

#[test]
fn hf_folder_single_and_sharded_load_the_same_model() {
    let vocab = TextTokenizer::byte_level_for_tests().unwrap().vocab_size();
    let cfg = tiny_config(vocab);
    let reference = random_llama(&cfg, 5).unwrap();
    let tokens = [3u32, 70, 71, 72, 10];
    let expected = prefill_logits(&reference, &tokens).unwrap();
    for sharded in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_model_folder(dir.path(), &cfg, 5, sharded).unwrap();
        let loaded =
            weights::load_llama(dir.path().to_str().unwrap(), None, CpuBackend::default()).unwrap();
        assert_eq!(loaded.model.config().num_layers, cfg.num_layers);
        assert_eq!(loaded.tokenizer.eos_token_ids(), &[2]);
        assert_eq!(
            prefill_logits(&loaded.model, &tokens).unwrap(),
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
