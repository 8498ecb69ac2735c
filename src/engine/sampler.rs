//! Token sampling: per-sequence sampling parameters, a seeded reproducible RNG, the
//! logits -> next-token choice (repetition penalty, greedy, temperature, top-k, top-p)
//! and log-softmax log-probabilities for the API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Per-request sampling parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// `0` => greedy (argmax; ties go to the lowest token id). Any value that is not
    /// `> 0` (negative, NaN) is also treated as greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` => disabled.
    pub top_k: usize,
    /// Nucleus sampling mass in `(0, 1]`; `1` (or more) => disabled.
    pub top_p: f32,
    /// RNG seed; `None` => seeded from a process-wide counter mixed with the time.
    pub seed: Option<u64>,
    /// `1` => disabled; must be `> 0`. Applied like HF/vLLM: for every distinct token id
    /// present in the context (prompt + generated), `logit > 0 ? logit / p : logit * p`.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            repetition_penalty: 1.0,
        }
    }
}

/// SplitMix64 step: used to expand a 64-bit seed into the xoshiro state and to mix
/// the fallback seed.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** (Blackman & Vigna), seeded through SplitMix64. Implemented here so
/// that a seeded sequence is reproducible independently of any crate's version.
#[derive(Clone, Debug)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn from_seed(seed: u64) -> Self {
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

    fn next_u64(&mut self) -> u64 {
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
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Seed for requests without one: a process-wide counter mixed with the wall clock, so
/// concurrent unseeded requests get distinct streams.
fn fallback_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03);
    splitmix64(&mut x)
}

/// 1.5 * 2^23: adding it to an f32 of magnitude < 2^22 rounds it to an integer, which
/// then sits in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `exp(x)` for `x <= 0` (including `-inf`), branch-free so the compiler can vectorise
/// it: Cephes `expf` range reduction and polynomial (relative error ~2e-7). Results
/// below `exp(-87)` (~1.6e-38, the bottom of f32's normal range) are flushed to 0; these
/// weights are relative to the most likely token's weight of 1, so nothing is lost.
#[inline]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in f32
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 0.0);
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    // t's low mantissa bits hold n (in -126..=0), so 2^n is built from them directly.
    let exp_bits = (t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32 + 127) as u32;
    let v = p * f32::from_bits(exp_bits << 23);
    // Also maps NaN to 0.
    if x >= -87.0 {
        v
    } else {
        0.0
    }
}

/// Largest value ignoring NaN (`-inf` if there is none). Eight independent lanes, so
/// the loop vectorises instead of running one long dependency chain.
fn max_value(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Index of the largest value; ties (and a row with nothing above `-inf`) go to the
/// lowest index. NaN never wins.
fn argmax(values: &[f32]) -> usize {
    let max = max_value(values);
    values.iter().position(|&v| v == max).unwrap_or(0)
}

/// Sum in f64, in eight independent lanes (vectorises; deterministic order).
fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (acc, &v) in lanes.iter_mut().zip(c) {
            *acc += v as f64;
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&v| v as f64).sum::<f64>()
}

