//! The CUDA backend against its oracles: the LoRA kernels (SGMV and BGMV) against
//! `lora_apply_reference`, RoPE and paged attention against the CPU backend, and the whole
//! model against the CPU model on the same seeded weights and adapters (teacher-forced
//! logprobs and greedy ids). Built only with `--features cuda`; every test needs a CUDA
//! device, so they are `#[ignore]`d and run by `scripts/gpu-check.sh` (its run half) with
//! `--include-ignored`.
#![cfg(feature = "cuda")]

use candle_core::DType;
use multilora::lora::batch::LoraBatch;
use multilora::lora::kernels::{lora_apply_reference, SiteShape, SlotWeights};
use multilora::lora::peft::{AdapterWeights, BaseShape, LoraSite};
use multilora::lora::values::LoraValues;
use multilora::model::backend::cpu::CpuBackend;
use multilora::model::backend::cuda::CudaBackend;
use multilora::model::backend::{Backend, HeadShape, KvLayout, SitePart};
use multilora::model::{BaseModel, ForwardBatch, ModelConfig, ModelRunner};
use multilora::rng::Xoshiro256;
use multilora::testing::{llama_on, random_adapter, random_weights};
use std::sync::Arc;

const GPU: &str = "needs a CUDA device (scripts/gpu-check.sh)";

fn cuda(dtype: DType) -> CudaBackend {
    CudaBackend::new(0, dtype).expect("a CUDA device")
}

/// Values as the device stores them in `dtype` (the oracle's inputs).
fn round(values: &[f32], dtype: DType) -> Vec<f32> {
    candle_core::Tensor::from_slice(values, values.len(), &candle_core::Device::Cpu)
        .and_then(|t| t.to_dtype(dtype)?.to_dtype(DType::F32)?.to_vec1::<f32>())
        .unwrap()
}

fn round_adapter(a: &AdapterWeights, dtype: DType) -> AdapterWeights {
    let mut a = a.clone();
    for pair in a.layers.iter_mut().flatten().flatten() {
        pair.a = LoraValues::F32(round(&pair.a.to_f32(), dtype)).into();
        pair.b = LoraValues::F32(round(&pair.b.to_f32(), dtype)).into();
    }
    a
}

/// Tolerance of one output element: f32 accumulation over different orders, plus the
/// output's rounding to `dtype`.
fn close(got: f32, want: f32, dtype: DType) -> bool {
    let tol = match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    };
    (got - want).abs() <= tol * want.abs().max(1.0)
}

/// A batch of `lens.len()` chunks (a prefill run when > 1 token, a decode row when 1),
/// chunk i using `slots[i]`, one K/V block of 1 slot per position (block size 1).
fn lora_batch(lens: &[usize], slots: &[i32]) -> ForwardBatch {
    let mut batch = ForwardBatch::default();
    let mut next_block = 0u32;
    for (&len, &slot) in lens.iter().zip(slots) {
        let table: Vec<u32> = (next_block..next_block + len as u32).collect();
        next_block += len as u32;
        batch.push_adapter_chunk(&vec![0; len], 0, &table, slot);
    }
    batch
}

