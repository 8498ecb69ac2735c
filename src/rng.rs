//! Seeded pseudo-random numbers, the crate's one generator: the sampler, the load
//! harness, synthetic models and adapters, random test models and the kernels' test data
//! all draw from xoshiro256** seeded through SplitMix64. Implemented here so that a
//! seeded sequence is reproducible independently of any crate's version.

/// SplitMix64 step: used to expand a 64-bit seed into the xoshiro state and to mix
/// the fallback seed.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** (Blackman & Vigna), seeded through SplitMix64. Implemented here so
/// that a seeded sequence is reproducible independently of any crate's version.
#[derive(Clone, Debug)]
pub struct Xoshiro256 {
    pub(crate) s: [u64; 4],
}

impl Xoshiro256 {
    pub fn from_seed(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        // SplitMix64 outputs are a bijection of distinct counters, so the all-zero
        // state (the only invalid one) cannot occur.
        Self { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, 1)` with 24 random bits (every value exact in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[-bound, bound)`.
    pub fn symmetric(&mut self, bound: f32) -> f32 {
        (self.next_f32() * 2.0 - 1.0) * bound
    }

    /// Approximately standard normal: the sum of four uniforms, centred and scaled to
    /// unit variance (bounded by +-3.46; enough for test weights).
    pub fn approx_normal(&mut self) -> f32 {
        let u: f32 = (0..4).map(|_| self.next_f32()).sum();
        (u - 2.0) * 3f32.sqrt()
    }

    /// `n` values uniform in `[-bound, bound)`.
    pub fn symmetric_vec(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n).map(|_| self.symmetric(bound)).collect()
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// `n` test values uniform in `[-1, 1)` from `seed`.
pub fn test_data(n: usize, seed: u64) -> Vec<f32> {
    Xoshiro256::from_seed(seed).symmetric_vec(n, 1.0)
}
