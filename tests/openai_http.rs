//! The OpenAI-compatible HTTP front on the tiny model, through a plain HTTP/1.1 client:
//! completions (whole and streamed as SSE, ending with `data: [DONE]`) give what gRPC
//! gives for the same request, an adapter is chosen by `model` or mixed by `adapters`,
//! `/v1/models` lists the base and every adapter with its parent, and bad input gets
//! OpenAI's error shape with the right status, after which the next request succeeds.
mod common;

use common::http::{http, http_raw, post, sse_data};
use common::*;
use serde_json::{json, Value};

fn completion(model: &str, prompt: &str) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_match_grpc_and_errors_have_openai_shape() {
    let root = tempfile::tempdir().unwrap();
    let started = TestServer::tiny()
        .adapter("ad", synth_lora_dir(root.path(), "ad", 1))
        .adapter("be", synth_lora_dir(root.path(), "be", 2))
        .options(with_http())
        .start()
        .await;
    let addr = started.server.http_addr.unwrap();
    let mut grpc = started.gen.clone();

    let (status, models) = http(addr, "GET", "/v1/models", None).await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [base.as_str(), "ad", "be"]);
    assert_eq!(models["data"][1]["parent"], json!(base));

    for model in [base.as_str(), "ad"] {
        let (status, body) = post(addr, "/v1/completions", completion(model, "hello")).await;
        assert_eq!(status, 200, "{body}");
        let mut want = greedy(vec![], 8);
        want.prompt = Some("hello".into());
        want.adapter = if model == "ad" {
            "ad".into()
        } else {
            String::new()
        };
        let want = generate(&mut grpc, want).await.unwrap();
        assert_eq!(body["choices"][0]["text"], json!(want.text), "{model}");
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["usage"]["completion_tokens"], json!(8));
        assert_eq!(body["choices"][0]["finish_reason"], "length");

        // Streamed: the same text in chunks, a usage chunk, then [DONE].
        let mut req = completion(model, "hello");
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        let (status, text) = http(addr, "POST", "/v1/completions", Some(&req)).await;
        assert_eq!(status, 200);
        let events = sse_data(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(streamed, want.text);
        assert_eq!(
            chunks.last().unwrap()["usage"]["completion_tokens"],
            json!(8)
        );
    }

    // A mixture through `adapters`, with `model` the base.
    let mut mix = completion(&base, "hello");
    mix["adapters"] = json!([{"name": "ad", "weight": 0.5}, {"name": "be", "weight": 0.5}]);
    let (status, body) = post(addr, "/v1/completions", mix).await;
    assert_eq!(status, 200, "{body}");

    // Errors: OpenAI's shape and status; the next valid request still succeeds.
    let cases = [
        (completion("nope", "hi"), 404, None),
        (
            json!({"model": base, "prompt": "hi", "n": 2}),
            400,
            Some("n"),
        ),
        (
            json!({"model": base, "prompt": "hi", "temperature": -1}),
            400,
            Some("temperature"),
        ),
        (
            json!({"model": base, "prompt": "hi", "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"model": base, "prompt": "hi", "frequency_penalty": 0.5}),
            400,
            Some("frequency_penalty"),
        ),
        (
            json!({"model": base, "prompt": ["a", "b"]}),
            400,
            Some("prompt"),
        ),
        (json!({"model": base}), 400, Some("body")),
    ];
    for (req, code, param) in cases {
        let (status, body) = post(addr, "/v1/completions", req.clone()).await;
        assert_eq!(status, code, "{req}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
        if let Some(p) = param {
            assert_eq!(body["error"]["param"], json!(p), "{body}");
        }
        let (status, _) = post(addr, "/v1/completions", completion("ad", "ok")).await;
        assert_eq!(status, 200);
    }
    let (status, body) = http(addr, "POST", "/v1/completions", None).await;
    assert_eq!(status, 400, "{body}");

    // Chat on the tiny model's template: what gRPC gives for the same messages.
    let chat = json!({"model": "ad", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = post(addr, "/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{body}");
    let mut want = greedy(vec![], 8);
    want.adapter = "ad".into();
    want.messages = vec![multilora::proto::v1::ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    let want = generate(&mut grpc, want).await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], json!(want.text));
    assert_eq!(body["object"], "chat.completion");
    let bad = json!({"model": base, "messages": []});
    let (status, body) = post(addr, "/v1/chat/completions", bad).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    started.stop().await;
}

/// Bad HTTP requests sent while a stream is in flight (a body that is not JSON, a field
/// of the wrong type, an unknown model, a refused parameter, an unknown route, a wrong
/// method) get their errors, and the stream's tokens are exactly what it gives alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_requests_leave_a_stream_in_flight_intact() {
    use multilora::proto::v1::generate_response::Event;
    let root = tempfile::tempdir().unwrap();
    let started = TestServer::tiny()
        .adapter("ad", synth_lora_dir(root.path(), "ad", 1))
        .options(with_http())
        .start()
        .await;
    let addr = started.server.http_addr.unwrap();
    let mut grpc = started.gen.clone();
    let base = TestServer::tiny().config().name;
    let mut req = greedy(vec![3, 70, 71], 400);
    req.adapter = "ad".into();
    req.ignore_eos = true;
    let alone = generate(&mut grpc, req.clone()).await.unwrap();

    let mut stream = grpc.generate(req).await.unwrap().into_inner();
    let mut tokens = Vec::new();
    // The first delta: the stream is running when the bad requests arrive.
    if let Some(Event::Delta(d)) = stream.message().await.unwrap().unwrap().event {
        tokens.extend(d.token_ids);
    }
    let refused_n = json!({"model": base, "prompt": "hi", "n": 3}).to_string();
    let cases = [
        ("POST", "/v1/completions", "{not json".to_string(), 400),
        (
            "POST",
            "/v1/completions",
            json!({"model": 7}).to_string(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            completion("nope", "hi").to_string(),
            404,
        ),
        ("POST", "/v1/completions", refused_n, 400),
        ("POST", "/v1/no_such_route", "{}".to_string(), 404),
        ("GET", "/v1/completions", String::new(), 405),
    ];
    for (method, path, body, code) in cases {
        let (status, text) = http_raw(addr, method, path, &body).await;
        assert_eq!(status, code, "{method} {path} {body}: {text}");
    }
    let finish = loop {
        match stream.message().await.unwrap().and_then(|m| m.event) {
            Some(Event::Delta(d)) => tokens.extend(d.token_ids),
            Some(Event::Final(f)) => break f.finish_reason(),
            None => panic!("stream ended without a final message"),
        }
    };
    assert_eq!(finish, alone.finish);
    assert_eq!(tokens, alone.token_ids);
    let (status, _) = post(addr, "/v1/completions", completion("ad", "ok")).await;
    assert_eq!(status, 200);
    started.stop().await;
}

/// Chat on the real model: the chat template applied as gRPC applies it, streamed or
/// not, with logprobs in the Chat Completions shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn chat_completions_on_the_real_model_match_grpc() {
    let started = TestServer::real().options(with_http()).start().await;
    let addr = started.server.http_addr.unwrap();
    let mut grpc = started.gen.clone();
    let (_, models) = http(addr, "GET", "/v1/models", None).await;
    let models: Value = serde_json::from_str(&models).unwrap();
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let question = "What is the capital of France?";
    let mut want = greedy(vec![], 12);
    want.messages = vec![multilora::proto::v1::ChatMessage {
        role: "user".into(),
        content: question.into(),
    }];
    let want = generate(&mut grpc, want).await.unwrap();
    let req = json!({"model": base, "max_tokens": 12, "temperature": 0, "logprobs": true,
        "top_logprobs": 2, "messages": [{"role": "user", "content": question}]});
    let (status, body) = post(addr, "/v1/chat/completions", req.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], json!(want.text));
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(json!(content.len()), body["usage"]["completion_tokens"]);
    let finish = body["choices"][0]["finish_reason"].clone();
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let mut streamed = req;
    streamed["stream"] = json!(true);
    let (_, text) = http(addr, "POST", "/v1/chat/completions", Some(&streamed)).await;
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want.text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        finish
    );
    started.stop().await;
}