/// One random LoRA case on one layer's q|k|v site: `n` adapters of random ranks (some
/// without K weights), runs of random lengths with random slots (-1 included).
fn lora_case(dtype: DType, n: usize, hidden: usize, ranks: &[usize], runs: &[usize], seed: u64) {
    let mut rng = Xoshiro256::from_seed(seed);
    let base = BaseShape {
        num_layers: 1,
        hidden_size: hidden,
        q_out: hidden,
        kv_out: hidden / 4,
        intermediate_size: 2 * hidden,
        modules: &multilora::lora::peft::SEPARATE_MODULES,
    };
    let adapters: Vec<Arc<AdapterWeights>> = (0..n)
        .map(|i| {
            let rank = ranks[rng.range(0, ranks.len() - 1)];
            let sites: &[LoraSite] = if i % 3 == 2 {
                &[LoraSite::Q, LoraSite::V]
            } else {
                &[LoraSite::Q, LoraSite::K, LoraSite::V]
            };
            Arc::new(round_adapter(
                &random_adapter(&base, rank, sites, seed * 1000 + i as u64),
                dtype,
            ))
        })
        .collect();
    let slots: Vec<i32> = runs.iter().map(|_| rng.range(0, n) as i32 - 1).collect();
    let batch = lora_batch(runs, &slots);
    let t = batch.tokens.len();
    let parts: Vec<SitePart> = [
        (LoraSite::Q, hidden),
        (LoraSite::K, hidden / 4),
        (LoraSite::V, hidden / 4),
    ]
    .map(|(site, out_features)| SitePart { site, out_features })
    .to_vec();
    let width: usize = parts.iter().map(|p| p.out_features).sum();
    let x = round(&rng.symmetric_vec(t * hidden, 1.0), dtype);
    let y0 = round(&rng.symmetric_vec(t * width, 1.0), dtype);

    let mut want = y0.clone();
    let lb = LoraBatch::new(&batch.slots);
    let mut offset = 0;
    for part in &parts {
        let weights: Vec<Option<SlotWeights>> = adapters
            .iter()
            .map(|a| {
                a.layers[0][part.site.index()]
                    .as_ref()
                    .map(|p| SlotWeights {
                        rank: p.rank,
                        scale: p.scale,
                        a: p.a.view(),
                        b: p.b.view(),
                        rank_scale: None,
                        out_scale: None,
                    })
            })
            .collect();
        let shape = SiteShape {
            in_features: hidden,
            out_features: part.out_features,
            y_stride: width,
            y_offset: offset,
        };
        lora_apply_reference(&lb, &x, &mut want, shape, &weights).unwrap();
        offset += part.out_features;
    }

    let be = cuda(dtype);
    be.kv_store(KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 1,
        block_size: 1,
        num_blocks: t,
    })
    .unwrap();
    let step = be.begin_step(&batch, &adapters).unwrap();
    let xd = be.upload(x, t, hidden).unwrap();
    let mut yd = be.upload(y0.clone(), t, width).unwrap();
    be.lora(&step, 0, &parts, &xd, &mut yd).unwrap();
    let got = be.to_host(yd).unwrap();
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let row = i / width;
        if batch.slots[row] < 0 {
            assert_eq!(g.to_bits(), y0[i].to_bits(), "base token {row} was written");
        }
        assert!(
            close(g, w, dtype),
            "{dtype:?} n={n} runs={runs:?} element {i}: {g} vs {w}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device (scripts/gpu-check.sh)"]
fn lora_kernels_match_the_reference() {
    let _ = GPU;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Decode rows of distinct adapters (BGMV), prefill runs (SGMV), mixed ranks.
        lora_case(dtype, 1, 256, &[1], &[1], 1);
        lora_case(dtype, 8, 256, &[1, 2, 8, 16, 64, 128], &[1; 32], 2);
        lora_case(dtype, 4, 512, &[8, 16, 33], &[17, 1, 3, 9, 1, 25], 3);
        lora_case(dtype, 256, 256, &[4, 16, 64], &[1; 300], 4);
        lora_case(dtype, 3, 200, &[7, 13], &[5, 1, 2], 5); // widths and ranks off the vector path
        lora_case(dtype, 2, 256, &[16], &[64, 1, 1, 40], 6);
    }
}

