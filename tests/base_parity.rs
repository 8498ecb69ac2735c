//! The real default model against the transformers reference: greedy ids exactly,
//! each chosen token's logprob within 2e-3, and 32 concurrent streams equal to alone.
mod common;

use common::*;
use multilora::proto::v1 as pb;
use serde_json::Value;

fn oracle() -> Vec<Value> {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/base.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["runs"]["base"].as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn greedy_completions_and_logprobs_match_reference() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::real().start().await;
    let mut worst = 0f32;
    for run in oracle() {
        let prompt = run["prompt"].as_str().unwrap().to_string();
        let prompt_ids = ids(&run["prompt_ids"]);
        let tokenized = client
            .tokenize(pb::TokenizeRequest {
                text: prompt.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(tokenized.token_ids, prompt_ids, "tokenizer on {prompt:?}");
        let mut req = greedy(prompt_ids, 24);
        req.logprobs = Some(5);
        let got = generate(&mut client, req).await.unwrap();
        let expected = ids(&run["completion_ids"]);
        assert_eq!(
            got.token_ids, expected,
            "completion of {prompt:?}: {:?}",
            got.text
        );
        for (i, step) in run["steps"].as_array().unwrap().iter().enumerate() {
            let reference = step["logprob"].as_f64().unwrap() as f32;
            let ours = got.logprobs[i].logprob;
            let d = (ours - reference).abs();
            worst = worst.max(d);
            assert!(
                d < 2e-3,
                "{prompt:?} step {i}: logprob {ours} vs {reference}"
            );
        }
        let eos_last = expected.last() == Some(&2);
        let want = if eos_last {
            pb::FinishReason::Eos
        } else {
            pb::FinishReason::Length
        };
        assert_eq!(got.finish, want, "{prompt:?}");
    }
    eprintln!("worst logprob difference: {worst:e}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn thirty_two_concurrent_streams_equal_alone() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::real().start().await;
    let prompts: Vec<String> = (0..32)
        .map(|i| match i % 4 {
            0 => format!("Write a short story about robot number {i}."),
            1 => format!("The {i}th prime number is"),
            2 => format!("List {i} colours:"),
            _ => format!("Question: what is {i} plus {i}?\nAnswer:"),
        })
        .collect();
    let request = |p: &str| {
        let mut r = greedy(vec![], 20);
        r.prompt = Some(p.to_string());
        r.prompt_token_ids.clear();
        r
    };
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(generate(&mut client, request(p)).await.unwrap());
    }
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = client.clone();
            let r = request(p);
            tokio::spawn(async move { generate(&mut c, r).await.unwrap() })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let together = h.await.unwrap();
        assert_eq!(together.token_ids, alone[i].token_ids, "stream {i}");
        assert_eq!(together.text, alone[i].text, "stream {i}");
    }
    server.stop().await.unwrap();
}
