//! Quantized linear layers for the CPU, computed on the blocks directly (llama.cpp's
//! approach): the weights stay 4 to 8 bits per value, the activations are quantized per
//! block of 32 to i16 ([`activation`]), and each output element is a sum over blocks of
//! integer dot products scaled in f32.
//!
//! At load a GGUF row of Q4_0, Q4_1, Q4_K (kind `U4`, 4-bit codes), Q8_0 (`S8`), Q5_K or
//! Q6_K (`U8`, one byte per code) is decoded ([`gguf`]) and repacked with 8 rows
//! interleaved per block of 32 values: for each group of 8 rows and each block, the 8
//! rows' scales (f16), then their codes arranged so that one 32-byte vector holds 4
//! consecutive codes of each of the 8 rows. Widened to i16, one `pmaddwd`/`vpdpwssd`
//! against 4 activation codes broadcast yields partial sums per row in adjacent 32-bit
//! lanes, with one horizontal add per block ([`x86`]).
//!
//! Invariants:
//! - **Batch invariance and ISA agreement.** For every output element the integer block
//!   sums are exact (i32), converted to f32 once (to nearest), and the f32 arithmetic
//!   that scales and adds them is one fixed chain
//!   over the blocks in order (`t = d*isum - m*xsum` per half, `acc += xs * t`, with
//!   fused multiply-adds), the same in the portable and every SIMD path. So a token's
//!   result is bit-identical whatever else is in the batch and whichever path ran.
//! - Scales are stored as f16: exact for Q4_0, Q4_1, Q8_0 (f16 in the file too); the
//!   k-quants' per-block products `d * sc` and `dmin * m` are rounded once to f16
//!   (relative 2^-11 each: at most about 1% of a 4-bit quantization step).
//! - Rows past `out` (padding to a group of 8) have zero scales and are never written out.
pub mod activation;
pub mod gguf;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::model::block_rows::BlockRows;
use crate::simd::{Isa, SharedMutPtr};
use activation::{ActivationRow, QuantizedActivations};
use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use gguf::{DecodedBlock, BLOCK};
use half::f16;
use rayon::prelude::*;

/// Rows interleaved per group.
pub const GROUP: usize = 8;

/// Tokens per tile of the SIMD kernels: each weight block is unpacked once per tile.
const TILE: usize = 4;

/// How the codes of a block are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit unsigned codes, one (d, m) per block: Q4_0, Q4_1, Q4_K.
    U4,
    /// i8 codes, one d per block: Q8_0.
    S8,
    /// Unsigned codes up to 63 in a byte, (d, m) per half block: Q5_K, Q6_K.
    U8,
}

impl QuantKind {
    /// Bytes of the scale header of one group-block.
    fn header_bytes(self) -> usize {
        match self {
            Self::U4 => 2 * GROUP * 2,
            Self::S8 => GROUP * 2,
            Self::U8 => 4 * GROUP * 2,
        }
    }

    /// Bytes of one group-block: the header and the codes of 8 rows x 32 values.
    pub fn group_block_bytes(self) -> usize {
        let codes = match self {
            Self::U4 => GROUP * BLOCK / 2,
            Self::S8 | Self::U8 => GROUP * BLOCK,
        };
        self.header_bytes() + codes
    }
}

/// A `[out, in]` weight in repacked blocks.
pub struct QuantWeight {
    kind: QuantKind,
    source: GgmlDType,
    out: usize,
    inp: usize,
    /// `ceil(out / 8)` groups of `inp / 32` group-blocks.
    data: Vec<u8>,
}

