//! The AVX-512 VNNI path of the quantized group dot product: `vpdpbusd` on 512-bit
//! vectors, unsigned weight bytes against signed activation bytes.
//!
//! A 64-byte chunk of a group-block (see `super::pack`) holds, in 32-bit lane `r`, four
//! consecutive codes of row `r`; one `vpdpbusd` against four activation bytes broadcast
//! adds those four products to lane `r`, so each row's sum builds up in its own lane
//! with no horizontal adds. The 16-bit activation codes are split into bytes
//! (`q = 256 * hi + lo`, see `super::activation`), each multiplied separately and joined
//! exactly in i32: `(sum_hi << 8) + sum_lo`. `S8` codes are signed: they are flipped
//! to `w + 128` (a byte xor) and `128 * sum(q)` is subtracted after. All of it is exact
//! integer arithmetic (every sum below 2^31), so the block sums equal every other
//! path's; the f32 chain after them is the portable path's, lane by lane (lane `r` is
//! row `r` of the group). The kernels take a tile of `N` tokens: the codes of a block
//! are loaded and unpacked once for every token of the tile.
use super::activation::ActivationRow;
use super::{tile_blocks, QuantKind, TileOut, BLOCK, CHUNK, GROUP};
use crate::simd::Isa;
use std::arch::x86_64::*;

/// The 16 outputs of one group for each of `N` tokens, written to `out`.
pub(super) fn group_dots<const N: usize>(
    kind: QuantKind,
    group: &[u8],
    xs: &[ActivationRow; N],
    out: TileOut<N>,
    isa: Isa,
) {
    assert!(isa >= Isa::Avx512Vnni, "the VNNI path needs AVX-512 VNNI");
    let blocks = tile_blocks(kind, group, xs);
    // SAFETY: `isa` is at most what this CPU has (`Isa`'s invariant), so the features
    // each function enables are present; the group holds `blocks` whole group-blocks and
    // every row of `xs` at least `blocks` blocks (checked above); `out` is valid for its
    // columns (`TileOut`'s contract).
    unsafe {
        match kind {
            QuantKind::U4 | QuantKind::K4 => u4(kind, group, blocks, xs, out),
            QuantKind::S8 => s8(group, blocks, xs, out),
            QuantKind::U8 => u8(group, blocks, xs, out),
        }
    }
}

/// Stores each token's 16 lanes, the first `out.cols` of them.
///
/// # Safety
/// AVX-512 F is present; `out` is valid for its columns (`TileOut`'s contract).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn store<const N: usize>(out: TileOut<N>, acc: &[__m512; N]) {
    let mask = ((1u32 << out.cols) - 1) as __mmask16;
    for (dst, a) in out.ptrs.iter().zip(acc) {
        _mm512_mask_storeu_ps(*dst, mask, *a);
    }
}

/// Activation bytes `4j..4j+4` of a block, broadcast to every 32-bit lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn x4(bytes: *const i8, j: usize) -> __m512i {
    _mm512_set1_epi32((bytes.add(4 * j) as *const i32).read_unaligned())
}

/// Header vector `v` (16 f16 values) as f32 lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn header(p: *const u8, v: usize) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * GROUP * v) as *const __m256i))
}

/// Sixteen bytes at `p` as f32 lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn bytes_f32(p: *const u8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)))
}

/// Chunk `c` of the codes that start at `codes`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn chunk(codes: *const u8, c: usize) -> __m512i {
    _mm512_loadu_si512(codes.add(CHUNK * c) as *const _)
}