#[test]
#[ignore = "needs a CUDA device (scripts/gpu-check.sh)"]
fn all_base_and_empty_batches_are_untouched() {
    let be = cuda(DType::BF16);
    let batch = lora_batch(&[3, 1, 1], &[-1, -1, -1]);
    be.kv_store(KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 1,
        block_size: 1,
        num_blocks: 5,
    })
    .unwrap();
    let base = BaseShape {
        num_layers: 1,
        hidden_size: 64,
        q_out: 64,
        kv_out: 16,
        intermediate_size: 128,
        modules: &multilora::lora::peft::SEPARATE_MODULES,
    };
    let adapter = Arc::new(random_adapter(&base, 8, &[LoraSite::Q], 9));
    let step = be.begin_step(&batch, &[adapter]).unwrap();
    let y0 = round(
        &Xoshiro256::from_seed(1).symmetric_vec(5 * 64, 1.0),
        DType::BF16,
    );
    let x = be.upload(vec![1.0; 5 * 64], 5, 64).unwrap();
    let mut y = be.upload(y0.clone(), 5, 64).unwrap();
    be.lora(
        &step,
        0,
        &[SitePart {
            site: LoraSite::Q,
            out_features: 64,
        }],
        &x,
        &mut y,
    )
    .unwrap();
    assert_eq!(be.to_host(y).unwrap(), y0);
}

/// Two steps (prefill chunks, then decode rows over the cached context) through
/// `paged_attention` on both backends with the same random q/k/v.
#[test]
#[ignore = "needs a CUDA device (scripts/gpu-check.sh)"]
fn paged_attention_matches_the_cpu() {
    let mut gemma = HeadShape::causal(8, 2, 64);
    gemma.window = Some(300);
    gemma.softcap = Some(30.0);
    for shape in [HeadShape::causal(8, 2, 64), gemma] {
        for dtype in [DType::F32, DType::BF16] {
            // Both attention kernels: per (row, head), and split decode attention.
            for split in [false, true] {
                attention_case(shape, dtype, split);
            }
        }
    }
}

