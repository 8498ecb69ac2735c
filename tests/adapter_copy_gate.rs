//! The engine's side of device adapter copies (what the CUDA backend's background copies
//! rely on), on the tiny random model with a test double around it that reports each
//! adapter ready only after a few asks and records which adapters the engine released:
//! a request waits for its adapter's copy while a running stream keeps decoding, then gets
//! the same tokens as without the wait; an adapter evicted from the active pool is
//! released to the model.
mod common;

use common::{generate, greedy, TestServer};
use multilora::engine::EngineConfig;
use multilora::lora::peft::{AdapterWeights, LoraSite};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::{BaseModel, ForwardBatch, ModelConfig};
use multilora::proto::v1 as pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Asks per adapter (by weights address) and the adapters released, shared with the test.
#[derive(Clone, Default)]
struct Log {
    asks: Arc<Mutex<HashMap<usize, usize>>>,
    released: Arc<Mutex<Vec<usize>>>,
}

struct DelayedCopies {
    inner: Box<dyn BaseModel>,
    log: Log,
    /// Asks answered "not ready" per adapter.
    delay: usize,
}

fn key(a: &Arc<AdapterWeights>) -> usize {
    Arc::as_ptr(a) as usize
}

impl BaseModel for DelayedCopies {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn dtype_name(&self) -> String {
        self.inner.dtype_name()
    }
    fn adapter_dtype(&self) -> multilora::lora::values::AdapterDType {
        self.inner.adapter_dtype()
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }
    fn allocate_kv(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
        self.inner.allocate_kv(num_blocks, block_size)
    }
    fn release_adapter(&mut self, adapter: &Arc<AdapterWeights>) {
        self.log.released.lock().unwrap().push(key(adapter));
    }
    fn adapter_ready(&self, adapter: &Arc<AdapterWeights>) -> bool {
        let mut asks = self.log.asks.lock().unwrap();
        let n = asks.entry(key(adapter)).or_insert(0);
        *n += 1;
        *n > self.delay
    }
    fn write_kv_prefix(&mut self, adapter: &AdapterWeights, blocks: &[u32]) -> anyhow::Result<()> {
        self.inner.write_kv_prefix(adapter, blocks)
    }
    fn copy_kv_blocks(&mut self, pairs: &[(u32, u32)]) -> anyhow::Result<()> {
        self.inner.copy_kv_blocks(pairs)
    }
    fn forward(
        &mut self,
        batch: &ForwardBatch,
        adapters: &[Arc<AdapterWeights>],
    ) -> anyhow::Result<Vec<f32>> {
        self.inner.forward(batch, adapters)
    }
}

fn request(adapter: &str, tokens: u32) -> pb::GenerateRequest {
    let mut r = greedy(vec![5, 6, 7, 8, 9], tokens);
    r.adapter = adapter.into();
    r.ignore_eos = true;
    r
}

/// Two rank-8 all-linear adapters for the tiny model (64 KiB each in f32).
fn server(dir: &std::path::Path) -> TestServer {
    let mut server = TestServer::tiny().engine(EngineConfig {
        // KV blocks of 16 tokens are 8 KiB here: room for one adapter at a time.
        adapter_memory: 80_000,
        ..EngineConfig::default()
    });
    let base = server.base_shape();
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let spec = SynthSpec {
            kind: Default::default(),
            rank: 8,
            alpha: 16.0,
            sites: LoraSite::ALL.to_vec(),
            seed: i as u64,
        };
        write_synthetic_adapter(&dir.join(name), &base, &spec).unwrap();
        server = server.adapter(name, dir.join(name));
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_adapter_copies_and_evicted_copies_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut plain = server(dir.path()).start().await;
    let want_a = generate(&mut plain.gen, request("a", 12)).await.unwrap();
    let want_b = generate(&mut plain.gen, request("b", 12)).await.unwrap();
    plain.stop().await;

    let log = Log::default();
    let inner_log = log.clone();
    let service = server(dir.path()).service_with(move |inner| {
        Box::new(DelayedCopies {
            inner,
            log: inner_log,
            delay: 5,
        })
    });
    let mut started = common::Started::serve(service, Default::default()).await;
    let mut bg_client = started.gen.clone();
    let background = tokio::spawn(async move { generate(&mut bg_client, request("", 120)).await });
    let got_a = generate(&mut started.gen, request("a", 12)).await.unwrap();
    let got_b = generate(&mut started.gen, request("b", 12)).await.unwrap();
    let background = background.await.unwrap().unwrap();

    assert_eq!(
        got_a.token_ids, want_a.token_ids,
        "a after waiting for its copy"
    );
    assert_eq!(
        got_b.token_ids, want_b.token_ids,
        "b after waiting for its copy"
    );
    assert_eq!(
        background.token_ids.len(),
        120,
        "the running stream finished"
    );
    let asks = log.asks.lock().unwrap().clone();
    assert_eq!(asks.len(), 2, "both adapters were prepared: {asks:?}");
    assert!(
        asks.values().all(|&n| n > 5),
        "each request waited: {asks:?}"
    );
    // Only one adapter fits the active pool: b's activation evicted a.
    let released = log.released.lock().unwrap().clone();
    assert!(
        released.iter().any(|k| asks.contains_key(k)),
        "an evicted adapter was released: {released:?} of {asks:?}"
    );
    started.stop().await;
}
