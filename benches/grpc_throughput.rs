//! End-to-end output tokens/s through gRPC on the real default model: 1 stream, then
//! 8 and 32 concurrent streams (greedy, ignore_eos, fixed length), in one run, so the
//! ratio shows what batching buys. `cargo bench --bench grpc_throughput`.
//! Under `cargo test` it runs one short pass as a smoke test.
#[path = "support/streams.rs"]
mod streams;

use multilora::engine::EngineConfig;
use multilora::lora::registry::{AdapterRegistry, RegistryConfig};
use multilora::server::{start_engine, RunningServer, ServerOptions};
use streams::{full_run, load_default_model, run_streams};

fn main() {
    let quick = !full_run();
    let Some(loaded) = load_default_model("grpc_throughput") else {
        return;
    };
    let registry = AdapterRegistry::new(RegistryConfig::for_model(loaded.model.as_ref()));
    let service = start_engine(
        loaded.model,
        loaded.tokenizer,
        registry,
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
            let r = run_streams(&endpoint, &vec![String::new(); streams], max_new).await;
            let rate = r.tokens_per_second();
            let base = *single.get_or_insert(rate);
            println!(
                "{streams:>7}  {:>13}  {:>7.2}  {rate:>8.1}  {:>11.3}  {:>10.2}x",
                r.tokens,
                r.seconds,
                r.mean_ttft,
                rate / base
            );
        }
        server.stop().await.unwrap();
    });
}
