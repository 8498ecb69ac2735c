//! Shared pieces of the integration tests: one server builder ([`TestServer`]) that every
//! end-to-end test starts its in-process server with (tiny or small random models, or
//! the real default model; engine sizing; adapters loaded or registered; on 127.0.0.1),
//! the fixtures' paths, and stream collection.
#![allow(dead_code)]

pub mod http;
pub mod oracle;
pub mod peft_folders;
pub mod python;
pub mod swap;

use multilora::engine::EngineConfig;
use multilora::lora::peft::BaseShape;
use multilora::lora::registry::{AdapterRegistry, RegistryConfig, SourcePolicy};
use multilora::model::{weights, BaseModel, CpuBackend, ModelConfig, TextTokenizer};
use multilora::proto::v1 as pb;
use multilora::server::generation::GenerationService;
use multilora::server::{start_engine, RunningServer, ServerOptions};
use multilora::testing::{random_model_on, tiny_config};
use pb::adapters_client::AdaptersClient;
use pb::generation_client::GenerationClient;
use std::path::PathBuf;
use tonic::transport::Channel;

pub const REAL_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The byte-level test tokenizer's vocabulary (3 special tokens and 256 bytes).
pub const TINY_VOCAB: usize = 259;

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A PEFT-trained fixture adapter folder (`tests/fixtures/adapters/NAME`).
pub fn fixture_adapter(name: &str) -> PathBuf {
    repo_path("tests/fixtures/adapters").join(name)
}

/// Which base model a test server runs.
#[derive(Clone, Debug)]
enum Base {
    /// Seeded random weights of this shape on a CPU backend (f32 unless changed by
    /// [`TestServer::cpu_backend`]), with the byte-level test tokenizer.
    Random {
        cfg: Box<ModelConfig>,
        seed: u64,
        backend: CpuBackend,
    },
    /// The real default model (`make model` fetches it).
    Real,
}

/// The settings of a test server; build with [`TestServer::tiny`] and friends, adjust,
/// then [`TestServer::service`] or [`TestServer::start`].
#[derive(Clone, Debug)]
pub struct TestServer {
    base: Base,
    engine: EngineConfig,
    host_memory: Option<usize>,
    /// Adapters loaded before serving (`--adapter`).
    loaded: Vec<(String, String)>,
    /// Adapters registered, loaded on first use (`--adapter-dir`).
    registered: Vec<(String, String)>,
    options: ServerOptions,
    sources: SourcePolicy,
    /// The adapter journal's folder (`--state-dir`).
    state_dir: Option<PathBuf>,
}

/// A started test server with a generation client.
pub struct Started {
    pub server: RunningServer,
    pub gen: GenerationClient<Channel>,
}

impl Started {
    /// Serves `service` (built by [`TestServer::service`], for a test that looks at or
    /// prepares its registry first) on 127.0.0.1 (an ephemeral port) with `options`,
    /// and connects a generation client.
    pub async fn serve(service: GenerationService, options: ServerOptions) -> Started {
        let server = RunningServer::start(service, options).await.unwrap();
        let gen = GenerationClient::connect(server.endpoint()).await.unwrap();
        Started { server, gen }
    }

    pub async fn adapters(&self) -> AdaptersClient<Channel> {
        AdaptersClient::connect(self.server.endpoint())
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.server.stop().await.unwrap();
    }
}

impl TestServer {
    fn with_base(base: Base) -> Self {
        Self {
            base,
            engine: EngineConfig::default(),
            host_memory: None,
            loaded: Vec::new(),
            registered: Vec::new(),
            options: ServerOptions::default(),
            sources: SourcePolicy::unconfined(),
            state_dir: None,
        }
    }

    /// The tiny random model (seed 11) with the byte-level tokenizer.
    pub fn tiny() -> Self {
        Self::random(tiny_config(TINY_VOCAB), 11)
    }

    /// A random model of shape `cfg` (vocabulary [`TINY_VOCAB`]) from `seed`.
    pub fn random(cfg: ModelConfig, seed: u64) -> Self {
        Self::with_base(Base::Random {
            cfg: Box::new(cfg),
            seed,
            backend: CpuBackend::default(),
        })
    }

