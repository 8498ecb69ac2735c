//! Pieces the adapter hot-swap and loading tests share: a small random Llama server
//! (big enough that 32 streams take a while on the CPU), synthetic LoRA folders, the
//! two gRPC clients, seeded requests whose tokens show which weights made them, and
//! streams that report their tokens, finish reason and adapter version.
use super::{adapter_stats, greedy, TestServer, TINY_VOCAB};
use multilora::engine::EngineConfig;
use multilora::lora::peft::{BaseShape, LoraSite};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::ModelConfig;
use multilora::proto::v1 as pb;
use multilora::testing::tiny_config;
use pb::adapters_client::AdaptersClient;
use pb::generation_client::GenerationClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A random Llama big enough that a 32-stream generation takes a while on the CPU.
pub fn small_config(vocab: usize) -> ModelConfig {
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
pub fn setup(cfg: ModelConfig, engine: EngineConfig, host_memory: usize) -> TestServer {
    TestServer::random(cfg, 5)
        .engine(engine)
        .host_memory(host_memory)
}

pub fn small(engine: EngineConfig) -> TestServer {
    setup(small_config(TINY_VOCAB), engine, 1 << 30)
}

pub fn synth(
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

pub async fn clients(
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

pub fn load_req(name: &str, source: &str, expected: Option<u64>) -> pb::LoadAdapterRequest {
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
pub fn request(adapter: &str, prompt: u32, max_new: u32) -> pb::GenerateRequest {
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
pub struct Run {
    pub tokens: Vec<u32>,
    pub finish: pb::FinishReason,
    pub version: u64,
}

pub async fn run_stream(
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
pub async fn wait_all_freed(gen: &mut GenerationClient<Channel>) -> pb::AdapterStats {
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
pub async fn start_streams(
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

/// Polls (bounded) until `name` is in `state`.
pub async fn wait_for_state(
    adm: &mut AdaptersClient<Channel>,
    name: &str,
    state: pb::AdapterState,
) {
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
