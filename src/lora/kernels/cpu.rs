//! Fast CPU LoRA kernels: shrink `h = (scale * w) * x A^T` into an f32 scratch (each entry
//! its own rank, no padding), then expand `y += h B^T`, with AVX2/FMA tiles and a portable
//! fallback. Work is cut into rectangles of one segment (runs of its tokens, and of its
//! rank rows or output columns) run on rayon's pool: one parallel region where runs of
//! tokens balance the threads (each rectangle shrinks, then expands, its own tokens), two
//! (all shrinks, then all expands, split finer) where they do not; small calls stay on
//! the calling thread.
//!
//! SGMV vs BGMV: a rectangle of at least `SGMV_MIN_TOKENS` tokens expands against `B^T`
//! packed once per 16 columns (a GEMM-like register tile of 6 tokens x 16 columns); a
//! shorter one (decode: one token per adapter) transposes 8x8 blocks of PEFT's
//! `[out, rank]` rows in registers and reads each `B` exactly once. The shrink is a
//! dot-product tile (up to 3 tokens x 4 rank rows) along `in` in both cases.
//!
//! Storage: `A` and `B` are read as the adapter stores them (f32, or bf16 widened exactly
//! in registers), always with f32 accumulation, so a bf16 adapter computes what its
//! widened f32 values would. A slot's rank scales multiply its rectangle of `h` after the
//! shrink; its output scales multiply the rectangle's rows of `B` into a scratch (f32)
//! that the expand then reads, so every path rounds them the same way.
//!
//! Batch invariance: every element has one fixed summation order whatever the batch
//! (tile sizes, SGMV or BGMV, thread split), so a token's result is bit-identical alone or
//! in any batch, like the base model's packed linear layers (on one machine and ISA).
//!
//! Invariants (what makes the raw-pointer writes sound): the caller validated every length
//! (`super::validate`); shrink rectangles partition each segment's (entries x ranks) and
//! segments own disjoint blocks of `h`; expand rectangles partition each segment's
//! (entries x site columns), and when a token may have several entries (so two segments
//! can write one row) each expand task owns whole column blocks across every segment.
//! Only the site's columns of adapter tokens are written.
#[cfg(target_arch = "x86_64")]
mod avx2;

use std::cell::Cell;
use std::thread::LocalKey;

use rayon::prelude::*;

use super::{SiteShape, SlotWeights};
use crate::lora::batch::LoraBatch;
use crate::lora::values::LoraView;
use crate::simd::{dot, Isa, SharedMutPtr, Widen};

/// Rectangles with at least this many tokens use the packed (SGMV) expand.
const SGMV_MIN_TOKENS: usize = 16;
/// Shrink tile: tokens x rank rows.
const SHRINK_M: usize = 3;
const SHRINK_R: usize = 4;
/// Packed expand tile: tokens x `NR` output columns (one panel).
const EXPAND_M: usize = 6;
const NR: usize = 16;
/// Phases with less work (multiply-adds) than this run on the calling thread.
const SERIAL_WORK: usize = 1 << 18;
/// Smallest rectangle worth a task, and how many tasks per thread to aim for.
const MIN_TASK_WORK: usize = 1 << 15;
const TASKS_PER_THREAD: usize = 4;

thread_local! {
    /// The shrink output `h`, on the calling thread, reused across calls.
    static H_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// A packed panel of `B`, on each worker thread.
    static PANEL: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// A rectangle's rows of `B` times their output scales, on each worker thread.
    static SCALED_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a scratch buffer of `len` elements taken from `key` (re-entrant: a nested
/// call finds the cell empty and allocates its own).
fn with_scratch<R>(
    key: &'static LocalKey<Cell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = key.with(Cell::take);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    key.with(|c| c.set(buf));
    out
}

/// One segment with weights at this site.
#[derive(Clone, Copy)]
struct Job<'a> {
    tokens: &'a [u32],
    weights: &'a [f32],
    w: SlotWeights<'a>,
    /// Start of this job's `[len, rank]` block in `h`.
    h: usize,
}

/// A rectangle of one job: its entries `t0..t1` and its rank rows (shrink) or site
/// columns (expand) `c0..c1`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    job: usize,
    t0: usize,
    t1: usize,
    c0: usize,
    c1: usize,
}