/// Per-sequence sampler: owns the parameters, the RNG and scratch buffers reused
/// across calls (no allocation per token after the first call).
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256,
    /// Penalised logits, NaN mapped to `-inf`.
    logits: Vec<f32>,
    /// Unnormalised probabilities `exp((logit - max) / temperature)`.
    weights: Vec<f32>,
    /// Top-k: the candidate token ids.
    cand: Vec<u32>,
    /// Bitset of token ids already penalised in this call.
    seen: Vec<u64>,
    /// Top-k: (logit, id) pairs of the allowed tokens.
    pairs: Vec<(f32, u32)>,
    /// Top-p: the tokens kept.
    nucleus: Vec<u32>,
    /// Top-p: bucket index of each candidate.
    bkt: Vec<u16>,
    /// Top-p: probability mass per log-probability bucket.
    hist: Vec<f64>,
    /// Top-p: the tokens of the bucket where the cumulative mass crosses `top_p`.
    tail: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(fallback_seed);
        Self {
            params,
            rng: Xoshiro256::from_seed(seed),
            logits: Vec::new(),
            weights: Vec::new(),
            cand: Vec::new(),
            seen: Vec::new(),
            pairs: Vec::new(),
            nucleus: Vec::new(),
            hist: Vec::new(),
            tail: Vec::new(),
            bkt: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Choose the next token from raw logits (one row, `len = vocab`). `context` is the
    /// prompt + generated ids so far, used for the repetition penalty (ids outside the
    /// vocabulary are ignored).
    ///
    /// Order: repetition penalty; then argmax if greedy; otherwise temperature, top-k,
    /// top-p (smallest set of most probable tokens whose cumulative probability is
    /// `>= top_p`, at least one), renormalise and draw. The RNG advances exactly once
    /// per call whatever the path, so a seeded sequence is reproducible. NaN logits are
    /// treated as `-inf`; if every logit is `-inf`/NaN, token 0 is returned; if some are
    /// `+inf`, the lowest such id is returned. An empty row returns 0.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        // Exactly one RNG step per call, drawn before any branching.
        let u = self.rng.next_f64();
        if logits.is_empty() {
            return 0;
        }
        self.prepare(logits, context);

        let temperature = self.params.temperature;
        if temperature.is_nan() || temperature <= 0.0 {
            return argmax(&self.logits) as u32;
        }
        let max = max_value(&self.logits);
        if !max.is_finite() {
            // All -inf (nothing allowed) or some +inf (which dominate): argmax rule.
            return argmax(&self.logits) as u32;
        }

        let inv_t = 1.0 / temperature;
        if !inv_t.is_finite() {
            // Subnormal temperature: 0 * inf would be NaN; it is greedy in the limit.
            return argmax(&self.logits) as u32;
        }
        let n = self.logits.len();
        let top_k = self.params.top_k;
        let top_p = self.params.top_p;
        let use_k = top_k > 0 && top_k < n;
        let use_p = top_p < 1.0;
        let Self {
            logits: lg,
            weights: w,
            cand,
            pairs,
            hist,
            tail,
            nucleus,
            bkt,
            ..
        } = self;
        // Unnormalised probabilities; (l - max) <= 0, so no overflow for tiny T.
        let weight = |l: f32| exp_nonpos((l - max) * inv_t);
        w.resize(n, 0.0);
        if !use_k {
            for (wi, &l) in w.iter_mut().zip(lg.iter()) {
                *wi = weight(l);
            }
            if !use_p {
                return draw_dense(u, w);
            }
        }

        // Candidate order: penalised logit descending, then id ascending (the greedy
        // tie rule, so top_k = 1 and a tiny top_p reproduce argmax exactly).
        let lg = &*lg;
        let cmp = |a: &u32, b: &u32| {
            lg[*b as usize]
                .total_cmp(&lg[*a as usize])
                .then_with(|| a.cmp(b))
        };
        if use_k {
            // Prefilter: split the row into top_k blocks; their maxima are top_k
            // distinct tokens, so the k-th largest logit is >= the smallest block
            // maximum and every top-k token passes `l >= floor`. This usually leaves a
            // few hundred tokens for the selection instead of the whole vocabulary.
            let mut floor = f32::NEG_INFINITY;
            if top_k <= n / 16 {
                floor = lg
                    .chunks_exact(n / top_k)
                    .take(top_k)
                    .map(max_value)
                    .fold(f32::INFINITY, |a, m| if m < a { m } else { a });
            }
            // Select on contiguous (logit, id) pairs of the allowed (finite) tokens.
            pairs.clear();
            pairs.extend(
                lg.iter()
                    .enumerate()
                    .filter(|(_, &l)| l > f32::NEG_INFINITY && l >= floor)
                    .map(|(i, &l)| (l, i as u32)),
            );
            if top_k < pairs.len() {
                pairs.select_nth_unstable_by(top_k - 1, |a, b| {
                    b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1))
                });
                pairs.truncate(top_k);
            }
            // Canonical (id) order: the order select_nth_unstable leaves is a std
            // implementation detail, and the draw order must not depend on it, or a
            // seeded request could change with the toolchain.
            cand.clear();
            cand.extend(pairs.iter().map(|&(_, i)| i));
            cand.sort_unstable();
            // Only the top-k weights are needed.
            for &i in cand.iter() {
                w[i as usize] = weight(lg[i as usize]);
            }
            if !use_p {
                return draw(u, w, cand.iter().copied());
            }
            if cand.len() <= SMALL_NUCLEUS_INPUT {
                let total: f64 = cand.iter().map(|&i| w[i as usize] as f64).sum();
                let keep = nucleus_prefix(cand, cmp, w, 0.0, top_p as f64 * total);
                cand.truncate(keep);
                return draw(u, w, cand.iter().copied());
            }
        }

        // Top-p over the candidates (all tokens, or a large top-k set): histogram of
        // probability mass by bucket of (max - logit) / T, a bucket index monotone in
        // the logit (the last bucket holds the zero-weight tokens). Every token in a
        // bucket before the one where the cumulative mass crosses the threshold is in
        // the nucleus; only the crossing bucket is ordered.
        let bucket = |l: f32| -> u16 {
            let x = (l - max) * inv_t; // the same x as in `weight`: weight 0 iff x < -87
            if x >= -87.0 {
                // Round to nearest via the 1.5 * 2^23 trick (monotone, like floor, and
                // vectorisable, unlike a saturating `as` cast); the value is in 0..=1022.
                let t = (-x * BUCKETS_PER_NAT).min((BUCKETS - 2) as f32) + ROUND_MAGIC;
                t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as u16
            } else {
                (BUCKETS - 1) as u16
            }
        };
        bkt.clear();
        if use_k {
            bkt.extend(cand.iter().map(|&i| bucket(lg[i as usize])));
        } else {
            bkt.extend(lg.iter().map(|&l| bucket(l)));
        }
        // Four interleaved histograms, so consecutive tokens landing in the same bucket
        // do not form one long chain of dependent memory updates; merged afterwards.
        hist.clear();
        hist.resize(4 * BUCKETS, 0.0);
        if use_k {
            for (j, (&b, &i)) in bkt.iter().zip(cand.iter()).enumerate() {
                hist[(j & 3) * BUCKETS + b as usize] += w[i as usize] as f64;
            }
        } else {
            for (j, (&b, &wi)) in bkt.iter().zip(w.iter()).enumerate() {
                hist[(j & 3) * BUCKETS + b as usize] += wi as f64;
            }
        }
        let (first, others) = hist.split_at_mut(BUCKETS);
        for part in others.chunks_exact(BUCKETS) {
            for (a, &b) in first.iter_mut().zip(part) {
                *a += b;
            }
        }
        hist.truncate(BUCKETS - 1);
        let total: f64 = hist.iter().sum();
        let threshold = top_p as f64 * total;
        let mut before = 0.0f64;
        let mut crossing = BUCKETS - 2;
        for (b, &m) in hist.iter().enumerate() {
            if before + m >= threshold {
                crossing = b;
                break;
            }
            before += m;
        }
        // Branch-free routing (the keep/drop decision is unpredictable): write every id
        // to both buffers and advance only the matching cursor.
        nucleus.resize(bkt.len() + 1, 0);
        tail.resize(bkt.len() + 1, 0);
        let (mut kn, mut kt) = (0, 0);
        for (j, &b) in bkt.iter().enumerate() {
            let i = if use_k { cand[j] } else { j as u32 };
            nucleus[kn] = i;
            tail[kt] = i;
            kn += usize::from((b as usize) < crossing);
            kt += usize::from(b as usize == crossing);
        }
        nucleus.truncate(kn);
        tail.truncate(kt);
        let keep = nucleus_prefix(tail, cmp, w, before, threshold);
        nucleus.extend_from_slice(&tail[..keep]);
        if nucleus.is_empty() {
            // Unreachable (the most likely token has weight 1), kept as a safe fallback.
            return argmax(lg) as u32;
        }
        draw(u, w, nucleus.iter().copied())
    }

    /// Copy `logits` into the scratch buffer, NaN -> -inf, and apply the repetition
    /// penalty once per distinct context id.
    fn prepare(&mut self, logits: &[f32], context: &[u32]) {
        self.logits.clear();
        self.logits.extend(
            logits
                .iter()
                .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }),
        );
        let p = self.params.repetition_penalty;
        if p == 1.0 || !p.is_finite() || p <= 0.0 || context.is_empty() {
            return;
        }
        let n = self.logits.len();
        self.seen.clear();
        self.seen.resize(n.div_ceil(64), 0);
        for &id in context {
            let i = id as usize;
            if i >= n {
                continue;
            }
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            if self.seen[word] & bit != 0 {
                continue;
            }
            self.seen[word] |= bit;
            let l = &mut self.logits[i];
            *l = if *l > 0.0 { *l / p } else { *l * p };
        }
    }
}

