//! Adapter types and mixtures over gRPC on the tiny random model: DoRA, (IA)³, prompt
//! tuning, prefix tuning and LoRA requests and weighted mixtures run side by side, each stream equal to
//! its solo run; prompt tuning's virtual tokens are reported apart from the prompt's and
//! count against the context;
//! a mixture naming a DoRA or (IA)³ adapter, an unknown adapter or a bad entry is
//! refused with the right code and reason, and the next valid request still succeeds.
mod common;

use common::*;
use multilora::engine::EngineConfig;
use multilora::lora::peft::{AdapterKind, LoraSite};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::proto::v1 as pb;
use pb::generation_client::GenerationClient;
use tonic::transport::Channel;
use tonic::Code;

/// The tiny server with adapters `lora-a`, `lora-b`, `dora`, `ia3`, `prompt` and
/// `prefix` (4 virtual tokens each).
fn server(dir: &std::path::Path) -> TestServer {
    let mut server = TestServer::tiny().engine(EngineConfig {
        kv_cache_memory: 8 << 20,
        ..Default::default()
    });
    let base = server.base_shape();
    let adapters = [
        ("lora-a", AdapterKind::Lora, LoraSite::ALL.to_vec()),
        ("lora-b", AdapterKind::Lora, vec![LoraSite::Q, LoraSite::V]),
        ("dora", AdapterKind::Dora, vec![LoraSite::Q, LoraSite::O]),
        (
            "ia3",
            AdapterKind::Ia3,
            vec![LoraSite::K, LoraSite::V, LoraSite::Down],
        ),
        ("prompt", AdapterKind::PromptTuning, vec![]),
        ("prefix", AdapterKind::PrefixTuning, vec![]),
    ];
    for (i, (name, kind, sites)) in adapters.into_iter().enumerate() {
        let spec = SynthSpec {
            kind,
            rank: 4,
            alpha: 16.0,
            sites,
            seed: 20 + i as u64,
        };
        write_synthetic_adapter(&dir.join(name), &base, &spec).unwrap();
        server = server.adapter(name, dir.join(name));
    }
    server
}

fn req(adapter: &str, mixture: &[(&str, f32)], prompt: &str) -> pb::GenerateRequest {
    let mut r = greedy(vec![], 12);
    r.prompt = Some(prompt.into());
    r.adapter = adapter.into();
    r.adapters = mixture
        .iter()
        .map(|&(name, weight)| pb::AdapterWeight {
            name: name.into(),
            weight,
        })
        .collect();
    r.ignore_eos = true;
    r.logprobs = Some(0);
    r
}

/// A stream's tokens and their logprobs (bit patterns, for exact comparison).
async fn run(
    client: &mut GenerationClient<Channel>,
    r: pb::GenerateRequest,
) -> (Vec<u32>, Vec<u32>) {
    let c = generate(client, r).await.unwrap();
    (
        c.token_ids,
        c.logprobs.iter().map(|l| l.logprob.to_bits()).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_mixtures_in_one_batch_match_their_solo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let Started {
        server,
        gen: mut client,
    } = server(dir.path()).start().await;
    let mix = [("lora-a", 0.6), ("lora-b", 0.4)];
    let jobs = vec![
        req("lora-a", &[], "abc"),
        req("", &mix, "abc"),
        req("dora", &[], "hello"),
        req("ia3", &[], "hello"),
        req("prompt", &[], "hello"),
        req("prefix", &[], "hello"),
        req("", &[], "abc"),
        req("", &[("lora-b", -1.5)], "xyz"),
        req("lora-b", &[], "xyz"),
    ];
    let mut alone = Vec::new();
    for r in &jobs {
        alone.push(run(&mut client, r.clone()).await);
    }
    // Each type changes the output (so the comparison is not vacuous).
    assert_ne!(alone[0], alone[6], "lora-a vs base");
    assert_ne!(alone[1], alone[6], "mixture vs base");
    assert_ne!(alone[1], alone[0], "mixture vs lora-a");
    assert_ne!(alone[2], alone[3], "DoRA vs (IA)³");
    assert_ne!(alone[4], alone[3], "prompt tuning vs (IA)³");
    assert_ne!(alone[5], alone[4], "prefix tuning vs prompt tuning");
    assert_ne!(alone[7], alone[8], "a weight of -1.5 vs 1");
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|r| {
            let mut c = client.clone();
            tokio::spawn(async move { run(&mut c, r).await })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), alone[i], "stream {i}");
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mixtures_are_refused_and_the_next_request_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let Started {
        server,
        gen: mut client,
    } = server(dir.path()).start().await;
    let cases = [
        (
            req("", &[("lora-a", 0.5), ("dora", 0.5)], "abc"),
            Code::InvalidArgument,
            "DoRA's norm is per adapter",
        ),
        (
            req("", &[("ia3", 1.0), ("lora-a", 0.5)], "abc"),
            Code::InvalidArgument,
            "LoRA-family adapters only",
        ),
        (
            req("", &[("lora-a", 0.5), ("nope", 0.5)], "abc"),
            Code::NotFound,
            "nope",
        ),
        (
            req("lora-a", &[("lora-b", 0.5)], "abc"),
            Code::InvalidArgument,
            "exclusive with adapter",
        ),
        (
            req("", &[("lora-a", f32::INFINITY)], "abc"),
            Code::InvalidArgument,
            "weight inf",
        ),
    ];
    for (r, code, needle) in cases {
        let status = generate(&mut client, r).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} should say {needle:?}",
            status.message()
        );
        let ok = generate(
            &mut client,
            req("", &[("lora-a", 0.5), ("lora-b", 0.5)], "abc"),
        )
        .await;
        assert_eq!(ok.unwrap().token_ids.len(), 12);
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_tokens_are_reported_and_count_against_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let Started {
        server,
        gen: mut client,
    } = server(dir.path()).start().await;
    let done = generate(&mut client, req("prompt", &[], "hello"))
        .await
        .unwrap();
    assert_eq!(done.usage.prompt_tokens, 5);
    assert_eq!(done.usage.virtual_tokens, 4);
    let base = generate(&mut client, req("", &[], "hello")).await.unwrap();
    assert_eq!(
        (base.usage.prompt_tokens, base.usage.virtual_tokens),
        (5, 0)
    );
    // 5 prompt tokens + 507 new fill the 512-token context alone, not after 4 virtual ones.
    let mut long = req("prompt", &[], "hello");
    long.max_new_tokens = Some(507);
    let status = generate(&mut client, long.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("max_new_tokens"),
        "{}",
        status.message()
    );
    long.max_new_tokens = Some(503);
    long.logprobs = None;
    let ok = generate(&mut client, long).await.unwrap();
    assert_eq!(ok.token_ids.len(), 503);
    server.stop().await.unwrap();
}
