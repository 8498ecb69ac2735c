//! The AVX2/FMA tiles of the CPU LoRA kernels (x86_64; callers check the CPU first).
//! The adapter matrices (`A`, `B`) are read as stored (f32 or bf16, widened exactly in
//! registers); activations, `h` and `y` are f32.
//!
//! Invariant: every output element is one fixed chain whatever the tile. Shrink: 8
//! lane-wise FMA chains along `in`, in order, then `hsum`. Expand: one scalar FMA chain
//! along the rank, in order. So a token's delta does not depend on the batch (tile sizes,
//! SGMV vs BGMV, thread split).
use crate::simd::avx2::{hsum, mask};
use crate::simd::Widen;
use std::arch::x86_64::*;

/// `h[m][r] = scale[m] * sum_i x[m][i] * A[r][i]` for M tokens x R rank rows.
///
/// # Safety
/// AVX2/FMA present; each `x[m]` has n readable values, A has R rows of n readable
/// values at stride n, each `h[m]` has R writable values no other thread touches.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn shrink_tile<const M: usize, const R: usize, E: Widen>(
    x: &[*const f32; M],
    a: *const E,
    n: usize,
    h: &[*mut f32; M],
    scale: &[f32; M],
) {
    let mut acc = [[_mm256_setzero_ps(); R]; M];
    let mut av = [_mm256_setzero_ps(); R];
    let mut i = 0;
    while i + 8 <= n {
        for (r, v) in av.iter_mut().enumerate() {
            *v = E::load8(a.add(r * n + i));
        }
        for (accm, xm) in acc.iter_mut().zip(x) {
            let xv = _mm256_loadu_ps(xm.add(i));
            for (ac, v) in accm.iter_mut().zip(&av) {
                *ac = _mm256_fmadd_ps(xv, *v, *ac);
            }
        }
        i += 8;
    }
    if i < n {
        let mk = mask(n - i);
        for (r, v) in av.iter_mut().enumerate() {
            *v = E::load_partial(a.add(r * n + i), n - i);
        }
        for (accm, xm) in acc.iter_mut().zip(x) {
            let xv = _mm256_maskload_ps(xm.add(i), mk);
            for (ac, v) in accm.iter_mut().zip(&av) {
                *ac = _mm256_fmadd_ps(xv, *v, *ac);
            }
        }
    }
    for ((accm, hm), s) in acc.iter().zip(h).zip(scale) {
        for (r, ac) in accm.iter().enumerate() {
            *hm.add(r) = hsum(*ac) * s;
        }
    }
}

/// Columns `k0..k0 + n` (n <= 8) of `rows` (<= 8) rows of B (row length r), transposed:
/// lane j of `out[k]` is `B[j][k0 + k]`, zero for j >= rows or k >= n.
///
/// # Safety
/// AVX2/FMA present; `rows <= 8`, `n <= 8`; each of the `rows` rows of B has `k0 + n`
/// readable values at `b + j * r`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_bt8<E: Widen>(
    b: *const E,
    r: usize,
    rows: usize,
    k0: usize,
    n: usize,
) -> [__m256; 8] {
    let mut v = [_mm256_setzero_ps(); 8];
    for (j, vj) in v.iter_mut().enumerate().take(rows) {
        let p = b.add(j * r + k0);
        *vj = if n == 8 {
            E::load8(p)
        } else {
            E::load_partial(p, n)
        };
    }
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// `y[m][j] += sum_k h[m][k] * B[j][k]` for M tokens x `rows` (<= 8) rows of B.
///
/// # Safety
/// AVX2/FMA present; `rows` rows of r readable values at `b`; r at each `h[m]`; `rows`
/// writable values at each `y[m]` that no other thread touches.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn bgmv_tile<const M: usize, E: Widen>(
    b: *const E,
    r: usize,
    rows: usize,
    h: &[*const f32; M],
    y: &[*mut f32; M],
) {
    let mut acc = [_mm256_setzero_ps(); M];
    for k0 in (0..r).step_by(8) {
        let n = 8.min(r - k0);
        let bt = load_bt8(b, r, rows, k0, n);
        for (k, col) in bt.iter().enumerate().take(n) {
            for (ac, hm) in acc.iter_mut().zip(h) {
                let hv = _mm256_broadcast_ss(&*hm.add(k0 + k));
                *ac = _mm256_fmadd_ps(hv, *col, *ac);
            }
        }
    }
    let mk = mask(rows);
    for (ac, &ym) in acc.iter().zip(y) {
        if rows == 8 {
            _mm256_storeu_ps(ym, _mm256_add_ps(_mm256_loadu_ps(ym), *ac));
        } else {
            _mm256_maskstore_ps(ym, mk, _mm256_add_ps(_mm256_maskload_ps(ym, mk), *ac));
        }
    }
}

/// Packs `cols` (<= 16) rows of B (row length r) as `panel[k][j] = B[j][k]`, zero for
/// j >= cols.
///
/// # Safety
/// AVX2/FMA present; `cols` rows of r readable values at `b`; `panel.len() >= r * 16`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pack_panel<E: Widen>(b: *const E, r: usize, cols: usize, panel: &mut [f32]) {
    let p = panel.as_mut_ptr();
    let (lo, hi) = (cols.min(8), cols.saturating_sub(8));
    for k0 in (0..r).step_by(8) {
        let n = 8.min(r - k0);
        let v0 = load_bt8(b, r, lo, k0, n);
        let v1 = load_bt8(b.wrapping_add(8 * r), r, hi, k0, n);
        for k in 0..n {
            _mm256_storeu_ps(p.add((k0 + k) * 16), v0[k]);
            _mm256_storeu_ps(p.add((k0 + k) * 16 + 8), v1[k]);
        }
    }
}

/// `y[m][c] += sum_k h[m][k] * panel[k][c]` for M tokens x 16 columns, `c < cols`.
///
/// # Safety
/// AVX2/FMA present; r readable values at each `h[m]`; r x 16 at `panel`; `cols <= 16`
/// writable values at each `y[m]` that no other thread touches.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panel_tile<const M: usize>(
    h: &[*const f32; M],
    r: usize,
    panel: *const f32,
    y: &[*mut f32; M],
    cols: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    for k in 0..r {
        let p0 = _mm256_loadu_ps(panel.add(k * 16));
        let p1 = _mm256_loadu_ps(panel.add(k * 16 + 8));
        for (ac, hm) in acc.iter_mut().zip(h) {
            let hv = _mm256_broadcast_ss(&*hm.add(k));
            ac[0] = _mm256_fmadd_ps(hv, p0, ac[0]);
            ac[1] = _mm256_fmadd_ps(hv, p1, ac[1]);
        }
    }
    if cols == 16 {
        for (ac, &ym) in acc.iter().zip(y) {
            _mm256_storeu_ps(ym, _mm256_add_ps(_mm256_loadu_ps(ym), ac[0]));
            let y1 = ym.add(8);
            _mm256_storeu_ps(y1, _mm256_add_ps(_mm256_loadu_ps(y1), ac[1]));
        }
    } else {
        let (m0, m1) = (mask(cols.min(8)), mask(cols.saturating_sub(8)));
        for (ac, &ym) in acc.iter().zip(y) {
            let v0 = _mm256_add_ps(_mm256_maskload_ps(ym, m0), ac[0]);
            _mm256_maskstore_ps(ym, m0, v0);
            let y1 = ym.wrapping_add(8);
            let v1 = _mm256_add_ps(_mm256_maskload_ps(y1, m1), ac[1]);
            _mm256_maskstore_ps(y1, m1, v1);
        }
    }
}
