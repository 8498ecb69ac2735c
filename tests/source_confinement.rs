//! Runtime adapter loads confined to the adapter roots, end to end over gRPC and HTTP.
//! Every source of the corpus (a system folder, `..`, an encoded `..`, a link out of the
//! root, NUL, 1 MB) gets PERMISSION_DENIED (HTTP 403) with one message whether its
//! target exists or not. The folder outside the root holds named pipes where an
//! adapter's files would be, so any attempt to open them would hang the call instead of
//! answering. After each refusal, a load from inside the root and a generation with it
//! still succeed.
mod common;

use common::http::post;
use common::*;
use multilora::lora::registry::{echo, SourcePolicy};
use multilora::proto::v1 as pb;
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

/// `dir` with named pipes as its adapter files (an open for reading blocks).
fn canary_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        let status = std::process::Command::new("mkfifo")
            .arg(dir.join(file))
            .status()
            .unwrap();
        assert!(status.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_loads_outside_the_roots_are_refused_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    synth_lora_dir(&root, "good", 1);
    canary_folder(&outside);
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    let policy = SourcePolicy::confined(std::slice::from_ref(&root), false).unwrap();
    let started = TestServer::tiny()
        .sources(policy)
        .options(with_http())
        .start()
        .await;
    let mut adapters = started.adapters().await;
    let mut gen = started.gen.clone();
    let outside_str = outside.to_string_lossy().to_string();
    let corpus = [
        "/etc".to_string(),
        "/etc/no-such-folder".to_string(),
        outside_str.clone(),
        format!("{outside_str}/adapter_config.json"),
        "../outside".to_string(),
        "%2e%2e/outside".to_string(),
        "escape".to_string(),
        "escape/".to_string(),
        "good\0".to_string(),
        "owner/repo".to_string(),
        "x".repeat(1 << 20),
    ];
    let mut messages = Vec::new();
    for (i, source) in corpus.iter().enumerate() {
        let call = adapters.load_adapter(load_request("probe", source));
        let err = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the load hung: it opened a file outside the root")
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(err.message().len() < 400, "{} bytes", err.message().len());
        assert!(!err.message().contains("--"), "{}", err.message());
        messages.push(err.message().replace(&echo(source), "<source>"));
        // The next valid request still succeeds.
        let name = format!("good-{i}");
        adapters
            .load_adapter(load_request(&name, "good"))
            .await
            .unwrap();
        let mut req = greedy(vec![3, 70], 4);
        req.adapter = name;
        generate(&mut gen, req).await.unwrap();
    }
    assert!(messages.iter().all(|m| m == &messages[0]), "{messages:#?}");
    assert!(adapters
        .get_adapter(pb::GetAdapterRequest {
            name: "probe".into()
        })
        .await
        .is_err());

    // The HTTP route is confined the same way: 403 in OpenAI's error shape.
    let addr = started.server.http_addr.unwrap();
    let body = json!({"lora_name": "probe", "lora_path": outside_str});
    let (status, err) = post(addr, "/v1/load_lora_adapter", body).await;
    assert_eq!(status, 403, "{err}");
    assert_eq!(err["error"]["type"], "permission_error");
    let body = json!({"lora_name": "by-http", "lora_path": "good"});
    let (status, text) = post(addr, "/v1/load_lora_adapter", body).await;
    assert_eq!(status, 200, "{text}");
    started.stop().await;
}

/// A 1 MB adapter name is refused as INVALID_ARGUMENT with a short message (the whole
/// name echoed back would break the client's metadata limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_name_is_refused_with_a_short_message() {
    let started = TestServer::tiny().start().await;
    let mut adapters = started.adapters().await;
    let err = adapters
        .load_adapter(load_request(&"n".repeat(1 << 20), "/tmp"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().len() < 400, "{} bytes", err.message().len());
    started.stop().await;
}
