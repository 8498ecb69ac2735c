//! End-to-end output tokens/s through gRPC on the real default model for 32 concurrent
//! streams: (a) all on the base model, (b) all on one adapter, (c) each on its own
//! adapter (synthetic, r16 on q, k, v, o), (d) each on its own adapter of the heavy mix
//! (a third each LoRA r8 on q, v; LoRA r16 on every linear layer; rsLoRA r32 on every
//! linear layer). Reports each case over (a) next to the ratio the rooflines predict
//! from the bytes and FLOPs the adapters add to a step, in f32 mode (adapters in f32)
//! and in quantized mode (the file's Q4_1 blocks, adapters in bf16), then each case's
//! quantized / f32 ratio, all in one run. The active pool holds every adapter at once
//! (`engine_config`). `cargo bench --bench adapter_throughput`; under
//! `cargo test` one short pass.
#[path = "support/roofline.rs"]
mod roofline;

#[path = "support/streams.rs"]
mod streams;

use multilora::engine::EngineConfig;
use multilora::lora::peft::{BaseShape, LoraSite, CONFIG_FILE};
use multilora::lora::registry::{AdapterRegistry, RegistryConfig};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::backend::cpu::CpuWeightFormat;
use multilora::model::{CpuBackend, ModelConfig};
use multilora::server::{start_engine, RunningServer, ServerOptions};
use streams::{full_run, load_default_model_on, run_streams};

fn main() {
    let quick = !full_run();
    let quantized = CpuWeightFormat::Quantized {
        dense_to: candle_core::quantized::GgmlDType::Q8_0,
    };
    let mut figures = Vec::new();
    for format in [CpuWeightFormat::F32, quantized] {
        match run_mode(quick, format) {
            Some(f) => figures.push((format.name(), f)),
            None => return,
        }
    }
    println!("quantized / f32, same run:");
    let (f32_mode, q_mode) = (&figures[0].1, &figures[1].1);
    let cases = [
        "(a) base only",
        "(b) one adapter",
        "(c) distinct adapters",
        "(d) heavy mix",
    ];
    for (i, case) in cases.iter().enumerate() {
        println!("{case:<22} {:>6.2}", q_mode[i] / f32_mode[i]);
    }
}

/// The four cases' tokens/s with the base model in `format`; None if it is missing.
fn run_mode(quick: bool, format: CpuWeightFormat) -> Option<[f64; 4]> {
    let loaded = load_default_model_on("adapter_throughput", CpuBackend::new(format))?;
    let streams = if quick { 2 } else { 32 };
    let max_new = if quick { 4 } else { 96 };
    let base = loaded.model.base_shape();
    let dir = tempfile::tempdir().unwrap();
    let qkvo = vec![LoraSite::Q, LoraSite::K, LoraSite::V, LoraSite::O];
    let mut specs = Vec::new();
    let mut adapter_bytes = 0;
    for i in 0..streams {
        let p = dir.path().join(format!("synth-{i}"));
        let spec = SynthSpec {
            kind: Default::default(),
            rank: 16,
            alpha: 32.0,
            sites: qkvo.clone(),
            seed: i as u64,
        };
        adapter_bytes = write_synthetic_adapter(&p, &base, &spec).unwrap();
        specs.push((format!("synth-{i}"), p.to_string_lossy().to_string()));
    }
    let mut heavy_bytes = Vec::new();
    for i in 0..streams {
        let p = dir.path().join(format!("heavy-{i}"));
        heavy_bytes.push(write_heavy_adapter(&p, &base, i));
        specs.push((format!("heavy-{i}"), p.to_string_lossy().to_string()));
    }
    let stored = loaded.model.adapter_dtype();
    let registry_cfg = RegistryConfig::for_model(loaded.model.as_ref());
    let registry = AdapterRegistry::with_adapters(registry_cfg, &specs).unwrap();
    let cfg = loaded.model.config().clone();
    let service = start_engine(
        loaded.model,
        loaded.tokenizer,
        registry,
        engine_config(),
        &loaded.source_dtype,
    )
    .unwrap();
    let bandwidth = roofline::read_bandwidth(if quick { 1 } else { 5 });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tps = rt.block_on(async move {
        let server = RunningServer::start(service, ServerOptions::default())
            .await
            .unwrap();
        let ep = server.endpoint();
        let names = |prefix: &str| -> Vec<String> {
            (0..streams).map(|i| format!("{prefix}-{i}")).collect()
        };
        let base_only: Vec<String> = vec![String::new(); streams];
        let one: Vec<String> = vec!["synth-0".into(); streams];
        // Warm: one unmeasured round of the first case, so that its K/V blocks (fresh
        // memory, faulted in on first write) are not charged to the first case.
        let _ = run_streams(&ep, &base_only, max_new).await;
        let mut tps = [0.0; 4];
        for (t, adapters) in tps
            .iter_mut()
            .zip([base_only, one, names("synth"), names("heavy")])
        {
            *t = run_streams(&ep, &adapters, max_new)
                .await
                .tokens_per_second();
        }
        server.stop().await.unwrap();
        tps
    });
    let run = Run {
        mode: format.name(),
        streams,
        max_new,
        adapter_bytes,
        heavy_bytes,
        stored_size: stored.size(),
        bandwidth,
    };
    report(&run, &cfg, tps);
    Some(tps)
}

