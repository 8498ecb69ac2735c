//! A step crosses between host and backend memory twice: the metadata `begin_step`
//! prepares (on a GPU, one upload before the first kernel) and the logits `to_host`
//! returns (the step's one synchronisation). A tracing backend at the seam, wrapping the
//! CPU backend, records every operation the model calls during real steps (prefill and
//! decode rows, LoRA adapters at every site) and shows nothing else crossing mid-step:
//! no upload, no weight or vector made, no host copy before the logits. This is what
//! lets a decode step be captured as one CUDA graph.
use multilora::lora::peft::{AdapterKind, AdapterWeights, KvPrefix, LoraSite};
use multilora::lora::values::AdapterDType;
use multilora::model::backend::{Backend, HeadShape, HostWeight, KvLayout, SitePart};
use multilora::model::{CpuBackend, ForwardBatch};
use multilora::testing::{llama_on, random_adapter, random_weights, tiny_config};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// `B` with every operation's name recorded in order.
struct Traced<B> {
    inner: B,
    log: Arc<Mutex<Vec<&'static str>>>,
}

impl<B> Traced<B> {
    fn note(&self, op: &'static str) {
        self.log.lock().unwrap().push(op);
    }
}

type R<T> = anyhow::Result<T>;

impl<B: Backend> Backend for Traced<B> {
    type Matrix = B::Matrix;
    type Weight = B::Weight;
    type Vector = B::Vector;
    type Embedding = B::Embedding;
    type KvStore = B::KvStore;
    type Step = B::Step;

    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn dtype_name(&self) -> String {
        self.inner.dtype_name()
    }
    fn adapter_dtype(&self) -> AdapterDType {
        self.inner.adapter_dtype()
    }
    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> R<B::Matrix> {
        self.note("upload");
        self.inner.upload(data, rows, cols)
    }
    fn weight(&self, w: &HostWeight) -> R<B::Weight> {
        self.note("weight");
        self.inner.weight(w)
    }
    fn embedding(&self, w: &HostWeight, tied: Option<&B::Weight>) -> R<B::Embedding> {
        self.note("embedding");
        self.inner.embedding(w, tied)
    }
    fn weight_bytes(&self, w: &B::Weight) -> usize {
        self.inner.weight_bytes(w)
    }
    fn weight_rows(&self, w: &B::Weight, rows: Range<usize>) -> R<Vec<f32>> {
        self.note("weight_rows");
        self.inner.weight_rows(w, rows)
    }
    fn serves(&self, kind: AdapterKind) -> bool {
        self.inner.serves(kind)
    }
    fn serves_mixtures(&self) -> bool {
        self.inner.serves_mixtures()
    }
    fn vector(&self, v: &candle_core::Tensor) -> R<B::Vector> {
        self.note("vector");
        self.inner.vector(v)
    }
    fn kv_store(&self, layout: KvLayout) -> R<B::KvStore> {
        self.note("kv_store");
        self.inner.kv_store(layout)
    }
    fn kv_bytes_per_token(&self, layout: &KvLayout) -> usize {
        self.inner.kv_bytes_per_token(layout)
    }
    fn embed(&self, s: &B::Step, b: &ForwardBatch, t: &B::Embedding) -> R<B::Matrix> {
        self.note("embed");
        self.inner.embed(s, b, t)
    }
    fn linear(&self, x: &B::Matrix, w: &B::Weight) -> R<B::Matrix> {
        self.note("linear");
        self.inner.linear(x, w)
    }
    fn rms_norm(&self, x: &B::Matrix, w: &B::Vector, eps: f32) -> R<B::Matrix> {
        self.note("rms_norm");
        self.inner.rms_norm(x, w, eps)
    }
    fn rms_norm_heads(&self, x: &B::Matrix, w: &B::Vector, eps: f32) -> R<B::Matrix> {
        self.note("rms_norm_heads");
        self.inner.rms_norm_heads(x, w, eps)
    }
    fn add_assign(&self, x: &mut B::Matrix, y: &B::Matrix) -> R<()> {
        self.note("add_assign");
        self.inner.add_assign(x, y)
    }
    fn add_bias(&self, x: &mut B::Matrix, bias: &B::Vector) -> R<()> {
        self.note("add_bias");
        self.inner.add_bias(x, bias)
    }
    fn scale_embeddings(&self, b: &ForwardBatch, x: &mut B::Matrix, factor: f32) -> R<()> {
        self.note("scale_embeddings");
        self.inner.scale_embeddings(b, x, factor)
    }
    fn silu_mul(&self, gate_up: &B::Matrix) -> R<B::Matrix> {
        self.note("silu_mul");
        self.inner.silu_mul(gate_up)
    }
    fn gelu_tanh_mul(&self, gate_up: &B::Matrix) -> R<B::Matrix> {
        self.note("gelu_tanh_mul");
        self.inner.gelu_tanh_mul(gate_up)
    }
    fn copy_columns(&self, dst: &mut B::Matrix, src: &B::Matrix, cols: Range<usize>) -> R<()> {
        self.note("copy_columns");
        self.inner.copy_columns(dst, src, cols)
    }
    fn split_columns(&self, x: &B::Matrix, widths: &[usize]) -> R<Vec<B::Matrix>> {
        self.note("split_columns");
        self.inner.split_columns(x, widths)
    }
    fn rope(
        &self,
        s: &B::Step,
        b: &ForwardBatch,
        x: &mut B::Matrix,
        tables: (&B::Matrix, &B::Matrix),
        heads: usize,
    ) -> R<()> {
        self.note("rope");
        self.inner.rope(s, b, x, tables, heads)
    }
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        s: &B::Step,
        b: &ForwardBatch,
        kv: &mut B::KvStore,
        layer: usize,
        q: &B::Matrix,
        k: &B::Matrix,
        v: &B::Matrix,
        shape: HeadShape,
    ) -> R<B::Matrix> {
        self.note("paged_attention");
        self.inner.paged_attention(s, b, kv, layer, q, k, v, shape)
    }
    fn gather_logit_rows(&self, s: &B::Step, b: &ForwardBatch, x: &B::Matrix) -> R<B::Matrix> {
        self.note("gather_logit_rows");
        self.inner.gather_logit_rows(s, b, x)
    }
    fn to_host(&self, x: B::Matrix) -> R<Vec<f32>> {
        self.note("to_host");
        self.inner.to_host(x)
    }
    fn run_step<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        B::run_step(f)
    }
    fn begin_step(&self, b: &ForwardBatch, adapters: &[Arc<AdapterWeights>]) -> R<B::Step> {
        self.note("begin_step");
        self.inner.begin_step(b, adapters)
    }
    fn release_adapter(&self, adapter: &Arc<AdapterWeights>) {
        self.inner.release_adapter(adapter)
    }
    fn prepare_adapter(&self, adapter: &Arc<AdapterWeights>) -> bool {
        self.inner.prepare_adapter(adapter)
    }
    fn adapter_input(
        &self,
        s: &B::Step,
        layer: usize,
        parts: &[SitePart],
        x: &B::Matrix,
    ) -> R<Option<B::Matrix>> {
        self.note("adapter_input");
        self.inner.adapter_input(s, layer, parts, x)
    }
    fn write_kv_prefix(&self, kv: &mut B::KvStore, table: &[u32], prefix: &KvPrefix) -> R<()> {
        self.note("write_kv_prefix");
        self.inner.write_kv_prefix(kv, table, prefix)
    }
    fn copy_kv_blocks(&self, kv: &mut B::KvStore, pairs: &[(u32, u32)]) -> R<()> {
        self.note("copy_kv_blocks");
        self.inner.copy_kv_blocks(kv, pairs)
    }
    fn lora(
        &self,
        s: &B::Step,
        layer: usize,
        parts: &[SitePart],
        x: &B::Matrix,
        y: &mut B::Matrix,
    ) -> R<()> {
        self.note("lora");
        self.inner.lora(s, layer, parts, x, y)
    }
}

