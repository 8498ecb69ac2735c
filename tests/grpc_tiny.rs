//! End-to-end gRPC behaviour on the tiny random model: bad input never disturbs other
//! streams, disconnects free KV blocks, preemption and batching do not change outputs,
//! seeds reproduce, stop strings, health and graceful shutdown.
mod common;

use common::*;
use multilora::engine::EngineConfig;
use multilora::proto::v1 as pb;
use multilora::server::ServerOptions;
use std::time::{Duration, Instant};
use tonic::Code;

fn small_engine() -> EngineConfig {
    EngineConfig {
        kv_cache_memory: 4 << 20,
        ..Default::default()
    }
}

fn prompt_req(prompt: &str, max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(prompt.into()),
        max_new_tokens: Some(max_new),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_by_field_and_others_keep_streaming() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::tiny().engine(small_engine()).start().await;
    // A long stream in flight the whole time.
    let mut bg_client = client.clone();
    let background =
        tokio::spawn(async move { generate(&mut bg_client, prompt_req("background", 300)).await });
    let reference = generate(&mut client, prompt_req("hello", 12))
        .await
        .unwrap();

    let base = || prompt_req("hello", 12);
    let nan = f32::NAN;
    let sampling = |f: &dyn Fn(&mut pb::SamplingParams)| {
        let mut r = base();
        let mut s = r.sampling.unwrap();
        f(&mut s);
        r.sampling = Some(s);
        r
    };
    let cases: Vec<(&str, pb::GenerateRequest, Code, &str)> = vec![
        (
            "no input",
            pb::GenerateRequest {
                prompt: None,
                ..base()
            },
            Code::InvalidArgument,
            "input",
        ),
        (
            "empty prompt",
            pb::GenerateRequest {
                prompt: Some(String::new()),
                ..base()
            },
            Code::InvalidArgument,
            "prompt",
        ),
        (
            "two inputs",
            pb::GenerateRequest {
                prompt_token_ids: vec![5, 6],
                ..base()
            },
            Code::InvalidArgument,
            "input",
        ),
        (
            "max_new_tokens 0",
            pb::GenerateRequest {
                max_new_tokens: Some(0),
                ..base()
            },
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            "beyond context",
            pb::GenerateRequest {
                max_new_tokens: Some(100_000),
                ..base()
            },
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            "top_p 0",
            sampling(&|s| s.top_p = Some(0.0)),
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        (
            "top_p 1.5",
            sampling(&|s| s.top_p = Some(1.5)),
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        (
            "negative temperature",
            sampling(&|s| s.temperature = Some(-0.5)),
            Code::InvalidArgument,
            "sampling.temperature",
        ),
        (
            "NaN temperature",
            sampling(&|s| s.temperature = Some(nan)),
            Code::InvalidArgument,
            "sampling.temperature",
        ),
        (
            "NaN top_p",
            sampling(&|s| s.top_p = Some(nan)),
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        (
            "NaN repetition penalty",
            sampling(&|s| s.repetition_penalty = Some(nan)),
            Code::InvalidArgument,
            "sampling.repetition_penalty",
        ),
        (
            "unknown adapter",
            pb::GenerateRequest {
                adapter: "nope".into(),
                ..base()
            },
            Code::NotFound,
            "adapter",
        ),
        (
            "prompt longer than context",
            pb::GenerateRequest {
                prompt: Some("x".repeat(600)),
                ..base()
            },
            Code::InvalidArgument,
            "prompt",
        ),
        (
            "token id beyond vocab",
            pb::GenerateRequest {
                prompt: None,
                prompt_token_ids: vec![1, 100_000],
                ..base()
            },
            Code::InvalidArgument,
            "prompt_token_ids[1]",
        ),
        (
            "too many logprobs",
            pb::GenerateRequest {
                logprobs: Some(21),
                ..base()
            },
            Code::InvalidArgument,
            "logprobs",
        ),
        (
            "empty stop string",
            pb::GenerateRequest {
                stop: vec![String::new()],
                ..base()
            },
            Code::InvalidArgument,
            "stop[0]",
        ),
    ];
    for (name, req, code, field) in cases {
        let err = generate(&mut client, req.clone()).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(
            err.message().contains(field),
            "{name}: message {:?} should name {field}",
            err.message()
        );
        let unary = client.generate_unary(req).await.expect_err(name);
        assert_eq!(unary.code(), code, "{name} (unary)");
        // The server keeps serving, with the same answer as before.
        let ok = generate(&mut client, prompt_req("hello", 12))
            .await
            .unwrap();
        assert_eq!(ok.token_ids, reference.token_ids, "after {name}");
    }
    let bg = background.await.unwrap().unwrap();
    assert_eq!(bg.token_ids.len(), 300);
    assert_eq!(bg.finish, pb::FinishReason::Length);
    server.stop().await.unwrap();
}

async fn stats(
    client: &mut pb::generation_client::GenerationClient<tonic::transport::Channel>,
) -> pb::EngineStats {
    client
        .get_engine_stats(pb::GetEngineStatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_frees_its_kv_blocks() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::tiny().engine(small_engine()).start().await;
    let total = stats(&mut client).await.kv_blocks_total;
    let mut stream = client
        .generate(prompt_req(&"a long prompt ".repeat(5), 400))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    let during = stats(&mut client).await;
    assert!(
        during.kv_blocks_free < total,
        "the stream holds blocks: {during:?}"
    );
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(&mut client).await;
        if s.kv_blocks_free == total && s.running_sequences == 0 {
            assert!(s.aborted_sequences >= 1, "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "blocks not freed: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_under_kv_pressure_keeps_outputs_identical() {
    // 12 blocks of 16 tokens: eight 100-token sequences cannot all fit.
    let kv_bytes_per_block = 2 * 2 * 2 * 16 * 4 * 16;
    let engine = EngineConfig {
        kv_cache_memory: 12 * kv_bytes_per_block,
        ..Default::default()
    };
    let Started {
        server,
        gen: mut client,
    } = TestServer::tiny().engine(engine).start().await;
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("sequence number {i} says"))
        .collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(generate(&mut client, prompt_req(p, 80)).await.unwrap());
    }
    let before = stats(&mut client).await.preemptions;
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = client.clone();
            let r = prompt_req(p, 80);
            tokio::spawn(async move { generate(&mut c, r).await.unwrap() })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.await.unwrap().token_ids,
            alone[i].token_ids,
            "sequence {i}"
        );
    }
    let after = stats(&mut client).await;
    assert!(
        after.preemptions > before,
        "expected preemptions: {after:?}"
    );
    assert_eq!(after.kv_blocks_free, after.kv_blocks_total);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_in_any_batch() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::tiny().engine(small_engine()).start().await;
    let seeded = |seed: u64| {
        let mut r = prompt_req("once upon a time", 40);
        r.sampling = Some(pb::SamplingParams {
            temperature: Some(3.0),
            top_k: Some(50),
            top_p: Some(0.95),
            seed: Some(seed),
            repetition_penalty: Some(1.1),
        });
        r
    };
    let alone = generate(&mut client, seeded(7)).await.unwrap();
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let mut c = client.clone();
            let r = if i % 3 == 0 {
                seeded(7)
            } else {
                seeded(100 + i)
            };
            tokio::spawn(async move { generate(&mut c, r).await.unwrap() })
        })
        .collect();
    let mut differs = false;
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await.unwrap();
        if i % 3 == 0 {
            assert_eq!(got.token_ids, alone.token_ids, "seeded stream {i}");
        } else {
            differs |= got.token_ids != alone.token_ids;
        }
    }
    assert!(differs, "other seeds should give other samples");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_stream_and_unary_agrees() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::tiny().engine(small_engine()).start().await;
    let full = generate(&mut client, prompt_req("stop here", 60))
        .await
        .unwrap();
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 12, "need some text: {:?}", full.text);
    let stop: String = chars[8..11].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let mut req = prompt_req("stop here", 60);
    req.stop = vec![stop.clone()];
    let got = generate(&mut client, req.clone()).await.unwrap();
    assert_eq!(got.finish, pb::FinishReason::Stop);
    assert_eq!(got.text, full.text[..cut]);
    let unary = client.generate_unary(req).await.unwrap().into_inner();
    assert_eq!(unary.text, got.text);
    assert_eq!(unary.matched_stop, stop);
    assert_eq!(unary.token_ids, got.token_ids);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_after_warm_up_and_model_info_answers() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::tiny().engine(small_engine()).start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "multilora.v1.Generation".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.context_length, 512);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_cancels_in_flight_streams() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::tiny()
        .engine(small_engine())
        .options(ServerOptions {
            drain_timeout: Duration::from_millis(0),
            ..Default::default()
        })
        .start()
        .await;
    let mut stream = client
        .generate(prompt_req(&"long ".repeat(10), 450))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let stopping = tokio::spawn(server.stop());
    let mut finish = None;
    while let Some(msg) = stream.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Final(f)) = msg.event {
            finish = Some(f.finish_reason());
        }
    }
    assert_eq!(finish, Some(pb::FinishReason::Cancelled));
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("server stops after the drain")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_messages_use_the_template_and_logprobs_are_reported() {
    let Started {
        server,
        gen: mut client,
    } = TestServer::tiny().engine(small_engine()).start().await;
    let req = pb::GenerateRequest {
        prompt: None,
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: "Hi there".into(),
        }],
        logprobs: Some(3),
        ..prompt_req("", 5)
    };
    let got = generate(&mut client, req).await.unwrap();
    let tok = multilora::model::TextTokenizer::byte_level_for_tests().unwrap();
    let rendered = tok
        .apply_chat_template(&[multilora::model::tokenizer::ChatMessage {
            role: "user".into(),
            content: "Hi there".into(),
        }])
        .unwrap();
    assert!(
        rendered.ends_with("<|im_start|>assistant\n"),
        "{rendered:?}"
    );
    let expected_prompt = tok.encode(&rendered).unwrap().len();
    assert_eq!(got.usage.prompt_tokens as usize, expected_prompt);
    assert_eq!(got.token_ids.len(), 5);
    assert_eq!(got.logprobs.len(), 5);
    for (id, lp) in got.token_ids.iter().zip(&got.logprobs) {
        assert_eq!(lp.token_id, *id);
        assert_eq!(lp.top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.top[0].token_id, *id);
        assert!(lp.logprob <= 0.0 && (lp.top[0].logprob - lp.logprob).abs() < 1e-6);
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_for_grpcurl() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let Started { server, .. } = TestServer::tiny().engine(small_engine()).start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["multilora.v1.Generation", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    server.stop().await.unwrap();
}
