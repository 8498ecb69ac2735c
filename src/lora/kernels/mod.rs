//! Batched low-rank (LoRA) kernels over the ragged batch on host memory: `lora_apply`
//! validates one site's call once and dispatches to the fast CPU kernels (`cpu.rs`);
//! `reference.rs` is the slow obvious oracle; `scale.rs` applies the per-token column
//! scales of DoRA and (IA)³. The CPU backend's `Backend::lora` calls `lora_apply` then
//! `scale_output`; another backend brings its own kernels with the same semantics,
//! checked against the same oracle.
//!
//! Semantics, for input `x: [T, in]` (row-major, contiguous) and output rows of stride
//! `y_stride` whose site columns start at `y_offset`:
//! `y[t, y_offset + o] += w * scale_s * sum_r B_s[o, r] * (sum_i A_s[r, i] * x[t, i])` for
//! every adapter entry `(s, w)` of token t (one entry, `w = 1`, for a plain adapter
//! token; several for a mixture). A slot may also scale each rank's shrink output
//! (`rank_scale[r]`, after `w * scale_s`) and each row of `B` (`out_scale[o]`): VeRA's
//! `lambda_b * (B (lambda_d * (A x)))` over projections shared by many adapters.
//! Invariants: tokens without an adapter, slots without weights at this site and the
//! columns outside `[y_offset, y_offset + out)` are never written (bit-identical); ranks
//! are never padded; accumulation is in f32, whatever the matrices' storage type.
mod cpu;
pub mod reference;
mod scale;

use anyhow::{bail, ensure, Result};

use crate::lora::batch::LoraBatch;
use crate::lora::values::LoraView;

pub use reference::lora_apply_reference;
pub use scale::{add_output_offset, scale_input, scale_output};

/// One adapter slot's weights for one site, as the kernels read them (each matrix f32 or
/// bf16, as stored).
#[derive(Clone, Copy, Debug)]
pub struct SlotWeights<'a> {
    pub rank: usize,
    pub scale: f32,
    /// `[rank, in]`, row-major (PEFT `lora_A`).
    pub a: LoraView<'a>,
    /// `[out, rank]`, row-major (PEFT `lora_B`).
    pub b: LoraView<'a>,
    /// `[rank]`: each rank's shrink output times this (VeRA's `lambda_d`), or none.
    pub rank_scale: Option<&'a [f32]>,
    /// `[out]`: row `o` of `B` times `out_scale[o]` (VeRA's `lambda_b`), or none.
    pub out_scale: Option<&'a [f32]>,
}

/// The site's shape and where its columns sit in y.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteShape {
    pub in_features: usize,
    pub out_features: usize,
    /// Elements between consecutive rows of y (`>= y_offset + out_features`).
    pub y_stride: usize,
    /// First column of this site in each row of y.
    pub y_offset: usize,
}

/// Adds the LoRA deltas of one site to `y` for every token of `batch` that has an adapter.
///
/// `x` is `[T, in]` contiguous (a strided view must be gathered first) and `y` is
/// `[T, y_stride]`, with `T = batch.num_tokens()`. `slots[s]` is `None` when slot s has no
/// weights at this site (e.g. an adapter targeting only q_proj, at v_proj): its tokens are
/// skipped here. A batch without adapter tokens returns at once, before any check.
pub fn lora_apply(
    batch: &LoraBatch,
    x: &[f32],
    y: &mut [f32],
    shape: SiteShape,
    slots: &[Option<SlotWeights>],
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    validate(batch, x.len(), y.len(), shape, slots)?;
    cpu::apply(batch, x, y, shape, slots, crate::simd::Isa::get());
    Ok(())
}

/// Checks every length the kernels rely on; the CPU kernels index without bounds checks
/// after this. Errors name the mismatch.
pub(crate) fn validate(
    batch: &LoraBatch,
    x_len: usize,
    y_len: usize,
    shape: SiteShape,
    slots: &[Option<SlotWeights>],
) -> Result<()> {
    let t = batch.num_tokens();
    let SiteShape {
        in_features,
        out_features,
        y_stride,
        y_offset,
    } = shape;
    ensure!(
        in_features > 0 && out_features > 0,
        "LoRA site shape has in_features {in_features}, out_features {out_features}: both must be > 0"
    );
    ensure!(
        y_offset
            .checked_add(out_features)
            .is_some_and(|end| end <= y_stride),
        "LoRA site columns [{y_offset}, {y_offset} + {out_features}) exceed y_stride {y_stride}"
    );
    ensure!(
        t.checked_mul(in_features) == Some(x_len),
        "LoRA input x has {x_len} elements, expected {t} tokens x in_features {in_features}"
    );
    ensure!(
        t.checked_mul(y_stride) == Some(y_len),
        "LoRA output y has {y_len} elements, expected {t} tokens x y_stride {y_stride}"
    );
    if let Some(last) = batch.segments().last() {
        // Segments are in increasing slot order: the last has the largest slot.
        ensure!(
            (last.slot as usize) < slots.len(),
            "adapter slot {} is used by the batch but the slot table has {} entries",
            last.slot,
            slots.len()
        );
    }
    for (s, w) in slots.iter().enumerate() {
        let Some(w) = w else { continue };
        if w.rank == 0 {
            bail!("adapter slot {s}: rank is 0");
        }
        ensure!(
            w.rank.checked_mul(in_features) == Some(w.a.len()),
            "adapter slot {s}: lora_A has {} elements, expected rank {} x in_features {in_features}",
            w.a.len(),
            w.rank
        );
        ensure!(
            w.rank.checked_mul(out_features) == Some(w.b.len()),
            "adapter slot {s}: lora_B has {} elements, expected out_features {out_features} x rank {}",
            w.b.len(),
            w.rank
        );
        ensure!(
            w.rank_scale.is_none_or(|v| v.len() == w.rank)
                && w.out_scale.is_none_or(|v| v.len() == out_features),
            "adapter slot {s}: rank or output scales are not rank {} / out_features {out_features} long",
            w.rank
        );
        ensure!(
            w.scale.is_finite(),
            "adapter slot {s}: scale {} is not finite",
            w.scale
        );
    }
    Ok(())
}