fn attention_case(shape: HeadShape, dtype: DType, split: bool) {
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 16,
        num_blocks: 64,
    };
    let gpu = cuda(dtype).with_split_attention(split);
    let cpu = CpuBackend::default();
    let mut gkv = gpu.kv_store(layout).unwrap();
    let mut ckv = cpu.kv_store(layout).unwrap();
    // Block tables deliberately out of order; the last sequence spans two splits of
    // the split kernel (512 positions each).
    let used = [7u32, 3, 40, 41, 5, 12, 63, 0, 22];
    let long: Vec<u32> = (0..64u32)
        .rev()
        .filter(|b| !used.contains(b))
        .take(40)
        .collect();
    let tables: [Vec<u32>; 4] = [vec![7, 3, 40, 41, 5], vec![12], vec![63, 0, 22], long];
    let prompts = [70usize, 9, 33, 600];
    let mut rng = Xoshiro256::from_seed(11);
    let mut first = ForwardBatch::default();
    for (p, table) in prompts.iter().zip(&tables) {
        first.push_chunk(&vec![0; *p], 0, table);
    }
    let mut second = ForwardBatch::default();
    for (p, table) in prompts.iter().zip(&tables) {
        second.push_chunk(&[0], *p, table);
    }
    for batch in [&first, &second] {
        let t = batch.tokens.len();
        let q = round(&rng.symmetric_vec(t * 512, 1.0), dtype);
        let k = round(&rng.symmetric_vec(t * 128, 1.0), dtype);
        let v = round(&rng.symmetric_vec(t * 128, 1.0), dtype);
        let want = {
            let step = cpu.begin_step(batch, &[]).unwrap();
            let (q, k, v) = (
                cpu.upload(q.clone(), t, 512).unwrap(),
                cpu.upload(k.clone(), t, 128).unwrap(),
                cpu.upload(v.clone(), t, 128).unwrap(),
            );
            cpu.to_host(
                cpu.paged_attention(&step, batch, &mut ckv, 1, &q, &k, &v, shape)
                    .unwrap(),
            )
            .unwrap()
        };
        let step = gpu.begin_step(batch, &[]).unwrap();
        let (q, k, v) = (
            gpu.upload(q, t, 512).unwrap(),
            gpu.upload(k, t, 128).unwrap(),
            gpu.upload(v, t, 128).unwrap(),
        );
        let got = gpu
            .to_host(
                gpu.paged_attention(&step, batch, &mut gkv, 1, &q, &k, &v, shape)
                    .unwrap(),
            )
            .unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                close(g, w, dtype),
                "{dtype:?} split {split} {shape:?} element {i}: {g} vs {w}"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device (scripts/gpu-check.sh)"]
fn fused_kernels_match_the_cpu() {
    let (rows, cols) = (7, 1000);
    let mut rng = Xoshiro256::from_seed(5);
    for dtype in [DType::F32, DType::BF16] {
        let gpu = cuda(dtype).with_fused_kernels(true);
        let cpu = CpuBackend::default();
        let x = round(&rng.symmetric_vec(rows * cols, 2.0), dtype);
        let y = round(&rng.symmetric_vec(rows * cols, 2.0), dtype);
        let w = round(&rng.symmetric_vec(cols, 1.0), dtype);
        let wt = candle_core::Tensor::from_slice(&w, cols, &candle_core::Device::Cpu).unwrap();
        let check = |label: &str, got: Vec<f32>, want: Vec<f32>| {
            assert_eq!(got.len(), want.len());
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    close(g, w, dtype),
                    "{dtype:?} {label} element {i}: {g} vs {w}"
                );
            }
        };
        let (mut cx, cy) = (
            cpu.upload(x.clone(), rows, cols).unwrap(),
            cpu.upload(y.clone(), rows, cols).unwrap(),
        );
        let (mut gx, gy) = (
            gpu.upload(x.clone(), rows, cols).unwrap(),
            gpu.upload(y.clone(), rows, cols).unwrap(),
        );
        let cn = cpu
            .add_rms_norm(&mut cx, &cy, &cpu.vector(&wt).unwrap(), 1e-5)
            .unwrap();
        let gn = gpu
            .add_rms_norm(&mut gx, &gy, &gpu.vector(&wt).unwrap(), 1e-5)
            .unwrap();
        check(
            "add_rms_norm",
            gpu.to_host(gn).unwrap(),
            cpu.to_host(cn).unwrap(),
        );
        check(
            "residual",
            gpu.to_host(gx).unwrap(),
            cpu.to_host(cx).unwrap(),
        );
        let gate_up = round(&rng.symmetric_vec(rows * 2 * cols, 4.0), dtype);
        let cg = cpu.upload(gate_up.clone(), rows, 2 * cols).unwrap();
        let gg = gpu.upload(gate_up, rows, 2 * cols).unwrap();
        check(
            "silu_mul",
            gpu.to_host(gpu.silu_mul(&gg).unwrap()).unwrap(),
            cpu.to_host(cpu.silu_mul(&cg).unwrap()).unwrap(),
        );
        check(
            "gelu_tanh_mul",
            gpu.to_host(gpu.gelu_tanh_mul(&gg).unwrap()).unwrap(),
            cpu.to_host(cpu.gelu_tanh_mul(&cg).unwrap()).unwrap(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA device (scripts/gpu-check.sh)"]
fn rope_matches_the_cpu() {
    let mut rng = Xoshiro256::from_seed(5);
    let (heads, half, rows, max_pos) = (4, 32, 6, 100);
    let cos = rng.symmetric_vec(max_pos * half, 1.0);
    let sin = rng.symmetric_vec(max_pos * half, 1.0);
    let x = rng.symmetric_vec(rows * heads * 2 * half, 1.0);
    let mut batch = ForwardBatch::default();
    batch.push_chunk(&[0; 4], 90, &[0, 1, 2, 3, 4, 5, 6]);
    batch.push_chunk(&[0; 2], 0, &[7]);
    let cpu = CpuBackend::default();
    let cstep = cpu.begin_step(&batch, &[]).unwrap();
    let mut cx = cpu.upload(x.clone(), rows, heads * 2 * half).unwrap();
    let (cc, cs) = (
        cpu.upload(cos.clone(), max_pos, half).unwrap(),
        cpu.upload(sin.clone(), max_pos, half).unwrap(),
    );
    cpu.rope(&cstep, &batch, &mut cx, (&cc, &cs), heads)
        .unwrap();
    let want = cpu.to_host(cx).unwrap();
    let gpu = cuda(DType::F32);
    gpu.kv_store(KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 2,
        block_size: 16,
        num_blocks: 8,
    })
    .unwrap();
    let gstep = gpu.begin_step(&batch, &[]).unwrap();
    let mut gx = gpu.upload(x, rows, heads * 2 * half).unwrap();
    let (gc, gs) = (
        gpu.upload(cos, max_pos, half).unwrap(),
        gpu.upload(sin, max_pos, half).unwrap(),
    );
    gpu.rope(&gstep, &batch, &mut gx, (&gc, &gs), heads)
        .unwrap();
    let got = gpu.to_host(gx).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!(close(*g, *w, DType::F32), "{g} vs {w}");
    }
}

/// A model shape big enough to exercise every kernel path (GQA, head_dim 64, several
/// blocks), small enough for the CPU oracle to be quick.
fn parity_config() -> ModelConfig {
    let mut cfg = multilora::model::synth::shape("tiny", 2048).unwrap();
    cfg.name = "parity".into();
    // An untied head (std 0.1): with the embeddings tied, the residual stream's own
    // token dominates the logits and every greedy token has logprob 0, which would make
    // the logprob comparison below vacuous.
    cfg.tie_word_embeddings = false;
    cfg.hidden_size = 512;
    cfg.intermediate_size = 1024;
    cfg.num_layers = 4;
    cfg.num_heads = 8;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 64;
    cfg.max_position_embeddings = 512;
    cfg
}

const BLOCK: usize = 16;

/// Greedy continuation of `prompt` with adapter `slot` (-1: none): ids and their
/// logprobs, one sequence at a time over blocks 0...
fn greedy(
    model: &mut dyn BaseModel,
    prompt: &[u32],
    slot: i32,
    adapters: &[Arc<AdapterWeights>],
    n: usize,
) -> Vec<u32> {
    let table: Vec<u32> = (0..32).collect();
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    let mut from = 0;
    for _ in 0..n {
        let mut batch = ForwardBatch::default();
        let last = batch.push_adapter_chunk(&ids[from..], from, &table, slot);
        batch.logit_rows.push(last);
        let logits = model.forward(&batch, adapters).unwrap();
        let next = argmax(&logits);
        from = ids.len();
        ids.push(next);
        out.push(next);
    }
    out
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Logprob of each of `next` after `prompt` + the ones before it, in one prefill.
fn teacher_forced(
    model: &mut dyn BaseModel,
    prompt: &[u32],
    next: &[u32],
    slot: i32,
    adapters: &[Arc<AdapterWeights>],
) -> Vec<Vec<f32>> {
    let all: Vec<u32> = prompt.iter().chain(next).copied().collect();
    let table: Vec<u32> = (0..32).collect();
    let mut batch = ForwardBatch::default();
    batch.push_adapter_chunk(&all, 0, &table, slot);
    batch.logit_rows = (prompt.len() - 1..all.len() - 1).collect();
    let logits = model.forward(&batch, adapters).unwrap();
    let vocab = logits.len() / next.len();
    logits
        .chunks(vocab)
        .map(|row| {
            let max = row.iter().fold(f32::MIN, |m, v| m.max(*v));
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            row.iter().map(|v| v - lse).collect()
        })
        .collect()
}

/// The ids of the `k` largest entries of `row`.
fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..row.len()).collect();
    ids.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    ids.truncate(k);
    ids
}

