//! `--adapter-dir` at scale: 10,000 sub-folders are registered (listed, not read), and
//! the first request for one of them loads it, on the tiny random model.
mod common;

use common::*;
use multilora::engine::EngineConfig;
use multilora::lora::peft::LoraSite;
use multilora::lora::registry::{collect_specs, AdapterRegistry, RegistryConfig};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::{Llama, ModelConfig, TextTokenizer};
use multilora::server::start_engine;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_adapter_folders_register_without_loading() {
    let tokenizer = TextTokenizer::byte_level_for_tests().unwrap();
    let cfg = ModelConfig::tiny_for_tests(tokenizer.vocab_size());
    let model = Llama::random_for_tests(&cfg, 11).unwrap();
    let base = model.base_shape();
    let scratch = tempfile::tempdir().unwrap();
    let real = scratch.path().join("real");
    let spec = SynthSpec {
        rank: 4,
        alpha: 8.0,
        sites: vec![LoraSite::Q, LoraSite::V],
        seed: 1,
    };
    write_synthetic_adapter(&real, &base, &spec).unwrap();
    // 10,000 folders whose files link to one adapter (each name still loads its own copy).
    let root = scratch.path().join("adapters");
    for i in 0..10_000 {
        let d = root.join(format!("tenant-{i:05}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::os::unix::fs::symlink(real.join(f), d.join(f)).unwrap();
        }
    }
    let t0 = Instant::now();
    let specs = collect_specs(&[], &[root]).unwrap();
    let registry = AdapterRegistry::new(RegistryConfig::new(base));
    for (name, source) in &specs {
        registry.register(name, source).unwrap();
    }
    eprintln!(
        "registered {} adapter folders in {:?}",
        specs.len(),
        t0.elapsed()
    );
    let stats = registry.stats();
    assert_eq!(stats.registered, 10_000);
    assert_eq!(
        (stats.loads, stats.resident_bytes),
        (0, 0),
        "nothing is read at start-up"
    );

    let service = start_engine(
        model,
        tokenizer,
        registry.clone(),
        EngineConfig::default(),
        "random",
    )
    .unwrap();
    let (server, mut client) = start(service).await;
    let mut req = greedy(vec![5, 6, 7], 4);
    req.adapter = "tenant-04321".into();
    let out = generate(&mut client, req).await.unwrap();
    assert_eq!(out.token_ids.len(), 4);
    let stats = registry.stats();
    assert_eq!((stats.loads, stats.host_resident), (1, 1));
    let info = registry.get("tenant-04321").unwrap();
    assert_eq!(info.rank, 4);
    let mut req = greedy(vec![5], 1);
    req.adapter = "tenant-10000".into();
    let err = generate(&mut client, req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    server.stop().await.unwrap();
}
