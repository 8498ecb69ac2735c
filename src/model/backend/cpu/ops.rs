//! Row-wise f32 operations of the CPU forward pass (RMS norm, SwiGLU, residual add,
//! rotary embeddings), each independent per token so results do not depend on the rest
//! of the batch.
use rayon::prelude::*;

/// Rows above which the element-wise work is split across threads.
const PARALLEL_ROWS: usize = 64;

/// `x / sqrt(mean(x^2) + eps) * weight`, per row of width `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let h = weight.len();
    let mut out = vec![0f32; x.len()];
    let norm_row = |(src, dst): (&[f32], &mut [f32])| {
        let sum2: f32 = src.iter().map(|v| v * v).sum();
        let scale = 1.0 / (sum2 / h as f32 + eps).sqrt();
        for ((d, s), w) in dst.iter_mut().zip(src).zip(weight) {
            *d = s * scale * w;
        }
    };
    if x.len() / h >= PARALLEL_ROWS {
        x.par_chunks(h)
            .zip(out.par_chunks_mut(h))
            .for_each(norm_row);
    } else {
        x.chunks(h).zip(out.chunks_mut(h)).for_each(norm_row);
    }
    out
}

/// SwiGLU: rows of `[gate | up]` (width `2 * i`) to `silu(gate) * up` (width `i`).
pub fn silu_mul(gate_up: &[f32], i: usize) -> Vec<f32> {
    gated(gate_up, i, |g| g / (1.0 + (-g).exp()))
}

/// GeGLU: rows of `[gate | up]` (width `2 * i`) to `gelu_tanh(gate) * up` (width `i`),
/// with PyTorch's tanh approximation in f32.
pub fn gelu_tanh_mul(gate_up: &[f32], i: usize) -> Vec<f32> {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    gated(gate_up, i, |g| {
        0.5 * g * (1.0 + (SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g)).tanh())
    })
}

/// Rows of `[gate | up]` (width `2 * i`) to `act(gate) * up` (width `i`).
fn gated(gate_up: &[f32], i: usize, act: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let rows = gate_up.len() / (2 * i);
    let mut out = vec![0f32; rows * i];
    let row = |(src, dst): (&[f32], &mut [f32])| {
        let (gate, up) = src.split_at(i);
        for ((d, &g), u) in dst.iter_mut().zip(gate).zip(up) {
            *d = act(g) * u;
        }
    };
    if rows >= PARALLEL_ROWS {
        gate_up
            .par_chunks(2 * i)
            .zip(out.par_chunks_mut(i))
            .for_each(row);
    } else {
        gate_up.chunks(2 * i).zip(out.chunks_mut(i)).for_each(row);
    }
    out
}

/// `x[row] += bias` for every row of width `bias.len()`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotates every head of every row of `x` (`[T, heads, 2 * half]`) in place, in the
/// Hugging Face rotate-half convention; row t uses row `positions[t]` of the `[_, half]`
/// tables `cos` and `sin`.
pub fn rope_in_place(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    half: usize,
    positions: &[usize],
    heads: usize,
) {
    let hd = 2 * half;
    for (row, &pos) in x.chunks_exact_mut(heads * hd).zip(positions) {
        let cos = &cos[pos * half..(pos + 1) * half];
        let sin = &sin[pos * half..(pos + 1) * half];
        for head in row.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn rms_norm_matches_candle() {
        let (t, h) = (70, 24);
        let x: Vec<f32> = (0..t * h)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let w: Vec<f32> = (0..h).map(|i| 0.5 + i as f32 / 10.0).collect();
        let ours = rms_norm(&x, &w, 1e-5);
        let xt = Tensor::from_vec(x, (t, h), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w, h, &Device::Cpu).unwrap();
        let theirs = candle_nn::ops::rms_norm(&xt, &wt, 1e-5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn silu_mul_matches_definition() {
        let i = 3;
        let gu = vec![0.0, 1.0, -2.0, 4.0, 5.0, 6.0];
        let out = silu_mul(&gu, i);
        let silu = |g: f32| g / (1.0 + (-g).exp());
        assert_eq!(
            out,
            vec![silu(0.0) * 4.0, silu(1.0) * 5.0, silu(-2.0) * 6.0]
        );
        // Parallel and serial paths agree exactly.
        let big: Vec<f32> = (0..200 * 2 * i)
            .map(|v| (v % 13) as f32 / 3.0 - 2.0)
            .collect();
        let par = silu_mul(&big, i);
        let serial: Vec<f32> = big.chunks(2 * i).flat_map(|r| silu_mul(r, i)).collect();
        assert_eq!(par, serial);
    }
}
