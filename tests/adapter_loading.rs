//! Loading adapters over gRPC on small random models: fifty concurrent loads of one
//! name, a cold load beside running streams, a corrupt adapter, and bad admin input.
mod common;

use common::swap::*;
use common::*;
use multilora::engine::EngineConfig;
use multilora::lora::peft::{LoraSite, WEIGHTS_FILE};
use multilora::proto::v1 as pb;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

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
