//! The measurements of `cuda_lora` (see its header).
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use multilora::lora::peft::{AdapterWeights, BaseShape, LoraSite};
use multilora::model::backend::cuda::CudaBackend;
use multilora::model::backend::{Backend, HeadShape, KvLayout, SitePart};
use multilora::model::{BaseModel, ForwardBatch, ModelRunner};
use multilora::rng::Xoshiro256;
use multilora::testing::{llama_on, random_adapter, random_weights};
use std::sync::Arc;
use std::time::Instant;

/// Median seconds of `iters` runs of `f` (after one warm-up), synchronised.
fn time(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[iters / 2])
}

fn shape_7b() -> BaseShape {
    BaseShape {
        num_layers: 1,
        hidden_size: 4096,
        q_out: 4096,
        kv_out: 1024,
        intermediate_size: 11008,
        modules: &multilora::lora::peft::SEPARATE_MODULES,
    }
}

/// Adapters at gate and up of one layer, ranks cycling through `ranks`.
fn adapters(n: usize, ranks: &[usize]) -> Vec<Arc<AdapterWeights>> {
    (0..n)
        .map(|i| {
            Arc::new(random_adapter(
                &shape_7b(),
                ranks[i % ranks.len()],
                &[LoraSite::Gate, LoraSite::Up],
                i as u64,
            ))
        })
        .collect()
}

fn batch(runs: &[(usize, i32)]) -> ForwardBatch {
    let mut b = ForwardBatch::default();
    let mut block = 0u32;
    for &(len, slot) in runs {
        let table: Vec<u32> = (block..block + len as u32).collect();
        block += len as u32;
        b.push_adapter_chunk(&vec![0; len], 0, &table, slot);
    }
    b
}

/// Bytes of A and B every token's adapter reads at gate|up (weights in `elem` bytes).
fn adapter_bytes(ads: &[Arc<AdapterWeights>], elem: usize) -> usize {
    ads.iter()
        .flat_map(|a| a.layers[0].iter().flatten())
        .map(|p| (p.a.len() + p.b.len()) * elem)
        .sum()
}

/// The reference loop on the GPU: per adapter, gather its rows, x A^T B^T, scatter-add.
fn reference(
    dev: &Device,
    x: &Tensor,
    y: &Tensor,
    b: &ForwardBatch,
    ads: &[(Tensor, Tensor, Tensor, Tensor)],
) -> Result<Tensor> {
    let mut y = y.clone();
    for (slot, (ag, bg, au, bu)) in ads.iter().enumerate() {
        let rows: Vec<u32> = (0..b.slots.len())
            .filter(|&t| b.slots[t] == slot as i32)
            .map(|t| t as u32)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let idx = Tensor::from_vec(rows.clone(), rows.len(), dev)?;
        let xs = x.index_select(&idx, 0)?;
        let delta = Tensor::cat(
            &[
                xs.matmul(&ag.t()?)?.matmul(&bg.t()?)?,
                xs.matmul(&au.t()?)?.matmul(&bu.t()?)?,
            ],
            1,
        )?;
        y = y.index_add(&idx, &delta, 0)?;
    }
    Ok(y)
}

fn device_pairs(
    be: &CudaBackend,
    ads: &[Arc<AdapterWeights>],
) -> Result<Vec<(Tensor, Tensor, Tensor, Tensor)>> {
    let dev = be.device();
    let t = |v: &[f32], r: usize, c: usize| -> Result<Tensor> {
        Ok(Tensor::from_slice(v, (r, c), &Device::Cpu)?
            .to_dtype(be.dtype())?
            .to_device(dev)?)
    };
    ads.iter()
        .map(|a| {
            let g = a.layers[0][LoraSite::Gate.index()].as_ref().expect("gate");
            let u = a.layers[0][LoraSite::Up.index()].as_ref().expect("up");
            Ok((
                t(&g.a.to_f32(), g.rank, 4096)?,
                t(&g.b.to_f32(), 11008, g.rank)?,
                t(&u.a.to_f32(), u.rank, 4096)?,
                t(&u.b.to_f32(), 11008, u.rank)?,
            ))
        })
        .collect()
}