/// A pool that keeps every adapter of every case active at once (the heavy mix is 626 MB
/// in f32): the cases measure the kernels, not evictions. The default 256 MB of
/// `--adapter-memory` holds about 80% of the heavy mix in bf16 and 40% in f32, so there
/// requests also wait for an adapter to become active.
fn engine_config() -> EngineConfig {
    EngineConfig {
        kv_cache_memory: 2 << 30,
        adapter_memory: 1 << 30,
        ..EngineConfig::default()
    }
}

/// Heavy-mix adapter `i`, by `i mod 3`: LoRA r8 on q and v, LoRA r16 on every linear
/// layer, or rsLoRA r32 on every linear layer (scale alpha / sqrt(r)). Returns its f32
/// bytes.
fn write_heavy_adapter(dir: &std::path::Path, base: &BaseShape, i: usize) -> usize {
    let (rank, sites, rslora) = match i % 3 {
        0 => (8, vec![LoraSite::Q, LoraSite::V], false),
        1 => (16, LoraSite::ALL.to_vec(), false),
        _ => (32, LoraSite::ALL.to_vec(), true),
    };
    let spec = SynthSpec {
        kind: Default::default(),
        rank,
        alpha: 2.0 * rank as f32,
        sites,
        seed: 1000 + i as u64,
    };
    let bytes = write_synthetic_adapter(dir, base, &spec).unwrap();
    if rslora {
        // `SynthSpec` writes plain LoRA; rsLoRA only changes the config's scaling.
        let path = dir.join(CONFIG_FILE);
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["use_rslora"] = true.into();
        std::fs::write(&path, config.to_string()).unwrap();
    }
    bytes
}

/// What one mode's run was, for its report.
struct Run {
    mode: String,
    streams: usize,
    max_new: u32,
    /// f32 bytes of one r16 q,k,v,o adapter.
    adapter_bytes: usize,
    /// f32 bytes of each heavy-mix adapter.
    heavy_bytes: Vec<usize>,
    /// Bytes of one stored adapter value in this mode (4: f32, 2: bf16).
    stored_size: usize,
    bandwidth: f64,
}

/// Prints the four cases next to the roofline prediction from the measured base step:
/// the adapters add FLOPs (2 * params per token, against the base's 2 * params per
/// token) and bytes (each distinct adapter's A and B, as stored, read once per step at
/// the measured bandwidth).
fn report(run: &Run, cfg: &ModelConfig, [a, b, c, d]: [f64; 4]) {
    let linear_params = {
        let h = cfg.hidden_size;
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        (cfg.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size)
            + cfg.vocab_size * h) as f64
    };
    let step = run.streams as f64 / a;
    // Extra time per step: `values` adapter parameters per token on average (FLOPs, as
    // a share of the base's), and `f32_bytes` of distinct adapters read as stored.
    let predict = |values: f64, f32_bytes: usize| {
        let stored = (f32_bytes * run.stored_size / 4) as f64;
        let extra = step * values / linear_params + stored / run.bandwidth;
        step / (step + extra)
    };
    let one = run.adapter_bytes;
    let heavy_total: usize = run.heavy_bytes.iter().sum();
    let heavy_mean = heavy_total as f64 / run.heavy_bytes.len() as f64 / 4.0;
    println!(
        "{}: {} streams x {} tokens, adapters r16 on q,k,v,o ({:.1} MB each as stored); \
         heavy mix {:.1} MB in all",
        run.mode,
        run.streams,
        run.max_new,
        (one * run.stored_size / 4) as f64 / 1e6,
        (heavy_total * run.stored_size / 4) as f64 / 1e6
    );
    println!("case                   tokens/s  ratio_to_base  roofline_prediction");
    let row = |name: &str, tps: f64, predicted: f64| {
        println!(
            "{name:<22} {tps:>8.1}  {:>13.2}  {predicted:>19.2}",
            tps / a
        );
    };
    row("(a) base only", a, 1.0);
    row("(b) one adapter", b, predict(one as f64 / 4.0, one));
    row(
        "(c) distinct adapters",
        c,
        predict(one as f64 / 4.0, run.streams * one),
    );
    row("(d) heavy mix", d, predict(heavy_mean, heavy_total));
}
