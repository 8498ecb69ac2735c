//! End-to-end output tokens/s through gRPC on the real default model: 1 stream, then
//! 8 and 32 concurrent streams (greedy, ignore_eos, fixed length), in one run, so the
//! ratio shows what batching buys. `cargo bench --bench grpc_throughput`.
//! Under `cargo test` it runs one short pass as a smoke test.
use multilora::engine::EngineConfig;
use multilora::lora::registry::AdapterRegistry;
use multilora::model::weights;
use multilora::proto::v1 as pb;
use multilora::server::{start_engine, RunningServer, ServerOptions};
use pb::generation_client::GenerationClient;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn request(i: usize, max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: format!("bench-{i}"),
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

/// Runs `streams` concurrent generations; returns (output tokens, seconds, mean TTFT s).
async fn run(endpoint: &str, streams: usize, max_new: u32) -> (usize, f64, f64) {
    let client = GenerationClient::connect(endpoint.to_string())
        .await
        .unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let resp = c
                    .generate_unary(request(i, max_new))
                    .await
                    .unwrap()
                    .into_inner();
                let usage = resp.usage.unwrap_or_default();
                (resp.token_ids.len(), usage.time_to_first_token_s)
            })
        })
        .collect();
    let mut tokens = 0;
    let mut ttft = 0.0;
    for t in tasks {
        let (n, f) = t.await.unwrap();
        tokens += n;
        ttft += f;
    }
    (tokens, start.elapsed().as_secs_f64(), ttft / streams as f64)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(MODEL);
    if !path.is_file() {
        eprintln!(
            "grpc_throughput: {} missing (run `make model`); skipping",
            path.display()
        );
        return;
    }
    let loaded = weights::load_model(
        path.to_str().unwrap_or(MODEL),
        None,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let model = loaded.model;
    let service = start_engine(
        model,
        loaded.tokenizer,
        AdapterRegistry::default(),
        EngineConfig::default(),
        &loaded.source_dtype,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let server = RunningServer::start(service, ServerOptions::default())
            .await
            .unwrap();
        let endpoint = server.endpoint();
        let max_new = if quick { 4 } else { 128 };
        let levels: &[usize] = if quick { &[1, 2] } else { &[1, 8, 32] };
        println!("streams  output_tokens  seconds  tokens/s  mean_ttft_s  vs_1_stream");
        let mut single = None;
        for &streams in levels {
            let (tokens, secs, ttft) = run(&endpoint, streams, max_new).await;
            let rate = tokens as f64 / secs;
            let base = *single.get_or_insert(rate);
            println!(
                "{streams:>7}  {tokens:>13}  {secs:>7.2}  {rate:>8.1}  {ttft:>11.3}  {:>10.2}x",
                rate / base
            );
        }
        server.stop().await.unwrap();
    });
}
