//! The x86-64 paths of the quantized group dot product: AVX2 (`maddubs` + `madd`) and
//! AVX-512 VNNI (`vpdpbusd` on 256-bit vectors). Both compute the same exact i32 block
//! sums (no i16 saturation: codes are at most 63, or |128| for `S8` against activation
//! codes of at most |127|, so a pair stays under 32,767) and then the f32 chain of the
//! portable path, lane by lane: lane `r` of every vector is row `r` of the group.
//!
//! Layout read here (see `super::pack`): per group-block, the f16 header (`U4`: d[8],
//! m[8]; `S8`: d[8]; `U8`: d_lo[8], d_hi[8], m_lo[8], m_hi[8]) and the codes: 32-byte
//! chunks whose bytes `4r..4r+4` are four consecutive codes of row `r`.
use super::activation::ActivationRow;
use super::{QuantKind, BLOCK, GROUP};
use crate::simd::Isa;
use std::arch::x86_64::*;

/// The 8 outputs of one group for one token.
pub(super) fn group_dot(kind: QuantKind, group: &[u8], x: ActivationRow, isa: Isa) -> [f32; GROUP] {
    assert!(isa >= Isa::Avx2Fma, "x86 paths need AVX2");
    let blocks = group.len() / kind.group_block_bytes();
    assert!(x.qs.len() >= blocks * BLOCK && x.scales.len() >= blocks && x.sums.len() >= blocks);
    let mut out = [0f32; GROUP];
    let vnni = isa >= Isa::Avx512Vnni;
    // SAFETY: `isa` is at most what this CPU has (`Isa`'s invariant), so the features
    // each function enables are present; the group holds `blocks` whole group-blocks and
    // `x` at least `blocks` blocks (checked above).
    unsafe {
        match (kind, vnni) {
            (QuantKind::U4, false) => u4_avx2(group, x, &mut out),
            (QuantKind::U4, true) => u4_vnni(group, x, &mut out),
            (QuantKind::S8, false) => s8_avx2(group, x, &mut out),
            (QuantKind::S8, true) => s8_vnni(group, x, &mut out),
            (QuantKind::U8, false) => u8_avx2(group, x, &mut out),
            (QuantKind::U8, true) => u8_vnni(group, x, &mut out),
        }
    }
    out
}

/// `acc + sum over each 4 bytes of w (unsigned) * x (signed)`, per 32-bit lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(w, x);
    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// The same sums with one VNNI instruction.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn dot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, w, x)
}

/// Activation codes `4k..4k+4` of a block, broadcast to every lane.
#[inline(always)]
unsafe fn x4(xq: *const i8, k: usize) -> __m256i {
    _mm256_set1_epi32((xq.add(4 * k) as *const i32).read_unaligned())
}

/// Eight f16 values at `p` as f32 lanes.
#[inline(always)]
unsafe fn f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

macro_rules! group_kernels {
    ($features:literal, $dot:ident, $u4:ident, $s8:ident, $u8:ident) => {
        /// `U4`: per block, codes from 4 chunks (low nibbles: codes 4c.., high: 16+4c..).
        ///
        /// # Safety
        /// The enabled features are present; `group` is whole group-blocks and `x` has
        /// at least as many blocks.
        #[target_feature(enable = $features)]
        unsafe fn $u4(group: &[u8], x: ActivationRow, out: &mut [f32; GROUP]) {
            let mask = _mm256_set1_epi8(0x0F);
            let mut acc = _mm256_setzero_ps();
            let gbb = QuantKind::U4.group_block_bytes();
            for (b, blk) in group.chunks_exact(gbb).enumerate() {
                let p = blk.as_ptr();
                let xq = x.qs.as_ptr().add(b * BLOCK);
                let mut isum = _mm256_setzero_si256();
                for c in 0..4 {
                    let v = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
                    isum = $dot(isum, lo, x4(xq, c));
                    isum = $dot(isum, hi, x4(xq, 4 + c));
                }
                let s = x.sums.get_unchecked(b);
                let t = _mm256_mul_ps(f16x8(p), _mm256_cvtepi32_ps(isum));
                let t = _mm256_fnmadd_ps(f16x8(p.add(16)), _mm256_set1_ps(s.all), t);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(*x.scales.get_unchecked(b)), t, acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
        }

        /// `S8`: signed codes; |w| times x with w's sign moved onto x.
        ///
        /// # Safety
        /// As for the `U4` kernel.
        #[target_feature(enable = $features)]
        unsafe fn $s8(group: &[u8], x: ActivationRow, out: &mut [f32; GROUP]) {
            let mut acc = _mm256_setzero_ps();
            let gbb = QuantKind::S8.group_block_bytes();
            for (b, blk) in group.chunks_exact(gbb).enumerate() {
                let p = blk.as_ptr();
                let xq = x.qs.as_ptr().add(b * BLOCK);
                let mut isum = _mm256_setzero_si256();
                for j in 0..8 {
                    let w = _mm256_loadu_si256(p.add(16 + 32 * j) as *const __m256i);
                    let xs = _mm256_sign_epi8(x4(xq, j), w);
                    isum = $dot(isum, _mm256_abs_epi8(w), xs);
                }
                let t = _mm256_mul_ps(f16x8(p), _mm256_cvtepi32_ps(isum));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(*x.scales.get_unchecked(b)), t, acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
        }

        /// `U8`: byte codes, (d, m) per half of 16 values.
        ///
        /// # Safety
        /// As for the `U4` kernel.
        #[target_feature(enable = $features)]
        unsafe fn $u8(group: &[u8], x: ActivationRow, out: &mut [f32; GROUP]) {
            let mut acc = _mm256_setzero_ps();
            let gbb = QuantKind::U8.group_block_bytes();
            for (b, blk) in group.chunks_exact(gbb).enumerate() {
                let p = blk.as_ptr();
                let xq = x.qs.as_ptr().add(b * BLOCK);
                let mut lo = _mm256_setzero_si256();
                let mut hi = _mm256_setzero_si256();
                for j in 0..4 {
                    let w_lo = _mm256_loadu_si256(p.add(64 + 32 * j) as *const __m256i);
                    let w_hi = _mm256_loadu_si256(p.add(64 + 32 * (4 + j)) as *const __m256i);
                    lo = $dot(lo, w_lo, x4(xq, j));
                    hi = $dot(hi, w_hi, x4(xq, 4 + j));
                }
                let s = x.sums.get_unchecked(b);
                let t = _mm256_mul_ps(f16x8(p), _mm256_cvtepi32_ps(lo));
                let t = _mm256_fnmadd_ps(f16x8(p.add(32)), _mm256_set1_ps(s.lo), t);
                let t = _mm256_fmadd_ps(f16x8(p.add(16)), _mm256_cvtepi32_ps(hi), t);
                let t = _mm256_fnmadd_ps(f16x8(p.add(48)), _mm256_set1_ps(s.hi), t);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(*x.scales.get_unchecked(b)), t, acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
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
