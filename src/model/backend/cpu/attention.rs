//! Paged causal attention over a ragged batch on the CPU: each sequence's chunk of
//! queries attends to its own cached keys and values, read through its block table.
//! f32, parallel over tokens; each query row's result depends only on its own sequence
//! (one fixed order of operations), so it is the same whatever else is in the batch.
use super::kv::CpuKvStore;
use crate::model::backend::HeadShape;
use crate::model::batch::ForwardBatch;
#[cfg(target_arch = "x86_64")]
use crate::simd::Isa;
use crate::simd::{axpy, dot};
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Writes this step's keys and values into the cache (rows `[T, kv_heads * head_dim]`),
/// then computes causal attention for every query row; returns `[T, heads * head_dim]`.
pub fn paged_attention(
    batch: &ForwardBatch,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: &mut CpuKvStore,
    shape: HeadShape,
) -> Result<Vec<f32>> {
    let kv_row = shape.num_kv_heads * shape.head_dim;
    let q_row = shape.num_heads * shape.head_dim;
    let t = batch.tokens.len();
    ensure!(
        q.len() == t * q_row && k.len() == t * kv_row && v.len() == t * kv_row,
        "attention inputs do not match {t} tokens of {shape:?}"
    );
    ensure!(
        kv.layout().slot_len() == kv_row && layer < kv.layout().num_layers,
        "the K/V storage {:?} does not hold layer {layer} of {shape:?}",
        kv.layout()
    );
    for chunk in &batch.chunks {
        ensure!(
            kv.covers(&chunk.block_table, chunk.context_len + chunk.len),
            "a block table does not cover positions 0..{} of the K/V storage",
            chunk.context_len + chunk.len
        );
    }
    for chunk in &batch.chunks {
        for i in 0..chunk.len {
            let t = chunk.start + i;
            let off = kv.slot_offset(&chunk.block_table, chunk.context_len + i);
            let lkv = kv.layer_mut(layer);
            lkv.k[off..off + kv_row].copy_from_slice(&k[t * kv_row..(t + 1) * kv_row]);
            lkv.v[off..off + kv_row].copy_from_slice(&v[t * kv_row..(t + 1) * kv_row]);
        }
    }
    let mut out = vec![0f32; t * q_row];
    let row_chunk = batch.row_chunks();
    let kv = &*kv;
    out.par_chunks_mut(q_row)
        .enumerate()
        .for_each(|(t, out_row)| {
            let chunk = &batch.chunks[row_chunk[t]];
            let pos = chunk.context_len + (t - chunk.start);
            attend_one(
                &q[t * q_row..(t + 1) * q_row],
                out_row,
                pos,
                &chunk.block_table,
                kv,
                layer,
                shape,
            );
        });
    Ok(out)
}

/// One query row (all heads) at position `pos` against cached positions `0..=pos`.
fn attend_one(
    q: &[f32],
    out: &mut [f32],
    pos: usize,
    table: &[u32],
    kv: &CpuKvStore,
    layer: usize,
    shape: HeadShape,
) {
    #[cfg(target_arch = "x86_64")]
    if Isa::get() >= Isa::Avx2Fma {
        // SAFETY: the CPU supports the features this copy was compiled for.
        unsafe { attend_one_avx2(q, out, pos, table, kv, layer, shape) };
        return;
    }
    attend_one_generic(q, out, pos, table, kv, layer, shape);
}

/// [`attend_one_generic`] compiled for AVX2/FMA (the same operations in the same order).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_avx2(
    q: &[f32],
    out: &mut [f32],
    pos: usize,
    table: &[u32],
    kv: &CpuKvStore,
    layer: usize,
    shape: HeadShape,
) {
    attend_one_generic(q, out, pos, table, kv, layer, shape)
}

/// One pass over the cached positions for all heads at once: each position's K (then V)
/// row of every KV head is contiguous, so the cache is read sequentially, once.
#[inline(always)]
fn attend_one_generic(
    q: &[f32],
    out: &mut [f32],
    pos: usize,
    table: &[u32],
    kv: &CpuKvStore,
    layer: usize,
    shape: HeadShape,
) {
    let hd = shape.head_dim;
    let heads = shape.num_heads;
    let group = heads / shape.num_kv_heads;
    let kv_row = shape.num_kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let lkv = kv.layer(layer);
    let n = pos + 1;
    let offsets: Vec<usize> = (0..n).map(|j| kv.slot_offset(table, j)).collect();
    let mut scores = vec![0f32; n * heads];
    for (j, &off) in offsets.iter().enumerate() {
        let k = &lkv.k[off..off + kv_row];
        for h in 0..heads {
            let kvh = h / group;
            scores[h * n + j] = dot(&q[h * hd..(h + 1) * hd], &k[kvh * hd..(kvh + 1) * hd]) * scale;
        }
    }
    for h in 0..heads {
        softmax_in_place(&mut scores[h * n..(h + 1) * n]);
    }
    out.fill(0.0);
    for (j, &off) in offsets.iter().enumerate() {
        let v = &lkv.v[off..off + kv_row];
        for h in 0..heads {
            let kvh = h / group;
            axpy(
                &mut out[h * hd..(h + 1) * hd],
                scores[h * n + j],
                &v[kvh * hd..(kvh + 1) * hd],
            );
        }
    }
}

#[inline(always)]
fn softmax_in_place(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in s.iter_mut() {
        *x *= inv;
    }
}
