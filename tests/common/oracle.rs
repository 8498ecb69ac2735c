//! The transformers + PEFT reference outputs in `tests/fixtures/*.json` (`runs[NAME]`: per
//! prompt its ids, greedy completion ids and each step's logprob) and the check of a
//! server's greedy runs against them.
use super::generate;
use multilora::proto::v1 as pb;
use pb::generation_client::GenerationClient;
use serde_json::Value;
use tonic::transport::Channel;

/// `tests/fixtures/NAME`, parsed.
pub fn oracle_file(name: &str) -> Value {
    let text = std::fs::read_to_string(super::repo_path("tests/fixtures").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The request the oracle's runs were made with: greedy, 24 tokens, 5 logprobs, on
/// `adapter`.
pub fn oracle_request(adapter: &str, prompt_ids: Vec<u32>) -> pb::GenerateRequest {
    let mut r = super::greedy(prompt_ids, 24);
    r.adapter = adapter.to_string();
    r.logprobs = Some(5);
    r
}

/// Every run of `names` in `oracle` through `client`: greedy ids equal, logprobs within
/// 2e-3 (the worst difference printed per name); `request` builds a run's request.
pub async fn assert_runs_match(
    client: &mut GenerationClient<Channel>,
    oracle: &Value,
    names: &[&str],
    request: impl Fn(&str, Vec<u32>) -> pb::GenerateRequest,
) {
    for name in names {
        let mut worst = 0f32;
        for run in oracle["runs"][name].as_array().unwrap() {
            let prompt = run["prompt"].as_str().unwrap();
            let got = generate(client, request(name, ids(&run["prompt_ids"])))
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
}
