//! End-to-end output tokens/s through gRPC on the real default model for 32 concurrent
//! streams: (a) all on the base model, (b) all on one adapter, (c) each on its own
//! adapter (synthetic, r16 on q, k, v, o). Reports (b)/(a) and (c)/(a) next to the
//! ratio the rooflines predict from the bytes and FLOPs the adapters add to a step, in
//! f32 mode and in quantized mode (the file's Q4_1 blocks), then each case's quantized /
//! f32 ratio, all in one run. `cargo bench --bench adapter_throughput`; under
//! `cargo test` one short pass.
#[path = "support/roofline.rs"]
mod roofline;

#[path = "support/streams.rs"]
mod streams;

use multilora::engine::EngineConfig;
use multilora::lora::peft::LoraSite;
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
    for (i, case) in ["(a) base only", "(b) one adapter", "(c) distinct adapters"]
        .iter()
        .enumerate()
    {
        println!("{case:<22} {:>6.2}", q_mode[i] / f32_mode[i]);
    }
}

/// The three cases' tokens/s with the base model in `format`; None if it is missing.
fn run_mode(quick: bool, format: CpuWeightFormat) -> Option<[f64; 3]> {
    let loaded = load_default_model_on("adapter_throughput", CpuBackend::new(format))?;
    let streams = if quick { 2 } else { 32 };
    let max_new = if quick { 4 } else { 96 };
    let base = loaded.model.base_shape();
    let dir = tempfile::tempdir().unwrap();
    let spec = |seed| SynthSpec {
        rank: 16,
        alpha: 32.0,
        sites: vec![LoraSite::Q, LoraSite::K, LoraSite::V, LoraSite::O],
        seed,
    };
    let mut specs = Vec::new();
    let mut adapter_bytes = 0;
    for i in 0..streams {
        let p = dir.path().join(format!("synth-{i}"));
        adapter_bytes = write_synthetic_adapter(&p, &base, &spec(i as u64)).unwrap();
        specs.push((format!("synth-{i}"), p.to_string_lossy().to_string()));
    }
    let registry_cfg = RegistryConfig::for_model(loaded.model.as_ref());
    let registry = AdapterRegistry::with_adapters(registry_cfg, &specs).unwrap();
    let cfg = loaded.model.config().clone();
    let service = start_engine(
        loaded.model,
        loaded.tokenizer,
        registry,
        EngineConfig::default(),
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
        let base_only: Vec<String> = vec![String::new(); streams];
        let one: Vec<String> = vec!["synth-0".into(); streams];
        let distinct: Vec<String> = (0..streams).map(|i| format!("synth-{i}")).collect();
        let _ = run_streams(&ep, &base_only[..1], 2).await; // warm
        let a = run_streams(&ep, &base_only, max_new)
            .await
            .tokens_per_second();
        let b = run_streams(&ep, &one, max_new).await.tokens_per_second();
        let c = run_streams(&ep, &distinct, max_new)
            .await
            .tokens_per_second();
        server.stop().await.unwrap();
        [a, b, c]
    });
    let run = Run {
        mode: format.name(),
        streams,
        max_new,
        adapter_bytes,
        bandwidth,
    };
    report(&run, &cfg, tps);
    Some(tps)
}

/// What one mode's run was, for its report.
struct Run {
    mode: String,
    streams: usize,
    max_new: u32,
    adapter_bytes: usize,
    bandwidth: f64,
}

/// Prints the three cases next to the roofline prediction from the measured base step:
/// the adapters add FLOPs (2 * params per token, against the base's 2 * params per
/// token) and bytes (each distinct adapter's A and B read once per step, at the measured
/// bandwidth).
fn report(run: &Run, cfg: &ModelConfig, [a, b, c]: [f64; 3]) {
    let linear_params = {
        let h = cfg.hidden_size;
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        (cfg.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size)
            + cfg.vocab_size * h) as f64
    };
    let step = run.streams as f64 / a;
    let flops_share = (run.adapter_bytes as f64 / 4.0) / linear_params;
    let predict = |distinct: usize| {
        let extra = step * flops_share + (distinct * run.adapter_bytes) as f64 / run.bandwidth;
        step / (step + extra)
    };
    println!(
        "{}: {} streams x {} tokens, adapters r16 on q,k,v,o ({:.1} MB each)",
        run.mode,
        run.streams,
        run.max_new,
        run.adapter_bytes as f64 / 1e6
    );
    println!("case                   tokens/s  ratio_to_base  roofline_prediction");
    println!(
        "(a) base only          {a:>8.1}  {:>13.2}  {:>19.2}",
        1.0, 1.0
    );
    println!(
        "(b) one adapter        {b:>8.1}  {:>13.2}  {:>19.2}",
        b / a,
        predict(1)
    );
    println!(
        "(c) distinct adapters  {c:>8.1}  {:>13.2}  {:>19.2}",
        c / a,
        predict(run.streams)
    );
}