impl Unit {
    fn cols(&self, c0: usize, c1: usize) -> Unit {
        Unit { c0, c1, ..*self }
    }
}

/// Everything a rectangle needs besides its job.
struct Ctx<'a> {
    x: &'a [f32],
    h: SharedMutPtr<f32>,
    y: SharedMutPtr<f32>,
    shape: SiteShape,
    isa: Isa,
}

/// The fast path of [`super::lora_apply`]; the arguments are already validated.
pub(super) fn apply(
    batch: &LoraBatch,
    x: &[f32],
    y: &mut [f32],
    shape: SiteShape,
    slots: &[Option<SlotWeights>],
    isa: Isa,
) {
    let mut jobs = Vec::with_capacity(batch.segments().len());
    let mut h_len = 0;
    for seg in batch.segments() {
        if let Some(Some(w)) = slots.get(seg.slot as usize) {
            jobs.push(Job {
                tokens: &batch.sorted_tokens()[seg.range()],
                weights: &batch.sorted_weights()[seg.range()],
                w: *w,
                h: h_len,
            });
            h_len += seg.len as usize * w.rank;
        }
    }
    if jobs.is_empty() {
        return;
    }
    let (inp, out) = (shape.in_features, shape.out_features);
    with_scratch(&H_SCRATCH, h_len, |h| {
        let ctx = Ctx {
            x,
            h: SharedMutPtr::new(h),
            y: SharedMutPtr::new(y),
            shape,
            isa,
        };
        // Disjoint rows per segment only while every token has at most one entry; with
        // mixtures, the expand gives each thread whole column blocks across every job
        // instead (in job order, so each element's sum keeps its one order).
        if batch.max_entries_per_token() > 1 {
            let shrink = plan(&jobs, |j| (j.w.rank, inp), SHRINK_M, SHRINK_R);
            run(&shrink, |u| shrink_unit(&ctx, &jobs[u.job], u));
            expand_by_column_blocks(&ctx, &jobs, out);
            return;
        }
        // One parallel region, each rectangle shrinking then expanding its own tokens, when
        // runs of tokens alone balance the threads (decode with several adapters, prefill);
        // otherwise two regions split finer (a few tokens on a large adapter).
        let fused = plan(&jobs, |j| (1, j.w.rank * (inp + out)), SGMV_MIN_TOKENS, 1);
        if fused.work < SERIAL_WORK || fused.balanced() {
            run(&fused, |u| {
                let job = &jobs[u.job];
                shrink_unit(&ctx, job, &u.cols(0, job.w.rank));
                expand_unit(&ctx, job, &u.cols(0, out));
            });
            return;
        }
        let shrink = plan(&jobs, |j| (j.w.rank, inp), SHRINK_M, SHRINK_R);
        run(&shrink, |u| shrink_unit(&ctx, &jobs[u.job], u));
        let expand = plan(&jobs, |j| (out, j.w.rank), SGMV_MIN_TOKENS, NR);
        run(&expand, |u| expand_unit(&ctx, &jobs[u.job], u));
    });
}

/// The expand of every job, each thread owning whole blocks of the site's columns (a
/// multiple of `NR`) over every job in order: no two threads write one element, however
/// many jobs write one row.
fn expand_by_column_blocks(ctx: &Ctx, jobs: &[Job], out: usize) {
    let threads = rayon::current_num_threads().max(1);
    let block = out
        .div_ceil(threads * TASKS_PER_THREAD)
        .next_multiple_of(NR)
        .max(NR);
    let work: usize = jobs.iter().map(|j| j.tokens.len() * j.w.rank * out).sum();
    let expand_block = |&c0: &usize| {
        let c1 = (c0 + block).min(out);
        for (i, job) in jobs.iter().enumerate() {
            let unit = Unit {
                job: i,
                t0: 0,
                t1: job.tokens.len(),
                c0,
                c1,
            };
            expand_unit(ctx, job, &unit);
        }
    };
    let blocks: Vec<usize> = (0..out).step_by(block).collect();
    if work < SERIAL_WORK || threads == 1 {
        blocks.iter().for_each(expand_block);
    } else {
        blocks.par_iter().for_each(expand_block);
    }
}