fn lora_figures(
    be: &CudaBackend,
    label: &str,
    runs: &[(usize, i32)],
    ads: &[Arc<AdapterWeights>],
    copy_gbs: f64,
) -> Result<()> {
    let dev = be.device().clone();
    let b = batch(runs);
    let t = b.tokens.len();
    let parts = [
        SitePart {
            site: LoraSite::Gate,
            out_features: 11008,
        },
        SitePart {
            site: LoraSite::Up,
            out_features: 11008,
        },
    ];
    let x = be.upload(
        Xoshiro256::from_seed(1).symmetric_vec(t * 4096, 1.0),
        t,
        4096,
    )?;
    let y0 = be.upload(vec![0.0; t * 22016], t, 22016)?;
    let step = be.begin_step(&b, ads)?;
    let ours = time(&dev, 20, || {
        let mut y = y0.clone();
        be.lora(&step, 0, &parts, &x, &mut y)
    })?;
    let pairs = device_pairs(be, ads)?;
    let refr = time(&dev, 5, || reference(&dev, &x, &y0, &b, &pairs).map(|_| ()))?;
    let bytes = adapter_bytes(ads, be.dtype().size_in_bytes()) as f64;
    let flops: f64 = b
        .slots
        .iter()
        .map(|&s| ads[s as usize].rank_max as f64 * 2.0 * 2.0 * (4096.0 + 11008.0))
        .sum();
    println!(
        "{label}: {t} tokens, {} adapters, {:.0} MB of adapter weights per call: ours {:.3} ms = {:.0} GB/s ({:.0}% of copy), {:.2} TFLOP/s; reference loop {:.3} ms ({:.1}x slower)",
        ads.len(), bytes / 1e6, ours * 1e3, bytes / ours / 1e9, 100.0 * bytes / ours / 1e9 / copy_gbs, flops / ours / 1e12, refr * 1e3, refr / ours
    );
    if label.contains("BGMV") {
        figure("bgmv_pct_of_copy", 100.0 * bytes / ours / 1e9 / copy_gbs);
    }
    Ok(())
}

/// A machine-readable figure for `gpu-check.sh perf` (which gathers them into JSON).
fn figure(key: &str, value: f64) {
    println!("figure {key} {value:.4}");
}

/// One layer's attention call (K/V write included) of the 1B model's heads in bf16, for
/// `rows` sequences of `context` positions, with each attention kernel: KV bytes read
/// per call over its time, against the copy rate.
fn attention_figures(copy_gbs: f64) -> Result<()> {
    let shape = HeadShape::causal(32, 8, 64);
    for (rows, context, key) in [(64, 128, "b64_ctx128"), (8, 8192, "b8_ctx8192")] {
        for (split, kernel) in [(false, "per_head"), (true, "split")] {
            let be = CudaBackend::new(0, DType::BF16)?.with_split_attention(split);
            let dev = be.device().clone();
            let blocks = context / 16 + 1;
            let layout = KvLayout {
                num_layers: 1,
                num_kv_heads: 8,
                head_dim: 64,
                block_size: 16,
                num_blocks: rows * blocks,
            };
            let mut kv = be.kv_store(layout)?;
            let mut b = ForwardBatch::default();
            for s in 0..rows {
                let table: Vec<u32> = (0..blocks).map(|i| (s * blocks + i) as u32).collect();
                b.push_chunk(&[0], context, &table);
            }
            let step = be.begin_step(&b, &[])?;
            let q = be.upload(vec![0.1; rows * 2048], rows, 2048)?;
            let k = be.upload(vec![0.1; rows * 512], rows, 512)?;
            let secs = time(&dev, 20, || {
                be.paged_attention(&step, &b, &mut kv, 0, &q, &k, &k, shape)?;
                Ok(())
            })?;
            let bytes = (rows * (context + 1) * 2 * 512 * 2) as f64;
            let pct = 100.0 * bytes / secs / 1e9 / copy_gbs;
            println!(
                "attention, batch {rows}, context {context}, {kernel} kernel: {:.1} us, {:.0} GB/s of K/V ({pct:.0}% of copy)",
                secs * 1e6,
                bytes / secs / 1e9
            );
            figure(&format!("attention_pct_of_copy.{key}.{kernel}"), pct);
        }
    }
    Ok(())
}

/// A plain device-to-device copy (cuMemcpyDtoD of 1 GiB into a buffer allocated once):
/// what the copy engine moves, the bandwidth figure the kernels are measured against.
fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let bytes = 1 << 30;
    let stream = dev.as_cuda_device()?.cuda_stream();
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    let secs = time(dev, 10, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let gbs = 2.0 * bytes as f64 / secs / 1e9; // read + write
    println!("device-to-device copy: {:.0} GB/s (read + write)", gbs);
    Ok(gbs)
}