/// The exact sums over positions `4j..4j+4` for `j` in `quads` of `w[j]` (unsigned
/// bytes, 4 codes per row lane) times the activation codes of one block at `lo`/`hi`,
/// joined as `(sum_hi << 8) + sum_lo`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn block_sum(
    w: &[__m512i; 8],
    quads: std::ops::Range<usize>,
    lo: *const i8,
    hi: *const i8,
) -> __m512i {
    let (mut sum_lo, mut sum_hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    for j in quads {
        sum_lo = _mm512_dpbusd_epi32(sum_lo, w[j], x4(lo, j));
        sum_hi = _mm512_dpbusd_epi32(sum_hi, w[j], x4(hi, j));
    }
    _mm512_add_epi32(_mm512_slli_epi32::<8>(sum_hi), sum_lo)
}

/// Pointers to the split activation bytes of block `b` of `x`.
///
/// # Safety
/// `x` has more than `b` blocks.
#[inline]
unsafe fn bytes_of(x: &ActivationRow, b: usize) -> (*const i8, *const i8) {
    (x.lo.as_ptr().add(b * BLOCK), x.hi.as_ptr().add(b * BLOCK))
}

/// `U4` and `K4`: chunk `c`'s low nibbles are codes `4c..4c+4`, its high nibbles `16+4c..`.
///
/// # Safety
/// AVX-512 F/BW/VNNI, AVX2, FMA and F16C are present; `group` is whole group-blocks,
/// each row of `xs` has at least as many blocks, and `out` is valid for its columns.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn u4<const N: usize>(
    kind: QuantKind,
    group: &[u8],
    blocks: usize,
    xs: &[ActivationRow; N],
    out: TileOut<N>,
) {
    let mask = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let p = group.as_ptr().add(kind.block_offset(b));
        let codes = p.add(kind.header_bytes());
        let mut w = [_mm512_setzero_si512(); 8];
        for c in 0..4 {
            let v = chunk(codes, c);
            w[c] = _mm512_and_si512(v, mask);
            w[4 + c] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
        }
        let (d, m) = match kind {
            QuantKind::K4 => {
                // Exact: an f16 times a 6-bit integer.
                let sup = group.as_ptr().add(kind.super_offset(b));
                let d = _mm512_mul_ps(header(sup, 0), bytes_f32(p));
                (d, _mm512_mul_ps(header(sup, 1), bytes_f32(p.add(GROUP))))
            }
            _ => (header(p, 0), header(p, 1)),
        };
        for k in 0..N {
            let (lo, hi) = bytes_of(&xs[k], b);
            let s = xs[k].sums.get_unchecked(b);
            let t = _mm512_mul_ps(d, _mm512_cvtepi32_ps(block_sum(&w, 0..8, lo, hi)));
            let t = _mm512_fnmadd_ps(m, _mm512_set1_ps(s.all), t);
            let xscale = _mm512_set1_ps(*xs[k].scales.get_unchecked(b));
            acc[k] = _mm512_fmadd_ps(xscale, t, acc[k]);
        }
    }
    store(out, &acc);
}

/// `S8`: signed codes, flipped to `w + 128` for the unsigned operand.
///
/// # Safety
/// As for [`u4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn s8<const N: usize>(
    group: &[u8],
    blocks: usize,
    xs: &[ActivationRow; N],
    out: TileOut<N>,
) {
    let flip = _mm512_set1_epi8(i8::MIN);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let p = group.as_ptr().add(QuantKind::S8.block_offset(b));
        let codes = p.add(QuantKind::S8.header_bytes());
        let mut w = [_mm512_setzero_si512(); 8];
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = _mm512_xor_si512(chunk(codes, j), flip);
        }
        let d = header(p, 0);
        for k in 0..N {
            let (lo, hi) = bytes_of(&xs[k], b);
            // The code sum is an integer below 2^21, exact in f32.
            let bias = _mm512_set1_epi32(128 * xs[k].sums.get_unchecked(b).all as i32);
            let sum = _mm512_sub_epi32(block_sum(&w, 0..8, lo, hi), bias);
            let t = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sum));
            let xscale = _mm512_set1_ps(*xs[k].scales.get_unchecked(b));
            acc[k] = _mm512_fmadd_ps(xscale, t, acc[k]);
        }
    }
    store(out, &acc);
}

/// `U8`: byte codes, (d, m) per half of 16 values (chunks 0-3 and 4-7).
///
/// # Safety
/// As for [`u4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn u8<const N: usize>(
    group: &[u8],
    blocks: usize,
    xs: &[ActivationRow; N],
    out: TileOut<N>,
) {
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let p = group.as_ptr().add(QuantKind::U8.block_offset(b));
        let codes = p.add(QuantKind::U8.header_bytes());
        let mut w = [_mm512_setzero_si512(); 8];
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = chunk(codes, j);
        }
        let (d_lo, d_hi) = (header(p, 0), header(p, 1));
        let (m_lo, m_hi) = (header(p, 2), header(p, 3));
        for k in 0..N {
            let (lo, hi) = bytes_of(&xs[k], b);
            let s = xs[k].sums.get_unchecked(b);
            let first = _mm512_cvtepi32_ps(block_sum(&w, 0..4, lo, hi));
            let second = _mm512_cvtepi32_ps(block_sum(&w, 4..8, lo, hi));
            let t = _mm512_mul_ps(d_lo, first);
            let t = _mm512_fnmadd_ps(m_lo, _mm512_set1_ps(s.lo), t);
            let t = _mm512_fmadd_ps(d_hi, second, t);
            let t = _mm512_fnmadd_ps(m_hi, _mm512_set1_ps(s.hi), t);
            let xscale = _mm512_set1_ps(*xs[k].scales.get_unchecked(b));
            acc[k] = _mm512_fmadd_ps(xscale, t, acc[k]);
        }
    }
    store(out, &acc);
}