struct Plan {
    units: Vec<Unit>,
    /// Multiply-adds in all.
    work: usize,
    /// Multiply-adds of the largest unit.
    max_unit: usize,
    /// Units per rayon task at least.
    min_len: usize,
}

impl Plan {
    /// No unit exceeds one thread's fair share of the work.
    fn balanced(&self) -> bool {
        self.max_unit * rayon::current_num_threads() <= self.work
    }
}

/// Splits every job into rectangles of about equal work: whole column ranges and runs of
/// tokens (multiples of `tok_mult`) first, and when a job has too few tokens for that,
/// column ranges (multiples of `col_mult`). `dims(job)` is (columns, work per column per
/// token).
fn plan(
    jobs: &[Job],
    dims: impl Fn(&Job) -> (usize, usize),
    tok_mult: usize,
    col_mult: usize,
) -> Plan {
    let work: usize = jobs
        .iter()
        .map(|j| {
            let (cols, k) = dims(j);
            j.tokens.len() * cols * k
        })
        .sum();
    let threads = rayon::current_num_threads().max(1);
    let target = (work / (threads * TASKS_PER_THREAD)).max(MIN_TASK_WORK);
    let mut units = Vec::with_capacity(jobs.len());
    let mut max_unit = 0;
    for (job, j) in jobs.iter().enumerate() {
        let (cols, k) = dims(j);
        let len = j.tokens.len();
        let tb = target
            .div_ceil(cols * k)
            .next_multiple_of(tok_mult)
            .clamp(1, len);
        let cb = if tb == len {
            target
                .div_ceil(k * len)
                .next_multiple_of(col_mult)
                .clamp(1, cols)
        } else {
            cols
        };
        max_unit = max_unit.max(tb * cb * k);
        for t0 in (0..len).step_by(tb) {
            for c0 in (0..cols).step_by(cb) {
                units.push(Unit {
                    job,
                    t0,
                    t1: (t0 + tb).min(len),
                    c0,
                    c1: (c0 + cb).min(cols),
                });
            }
        }
    }
    let min_len = (target * units.len() / work.max(1)).max(1);
    Plan {
        units,
        work,
        max_unit,
        min_len,
    }
}

fn run(plan: &Plan, f: impl Fn(&Unit) + Sync + Send) {
    if plan.work < SERIAL_WORK || rayon::current_num_threads() == 1 {
        plan.units.iter().for_each(f);
    } else {
        plan.units.par_iter().with_min_len(plan.min_len).for_each(f);
    }
}

/// `h[e, c0..c1] = scale * w_e * A[c0..c1] x[t_e]` for the rectangle's entries, each rank
/// then times its rank scale if the slot has them.
fn shrink_unit(ctx: &Ctx, job: &Job, u: &Unit) {
    match job.w.a {
        LoraView::F32(a) => shrink_rows(ctx, job, u, a),
        LoraView::Bf16(a) => shrink_rows(ctx, job, u, a),
    }
    let Some(d) = job.w.rank_scale else {
        return;
    };
    let r = job.w.rank;
    for e in u.t0..u.t1 {
        for (rr, &s) in d.iter().enumerate().take(u.c1).skip(u.c0) {
            // SAFETY: (e, rr) lies in this rectangle of this job's block of `h`, written
            // just above by this rectangle alone.
            unsafe { *ctx.h.0.add(job.h + e * r + rr) *= s };
        }
    }
}

