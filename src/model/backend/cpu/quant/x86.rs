//! The x86-64 paths of the quantized group dot product: AVX2 (`pmaddwd`) and AVX-512
//! VNNI (`vpdpwssd` on 256-bit vectors). Weight codes are widened to i16 and multiplied
//! by i16 activation codes; both paths compute the same exact i32 block sums, then the f32
//! chain of the portable path lane by lane: lane `r` of every f32 vector is row `r` of the
//! group.
//!
//! Layout read here (see `super::pack`): per group-block, the f16 header (`U4`: d[8],
//! m[8]; `S8`: d[8]; `U8`: d_lo[8], d_hi[8], m_lo[8], m_hi[8]) and the codes: 32-byte
//! chunks whose bytes `4r..4r+4` are four consecutive codes of row `r`. Widened, the low
//! 16 bytes (rows 0-3) and the high 16 (rows 4-7) each give 16 i16; `pmaddwd` against the
//! 4 activation codes broadcast leaves each row's sum in two adjacent i32 lanes, and one
//! `phaddd` plus a lane permute per block puts row `r`'s sum in lane `r`. The kernels
//! take a tile of `N` tokens: each chunk of codes is widened once and multiplied by the
//! activations of every token of the tile (the widening costs about as much as the
//! products, so a tile of 4 roughly halves a batch's work).
use super::activation::ActivationRow;
use super::{QuantKind, BLOCK, GROUP};
use crate::simd::Isa;
use std::arch::x86_64::*;

/// The 8 outputs of one group for each of `N` tokens: the weight codes of a block are
/// widened once and used for every token of the tile.
pub(super) fn group_dots<const N: usize>(
    kind: QuantKind,
    group: &[u8],
    xs: &[ActivationRow; N],
    isa: Isa,
) -> [[f32; GROUP]; N] {
    assert!(isa >= Isa::Avx2Fma, "x86 paths need AVX2");
    let blocks = group.len() / kind.group_block_bytes();
    for x in xs {
        assert!(x.qs.len() >= blocks * BLOCK && x.scales.len() >= blocks && x.sums.len() >= blocks);
    }
    let mut out = [[0f32; GROUP]; N];
    let vnni = isa >= Isa::Avx512Vnni;
    // SAFETY: `isa` is at most what this CPU has (`Isa`'s invariant), so the features
    // each function enables are present; the group holds `blocks` whole group-blocks and
    // every row of `xs` at least `blocks` blocks (checked above).
    unsafe {
        match (kind, vnni) {
            (QuantKind::U4, false) => u4_avx2(group, xs, &mut out),
            (QuantKind::U4, true) => u4_vnni(group, xs, &mut out),
            (QuantKind::S8, false) => s8_avx2(group, xs, &mut out),
            (QuantKind::S8, true) => s8_vnni(group, xs, &mut out),
            (QuantKind::U8, false) => u8_avx2(group, xs, &mut out),
            (QuantKind::U8, true) => u8_vnni(group, xs, &mut out),
        }
    }
    out
}

/// `acc + (pairwise sums of w * x)`, per 32-bit lane (i16 inputs).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
}

/// The same sums with one VNNI instruction.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn dot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, w, x)
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

