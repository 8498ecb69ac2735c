//! Runs decode steps at batch 32 in a loop, for profiling.
use multilora::engine::kv_cache::{KvCache, KvCacheShape};
use multilora::model::{weights, ForwardBatch, Llama};
fn main() {
    let b: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let source = weights::resolve("models/SmolLM2-135M-Instruct.Q4_1.gguf", None).unwrap();
    let loaded = weights::load(&source, &candle_core::Device::Cpu).unwrap();
    let model = Llama::load(loaded.vb, &loaded.config).unwrap();
    let cfg = model.config().clone();
    let shape = KvCacheShape::from_budget(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        16,
        b * 160 * cfg.kv_bytes_per_token(),
    )
    .unwrap();
    let mut kv = KvCache::new(shape);
    let mut tables = Vec::new();
    for s in 0..b {
        let mut table = Vec::new();
        assert!(kv.ensure_capacity(&mut table, 129));
        let tokens: Vec<u32> = (0..128).map(|i| ((s * 31 + i * 7) % 1000) as u32).collect();
        let mut batch = ForwardBatch::default();
        batch.push_chunk(&tokens, 0, &table);
        model.forward(&batch, &mut kv).unwrap();
        tables.push(table);
    }
    let mut step = ForwardBatch::default();
    for (s, table) in tables.iter().enumerate() {
        let last = step.push_chunk(&[(s % 1000) as u32], 128, table);
        step.logit_rows.push(last);
    }
    let t = std::time::Instant::now();
    for _ in 0..40 {
        model.forward(&step, &mut kv).unwrap();
    }
    println!("{:.2} ms/step", t.elapsed().as_secs_f64() * 1e3 / 40.0);
}
