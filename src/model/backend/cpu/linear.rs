//! Pre-packed dense linear layers for the CPU: `y = x W^T`, with `W` packed once at load
//! into panels of `NR` output columns (`[in, NR]` contiguous each), so a step streams
//! every weight exactly once, sequentially, and computes it against a register tile of
//! up to `MR` tokens (AVX2/FMA where the CPU has it). Panels hold f32, bf16 or f16
//! ([`PanelType`]); 16-bit values are widened to f32 in registers and accumulated in f32.
//!
//! Invariant (batch invariance): every output element is one fused multiply-add chain
//! over the input dimension in order, whatever the number of tokens, the tiling, the
//! thread split or the code path (AVX2 or scalar `mul_add`), so a token's result is
//! bit-identical whatever else is in the batch, in every panel type.
//!
//! Soundness of the parallel writes: each task owns whole panels (a disjoint column range
//! of y) and writes them through one [`SharedMutPtr`] while `matmul` holds `y` alive.
use crate::simd::{Isa, SharedMutPtr};
use rayon::prelude::*;

/// Output columns per panel (two 8-lane vectors).
const NR: usize = 16;
/// Tokens per register tile.
const MR: usize = 4;

/// How panel values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanelType {
    F32,
    Bf16,
    F16,
}

impl PanelType {
    fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }
}

/// A weight matrix `[out, in]` in panel order.
pub struct PackedWeight {
    inp: usize,
    out: usize,
    ty: PanelType,
    /// `ceil(out / NR)` panels of `[inp, NR]` values of `ty` (little-endian bytes),
    /// zero-padded past `out` (an f32 buffer, so 4-byte aligned whatever the type).
    panels: Vec<f32>,
}

impl PackedWeight {
    /// Packs a row-major `[out, inp]` matrix in f32.
    pub fn pack(w: &[f32], out: usize, inp: usize) -> Self {
        Self::pack_as(w, out, inp, PanelType::F32)
    }

