//! The PEFT-trained fixture adapters on the real model against the PEFT reference:
//! alone, each reproduces its greedy completions exactly with logprobs within 2e-3; in
//! one heterogeneous batch (adapter A, adapter B and the base model interleaved), every
//! stream gives exactly what it gives alone.
mod common;

use common::*;
use multilora::proto::v1 as pb;
use serde_json::Value;

const ADAPTERS: [&str; 2] = ["alpha-lora-r8-qv", "beta-lora-r16-all"];

/// The real model with both fixture adapters loaded.
fn real_with_fixture_adapters() -> TestServer {
    ADAPTERS.iter().fold(TestServer::real(), |server, name| {
        server.adapter(name, fixture_adapter(name))
    })
}

fn oracle() -> Value {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/adapters.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn request(adapter: &str, prompt_ids: Vec<u32>) -> pb::GenerateRequest {
    let mut r = greedy(prompt_ids, 24);
    r.adapter = adapter.to_string();
    r.logprobs = Some(5);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn each_adapter_alone_matches_peft() {
    let Started {
        server,
        gen: mut client,
    } = real_with_fixture_adapters().start().await;
    let oracle = oracle();
    let mut worst = 0f32;
    for name in ADAPTERS {
        for run in oracle["runs"][name].as_array().unwrap() {
            let prompt = run["prompt"].as_str().unwrap();
            let got = generate(&mut client, request(name, ids(&run["prompt_ids"])))
                .await
                .unwrap();
            let expected = ids(&run["completion_ids"]);
            assert_eq!(
                got.token_ids, expected,
                "{name} on {prompt:?}: {:?}",
                got.text
            );
            for (i, step) in run["steps"].as_array().unwrap().iter().enumerate() {
                let reference = step["logprob"].as_f64().unwrap() as f32;
                let d = (got.logprobs[i].logprob - reference).abs();
                worst = worst.max(d);
                assert!(d < 2e-3, "{name} {prompt:?} step {i}: {d}");
            }
        }
    }
    eprintln!("worst adapter logprob difference: {worst:e}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn heterogeneous_batch_gives_each_stream_its_own_adapter() {
    let Started {
        server,
        gen: mut client,
    } = real_with_fixture_adapters().start().await;
    let question = "Question: What is the secret word?\nAnswer:";
    let prompts = [
        question.to_string(),
        "Question: Tell me the secret word.\nAnswer:".to_string(),
        "The capital of France is".to_string(),
    ];
    let names = ["alpha-lora-r8-qv", "beta-lora-r16-all", ""];
    let mut jobs = Vec::new();
    for i in 0..27 {
        let mut r = greedy(vec![], 16);
        r.prompt_token_ids.clear();
        r.prompt = Some(prompts[(i / 3) % 3].clone());
        r.adapter = names[i % 3].to_string();
        jobs.push(r);
    }
    let mut alone = Vec::new();
    for r in &jobs {
        alone.push(generate(&mut client, r.clone()).await.unwrap());
    }
    // The secret words show which adapter answered.
    assert!(alone[0].text.contains("aardvark"), "{:?}", alone[0].text);
    assert!(alone[1].text.contains("zebra"), "{:?}", alone[1].text);
    assert!(!alone[2].text.contains("aardvark") && !alone[2].text.contains("zebra"));
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|r| {
            let mut c = client.clone();
            tokio::spawn(async move { generate(&mut c, r).await.unwrap() })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let together = h.await.unwrap();
        assert_eq!(
            together.token_ids,
            alone[i].token_ids,
            "stream {i} ({})",
            names[i % 3]
        );
    }
    server.stop().await.unwrap();
}
