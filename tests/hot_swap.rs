//! Adapter hot-swap over gRPC on small random models: unload and replace under load,
//! a working set larger than the active pool, drain deadlines, and idle active adapters
//! giving their KV blocks back. Loading itself is in `adapter_loading.rs`.
mod common;

use common::swap::*;
use common::*;
use multilora::engine::EngineConfig;
use multilora::lora::peft::LoraSite;
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::proto::v1 as pb;
use multilora::testing::tiny_config;
use pb::adapters_client::AdaptersClient;
use pb::generation_client::GenerationClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_while_32_streams_use_it_drains_them_on_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = small(EngineConfig::default());
    let shape = s.base_shape();
    let src = synth(dir.path(), "a", &shape, 8, &LoraSite::ALL, 1);
    let (server, mut gen, mut adm) = clients(s).await;
    let info = adm
        .load_adapter(load_req("a", &src, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state(), pb::AdapterState::Host);
    let max_new = 200;
    let mut alone = Vec::new();
    for p in 0..4 {
        alone.push(
            run_stream(gen.clone(), request("a", p, max_new), None)
                .await
                .unwrap()
                .tokens,
        );
    }
    let base = run_stream(gen.clone(), request("", 0, max_new), None)
        .await
        .unwrap();
    assert_ne!(base.tokens, alone[0], "the adapter changes nothing");

    let reqs = (0..32).map(|i| request("a", i % 4, max_new)).collect();
    let handles = start_streams(&gen, reqs).await;
    let unloaded = adm
        .unload_adapter(pb::UnloadAdapterRequest {
            name: "a".into(),
            drain_timeout_s: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unloaded.version, info.version);
    assert_eq!(
        unloaded.state(),
        pb::AdapterState::Draining,
        "streams were in flight"
    );
    let err = run_stream(gen.clone(), request("a", 0, 4), None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::NotFound);
    let err = adm
        .get_adapter(pb::GetAdapterRequest { name: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for (i, h) in handles.into_iter().enumerate() {
        let run = h.await.unwrap().unwrap();
        assert_eq!(run.finish, pb::FinishReason::Length, "stream {i}");
        assert_eq!(run.version, info.version, "stream {i}");
        assert_eq!(run.tokens, alone[i % 4], "stream {i}");
    }
    let stats = wait_all_freed(&mut gen).await;
    assert_eq!(
        (stats.resident_bytes, stats.draining_versions),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!((stats.active, stats.active_kv_blocks), (0, 0), "{stats:?}");
    server.stop().await.unwrap();
}

/// Replaces `name` (v1 from `v1`) by `v2` while streams run; every response must match
/// the version it reports, and both versions must have served.
async fn replace_under_load(
    gen: &mut GenerationClient<Channel>,
    adm: &mut AdaptersClient<Channel>,
    v1: &str,
    v2: &str,
    max_new: u32,
) {
    let first = adm
        .load_adapter(load_req("tenant", v1, Some(0)))
        .await
        .unwrap()
        .into_inner();
    adm.load_adapter(load_req("reference-v2", v2, None))
        .await
        .unwrap();
    let mut want1 = Vec::new();
    let mut want2 = Vec::new();
    for p in 0..2 {
        want1.push(
            run_stream(gen.clone(), request("tenant", p, max_new), None)
                .await
                .unwrap()
                .tokens,
        );
        want2.push(
            run_stream(gen.clone(), request("reference-v2", p, max_new), None)
                .await
                .unwrap()
                .tokens,
        );
        assert_ne!(want1[p as usize], want2[p as usize], "v1 and v2 agree");
    }
    let before = start_streams(
        gen,
        (0..16).map(|i| request("tenant", i % 2, max_new)).collect(),
    )
    .await;
    // Keep requests arriving while the replacement happens.
    let during: Vec<_> = (0..16)
        .map(|i| {
            let g = gen.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(3 * i)).await;
                run_stream(g, request("tenant", (i % 2) as u32, max_new), None).await
            })
        })
        .collect();
    let second = adm
        .load_adapter(load_req("tenant", v2, Some(first.version)))
        .await
        .unwrap()
        .into_inner();
    assert!(second.version > first.version);
    let stale = adm
        .load_adapter(load_req("tenant", v1, Some(first.version)))
        .await;
    assert_eq!(stale.unwrap_err().code(), Code::Aborted);
    let after = start_streams(
        gen,
        (0..16).map(|i| request("tenant", i % 2, max_new)).collect(),
    )
    .await;
    let mut seen = [0, 0];
    for (i, h) in before.into_iter().chain(during).chain(after).enumerate() {
        let run = h.await.unwrap().unwrap();
        let p = i % 2;
        if run.version == first.version {
            assert_eq!(run.tokens, want1[p], "request {i} on v1");
            seen[0] += 1;
        } else {
            assert_eq!(run.version, second.version, "request {i}");
            assert_eq!(run.tokens, want2[p], "request {i} on v2");
            seen[1] += 1;
        }
    }
    assert!(seen[0] >= 16 && seen[1] >= 16, "{seen:?}");
    // v1 drains and is freed; v2 and the reference stay.
    let deadline = Instant::now() + Duration::from_secs(10);
    while adapter_stats(gen).await.draining_versions > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(adapter_stats(gen).await.draining_versions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_under_load_keeps_each_request_on_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = small(EngineConfig::default());
    let shape = s.base_shape();
    let v1 = synth(dir.path(), "v1", &shape, 8, &[LoraSite::Q, LoraSite::V], 1);
    let v2 = synth(dir.path(), "v2", &shape, 16, &LoraSite::ALL, 2);
    let (server, mut gen, mut adm) = clients(s).await;
    replace_under_load(&mut gen, &mut adm, &v1, &v2, 48).await;
    server.stop().await.unwrap();
}

/// The same with the two real PEFT fixture adapters as version 1 and version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn replace_under_load_with_fixture_adapters_on_the_real_model() {
    let (v1, v2) = (
        fixture_adapter("alpha-lora-r8-qv"),
        fixture_adapter("beta-lora-r16-all"),
    );
    let (server, mut gen, mut adm) = clients(TestServer::real()).await;
    replace_under_load(
        &mut gen,
        &mut adm,
        v1.to_str().unwrap(),
        v2.to_str().unwrap(),
        16,
    )
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_set_larger_than_the_active_pool_serves_correctly_with_evictions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(TINY_VOCAB);
    // Adapters of rank 4 on q and v take one KV block each: room for 16 active.
    let block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 16 * 4;
    let engine = EngineConfig {
        kv_cache_memory: 8 << 20,
        adapter_memory: 16 * block_bytes,
        ..Default::default()
    };
    let one = {
        let probe = dir.path().join("probe");
        let spec = SynthSpec {
            kind: Default::default(),
            rank: 4,
            alpha: 8.0,
            sites: vec![LoraSite::Q, LoraSite::V],
            seed: 0,
        };
        write_synthetic_adapter(&probe, &cfg.base_shape(), &spec).unwrap()
    };
    assert!(one <= block_bytes);
    // Host memory for 48 of the 200.
    let mut s = setup(cfg, engine, 48 * one);
    let shape = s.base_shape();
    for i in 0..200 {
        let src = synth(
            dir.path(),
            &format!("t{i}"),
            &shape,
            4,
            &[LoraSite::Q, LoraSite::V],
            i,
        );
        s = s.register(&format!("t{i}"), &src);
    }
    let (server, mut gen, _adm) = clients(s).await;
    let mut alone = Vec::new();
    for i in 0..200 {
        let r = run_stream(gen.clone(), request(&format!("t{i}"), i % 3, 8), None);
        let r = match tokio::time::timeout(Duration::from_secs(20), r).await {
            Ok(r) => r,
            Err(_) => panic!("alone {i} hangs; {:?}", adapter_stats(&mut gen).await),
        };
        alone.push(r.unwrap().tokens);
    }
    // Round-robin, 32 at a time.
    let mut handles = Vec::new();
    for round in 0..2 {
        for i in 0..200u32 {
            let g = gen.clone();
            handles.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(((round * 200 + i) / 32) as u64 * 2))
                    .await;
                run_stream(g, request(&format!("t{i}"), i % 3, 8), None).await
            }));
        }
    }
    for (k, h) in handles.into_iter().enumerate() {
        let run = match tokio::time::timeout(Duration::from_secs(20), h).await {
            Ok(r) => r.unwrap().unwrap(),
            Err(_) => panic!("request {k} hangs; {:?}", adapter_stats(&mut gen).await),
        };
        assert_eq!(run.tokens, alone[k % 200], "request {k}");
    }
    let stats = adapter_stats(&mut gen).await;
    assert!(
        stats.active <= 16 && stats.active_kv_blocks <= 16,
        "{stats:?}"
    );
    assert!(
        stats.active_evictions > 0 && stats.host_evictions > 0,
        "{stats:?}"
    );
    assert!(stats.resident_bytes <= 48 * one as u64, "{stats:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_deadline_cancels_what_is_left_and_frees_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = small(EngineConfig::default());
    let shape = s.base_shape();
    let src = synth(dir.path(), "a", &shape, 8, &LoraSite::ALL, 1);
    let (server, mut gen, mut adm) = clients(s).await;
    let info = adm
        .load_adapter(load_req("a", &src, None))
        .await
        .unwrap()
        .into_inner();
    let handles = start_streams(&gen, (0..8).map(|i| request("a", i, 400)).collect()).await;
    let base = tokio::spawn(run_stream(gen.clone(), request("", 0, 40), None));
    let r = adm
        .unload_adapter(pb::UnloadAdapterRequest {
            name: "a".into(),
            drain_timeout_s: Some(0.02),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state(), pb::AdapterState::Unloaded, "{r:?}");
    assert_eq!(r.bytes_freed, info.bytes);
    assert!(r.cancelled_requests > 0, "{r:?}");
    let mut cancelled = 0;
    for h in handles {
        let run = h.await.unwrap().unwrap();
        if run.finish == pb::FinishReason::Cancelled {
            cancelled += 1;
        }
    }
    assert_eq!(cancelled, r.cancelled_requests);
    let base = base.await.unwrap().unwrap();
    assert_eq!(
        base.finish,
        pb::FinishReason::Length,
        "the base stream is untouched"
    );
    assert_eq!(adapter_stats(&mut gen).await.resident_bytes, 0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_active_adapters_give_their_kv_blocks_back_to_a_long_request() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(TINY_VOCAB);
    let block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 16 * 4;
    // 40 blocks of 16 tokens; adapters may hold up to half of them.
    let s = setup(
        cfg,
        EngineConfig {
            kv_cache_memory: 40 * block_bytes,
            adapter_memory: 20 * block_bytes,
            ..Default::default()
        },
        1 << 30,
    );
    let shape = s.base_shape();
    let (server, mut gen, mut adm) = clients(s).await;
    for i in 0..20 {
        let src = synth(dir.path(), &format!("a{i}"), &shape, 4, &[LoraSite::Q], i);
        adm.load_adapter(load_req(&format!("a{i}"), &src, None))
            .await
            .unwrap();
        run_stream(gen.clone(), request(&format!("a{i}"), 0, 2), None)
            .await
            .unwrap();
    }
    assert_eq!(adapter_stats(&mut gen).await.active_kv_blocks, 20);
    // A 480-token prompt needs 30 blocks to start; only 20 are free until idle
    // adapters step aside.
    let mut req = request("", 0, 10);
    req.prompt_token_ids = (0..480).map(|i| 3 + i % 250).collect();
    let long = run_stream(gen.clone(), req, None);
    let run = tokio::time::timeout(Duration::from_secs(30), long)
        .await
        .expect("the long request never ran")
        .unwrap();
    assert_eq!(run.tokens.len(), 10);
    let stats = adapter_stats(&mut gen).await;
    assert!(stats.active_evictions >= 10, "{stats:?}");
    server.stop().await.unwrap();
}