    /// Packs a row-major `[out, inp]` matrix, rounding to `ty` (to nearest, ties to even).
    pub fn pack_as(w: &[f32], out: usize, inp: usize, ty: PanelType) -> Self {
        assert_eq!(w.len(), out * inp, "weight is not [out, in]");
        let n_panels = out.div_ceil(NR);
        let panel_bytes = inp * NR * ty.bytes();
        let mut panels = vec![0f32; (n_panels * panel_bytes).div_ceil(4)];
        advise_huge_pages(&mut panels);
        let bytes = as_bytes_mut(&mut panels);
        for (p, panel) in bytes.chunks_exact_mut(panel_bytes).enumerate() {
            for c in 0..NR {
                let o = p * NR + c;
                if o >= out {
                    break;
                }
                let row = &w[o * inp..(o + 1) * inp];
                for (i, v) in row.iter().enumerate() {
                    let at = (i * NR + c) * ty.bytes();
                    match ty {
                        PanelType::F32 => panel[at..at + 4].copy_from_slice(&v.to_le_bytes()),
                        PanelType::Bf16 => panel[at..at + 2]
                            .copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes()),
                        PanelType::F16 => panel[at..at + 2]
                            .copy_from_slice(&half::f16::from_f32(*v).to_le_bytes()),
                    }
                }
            }
        }
        Self {
            inp,
            out,
            ty,
            panels,
        }
    }

    pub fn panel_type(&self) -> PanelType {
        self.ty
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.out.div_ceil(NR) * self.inp * NR * self.ty.bytes()
    }

    /// Panel `p`'s bytes.
    fn panel(&self, p: usize) -> Option<&[u8]> {
        let n = self.inp * NR * self.ty.bytes();
        as_bytes(&self.panels).get(p * n..(p + 1) * n)
    }

    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Row `o` (`< out`) of the matrix, as stored (widened to f32), into `row` (`[in]`).
    pub fn row(&self, o: usize, row: &mut [f32]) {
        let size = self.ty.bytes();
        let Some(panel) = self.panel(o / NR) else {
            return;
        };
        let c = o % NR;
        for (i, v) in row.iter_mut().enumerate().take(self.inp) {
            let at = (i * NR + c) * size;
            let b = &panel[at..at + size];
            *v = match self.ty {
                PanelType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                PanelType::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                PanelType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            };
        }
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    /// `x: [t, in]` row-major -> `[t, out]` row-major.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        assert_eq!(x.len(), t * self.inp, "input is not [t, in]");
        let mut y = vec![0f32; t * self.out];
        if t == 0 {
            return y;
        }
        let n_panels = self.out.div_ceil(NR);
        let y_ptr = SharedMutPtr::new(&mut y);
        let avx2 = Isa::get() >= Isa::Avx2Fma;
        let ty = self.ty;
        // Enough panels per task to amortise scheduling, enough tasks to balance.
        let min_len = (n_panels / (4 * rayon::current_num_threads())).max(1);
        (0..n_panels)
            .into_par_iter()
            .with_min_len(min_len)
            .for_each(|p| {
                let Some(panel) = self.panel(p) else { return };
                let cols = NR.min(self.out - p * NR);
                // Spread the prefetch of the next panel over this panel's tiles, so the
                // memory traffic is even instead of a burst at each panel's first tile.
                let next = self.panel(p + 1);
                let n_tiles = t.div_ceil(MR);
                let line_bytes = 64;
                let lines = (self.inp * NR * ty.bytes()).div_ceil(line_bytes);
                let lines_per_tile = lines.div_ceil(n_tiles);
                let mut t0 = 0;
                while t0 < t {
                    let m = MR.min(t - t0);
                    let tile = Tile {
                        panel,
                        x: &x[t0 * self.inp..(t0 + m) * self.inp],
                        inp: self.inp,
                        // Rows t0..t0+m, columns p*NR..p*NR+cols of y belong to this
                        // task alone; y outlives the parallel loop.
                        y: y_ptr.at(t0 * self.out + p * NR),
                        y_stride: self.out,
                        cols,
                        prefetch: next.map(|n| {
                            let first = (t0 / MR * lines_per_tile * line_bytes).min(n.len());
                            let last = (first + lines_per_tile * line_bytes).min(n.len());
                            &n[first..last]
                        }),
                        ty,
                    };
                    tile.run(m, avx2);
                    t0 += m;
                }
            });
        y
    }
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 storage is valid as bytes; the length covers the same memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as `as_bytes`; every byte pattern is a valid f32, so writes keep it valid.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// Asks the kernel to back a large buffer with transparent huge pages (fewer TLB misses
/// while streaming weights). Best effort: call it before the buffer is first written.
pub fn advise_huge_pages(buf: &mut [f32]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let aligned = start.next_multiple_of(HUGE);
        if end > aligned + HUGE {
            let len = (end - aligned) / HUGE * HUGE;
            // SAFETY: the range lies inside `buf`; MADV_HUGEPAGE changes no contents.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// One register tile: `m <= MR` tokens against one panel.
struct Tile<'a> {
    /// `[inp, NR]` values of `ty`.
    panel: &'a [u8],
    ty: PanelType,
    x: &'a [f32],
    inp: usize,
    /// Where the tile's first output element is: row r, column c at `y + r * y_stride + c`.
    y: *mut f32,
    y_stride: usize,
    cols: usize,
    /// Bytes of a panel to pull into cache while this tile runs (a line at a time).
    prefetch: Option<&'a [u8]>,
}

impl Tile<'_> {
    fn run(&self, m: usize, avx2: bool) {
        let mut acc = [[0f32; NR]; MR];
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA (checked by the caller).
            unsafe {
                match (self.ty, m) {
                    (PanelType::F32, 1) => tile_avx2::<1, 0>(self, &mut acc),
                    (PanelType::F32, 2) => tile_avx2::<2, 0>(self, &mut acc),
                    (PanelType::F32, 3) => tile_avx2::<3, 0>(self, &mut acc),
                    (PanelType::F32, _) => tile_avx2::<4, 0>(self, &mut acc),
                    (PanelType::Bf16, 1) => tile_avx2::<1, 1>(self, &mut acc),
                    (PanelType::Bf16, 2) => tile_avx2::<2, 1>(self, &mut acc),
                    (PanelType::Bf16, 3) => tile_avx2::<3, 1>(self, &mut acc),
                    (PanelType::Bf16, _) => tile_avx2::<4, 1>(self, &mut acc),
                    (PanelType::F16, 1) => tile_avx2::<1, 2>(self, &mut acc),
                    (PanelType::F16, 2) => tile_avx2::<2, 2>(self, &mut acc),
                    (PanelType::F16, 3) => tile_avx2::<3, 2>(self, &mut acc),
                    (PanelType::F16, _) => tile_avx2::<4, 2>(self, &mut acc),
                }
            }
            self.store(m, &acc);
            return;
        }
        let _ = avx2;
        tile_scalar(self, m, &mut acc);
        self.store(m, &acc);
    }

    fn store(&self, m: usize, acc: &[[f32; NR]; MR]) {
        for (r, row) in acc.iter().enumerate().take(m) {
            // SAFETY: see `PackedWeight::matmul`: this tile owns these elements.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(self.y.add(r * self.y_stride), self.cols) };
            dst.copy_from_slice(&row[..self.cols]);
        }
    }
}

