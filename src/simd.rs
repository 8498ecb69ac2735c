//! CPU SIMD support shared by every CPU kernel (the packed linear layers, paged
//! attention and the LoRA kernels): which instruction set this CPU has (detected once,
//! at the first call), the raw-pointer wrapper that lets parallel tasks write disjoint
//! parts of one buffer, and the small vector helpers.
//!
//! Invariants: [`Isa::get`] never returns an ISA the CPU lacks (`MULTILORA_ISA` can only
//! lower it), so a caller that checked `isa >= Isa::Avx2Fma` may call
//! `#[target_feature(enable = "avx2,fma,f16c")]` code; the
//! helpers here fix their summation order (see each), which is what lets the kernels
//! promise bit-identical results whatever the batch.
use std::sync::OnceLock;

/// The instruction set the CPU kernels use, in increasing order: a level implies every
/// lower one (`isa >= Isa::Avx2Fma` means the AVX2 code may run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust (any target); same summation order as the SIMD paths.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2Fma,
    /// x86-64 with AVX-512 (F, BW, VL) and VNNI, on top of AVX2/FMA/F16C.
    Avx512Vnni,
}

/// The environment variable that forces a lower ISA than the CPU's best
/// (`scalar`, `avx2` or `avx512`), so every path the CPU supports can be exercised.
pub const ISA_ENV: &str = "MULTILORA_ISA";

impl Isa {
    /// The ISA the kernels use: this CPU's best, lowered by [`ISA_ENV`] when set; decided
    /// on the first call and cached.
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::detect();
            match std::env::var(ISA_ENV) {
                Ok(v) => match Self::parse_choice(&v, best) {
                    Ok(isa) => isa,
                    Err(e) => {
                        tracing::warn!("{ISA_ENV}: {e}; using {best:?}");
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }

    /// Every ISA this CPU can run, lowest first (tests run each).
    pub fn supported() -> Vec<Isa> {
        let best = Self::detect();
        [Isa::Portable, Isa::Avx2Fma, Isa::Avx512Vnni]
            .into_iter()
            .filter(|isa| *isa <= best)
            .collect()
    }

    /// `MULTILORA_ISA`'s value against the CPU's `best`: a lower or equal level, or an
    /// error naming what is wrong.
    pub fn parse_choice(value: &str, best: Isa) -> Result<Isa, String> {
        let wanted = match value.trim() {
            "scalar" | "portable" => Isa::Portable,
            "avx2" => Isa::Avx2Fma,
            "avx512" => Isa::Avx512Vnni,
            other => return Err(format!("{other:?} is not scalar, avx2 or avx512")),
        };
        if wanted > best {
            return Err(format!("{value} is beyond this CPU (best: {best:?})"));
        }
        Ok(wanted)
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                    return Isa::Avx512Vnni;
                }
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    }
}

/// A raw pointer into a buffer that several parallel tasks write, each a disjoint set
/// of elements. It carries no lifetime: whoever creates it keeps the buffer alive and
/// unaliased (no other reference reads or writes it) until every task has ended.
#[derive(Clone, Copy, Debug)]
pub struct SharedMutPtr<T>(pub *mut T);

// SAFETY: the pointer is only dereferenced by tasks that write disjoint elements of a
// buffer kept alive by the creator across the parallel region (the type's contract);
// reads of those elements happen after the region that wrote them has ended.
unsafe impl<T: Send> Send for SharedMutPtr<T> {}
// SAFETY: as for `Send`: shared use never touches the same element from two tasks.
unsafe impl<T: Send> Sync for SharedMutPtr<T> {}

impl<T> SharedMutPtr<T> {
    pub fn new(buf: &mut [T]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// The pointer `offset` elements further on. Computing it is safe; dereferencing
    /// it is only sound within the buffer (callers keep `offset` in bounds).
    pub fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// A stored value that widens exactly to f32 (f32 itself, or bf16 by a shift), so the
/// kernels read f32 or bf16 storage with the same arithmetic: [`Widen::widen`] for the
/// portable code, the `load` functions for the AVX2 tiles (8 lanes of f32).
pub trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// Eight values from `p`, widened.
    ///
    /// # Safety
    /// Only called from code compiled with AVX2 (it is inlined there); 8 readable values
    /// at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// The first `n` values from `p`, widened, the other lanes zero.
    ///
    /// # Safety
    /// As [`Widen::load8`], with `n <= 8` readable values at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load_partial(p: *const Self, n: usize) -> std::arch::x86_64::__m256;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_maskload_ps(p, avx2::mask(n))
    }
}

impl Widen for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let v = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_partial(p: *const half::bf16, n: usize) -> std::arch::x86_64::__m256 {
        let mut tail = [half::bf16::ZERO; 8];
        std::ptr::copy_nonoverlapping(p, tail.as_mut_ptr(), n);
        Self::load8(tail.as_ptr())
    }
}

/// `sum_i a[i] * b[i]` with eight independent partial sums (lanes `i mod 8`, so the
/// compiler vectorises it without FMA), added lane 0 to 7, then the tail in order. The
/// order is fixed, so the result does not depend on the caller.
#[inline(always)]
pub fn dot<E: Widen>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].widen();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y.widen();
    }
    s
}

/// `y += a * x`, element by element.
#[inline(always)]
pub fn axpy<E: Widen>(y: &mut [f32], a: f32, x: &[E]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi.widen();
    }
}

/// AVX2/FMA helpers for the x86-64 tiles. Every function needs a CPU with AVX2 and FMA
/// (check [`Isa::get`] first).
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    static TAIL: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    /// A lane mask with lanes `0..n` set.
    ///
    /// # Safety
    /// AVX2/FMA present; `n <= 8`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn mask(n: usize) -> __m256i {
        _mm256_loadu_si256(TAIL.as_ptr().add(8 - n) as *const __m256i)
    }

    /// The sum of the eight lanes, in a fixed order: (low half + high half), then
    /// pairwise.
    ///
    /// # Safety
    /// AVX2/FMA present.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_axpy_match_the_definition() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-4);
        let mut y = vec![1.0; 3];
        axpy(&mut y, 2.0, &[1.0, 2.0, 3.0]);
        assert_eq!(y, vec![3.0, 5.0, 7.0]);
    }

    #[test]
    fn the_isa_is_detected_once_and_supported() {
        let isa = Isa::get();
        assert_eq!(isa, Isa::get());
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2Fma {
            assert!(std::arch::is_x86_feature_detected!("avx2"));
        }
        assert!(Isa::supported().contains(&Isa::Portable));
    }

    #[test]
    fn the_override_only_lowers() {
        assert_eq!(Isa::parse_choice("scalar", Isa::Avx2Fma), Ok(Isa::Portable));
        assert_eq!(Isa::parse_choice("avx2", Isa::Avx512Vnni), Ok(Isa::Avx2Fma));
        assert!(Isa::parse_choice("avx512", Isa::Avx2Fma).is_err());
        assert!(Isa::parse_choice("sse", Isa::Avx2Fma).is_err());
    }
}
