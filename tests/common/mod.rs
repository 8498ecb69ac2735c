//! Shared helpers for integration tests: services over the tiny random model or the
//! real default model, in-process servers on 127.0.0.1, and stream collection.
#![allow(dead_code)]

use multilora::engine::EngineConfig;
use multilora::lora::registry::{AdapterRegistry, RegistryConfig};
use multilora::model::{weights, Llama, ModelConfig, TextTokenizer};
use multilora::proto::v1 as pb;
use multilora::server::generation::GenerationService;
use multilora::server::{start_engine, RunningServer, ServerOptions};
use pb::generation_client::GenerationClient;
use std::path::PathBuf;
use tonic::transport::Channel;

pub const REAL_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The tiny random model with the byte-level test tokenizer.
pub fn tiny_service(engine_cfg: EngineConfig) -> GenerationService {
    let tokenizer = TextTokenizer::byte_level_for_tests().unwrap();
    let cfg = ModelConfig::tiny_for_tests(tokenizer.vocab_size());
    let model = Llama::random_for_tests(&cfg, 11).unwrap();
    let registry = AdapterRegistry::new(RegistryConfig::new(model.base_shape()));
    start_engine(model, tokenizer, registry, engine_cfg, "random").unwrap()
}

/// The real default model (GGUF), as `make test` fetches it.
pub fn real_service(engine_cfg: EngineConfig) -> GenerationService {
    let path = repo_path(REAL_MODEL);
    assert!(
        path.is_file(),
        "{} is missing: run `make model`",
        path.display()
    );
    let loaded =
        weights::load_model(path.to_str().unwrap(), None, &candle_core::Device::Cpu).unwrap();
    let registry = AdapterRegistry::new(RegistryConfig::new(loaded.model.base_shape()));
    start_engine(
        loaded.model,
        loaded.tokenizer,
        registry,
        engine_cfg,
        &loaded.source_dtype,
    )
    .unwrap()
}

pub async fn start(service: GenerationService) -> (RunningServer, GenerationClient<Channel>) {
    let server = RunningServer::start(service, ServerOptions::default())
        .await
        .unwrap();
    let client = GenerationClient::connect(server.endpoint()).await.unwrap();
    (server, client)
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
