//! Quantized linear layers for the CPU, computed on the blocks directly (llama.cpp's
//! approach): the weights stay 4 to 8 bits per value, the activations are quantized per
//! block of 32 to i16 ([`activation`]), and each output element is a sum over blocks of
//! integer dot products scaled in f32.
//!
//! At load a GGUF row of Q4_0, Q4_1 (kind `U4`, 4-bit codes), Q4_K (`K4`, 4-bit codes
//! under integer scales), Q8_0 (`S8`), Q5_K or Q6_K (`U8`, one byte per code) is decoded ([`gguf`]) and repacked with 16 rows
//! interleaved per block of 32 values: for each group of 16 rows and each block, the 16
//! rows' scales (f16), then their codes in 64-byte chunks whose 32-bit lane `r` holds 4
//! consecutive codes of row `r`. AVX-512 VNNI multiplies a chunk as it is by 4
//! activation bytes broadcast (`vpdpbusd`: each row's partial sum lands in its own
//! lane, [`avx512`]); AVX2 widens each half chunk (8 rows) to i16 for `pmaddwd`
//! ([`x86`]).
//!
//! Invariants:
//! - **Batch invariance and ISA agreement.** For every output element the integer block
//!   sums are exact (i32), converted to f32 once (to nearest), and the f32 arithmetic
//!   that scales and adds them is one fixed chain
//!   over the blocks in order (`t = d*isum - m*xsum` per half, `acc += xs * t`, with
//!   fused multiply-adds), the same in the portable and every SIMD path. So a token's
//!   result is bit-identical whatever else is in the batch and whichever path ran.
//! - Scales are exact for Q4_0, Q4_1, Q8_0 (f16 as in the file) and Q4_K (kind `K4`: its
//!   6-bit integer scales per block and f16 super-block scales as in the file, their
//!   products `d * sc` and `dmin * m` exact in f32, as ggml computes them); the other
//!   k-quants' products are rounded once to f16 (relative 2^-11 each: at most about 1%
//!   of a quantization step).
//! - Rows past `out` (padding to a group of 16) have zero scales and are never written out.
pub mod activation;
#[cfg(target_arch = "x86_64")]
mod avx512;
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
pub const GROUP: usize = 16;

/// Bytes of one chunk of codes: 4 bytes of each row of a group.
const CHUNK: usize = 4 * GROUP;

/// Tokens per tile of the SIMD kernels: each weight block is unpacked once per tile.
const TILE: usize = 4;

/// Blocks per k-quant super-block.
const SUPER: usize = 8;

/// How the codes of a block are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit unsigned codes, one (d, m) per block in f16: Q4_0, Q4_1.
    U4,
    /// 4-bit unsigned codes as `U4`, with one u8 (sc, m) per block and one f16
    /// (d, dmin) per super-block of 8 blocks, the block's scales being `d * sc` and
    /// `dmin * m`: Q4_K. The super-block header (`d[16]`, `dmin[16]`) precedes each
    /// run of 8 group-blocks.
    K4,
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
            Self::K4 => 2 * GROUP,
            Self::S8 => GROUP * 2,
            Self::U8 => 4 * GROUP * 2,
        }
    }

    /// Bytes of one group-block: the header and the codes of 16 rows x 32 values.
    pub fn group_block_bytes(self) -> usize {
        let codes = match self {
            Self::U4 | Self::K4 => GROUP * BLOCK / 2,
            Self::S8 | Self::U8 => GROUP * BLOCK,
        };
        self.header_bytes() + codes
    }

    /// Bytes of the header before each super-block's group-blocks (`K4` only).
    fn super_header_bytes(self) -> usize {
        match self {
            Self::K4 => 2 * GROUP * 2,
            _ => 0,
        }
    }

    /// Bytes of a group of `blocks` blocks per row (`K4`: a multiple of 8).
    fn group_bytes(self, blocks: usize) -> usize {
        blocks * self.group_block_bytes() + blocks / SUPER * self.super_header_bytes()
    }

    /// Where group-block `b` starts in its group.
    fn block_offset(self, b: usize) -> usize {
        let supers = match self {
            Self::K4 => b / SUPER + 1,
            _ => 0,
        };
        b * self.group_block_bytes() + supers * self.super_header_bytes()
    }

    /// Where the super-block header of group-block `b` starts in its group (`K4`).
    fn super_offset(self, b: usize) -> usize {
        b / SUPER * (SUPER * self.group_block_bytes() + self.super_header_bytes())
    }
}

/// A `[out, in]` weight in repacked blocks.
pub struct QuantWeight {
    kind: QuantKind,
    source: GgmlDType,
    out: usize,
    inp: usize,
    /// `ceil(out / 16)` groups of `inp / 32` group-blocks (and super-block headers).
    data: Vec<u8>,
}

