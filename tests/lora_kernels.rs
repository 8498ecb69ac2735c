//! The batched LoRA kernels against the reference (`lora_apply_reference`) on random
//! shapes, ranks, slot maps and stacked outputs, plus the exact properties: tokens and
//! columns a site does not own stay bit-identical, a token's result does not depend on
//! the rest of the batch or on the thread count, and bad arguments are refused by name.
//! Each adapter's matrices are stored in f32 or bf16 at random (the reference widens the
//! same stored values), so every property holds for both and for batches that mix them;
//! some adapters also scale each rank and each output column (VeRA's lambdas).
use multilora::lora::batch::LoraBatch;
use multilora::lora::kernels::{lora_apply, lora_apply_reference, SiteShape, SlotWeights};
use multilora::lora::values::{AdapterDType, LoraValues, LoraView};
use multilora::rng::Xoshiro256;

/// Draws the cases need beyond the shared generator's own.
trait Draws {
    /// Log-uniform in `lo..=hi`.
    fn log_range(&mut self, lo: usize, hi: usize) -> usize;
    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool;
}

impl Draws for Xoshiro256 {
    fn log_range(&mut self, lo: usize, hi: usize) -> usize {
        let (a, b) = ((lo as f64).ln(), (hi as f64 + 1.0).ln());
        let u = self.next_f64();
        ((a + u * (b - a)).exp() as usize).clamp(lo, hi)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }
}

/// One adapter's weights at the site under test, stored in f32 or bf16 (drawn per
/// adapter, so batches mix both).
#[derive(Clone)]
struct Adapter {
    rank: usize,
    scale: f32,
    a: LoraValues,
    b: LoraValues,
    /// VeRA-style scales of each rank and each output column (drawn for some adapters).
    rank_scale: Option<Vec<f32>>,
    out_scale: Option<Vec<f32>>,
}

struct Case {
    batch: LoraBatch,
    shape: SiteShape,
    x: Vec<f32>,
    y0: Vec<f32>,
    /// `None`: the slot has no weights at this site.
    adapters: Vec<Option<Adapter>>,
}

impl Case {
    fn new(rng: &mut Xoshiro256, slots: &[i32], shape: SiteShape, ranks: &[Option<usize>]) -> Case {
        let (inp, out) = (shape.in_features, shape.out_features);
        let adapters = ranks
            .iter()
            .map(|r| {
                r.map(|rank| {
                    let dtype = if rng.chance(0.5) {
                        AdapterDType::Bf16
                    } else {
                        AdapterDType::F32
                    };
                    let a = rng.symmetric_vec(rank * inp, 1.0 / (inp as f32).sqrt());
                    let b = rng.symmetric_vec(out * rank, 1.0 / (rank as f32).sqrt());
                    let vera = rng.chance(0.3);
                    Adapter {
                        rank,
                        scale: rng.range(1, 40) as f32 / 10.0,
                        a: LoraValues::from_f32(a, dtype),
                        b: LoraValues::from_f32(b, dtype),
                        rank_scale: vera.then(|| rng.symmetric_vec(rank, 2.0)),
                        out_scale: vera.then(|| rng.symmetric_vec(out, 2.0)),
                    }
                })
            })
            .collect();
        Case {
            batch: LoraBatch::new(slots),
            shape,
            x: rng.symmetric_vec(slots.len() * inp, 1.0),
            y0: rng.symmetric_vec(slots.len() * shape.y_stride, 1.0),
            adapters,
        }
    }