    /// A random model kept in `backend`'s weight format (e.g. quantized blocks).
    pub fn cpu_backend(mut self, cpu: CpuBackend) -> Self {
        if let Base::Random { backend, .. } = &mut self.base {
            *backend = cpu;
        }
        self
    }

    /// The real default model.
    pub fn real() -> Self {
        Self::with_base(Base::Real)
    }

    pub fn engine(mut self, engine: EngineConfig) -> Self {
        self.engine = engine;
        self
    }

    /// The adapter host-memory budget (`--adapter-host-memory`).
    pub fn host_memory(mut self, bytes: usize) -> Self {
        self.host_memory = Some(bytes);
        self
    }

    /// An adapter loaded before serving; one that fails answers NOT_FOUND.
    pub fn adapter(mut self, name: &str, source: impl Into<PathBuf>) -> Self {
        let source = source.into().to_string_lossy().into_owned();
        self.loaded.push((name.into(), source));
        self
    }

    /// An adapter registered now and loaded on first use.
    pub fn register(mut self, name: &str, source: impl Into<PathBuf>) -> Self {
        let source = source.into().to_string_lossy().into_owned();
        self.registered.push((name.into(), source));
        self
    }

    pub fn options(mut self, options: ServerOptions) -> Self {
        self.options = options;
        self
    }

    /// What runtime loads may read (`serve`: confined to the adapter roots).
    pub fn sources(mut self, sources: SourcePolicy) -> Self {
        self.sources = sources;
        self
    }

    /// Journals runtime adapter changes in `dir` and replays what it holds after the
    /// start-up adapters are registered (`--state-dir`).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The model's shape (without loading it, for random models).
    pub fn config(&self) -> ModelConfig {
        match &self.base {
            Base::Random { cfg, .. } => (**cfg).clone(),
            Base::Real => {
                let source = weights::resolve(real_model_path().to_str().unwrap(), None).unwrap();
                weights::read_config(&source).unwrap()
            }
        }
    }

    /// The shape adapters for this server must fit.
    pub fn base_shape(&self) -> BaseShape {
        self.config().base_shape()
    }

    /// The service, with its engine running (not yet serving gRPC).
    pub fn service(self) -> GenerationService {
        self.service_with(|model| model)
    }

    /// [`Self::service`] with the model wrapped by `wrap` (a test double around the real
    /// model, e.g. one that delays adapter copies).
    pub fn service_with(
        self,
        wrap: impl FnOnce(Box<dyn BaseModel>) -> Box<dyn BaseModel>,
    ) -> GenerationService {
        let (model, tokenizer, dtype) = match &self.base {
            Base::Random { cfg, seed, backend } => (
                random_model_on(*backend, cfg, *seed).unwrap(),
                TextTokenizer::byte_level_for_tests().unwrap(),
                "random".to_string(),
            ),
            Base::Real => {
                let loaded =
                    weights::load_model(real_model_path().to_str().unwrap(), None).unwrap();
                (loaded.model, loaded.tokenizer, loaded.source_dtype)
            }
        };
        let model = wrap(model);
        let mut cfg = RegistryConfig::for_model(model.as_ref());
        if let Some(bytes) = self.host_memory {
            cfg.host_memory = bytes;
        }
        cfg.sources = self.sources.clone();
        // As `serve`: register every start-up adapter, replay the journal, then load.
        let registry = AdapterRegistry::new(cfg);
        for (name, source) in self.loaded.iter().chain(&self.registered) {
            registry.register(name, source).unwrap();
        }
        if let Some(dir) = &self.state_dir {
            registry.open_journal(dir).unwrap();
        }
        for (name, _) in &self.loaded {
            // A failure is kept with the name and answered NOT_FOUND.
            let _ = registry.load_now(name);
        }
        start_engine(model, tokenizer, registry, self.engine, &dtype).unwrap()
    }

