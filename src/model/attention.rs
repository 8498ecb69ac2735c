//! Rotary position embeddings and paged causal attention over a ragged batch: each
//! sequence's chunk of queries attends to its own cached keys and values, read through
//! its block table. Pure f32 CPU code, parallel over tokens.
use super::batch::ForwardBatch;
use crate::engine::kv_cache::KvCache;
use rayon::prelude::*;

/// Precomputed cos/sin tables in the Hugging Face rotate-half convention.
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, max_positions: usize) -> Self {
        let half = head_dim / 2;
        // Same arithmetic as transformers: inv_freq = 1 / theta^(2i/d) in f32,
        // angle = position * inv_freq in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { half, cos, sin }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of every row in place: `x` is `[T, heads, head_dim]`.
    pub fn apply(&self, x: &mut [f32], positions: &[usize], heads: usize) {
        let hd = 2 * self.half;
        for (row, &pos) in x.chunks_exact_mut(heads * hd).zip(positions) {
            let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
            let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(self.half);
                for i in 0..self.half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}

/// Head layout of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Writes this step's keys and values into the cache (rows `[T, kv_heads * head_dim]`),
/// then computes causal attention for every query row; returns `[T, heads * head_dim]`.
pub fn paged_attention(
    batch: &ForwardBatch,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: &mut KvCache,
    shape: HeadShape,
) -> Vec<f32> {
    let kv_row = shape.num_kv_heads * shape.head_dim;
    for chunk in &batch.chunks {
        for i in 0..chunk.len {
            let t = chunk.start + i;
            let off = kv.slot_offset(&chunk.block_table, chunk.context_len + i);
            let lkv = kv.layer_mut(layer);
            lkv.k[off..off + kv_row].copy_from_slice(&k[t * kv_row..(t + 1) * kv_row]);
            lkv.v[off..off + kv_row].copy_from_slice(&v[t * kv_row..(t + 1) * kv_row]);
        }
    }
    let q_row = shape.num_heads * shape.head_dim;
    let mut out = vec![0f32; batch.tokens.len() * q_row];
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
    out
}

/// One query row (all heads) at position `pos` against cached positions `0..=pos`.
fn attend_one(
    q: &[f32],
    out: &mut [f32],
    pos: usize,
    table: &[u32],
    kv: &KvCache,
    layer: usize,
    shape: HeadShape,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features this copy was compiled for.
            unsafe { attend_one_avx2(q, out, pos, table, kv, layer, shape) };
            return;
        }
    }
    attend_one_generic(q, out, pos, table, kv, layer, shape);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_avx2(
    q: &[f32],
    out: &mut [f32],
    pos: usize,
    table: &[u32],
    kv: &KvCache,
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
    kv: &KvCache,
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

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler vectorises the loop.
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}