/// Panel row `i` (NR values) widened to f32.
fn panel_row(panel: &[u8], ty: PanelType, i: usize) -> [f32; NR] {
    let n = ty.bytes();
    let bytes = &panel[i * NR * n..(i + 1) * NR * n];
    let mut w = [0f32; NR];
    for (c, v) in w.iter_mut().enumerate() {
        let b = &bytes[c * n..(c + 1) * n];
        *v = match ty {
            PanelType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            PanelType::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            PanelType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        };
    }
    w
}

/// The portable path: the same FMA chain per element as the AVX2 path.
fn tile_scalar(tile: &Tile, m: usize, acc: &mut [[f32; NR]; MR]) {
    for i in 0..tile.inp {
        let w = panel_row(tile.panel, tile.ty, i);
        for (r, a) in acc.iter_mut().enumerate().take(m) {
            let xv = tile.x[r * tile.inp + i];
            for c in 0..NR {
                a[c] = xv.mul_add(w[c], a[c]);
            }
        }
    }
}

/// Eight panel values at `p` (of type `T`: 0 f32, 1 bf16, 2 f16) widened to f32.
///
/// # Safety
/// AVX2/FMA/F16C present; `p` has 8 readable values of that type.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const T: u8>(p: *const u8) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    match T {
        0 => _mm256_loadu_ps(p as *const f32),
        1 => {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
        _ => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    }
}

