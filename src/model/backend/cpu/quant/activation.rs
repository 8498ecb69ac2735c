//! Activations quantized for the integer dot products: each token row is cut into blocks
//! of 32 values, each stored as i16 codes with one f32 scale (`x ~ scale * q`, the scale
//! `max|x| / 32767`), plus the code sums of each half that the `- m` terms of the weight
//! blocks need. 16-bit codes (llama.cpp uses 8) keep the rounding of the activations
//! about 250 times below 8-bit's: with 8-bit codes greedy decoding of the default model
//! left f32 mode's path on 3 of 5 prompts.
//!
//! Invariant: a row is quantized from its own values only, with one fixed arithmetic,
//! whatever the ISA or the batch, so the integer codes every kernel path sees for a
//! token are the same.
use super::gguf::BLOCK;

/// The largest code magnitude.
const CODE_MAX: f32 = 32767.0;

/// The code sums of one block: values 0..16, 16..32, and all 32 (exact in f32).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockSums {
    pub lo: f32,
    pub hi: f32,
    pub all: f32,
}

/// `rows` token rows of `cols` values (`cols` a multiple of 32), quantized.
pub struct QuantizedActivations {
    blocks: usize,
    qs: Vec<i16>,
    scales: Vec<f32>,
    sums: Vec<BlockSums>,
}

/// One quantized token row.
#[derive(Clone, Copy)]
pub struct ActivationRow<'a> {
    /// `blocks * 32` codes.
    pub qs: &'a [i16],
    pub scales: &'a [f32],
    pub sums: &'a [BlockSums],
}

impl QuantizedActivations {
    /// Quantizes `x: [rows, cols]` row-major.
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols));
        let n_blocks = x.len() / BLOCK;
        let mut qs = vec![0i16; x.len()];
        let mut scales = Vec::with_capacity(n_blocks);
        let mut sums = Vec::with_capacity(n_blocks);
        for (xb, qb) in x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / CODE_MAX;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let (mut lo, mut hi) = (0i32, 0i32);
            for (i, (v, q)) in xb.iter().zip(qb.iter_mut()).enumerate() {
                *q = (v * inv).round().clamp(-CODE_MAX, CODE_MAX) as i16;
                if i < BLOCK / 2 {
                    lo += *q as i32;
                } else {
                    hi += *q as i32;
                }
            }
            scales.push(scale);
            sums.push(BlockSums {
                lo: lo as f32,
                hi: hi as f32,
                all: (lo + hi) as f32,
            });
        }
        Self {
            blocks: cols / BLOCK,
            qs,
            scales,
            sums,
        }
    }

    /// Token row `t`.
    pub fn row(&self, t: usize) -> ActivationRow<'_> {
        let b = self.blocks;
        ActivationRow {
            qs: &self.qs[t * b * BLOCK..(t + 1) * b * BLOCK],
            scales: &self.scales[t * b..(t + 1) * b],
            sums: &self.sums[t * b..(t + 1) * b],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_reconstruct_the_row_and_sum_per_half() {
        let x = crate::rng::test_data(2 * 64, 3);
        let a = QuantizedActivations::quantize(&x, 64);
        for t in 0..2 {
            let row = a.row(t);
            for (i, v) in x[t * 64..(t + 1) * 64].iter().enumerate() {
                let back = row.scales[i / BLOCK] * row.qs[i] as f32;
                assert!((back - v).abs() <= row.scales[i / BLOCK] * 0.5 + 1e-7);
            }
            let s = row.sums[1];
            let lo: i32 = row.qs[32..48].iter().map(|q| *q as i32).sum();
            assert_eq!(s.lo, lo as f32);
            assert_eq!(s.all, s.lo + s.hi);
        }
        let zeros = QuantizedActivations::quantize(&[0.0; 32], 32);
        assert_eq!(zeros.row(0).scales[0], 0.0);
    }
}