impl QuantWeight {
    /// Repacks GGUF rows; `None` if their type is not one the CPU computes on.
    pub fn from_block_rows(rows: &BlockRows) -> Result<Option<Self>> {
        let Some(kind) = gguf::kind_of(rows.dtype) else {
            return Ok(None);
        };
        let (out, inp) = (rows.rows, rows.cols);
        if !inp.is_multiple_of(BLOCK) {
            bail!("{out}x{inp} {:?}: rows are not whole blocks", rows.dtype);
        }
        let blocks = inp / BLOCK;
        let gbb = kind.group_block_bytes();
        let groups = out.div_ceil(GROUP);
        let mut data = vec![0u8; groups * blocks * gbb];
        let mut decoded = Vec::with_capacity(blocks);
        for r in 0..out {
            gguf::decode_row(rows.dtype, rows.row(r), &mut decoded)
                .with_context(|| format!("row {r}"))?;
            let group = &mut data[r / GROUP * blocks * gbb..(r / GROUP + 1) * blocks * gbb];
            for (b, block) in decoded.iter().enumerate() {
                pack(kind, r % GROUP, block, &mut group[b * gbb..(b + 1) * gbb]);
            }
        }
        Ok(Some(Self {
            kind,
            source: rows.dtype,
            out,
            inp,
            data,
        }))
    }

    pub fn in_features(&self) -> usize {
        self.inp
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    /// The GGUF type the blocks came from.
    pub fn source_dtype(&self) -> GgmlDType {
        self.source
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// `x: [t, in]` row-major -> `[t, out]`, on this CPU's best path ([`Isa::get`]).
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        self.matmul_on(x, t, Isa::get())
    }

    /// As [`Self::matmul`] on `isa` (at most what the CPU has).
    pub fn matmul_on(&self, x: &[f32], t: usize, isa: Isa) -> Vec<f32> {
        assert_eq!(x.len(), t * self.inp, "input is not [t, in]");
        debug_assert!(
            Isa::supported().contains(&isa),
            "{isa:?} is beyond this CPU"
        );
        let mut y = vec![0f32; t * self.out];
        if t == 0 {
            return y;
        }
        let acts = QuantizedActivations::quantize(x, self.inp);
        let groups = self.out.div_ceil(GROUP);
        let group_bytes = self.inp / BLOCK * self.kind.group_block_bytes();
        let y_ptr = SharedMutPtr::new(&mut y);
        let min_len = (groups / (4 * rayon::current_num_threads())).max(1);
        (0..groups)
            .into_par_iter()
            .with_min_len(min_len)
            .for_each(|g| {
                let group = &self.data[g * group_bytes..(g + 1) * group_bytes];
                let cols = GROUP.min(self.out - g * GROUP);
                let write = |tok: usize, acc: &[f32; GROUP]| {
                    // SAFETY: columns g*8..g*8+cols of every row belong to this task
                    // alone; `y` outlives the parallel loop.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(y_ptr.at(tok * self.out + g * GROUP), cols)
                    };
                    dst.copy_from_slice(&acc[..cols]);
                };
                let mut tok = 0;
                while tok + TILE <= t {
                    let xs: [ActivationRow; TILE] = std::array::from_fn(|k| acts.row(tok + k));
                    for (k, acc) in group_dots(self.kind, group, &xs, isa).iter().enumerate() {
                        write(tok + k, acc);
                    }
                    tok += TILE;
                }
                for tok in tok..t {
                    write(tok, &group_dots(self.kind, group, &[acts.row(tok)], isa)[0]);
                }
            });
        y
    }

    /// The values of row `r` (for embedding lookups and tests), as the kernels see them.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let gbb = self.kind.group_block_bytes();
        let blocks = self.inp / BLOCK;
        let group = &self.data[r / GROUP * blocks * gbb..];
        for (b, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let block = unpack(self.kind, r % GROUP, &group[b * gbb..(b + 1) * gbb]);
            for (i, v) in chunk.iter_mut().enumerate() {
                let code = match self.kind {
                    QuantKind::S8 => block.q[i] as i8 as f32,
                    _ => block.q[i] as f32,
                };
                *v = block.d[i / 16] * code - block.m[i / 16];
            }
        }
    }
}

