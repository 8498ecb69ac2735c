//! The PEFT-trained fixture adapters on the real model against the PEFT reference:
//! alone, each reproduces its greedy completions exactly with logprobs within 2e-3; in
//! one heterogeneous batch (adapter A, adapter B and the base model interleaved), every
//! stream gives exactly what it gives alone.
mod common;

use common::oracle::{assert_runs_match, oracle_file, oracle_request};
use common::*;

const ADAPTERS: [&str; 2] = ["alpha-lora-r8-qv", "beta-lora-r16-all"];

/// The real model with both fixture adapters loaded.
fn real_with_fixture_adapters() -> TestServer {
    ADAPTERS.iter().fold(TestServer::real(), |server, name| {
        server.adapter(name, fixture_adapter(name))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn each_adapter_alone_matches_peft() {
    let Started {
        server,
        gen: mut client,
    } = real_with_fixture_adapters().start().await;
    let oracle = oracle_file("adapters.json");
    assert_runs_match(&mut client, &oracle, &ADAPTERS, oracle_request).await;
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
    assert_concurrent_equal_alone(&client, jobs, &alone, |i| names[i % 3].to_string()).await;
    server.stop().await.unwrap();
}
