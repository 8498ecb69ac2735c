//! The ragged batched forward equals each sequence run alone, across mixes of prefill
//! chunks and decode tokens, KV block boundaries and preemption (small random model), in
//! every CPU weight format (f32, bf16, f16, each quantized type) and K/V type (f32,
//! bf16). On the CPU it is bit-identical: every per-token computation (linear layers,
//! norms, per-sequence attention) is independent of what else is in the batch. The
//! model's rows are multiples of 256, the k-quants' block.
use candle_core::quantized::GgmlDType;
use multilora::engine::block_allocator::{Allocation, BlockAllocator};
use multilora::lora::peft::LoraSite;
use multilora::model::backend::cpu::kv::CpuKvStore;
use multilora::model::backend::cpu::weight::QUANT_TYPES;
use multilora::model::backend::cpu::{CpuWeightFormat, KvDType};
use multilora::model::{BaseModel, CpuBackend, ForwardBatch, Llama, ModelConfig, ModelRunner};
use multilora::rng::Xoshiro256;
use multilora::testing::{llama_on, random_adapter, random_weights, tiny_config};
use std::sync::Arc;

const VOCAB: usize = 97;

type Model = Llama<CpuBackend>;

/// Two layers, hidden 256, MLP 512, 4 query heads of 64 over 2 KV heads.
fn config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        head_dim: 64,
        ..tiny_config(VOCAB)
    }
}

/// Every CPU backend configuration, named.
fn backends() -> Vec<(String, CpuBackend)> {
    let mut formats = vec![
        CpuWeightFormat::F32,
        CpuWeightFormat::Bf16,
        CpuWeightFormat::F16,
    ];
    formats.extend(
        QUANT_TYPES
            .iter()
            .map(|(_, t)| CpuWeightFormat::Quantized { dense_to: *t }),
    );
    let mut all: Vec<(String, CpuBackend)> = formats
        .into_iter()
        .map(|f| (f.name(), CpuBackend::new(f)))
        .collect();
    let bf16_kv = CpuBackend::new(CpuWeightFormat::Quantized {
        dense_to: GgmlDType::Q4K,
    })
    .with_kv_dtype(KvDType::Bf16);
    all.push(("q4_k weights, bf16 K/V".into(), bf16_kv));
    all.push((
        "f32 weights, bf16 K/V".into(),
        CpuBackend::default().with_kv_dtype(KvDType::Bf16),
    ));
    all
}

fn model(backend: CpuBackend) -> Model {
    let cfg = config();
    llama_on(backend, random_weights(&cfg, 7).unwrap(), &cfg).unwrap()
}

/// A pool of `num_blocks` blocks of `block_size` tokens: the allocator for the block
/// tables and the model's K/V storage they index.
fn cache(model: &Model, block_size: usize, num_blocks: usize) -> (BlockAllocator, CpuKvStore) {
    (
        BlockAllocator::new(num_blocks, block_size),
        model.new_kv(num_blocks, block_size).unwrap(),
    )
}

/// A uniform choice in `0..n` for the test's choices.
fn below(rng: &mut Xoshiro256, n: usize) -> usize {
    rng.range(0, n - 1)
}

/// Logits of every position of `tokens`, run alone in one forward.
fn alone(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (mut alloc, mut kv) = cache(model, 16, 64);
    let mut table = Vec::new();
    assert_eq!(alloc.allocate(&mut table, tokens.len()), Allocation::Ok);
    let mut b = ForwardBatch::default();
    b.push_chunk(tokens, 0, &table);
    b.logit_rows = (0..tokens.len()).collect();
    let logits = model.forward(&b, &mut kv).unwrap();
    logits.chunks(VOCAB).map(|c| c.to_vec()).collect()
}

