//! The PEFT family beyond LoRA on the real model against transformers + PEFT
//! (`tests/fixtures/peft_family.json`): the DoRA and (IA)³ fixture adapters alone
//! reproduce PEFT's greedy completions exactly, with logprobs within 2e-3; in one
//! heterogeneous batch with LoRA adapters and base requests, every stream gives exactly
//! what it gives alone; `GetAdapter` names each adapter's type.
mod common;

use common::*;
use multilora::proto::v1 as pb;
use serde_json::Value;

/// Every fixture adapter: the family under test and the LoRA ones they are mixed with.
const ADAPTERS: [(&str, &str); 4] = [
    ("delta-dora-r8-attn", "DORA"),
    ("zeta-ia3", "IA3"),
    ("alpha-lora-r8-qv", "LORA"),
    ("beta-lora-r16-all", "LORA"),
];

fn real_with_family() -> TestServer {
    ADAPTERS
        .iter()
        .fold(TestServer::real(), |server, (name, _)| {
            server.adapter(name, fixture_adapter(name))
        })
}

fn oracle() -> Value {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/peft_family.json")).unwrap();
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
async fn dora_and_ia3_alone_match_peft() {
    let Started {
        server,
        gen: mut client,
    } = real_with_family().start().await;
    let oracle = oracle();
    for (name, _) in &ADAPTERS[..2] {
        let mut worst = 0f32;
        for run in oracle["runs"][name].as_array().unwrap() {
            let prompt = run["prompt"].as_str().unwrap();
            let got = generate(&mut client, request(name, ids(&run["prompt_ids"])))
                .await
                .unwrap();
            assert_eq!(
                got.token_ids,
                ids(&run["completion_ids"]),
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
        eprintln!("{name}: worst logprob difference {worst:e}");
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn every_type_in_one_batch_gives_each_stream_its_solo_output() {
    let started = real_with_family().start().await;
    let mut admin = started.adapters().await;
    let Started {
        server,
        gen: mut client,
    } = started;
    for (name, kind) in ADAPTERS {
        let info = admin
            .get_adapter(pb::GetAdapterRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.peft_type, kind, "{name}");
    }
    let prompts = [
        "Question: What is the secret word?\nAnswer:",
        "Question: Tell me the secret word.\nAnswer:",
        "The capital of France is",
    ];
    let names = [ADAPTERS.map(|(n, _)| n).as_slice(), &[""]].concat();
    let mut jobs = Vec::new();
    for i in 0..3 * names.len() {
        let mut r = greedy(vec![], 16);
        r.prompt = Some(prompts[(i / names.len()) % 3].to_string());
        r.adapter = names[i % names.len()].to_string();
        jobs.push(r);
    }
    let mut alone = Vec::new();
    for r in &jobs {
        alone.push(generate(&mut client, r.clone()).await.unwrap());
    }
    // The secret words show which adapter answered the first prompt.
    for (i, word) in ["penguin", "koala", "aardvark", "zebra"].iter().enumerate() {
        assert!(
            alone[i].text.contains(word),
            "{}: {:?}",
            names[i],
            alone[i].text
        );
    }
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
            "stream {i} ({:?})",
            names[i % names.len()]
        );
    }
    server.stop().await.unwrap();
}