    fn slots(&self) -> Vec<Option<SlotWeights<'_>>> {
        self.adapters
            .iter()
            .map(|a| {
                a.as_ref().map(|a| SlotWeights {
                    rank: a.rank,
                    scale: a.scale,
                    a: a.a.view(),
                    b: a.b.view(),
                    rank_scale: a.rank_scale.as_deref(),
                    out_scale: a.out_scale.as_deref(),
                })
            })
            .collect()
    }

    fn ours(&self) -> Vec<f32> {
        let mut y = self.y0.clone();
        lora_apply(&self.batch, &self.x, &mut y, self.shape, &self.slots()).unwrap();
        y
    }

    /// Ours against the reference within tolerance; every element the site does not own
    /// bit-identical to before. Returns ours.
    fn check(&self, what: &str) -> Vec<f32> {
        let got = self.ours();
        let mut want = self.y0.clone();
        lora_apply_reference(&self.batch, &self.x, &mut want, self.shape, &self.slots()).unwrap();
        let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = 1e-4 * (1.0 + max);
        let SiteShape {
            out_features,
            y_stride,
            y_offset,
            ..
        } = self.shape;
        for (t, &slot) in self.batch.slots().iter().enumerate() {
            let owned = slot >= 0 && self.adapters[slot as usize].is_some();
            for c in 0..y_stride {
                let i = t * y_stride + c;
                let (g, w, before) = (got[i], want[i], self.y0[i]);
                if owned && (y_offset..y_offset + out_features).contains(&c) {
                    assert!(
                        (g - w).abs() <= tol,
                        "{what}: token {t} col {c}: {g} vs {w}"
                    );
                } else {
                    assert_eq!(
                        g.to_bits(),
                        before.to_bits(),
                        "{what}: token {t} col {c} written"
                    );
                }
            }
        }
        got
    }
}

/// A slot map in one of three styles: per-token random, contiguous sequences, one adapter.
fn random_slots(rng: &mut Xoshiro256, t: usize, n: usize) -> Vec<i32> {
    let pick = |rng: &mut Xoshiro256| {
        if rng.chance(0.2) {
            -1
        } else {
            rng.range(0, n - 1) as i32
        }
    };
    match rng.range(0, 2) {
        0 => (0..t).map(|_| pick(rng)).collect(),
        1 => {
            let mut slots = Vec::with_capacity(t);
            while slots.len() < t {
                let len = rng.log_range(1, t - slots.len());
                let s = pick(rng);
                slots.extend(std::iter::repeat_n(s, len));
            }
            slots
        }
        _ => vec![rng.range(0, n - 1) as i32; t],
    }
}

fn random_rank(rng: &mut Xoshiro256) -> usize {
    if rng.chance(0.5) {
        [8, 16, 32, 64][rng.range(0, 3)]
    } else {
        rng.log_range(1, 256)
    }
}

/// A random case with at most about `budget` multiply-adds.
fn random_case(rng: &mut Xoshiro256, budget: usize) -> Case {
    let (inp, out) = (rng.log_range(64, 4096), rng.log_range(64, 4096));
    let n = rng.log_range(1, 64);
    let ranks: Vec<Option<usize>> = (0..n)
        .map(|_| (!rng.chance(0.15)).then(|| random_rank(rng)))
        .collect();
    let mean_rank = ranks.iter().map(|r| r.unwrap_or(0)).sum::<usize>() / n + 1;
    let t_max = (budget / ((inp + out) * mean_rank)).clamp(1, 2048);
    let t = rng.log_range(1, t_max);
    let extra = if rng.chance(0.5) {
        0
    } else {
        rng.range(1, 300)
    };
    let shape = SiteShape {
        in_features: inp,
        out_features: out,
        y_stride: out + extra,
        y_offset: rng.range(0, extra),
    };
    let slots = random_slots(rng, t, n);
    Case::new(rng, &slots, shape, &ranks)
}

#[test]
fn random_cases_match_the_reference() {
    let mut rng = Xoshiro256::from_seed(1);
    for i in 0..400 {
        let case = random_case(&mut rng, 60_000_000);
        let desc = format!(
            "case {i}: T={} {:?} slots {}",
            case.batch.num_tokens(),
            case.shape,
            case.adapters.len()
        );
        case.check(&desc);
    }
}

#[test]
fn very_large_cases_match_the_reference() {
    let mut rng = Xoshiro256::from_seed(2);
    let shape = |inp, out| SiteShape {
        in_features: inp,
        out_features: out,
        y_stride: out,
        y_offset: 0,
    };
    // Prefill: 2048 tokens, 4 adapters of mixed rank (up to 256), full width.
    let slots: Vec<i32> = (0..2048).map(|t| [0, 1, -1, 2, 3][t / 410]).collect();
    let ranks = [Some(256), Some(3), Some(64), Some(17)];
    Case::new(&mut rng, &slots, shape(4096, 4096), &ranks).check("prefill 2048x4096");
    // Decode-like: 64 distinct adapters, 2 tokens each, interleaved, ranks up to 256.
    let slots: Vec<i32> = (0..128).map(|t| t % 64).collect();
    let ranks: Vec<Option<usize>> = (0..64).map(|_| Some(random_rank(&mut rng))).collect();
    Case::new(&mut rng, &slots, shape(2048, 4096), &ranks).check("decode 64 adapters");
    // Everything at once: 2048 tokens, 64 adapters of any rank, random slots with gaps.
    let ranks: Vec<Option<usize>> = (0..64).map(|_| Some(rng.range(1, 256))).collect();
    let slots = random_slots(&mut rng, 2048, 64);
    Case::new(&mut rng, &slots, shape(4096, 1024), &ranks).check("mixed 2048x64");
}

