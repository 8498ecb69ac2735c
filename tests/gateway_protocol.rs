//! The ecosystem's clients against a live server: the official `openai` Python package
//! (completions and chat, streamed and not, an adapter by `model`, OpenAI's error shape
//! for an unknown model and bad parameters) gives the text gRPC gives for the same
//! greedy request; `/metrics`, read with prometheus_client's standard parser, has every
//! series of the inference gateway's protocol with its type, agrees with
//! `GetEngineStats` while requests for two adapters are in flight, and exports every
//! series the Grafana dashboard queries.
mod common;

use common::python::run_python;
use common::*;
use multilora::engine::EngineConfig;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PROMPT: &str = "hello";
const QUESTION: &str = "hi";
const MAX_TOKENS: u32 = 8;

async fn grpc_text(
    grpc: &mut multilora::proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    adapter: &str,
    chat: bool,
) -> String {
    let mut req = greedy(vec![], MAX_TOKENS);
    req.adapter = adapter.into();
    if chat {
        req.messages = vec![multilora::proto::v1::ChatMessage {
            role: "user".into(),
            content: QUESTION.into(),
        }];
    } else {
        req.prompt = Some(PROMPT.into());
    }
    generate(grpc, req).await.unwrap().text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Python venv: make test"]
async fn openai_sdk_gets_what_grpc_gives() {
    let root = tempfile::tempdir().unwrap();
    let started = TestServer::tiny()
        .adapter("ad", synth_lora_dir(root.path(), "ad", 1))
        .adapter("be", synth_lora_dir(root.path(), "be", 2))
        .options(with_http())
        .start()
        .await;
    let mut grpc = started.gen.clone();
    let base = TestServer::tiny().config().name;
    let (mut completion, mut chat) = (json!({}), json!({}));
    for (model, adapter) in [(base.as_str(), ""), ("ad", "ad"), ("be", "be")] {
        completion[model] = json!(grpc_text(&mut grpc, adapter, false).await);
        chat[model] = json!(grpc_text(&mut grpc, adapter, true).await);
    }
    let expect = json!({
        "base": base, "adapters": ["ad", "be"], "completion": completion, "chat": chat,
        "prompt": PROMPT, "question": QUESTION, "max_tokens": MAX_TOKENS,
    });
    let file = root.path().join("expect.json");
    std::fs::write(&file, expect.to_string()).unwrap();
    let base_url = format!("http://{}/v1", started.server.http_addr.unwrap());
    let out = run_python(
        "tests/python/openai_sdk.py",
        ["--base-url", &base_url, "--expect", file.to_str().unwrap()],
    )
    .await;
    assert!(out.starts_with("ok: "), "{out}");
    started.stop().await;
}

/// The protocol values `gateway_metrics.py scrape` read (and its checks passed).
async fn scrape(url: &str) -> Value {
    let dashboard = repo_path("deploy/grafana/multilora-dashboard.json");
    let out = run_python(
        "tests/python/gateway_metrics.py",
        ["scrape", url, "--dashboard", dashboard.to_str().unwrap()],
    )
    .await;
    serde_json::from_str(&out).unwrap()
}

/// (running, waiting, running names, waiting names) from `GetEngineStats`.
async fn engine_view(
    grpc: &mut multilora::proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
) -> (u32, u32, Vec<String>, Vec<String>) {
    let s = grpc
        .get_engine_stats(multilora::proto::v1::GetEngineStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let a = s.adapters.unwrap();
    let waiting = s.waiting_sequences + a.waiting_for_load;
    let (running_names, waiting_names) = (
        common::adapters_with_work(a.running_by_adapter),
        common::adapters_with_work(a.waiting_by_adapter),
    );
    (s.running_sequences, waiting, running_names, waiting_names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model and the Python venv: make test"]
async fn metrics_speak_the_gateway_protocol_and_match_engine_stats() {
    let started = TestServer::real()
        .engine(EngineConfig {
            kv_cache_memory: 64 << 20,
            max_running: 2,
            max_active_adapters: 3,
            ..Default::default()
        })
        .adapter("alpha", fixture_adapter("alpha-lora-r8-qv"))
        .adapter("beta", fixture_adapter("beta-lora-r16-all"))
        .options(with_http())
        .start()
        .await;
    let url = format!("http://{}/metrics", started.server.http_addr.unwrap());
    // The server's warm-up request may still be running.
    let mut grpc = started.gen.clone();
    while engine_view(&mut grpc).await != (0, 0, vec![], vec![]) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle = scrape(&url).await;
    assert_eq!(idle["running"].as_f64(), Some(0.0), "{idle}");
    assert_eq!(idle["waiting"].as_f64(), Some(0.0), "{idle}");
    assert_eq!(idle["max_lora"], json!(3));
    assert_eq!(idle["running_lora"], json!([]));
    let families = idle["families"].as_object().unwrap();
    for (name, kind) in [
        ("multilora_requests", "counter"),
        ("multilora_time_to_first_token_seconds", "histogram"),
        ("multilora_time_per_output_token_seconds", "histogram"),
        ("multilora_e2e_request_latency_seconds", "histogram"),
        ("multilora_adapter_load_seconds", "histogram"),
        ("multilora_prompt_tokens", "counter"),
        ("multilora_generation_tokens", "counter"),
        ("multilora_preemptions", "counter"),
        ("multilora_adapter_evictions", "counter"),
        ("multilora_adapter_bytes", "gauge"),
        ("multilora_queue_depth", "gauge"),
        ("multilora_requests_waiting_for_adapter", "gauge"),
    ] {
        assert_eq!(families.get(name), Some(&json!(kind)), "{name}");
    }

    // Long requests: alpha and beta run (max_running 2), a second alpha waits.
    let mut streams = Vec::new();
    for adapter in ["alpha", "beta", "alpha"] {
        let mut req = greedy(vec![1, 2, 3], 400);
        req.adapter = adapter.into();
        req.ignore_eos = true;
        let mut grpc = started.gen.clone();
        streams.push(grpc.generate(req).await.unwrap().into_inner());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = engine_view(&mut grpc).await;
        if (before.0, before.1) != (2, 1) {
            assert!(
                Instant::now() < deadline,
                "never 2 running, 1 waiting: {before:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let m = scrape(&url).await;
        // Compare only if nothing moved while the scrape ran.
        if engine_view(&mut grpc).await != before {
            continue;
        }
        assert_eq!(m["running"].as_f64(), Some(2.0), "{m}");
        assert_eq!(m["waiting"].as_f64(), Some(1.0), "{m}");
        assert_eq!(m["running_lora"], json!(["alpha", "beta"]), "{m}");
        assert_eq!(m["running_lora"], json!(before.2), "{m}");
        assert_eq!(m["waiting_lora"], json!(["alpha"]), "{m}");
        assert_eq!(m["waiting_lora"], json!(before.3), "{m}");
        assert!(m["kv_usage"].as_f64().unwrap() > 0.0, "{m}");
        break;
    }
    drop(streams);
    started.stop().await;
}