/// Operations that make or copy memory across the seam.
const CROSSING: [&str; 7] = [
    "upload",
    "weight",
    "embedding",
    "vector",
    "kv_store",
    "weight_rows",
    "to_host",
];

#[test]
fn a_step_crosses_to_the_host_only_for_its_logits() {
    let cfg = tiny_config(64);
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = Traced {
        inner: CpuBackend::default(),
        log: log.clone(),
    };
    let model = llama_on(backend, random_weights(&cfg, 3).unwrap(), &cfg).unwrap();
    let mut kv = model.new_kv(16, 4).unwrap();
    let shape = cfg.base_shape();
    let adapters = vec![Arc::new(random_adapter(&shape, 4, &LoraSite::ALL, 1))];
    // A prefill chunk with an adapter, then a step of decode rows, base and adapter.
    let mut prefill = ForwardBatch::default();
    let row = prefill.push_adapter_chunk(&[1, 2, 3, 4, 5], 0, &[0, 1], 0);
    prefill.logit_rows.push(row);
    let row = prefill.push_chunk(&[6, 7], 0, &[2]);
    prefill.logit_rows.push(row);
    let mut decode = ForwardBatch::default();
    let row = decode.push_adapter_chunk(&[8], 5, &[0, 1], 0);
    decode.logit_rows.push(row);
    let row = decode.push_chunk(&[9], 2, &[2]);
    decode.logit_rows.push(row);
    for batch in [&prefill, &decode] {
        log.lock().unwrap().clear();
        let logits = model
            .forward_with_adapters(batch, &mut kv, &adapters)
            .unwrap();
        assert_eq!(logits.len(), 2 * 64);
        let ops = log.lock().unwrap().clone();
        assert_eq!(ops.first(), Some(&"begin_step"), "{ops:?}");
        assert_eq!(ops.last(), Some(&"to_host"), "the logits come back last");
        let crossings: Vec<_> = ops.iter().filter(|op| CROSSING.contains(op)).collect();
        assert_eq!(
            crossings,
            [&"to_host"],
            "nothing else crosses mid-step: {ops:?}"
        );
        assert!(ops.contains(&"lora") && ops.contains(&"paged_attention"));
    }
}