impl QuantWeight {
    /// Repacks GGUF rows; `None` if their type is not one the CPU computes on.
    pub fn from_block_rows(rows: &BlockRows) -> Result<Option<Self>> {
        let Some(kind) = gguf::kind_of(rows.dtype) else {
            return Ok(None);
        };
        let (out, inp) = (rows.rows, rows.cols);
        if !inp.is_multiple_of(rows.dtype.block_size()) || !inp.is_multiple_of(BLOCK) {
            bail!("{out}x{inp} {:?}: rows are not whole blocks", rows.dtype);
        }
        let blocks = inp / BLOCK;
        let gbb = kind.group_block_bytes();
        let group_bytes = kind.group_bytes(blocks);
        let mut data = vec![0u8; out.div_ceil(GROUP) * group_bytes];
        let mut decoded = Vec::with_capacity(blocks);
        for r in 0..out {
            gguf::decode_row(rows.dtype, rows.row(r), &mut decoded)
                .with_context(|| format!("row {r}"))?;
            let group = &mut data[r / GROUP * group_bytes..(r / GROUP + 1) * group_bytes];
            for (b, block) in decoded.iter().enumerate() {
                let at = kind.block_offset(b);
                pack(kind, r % GROUP, block, &mut group[at..at + gbb]);
            }
            if kind == QuantKind::K4 {
                pack_k4_scales(r % GROUP, &gguf::q4k_scales(rows.row(r)), group);
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
        let group_bytes = self.kind.group_bytes(self.inp / BLOCK);
        let y_ptr = SharedMutPtr::new(&mut y);
        let min_len = (groups / (4 * rayon::current_num_threads())).max(1);
        (0..groups)
            .into_par_iter()
            .with_min_len(min_len)
            .for_each(|g| {
                let group = &self.data[g * group_bytes..(g + 1) * group_bytes];
                let cols = GROUP.min(self.out - g * GROUP);
                let dst = |tok: usize| y_ptr.at(tok * self.out + g * GROUP);
                let mut tok = 0;
                while tok + TILE <= t {
                    let xs: [ActivationRow; TILE] = std::array::from_fn(|k| acts.row(tok + k));
                    // SAFETY: columns g*16..g*16+cols of every row belong to this task
                    // alone; `y` outlives the parallel loop.
                    let out = unsafe { TileOut::new(std::array::from_fn(|k| dst(tok + k)), cols) };
                    group_dots(self.kind, group, &xs, out, isa);
                    tok += TILE;
                }
                for tok in tok..t {
                    // SAFETY: as above.
                    let out = unsafe { TileOut::new([dst(tok)], cols) };
                    group_dots(self.kind, group, &[acts.row(tok)], out, isa);
                }
            });
        y
    }

    /// The values of row `r` (for embedding lookups and tests), as the kernels see them.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let group_bytes = self.kind.group_bytes(self.inp / BLOCK);
        let group = &self.data[r / GROUP * group_bytes..(r / GROUP + 1) * group_bytes];
        for (b, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let block = unpack(self.kind, r % GROUP, group, b);
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

/// Where code `i` (0..32) of row `r` (0..16) lives in the codes of a group-block, and
/// whether it is the high nibble (`U4` only).
fn code_position(kind: QuantKind, r: usize, i: usize) -> (usize, bool) {
    match kind {
        // Chunk c holds codes 4c..4c+4 (low nibbles) and 16+4c.. (high).
        QuantKind::U4 | QuantKind::K4 => {
            let (high, k) = (i >= 16, i % 16);
            (CHUNK * (k / 4) + 4 * r + k % 4, high)
        }
        // Chunk j holds codes 4j..4j+4 of each row.
        QuantKind::S8 | QuantKind::U8 => (CHUNK * (i / 4) + 4 * r + i % 4, false),
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
        QuantKind::K4 => {} // integer scales: `pack_k4_scales`
    }
    for (i, &q) in b.q.iter().enumerate() {
        let (at, high) = code_position(kind, r, i);
        codes[at] |= if high { q << 4 } else { q };
    }
}

/// Writes row `r`'s Q4_K scales into its group: per super-block `d` and `dmin` (f16, as
/// in the file), per block `sc` and `m` (bytes).
fn pack_k4_scales(r: usize, scales: &[gguf::K4Scales], group: &mut [u8]) {
    let kind = QuantKind::K4;
    for (s, k) in scales.iter().enumerate() {
        let at = kind.super_offset(s * SUPER);
        put_f16(&mut group[at..], r, k.d);
        put_f16(&mut group[at..], GROUP + r, k.dmin);
        for j in 0..SUPER {
            let header = &mut group[kind.block_offset(s * SUPER + j)..];
            (header[r], header[GROUP + r]) = (k.sc[j], k.m[j]);
        }
    }
}

/// Reads row `r` (0..16) of group-block `b` of `group` back.
fn unpack(kind: QuantKind, r: usize, group: &[u8], b: usize) -> DecodedBlock {
    let at = kind.block_offset(b);
    let (header, codes) = group[at..at + kind.group_block_bytes()].split_at(kind.header_bytes());
    let mut out = DecodedBlock::default();
    match kind {
        QuantKind::U4 => {
            out.d = [get_f16(header, r); 2];
            out.m = [get_f16(header, GROUP + r); 2];
        }
        QuantKind::K4 => {
            // Exact products (an f16 times a 6-bit integer), as every path computes them.
            let sup = &group[kind.super_offset(b)..];
            out.d = [get_f16(sup, r) * header[r] as f32; 2];
            out.m = [get_f16(sup, GROUP + r) * header[GROUP + r] as f32; 2];
        }
        QuantKind::S8 => out.d = [get_f16(header, r); 2],
        QuantKind::U8 => {
            for h in 0..2 {
                out.d[h] = get_f16(header, h * GROUP + r);
                out.m[h] = get_f16(header, (2 + h) * GROUP + r);
            }
        }
    }
    for (i, q) in out.q.iter_mut().enumerate() {
        let (at, high) = code_position(kind, r, i);
        *q = match (kind, high) {
            (QuantKind::U4 | QuantKind::K4, true) => codes[at] >> 4,
            (QuantKind::U4 | QuantKind::K4, false) => codes[at] & 0x0F,
            _ => codes[at],
        };
    }
    out
}

/// Where the outputs of one group for a tile of `N` tokens go: the first `cols` (1 to
/// 16) of the group's values for token `k` at `ptrs[k]`.
#[derive(Clone, Copy)]
struct TileOut<const N: usize> {
    ptrs: [*mut f32; N],
    cols: usize,
}

impl<const N: usize> TileOut<N> {
    /// # Safety
    /// Each pointer is valid for writing `cols` f32 values, which nothing else reads or
    /// writes until the `TileOut` and its copies are gone.
    unsafe fn new(ptrs: [*mut f32; N], cols: usize) -> Self {
        debug_assert!((1..=GROUP).contains(&cols));
        Self { ptrs, cols }
    }

    /// Writes the first `cols` of `values` for token `k`.
    fn write(&self, k: usize, values: &[f32; GROUP]) {
        // SAFETY: `new`'s contract; `cols <= GROUP`.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptrs[k], self.cols) }
    }
}

/// The blocks per row of a tile: checks that `group` is whole group-blocks for the rows
/// of `xs` and that every row holds all of its codes (whole and split), scales and sums,
/// which the SIMD kernels then read without bounds checks.
fn tile_blocks<const N: usize>(kind: QuantKind, group: &[u8], xs: &[ActivationRow; N]) -> usize {
    let blocks = xs[0].scales.len();
    assert_eq!(
        group.len(),
        kind.group_bytes(blocks),
        "a group of {blocks} blocks"
    );
    let codes = blocks * BLOCK;
    for x in xs {
        assert!(x.qs.len() >= codes && x.lo.len() >= codes && x.hi.len() >= codes);
        assert!(x.scales.len() >= blocks && x.sums.len() >= blocks);
    }
    blocks
}

/// The 16 outputs of one group for each of `N` tokens, on `isa`, written to `out`.
fn group_dots<const N: usize>(
    kind: QuantKind,
    group: &[u8],
    xs: &[ActivationRow; N],
    out: TileOut<N>,
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni {
        return avx512::group_dots(kind, group, xs, out, isa);
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2Fma {
        return x86::group_dots(kind, group, xs, out, isa);
    }
    let _ = isa;
    for (k, x) in xs.iter().enumerate() {
        out.write(k, &group_dot_portable(kind, group, *x));
    }
}

/// The portable path: per block, the exact integer sums of each row, then the same f32
/// chain as the SIMD paths.
fn group_dot_portable(kind: QuantKind, group: &[u8], x: ActivationRow) -> [f32; GROUP] {
    let mut acc = [0f32; GROUP];
    for b in 0..x.scales.len() {
        let xq = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        let (xs, sums) = (x.scales[b], x.sums[b]);
        for (r, a) in acc.iter_mut().enumerate() {
            let w = unpack(kind, r, group, b);
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
                QuantKind::U4 | QuantKind::K4 => {
                    (-w.m[0]).mul_add(sums.all, w.d[0] * dot(0..BLOCK))
                }
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
