//! The slow obvious LoRA kernel, the oracle every fast kernel is tested against and the
//! baseline benchmarks report speedups over: for each adapter present in the batch, gather
//! its tokens' rows, two candle matmuls, scale, scatter-add back. Same contract as
//! [`super::lora_apply`]; it shares only the argument validation.
use anyhow::Result;
use candle_core::{Device, Tensor};

use super::{validate, SiteShape, SlotWeights};
use crate::lora::batch::LoraBatch;

/// `y[t, off + o] += w * scale * out_scale[o] * ((x[t] A^T) * rank_scale) B^T)[o]` per
/// adapter entry, the plain way.
pub fn lora_apply_reference(
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
    let (inp, out) = (shape.in_features, shape.out_features);
    let dev = Device::Cpu;
    // One segment per distinct slot: a loop over the adapters present.
    for seg in batch.segments() {
        let Some(w) = slots[seg.slot as usize] else {
            continue;
        };
        let tokens = &batch.sorted_tokens()[seg.range()];
        let weights = &batch.sorted_weights()[seg.range()];
        let mut rows = Vec::with_capacity(tokens.len() * inp);
        for &t in tokens {
            let t = t as usize;
            rows.extend_from_slice(&x[t * inp..(t + 1) * inp]);
        }
        let xs = Tensor::from_vec(rows, (tokens.len(), inp), &dev)?;
        let a = Tensor::from_slice(&w.a.to_f32(), (w.rank, inp), &dev)?;
        let b = Tensor::from_slice(&w.b.to_f32(), (out, w.rank), &dev)?;
        let mut h = xs.matmul(&a.t()?)?;
        if let Some(d) = w.rank_scale {
            h = h.broadcast_mul(&Tensor::from_slice(d, (1, w.rank), &dev)?)?;
        }
        let mut delta = h.matmul(&b.t()?)?;
        if let Some(lb) = w.out_scale {
            delta = delta.broadcast_mul(&Tensor::from_slice(lb, (1, out), &dev)?)?;
        }
        let delta = delta.flatten_all()?.to_vec1::<f32>()?;
        for (k, (&t, &wt)) in tokens.iter().zip(weights).enumerate() {
            let s = w.scale * wt;
            let start = t as usize * shape.y_stride + shape.y_offset;
            let row = &mut y[start..start + out];
            for (dst, d) in row.iter_mut().zip(&delta[k * out..(k + 1) * out]) {
                *dst += s * d;
            }
        }
    }
    Ok(())
}