/// Logits of every position, decoding one token per forward (the decode path alone).
fn alone_token_by_token(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (mut alloc, mut kv) = cache(model, 4, 64);
    let mut table = Vec::new();
    let mut out = Vec::new();
    for (p, t) in tokens.iter().enumerate() {
        assert_eq!(alloc.allocate(&mut table, p + 1), Allocation::Ok);
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
    for (name, backend) in backends() {
        eprintln!("{name}");
        token_by_token_matches_prefill(&model(backend));
    }
}

fn token_by_token_matches_prefill(model: &Model) {
    let tokens: Vec<u32> = (0..37).map(|i| (i * 13 % VOCAB) as u32).collect();
    let a = alone(model, &tokens);
    let b = alone_token_by_token(model, &tokens);
    for (p, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(max_diff(x, y) < 1e-4, "position {p}: {}", max_diff(x, y));
        assert_eq!(x, y, "position {p}: not bit-identical");
    }
}

#[test]
fn ragged_batches_with_chunks_blocks_and_preemption_match_alone() {
    for (name, backend) in backends() {
        eprintln!("{name}");
        ragged_batches_match_alone(&model(backend), 3);
    }
}

fn ragged_batches_match_alone(model: &Model, rounds: u64) {
    let mut rng = Xoshiro256::from_seed(42);
    for round in 0..rounds {
        let n_seqs = 2 + below(&mut rng, 6);
        let mut seqs: Vec<SeqState> = (0..n_seqs)
            .map(|_| {
                let len = 1 + below(&mut rng, 45);
                let tokens: Vec<u32> = (0..len).map(|_| below(&mut rng, VOCAB) as u32).collect();
                let reference = alone(model, &tokens);
                SeqState {
                    tokens,
                    computed: 0,
                    table: Vec::new(),
                    reference,
                }
            })
            .collect();
        // Block size 4 so chunks straddle block boundaries; enough blocks for all.
        let (mut alloc, mut kv) = cache(model, 4, 256);
        let mut preempted = 0;
        let mut steps = 0;
        while seqs.iter().any(|s| s.computed < s.tokens.len()) {
            steps += 1;
            let mut batch = ForwardBatch::default();
            let mut expected = Vec::new();
            for s in seqs.iter_mut() {
                let remaining = s.tokens.len() - s.computed;
                if remaining == 0 || below(&mut rng, 4) == 0 {
                    continue; // not scheduled this step
                }
                // Mostly decode-sized steps, sometimes a large prefill chunk.
                let len = if below(&mut rng, 2) == 0 {
                    1
                } else {
                    1 + below(&mut rng, remaining)
                };
                assert_eq!(
                    alloc.allocate(&mut s.table, s.computed + len),
                    Allocation::Ok
                );
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
            if below(&mut rng, 5) == 0 {
                let i = below(&mut rng, seqs.len());
                let s = &mut seqs[i];
                if s.computed > 0 && s.computed < s.tokens.len() {
                    alloc.release(&mut s.table);
                    s.computed = 0;
                    preempted += 1;
                }
            }
        }
        for s in seqs.iter_mut() {
            alloc.release(&mut s.table);
        }
        assert_eq!(
            alloc.num_free_blocks(),
            256,
            "all blocks return to the pool"
        );
        eprintln!("round {round}: {n_seqs} sequences, {steps} steps, {preempted} preemptions");
    }
}

/// Decode padding, what one captured CUDA graph per batch bucket replays: a decode step
/// padded to its bucket with base rows (at position 0, writing the scratch block) gives
/// every real row the logits it has unpadded, bit for bit, step after step, with
/// adapters in the batch; so the padded rows wrote nothing a real sequence reads.
#[test]
fn decode_steps_padded_to_their_bucket_equal_unpadded() {
    let cfg = config();
    let runner = || {
        let model = llama_on(
            CpuBackend::default(),
            random_weights(&cfg, 7).unwrap(),
            &cfg,
        );
        let mut runner = ModelRunner::new(model.unwrap()).unwrap();
        runner.allocate_kv(64, 4).unwrap();
        runner
    };
    let mut plain = runner();
    let mut padded = runner().with_decode_padding();
    let shape = plain.base_shape();
    let adapters: Vec<_> = (0..2)
        .map(|i| {
            Arc::new(random_adapter(
                &shape,
                4 + 4 * i,
                &[LoraSite::Q, LoraSite::V],
                i as u64,
            ))
        })
        .collect();
    let mut rng = Xoshiro256::from_seed(11);
    // Seven sequences of distinct blocks (8 each), slots -1, 0, 1 in turn.
    let tables: Vec<Vec<u32>> = (0..7).map(|s| (s * 8..s * 8 + 8).collect()).collect();
    let slot = |s: usize| (s % 3) as i32 - 1;
    let mut lens = [0usize; 7];
    let mut prefill = ForwardBatch::default();
    for (s, table) in tables.iter().enumerate() {
        let prompt: Vec<u32> = (0..3 + s).map(|_| below(&mut rng, VOCAB) as u32).collect();
        let row = prefill.push_adapter_chunk(&prompt, 0, table, slot(s));
        prefill.logit_rows.push(row);
        lens[s] = prompt.len();
    }
    assert_eq!(
        plain.forward(&prefill, &adapters).unwrap(),
        padded.forward(&prefill, &adapters).unwrap()
    );
    // Decode steps of 7, 5, 3, 1, 6, 2, 7 rows: buckets 8, 8, 4, 1, 8, 2, 8.
    for rows in [7, 5, 3, 1, 6, 2, 7] {
        let mut step = ForwardBatch::default();
        for s in (0..7).filter(|s| s % 7 < rows) {
            let token = [below(&mut rng, VOCAB) as u32];
            let row = step.push_adapter_chunk(&token, lens[s], &tables[s], slot(s));
            step.logit_rows.push(row);
            lens[s] += 1;
        }
        let expected = plain.forward(&step, &adapters).unwrap();
        assert_eq!(expected.len(), rows * VOCAB);
        let got = padded.forward(&step, &adapters).unwrap();
        assert!(expected == got, "a step of {rows} rows differs padded");
    }
}
