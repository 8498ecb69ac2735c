//! Adapter lifecycle at scale on the real default model, in one run:
//! 1. cold load: a rank-16 all-linear adapter from a local folder until a request can
//!    lease it (parse, read, validate, install), p50/p99 over 100 loads after one untimed
//!    load (page cache warm);
//! 2. throughput of a closed loop of 32 streams whose adapters follow a power law
//!    (Zipf, s = 1.0) over 1,000 lazily registered adapters, against the same over 8:
//!    cold loads, host/active evictions and all happen inside the timed run.
//!
//! `cargo bench --bench adapter_scale`. Under `cargo test` it runs one short pass.
#[path = "support/streams.rs"]
mod streams;

use multilora::bench::workload::Popularity;
use multilora::engine::EngineConfig;
use multilora::lora::peft::LoraSite;
use multilora::lora::registry::{AdapterRegistry, RegistryConfig};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::proto::v1::generation_client::GenerationClient;
use multilora::rng::Xoshiro256;
use multilora::server::{start_engine, RunningServer, ServerOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use streams::{full_run, load_default_model, request};

/// Distinct adapter folders behind the registered names (name i reads folder i % 64);
/// every name still loads its own copy.
const FOLDERS: usize = 64;

/// `count` adapter indices in 0..n drawn from Zipf(s) (the harness's sampler), seeded.
fn zipf(n: usize, s: f64, count: usize, seed: u64) -> Vec<usize> {
    let mut rng = Xoshiro256::from_seed(seed);
    let mut picker = Popularity::Zipf { s }.sampler(n);
    (0..count).map(|_| picker.pick(&mut rng)).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `names` through `concurrency` streams, each taking the next request when its
/// previous one ends. Returns (output tokens, seconds).
async fn closed_loop(
    endpoint: &str,
    names: Vec<String>,
    concurrency: usize,
    max_new: u32,
) -> (usize, f64) {
    let client = GenerationClient::connect(endpoint.to_string())
        .await
        .unwrap();
    let names = Arc::new(names);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut c, names, next) = (client.clone(), names.clone(), next.clone());
            tokio::spawn(async move {
                let mut tokens = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = names.get(i) else {
                        return tokens;
                    };
                    let r = c.generate_unary(request(i, name, max_new)).await.unwrap();
                    tokens += r.into_inner().token_ids.len();
                }
            })
        })
        .collect();
    let mut tokens = 0;
    for w in workers {
        tokens += w.await.unwrap();
    }
    (tokens, start.elapsed().as_secs_f64())
}

fn main() {
    let quick = !full_run();
    let Some(loaded) = load_default_model("adapter_scale") else {
        return;
    };
    let base = loaded.model.base_shape();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1. Cold load time.
    let r16 = dir.path().join("r16-all");
    let spec = SynthSpec {
        kind: Default::default(),
        rank: 16,
        alpha: 32.0,
        sites: LoraSite::ALL.to_vec(),
        seed: 1,
    };
    let bytes = write_synthetic_adapter(&r16, &base, &spec).unwrap();
    let loads = if quick { 5 } else { 100 };
    let registry = AdapterRegistry::new(RegistryConfig::new(base));
    let src = r16.to_string_lossy().to_string();
    let mut times = rt.block_on(async {
        // One load first, not timed: it starts the blocking-thread pool.
        registry.load("warm-up", &src, None).await.unwrap();
        registry.unload("warm-up").unwrap();
        let mut times = Vec::new();
        for i in 0..loads {
            let name = format!("load-{i}");
            let t0 = Instant::now();
            registry.load(&name, &src, None).await.unwrap();
            times.push(t0.elapsed());
            registry.unload(&name).unwrap();
        }
        times
    });
    times.sort();
    println!(
        "cold load, rank 16 all-linear ({:.1} MB f32), {loads} loads: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        bytes as f64 / 1e6,
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
    );

    // 2. 1,000 registered adapters under a power law vs 8.
    let (many, requests, streams, max_new) = if quick {
        (16, 8, 4, 4)
    } else {
        (1000, 384, 32, 32)
    };
    for f in 0..FOLDERS.min(many) {
        let spec = SynthSpec {
            kind: Default::default(),
            rank: [8, 16][f % 2],
            alpha: 16.0,
            sites: vec![LoraSite::Q, LoraSite::V],
            seed: 100 + f as u64,
        };
        write_synthetic_adapter(&dir.path().join(format!("f{f}")), &base, &spec).unwrap();
    }
    let registry = AdapterRegistry::new(RegistryConfig::for_model(loaded.model.as_ref()));
    for (prefix, n) in [("few", 8), ("many", many)] {
        for i in 0..n {
            let folder = dir.path().join(format!("f{}", i % FOLDERS.min(many)));
            registry
                .register(&format!("{prefix}-{i}"), folder.to_str().unwrap())
                .unwrap();
        }
    }
    let service = start_engine(
        loaded.model,
        loaded.tokenizer,
        registry.clone(),
        EngineConfig::default(),
        &loaded.source_dtype,
    )
    .unwrap();
    rt.block_on(async move {
        let server = RunningServer::start(service, ServerOptions::default())
            .await
            .unwrap();
        let ep = server.endpoint();
        // Warm-up: the model's first-touch costs, not any adapter.
        closed_loop(&ep, vec![String::new(); streams], streams, max_new).await;
        println!("registered  requests  streams  distinct_adapters  loads  tokens/s  vs_8");
        let mut few_rate = None;
        for (prefix, n) in [("few", 8), ("many", many)] {
            let picks = zipf(n, 1.0, requests, 7);
            let mut distinct = picks.clone();
            distinct.sort_unstable();
            distinct.dedup();
            let names: Vec<String> = picks.iter().map(|i| format!("{prefix}-{i}")).collect();
            let loads_before = registry.stats().loads;
            let (tokens, secs) = closed_loop(&ep, names, streams, max_new).await;
            let rate = tokens as f64 / secs;
            let ratio = rate / *few_rate.get_or_insert(rate);
            println!(
                "{n:>10}  {requests:>8}  {streams:>7}  {:>17}  {:>5}  {rate:>8.1}  {ratio:>4.2}",
                distinct.len(),
                registry.stats().loads - loads_before,
            );
        }
        let s = registry.stats();
        println!(
            "host: {} resident, {:.1} MB, {} evictions; load time total {:.2} s, max {:.1} ms",
            s.host_resident,
            s.host_bytes as f64 / 1e6,
            s.host_evictions,
            s.load_time_total.as_secs_f64(),
            s.load_time_max.as_secs_f64() * 1e3
        );
        server.stop().await.unwrap();
    });
}
