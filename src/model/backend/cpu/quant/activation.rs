//! Activations quantized for the integer dot products: each token row is cut into blocks
//! of 32 values, each stored as 16-bit codes with one f32 scale (`x ~ scale * q`, the
//! scale `max|x| / CODE_MAX`), plus the code sums of each half that the `- m` terms of
//! the weight blocks need. 16-bit codes (llama.cpp uses 8) keep the rounding of the
//! activations about 250 times below 8-bit's: with 8-bit codes greedy decoding of the
//! default model left f32 mode's path on 3 of 5 prompts.
//!
//! Each code is held twice: as an i16 (the AVX2 and portable paths) and split into two
//! signed bytes `q = 256 * hi + lo`, `lo` in -128..=127 (the VNNI path, whose byte
//! products take one signed operand). `CODE_MAX` is the largest `q` whose `hi` fits a
//! byte.
//!
//! Invariant: a row is quantized from its own values only, with one fixed arithmetic,
//! whatever the ISA or the batch, so the integer codes every kernel path sees for a
//! token are the same.
use super::gguf::BLOCK;
use rayon::prelude::*;

/// The largest code magnitude: `127 * 256 + 127`, so `hi` and `lo` are both bytes.
const CODE_MAX: f32 = 32639.0;

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
    lo: Vec<i8>,
    hi: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<BlockSums>,
}

/// One quantized token row.
#[derive(Clone, Copy)]
pub struct ActivationRow<'a> {
    /// `blocks * 32` codes.
    pub qs: &'a [i16],
    /// The codes split: `qs[i] = 256 * hi[i] + lo[i]`.
    pub lo: &'a [i8],
    pub hi: &'a [i8],
    pub scales: &'a [f32],
    pub sums: &'a [BlockSums],
}

impl QuantizedActivations {
    /// Quantizes `x: [rows, cols]` row-major (blocks in parallel when there are many).
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols));
        let mut qs = vec![0i16; x.len()];
        let mut lo = vec![0i8; x.len()];
        let mut hi = vec![0i8; x.len()];
        let (scales, sums) = x
            .par_chunks_exact(BLOCK)
            .zip(qs.par_chunks_exact_mut(BLOCK))
            .zip(lo.par_chunks_exact_mut(BLOCK))
            .zip(hi.par_chunks_exact_mut(BLOCK))
            .with_min_len(PARALLEL_BLOCKS)
            .map(|(((xb, qb), lb), hb)| quantize_block(xb, qb, lb, hb))
            .unzip();
        Self {
            blocks: cols / BLOCK,
            qs,
            lo,
            hi,
            scales,
            sums,
        }
    }

    /// Token row `t`.
    pub fn row(&self, t: usize) -> ActivationRow<'_> {
        let b = self.blocks;
        let codes = t * b * BLOCK..(t + 1) * b * BLOCK;
        ActivationRow {
            qs: &self.qs[codes.clone()],
            lo: &self.lo[codes.clone()],
            hi: &self.hi[codes],
            scales: &self.scales[t * b..(t + 1) * b],
            sums: &self.sums[t * b..(t + 1) * b],
        }
    }
}

/// Blocks one parallel task quantizes at least (2,048 values).
const PARALLEL_BLOCKS: usize = 64;

/// `1.5 * 2^23`: adding and subtracting it rounds an f32 below 2^22 in magnitude to the
/// nearest integer, ties to even (plain SSE2 arithmetic, where `f32::round` is a call).
const ROUNDING: f32 = 12_582_912.0;

/// One block: its codes (whole and split), scale and code sums.
fn quantize_block(x: &[f32], q: &mut [i16], lo: &mut [i8], hi: &mut [i8]) -> (f32, BlockSums) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / CODE_MAX;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (v, q) in x.iter().zip(q.iter_mut()) {
        let r = (v * inv + ROUNDING) - ROUNDING;
        // NaN (a non-finite row) becomes 0.
        let r = if r.is_nan() {
            0.0
        } else {
            r.clamp(-CODE_MAX, CODE_MAX)
        };
        // SAFETY: `r` is an integer (or 0) within i16's range, not NaN; the unchecked
        // conversion lets the loop vectorize where `as` would saturate element by element.
        *q = unsafe { r.to_int_unchecked::<i32>() } as i16;
    }
    for ((q, l), h) in q.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
        (*l, *h) = split(*q);
    }
    let half: i32 = q[..BLOCK / 2].iter().map(|c| *c as i32).sum();
    let all: i32 = q.iter().map(|c| *c as i32).sum();
    let sums = BlockSums {
        lo: half as f32,
        hi: (all - half) as f32,
        all: all as f32,
    };
    (scale, sums)
}

/// `q` (at most `CODE_MAX` in magnitude) as `(lo, hi)` with `q = 256 * hi + lo`.
fn split(q: i16) -> (i8, i8) {
    let lo = q as i8; // the low byte, two's complement
    (lo, ((q - lo as i16) >> 8) as i8)
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
        let extremes = [-1.0, 1.0, -0.99, 0.5, 0.0039, -0.0039].repeat(11);
        let a = QuantizedActivations::quantize(&extremes[..64], 64);
        let row = a.row(0);
        for i in 0..64 {
            assert_eq!(256 * row.hi[i] as i32 + row.lo[i] as i32, row.qs[i] as i32);
        }
        let mut with_nan = [0.5f32; 32];
        with_nan[3] = f32::NAN;
        let a = QuantizedActivations::quantize(&with_nan, 32);
        assert_eq!(a.row(0).qs[3], 0, "a NaN value's code is 0");
        assert_eq!(a.row(0).qs[4] as f32, CODE_MAX);
        for q in [
            -32639i16, -32638, -129, -128, -1, 0, 127, 128, 255, 256, 32639,
        ] {
            let (lo, hi) = split(q);
            assert_eq!(256 * hi as i16 + lo as i16, q, "{q}");
        }
        assert_eq!(zeros.row(0).scales[0], 0.0);
    }
}