fn put_f16(dst: &mut [u8], i: usize, v: f32) {
    dst[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn get_f16(src: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32()
}

/// Where code `i` (0..32) of row `r` (0..8) lives in the codes of a group-block, and
/// whether it is the high nibble (`U4` only).
fn code_position(kind: QuantKind, r: usize, i: usize) -> (usize, bool) {
    match kind {
        // Chunk c (32 bytes) holds codes 4c..4c+4 (low nibbles) and 16+4c.. (high).
        QuantKind::U4 => {
            let (high, k) = (i >= 16, i % 16);
            (32 * (k / 4) + 4 * r + k % 4, high)
        }
        // Chunk j (32 bytes) holds codes 4j..4j+4 of each row.
        QuantKind::S8 | QuantKind::U8 => (32 * (i / 4) + 4 * r + i % 4, false),
    }
}

/// Writes row `r` of one group-block.
fn pack(kind: QuantKind, r: usize, b: &DecodedBlock, dst: &mut [u8]) {
    let (header, codes) = dst.split_at_mut(kind.header_bytes());
    match kind {
        QuantKind::U4 => {
            put_f16(header, r, b.d[0]);
            put_f16(header, GROUP + r, b.m[0]);
        }
        QuantKind::S8 => put_f16(header, r, b.d[0]),
        QuantKind::U8 => {
            for h in 0..2 {
                put_f16(header, h * GROUP + r, b.d[h]);
                put_f16(header, (2 + h) * GROUP + r, b.m[h]);
            }
        }
    }
    for (i, &q) in b.q.iter().enumerate() {
        let (at, high) = code_position(kind, r, i);
        codes[at] |= if high { q << 4 } else { q };
    }
}

/// Reads row `r` of one group-block back.
fn unpack(kind: QuantKind, r: usize, src: &[u8]) -> DecodedBlock {
    let (header, codes) = src.split_at(kind.header_bytes());
    let mut b = DecodedBlock::default();
    match kind {
        QuantKind::U4 => {
            b.d = [get_f16(header, r); 2];
            b.m = [get_f16(header, GROUP + r); 2];
        }
        QuantKind::S8 => b.d = [get_f16(header, r); 2],
        QuantKind::U8 => {
            for h in 0..2 {
                b.d[h] = get_f16(header, h * GROUP + r);
                b.m[h] = get_f16(header, (2 + h) * GROUP + r);
            }
        }
    }
    for (i, q) in b.q.iter_mut().enumerate() {
        let (at, high) = code_position(kind, r, i);
        *q = match (kind, high) {
            (QuantKind::U4, true) => codes[at] >> 4,
            (QuantKind::U4, false) => codes[at] & 0x0F,
            _ => codes[at],
        };
    }
    b
}

/// The 8 outputs of one group for each of `N` tokens, on `isa`.
fn group_dots<const N: usize>(
    kind: QuantKind,
    group: &[u8],
    xs: &[ActivationRow; N],
    isa: Isa,
) -> [[f32; GROUP]; N] {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2Fma {
        return x86::group_dots(kind, group, xs, isa);
    }
    let _ = isa;
    std::array::from_fn(|k| group_dot_portable(kind, group, xs[k]))
}

/// The portable path: per block, the exact integer sums of each row, then the same f32
/// chain as the SIMD paths.
fn group_dot_portable(kind: QuantKind, group: &[u8], x: ActivationRow) -> [f32; GROUP] {
    let gbb = kind.group_block_bytes();
    let mut acc = [0f32; GROUP];
    for (b, block) in group.chunks_exact(gbb).enumerate() {
        let xq = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        let (xs, sums) = (x.scales[b], x.sums[b]);
        for (r, a) in acc.iter_mut().enumerate() {
            let w = unpack(kind, r, block);
            let dot = |range: std::ops::Range<usize>| -> f32 {
                let s: i32 = range
                    .map(|i| {
                        let code = match kind {
                            QuantKind::S8 => w.q[i] as i8 as i32,
                            _ => w.q[i] as i32,
                        };
                        code * xq[i] as i32
                    })
                    .sum();
                s as f32
            };
            let t = match kind {
                QuantKind::U4 => (-w.m[0]).mul_add(sums.all, w.d[0] * dot(0..BLOCK)),
                QuantKind::S8 => w.d[0] * dot(0..BLOCK),
                QuantKind::U8 => {
                    let t = (-w.m[0]).mul_add(sums.lo, w.d[0] * dot(0..16));
                    let t = w.d[1].mul_add(dot(16..BLOCK), t);
                    (-w.m[1]).mul_add(sums.hi, t)
                }
            };
            *a = xs.mul_add(t, *a);
        }
    }
    acc
}

#[cfg(test)]
mod tests;