/// [`shrink_unit`] on `A` stored as `E`.
fn shrink_rows<E: Widen>(ctx: &Ctx, job: &Job, u: &Unit, a: &[E]) {
    #[cfg(target_arch = "x86_64")]
    if ctx.isa >= Isa::Avx2Fma {
        shrink_unit_avx2(ctx, job, u, a);
        return;
    }
    let (inp, r) = (ctx.shape.in_features, job.w.rank);
    for e in u.t0..u.t1 {
        let t = job.tokens[e] as usize;
        let xr = &ctx.x[t * inp..(t + 1) * inp];
        let s = job.w.scale * job.weights[e];
        for rr in u.c0..u.c1 {
            let v = s * dot(xr, &a[rr * inp..(rr + 1) * inp]);
            // SAFETY: (e, rr) lies in this rectangle of this job's block of `h`.
            unsafe { *ctx.h.0.add(job.h + e * r + rr) = v };
        }
    }
}

/// `y[t_e, off + c0..c1] += h[e] B[c0..c1]^T` for the rectangle's entries; with output
/// scales, against rows `out_scale[c] * B[c]` (one rounding per value, whatever the path).
fn expand_unit(ctx: &Ctx, job: &Job, u: &Unit) {
    if let Some(lb) = job.w.out_scale {
        let r = job.w.rank;
        with_scratch(&SCALED_B, (u.c1 - u.c0) * r, |scaled| {
            match job.w.b {
                LoraView::F32(b) => scale_rows(b, lb, u, r, scaled),
                LoraView::Bf16(b) => scale_rows(b, lb, u, r, scaled),
            }
            expand_cols(ctx, job, u, scaled, u.c0);
        });
        return;
    }
    match job.w.b {
        LoraView::F32(b) => expand_cols(ctx, job, u, b, 0),
        LoraView::Bf16(b) => expand_cols(ctx, job, u, b, 0),
    }
}

/// Rows `c0..c1` of `b` (`[out, r]`), row `c` times `scales[c]`, into `dst`.
fn scale_rows<E: Widen>(b: &[E], scales: &[f32], u: &Unit, r: usize, dst: &mut [f32]) {
    for (c, row) in (u.c0..u.c1).zip(dst.chunks_exact_mut(r)) {
        for (d, v) in row.iter_mut().zip(&b[c * r..(c + 1) * r]) {
            *d = v.widen() * scales[c];
        }
    }
}

