//! Validation runs before any adapter work, and errors travel typed: a bad request naming
//! a cold adapter is refused INVALID_ARGUMENT without loading it; the adapter-dependent
//! length check runs after the lease; budget errors are RESOURCE_EXHAUSTED and speak of
//! budgets, not command-line flags; and none of it disturbs a stream in flight.
mod common;

use common::*;
use multilora::engine::EngineConfig;
use multilora::lora::peft::LoraSite;
use multilora::proto::v1 as pb;
use tonic::Code;

/// A synthetic LoRA for the tiny model (seed 3).
fn synth(dir: &std::path::Path, name: &str, rank: usize, sites: &[LoraSite]) -> String {
    let base = TestServer::tiny().base_shape();
    common::swap::synth(dir, name, &base, rank, sites, 3)
}

fn on_adapter(adapter: &str, max_new: u32) -> pb::GenerateRequest {
    let mut r = greedy(vec![10, 11, 12, 13], max_new);
    r.adapter = adapter.into();
    r.ignore_eos = true;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_never_starts_an_adapter_load_nor_disturbs_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let cold = synth(dir.path(), "cold", 4, &[LoraSite::Q, LoraSite::V]);
    let s = TestServer::tiny().register("cold", &cold).start().await;
    let mut gen = s.gen.clone();
    let mut adm = s.adapters().await;
    let solo = generate(&mut gen, on_adapter("", 24)).await.unwrap();
    let running = {
        let mut g = gen.clone();
        tokio::spawn(async move { generate(&mut g, on_adapter("", 24)).await })
    };
    let mut bad = on_adapter("cold", 4);
    bad.sampling.as_mut().unwrap().top_p = Some(1.5);
    let err = generate(&mut gen, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("sampling.top_p:"),
        "{}",
        err.message()
    );
    let mut two_inputs = on_adapter("cold", 4);
    two_inputs.prompt = Some("and text".into());
    let err = generate(&mut gen, two_inputs).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Neither request loaded the adapter.
    let info = adm
        .get_adapter(pb::GetAdapterRequest {
            name: "cold".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state(), pb::AdapterState::Registered, "{info:?}");
    let stats = adapter_stats(&mut gen).await;
    assert_eq!((stats.loads, stats.host_misses), (0, 0), "{stats:?}");
    // The stream in flight is untouched, and a valid request then loads and serves.
    let after = running.await.unwrap().unwrap();
    assert_eq!(
        (after.token_ids, after.text, after.finish),
        (solo.token_ids, solo.text, solo.finish)
    );
    let ok = generate(&mut gen, on_adapter("cold", 4)).await.unwrap();
    assert_eq!(ok.token_ids.len(), 4);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_less_the_adapters_share_is_checked_after_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TestServer::tiny().config();
    let block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 16 * 4;
    // 8 blocks of 16 tokens; a rank-10 adapter on q (10 KiB) takes 3 of them.
    let big = synth(dir.path(), "big", 10, &[LoraSite::Q]);
    let s = TestServer::tiny()
        .engine(EngineConfig {
            kv_cache_memory: 8 * block_bytes,
            adapter_memory: 4 * block_bytes,
            ..Default::default()
        })
        .adapter("big", &big)
        .start()
        .await;
    let mut gen = s.gen.clone();
    // 4 + 100 tokens fit the 128-token pool, but not the 80 beside the adapter.
    let base = generate(&mut gen, on_adapter("", 100)).await.unwrap();
    assert_eq!(base.token_ids.len(), 100);
    let err = generate(&mut gen, on_adapter("big", 100))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("max_new_tokens:"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("--"), "{}", err.message());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_errors_are_resource_exhausted_and_name_no_flag() {
    let dir = tempfile::tempdir().unwrap();
    let big = synth(dir.path(), "big", 32, &LoraSite::ALL);
    let s = TestServer::tiny().host_memory(64 << 10).start().await;
    let mut adm = s.adapters().await;
    let err = adm
        .load_adapter(pb::LoadAdapterRequest {
            name: "big".into(),
            source: big,
            revision: None,
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(!err.message().contains("--"), "{}", err.message());
    assert!(err.message().contains("budget"), "{}", err.message());
    s.stop().await;
}