/// The larger of `worst` and `d`, where a NaN wins (`f32::max` would drop it).
fn worse(worst: f32, d: f32) -> f32 {
    if d.is_nan() || d > worst {
        d
    } else {
        worst
    }
}

#[test]
#[ignore = "needs a CUDA device (scripts/gpu-check.sh)"]
fn model_matches_the_cpu_in_f32_and_bf16() {
    let cfg = parity_config();
    let weights = random_weights(&cfg, 7).unwrap();
    let base = cfg.base_shape();
    let adapters = vec![
        Arc::new(random_adapter(&base, 8, &LoraSite::ALL, 21)),
        Arc::new(random_adapter(
            &base,
            32,
            &[LoraSite::Q, LoraSite::V, LoraSite::Down],
            22,
        )),
    ];
    let mut rng = Xoshiro256::from_seed(3);
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| (0..8 + 13 * i).map(|_| rng.range(0, 2047) as u32).collect())
        .collect();
    let slots = [-1, 0, 1, 0, 1];
    let mut cpu =
        ModelRunner::new(llama_on(CpuBackend::default(), weights.clone(), &cfg).unwrap()).unwrap();
    cpu.allocate_kv(32, BLOCK).unwrap();
    // Per prompt: the CPU's greedy ids and its teacher-forced log-softmax rows.
    let want: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts
        .iter()
        .zip(slots)
        .map(|(p, s)| {
            let ids = greedy(&mut cpu, p, s, &adapters, 24);
            let rows = teacher_forced(&mut cpu, p, &ids, s, &adapters);
            (ids, rows)
        })
        .collect();
    // The greedy tokens' mean logprob: far from 0, so the comparison below has teeth.
    let greedy_lp: Vec<f32> = want
        .iter()
        .flat_map(|(ids, rows)| ids.iter().zip(rows).map(|(&id, r)| r[id as usize]))
        .collect();
    let mean_lp = greedy_lp.iter().sum::<f32>() / greedy_lp.len() as f32;
    println!("CPU greedy tokens' mean logprob {mean_lp:.3}");
    assert!(
        mean_lp < -0.05,
        "greedy tokens' mean logprob {mean_lp}: too peaked (or NaN) to compare"
    );
    // The proven kernels, then the split decode attention and the fused row-wise kernels.
    let variants = [
        (DType::F32, false),
        (DType::BF16, false),
        (DType::F32, true),
        (DType::BF16, true),
    ];
    for (dtype, new_kernels) in variants {
        let (tol, min_equal) = if dtype == DType::F32 {
            (2e-3, 5)
        } else {
            (0.15, 4)
        };
        let backend = cuda(dtype)
            .with_split_attention(new_kernels)
            .with_fused_kernels(new_kernels);
        println!("{dtype:?}, split attention and fused kernels {new_kernels}:");
        let mut gpu = ModelRunner::new(llama_on(backend, weights.clone(), &cfg).unwrap()).unwrap();
        gpu.allocate_kv(32, BLOCK).unwrap();
        let mut equal = 0;
        let (mut worst, mut worst_top) = (0f32, 0f32);
        for ((p, s), (ids, rows)) in prompts.iter().zip(slots).zip(&want) {
            let got = teacher_forced(&mut gpu, p, ids, s, &adapters);
            assert_eq!(got.len(), rows.len());
            for ((g, w), &id) in got.iter().zip(rows).zip(ids) {
                worst = worse(worst, (g[id as usize] - w[id as usize]).abs());
                for t in top_k(w, 16) {
                    worst_top = worse(worst_top, (g[t] - w[t]).abs());
                }
            }
            equal += usize::from(&greedy(&mut gpu, p, s, &adapters, 24) == ids);
        }
        println!("{dtype:?}: CPU's top-16 tokens' largest logprob difference {worst_top:.2e}");
        println!("{dtype:?}: largest logprob difference {worst:.2e}, greedy ids equal on {equal}/5 prompts");
        assert!(
            worst <= tol,
            "{dtype:?}: logprob difference {worst} > {tol}"
        );
        assert!(
            worst_top <= 2.0 * tol,
            "{dtype:?}: top-16 logprob difference {worst_top} > {}",
            2.0 * tol
        );
        assert!(
            equal >= min_equal,
            "{dtype:?}: greedy ids equal on {equal}/5"
        );
    }
}
