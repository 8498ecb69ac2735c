//! A registry that survives restarts (`--state-dir`), end to end on the tiny random
//! model: runtime loads, a replacement, an in-place reload over HTTP and unloads (of a
//! runtime adapter and of a start-up folder adapter) are journaled; a server started
//! again over the same state folder, after a crash left a torn journal line, lists the
//! same names, sources and versions (loaded on first use, generating exactly as before),
//! keeps the unloads in force, and numbers new loads past the replayed versions.
mod common;

use common::http::post;
use common::*;
use multilora::lora::registry::{SourcePolicy, JOURNAL_FILE};
use multilora::proto::v1 as pb;
use pb::adapters_client::AdaptersClient;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;
use tonic::Code;

fn unload_request(name: &str) -> pb::UnloadAdapterRequest {
    pb::UnloadAdapterRequest {
        name: name.into(),
        drain_timeout_s: None,
    }
}

fn request(adapter: &str) -> pb::GenerateRequest {
    let mut req = greedy(vec![3, 70, 71, 72], 8);
    req.adapter = adapter.into();
    req.ignore_eos = true;
    req
}

/// (name, source, version) of every adapter, sorted by name.
async fn listed(adapters: &mut AdaptersClient<Channel>) -> Vec<(String, String, u64)> {
    let list = adapters
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner();
    list.adapters
        .into_iter()
        .map(|a| (a.name, a.source, a.version))
        .collect()
}

/// The server as `serve --adapter-dir folders --adapter-root runtime --state-dir state`
/// would start it.
fn server(folders: &Path, runtime: &Path, state: &Path) -> TestServer {
    let roots = [folders.to_path_buf(), runtime.to_path_buf()];
    let mut server = TestServer::tiny()
        .sources(SourcePolicy::confined(&roots, false).unwrap())
        .options(with_http())
        .state_dir(state);
    for name in ["folder-a", "folder-b"] {
        server = server.register(name, folders.join(name));
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_brings_back_the_same_names_and_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let (folders, runtime) = (tmp.path().join("folders"), tmp.path().join("runtime"));
    let state: PathBuf = tmp.path().join("state");
    synth_lora_dir(&folders, "folder-a", 1);
    synth_lora_dir(&folders, "folder-b", 2);
    for (i, name) in ["x1", "x2", "x3"].iter().enumerate() {
        synth_lora_dir(&runtime, name, 10 + i as u64);
    }

    let started = server(&folders, &runtime, &state).start().await;
    let mut adapters = started.adapters().await;
    let mut gen = started.gen.clone();
    let alpha1 = adapters
        .load_adapter(load_request("alpha", "x1"))
        .await
        .unwrap();
    adapters
        .load_adapter(load_request("beta", "x2"))
        .await
        .unwrap();
    let alpha2 = adapters
        .load_adapter(load_request("alpha", "x3"))
        .await
        .unwrap();
    assert!(alpha2.get_ref().version > alpha1.get_ref().version);
    // A start-up folder adapter replaced at runtime, in place over HTTP.
    let addr = started.server.http_addr.unwrap();
    let body = json!({"lora_name": "folder-a", "lora_path": "x2", "load_inplace": true});
    let (status, text) = post(addr, "/v1/load_lora_adapter", body).await;
    assert_eq!(status, 200, "{text}");
    adapters
        .unload_adapter(unload_request("beta"))
        .await
        .unwrap();
    adapters
        .unload_adapter(unload_request("folder-b"))
        .await
        .unwrap();
    let before = listed(&mut adapters).await;
    let names: Vec<&str> = before.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["alpha", "folder-a"]);
    let alpha_out = generate(&mut gen, request("alpha")).await.unwrap();
    let folder_a_out = generate(&mut gen, request("folder-a")).await.unwrap();
    started.stop().await;

    // A crash in the middle of an append leaves a torn line at the end.
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .open(state.join(JOURNAL_FILE))
        .unwrap();
    journal
        .write_all(b"{\"op\":\"load\",\"name\":\"gamma\",\"source\":\"x")
        .unwrap();
    drop(journal);

    let started = server(&folders, &runtime, &state).start().await;
    let mut adapters = started.adapters().await;
    let mut gen = started.gen.clone();
    assert_eq!(listed(&mut adapters).await, before);
    // Replayed adapters load on first use, at their journaled version, and generate
    // exactly as before the restart.
    let again = generate(&mut gen, request("alpha")).await.unwrap();
    assert_eq!(again.token_ids, alpha_out.token_ids);
    let again = generate(&mut gen, request("folder-a")).await.unwrap();
    assert_eq!(again.token_ids, folder_a_out.token_ids);
    assert_eq!(listed(&mut adapters).await, before);
    // The unloads stay in force.
    for gone in ["beta", "folder-b", "gamma"] {
        let err = generate(&mut gen, request(gone)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{gone}: {}", err.message());
    }
    // The next load is numbered past every replayed version and serves.
    let newest = before.iter().map(|(_, _, v)| *v).max().unwrap();
    let gamma = adapters
        .load_adapter(load_request("gamma", "x1"))
        .await
        .unwrap();
    assert!(gamma.get_ref().version > newest);
    generate(&mut gen, request("gamma")).await.unwrap();
    let after = listed(&mut adapters).await;
    started.stop().await;

    // Once more: the journal was rewritten without the torn line, and the new load stays.
    let started = server(&folders, &runtime, &state).start().await;
    let mut adapters = started.adapters().await;
    assert_eq!(listed(&mut adapters).await, after);
    let mut gen = started.gen.clone();
    generate(&mut gen, request("gamma")).await.unwrap();
    started.stop().await;
}
