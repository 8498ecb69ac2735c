//! The batched LoRA kernels vs the reference (`lora_apply_reference`), side by side in one
//! run: decode (T=32, 32 distinct adapters) and prefill (T=1024, 4 adapters x 256 tokens),
//! ranks 8/16/64, hidden 576 and 4096 (in = out = hidden). Reports the median time of
//! each, the speedup, and ours against the memory roofline: bytes of A, B, x and y touched
//! over the read bandwidth measured in the same run (512 MiB parallel read). `hot` reuses
//! one adapter set (cache-resident after the first run); `cold` cycles through copies of
//! the weights larger than the last-level cache, as a model's 30 layers x 7 sites do.
//! `cargo bench --bench lora_kernels`; under `cargo test` one tiny pass only.
#[path = "support/roofline.rs"]
mod roofline;

use multilora::lora::batch::LoraBatch;
use multilora::lora::kernels::{lora_apply, lora_apply_reference, SiteShape, SlotWeights};
use roofline::{median_time, read_bandwidth};
use std::time::{Duration, Instant};

/// Weight bytes the `cold` rotation spans at least (more than a 480 MiB L3).
const COLD_BYTES: usize = 768 << 20;

struct Config {
    name: &'static str,
    tokens: usize,
    adapters: usize,
    rank: usize,
    hidden: usize,
}

/// One set of adapter weights, `[rank, hidden]` and `[hidden, rank]` each.
struct WeightSet {
    a: Vec<Vec<f32>>,
    b: Vec<Vec<f32>>,
}

impl WeightSet {
    fn new(c: &Config, seed: usize) -> Self {
        let n = c.rank * c.hidden;
        let v = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 31 + k * 17 + seed) % 97) as f32 / 970.0 - 0.05)
                .collect()
        };
        WeightSet {
            a: (0..c.adapters).map(|k| v(2 * k)).collect(),
            b: (0..c.adapters).map(|k| v(2 * k + 1)).collect(),
        }
    }

    fn slots(&self, rank: usize) -> Vec<Option<SlotWeights<'_>>> {
        self.a
            .iter()
            .zip(&self.b)
            .map(|(a, b)| {
                Some(SlotWeights {
                    rank,
                    scale: 2.0,
                    a,
                    b,
                })
            })
            .collect()
    }
}

struct Row {
    ref_ms: f64,
    hot_ms: f64,
    cold_ms: f64,
    bytes: f64,
}

/// Medians of `a` and `b` timed alternately, after one warm-up run of each.
fn paired_medians(iters: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    a();
    b();
    let (mut ta, mut tb) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for _ in 0..iters {
        let t = Instant::now();
        a();
        ta.push(t.elapsed());
        let t = Instant::now();
        b();
        tb.push(t.elapsed());
    }
    ta.sort();
    tb.sort();
    (ta[iters / 2], tb[iters / 2])
}

fn measure(c: &Config, iters: usize, cold: bool) -> Row {
    let h = c.hidden;
    // Sequences are contiguous: adapter k owns tokens [k*T/n, (k+1)*T/n).
    let per = c.tokens / c.adapters;
    let slots: Vec<i32> = (0..c.tokens).map(|t| (t / per) as i32).collect();
    let batch = LoraBatch::new(&slots);
    let x: Vec<f32> = (0..c.tokens * h)
        .map(|i| (i % 101) as f32 / 101.0 - 0.5)
        .collect();
    let mut y = vec![0f32; c.tokens * h];
    let mut y2 = y.clone();
    let shape = SiteShape {
        in_features: h,
        out_features: h,
        y_stride: h,
        y_offset: 0,
    };
    let hot = WeightSet::new(c, 0);
    let hot_slots = hot.slots(c.rank);
    // Interleaved, so a noisy neighbour slows both sides alike.
    let (ref_t, hot_t) = paired_medians(
        iters,
        || lora_apply_reference(&batch, &x, &mut y, shape, &hot_slots).unwrap(),
        || lora_apply(&batch, &x, &mut y2, shape, &hot_slots).unwrap(),
    );
    let weight_bytes = 2 * c.adapters * c.rank * h * 4;
    let cold_t = if cold {
        let copies = COLD_BYTES.div_ceil(weight_bytes).max(iters + 1);
        let sets: Vec<WeightSet> = (0..copies).map(|s| WeightSet::new(c, s + 1)).collect();
        // The oldest copies were evicted by the later ones: use them in that order.
        let mut next = 0;
        median_time(iters, || {
            let slots = sets[next % copies].slots(c.rank);
            next += 1;
            lora_apply(&batch, &x, &mut y, shape, &slots).unwrap()
        })
    } else {
        hot_t
    };
    std::hint::black_box((&y, &y2));
    // A and B once each, x read, y read and written.
    let bytes = (weight_bytes + c.tokens * h * 4 * 3) as f64;
    Row {
        ref_ms: ref_t.as_secs_f64() * 1e3,
        hot_ms: hot_t.as_secs_f64() * 1e3,
        cold_ms: cold_t.as_secs_f64() * 1e3,
        bytes,
    }
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let iters = if quick { 1 } else { 31 };
    let bw = read_bandwidth(if quick { 1 } else { 10 });
    println!(
        "threads {}  read bandwidth {:.1} GB/s  (median of {iters} runs)",
        rayon::current_num_threads(),
        bw / 1e9
    );
    println!(
        "{:<8} {:>6} {:>4} {:>6} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8}",
        "shape",
        "hidden",
        "rank",
        "MB",
        "ref_ms",
        "hot_ms",
        "speedup",
        "cold_ms",
        "cold_GB/s",
        "fraction"
    );
    let mut configs = Vec::new();
    for hidden in [576, 4096] {
        for rank in [8, 16, 64] {
            for (name, tokens, adapters) in [("decode", 32, 32), ("prefill", 1024, 4)] {
                configs.push(Config {
                    name,
                    tokens,
                    adapters,
                    rank,
                    hidden,
                });
            }
        }
    }
    if quick {
        configs.retain(|c| c.hidden == 576 && c.rank == 8);
        for c in &mut configs {
            c.tokens /= 4;
            c.adapters = c.adapters.min(c.tokens);
        }
    }
    for c in &configs {
        let row = measure(c, iters, !quick);
        let cold_bw = row.bytes / (row.cold_ms / 1e3);
        println!(
            "{:<8} {:>6} {:>4} {:>6.1} {:>9.3} {:>9.3} {:>7.1}x {:>9.3} {:>9.1} {:>8.2}",
            c.name,
            c.hidden,
            c.rank,
            row.bytes / 1e6,
            row.ref_ms,
            row.hot_ms,
            row.ref_ms / row.hot_ms,
            row.cold_ms,
            cold_bw / 1e9,
            cold_bw / bw
        );
    }
}
