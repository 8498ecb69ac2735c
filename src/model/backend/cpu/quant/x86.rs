//! The AVX2 path of the quantized group dot product (`pmaddwd`). Weight codes are
//! widened to i16 and multiplied by i16 activation codes; it computes the same exact
//! i32 block sums as every path, then the f32 chain of the portable path lane by lane.
//!
//! Layout read here (see `super::pack`): per group-block, the f16 header (vectors of 16
//! values: `U4`: d, m; `S8`: d; `U8`: d_lo, d_hi, m_lo, m_hi; `K4`: 16 bytes sc and 16
//! bytes m instead, times its super-block's f16 d and dmin) and the codes: 64-byte
//! chunks whose bytes `4r..4r+4` are four consecutive codes of row `r`. A group is
//! computed as two halves of 8 rows (32 bytes of each chunk, 8 values of each header
//! vector); lane `r` of every f32 vector is row `8h + r`. Widened, the low 16 bytes of
//! a half chunk (rows 0-3) and the high 16 (rows 4-7) each give 16 i16; `pmaddwd`
//! against the 4 activation codes broadcast leaves each row's sum in two adjacent i32
//! lanes, and one `phaddd` plus a lane permute per block puts row `r`'s sum in lane
//! `r`. The kernels take a tile of `N` tokens: each chunk of codes is widened once and
//! multiplied by the activations of every token of the tile (the widening costs about
//! as much as the products, so a tile of 4 roughly halves a batch's work).
use super::activation::ActivationRow;
use super::{tile_blocks, QuantKind, TileOut, BLOCK, CHUNK, GROUP};
use crate::simd::Isa;
use std::arch::x86_64::*;

/// Rows per half group.
const HALF: usize = GROUP / 2;

/// The 16 outputs of one group for each of `N` tokens, written to `out`: the weight
/// codes of a block are widened once and used for every token of the tile.
pub(super) fn group_dots<const N: usize>(
    kind: QuantKind,
    group: &[u8],
    xs: &[ActivationRow; N],
    out: TileOut<N>,
    isa: Isa,
) {
    assert!(isa >= Isa::Avx2Fma, "the AVX2 path needs AVX2");
    let blocks = tile_blocks(kind, group, xs);
    // SAFETY: `isa` is at most what this CPU has (`Isa`'s invariant), so the features
    // each function enables are present; the group holds `blocks` whole group-blocks and
    // every row of `xs` at least `blocks` blocks (checked above); `out` is valid for its
    // columns (`TileOut`'s contract).
    unsafe {
        for h in 0..2 {
            match kind {
                QuantKind::U4 | QuantKind::K4 => u4_avx2(kind, group, blocks, xs, h, out),
                QuantKind::S8 => s8_avx2(group, blocks, xs, h, out),
                QuantKind::U8 => u8_avx2(group, blocks, xs, h, out),
            }
        }
    }
}

/// Stores each token's 8 lanes as columns `8h..8h + 8`, those below `out.cols`.
///
/// # Safety
/// AVX is present; `out` is valid for its columns (`TileOut`'s contract).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store<const N: usize>(out: TileOut<N>, h: usize, acc: &[__m256; N]) {
    let n = out.cols.saturating_sub(HALF * h).min(HALF);
    for (ptr, a) in out.ptrs.iter().zip(acc) {
        let dst = ptr.add(HALF * h);
        if n == HALF {
            _mm256_storeu_ps(dst, *a);
        } else if n > 0 {
            let mut lanes = [0f32; HALF];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n);
        }
    }
}

/// `acc + (pairwise sums of w * x)`, per 32-bit lane (i16 inputs).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
}

/// Activation codes `4k..4k+4` of a block (four i16), broadcast to every 64-bit lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn x4(xq: *const i16, k: usize) -> __m256i {
    _mm256_set1_epi64x((xq.add(4 * k) as *const i64).read_unaligned())
}

/// Eight f16 values at `p` as f32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Rows 0-3 and 4-7 of a 32-byte chunk of unsigned codes, widened to i16.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_u8(v: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)),
        _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(v)),
    )
}

/// As [`widen_u8`] for signed codes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_i8(v: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)),
        _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(v)),
    )
}

/// Row sums in lane order: `a` holds rows 0-3 and `b` rows 4-7, each row in two adjacent
/// lanes; the result's lane `r` is row `r`'s sum, as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn row_sums(a: __m256i, b: __m256i) -> __m256 {
    // hadd: [r0 r1 r4 r5 | r2 r3 r6 r7]; 64-bit lanes 0, 2, 1, 3 restore the order.
    let h = _mm256_hadd_epi32(a, b);
    _mm256_cvtepi32_ps(_mm256_permute4x64_epi64::<0b11_01_10_00>(h))
}

/// Eight f16 values of header vector `v` (16 values each) for half `h` of the group.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn header(p: *const u8, v: usize, h: usize) -> __m256 {
    f16x8(p.add(2 * (GROUP * v + HALF * h)))
}

/// Eight bytes at `p` as f32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bytes_f32(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// Half `h` (32 bytes) of chunk `c` of the codes that start at `codes`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn half_chunk(codes: *const u8, c: usize, h: usize) -> __m256i {
    _mm256_loadu_si256(codes.add(CHUNK * c + 32 * h) as *const __m256i)
}

