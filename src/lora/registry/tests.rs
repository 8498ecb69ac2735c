//! Registry lifecycle tests on synthetic adapters for the tiny model's shapes.
use super::*;
use crate::lora::peft::LoraSite;
use crate::lora::synth::{write_synthetic_adapter, SynthSpec};
use std::path::Path;

fn base() -> BaseShape {
    crate::testing::tiny_config(97).base_shape()
}

/// Writes adapter `seed` of rank `rank` on q and v; returns (source, bytes).
fn adapter(dir: &Path, name: &str, rank: usize, seed: u64) -> (String, usize) {
    let p = dir.join(name);
    let spec = SynthSpec {
        kind: Default::default(),
        rank,
        alpha: 2.0 * rank as f32,
        sites: vec![LoraSite::Q, LoraSite::V],
        seed,
    };
    let bytes = write_synthetic_adapter(&p, &base(), &spec).unwrap();
    (p.to_string_lossy().to_string(), bytes)
}

fn registry(host_memory: usize) -> AdapterRegistry {
    AdapterRegistry::new(RegistryConfig {
        host_memory,
        ..RegistryConfig::new(base())
    })
}

#[tokio::test]
async fn lazy_registration_loads_on_first_request_and_leases_count() {
    let dir = tempfile::tempdir().unwrap();
    let (src, bytes) = adapter(dir.path(), "a", 4, 1);
    let reg = registry(1 << 30);
    reg.register("a", &src).unwrap();
    assert_eq!(reg.get("a").unwrap().state, AdapterState::Registered);
    assert_eq!(reg.stats().resident_bytes, 0);
    let l1 = reg.acquire("a").await.unwrap();
    let l2 = reg.acquire("a").await.unwrap();
    let info = reg.get("a").unwrap();
    assert_eq!(
        (info.state, info.in_flight, info.bytes),
        (AdapterState::Host, 2, bytes)
    );
    assert_eq!(l1.key(), l2.key());
    let s = reg.stats();
    assert_eq!((s.loads, s.host_misses, s.host_hits), (1, 1, 1));
    drop(l1);
    let l3 = l2.clone();
    drop(l2);
    assert_eq!(reg.get("a").unwrap().in_flight, 1);
    drop(l3);
    assert_eq!(reg.get("a").unwrap().in_flight, 0);
    assert!(matches!(
        reg.acquire("nope").await,
        Err(RequestError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_loads_of_one_name_load_once() {
    let dir = tempfile::tempdir().unwrap();
    let (src, bytes) = adapter(dir.path(), "a", 8, 2);
    let reg = registry(1 << 30);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let (reg, src) = (reg.clone(), src.clone());
            tokio::spawn(async move { reg.load("shared", &src, None).await })
        })
        .collect();
    let mut versions = Vec::new();
    for c in calls {
        versions.push(c.await.unwrap().unwrap().version);
    }
    assert!(versions.iter().all(|v| *v == versions[0]));
    let s = reg.stats();
    assert_eq!(s.loads, 1);
    assert_eq!(s.resident_bytes, bytes);
    assert_eq!(s.host_resident, 1);
}

#[tokio::test]
async fn replacement_keeps_old_leases_on_the_old_version_until_they_end() {
    let dir = tempfile::tempdir().unwrap();
    let (v1_src, b1) = adapter(dir.path(), "v1", 4, 1);
    let (v2_src, b2) = adapter(dir.path(), "v2", 8, 2);
    let reg = registry(1 << 30);
    let v1 = reg.load("x", &v1_src, Some(0)).await.unwrap();
    let old = reg.acquire("x").await.unwrap();
    // Compare-and-set: a stale expected version is refused.
    let stale = reg.load("x", &v2_src, Some(v1.version + 100)).await;
    assert!(matches!(stale, Err(RequestError::Aborted(_))), "{stale:?}");
    let v2 = reg.load("x", &v2_src, Some(v1.version)).await.unwrap();
    assert!(v2.version > v1.version);
    let new = reg.acquire("x").await.unwrap();
    assert_eq!(old.version().version, v1.version);
    assert_eq!(new.version().version, v2.version);
    assert_eq!(old.weights().rank_max, 4);
    assert_eq!(new.weights().rank_max, 8);
    drop((v1, v2));
    let s = reg.stats();
    assert_eq!((s.resident_bytes, s.draining_versions), (b1 + b2, 1));
    drop(old);
    let s = reg.stats();
    assert_eq!((s.resident_bytes, s.draining_versions), (b2, 0));
    // Idempotent: the same name and source again is the current version.
    assert_eq!(
        reg.load("x", &v2_src, None).await.unwrap().version,
        new.version().version
    );
    assert_eq!(reg.stats().loads, 2);
}

#[tokio::test]
async fn unload_refuses_new_requests_and_frees_after_the_last_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = adapter(dir.path(), "a", 4, 1);
    let reg = registry(1 << 30);
    reg.load("a", &src, None).await.unwrap();
    let lease = reg.acquire("a").await.unwrap();
    let gone = reg.unload("a").unwrap();
    assert!(matches!(
        reg.acquire("a").await,
        Err(RequestError::NotFound(_))
    ));
    assert!(reg.get("a").is_none());
    let soon = Instant::now() + Duration::from_millis(50);
    assert!(!reg.wait_freed(&gone.remaining, soon).await);
    assert_eq!(
        lease.weights().rank_max,
        4,
        "the lease still reads its weights"
    );
    drop(lease);
    assert!(reg.wait_freed(&gone.remaining, Instant::now()).await);
    assert_eq!(reg.stats().resident_bytes, 0);
    assert!(matches!(reg.unload("a"), Err(RequestError::NotFound(_))));
}

#[tokio::test]
async fn a_corrupt_adapter_is_invalid_and_registers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = adapter(dir.path(), "good", 4, 1);
    let (bad, _) = adapter(dir.path(), "bad", 4, 2);
    std::fs::write(
        Path::new(&bad).join("adapter_model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let reg = registry(1 << 30);
    let err = reg.load("new", &bad, None).await.unwrap_err();
    assert!(
        matches!(err, RequestError::InvalidArgument { .. }),
        "{err:?}"
    );
    assert!(reg.get("new").is_none(), "half-registered");
    // Replacing a good version with a corrupt one keeps the good one.
    let v1 = reg.load("kept", &good, None).await.unwrap();
    assert!(reg.load("kept", &bad, None).await.is_err());
    assert_eq!(reg.get("kept").unwrap().version, v1.version);
    assert!(matches!(
        reg.load("bad/name", &good, None).await,
        Err(RequestError::InvalidArgument { .. })
    ));
    // A lazily registered corrupt adapter answers its requests NOT_FOUND with the reason.
    reg.register("lazy", &bad).unwrap();
    let err = reg.acquire("lazy").await.unwrap_err();
    assert!(
        matches!(&err, RequestError::NotFound(m) if m.contains("failed to load")),
        "{err:?}"
    );
    assert_eq!(reg.stats().load_failures, 3);
}

#[tokio::test]
async fn host_budget_evicts_least_recently_used_unleased_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut srcs = Vec::new();
    let mut bytes = 0;
    for i in 0..4 {
        let (s, b) = adapter(dir.path(), &format!("a{i}"), 4, i);
        srcs.push(s);
        bytes = b;
    }
    // Room for two.
    let reg = registry(2 * bytes + bytes / 2);
    for (i, s) in srcs.iter().enumerate() {
        reg.register(&format!("a{i}"), s).unwrap();
    }
    let held = reg.acquire("a0").await.unwrap();
    drop(reg.acquire("a1").await.unwrap());
    drop(reg.acquire("a2").await.unwrap()); // evicts a1 (a0 is leased)
    assert_eq!(reg.get("a1").unwrap().state, AdapterState::Registered);
    assert_eq!(reg.get("a0").unwrap().state, AdapterState::Host);
    // Evicted weights keep their version number, so reloading them is no replacement.
    let a1_version = reg.get("a1").unwrap().version;
    assert_eq!(reg.stats().host_evictions, 1);
    assert!(reg.stats().resident_bytes <= 2 * bytes);
    // Everything held: an admin load is refused, a request waits for a lease to end.
    let held2 = reg.acquire("a2").await.unwrap();
    let err = reg.load("a3", &srcs[3], None).await.unwrap_err();
    assert!(matches!(err, RequestError::ResourceExhausted(_)), "{err:?}");
    let waiter = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.acquire("a1").await.map(|l| l.key()) })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    assert_eq!(reg.stats().waiting_for_load, 1);
    drop(held);
    assert!(waiter.await.unwrap().is_ok());
    assert_eq!(reg.get("a1").unwrap().version, a1_version);
    assert_ne!(a1_version, 0);
    assert_eq!(reg.get("a0").unwrap().state, AdapterState::Registered);
    drop(held2);
}

#[tokio::test]
async fn unload_while_loading_answers_the_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = adapter(dir.path(), "a", 4, 1);
    let reg = registry(1 << 30);
    reg.register("a", &src).unwrap();
    let waiter = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.acquire("a").await.map(|l| l.key()) })
    };
    tokio::task::yield_now().await;
    let _ = reg.unload("a");
    // Either the load won (a lease, then freed) or the unload did (NOT_FOUND); never a hang.
    let r = tokio::time::timeout(Duration::from_secs(10), waiter).await;
    assert!(r.is_ok(), "the waiter hung");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(reg.stats().resident_bytes, 0);
}

#[tokio::test]
async fn events_describe_the_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = adapter(dir.path(), "a", 4, 1);
    let reg = registry(1 << 30);
    let mut rx = reg.subscribe();
    reg.load("a", &src, None).await.unwrap();
    reg.unload("a").unwrap();
    let mut kinds = Vec::new();
    while let Ok(e) = rx.try_recv() {
        kinds.push(e.kind);
    }
    assert_eq!(
        kinds,
        vec![
            EventKind::Registered,
            EventKind::Loading,
            EventKind::Loaded,
            EventKind::Unloading,
            EventKind::Freed
        ]
    );
}