/// The 1B model's decode step at batch 64 (context 128): base only, its GEMMs alone, and
/// 64 distinct rank-16 adapters on q, k, v, o; each the median of `iters` runs.
fn model_figures(iters: usize) -> Result<()> {
    let mut cfg = multilora::model::synth::shape("1b", 32000)?;
    cfg.max_position_embeddings = 1024;
    let weights = random_weights(&cfg, 1)?;
    let be = CudaBackend::new(0, DType::BF16)?;
    let dev = be.device().clone();
    // The GEMMs alone: the same weight shapes, x [64, in], through candle (cuBLAS).
    let h = cfg.hidden_size;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let gemm_shapes = [
        (h + 2 * kv, h),
        (h, h),
        (2 * cfg.intermediate_size, h),
        (h, cfg.intermediate_size),
    ];
    let ws: Vec<Tensor> = gemm_shapes
        .iter()
        .map(|&(o, i)| Tensor::zeros((o, i), DType::BF16, &dev))
        .collect::<candle_core::Result<_>>()?;
    let head = Tensor::zeros((cfg.vocab_size, h), DType::BF16, &dev)?;
    let xs: Vec<Tensor> = gemm_shapes
        .iter()
        .map(|&(_, i)| Tensor::zeros((64, i), DType::BF16, &dev))
        .collect::<candle_core::Result<_>>()?;
    let gemms = time(&dev, iters, || {
        for _ in 0..cfg.num_layers {
            for (x, w) in xs.iter().zip(&ws) {
                x.matmul(&w.t()?)?;
            }
        }
        xs[0].narrow(1, 0, h)?.matmul(&head.t()?)?;
        Ok(())
    })?;
    let mut model = ModelRunner::new(llama_on(be, weights, &cfg)?)?;
    model.allocate_kv(64 * 9, 16)?;
    let ads: Vec<Arc<AdapterWeights>> = (0..64)
        .map(|i| {
            Arc::new(random_adapter(
                &cfg.base_shape(),
                16,
                &[LoraSite::Q, LoraSite::K, LoraSite::V, LoraSite::O],
                100 + i,
            ))
        })
        .collect();
    let step = |slots: &dyn Fn(usize) -> i32| {
        let mut b = ForwardBatch::default();
        for s in 0..64 {
            let table: Vec<u32> = (s as u32 * 9..s as u32 * 9 + 9).collect();
            let last = b.push_adapter_chunk(&[1], 128, &table, slots(s));
            b.logit_rows.push(last);
        }
        b
    };
    let base_batch = step(&|_| -1);
    let lora_batch = step(&|s| s as i32);
    let base = time(&dev, iters, || model.forward(&base_batch, &[]).map(|_| ()))?;
    let multi = time(&dev, iters, || model.forward(&lora_batch, &ads).map(|_| ()))?;
    println!(
        "1B decode step, batch 64, context 128: base only {:.2} ms, its GEMMs alone {:.2} ms ({:.2}x); 64 distinct adapters {:.2} ms ({:.2} of base-only throughput)",
        base * 1e3, gemms * 1e3, base / gemms, multi * 1e3, base / multi
    );
    figure("step_ms_b64", base * 1e3);
    figure("gemm_ms_b64", gemms * 1e3);
    figure("step_over_gemm", base / gemms);
    figure("distinct64_step_ratio", base / multi);
    Ok(())
}

/// Every figure; with `step_only`, only the decode step's, three runs each (few enough
/// kernels to profile one by one).
pub fn run(step_only: bool) -> Result<()> {
    if step_only {
        return model_figures(3);
    }
    let be = CudaBackend::new(0, DType::BF16)?;
    let copy = copy_bandwidth(be.device())?;
    let ranks = [16, 32, 48, 64];
    let decode: Vec<(usize, i32)> = (0..256).map(|s| (1, s)).collect();
    lora_figures(
        &be,
        "decode LoRA (BGMV)",
        &decode,
        &adapters(256, &ranks),
        copy,
    )?;
    let prefill: Vec<(usize, i32)> = (0..8).map(|s| (256, s)).collect();
    lora_figures(
        &be,
        "prefill LoRA (SGMV)",
        &prefill,
        &adapters(8, &[64]),
        copy,
    )?;
    attention_figures(copy)?;
    model_figures(20)
}
