//! Shared pieces of the end-to-end benchmarks: the default model (or a skip when it is
//! missing), the benchmark request, and a run of concurrent streams over gRPC.
#![allow(dead_code)] // each bench uses a different subset
use multilora::model::weights::{self, LoadedModel};
use multilora::model::CpuBackend;
use multilora::proto::v1 as pb;
use pb::generation_client::GenerationClient;
use std::time::Instant;

pub const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// True under `cargo bench` (argv has `--bench`); false under `cargo test`.
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The default model's path, or None (with a note) when `make model` has not fetched it.
fn default_model_path(bench: &str) -> Option<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(MODEL);
    if !path.is_file() {
        eprintln!(
            "{bench}: {} missing (run `make model`); skipping",
            path.display()
        );
        return None;
    }
    Some(path.to_str().unwrap_or(MODEL).to_string())
}

/// The default model in f32, or None when it is missing.
pub fn load_default_model(bench: &str) -> Option<LoadedModel> {
    load_default_model_on(bench, CpuBackend::default())
}

/// The default model on `backend` (its weight format), or None when it is missing.
pub fn load_default_model_on(bench: &str, backend: CpuBackend) -> Option<LoadedModel> {
    let path = default_model_path(bench)?;
    let built = weights::load_llama(&path, None, backend).unwrap();
    Some(built.into_runner().unwrap())
}

/// A greedy, fixed-length request (ignore_eos) on `adapter` ("" = base model).
pub fn request(i: usize, adapter: &str, max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: format!("bench-{i}"),
        adapter: adapter.to_string(),
        prompt: Some(format!(
            "Write a long story about the city number {i}, its people and"
        )),
        max_new_tokens: Some(max_new),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ignore_eos: true,
        ..Default::default()
    }
}

/// What one run of concurrent streams produced.
pub struct RunResult {
    pub tokens: usize,
    pub seconds: f64,
    pub mean_ttft: f64,
}

impl RunResult {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

/// Runs one stream per entry of `adapters`, all at once.
pub async fn run_streams(endpoint: &str, adapters: &[String], max_new: u32) -> RunResult {
    let requests = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| request(i, a, max_new))
        .collect();
    run_requests(endpoint, requests).await
}

/// Runs every request as its own stream, all at once.
pub async fn run_requests(endpoint: &str, requests: Vec<pb::GenerateRequest>) -> RunResult {
    let client = GenerationClient::connect(endpoint.to_string())
        .await
        .unwrap();
    let n = requests.len();
    let start = Instant::now();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let resp = c.generate_unary(r).await.unwrap().into_inner();
                let usage = resp.usage.unwrap_or_default();
                (resp.token_ids.len(), usage.time_to_first_token_s)
            })
        })
        .collect();
    let (mut tokens, mut ttft) = (0, 0.0);
    for t in tasks {
        let (n, f) = t.await.unwrap();
        tokens += n;
        ttft += f;
    }
    RunResult {
        tokens,
        seconds: start.elapsed().as_secs_f64(),
        mean_ttft: ttft / n.max(1) as f64,
    }
}