/// The AVX2 path of [`Tile::run`]: the same FMA chain per element as [`tile_scalar`],
/// over panels of type `T` (0 f32, 1 bf16, 2 f16, matching the tile's `ty`).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `M <= MR`; the tile's panel holds `inp * NR` values
/// of type `T` and its `x` holds `M * inp` (as [`PackedWeight::matmul`] builds them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const M: usize, const T: u8>(tile: &Tile, out: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let w = tile.panel.as_ptr();
    let row_bytes = NR * tile.ty.bytes();
    let x = tile.x.as_ptr();
    // One prefetch of the next panel every `stride` steps, spread evenly: a burst would
    // exhaust the line fill buffers.
    let (next, lines) = match tile.prefetch {
        Some(n) => (n.as_ptr(), n.len() / 64),
        None => (w, 0),
    };
    let stride = tile.inp.checked_div(lines).unwrap_or(tile.inp).max(1);
    let mut i = 0;
    let mut line = 0;
    while i < tile.inp {
        if line < lines {
            _mm_prefetch::<_MM_HINT_T0>(next.add(line * 64) as *const i8);
            line += 1;
        }
        let stop = (i + stride).min(tile.inp);
        while i < stop {
            let w0 = load8::<T>(w.add(i * row_bytes));
            let w1 = load8::<T>(w.add(i * row_bytes + row_bytes / 2));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(r * tile.inp + i));
                a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
            }
            i += 1;
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out[r].as_mut_ptr(), a[0]);
        _mm256_storeu_ps(out[r].as_mut_ptr().add(8), a[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        crate::rng::test_data(n, seed as u64)
    }

    fn naive(w: &[f32], x: &[f32], out: usize, inp: usize, t: usize) -> Vec<f64> {
        let mut y = vec![0f64; t * out];
        for r in 0..t {
            for o in 0..out {
                y[r * out + o] = (0..inp)
                    .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn matches_naive_on_odd_shapes() {
        for &(t, inp, out) in &[
            (1, 7, 5),
            (5, 33, 17),
            (6, 64, 16),
            (13, 100, 47),
            (37, 64, 130),
        ] {
            let w = data(out * inp, 1);
            let x = data(t * inp, 2);
            let p = PackedWeight::pack(&w, out, inp);
            let y = p.matmul(&x, t);
            let reference = naive(&w, &x, out, inp, t);
            for (a, b) in y.iter().zip(&reference) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{t}x{inp}x{out}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn rows_are_bit_identical_whatever_the_batch() {
        let (inp, out, t) = (96, 70, 23);
        let w = data(out * inp, 3);
        let x = data(t * inp, 4);
        let p = PackedWeight::pack(&w, out, inp);
        let together = p.matmul(&x, t);
        for r in 0..t {
            let alone = p.matmul(&x[r * inp..(r + 1) * inp], 1);
            assert_eq!(&together[r * out..(r + 1) * out], &alone[..], "row {r}");
        }
        // A sub-batch starting elsewhere tiles differently and still agrees.
        let part = p.matmul(&x[5 * inp..16 * inp], 11);
        assert_eq!(&together[5 * out..16 * out], &part[..]);
    }

    #[test]
    fn scalar_and_simd_paths_agree_exactly() {
        let (inp, out, m) = (45, 16, 5);
        let w = data(out * inp, 5);
        let x = data(m * inp, 6);
        let mut y_simd = vec![0f32; m * out];
        let mut y_scalar = vec![0f32; m * out];
        for ty in [PanelType::F32, PanelType::Bf16, PanelType::F16] {
            let p = PackedWeight::pack_as(&w, out, inp, ty);
            for (y, avx2) in [(&mut y_simd, true), (&mut y_scalar, false)] {
                let panel = p.panel(0).unwrap();
                let tile = Tile {
                    panel,
                    ty,
                    x: &x,
                    inp,
                    y: y.as_mut_ptr(),
                    y_stride: out,
                    cols: out,
                    prefetch: Some(panel),
                };
                tile.run(m, avx2 && Isa::get() >= Isa::Avx2Fma);
            }
            assert_eq!(y_simd, y_scalar, "{ty:?}");
        }
    }

    #[test]
    fn sixteen_bit_panels_compute_on_the_rounded_weights() {
        let (t, inp, out) = (3, 40, 21);
        let w = data(out * inp, 7);
        let x = data(t * inp, 8);
        for (ty, round) in [
            (
                PanelType::Bf16,
                (|v| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32,
            ),
            (PanelType::F16, |v| half::f16::from_f32(v).to_f32()),
        ] {
            let rounded: Vec<f32> = w.iter().map(|v| round(*v)).collect();
            let want = PackedWeight::pack(&rounded, out, inp).matmul(&x, t);
            let p = PackedWeight::pack_as(&w, out, inp, ty);
            assert_eq!(p.matmul(&x, t), want, "{ty:?}");
            assert_eq!(p.bytes(), 2 * out.div_ceil(NR) * NR * inp);
        }
    }
}
