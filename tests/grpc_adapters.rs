//! Adapters over gRPC on the tiny random model: a bad adapter fails alone (the server
//! starts, serves the others, and answers NOT_FOUND with the reason for it), and a
//! heterogeneous batch gives every stream exactly what it gets alone, on an f32 base and
//! on a quantized one (whose adapters are stored in bf16, half the bytes).
mod common;

use candle_core::quantized::GgmlDType;
use common::*;
use multilora::engine::EngineConfig;
use multilora::lora::peft::{LoraSite, CONFIG_FILE};
use multilora::lora::registry::{AdapterRegistry, RegistryConfig};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::backend::cpu::CpuWeightFormat;
use multilora::model::{CpuBackend, TextTokenizer};
use multilora::proto::v1 as pb;
use multilora::server::start_engine;
use multilora::testing::{random_model_on, tiny_config};
use pb::generation_client::GenerationClient;
use tonic::transport::Channel;
use tonic::Code;

fn server(dir: &std::path::Path) -> TestServer {
    let mut server = TestServer::tiny().engine(EngineConfig {
        kv_cache_memory: 8 << 20,
        ..Default::default()
    });
    let base = server.base_shape();
    for (i, (rank, sites)) in [
        (4, vec![LoraSite::Q, LoraSite::V]),
        (8, LoraSite::ALL.to_vec()),
        (2, vec![LoraSite::O, LoraSite::Down]),
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.join(format!("good-{i}"));
        let spec = SynthSpec {
            kind: Default::default(),
            rank,
            alpha: 4.0 * rank as f32,
            sites,
            seed: i as u64,
        };
        write_synthetic_adapter(&p, &base, &spec).unwrap();
        server = server.adapter(&format!("good-{i}"), p);
    }
    // A broken one: its config lacks `r`.
    let bad = dir.join("bad");
    write_synthetic_adapter(
        &bad,
        &base,
        &SynthSpec {
            kind: Default::default(),
            rank: 2,
            alpha: 2.0,
            sites: vec![LoraSite::Q],
            seed: 9,
        },
    )
    .unwrap();
    std::fs::write(
        bad.join(CONFIG_FILE),
        r#"{"peft_type":"LORA","target_modules":["q_proj"]}"#,
    )
    .unwrap();
    server.adapter("bad", bad)
}

fn req(adapter: &str, prompt: &str) -> pb::GenerateRequest {
    let mut r = greedy(vec![], 24);
    r.prompt_token_ids.clear();
    r.prompt = Some(prompt.into());
    r.adapter = adapter.into();
    r.ignore_eos = true;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_adapter_fails_alone_and_mixed_batches_match_alone() {
    let dir = tempfile::tempdir().unwrap();
    let Started {
        server,
        gen: mut client,
    } = server(dir.path()).start().await;
    let err = generate(&mut client, req("bad", "hello"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("failed to load") && err.message().contains("r"),
        "{}",
        err.message()
    );
    let err = generate(&mut client, req("missing", "hello"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    mixed_batches_match_alone(&mut client).await;
    server.stop().await.unwrap();
}

/// On a quantized base (q8_0 blocks) adapters are stored in bf16, half the bytes of f32,
/// and a heterogeneous batch still gives every stream exactly what it gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_quantized_base_adapters_take_half_the_bytes_and_batches_match_alone() {
    let dir = tempfile::tempdir().unwrap();
    let quantized = CpuBackend::new(CpuWeightFormat::Quantized {
        dense_to: GgmlDType::Q8_0,
    });
    let test_server = server(dir.path()).cpu_backend(quantized);
    let base = test_server.base_shape();
    let started = test_server.start().await;
    let mut adm = started.adapters().await;
    let info = adm
        .get_adapter(pb::GetAdapterRequest {
            name: "good-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // good-1: rank 8 on every site of every layer, two bytes a value.
    let values: usize = LoraSite::ALL
        .iter()
        .map(|s| 8 * (base.dims(*s).0 + base.dims(*s).1))
        .sum();
    assert_eq!(info.bytes, (base.num_layers * values * 2) as u64);
    let Started { server, mut gen } = started;
    mixed_batches_match_alone(&mut gen).await;
    server.stop().await.unwrap();
}

/// 24 requests over base and the three good adapters: each adapter changes the output,
/// and run together every stream gets exactly its tokens alone.
async fn mixed_batches_match_alone(client: &mut GenerationClient<Channel>) {
    let names = ["", "good-0", "good-1", "good-2"];
    let prompts = ["tenant one asks", "a second question", "and a third"];
    let mut jobs = Vec::new();
    for i in 0..24 {
        jobs.push(req(names[i % 4], prompts[i % 3]));
    }
    let mut alone = Vec::new();
    for j in &jobs {
        alone.push(generate(client, j.clone()).await.unwrap());
    }
    // Each adapter changes the output for the same prompt.
    let base = generate(client, req("", prompts[0])).await.unwrap();
    for name in &names[1..] {
        let with = generate(client, req(name, prompts[0])).await.unwrap();
        assert_ne!(with.token_ids, base.token_ids, "{name} changes nothing");
    }
    assert_concurrent_equal_alone(client, jobs, &alone, |i| names[i % 4].to_string()).await;
}

/// A registry built for f32 adapters beside a quantized base (which wants bf16) is a
/// wiring mistake: the server refuses to start and says how to build it.
#[test]
fn a_registry_unlike_the_base_is_refused_at_start() {
    let quantized = CpuBackend::new(CpuWeightFormat::Quantized {
        dense_to: GgmlDType::Q8_0,
    });
    let model = random_model_on(quantized, &tiny_config(TINY_VOCAB), 1).unwrap();
    let registry = AdapterRegistry::new(RegistryConfig::new(model.base_shape()));
    let tokenizer = TextTokenizer::byte_level_for_tests().unwrap();
    let err = start_engine(
        model,
        tokenizer,
        registry,
        EngineConfig::default(),
        "random",
    )
    .err()
    .expect("a mismatched registry must be refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("as f32") && msg.contains("wants bf16"),
        "{msg}"
    );
}
