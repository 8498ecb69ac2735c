//! Paged causal attention over a ragged batch on the CPU: each sequence's chunk of
//! queries attends to its own cached keys and values, read through its block table.
//! f32 arithmetic over an f32 or bf16 cache (bf16 values widened exactly as they are
//! read), parallel over tokens; each query row's result depends only on its own sequence
//! (one fixed order of operations), so it is the same whatever else is in the batch.
use super::kv::{slot_offset, CpuKvStore, KvLayers, KvValue, LayerKv};
use crate::model::backend::{HeadShape, KvLayout};
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
    let layout = kv.layout();
    match kv.layers_mut() {
        KvLayers::F32(layers) => write_rows(batch, k, v, layout, &mut layers[layer]),
        KvLayers::Bf16(layers) => write_rows(batch, k, v, layout, &mut layers[layer]),
    }
    Ok(match kv.layers() {
        KvLayers::F32(layers) => attend_all(batch, q, layout, &layers[layer], shape),
        KvLayers::Bf16(layers) => attend_all(batch, q, layout, &layers[layer], shape),
    })
}

/// Stores the step's K and V rows at their positions.
fn write_rows<E: KvValue>(
    batch: &ForwardBatch,
    k: &[f32],
    v: &[f32],
    layout: KvLayout,
    lkv: &mut LayerKv<E>,
) {
    let kv_row = layout.slot_len();
    for chunk in &batch.chunks {
        for i in 0..chunk.len {
            let t = chunk.start + i;
            let off = slot_offset(layout, &chunk.block_table, chunk.context_len + i);
            let row = t * kv_row..(t + 1) * kv_row;
            lkv.write_slot(off, &k[row.clone()], &v[row]);
        }
    }
}

/// Attention of every query row of the batch against one layer's cache.
fn attend_all<E: KvValue>(
    batch: &ForwardBatch,
    q: &[f32],
    layout: KvLayout,
    lkv: &LayerKv<E>,
    shape: HeadShape,
) -> Vec<f32> {
    let q_row = shape.num_heads * shape.head_dim;
    let mut out = vec![0f32; batch.tokens.len() * q_row];
    let row_chunk = batch.row_chunks();
    out.par_chunks_mut(q_row)
        .enumerate()
        .for_each(|(t, out_row)| {
            let chunk = &batch.chunks[row_chunk[t]];
            let pos = chunk.context_len + (t - chunk.start);
            let query = Query {
                q: &q[t * q_row..(t + 1) * q_row],
                pos,
                table: &chunk.block_table,
            };
            attend_one(query, out_row, layout, lkv, shape);
        });
    out
}

/// One query row (all heads) and where its sequence's positions are.
#[derive(Clone, Copy)]
struct Query<'a> {
    q: &'a [f32],
    pos: usize,
    table: &'a [u32],
}

/// One query row (all heads) at position `pos` against cached positions `0..=pos` (the
/// last `window` of them on a sliding layer).
fn attend_one<E: KvValue>(
    query: Query,
    out: &mut [f32],
    layout: KvLayout,
    lkv: &LayerKv<E>,
    shape: HeadShape,
) {
    #[cfg(target_arch = "x86_64")]
    if Isa::get() >= Isa::Avx2Fma {
        // SAFETY: the CPU supports the features this copy was compiled for.
        unsafe { attend_one_avx2(query, out, layout, lkv, shape) };
        return;
    }
    attend_one_generic(query, out, layout, lkv, shape);
}

/// [`attend_one_generic`] compiled for AVX2/FMA (the same operations in the same order).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_avx2<E: KvValue>(
    query: Query,
    out: &mut [f32],
    layout: KvLayout,
    lkv: &LayerKv<E>,
    shape: HeadShape,
) {
    attend_one_generic(query, out, layout, lkv, shape)
}

/// One pass over the cached positions for all heads at once: each position's K (then V)
/// row of every KV head is contiguous, so the cache is read sequentially, once.
#[inline(always)]
fn attend_one_generic<E: KvValue>(
    query: Query,
    out: &mut [f32],
    layout: KvLayout,
    lkv: &LayerKv<E>,
    shape: HeadShape,
) {
    let Query { q, pos, table } = query;
    let hd = shape.head_dim;
    let heads = shape.num_heads;
    let group = heads / shape.num_kv_heads;
    let kv_row = shape.num_kv_heads * hd;
    let scale = shape.scale;
    let first = shape.first_position(pos);
    let n = pos + 1 - first;
    let offsets: Vec<usize> = (first..=pos)
        .map(|j| slot_offset(layout, table, j))
        .collect();
    let mut scores = vec![0f32; n * heads];
    for (j, &off) in offsets.iter().enumerate() {
        let k = &lkv.k[off..off + kv_row];
        for h in 0..heads {
            let kvh = h / group;
            scores[h * n + j] = dot(&q[h * hd..(h + 1) * hd], &k[kvh * hd..(kvh + 1) * hd]) * scale;
        }
    }
    if let Some(cap) = shape.softcap {
        scores.iter_mut().for_each(|s| *s = (*s / cap).tanh() * cap);
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
