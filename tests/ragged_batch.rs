//! The ragged batched forward equals each sequence run alone, across mixes of prefill
//! chunks and decode tokens, KV block boundaries and preemption (tiny random model).
//! On the CPU it is bit-identical: every per-token computation (packed linear layers,
//! norms, per-sequence attention) is independent of what else is in the batch.
use multilora::engine::kv_cache::{KvCache, KvCacheShape};
use multilora::model::{ForwardBatch, Llama, ModelConfig};

const VOCAB: usize = 97;

fn model() -> (Llama, ModelConfig) {
    let cfg = ModelConfig::tiny_for_tests(VOCAB);
    (Llama::random_for_tests(&cfg, 7).unwrap(), cfg)
}

fn cache(cfg: &ModelConfig, block_size: usize, num_blocks: usize) -> KvCache {
    KvCache::new(KvCacheShape {
        num_layers: cfg.num_layers,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size,
        num_blocks,
    })
}

/// Small deterministic generator for the test's choices.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

/// Logits of every position of `tokens`, run alone in one forward.
fn alone(model: &Llama, cfg: &ModelConfig, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut kv = cache(cfg, 16, 64);
    let mut table = Vec::new();
    assert!(kv.ensure_capacity(&mut table, tokens.len()));
    let mut b = ForwardBatch::default();
    b.push_chunk(tokens, 0, &table);
    b.logit_rows = (0..tokens.len()).collect();
    let logits = model.forward(&b, &mut kv).unwrap();
    logits.chunks(VOCAB).map(|c| c.to_vec()).collect()
}

/// Logits of every position, decoding one token per forward (the decode path alone).
fn alone_token_by_token(model: &Llama, cfg: &ModelConfig, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut kv = cache(cfg, 4, 64);
    let mut table = Vec::new();
    let mut out = Vec::new();
    for (p, t) in tokens.iter().enumerate() {
        assert!(kv.ensure_capacity(&mut table, p + 1));
        let mut b = ForwardBatch::default();
        let last = b.push_chunk(&[*t], p, &table);
        b.logit_rows = vec![last];
        out.push(model.forward(&b, &mut kv).unwrap());
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

struct SeqState {
    tokens: Vec<u32>,
    computed: usize,
    table: Vec<u32>,
    reference: Vec<Vec<f32>>,
}

#[test]
fn one_token_at_a_time_equals_full_prefill() {
    let (model, cfg) = model();
    let tokens: Vec<u32> = (0..37).map(|i| (i * 13 % VOCAB) as u32).collect();
    let a = alone(&model, &cfg, &tokens);
    let b = alone_token_by_token(&model, &cfg, &tokens);
    for (p, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(max_diff(x, y) < 1e-4, "position {p}: {}", max_diff(x, y));
        assert_eq!(x, y, "position {p}: not bit-identical");
    }
}

#[test]
fn ragged_batches_with_chunks_blocks_and_preemption_match_alone() {
    let (model, cfg) = model();
    let mut rng = Lcg(42);
    for round in 0..6 {
        let n_seqs = 2 + rng.next(6);
        let mut seqs: Vec<SeqState> = (0..n_seqs)
            .map(|_| {
                let len = 1 + rng.next(45);
                let tokens: Vec<u32> = (0..len).map(|_| rng.next(VOCAB) as u32).collect();
                let reference = alone(&model, &cfg, &tokens);
                SeqState {
                    tokens,
                    computed: 0,
                    table: Vec::new(),
                    reference,
                }
            })
            .collect();
        // Block size 4 so chunks straddle block boundaries; enough blocks for all.
        let mut kv = cache(&cfg, 4, 256);
        let mut preempted = 0;
        let mut steps = 0;
        while seqs.iter().any(|s| s.computed < s.tokens.len()) {
            steps += 1;
            let mut batch = ForwardBatch::default();
            let mut expected = Vec::new();
            for s in seqs.iter_mut() {
                let remaining = s.tokens.len() - s.computed;
                if remaining == 0 || rng.next(4) == 0 {
                    continue; // not scheduled this step
                }
                // Mostly decode-sized steps, sometimes a large prefill chunk.
                let len = if rng.next(2) == 0 {
                    1
                } else {
                    1 + rng.next(remaining)
                };
                assert!(kv.ensure_capacity(&mut s.table, s.computed + len));
                let start = batch.tokens.len();
                batch.push_chunk(
                    &s.tokens[s.computed..s.computed + len],
                    s.computed,
                    &s.table,
                );
                for i in 0..len {
                    batch.logit_rows.push(start + i);
                    expected.push(s.reference[s.computed + i].clone());
                }
                s.computed += len;
            }
            if batch.is_empty() {
                continue;
            }
            let logits = model.forward(&batch, &mut kv).unwrap();
            for (row, exp) in logits.chunks(VOCAB).zip(&expected) {
                let d = max_diff(row, exp);
                assert!(d < 1e-4, "round {round} step {steps}: max abs diff {d}");
                assert_eq!(
                    row,
                    &exp[..],
                    "round {round} step {steps}: not bit-identical"
                );
            }
            // Preempt a random partly computed sequence: free its blocks, recompute later.
            if rng.next(5) == 0 {
                let i = rng.next(seqs.len());
                let s = &mut seqs[i];
                if s.computed > 0 && s.computed < s.tokens.len() {
                    kv.release(&mut s.table);
                    s.computed = 0;
                    preempted += 1;
                }
            }
        }
        for s in seqs.iter_mut() {
            kv.release(&mut s.table);
        }
        assert_eq!(kv.num_free_blocks(), 256, "all blocks return to the pool");
        eprintln!("round {round}: {n_seqs} sequences, {steps} steps, {preempted} preemptions");
    }
}