#[test]
fn single_token_segments_and_stacked_outputs() {
    let mut rng = Xoshiro256::from_seed(3);
    // q|k|v stacked: each site writes only its own columns of one shared buffer.
    let (inp, widths) = (576, [576, 192, 192]);
    let y_stride = widths.iter().sum();
    let slots: Vec<i32> = vec![5, -1, 0, 3, 3, 3, -1, 1, 2, 4, 4];
    let mut y = rng.symmetric_vec(slots.len() * y_stride, 1.0);
    let mut y_ref = y.clone();
    let mut y_offset = 0;
    for (site, &out) in widths.iter().enumerate() {
        let shape = SiteShape {
            in_features: inp,
            out_features: out,
            y_stride,
            y_offset,
        };
        // Slot `site` has no weights at this site.
        let ranks: Vec<Option<usize>> = (0..6).map(|s| (s != site).then_some(8 + s)).collect();
        let mut case = Case::new(&mut rng, &slots, shape, &ranks);
        case.y0 = y.clone();
        y = case.check(&format!("site {site}"));
        lora_apply_reference(&case.batch, &case.x, &mut y_ref, shape, &case.slots()).unwrap();
        y_offset += out;
    }
    let max = y_ref.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (g, w) in y.iter().zip(&y_ref) {
        assert!((g - w).abs() <= 1e-4 * (1.0 + max), "{g} vs {w}");
    }
}

