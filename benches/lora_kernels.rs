//! The batched LoRA kernels vs the reference (`lora_apply_reference`), side by side in one
//! run: decode (T=32, 32 distinct adapters) and prefill (T=1024, 4 adapters x 256 tokens),
//! ranks 8/16/64, hidden 576 and 4096 (in = out = hidden). Reports the median time of
//! each (`hot`: one adapter set, reused, so cache-resident), the speedup, and ours with
//! `cold` weights (a fresh adapter set each run, from an arena larger than the last-level
//! cache, as a model's 30 layers x 7 sites are) against the memory roofline: bytes of A,
//! B, x and y touched over the read bandwidth measured in the same run (512 MiB parallel
//! read). `cold bf16` is ours on cold weights stored in bf16 (as the bf16 and quantized
//! base modes store adapters), and `bf16 gain` its speedup over cold f32 in the same run.
//! `cargo bench --bench lora_kernels` (`LORA_BENCH=decode/4096` selects rows); under
//! `cargo test` one tiny pass only.
#[path = "support/roofline.rs"]
mod roofline;

use half::bf16;
use multilora::lora::batch::LoraBatch;
use multilora::lora::kernels::{lora_apply, lora_apply_reference, SiteShape, SlotWeights};
use multilora::lora::values::LoraView;
use roofline::read_bandwidth;
use std::time::{Duration, Instant};

/// Size of the arena `cold` weights rotate through (more than a 480 MiB L3).
const COLD_BYTES: usize = 768 << 20;

struct Config {
    name: &'static str,
    tokens: usize,
    adapters: usize,
    rank: usize,
    hidden: usize,
}

impl Config {
    /// Values of one adapter set: A and B per adapter.
    fn set_len(&self) -> usize {
        2 * self.adapters * self.rank * self.hidden
    }

    /// The slot table over one adapter set laid out in `w` (`set_len` values).
    fn slots<'a, E>(&self, w: &'a [E]) -> Vec<Option<SlotWeights<'a>>>
    where
        &'a [E]: Into<LoraView<'a>>,
    {
        w.chunks_exact(2 * self.rank * self.hidden)
            .map(|ab| {
                let (a, b) = ab.split_at(self.rank * self.hidden);
                Some(SlotWeights {
                    rank: self.rank,
                    scale: 2.0,
                    a: a.into(),
                    b: b.into(),
                    rank_scale: None,
                    out_scale: None,
                })
            })
            .collect()
    }
}

fn pattern(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 31 + seed) % 97) as f32 / 970.0 - 0.05)
        .collect()
}

/// Weights for `cold` runs, allocated once for the whole run; a cursor hands out the
/// least recently used region next.
struct Arena<E> {
    data: Vec<E>,
    cursor: usize,
}

impl<E> Arena<E> {
    fn next(&mut self, len: usize) -> &[E] {
        if self.cursor + len > self.data.len() {
            self.cursor = 0;
        }
        self.cursor += len;
        &self.data[self.cursor - len..self.cursor]
    }
}

struct Row {
    ref_ms: f64,
    hot_ms: f64,
    cold_ms: f64,
    cold_bf16_ms: f64,
    bytes: f64,
}

/// The median time of `run` over fresh slot tables from `arena`.
fn cold_median<E>(
    iters: usize,
    c: &Config,
    arena: &mut Arena<E>,
    run: &mut impl FnMut(&[Option<SlotWeights>]),
) -> Duration
where
    for<'a> &'a [E]: Into<LoraView<'a>>,
{
    let mut times: Vec<Duration> = (0..iters)
        .map(|_| {
            let slots = c.slots(arena.next(c.set_len()));
            let t = Instant::now();
            run(&slots);
            t.elapsed()
        })
        .collect();
    times.sort();
    times[iters / 2]
}

/// Medians of `f(false)` and `f(true)`, timed in alternating blocks of `BLOCK` runs (each
/// block after one untimed warm-up run), so a noisy neighbour slows both sides alike.
fn paired_medians(iters: usize, mut f: impl FnMut(bool)) -> (Duration, Duration) {
    const BLOCK: usize = 5;
    let mut times = [Vec::with_capacity(iters), Vec::with_capacity(iters)];
    while times[1].len() < iters {
        let n = BLOCK.min(iters - times[1].len());
        for (side, out) in times.iter_mut().enumerate() {
            f(side == 1);
            for _ in 0..n {
                let t = Instant::now();
                f(side == 1);
                out.push(t.elapsed());
            }
        }
    }
    let [mut a, mut b] = times;
    a.sort();
    b.sort();
    (a[iters / 2], b[iters / 2])
}