macro_rules! group_kernels {
    ($features:literal, $dot:ident, $u4:ident, $s8:ident, $u8:ident) => {
        /// `U4`: per block, codes from 4 chunks (low nibbles: codes 4c.., high: 16+4c..).
        ///
        /// # Safety
        /// The enabled features are present; `group` is whole group-blocks and each row
        /// of `xs` has at least as many blocks.
        #[target_feature(enable = $features)]
        unsafe fn $u4<const N: usize>(
            group: &[u8],
            xs: &[ActivationRow; N],
            out: &mut [[f32; GROUP]; N],
        ) {
            let mask = _mm256_set1_epi8(0x0F);
            let zero = _mm256_setzero_si256();
            let mut acc = [_mm256_setzero_ps(); N];
            let gbb = QuantKind::U4.group_block_bytes();
            for (b, blk) in group.chunks_exact(gbb).enumerate() {
                let p = blk.as_ptr();
                let (mut sa, mut sb) = ([zero; N], [zero; N]);
                for c in 0..4 {
                    let v = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
                    let (lo_a, lo_b) = widen_u8(_mm256_and_si256(v, mask));
                    let (hi_a, hi_b) = widen_u8(_mm256_and_si256(_mm256_srli_epi16::<4>(v), mask));
                    for k in 0..N {
                        let xq = xs[k].qs.as_ptr().add(b * BLOCK);
                        let (xl, xh) = (x4(xq, c), x4(xq, 4 + c));
                        sa[k] = $dot($dot(sa[k], lo_a, xl), hi_a, xh);
                        sb[k] = $dot($dot(sb[k], lo_b, xl), hi_b, xh);
                    }
                }
                let (d, m) = (f16x8(p), f16x8(p.add(16)));
                for k in 0..N {
                    let s = xs[k].sums.get_unchecked(b);
                    let t = _mm256_mul_ps(d, row_sums(sa[k], sb[k]));
                    let t = _mm256_fnmadd_ps(m, _mm256_set1_ps(s.all), t);
                    let xscale = _mm256_set1_ps(*xs[k].scales.get_unchecked(b));
                    acc[k] = _mm256_fmadd_ps(xscale, t, acc[k]);
                }
            }
            for k in 0..N {
                _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k]);
            }
        }

        /// `S8`: signed codes.
        ///
        /// # Safety
        /// As for the `U4` kernel.
        #[target_feature(enable = $features)]
        unsafe fn $s8<const N: usize>(
            group: &[u8],
            xs: &[ActivationRow; N],
            out: &mut [[f32; GROUP]; N],
        ) {
            let zero = _mm256_setzero_si256();
            let mut acc = [_mm256_setzero_ps(); N];
            let gbb = QuantKind::S8.group_block_bytes();
            for (b, blk) in group.chunks_exact(gbb).enumerate() {
                let p = blk.as_ptr();
                let (mut sa, mut sb) = ([zero; N], [zero; N]);
                for j in 0..8 {
                    let w = _mm256_loadu_si256(p.add(16 + 32 * j) as *const __m256i);
                    let (wa, wb) = widen_i8(w);
                    for k in 0..N {
                        let xj = x4(xs[k].qs.as_ptr().add(b * BLOCK), j);
                        sa[k] = $dot(sa[k], wa, xj);
                        sb[k] = $dot(sb[k], wb, xj);
                    }
                }
                let d = f16x8(p);
                for k in 0..N {
                    let t = _mm256_mul_ps(d, row_sums(sa[k], sb[k]));
                    let xscale = _mm256_set1_ps(*xs[k].scales.get_unchecked(b));
                    acc[k] = _mm256_fmadd_ps(xscale, t, acc[k]);
                }
            }
            for k in 0..N {
                _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k]);
            }
        }

        /// `U8`: byte codes, (d, m) per half of 16 values.
        ///
        /// # Safety
        /// As for the `U4` kernel.
        #[target_feature(enable = $features)]
        unsafe fn $u8<const N: usize>(
            group: &[u8],
            xs: &[ActivationRow; N],
            out: &mut [[f32; GROUP]; N],
        ) {
            let zero = _mm256_setzero_si256();
            let mut acc = [_mm256_setzero_ps(); N];
            let gbb = QuantKind::U8.group_block_bytes();
            for (b, blk) in group.chunks_exact(gbb).enumerate() {
                let p = blk.as_ptr();
                let (mut lo_a, mut lo_b) = ([zero; N], [zero; N]);
                let (mut hi_a, mut hi_b) = ([zero; N], [zero; N]);
                for j in 0..4 {
                    let w_lo = _mm256_loadu_si256(p.add(64 + 32 * j) as *const __m256i);
                    let w_hi = _mm256_loadu_si256(p.add(64 + 32 * (4 + j)) as *const __m256i);
                    let ((la, lb), (ha, hb)) = (widen_u8(w_lo), widen_u8(w_hi));
                    for k in 0..N {
                        let xq = xs[k].qs.as_ptr().add(b * BLOCK);
                        let (xl, xh) = (x4(xq, j), x4(xq, 4 + j));
                        lo_a[k] = $dot(lo_a[k], la, xl);
                        lo_b[k] = $dot(lo_b[k], lb, xl);
                        hi_a[k] = $dot(hi_a[k], ha, xh);
                        hi_b[k] = $dot(hi_b[k], hb, xh);
                    }
                }
                let (d_lo, d_hi) = (f16x8(p), f16x8(p.add(16)));
                let (m_lo, m_hi) = (f16x8(p.add(32)), f16x8(p.add(48)));
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
            for k in 0..N {
                _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k]);
            }
        }
    };
}

group_kernels!("avx2,fma,f16c", dot_avx2, u4_avx2, s8_avx2, u8_avx2);
group_kernels!(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_vnni,
    u4_vnni,
    s8_vnni,
    u8_vnni
);
