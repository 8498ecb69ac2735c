//! Adapters over gRPC on the tiny random model: a bad adapter fails alone (the server
//! starts, serves the others, and answers NOT_FOUND with the reason for it), and a
//! heterogeneous batch gives every stream exactly what it gets alone.
mod common;

use common::*;
use multilora::engine::EngineConfig;
use multilora::lora::peft::{LoraSite, CONFIG_FILE};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::proto::v1 as pb;
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

    let names = ["", "good-0", "good-1", "good-2"];
    let prompts = ["tenant one asks", "a second question", "and a third"];
    let mut jobs = Vec::new();
    for i in 0..24 {
        jobs.push(req(names[i % 4], prompts[i % 3]));
    }
    let mut alone = Vec::new();
    for j in &jobs {
        alone.push(generate(&mut client, j.clone()).await.unwrap());
    }
    // Each adapter changes the output for the same prompt.
    let base = generate(&mut client, req("", prompts[0])).await.unwrap();
    for name in &names[1..] {
        let with = generate(&mut client, req(name, prompts[0])).await.unwrap();
        assert_ne!(with.token_ids, base.token_ids, "{name} changes nothing");
    }
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|r| {
            let mut c = client.clone();
            tokio::spawn(async move { generate(&mut c, r).await.unwrap() })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.await.unwrap().token_ids,
            alone[i].token_ids,
            "stream {i} ({})",
            names[i % 4]
        );
    }
    server.stop().await.unwrap();
}