/// Top-p inputs up to this size are ordered directly, without the histogram.
const SMALL_NUCLEUS_INPUT: usize = 256;
/// Top-p histogram: buckets per nat of scaled log-probability, and bucket count (it
/// spans ~32 nats, everything less likely shares bucket `BUCKETS - 2`, and the last
/// bucket holds the tokens whose weight is 0).
const BUCKETS_PER_NAT: f32 = 32.0;
const BUCKETS: usize = 1024;

/// Order the most probable prefix of `ids` (by `cmp`) only as far as needed and return
/// how many of them to keep so that `cum + their mass >= threshold` (all of them if the
/// mass never reaches it, at least one if `ids` is non-empty). Repeatedly selects the
/// next chunk of the most probable remaining ids, sorts just that chunk, accumulates.
fn nucleus_prefix(
    ids: &mut [u32],
    cmp: impl Fn(&u32, &u32) -> std::cmp::Ordering + Copy,
    weights: &[f32],
    mut cum: f64,
    threshold: f64,
) -> usize {
    let len = ids.len();
    let mut pos = 0;
    let mut chunk = 32;
    while pos < len {
        let end = (pos + chunk).min(len);
        let rest = &mut ids[pos..];
        if end < len {
            rest.select_nth_unstable_by(end - pos - 1, cmp);
        }
        rest[..end - pos].sort_unstable_by(cmp);
        for (j, &i) in ids.iter().enumerate().take(end).skip(pos) {
            cum += weights[i as usize] as f64;
            if cum >= threshold {
                return j + 1;
            }
        }
        pos = end;
        chunk *= 2;
    }
    len
}

