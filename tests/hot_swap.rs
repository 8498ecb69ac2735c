//! Adapter hot-swap over gRPC on small random models: unload and replace under load,
//! concurrent loads, a working set larger than the active pool, a cold load beside
//! running streams, corrupt adapters, drain deadlines and bad admin input.
mod common;

use common::*;
use multilora::engine::EngineConfig;
use multilora::lora::peft::{BaseShape, LoraSite, WEIGHTS_FILE};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::ModelConfig;
use multilora::proto::v1 as pb;
use multilora::testing::tiny_config;
use pb::adapters_client::AdaptersClient;
use pb::generation_client::GenerationClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// A random Llama big enough that a 32-stream generation takes a while on the CPU.
fn small_config(vocab: usize) -> ModelConfig {
    ModelConfig {
        name: "small-random-llama".into(),
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        ..tiny_config(vocab)
    }
}

/// A server on a random model of shape `cfg` (seed 5) with `engine`, and `host_memory`
/// bytes for adapters in host memory.
fn setup(cfg: ModelConfig, engine: EngineConfig, host_memory: usize) -> TestServer {
    TestServer::random(cfg, 5)
        .engine(engine)
        .host_memory(host_memory)
}

fn small(engine: EngineConfig) -> TestServer {
    setup(small_config(TINY_VOCAB), engine, 1 << 30)
}

fn synth(
    dir: &Path,
    name: &str,
    base: &BaseShape,
    rank: usize,
    sites: &[LoraSite],
    seed: u64,
) -> String {
    let p = dir.join(name);
    let spec = SynthSpec {
        kind: Default::default(),
        rank,
        alpha: 2.0 * rank as f32,
        sites: sites.to_vec(),
        seed,
    };
    write_synthetic_adapter(&p, base, &spec).unwrap();
    p.to_string_lossy().to_string()
}

async fn clients(
    server: TestServer,
) -> (
    multilora::server::RunningServer,
    GenerationClient<Channel>,
    AdaptersClient<Channel>,
) {
    let started = server.start().await;
    let adm = started.adapters().await;
    (started.server, started.gen, adm)
}

fn load_req(name: &str, source: &str, expected: Option<u64>) -> pb::LoadAdapterRequest {
    pb::LoadAdapterRequest {
        name: name.into(),
        source: source.into(),
        revision: None,
        expected_version: expected,
    }
}

/// Seeded sampling at a high temperature: random models have very peaked logits and
/// repeat one token under greedy decoding, while a seeded sample of flattened logits
/// depends on every logit, so it shows which weights produced it (and is reproducible
/// in any batch).
fn request(adapter: &str, prompt: u32, max_new: u32) -> pb::GenerateRequest {
    let mut r = greedy((0..6).map(|i| 10 + prompt * 7 + i).collect(), max_new);
    r.sampling = Some(pb::SamplingParams {
        temperature: Some(4.0),
        seed: Some(1000 + prompt as u64),
        ..Default::default()
    });
    r.adapter = adapter.into();
    r.ignore_eos = true;
    r
}

/// A generation's tokens, how it finished and the adapter version it ran on.
struct Run {
    tokens: Vec<u32>,
    finish: pb::FinishReason,
    version: u64,
}

async fn run_stream(
    mut c: GenerationClient<Channel>,
    req: pb::GenerateRequest,
    started: Option<tokio::sync::mpsc::Sender<()>>,
) -> Result<Run, tonic::Status> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut run = Run {
        tokens: vec![],
        finish: pb::FinishReason::Unspecified,
        version: 0,
    };
    let mut started = started;
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Delta(d)) => {
                run.tokens.extend(d.token_ids);
                if let Some(tx) = started.take() {
                    tx.send(()).await.unwrap();
                }
            }
            Some(pb::generate_response::Event::Final(f)) => {
                run.finish = f.finish_reason();
                run.version = f.adapter_version;
                return Ok(run);
            }
            None => panic!("empty message"),
        }
    }
    panic!("stream ended without a final message")
}

/// Waits (bounded) until no adapter bytes are resident.
async fn wait_all_freed(gen: &mut GenerationClient<Channel>) -> pb::AdapterStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = adapter_stats(gen).await;
        if s.resident_bytes == 0 && s.draining_versions == 0 || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `n` streams and returns once each has its first token.
async fn start_streams(
    gen: &GenerationClient<Channel>,
    reqs: Vec<pb::GenerateRequest>,
) -> Vec<tokio::task::JoinHandle<Result<Run, tonic::Status>>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(reqs.len());
    let n = reqs.len();
    let handles = reqs
        .into_iter()
        .map(|r| tokio::spawn(run_stream(gen.clone(), r, Some(tx.clone()))))
        .collect();
    for _ in 0..n {
        rx.recv().await.unwrap();
    }
    handles
}

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
async fn fifty_concurrent_loads_of_one_name_load_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = small(EngineConfig::default());
    let shape = s.base_shape();
    let src = synth(dir.path(), "a", &shape, 16, &LoraSite::ALL, 3);
    let (server, mut gen, adm) = clients(s).await;
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let (mut adm, src) = (adm.clone(), src.clone());
            tokio::spawn(async move { adm.load_adapter(load_req("one", &src, None)).await })
        })
        .collect();
    let mut infos = Vec::new();
    for c in calls {
        infos.push(c.await.unwrap().unwrap().into_inner());
    }
    assert!(infos.iter().all(|i| i.version == infos[0].version));
    let stats = adapter_stats(&mut gen).await;
    assert_eq!(stats.loads, 1, "{stats:?}");
    assert_eq!(stats.resident_bytes, infos[0].bytes, "one copy in memory");
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