/// `U4` and `K4`: per block, codes from 4 chunks (low nibbles: codes 4c.., high: 16+4c..), for
/// rows `8h..8h + 8`.
///
/// # Safety
/// AVX2, FMA and F16C are present; `group` is whole group-blocks, each row of `xs` has
/// at least as many blocks, and `out` is valid for its columns.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn u4_avx2<const N: usize>(
    kind: QuantKind,
    group: &[u8],
    blocks: usize,
    xs: &[ActivationRow; N],
    h: usize,
    out: TileOut<N>,
) {
    let mask = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..blocks {
        let p = group.as_ptr().add(kind.block_offset(b));
        let codes = p.add(kind.header_bytes());
        let (mut sa, mut sb) = ([zero; N], [zero; N]);
        for c in 0..4 {
            let v = half_chunk(codes, c, h);
            let (lo_a, lo_b) = widen_u8(_mm256_and_si256(v, mask));
            let (hi_a, hi_b) = widen_u8(_mm256_and_si256(_mm256_srli_epi16::<4>(v), mask));
            for k in 0..N {
                let xq = xs[k].qs.as_ptr().add(b * BLOCK);
                let (xl, xh) = (x4(xq, c), x4(xq, 4 + c));
                sa[k] = dot(dot(sa[k], lo_a, xl), hi_a, xh);
                sb[k] = dot(dot(sb[k], lo_b, xl), hi_b, xh);
            }
        }
        let (d, m) = match kind {
            QuantKind::K4 => {
                // Exact: an f16 times a 6-bit integer.
                let sup = group.as_ptr().add(kind.super_offset(b));
                let d = _mm256_mul_ps(header(sup, 0, h), bytes_f32(p.add(HALF * h)));
                let m = header(sup, 1, h);
                (d, _mm256_mul_ps(m, bytes_f32(p.add(GROUP + HALF * h))))
            }
            _ => (header(p, 0, h), header(p, 1, h)),
        };
        for k in 0..N {
            let s = xs[k].sums.get_unchecked(b);
            let t = _mm256_mul_ps(d, row_sums(sa[k], sb[k]));
            let t = _mm256_fnmadd_ps(m, _mm256_set1_ps(s.all), t);
            let xscale = _mm256_set1_ps(*xs[k].scales.get_unchecked(b));
            acc[k] = _mm256_fmadd_ps(xscale, t, acc[k]);
        }
    }
    store(out, h, &acc);
}

/// `S8`: signed codes, for rows `8h..8h + 8`.
///
/// # Safety
/// As for [`u4_avx2`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn s8_avx2<const N: usize>(
    group: &[u8],
    blocks: usize,
    xs: &[ActivationRow; N],
    h: usize,
    out: TileOut<N>,
) {
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..blocks {
        let p = group.as_ptr().add(QuantKind::S8.block_offset(b));
        let codes = p.add(QuantKind::S8.header_bytes());
        let (mut sa, mut sb) = ([zero; N], [zero; N]);
        for j in 0..8 {
            let (wa, wb) = widen_i8(half_chunk(codes, j, h));
            for k in 0..N {
                let xj = x4(xs[k].qs.as_ptr().add(b * BLOCK), j);
                sa[k] = dot(sa[k], wa, xj);
                sb[k] = dot(sb[k], wb, xj);
            }
        }
        let d = header(p, 0, h);
        for k in 0..N {
            let t = _mm256_mul_ps(d, row_sums(sa[k], sb[k]));
            let xscale = _mm256_set1_ps(*xs[k].scales.get_unchecked(b));
            acc[k] = _mm256_fmadd_ps(xscale, t, acc[k]);
        }
    }
    store(out, h, &acc);
}

/// `U8`: byte codes, (d, m) per half of 16 values, for rows `8h..8h + 8`.
///
/// # Safety
/// As for [`u4_avx2`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn u8_avx2<const N: usize>(
    group: &[u8],
    blocks: usize,
    xs: &[ActivationRow; N],
    h: usize,
    out: TileOut<N>,
) {
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..blocks {
        let p = group.as_ptr().add(QuantKind::U8.block_offset(b));
        let codes = p.add(QuantKind::U8.header_bytes());
        let (mut lo_a, mut lo_b) = ([zero; N], [zero; N]);
        let (mut hi_a, mut hi_b) = ([zero; N], [zero; N]);
        for j in 0..4 {
            let (la, lb) = widen_u8(half_chunk(codes, j, h));
            let (ha, hb) = widen_u8(half_chunk(codes, 4 + j, h));
            for k in 0..N {
                let xq = xs[k].qs.as_ptr().add(b * BLOCK);
                let (xl, xh) = (x4(xq, j), x4(xq, 4 + j));
                lo_a[k] = dot(lo_a[k], la, xl);
                lo_b[k] = dot(lo_b[k], lb, xl);
                hi_a[k] = dot(hi_a[k], ha, xh);
                hi_b[k] = dot(hi_b[k], hb, xh);
            }
        }
        let (d_lo, d_hi) = (header(p, 0, h), header(p, 1, h));
        let (m_lo, m_hi) = (header(p, 2, h), header(p, 3, h));
        for k in 0..N {
            let s = xs[k].sums.get_unchecked(b);
            let t = _mm256_mul_ps(d_lo, row_sums(lo_a[k], lo_b[k]));
            let t = _mm256_fnmadd_ps(m_lo, _mm256_set1_ps(s.lo), t);
            let t = _mm256_fmadd_ps(d_hi, row_sums(hi_a[k], hi_b[k]), t);
            let t = _mm256_fnmadd_ps(m_hi, _mm256_set1_ps(s.hi), t);
            let xscale = _mm256_set1_ps(*xs[k].scales.get_unchecked(b));
            acc[k] = _mm256_fmadd_ps(xscale, t, acc[k]);
        }
    }
    store(out, h, &acc);
}