#[test]
fn no_adapter_tokens_leave_y_bit_identical() {
    let mut rng = Xoshiro256::from_seed(4);
    let shape = SiteShape {
        in_features: 64,
        out_features: 96,
        y_stride: 100,
        y_offset: 4,
    };
    for t in [0, 1, 17] {
        let slots = vec![-1; t];
        let case = Case::new(&mut rng, &slots, shape, &[Some(4)]);
        assert!(case.batch.is_empty());
        let got = case.ours();
        assert!(got
            .iter()
            .zip(&case.y0)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    // Every adapter token on a slot without weights here: also untouched.
    let case = Case::new(&mut rng, &[0, -1, 0], shape, &[None, Some(4)]);
    case.check("all slots None");
}

#[test]
fn a_token_is_bit_identical_alone_or_in_any_batch() {
    let mut rng = Xoshiro256::from_seed(5);
    let shape = SiteShape {
        in_features: 300,
        out_features: 130,
        y_stride: 130,
        y_offset: 0,
    };
    let ranks: Vec<Option<usize>> = [13, 8, 64, 1].iter().map(|&r| Some(r)).collect();
    // Long segments (SGMV, multi-token tiles) around single tokens (BGMV).
    let mut slots = vec![0; 40];
    slots.extend([1, -1, 2, 3]);
    slots.extend(vec![2; 37]);
    let mut big = Case::new(&mut rng, &slots, shape, &ranks);
    // Slot 2 (long segments and a single token) scales its ranks and columns (VeRA).
    if let Some(a) = &mut big.adapters[2] {
        a.rank_scale = Some(rng.symmetric_vec(a.rank, 2.0));
        a.out_scale = Some(rng.symmetric_vec(shape.out_features, 2.0));
    }
    let together = big.ours();
    let (inp, out) = (shape.in_features, shape.out_features);
    for t in [0, 3, 39, 40, 42, 43, 50, 80] {
        let mut alone = Case::new(&mut rng, &slots[t..t + 1], shape, &[]);
        alone.adapters = ranks
            .iter()
            .zip(&big.adapters)
            .map(|(_, a)| a.clone())
            .collect();
        alone.x = big.x[t * inp..(t + 1) * inp].to_vec();
        alone.y0 = big.y0[t * out..(t + 1) * out].to_vec();
        assert_eq!(alone.ours(), together[t * out..(t + 1) * out], "token {t}");
    }
    // The thread count changes the split, not the result.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    assert_eq!(pool.install(|| big.ours()), together);
}

#[test]
fn strided_input_is_gathered_first() {
    // `lora_apply` takes contiguous x; a column window of a wider activation is gathered
    // into a copy, and the result matches a naive f64 sum over the strided view itself.
    let mut rng = Xoshiro256::from_seed(6);
    let (t, inp, out, wide, col0) = (9, 70, 33, 200, 57);
    let big = rng.symmetric_vec(t * wide, 1.0);
    let x: Vec<f32> = (0..t)
        .flat_map(|r| big[r * wide + col0..r * wide + col0 + inp].to_vec())
        .collect();
    let shape = SiteShape {
        in_features: inp,
        out_features: out,
        y_stride: out,
        y_offset: 0,
    };
    let slots = [1, 0, 0, -1, 1, 1, 1, 0, 2];
    let mut case = Case::new(&mut rng, &slots, shape, &[Some(5), Some(12), Some(1)]);
    case.x = x;
    let got = case.check("gathered");
    for (r, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        let Some(ad) = &case.adapters[s as usize] else {
            continue;
        };
        let view = &big[r * wide + col0..];
        let (a, b) = (ad.a.to_f32(), ad.b.to_f32());
        let rank_scale = |k: usize| ad.rank_scale.as_ref().map_or(1.0, |v| v[k] as f64);
        let out_scale = |o: usize| ad.out_scale.as_ref().map_or(1.0, |v| v[o] as f64);
        let h: Vec<f64> = (0..ad.rank)
            .map(|k| {
                let dot: f64 = (0..inp)
                    .map(|i| a[k * inp + i] as f64 * view[i] as f64)
                    .sum();
                dot * rank_scale(k)
            })
            .collect();
        for o in 0..out {
            let d: f64 = (0..ad.rank).map(|k| b[o * ad.rank + k] as f64 * h[k]).sum();
            let d = d * out_scale(o);
            let want = case.y0[r * out + o] as f64 + ad.scale as f64 * d;
            let g = got[r * out + o] as f64;
            assert!(
                (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{r},{o}: {g} vs {want}"
            );
        }
    }
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let mut rng = Xoshiro256::from_seed(7);
    let shape = SiteShape {
        in_features: 16,
        out_features: 8,
        y_stride: 8,
        y_offset: 0,
    };
    let case = Case::new(&mut rng, &[0, 1], shape, &[Some(2), Some(3)]);
    let err = |batch: &LoraBatch, x: &[f32], y_len: usize, shape, slots: &[Option<SlotWeights>]| {
        let mut y = vec![0.0; y_len];
        let e = lora_apply(batch, x, &mut y, shape, slots)
            .unwrap_err()
            .to_string();
        let r = lora_apply_reference(batch, x, &mut y, shape, slots)
            .unwrap_err()
            .to_string();
        assert_eq!(e, r);
        e
    };
    let slots = case.slots();
    let b = &case.batch;
    assert!(err(b, &case.x[1..], 16, shape, &slots).contains("x has 31 elements"));
    assert!(err(b, &case.x, 15, shape, &slots).contains("y has 15 elements"));
    let wide = SiteShape {
        y_offset: 1,
        ..shape
    };
    assert!(err(b, &case.x, 16, wide, &slots).contains("exceed y_stride"));
    assert!(err(b, &case.x, 16, shape, &slots[..1]).contains("adapter slot 1"));
    let mut bad = slots.clone();
    bad[1] = Some(SlotWeights {
        rank: 4,
        ..slots[1].unwrap()
    });
    assert!(err(b, &case.x, 16, shape, &bad).contains("slot 1: lora_A has 48 elements"));
    bad[1] = Some(SlotWeights {
        b: LoraView::F32(&[0.0; 5]),
        ..slots[1].unwrap()
    });
    assert!(err(b, &case.x, 16, shape, &bad).contains("slot 1: lora_B has 5 elements"));
    bad[1] = Some(SlotWeights {
        rank: 0,
        a: LoraView::F32(&[]),
        b: LoraView::F32(&[]),
        scale: 1.0,
        rank_scale: None,
        out_scale: None,
    });
    assert!(err(b, &case.x, 16, shape, &bad).contains("rank is 0"));
}