/// Draw from the (unnormalised) weights of the whole row using the uniform `u` in
/// `[0, 1)`. Same result as walking the cumulative sum token by token (up to float
/// rounding at block edges), but whole blocks are skipped using their vectorised sums.
fn draw_dense(u: f64, weights: &[f32]) -> u32 {
    const BLOCK: usize = 512;
    let target = u * sum_f64(weights);
    let mut cum = 0.0f64;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let s = sum_f64(block);
        if target >= cum + s {
            cum += s;
            continue;
        }
        for (j, &w) in block.iter().enumerate() {
            cum += w as f64;
            if w > 0.0 && target < cum {
                return (b * BLOCK + j) as u32;
            }
        }
        // Rounding left the target just past this block: continue with the next one.
    }
    // Only reachable through rounding (target ~ total): the last positive weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

/// Draw from the (unnormalised) weights of `ids` using the uniform `u` in `[0, 1)`.
fn draw(u: f64, weights: &[f32], ids: impl Iterator<Item = u32> + Clone) -> u32 {
    let total: f64 = ids.clone().map(|i| weights[i as usize] as f64).sum();
    let target = u * total;
    let mut cum = 0.0f64;
    let mut last = None;
    for i in ids {
        let w = weights[i as usize] as f64;
        if w <= 0.0 {
            continue;
        }
        cum += w;
        if target < cum {
            return i;
        }
        last = Some(i);
    }
    // Only reachable through rounding (target ~ total): the last positive candidate.
    last.unwrap_or(0)
}