/// Polls (bounded) until `name` is in `state`.
async fn wait_for_state(adm: &mut AdaptersClient<Channel>, name: &str, state: pb::AdapterState) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = adm
            .get_adapter(pb::GetAdapterRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        if info.state() == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never {state:?}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Nothing waits for an adapter load but its own requests: while a request's load is
/// held in progress (before it reads any weights), streams that arrive after it run to
/// completion, and the held request starts once its load is let go. No timing is
/// compared; a stall would hang the background streams until the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_load_does_not_stall_the_other_streams() {
    let dir = tempfile::tempdir().unwrap();
    let s = small(EngineConfig::default());
    let shape = s.base_shape();
    let cold = synth(dir.path(), "cold", &shape, 8, &LoraSite::ALL, 4);
    let service = s.register("cold", &cold).service();
    let registry = service.adapters.clone();
    let started = Started::serve(service, Default::default()).await;
    let mut adm = started.adapters().await;
    let hold = registry.hold_loads().await;
    let cold_run = tokio::spawn(run_stream(started.gen.clone(), request("cold", 0, 4), None));
    wait_for_state(&mut adm, "cold", pb::AdapterState::Loading).await;
    let background: Vec<_> = (0..4)
        .map(|i| tokio::spawn(run_stream(started.gen.clone(), request("", i, 64), None)))
        .collect();
    for (i, h) in background.into_iter().enumerate() {
        let run = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .unwrap_or_else(|_| panic!("stream {i} stalled while an adapter load was held"))
            .unwrap()
            .unwrap();
        assert_eq!(run.tokens.len(), 64, "stream {i}");
    }
    assert!(!cold_run.is_finished(), "the held load's request ran");
    wait_for_state(&mut adm, "cold", pb::AdapterState::Loading).await;
    drop(hold);
    let run = tokio::time::timeout(Duration::from_secs(60), cold_run)
        .await
        .expect("the request never started after its load was let go")
        .unwrap()
        .unwrap();
    assert_eq!(run.tokens.len(), 4);
    assert_eq!(run.finish, pb::FinishReason::Length);
    started.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_adapter_is_refused_without_disturbing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let s = small(EngineConfig::default());
    let shape = s.base_shape();
    let good = synth(dir.path(), "good", &shape, 8, &LoraSite::ALL, 1);
    let bad = synth(dir.path(), "bad", &shape, 8, &LoraSite::ALL, 2);
    let st = Path::new(&bad).join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&st).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&st, bytes).unwrap();
    let (server, gen, mut adm) = clients(s).await;
    let v = adm
        .load_adapter(load_req("good", &good, None))
        .await
        .unwrap()
        .into_inner();
    let alone = run_stream(gen.clone(), request("good", 1, 120), None)
        .await
        .unwrap()
        .tokens;
    let handles = start_streams(&gen, (0..8).map(|_| request("good", 1, 120)).collect()).await;
    let err = adm
        .load_adapter(load_req("broken", &bad, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("safetensors"), "{}", err.message());
    let err = adm
        .get_adapter(pb::GetAdapterRequest {
            name: "broken".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "half-registered");
    // A corrupt replacement leaves the good version serving.
    let err = adm
        .load_adapter(load_req("good", &bad, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let list = adm
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list
        .adapters
        .iter()
        .map(|a| (a.name.as_str(), a.version))
        .collect();
    assert_eq!(names, vec![("good", v.version)]);
    for h in handles {
        let run = h.await.unwrap().unwrap();
        assert_eq!((run.tokens, run.version), (alone.clone(), v.version));
    }
    let err = run_stream(gen.clone(), request("broken", 0, 4), None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::NotFound);
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
async fn bad_admin_input_gets_precise_codes() {
    let dir = tempfile::tempdir().unwrap();
    let s = small(EngineConfig::default());
    let shape = s.base_shape();
    let src = synth(dir.path(), "a", &shape, 4, &[LoraSite::Q], 1);
    let (server, _gen, mut adm) = clients(s).await;
    let code = |r: Result<tonic::Response<pb::AdapterInfo>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(adm.load_adapter(load_req("", &src, None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(adm.load_adapter(load_req("a b", &src, None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(adm.load_adapter(load_req("a", "", None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            adm.load_adapter(load_req("a", "/no/such/folder", None))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(adm.load_adapter(load_req("a", &src, Some(7))).await),
        Code::Aborted
    );
    assert_eq!(
        code(
            adm.get_adapter(pb::GetAdapterRequest { name: "zzz".into() })
                .await
        ),
        Code::NotFound
    );
    let unload = |name: &str, t: Option<f64>| pb::UnloadAdapterRequest {
        name: name.into(),
        drain_timeout_s: t,
    };
    assert_eq!(
        adm.unload_adapter(unload("zzz", None))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    adm.load_adapter(load_req("a", &src, None)).await.unwrap();
    let bad = adm
        .unload_adapter(unload("a", Some(f64::NAN)))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    // The refused unload left the adapter in place.
    adm.get_adapter(pb::GetAdapterRequest { name: "a".into() })
        .await
        .unwrap();
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