/// [`expand_unit`] on `B` stored as `E`, whose first row is site column `first`.
fn expand_cols<E: Widen>(ctx: &Ctx, job: &Job, u: &Unit, b: &[E], first: usize) {
    #[cfg(target_arch = "x86_64")]
    if ctx.isa >= Isa::Avx2Fma {
        if u.t1 - u.t0 >= SGMV_MIN_TOKENS {
            expand_sgmv_avx2(ctx, job, u, b, first);
        } else {
            expand_bgmv_avx2(ctx, job, u, b, first);
        }
        return;
    }
    let r = job.w.rank;
    let SiteShape {
        y_stride, y_offset, ..
    } = ctx.shape;
    for e in u.t0..u.t1 {
        let t = job.tokens[e] as usize;
        // SAFETY: entry e's row of `h` is complete (written by this rectangle's own shrink,
        // or by the shrink phase, which has ended) and nobody writes it now.
        let h = unsafe { std::slice::from_raw_parts(ctx.h.0.add(job.h + e * r), r) };
        for c in u.c0..u.c1 {
            let v = dot(h, &b[(c - first) * r..(c - first + 1) * r]);
            // SAFETY: row t, site column c belongs to this rectangle (module invariants).
            unsafe { *ctx.y.0.add(t * y_stride + y_offset + c) += v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn shrink_unit_avx2<E: Widen>(ctx: &Ctx, job: &Job, u: &Unit, a: &[E]) {
    // Rank rows outer: the tile's rows of A stay in cache across the token blocks.
    for r0 in (u.c0..u.c1).step_by(SHRINK_R) {
        let rr = SHRINK_R.min(u.c1 - r0);
        for e0 in (u.t0..u.t1).step_by(SHRINK_M) {
            match SHRINK_M.min(u.t1 - e0) {
                1 => shrink_tile::<1, E>(ctx, job, e0, r0, rr, a),
                2 => shrink_tile::<2, E>(ctx, job, e0, r0, rr, a),
                _ => shrink_tile::<3, E>(ctx, job, e0, r0, rr, a),
            }
        }
    }
}

/// M entries from `e0` x rank rows `r0..r0 + rr`.
#[cfg(target_arch = "x86_64")]
fn shrink_tile<const M: usize, E: Widen>(
    ctx: &Ctx,
    job: &Job,
    e0: usize,
    r0: usize,
    rr: usize,
    a: &[E],
) {
    let (inp, r) = (ctx.shape.in_features, job.w.rank);
    let mut xs = [std::ptr::null::<f32>(); M];
    let mut hs = [std::ptr::null_mut::<f32>(); M];
    let mut scale = [0f32; M];
    for m in 0..M {
        let e = e0 + m;
        let t = job.tokens[e] as usize;
        xs[m] = ctx.x[t * inp..(t + 1) * inp].as_ptr();
        // In bounds: entry e, rank r0 of this job's block of `h`.
        hs[m] = ctx.h.0.wrapping_add(job.h + e * r + r0);
        scale[m] = job.w.scale * job.weights[e];
    }
    let a = a[r0 * inp..(r0 + rr) * inp].as_ptr();
    // SAFETY: the CPU has AVX2/FMA (`Isa::get`); x rows and A rows r0..r0+rr have `inp`
    // values (validated lengths); the h elements belong to this rectangle.
    unsafe {
        match rr {
            1 => avx2::shrink_tile::<M, 1, E>(&xs, a, inp, &hs, &scale),
            2 => avx2::shrink_tile::<M, 2, E>(&xs, a, inp, &hs, &scale),
            3 => avx2::shrink_tile::<M, 3, E>(&xs, a, inp, &hs, &scale),
            _ => avx2::shrink_tile::<M, 4, E>(&xs, a, inp, &hs, &scale),
        }
    }
}

/// Where a token tile's rows of `h` and `y` are.
#[cfg(target_arch = "x86_64")]
fn tile_rows<const M: usize>(
    ctx: &Ctx,
    job: &Job,
    e0: usize,
    c0: usize,
) -> ([*const f32; M], [*mut f32; M]) {
    let r = job.w.rank;
    let SiteShape {
        y_stride, y_offset, ..
    } = ctx.shape;
    let mut hs = [std::ptr::null::<f32>(); M];
    let mut ys = [std::ptr::null_mut::<f32>(); M];
    for m in 0..M {
        let e = e0 + m;
        let t = job.tokens[e] as usize;
        // In bounds: entry e of this job's block of `h`; row t, site column c0 of `y`.
        hs[m] = ctx.h.0.wrapping_add(job.h + e * r) as *const f32;
        ys[m] = ctx.y.0.wrapping_add(t * y_stride + y_offset + c0);
    }
    (hs, ys)
}

/// BGMV expand: per 8 site columns, the rectangle's tokens (4 at a time) against `B`
/// transposed in registers straight from its `[out, rank]` rows.
#[cfg(target_arch = "x86_64")]
fn expand_bgmv_avx2<E: Widen>(ctx: &Ctx, job: &Job, u: &Unit, b: &[E], first: usize) {
    let r = job.w.rank;
    for c0 in (u.c0..u.c1).step_by(8) {
        let rows = 8.min(u.c1 - c0);
        let b = b[(c0 - first) * r..(c0 - first + rows) * r].as_ptr();
        for e0 in (u.t0..u.t1).step_by(4) {
            // SAFETY: AVX2/FMA present; `rows` rows of r values at b; h rows complete;
            // the `rows` y elements of each token belong to this rectangle.
            unsafe {
                match 4.min(u.t1 - e0) {
                    1 => bgmv::<1, E>(ctx, job, e0, c0, b, rows),
                    2 => bgmv::<2, E>(ctx, job, e0, c0, b, rows),
                    3 => bgmv::<3, E>(ctx, job, e0, c0, b, rows),
                    _ => bgmv::<4, E>(ctx, job, e0, c0, b, rows),
                }
            }
        }
    }
}

/// # Safety
/// As `avx2::bgmv_tile`.
#[cfg(target_arch = "x86_64")]
unsafe fn bgmv<const M: usize, E: Widen>(
    ctx: &Ctx,
    job: &Job,
    e0: usize,
    c0: usize,
    b: *const E,
    rows: usize,
) {
    let (hs, ys) = tile_rows::<M>(ctx, job, e0, c0);
    avx2::bgmv_tile::<M, E>(b, job.w.rank, rows, &hs, &ys)
}

/// SGMV expand: per panel of `NR` site columns, pack `B^T` once (`[rank, NR]`), then run
/// every token tile of the rectangle against it.
#[cfg(target_arch = "x86_64")]
fn expand_sgmv_avx2<E: Widen>(ctx: &Ctx, job: &Job, u: &Unit, b: &[E], first: usize) {
    let r = job.w.rank;
    with_scratch(&PANEL, r * NR, |panel| {
        for c0 in (u.c0..u.c1).step_by(NR) {
            let cols = NR.min(u.c1 - c0);
            let b = b[(c0 - first) * r..(c0 - first + cols) * r].as_ptr();
            // SAFETY: AVX2/FMA present; `cols` rows of r values at b; the panel has
            // r x NR values.
            unsafe { avx2::pack_panel(b, r, cols, panel) };
            for e0 in (u.t0..u.t1).step_by(EXPAND_M) {
                // SAFETY: as above; h rows complete; these y elements are this rectangle's.
                unsafe {
                    match EXPAND_M.min(u.t1 - e0) {
                        1 => sgmv::<1>(ctx, job, e0, c0, panel, cols),
                        2 => sgmv::<2>(ctx, job, e0, c0, panel, cols),
                        3 => sgmv::<3>(ctx, job, e0, c0, panel, cols),
                        4 => sgmv::<4>(ctx, job, e0, c0, panel, cols),
                        5 => sgmv::<5>(ctx, job, e0, c0, panel, cols),
                        _ => sgmv::<6>(ctx, job, e0, c0, panel, cols),
                    }
                }
            }
        }
    });
}

/// # Safety
/// As `avx2::panel_tile`.
#[cfg(target_arch = "x86_64")]
unsafe fn sgmv<const M: usize>(
    ctx: &Ctx,
    job: &Job,
    e0: usize,
    c0: usize,
    panel: &[f32],
    cols: usize,
) {
    let (hs, ys) = tile_rows::<M>(ctx, job, e0, c0);
    avx2::panel_tile::<M>(&hs, job.w.rank, panel.as_ptr(), &ys, cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::kernels::{lora_apply_reference, validate};
    use crate::lora::values::{AdapterDType, LoraValues};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        crate::rng::test_data(n, seed as u64)
    }

    /// Runs both ISAs and the reference on one case and compares, with the adapter
    /// matrices stored in f32 and in bf16 (the reference widens the same stored values).
    fn check(batch: &LoraBatch, shape: SiteShape, ranks: &[usize], seed: u32) {
        for dtype in [AdapterDType::F32, AdapterDType::Bf16] {
            check_stored(batch, shape, ranks, seed, dtype);
        }
    }

    fn check_stored(
        batch: &LoraBatch,
        shape: SiteShape,
        ranks: &[usize],
        seed: u32,
        dtype: AdapterDType,
    ) {
        let t = batch.num_tokens();
        let (inp, out) = (shape.in_features, shape.out_features);
        let x = data(t * inp, seed);
        let ws: Vec<(LoraValues, LoraValues)> = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                (
                    LoraValues::from_f32(data(r * inp, seed + 7 * i as u32 + 1), dtype),
                    LoraValues::from_f32(data(out * r, seed + 3), dtype),
                )
            })
            .collect();
        let slots: Vec<Option<SlotWeights>> = ws
            .iter()
            .zip(ranks)
            .map(|((a, b), &rank)| {
                (rank > 0).then_some(SlotWeights {
                    rank,
                    scale: 0.5,
                    a: a.view(),
                    b: b.view(),
                    rank_scale: None,
                    out_scale: None,
                })
            })
            .collect();
        let y0 = data(t * shape.y_stride, seed + 99);
        let mut want = y0.clone();
        lora_apply_reference(batch, &x, &mut want, shape, &slots).unwrap();
        let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for isa in [Isa::get(), Isa::Portable] {
            validate(batch, x.len(), y0.len(), shape, &slots).unwrap();
            let mut got = y0.clone();
            apply(batch, &x, &mut got, shape, &slots, isa);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + max),
                    "{isa:?} {dtype:?} elem {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn both_isas_match_the_reference() {
        let shape = |inp, out, y_stride, y_offset| SiteShape {
            in_features: inp,
            out_features: out,
            y_stride,
            y_offset,
        };
        // Decode: one token per adapter, odd ranks and widths (every tail path).
        let slots: Vec<i32> = (0..9).map(|i| if i == 4 { -1 } else { i }).collect();
        let b = LoraBatch::new(&slots);
        check(&b, shape(37, 29, 40, 5), &[1, 3, 8, 9, 0, 16, 17, 5, 2], 1);
        // Prefill-like: long segments (packed expand, kc split of `in`), stacked output.
        let slots: Vec<i32> = (0..90).map(|i| i / 40).collect();
        let b = LoraBatch::new(&slots);
        check(&b, shape(1600, 50, 70, 13), &[7, 16, 3], 2);
        check(&b, shape(64, 64, 64, 0), &[8, 12, 33], 3);
        // One token on a large adapter: too little to split by tokens (two phases).
        check(
            &LoraBatch::new(&[-1, 0]),
            shape(2048, 700, 700, 0),
            &[200],
            4,
        );
    }

    #[test]
    fn weighted_entries_match_the_reference() {
        let entries = vec![
            vec![(0, 0.25), (1, 0.75)],
            vec![],
            vec![(1, 1.0)],
            vec![(2, 0.5), (0, 0.5)],
        ];
        let b = LoraBatch::from_weighted(&entries);
        let shape = SiteShape {
            in_features: 40,
            out_features: 24,
            y_stride: 24,
            y_offset: 0,
        };
        check(&b, shape, &[4, 8, 3], 4);
    }

    /// Mixtures large enough for the parallel column-block expand: against the
    /// reference, and each row bit-identical to its run alone.
    #[test]
    fn large_mixtures_split_by_columns_match_and_stay_batch_invariant() {
        let entries: Vec<Vec<(u32, f32)>> = (0..48)
            .map(|t| match t % 4 {
                0 => vec![(0, 0.5), (1, 0.5)],
                1 => vec![(2, 1.0)],
                2 => vec![],
                _ => vec![(1, -0.3), (2, 0.7), (0, 1.1)],
            })
            .collect();
        let shape = SiteShape {
            in_features: 192,
            out_features: 640,
            y_stride: 640,
            y_offset: 0,
        };
        let b = LoraBatch::from_weighted(&entries);
        check(&b, shape, &[16, 8, 32], 9);
        let ranks = [16usize, 8, 32];
        let ws: Vec<(Vec<f32>, Vec<f32>)> = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| (data(r * 192, 30 + i as u32), data(640 * r, 40 + i as u32)))
            .collect();
        let slots: Vec<Option<SlotWeights>> = ws
            .iter()
            .zip(ranks)
            .map(|((a, b), rank)| {
                Some(SlotWeights {
                    rank,
                    scale: 0.5,
                    a: a.as_slice().into(),
                    b: b.as_slice().into(),
                    rank_scale: None,
                    out_scale: None,
                })
            })
            .collect();
        let x = data(48 * 192, 5);
        let mut together = vec![0.0; 48 * 640];
        apply(&b, &x, &mut together, shape, &slots, Isa::get());
        for t in [0, 3, 5] {
            let alone = LoraBatch::from_weighted(&entries[t..t + 1]);
            let mut y = vec![0.0; 640];
            apply(
                &alone,
                &x[t * 192..(t + 1) * 192],
                &mut y,
                shape,
                &slots,
                Isa::get(),
            );
            assert_eq!(&together[t * 640..(t + 1) * 640], &y[..], "token {t}");
        }
    }
}