/// Log-probability of the chosen token and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// The `k` most likely `(id, logprob)` pairs, descending (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of the RAW logits (no temperature / penalty), computed stably
/// (max-subtracted, summed in f64): the chosen token's logprob and the `k` most likely
/// `(id, logprob)` pairs in descending order (`k` may be 0; meant for `k <= 20`, cost is
/// `O(vocab * k)` in the worst case). NaN logits count as `-inf`. If some logits are
/// `+inf`, they share the mass equally. A `chosen` id outside the row gets `-inf`.
pub fn token_logprob(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    /// How the row normalises.
    enum Norm {
        /// Log-sum-exp of the finite row.
        Finite(f64),
        /// Some logits are `+inf`: each of them gets this logprob, the rest `-inf`.
        PosInf(f32),
        /// Nothing above `-inf`: every logprob is `-inf`.
        Empty,
    }
    let clean = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = max_value(logits);
    let norm = if max == f32::INFINITY {
        let n_inf = logits.iter().filter(|&&l| l == f32::INFINITY).count();
        Norm::PosInf(-(n_inf as f64).ln() as f32)
    } else if max == f32::NEG_INFINITY {
        Norm::Empty
    } else {
        // exp_nonpos maps the NaN of `NaN - max` to 0. Exponentials go through a
        // small stack buffer so both loops vectorise.
        let mut sum = 0.0f64;
        let mut buf = [0.0f32; 64];
        for chunk in logits.chunks(64) {
            let buf = &mut buf[..chunk.len()];
            for (e, &l) in buf.iter_mut().zip(chunk) {
                *e = exp_nonpos(l - max);
            }
            sum += sum_f64(buf);
        }
        Norm::Finite(max as f64 + sum.ln())
    };
    let logprob_of = |l: f32| match norm {
        Norm::Finite(lse) => (clean(l) as f64 - lse) as f32,
        Norm::PosInf(lp) if l == f32::INFINITY => lp,
        Norm::PosInf(_) | Norm::Empty => f32::NEG_INFINITY,
    };

    let logprob = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |&l| logprob_of(l));

    // Bounded sorted insertion of (id, logit): ids are visited in ascending order, so
    // a strict `>` against the current k-th value keeps the lower id first among ties.
    let k = k.min(logits.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        // `worst` is the k-th logit once the list is full (NaN, as -inf, only fills a
        // list that would otherwise stay short).
        let mut worst = f32::NEG_INFINITY;
        let mut full = false;
        for (c, chunk) in logits.chunks(8).enumerate() {
            // Whole chunks that cannot enter a full list are skipped with one
            // vectorisable comparison.
            if full && !chunk.iter().any(|&l| l > worst) {
                continue;
            }
            for (j, &l) in chunk.iter().enumerate() {
                let l = clean(l);
                if full && l <= worst {
                    continue;
                }
                let at = top.partition_point(|&(_, v)| v >= l);
                top.insert(at, ((c * 8 + j) as u32, l));
                top.truncate(k);
                full = top.len() == k;
                if let (true, Some(&(_, v))) = (full, top.last()) {
                    worst = v;
                }
            }
        }
    }
    for entry in &mut top {
        entry.1 = logprob_of(entry.1);
    }

    TokenLogprob {
        token_id: chosen,
        logprob,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            repetition_penalty: 1.0,
        }
    }

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - m) / t as f64).exp())
            .collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn frequencies(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits, &[]) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    /// Small deterministic generator of test logits.
    fn test_logits(seed: u64, n: usize) -> Vec<f32> {
        let mut r = Xoshiro256::from_seed(seed);
        (0..n)
            .map(|_| (r.next_f64() * 20.0 - 10.0) as f32)
            .collect()
    }

    #[test]
    fn splitmix_matches_reference_vector() {
        // Reference outputs of Vigna's splitmix64.c for seed 1234567.
        let mut s = 1_234_567u64;
        let got: Vec<u64> = (0..5).map(|_| splitmix64(&mut s)).collect();
        assert_eq!(
            got,
            [
                6457827717110365317,
                3203168211198807973,
                9817491932198370423,
                4593380528125082431,
                16408922859458223821
            ]
        );
    }

    #[test]
    fn xoshiro_matches_reference_vector() {
        // Reference xoshiro256** outputs for the state [1, 2, 3, 4].
        let mut r = Xoshiro256 { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn xoshiro_stream_is_pinned() {
        // Golden values: a change here breaks reproducibility of seeded requests.
        let mut r = Xoshiro256::from_seed(42);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, GOLDEN_42);
    }
    const GOLDEN_42: [u64; 3] = [
        1546998764402558742,
        6990951692964543102,
        12544586762248559009,
    ];

    #[test]
    fn fast_exp_matches_f64_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let rel = ((exp_nonpos(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.000_37;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        for x in [0.0f32, -0.0, -1e-30, -1.0, -std::f32::consts::LN_2, -86.99] {
            let want = (x as f64).exp();
            assert!(((exp_nonpos(x) as f64 - want) / want).abs() < 5e-7, "{x}");
        }
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-87.5), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(f32::MIN), 0.0);
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_ties() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 1));
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[]), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0], &[]), 1);
        assert_eq!(s.sample(&[7.0, 7.0], &[]), 0);
        // Top-k / top-p are irrelevant for greedy.
        let mut s = Sampler::new(params(0.0, 3, 0.5, 1));
        assert_eq!(s.sample(&[-1.0, -0.5, -0.5], &[]), 1);
    }

    #[test]
    fn temperature_sampling_matches_softmax() {
        // 200k seeded draws: the standard error of each frequency is < 0.0012, so an
        // absolute tolerance of 0.006 is ~5 sigma.
        const TOL: f64 = 0.006;
        let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0];
        for &t in &[1.0f32, 0.5, 2.0] {
            let mut s = Sampler::new(params(t, 0, 1.0, 7));
            let freq = frequencies(&mut s, &logits, 200_000);
            let want = softmax(&logits, t);
            for (f, w) in freq.iter().zip(&want) {
                assert!((f - w).abs() < TOL, "t={t}: freq {freq:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn top_k_and_top_p_renormalise() {
        const TOL: f64 = 0.006;
        let probs = [0.5f64, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        // top_k = 2 -> {0, 1} renormalised to 0.625 / 0.375.
        let mut s = Sampler::new(params(1.0, 2, 1.0, 3));
        let f = frequencies(&mut s, &logits, 200_000);
        assert!(
            (f[0] - 0.625).abs() < TOL && (f[1] - 0.375).abs() < TOL,
            "{f:?}"
        );
        assert_eq!(f[2] + f[3], 0.0);
        // top_p = 0.9 -> {0, 1, 2} (0.5, 0.8, 0.95), renormalised by 0.95.
        let mut s = Sampler::new(params(1.0, 0, 0.9, 3));
        let f = frequencies(&mut s, &logits, 200_000);
        for i in 0..3 {
            assert!((f[i] - probs[i] / 0.95).abs() < TOL, "{f:?}");
        }
        assert_eq!(f[3], 0.0);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        for seed in 0..50 {
            let logits = test_logits(seed, 1000);
            let mut g = Sampler::new(params(0.0, 0, 1.0, seed));
            let mut k1 = Sampler::new(params(1.3, 1, 1.0, seed));
            let mut k1p = Sampler::new(params(0.7, 1, 0.5, seed));
            let want = g.sample(&logits, &[]);
            assert_eq!(k1.sample(&logits, &[]), want);
            assert_eq!(k1p.sample(&logits, &[]), want);
        }
        // Tie: top_k = 1 must pick the lowest id like greedy.
        let mut k1 = Sampler::new(params(1.0, 1, 1.0, 9));
        for _ in 0..100 {
            assert_eq!(k1.sample(&[0.0, 4.0, 1.0, 4.0, 4.0], &[]), 1);
        }
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        for seed in 0..50 {
            let logits = test_logits(seed + 100, 5000);
            let mut g = Sampler::new(params(0.0, 0, 1.0, seed));
            let mut p = Sampler::new(params(1.0, 0, 1e-6, seed));
            assert_eq!(p.sample(&logits, &[]), g.sample(&logits, &[]));
        }
        // Flat distribution: still the lowest id (at least one token kept).
        let mut p = Sampler::new(params(1.0, 0, 1e-9, 1));
        for _ in 0..100 {
            assert_eq!(p.sample(&[2.0; 64], &[]), 0);
        }
    }

    /// Reference top-k + top-p support by full sort: order by logit descending then id,
    /// keep k, renormalise at temperature `t`, keep the smallest prefix with mass >= p.
    fn reference_support(logits: &[f32], t: f32, k: usize, p: f32) -> Vec<u32> {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if k > 0 {
            order.truncate(k);
        }
        let kept: Vec<f32> = order.iter().map(|&i| logits[i as usize]).collect();
        let probs = softmax(&kept, t);
        let mut cum = 0.0;
        let mut support = Vec::new();
        for (&i, &pr) in order.iter().zip(&probs) {
            support.push(i);
            cum += pr;
            if cum >= p as f64 {
                break;
            }
        }
        support
    }

    #[test]
    fn top_p_and_top_k_restrict_support() {
        // Vocabulary-sized row: exercises the histogram top-p path (no top-k and a
        // top-k set > 256), the small top-k path, and the top-k prefilter.
        let n = 49_152;
        let logits = test_logits(5, n);
        let cases: [(f32, usize, f32); 10] = [
            (1.0, 0, 0.004),
            (1.0, 0, 0.05),
            (0.5, 0, 0.3),
            (1.0, 0, 0.9),
            (3.0, 5, 1.0),
            (3.0, 40, 1.0),
            (1.0, 1000, 0.05),
            (2.0, 1000, 0.6),
            (1.0, 200, 0.2),
            (3.0, 40, 0.5),
        ];
        for (t, k, p) in cases {
            let support = reference_support(&logits, t, k, p);
            let mut allowed = vec![false; n];
            for &i in &support {
                allowed[i as usize] = true;
            }
            let mut s = Sampler::new(params(t, k, p, 11));
            let mut hit = vec![false; n];
            let draws = if support.len() <= 200 {
                20 * support.len() + 500
            } else {
                500
            };
            for _ in 0..draws {
                let id = s.sample(&logits, &[]) as usize;
                assert!(
                    allowed[id],
                    "t={t} k={k} p={p}: sampled {id} outside support"
                );
                hit[id] = true;
            }
            // Small supports are hit entirely (the set is exact, not just a subset);
            // large ones are at least not collapsed onto the argmax.
            let hits = hit.iter().filter(|&&h| h).count();
            if support.len() <= 200 {
                assert_eq!(hits, support.len(), "t={t} k={k} p={p}");
            } else {
                assert!(hits > 100, "t={t} k={k} p={p}: {hits} distinct");
            }
        }
    }

    #[test]
    fn seeded_outputs_are_pinned() {
        // Golden sequences for each path: a change here changes what seeded requests
        // return, so it must be deliberate.
        let logits = test_logits(21, 49_152);
        let run = |t: f32, k: usize, p: f32| {
            let mut s = Sampler::new(params(t, k, p, 1234));
            (0..6).map(|_| s.sample(&logits, &[])).collect::<Vec<u32>>()
        };
        let got = [
            run(1.0, 0, 1.0),
            run(0.7, 50, 1.0),
            run(1.0, 0, 0.9),
            run(0.8, 40, 0.8),
        ];
        assert_eq!(got, GOLDEN_SEQUENCES);
    }
    const GOLDEN_SEQUENCES: [[u32; 6]; 4] = [
        [2432, 41812, 34190, 43122, 5192, 44290],
        [3850, 42193, 32719, 44031, 7059, 44166],
        [2433, 42020, 34323, 43362, 5207, 44505],
        [35584, 18584, 23214, 8507, 39774, 46946],
    ];

    #[test]
    fn repetition_penalty_flips_choice() {
        let mut p = params(0.0, 0, 1.0, 1);
        p.repetition_penalty = 1.2;
        let mut s = Sampler::new(p.clone());
        // Positive logit is divided: 2.0 / 1.2 = 1.67 < 1.9.
        assert_eq!(s.sample(&[2.0, 1.9], &[]), 0);
        assert_eq!(s.sample(&[2.0, 1.9], &[0]), 1);
        // Negative logit is multiplied: -1.0 * 1.2 = -1.2 < -1.1.
        assert_eq!(s.sample(&[-1.0, -1.1], &[0]), 1);
        // Repeated context ids are penalised once (2.0 / 1.2 = 1.67 > 1.5), and ids
        // outside the vocabulary are ignored.
        assert_eq!(s.sample(&[2.0, 1.5], &[0, 0, 0, 99]), 0);
        // Also applies before temperature sampling (top_k = 1 makes it deterministic).
        p.temperature = 1.0;
        p.top_k = 1;
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&[2.0, 1.9, 0.0], &[0, 2]), 1);
    }

    #[test]
    fn seeds_reproduce_and_differ() {
        let logits = vec![0.0f32; 100];
        let run = |seed: u64, top_p: f32| {
            let mut s = Sampler::new(params(1.0, 0, top_p, seed));
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(1, 1.0), run(1, 1.0));
        assert_eq!(run(1, 0.5), run(1, 0.5));
        assert_ne!(run(1, 1.0), run(2, 1.0));
        // Unseeded samplers get different streams.
        let mut a = Sampler::new(SamplingParams::default());
        let mut b = Sampler::new(SamplingParams::default());
        let sa: Vec<u32> = (0..50).map(|_| a.sample(&logits, &[])).collect();
        let sb: Vec<u32> = (0..50).map(|_| b.sample(&logits, &[])).collect();
        assert_ne!(sa, sb);
    }

    #[test]
    fn rng_advances_once_per_call_on_every_path() {
        let logits = test_logits(3, 500);
        let mut nan_row = logits.clone();
        nan_row[7] = f32::NAN;
        let one_hot: Vec<f32> = (0..500).map(|i| if i == 3 { 50.0 } else { 0.0 }).collect();
        let all_nan = vec![f32::NAN; 500];
        let first_rows: [&[f32]; 5] = [&logits, &nan_row, &one_hot, &all_nan, &[]];
        let settings = [(1.0, 0, 1.0), (0.8, 10, 1.0), (1.2, 0, 0.7), (0.9, 20, 0.9)];
        for &(t, k, p) in &settings {
            let mut reference = Sampler::new(params(t, k, p, 77));
            reference.sample(&logits, &[]);
            let want: Vec<u32> = (0..20)
                .map(|_| reference.sample(&logits, &[1, 2]))
                .collect();
            for first in first_rows {
                let mut s = Sampler::new(params(t, k, p, 77));
                s.sample(first, &[5]);
                let got: Vec<u32> = (0..20).map(|_| s.sample(&logits, &[1, 2])).collect();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn nan_and_inf_logits_do_not_panic() {
        let rows: Vec<Vec<f32>> = vec![
            vec![f32::NAN; 10],
            vec![f32::NAN, 1.0, f32::NAN, 2.0],
            vec![f32::NEG_INFINITY; 4],
            vec![1.0, f32::INFINITY, 3.0, f32::INFINITY],
            vec![f32::NAN, f32::NEG_INFINITY, 0.5],
            vec![f32::MAX, f32::MIN, 0.0],
        ];
        let settings = [
            (0.0, 0, 1.0, 1.0),
            (1.0, 0, 1.0, 1.3),
            (1e-30, 0, 1.0, 1.0),
            (1e-45, 0, 0.5, 1.0),
            (0.7, 2, 1.0, 1.0),
            (0.7, 0, 0.5, 1.1),
            (1.0, 3, 0.9, 1.0),
        ];
        for row in &rows {
            for &(t, k, p, rp) in &settings {
                let mut sp = params(t, k, p, 5);
                sp.repetition_penalty = rp;
                let mut s = Sampler::new(sp);
                for _ in 0..20 {
                    let id = s.sample(row, &[0, 1]) as usize;
                    assert!(id < row.len());
                    assert!(!row[id].is_nan() || row.iter().all(|l| l.is_nan()));
                }
            }
        }
        // NaN never wins; +inf dominates (lowest such id).
        let mut s = Sampler::new(params(1.0, 0, 1.0, 5));
        assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN], &[]), 1);
        assert_eq!(s.sample(&[1.0, f32::INFINITY, f32::INFINITY], &[]), 1);
        let _ = token_logprob(&[f32::NAN, f32::INFINITY, 1.0], 0, 3);
        let _ = token_logprob(&[f32::NAN; 3], 5, 2);
    }

    #[test]
    fn token_logprob_matches_hand_computed() {
        // log-softmax([1, 2, 3]): lse = 3 + ln(1 + e^-1 + e^-2) = 3.40760596.
        let lse = 3.0f64 + (1.0 + (-1.0f64).exp() + (-2.0f64).exp()).ln();
        let lp = token_logprob(&[1.0, 2.0, 3.0], 1, 2);
        assert_eq!(lp.token_id, 1);
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        assert!((lse - 3.407_605_96).abs() < 1e-8);
        assert_eq!(lp.top.len(), 2);
        assert_eq!((lp.top[0].0, lp.top[1].0), (2, 1));
        assert!((lp.top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
        assert!((lp.top[1].1 as f64 - (2.0 - lse)).abs() < 1e-6);

        // k = 0, ties ordered by id, stability with huge logits, NaN as -inf.
        assert!(token_logprob(&[1.0, 2.0], 0, 0).top.is_empty());
        let lp = token_logprob(&[5.0, 9.0, 5.0, 9.0, f32::NAN], 4, 4);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0, 2]);
        assert_eq!(lp.logprob, f32::NEG_INFINITY);
        let lp = token_logprob(&[1000.0, 1000.0], 0, 1);
        assert!((lp.logprob - (-std::f32::consts::LN_2)).abs() < 1e-6);

        // Large random row: top-k order and the chosen logprob against an f64 reference.
        let logits = test_logits(8, 49_152);
        let lp = token_logprob(&logits, 123, 20);
        let mut sorted: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        let want: Vec<u32> = sorted[..20].iter().map(|t| t.0).collect();
        assert_eq!(ids, want);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let m = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
        let s: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
        assert!((lp.logprob as f64 - (logits[123] as f64 - m - s.ln())).abs() < 1e-5);
    }
}
