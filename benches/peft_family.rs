//! End-to-end output tokens/s through gRPC on the real default model for 32 concurrent
//! streams, each on its own adapter: (a) drawn from every served type at once, in turn
//! LoRA, DoRA, (IA)³, prompt tuning, prefix tuning, a 0.5/0.5 mixture of two LoRA
//! adapters, VeRA (shared projections) and AdaLoRA (all rank 16 on q, k, v, o where a
//! type has a rank; (IA)³ on k, v, down; 8 virtual tokens), against (b) all LoRA rank 16
//! on q, k, v, o, and (c) the base model alone. P-tuning is served exactly as prompt
//! tuning. Reports (a) / (b) (the target is at least 0.9) and each over (c), in
//! f32 mode and in quantized mode, all in one run (the median of three rounds of the
//! three cases in turn). `cargo bench --bench peft_family`; under `cargo test` one
//! short pass.
#[path = "support/streams.rs"]
mod streams;

use multilora::engine::EngineConfig;
use multilora::lora::peft::{AdapterKind, LoraSite};
use multilora::lora::registry::{AdapterRegistry, RegistryConfig};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::backend::cpu::CpuWeightFormat;
use multilora::model::CpuBackend;
use multilora::proto::v1 as pb;
use multilora::server::{start_engine, RunningServer, ServerOptions};
use streams::{full_run, load_default_model_on, request, run_requests};

/// The types of case (a), in turn; `None` is the mixture of two LoRA adapters.
const FAMILY: [Option<AdapterKind>; 8] = [
    Some(AdapterKind::Lora),
    Some(AdapterKind::Dora),
    Some(AdapterKind::Ia3),
    Some(AdapterKind::PromptTuning),
    Some(AdapterKind::PrefixTuning),
    None,
    Some(AdapterKind::Vera),
    Some(AdapterKind::AdaLora),
];

fn main() {
    let quick = !full_run();
    let quantized = CpuWeightFormat::Quantized {
        dense_to: candle_core::quantized::GgmlDType::Q8_0,
    };
    for format in [CpuWeightFormat::F32, quantized] {
        if run_mode(quick, format).is_none() {
            return;
        }
    }
}

/// Writes `family-{i}` (one per stream, of `FAMILY[i % 8]`, the mixture's second member
/// as `family-{i}-b`) and `lora-{i}`; returns their (name, source) pairs.
fn write_adapters(
    dir: &std::path::Path,
    base: &multilora::lora::peft::BaseShape,
    streams: usize,
) -> Vec<(String, String)> {
    let qkvo = vec![LoraSite::Q, LoraSite::K, LoraSite::V, LoraSite::O];
    let mut specs = Vec::new();
    let mut write = |name: String, kind: AdapterKind, seed: u64| {
        let (rank, sites) = match kind {
            AdapterKind::Ia3 => (16, vec![LoraSite::K, LoraSite::V, LoraSite::Down]),
            AdapterKind::PromptTuning | AdapterKind::PrefixTuning => (8, vec![]),
            _ => (16, qkvo.clone()),
        };
        let spec = SynthSpec {
            kind,
            rank,
            alpha: 32.0,
            sites,
            seed,
        };
        let p = dir.join(&name);
        write_synthetic_adapter(&p, base, &spec).unwrap();
        specs.push((name, p.to_string_lossy().to_string()));
    };
    for i in 0..streams {
        let seed = i as u64;
        match FAMILY[i % FAMILY.len()] {
            Some(kind) => write(format!("family-{i}"), kind, seed),
            None => {
                write(format!("family-{i}"), AdapterKind::Lora, seed);
                write(format!("family-{i}-b"), AdapterKind::Lora, 1000 + seed);
            }
        }
        write(format!("lora-{i}"), AdapterKind::Lora, 2000 + seed);
    }
    specs
}

/// Case (a)'s request for stream `i`.
fn family_request(i: usize, max_new: u32) -> pb::GenerateRequest {
    let mut r = request(i, "", max_new);
    match FAMILY[i % FAMILY.len()] {
        Some(_) => r.adapter = format!("family-{i}"),
        None => {
            r.adapters = [format!("family-{i}"), format!("family-{i}-b")]
                .map(|name| pb::AdapterWeight { name, weight: 0.5 })
                .to_vec()
        }
    }
    r
}

/// Runs the three cases with the base model in `format`; None if it is missing.
fn run_mode(quick: bool, format: CpuWeightFormat) -> Option<()> {
    let loaded = load_default_model_on("peft_family", CpuBackend::new(format))?;
    let streams = if quick { FAMILY.len() } else { 32 };
    let max_new = if quick { 4 } else { 96 };
    let dir = tempfile::tempdir().unwrap();
    let specs = write_adapters(dir.path(), &loaded.model.base_shape(), streams);
    let registry_cfg = RegistryConfig::for_model(loaded.model.as_ref());
    let registry = AdapterRegistry::with_adapters(registry_cfg, &specs).unwrap();
    let engine = EngineConfig {
        kv_cache_memory: 2 << 30,
        adapter_memory: 1 << 30,
        ..EngineConfig::default()
    };
    let service = start_engine(
        loaded.model,
        loaded.tokenizer,
        registry,
        engine,
        &loaded.source_dtype,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let [family, lora, base] = rt.block_on(async move {
        let server = RunningServer::start(service, ServerOptions::default())
            .await
            .unwrap();
        let ep = server.endpoint();
        let cases: [Box<dyn Fn(usize) -> pb::GenerateRequest>; 3] = [
            Box::new(move |i| family_request(i, max_new)),
            Box::new(move |i| request(i, &format!("lora-{i}"), max_new)),
            Box::new(move |i| request(i, "", max_new)),
        ];
        // Warm: one unmeasured round of each case (adapters made active, K/V faulted in).
        for case in &cases {
            let _ = run_requests(&ep, (0..streams).map(case).collect()).await;
        }
        // Rounds of (a), (b), (c) in turn; each case's median round (drift hits all three).
        let rounds = if quick { 1 } else { 3 };
        let mut runs = [vec![], vec![], vec![]];
        for _ in 0..rounds {
            for (r, case) in runs.iter_mut().zip(&cases) {
                let run = run_requests(&ep, (0..streams).map(case).collect()).await;
                r.push(run.tokens_per_second());
            }
        }
        server.stop().await.unwrap();
        runs.map(|mut r| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        })
    });
    println!(
        "peft_family [{}], {streams} streams x {max_new} tokens:",
        format.name()
    );
    println!(
        "  (a) every type         {family:8.1} tokens/s  {:5.2} of base",
        family / base
    );
    println!(
        "  (b) all LoRA r16 qkvo  {lora:8.1} tokens/s  {:5.2} of base",
        lora / base
    );
    println!("  (c) base only          {base:8.1} tokens/s");
    println!(
        "  (a) / (b)              {:8.2}   (target >= 0.9)",
        family / lora
    );
    Some(())
}