    /// Serves on 127.0.0.1 (an ephemeral port) and connects a generation client.
    pub async fn start(self) -> Started {
        let options = self.options.clone();
        Started::serve(self.service(), options).await
    }
}

/// The real default model's file (asserting `make model` has fetched it).
pub fn real_model_path() -> PathBuf {
    let path = repo_path(REAL_MODEL);
    assert!(
        path.is_file(),
        "{} is missing: run `make model`",
        path.display()
    );
    path
}

pub fn greedy(prompt_ids: Vec<u32>, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt_token_ids: prompt_ids,
        max_new_tokens: Some(max_new_tokens),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The engine's adapter counters and gauges (`GetEngineStats.adapters`).
pub async fn adapter_stats(gen: &mut GenerationClient<Channel>) -> pb::AdapterStats {
    let stats = gen
        .get_engine_stats(pb::GetEngineStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    stats.adapters.unwrap()
}

/// What one streamed generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<pb::TokenLogprob>,
    pub finish: pb::FinishReason,
    pub usage: pb::Usage,
}

pub async fn generate(
    client: &mut GenerationClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Collected, tonic::Status> {
    generate_request(client, tonic::Request::new(req)).await
}

/// [`generate`] of a request with metadata or a timeout.
pub async fn generate_request(
    client: &mut GenerationClient<Channel>,
    req: tonic::Request<pb::GenerateRequest>,
) -> Result<Collected, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Collected {
        text: String::new(),
        token_ids: vec![],
        logprobs: vec![],
        finish: pb::FinishReason::Unspecified,
        usage: pb::Usage::default(),
    };
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Delta(d)) => {
                out.text.push_str(&d.text);
                out.token_ids.extend(d.token_ids);
                out.logprobs.extend(d.logprobs);
            }
            Some(pb::generate_response::Event::Final(f)) => {
                out.finish = f.finish_reason();
                out.usage = f.usage.unwrap_or_default();
                return Ok(out);
            }
            None => panic!("empty response message"),
        }
    }
    panic!("stream ended without a final message");
}

/// Runs every request of `jobs` at once and checks that each stream's token ids equal
/// `alone[i]` (its solo run); `label(i)` names stream i in a failure.
pub async fn assert_concurrent_equal_alone(
    client: &GenerationClient<Channel>,
    jobs: Vec<pb::GenerateRequest>,
    alone: &[Collected],
    label: impl Fn(usize) -> String,
) {
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|r| {
            let mut c = client.clone();
            tokio::spawn(async move { generate(&mut c, r).await.unwrap() })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let together = h.await.unwrap();
        assert_eq!(
            together.token_ids,
            alone[i].token_ids,
            "stream {i} ({})",
            label(i)
        );
    }
}

/// A `LoadAdapter` request of `source` under `name` (no revision, no compare-and-set).
pub fn load_request(name: &str, source: &str) -> pb::LoadAdapterRequest {
    pb::LoadAdapterRequest {
        name: name.into(),
        source: source.into(),
        revision: None,
        expected_version: None,
    }
}

/// A synthetic rank-4 LoRA on q and v for the tiny model, written to `root/name`.
pub fn synth_lora_dir(root: &std::path::Path, name: &str, seed: u64) -> PathBuf {
    use multilora::lora::peft::{AdapterKind, LoraSite};
    use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
    let dir = root.join(name);
    let spec = SynthSpec {
        kind: AdapterKind::Lora,
        rank: 4,
        alpha: 8.0,
        sites: vec![LoraSite::Q, LoraSite::V],
        seed,
    };
    write_synthetic_adapter(&dir, &TestServer::tiny().base_shape(), &spec).unwrap();
    dir
}

/// Server options with the HTTP front on an ephemeral 127.0.0.1 port.
pub fn with_http() -> ServerOptions {
    ServerOptions {
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    }
}

/// The adapters of a per-adapter count map from `GetEngineStats` (`running_by_adapter`,
/// `waiting_by_adapter`) whose count is not zero, sorted by name.
pub fn adapters_with_work(counts: std::collections::HashMap<String, u32>) -> Vec<String> {
    let mut names: Vec<String> = counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names
}
