//! Token sampling: per-sequence sampling parameters, a seeded reproducible RNG, the
//! logits -> next-token choice (repetition penalty, greedy, temperature, top-k, top-p)
//! and log-softmax log-probabilities for the API.

use crate::rng::{splitmix64, Xoshiro256};
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
#[path = "sampler_tests.rs"]
mod tests;