/// vLLM's runtime LoRA endpoints: load (refused for a loaded name unless
/// `load_inplace`), generate through the new name, unload (404 for an unknown one); bad
/// bodies are 400s that leave the adapters as they were. `/metrics` counts each request
/// by front, outcome and code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_lora_endpoints_and_request_metrics() {
    let root = tempfile::tempdir().unwrap();
    let started = TestServer::tiny().options(with_http()).start().await;
    let addr = started.server.http_addr.unwrap();
    let dir = synth_lora_dir(root.path(), "ce", 3);
    let load = json!({"lora_name": "ce", "lora_path": dir.to_str().unwrap()});

    let (status, text) = http(addr, "POST", "/v1/load_lora_adapter", Some(&load)).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'ce' added successfully.")
    );
    // Logprobs tell the adapter's versions apart where greedy text may not.
    let mut scored = completion("ce", "hello");
    scored["logprobs"] = json!(1);
    let (status, body) = post(addr, "/v1/completions", scored.clone()).await;
    assert_eq!(status, 200, "{body}");
    let first = body["choices"][0]["logprobs"]["token_logprobs"].clone();

    // Loaded already: 400 naming the field; with load_inplace: replaced.
    let (status, body) = post(addr, "/v1/load_lora_adapter", load.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "lora_name", "{body}");
    // The files change in place (as after a training step): load_inplace reads them.
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(synth_lora_dir(root.path(), "ce", 4), dir);
    let mut inplace = load.clone();
    inplace["load_inplace"] = json!(true);
    let (status, _) = post(addr, "/v1/load_lora_adapter", inplace).await;
    assert_eq!(status, 200);
    let (status, body) = post(addr, "/v1/completions", scored.clone()).await;
    assert_eq!(status, 200, "{body}");
    let second = body["choices"][0]["logprobs"]["token_logprobs"].clone();
    assert_ne!(second, first);
    let bad = [
        json!({"lora_name": "ce"}),
        json!({"lora_name": "x y", "lora_path": dir.to_str().unwrap()}),
        json!({"lora_name": "ce", "lora_path": dir.to_str().unwrap(), "nope": 1}),
    ];
    for b in bad {
        let (status, body) = post(addr, "/v1/load_lora_adapter", b.clone()).await;
        assert_eq!(status, 400, "{b}: {body}");
    }
    let missing =
        json!({"lora_name": "de", "lora_path": root.path().join("none").to_str().unwrap()});
    let (status, body) = post(addr, "/v1/load_lora_adapter", missing).await;
    assert!(status == 400 || status == 404, "{status} {body}");
    let (status, body) = post(addr, "/v1/completions", scored).await;
    let lps = body["choices"][0]["logprobs"]["token_logprobs"].clone();
    assert_eq!((status, lps), (200, second));

    let unload = json!({"lora_name": "ce"});
    let (status, text) = http(addr, "POST", "/v1/unload_lora_adapter", Some(&unload)).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'ce' removed successfully.")
    );
    let (status, body) = post(addr, "/v1/unload_lora_adapter", unload).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = post(addr, "/v1/completions", completion("ce", "hello")).await;
    assert_eq!(status, 404);

    // A body that is not JSON is refused, and counted, like any other bad request.
    let (status, _) = http_raw(addr, "POST", "/v1/completions", "{not json").await;
    assert_eq!(status, 400);

    let (status, text) = http(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    for line in [
        r#"multilora_requests_total{protocol="http",outcome="length",code="200"} 3"#,
        r#"multilora_requests_total{protocol="http",outcome="error",code="404"} 1"#,
        r#"multilora_requests_total{protocol="http",outcome="error",code="400"} 1"#,
        "# TYPE vllm:num_requests_waiting gauge",
        "vllm:num_requests_running 0",
        "multilora_time_to_first_token_seconds_count 3",
        r#"multilora_adapter_loads_total 2"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    started.stop().await;
}