/// The two arenas of cold weights: f32 and bf16.
type Arenas = (Arena<f32>, Arena<bf16>);

fn measure(c: &Config, iters: usize, arenas: Option<&mut Arenas>) -> Row {
    let h = c.hidden;
    // Sequences are contiguous: adapter k owns tokens [k*T/n, (k+1)*T/n).
    let per = c.tokens / c.adapters;
    let slots: Vec<i32> = (0..c.tokens).map(|t| (t / per) as i32).collect();
    let batch = LoraBatch::new(&slots);
    let x = pattern(c.tokens * h, 1);
    let mut y = vec![0f32; c.tokens * h];
    let shape = SiteShape {
        in_features: h,
        out_features: h,
        y_stride: h,
        y_offset: 0,
    };
    let hot = pattern(c.set_len(), 2);
    let hot_slots = c.slots(&hot);
    // Both add into the same y, so both see the same caches.
    let (ref_t, hot_t) = paired_medians(iters, |ours| {
        if ours {
            lora_apply(&batch, &x, &mut y, shape, &hot_slots).unwrap()
        } else {
            lora_apply_reference(&batch, &x, &mut y, shape, &hot_slots).unwrap()
        }
    });
    let mut run = |slots: &[Option<SlotWeights>]| {
        lora_apply(&batch, &x, &mut y, shape, slots).unwrap();
    };
    let (cold_t, cold_bf16_t) = match arenas {
        Some((f32s, bf16s)) => (
            cold_median(iters, c, f32s, &mut run),
            cold_median(iters, c, bf16s, &mut run),
        ),
        None => (hot_t, hot_t),
    };
    std::hint::black_box(&y);
    // A and B once each, x read, y read and written.
    let bytes = ((c.set_len() + c.tokens * h * 3) * 4) as f64;
    Row {
        ref_ms: ref_t.as_secs_f64() * 1e3,
        hot_ms: hot_t.as_secs_f64() * 1e3,
        cold_ms: cold_t.as_secs_f64() * 1e3,
        cold_bf16_ms: cold_bf16_t.as_secs_f64() * 1e3,
        bytes,
    }
}

fn configs(quick: bool) -> Vec<Config> {
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
    // LORA_BENCH=decode/576 (a substring of "shape/hidden/rank/") limits the run.
    if let Ok(filter) = std::env::var("LORA_BENCH") {
        configs.retain(|c| format!("{}/{}/{}/", c.name, c.hidden, c.rank).contains(&filter));
    }
    if quick {
        configs.retain(|c| c.hidden == 576 && c.rank == 8);
        for c in &mut configs {
            c.tokens /= 4;
            c.adapters = c.adapters.min(c.tokens);
        }
    }
    configs
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let iters = if quick { 1 } else { 31 };
    let configs = configs(quick);
    let bw = read_bandwidth(if quick { 1 } else { 10 });
    let mut arenas: Option<Arenas> = (!quick).then(|| {
        let f32s = Arena {
            data: pattern(COLD_BYTES / 4, 3),
            cursor: 0,
        };
        let bf16s = Arena {
            data: pattern(COLD_BYTES / 2, 4)
                .into_iter()
                .map(bf16::from_f32)
                .collect(),
            cursor: 0,
        };
        (f32s, bf16s)
    });
    // One untimed pass first, so the allocator is in its steady state for the reference's
    // temporaries (as in a long-running server) before anything is timed.
    for c in &configs {
        measure(c, 1, None);
    }
    println!(
        "threads {}  read bandwidth {:.1} GB/s  (median of {iters} runs)",
        rayon::current_num_threads(),
        bw / 1e9
    );
    println!(
        "{:<8} {:>6} {:>4} {:>6} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "shape",
        "hidden",
        "rank",
        "MB",
        "ref_ms",
        "hot_ms",
        "speedup",
        "cold_ms",
        "cold_GB/s",
        "fraction",
        "bf16_ms",
        "bf16 gain"
    );
    for c in &configs {
        let row = measure(c, iters, arenas.as_mut());
        let cold_bw = row.bytes / (row.cold_ms / 1e3);
        println!(
            "{:<8} {:>6} {:>4} {:>6.1} {:>9.3} {:>9.3} {:>7.1}x {:>9.3} {:>9.1} {:>8.2} {:>9.3} {:>8.2}x",
            c.name,
            c.hidden,
            c.rank,
            row.bytes / 1e6,
            row.ref_ms,
            row.hot_ms,
            row.ref_ms / row.hot_ms,
            row.cold_ms,
            cold_bw / 1e9,
            cold_bw / bw,
            row.cold_bf16_ms,
            row.cold_ms / row.cold_bf16_ms
        );
    }
}
