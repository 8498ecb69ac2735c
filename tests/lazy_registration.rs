//! `--adapter-dir` at scale: 10,000 sub-folders are registered (listed, not read), and
//! the first request for one of them loads it, on the tiny random model.
mod common;

use common::*;
use multilora::lora::peft::folder::FILES;
use multilora::lora::peft::LoraSite;
use multilora::lora::registry::collect_specs;
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::server::ServerOptions;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_adapter_folders_register_without_loading() {
    let mut server = TestServer::tiny();
    let base = server.base_shape();
    let scratch = tempfile::tempdir().unwrap();
    let real = scratch.path().join("real");
    let spec = SynthSpec {
        kind: Default::default(),
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
        for f in FILES {
            std::os::unix::fs::symlink(real.join(f), d.join(f)).unwrap();
        }
    }
    let t0 = Instant::now();
    let specs = collect_specs(&[], &[root]).unwrap();
    for (name, source) in &specs {
        server = server.register(name, source);
    }
    let service = server.service();
    eprintln!(
        "registered {} adapter folders in {:?}",
        specs.len(),
        t0.elapsed()
    );
    let registry = service.adapters.clone();
    let stats = registry.stats();
    assert_eq!(stats.registered, 10_000);
    assert_eq!(
        (stats.loads, stats.resident_bytes),
        (0, 0),
        "nothing is read at start-up"
    );

    let Started {
        server,
        gen: mut client,
    } = Started::serve(service, ServerOptions::default()).await;
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
