//! The LoRA kernels as a candle in-place custom op (`InplaceOp2`): `y += lora(x)` on
//! tensors, for tensor-based callers and as the entry point of the future CUDA kernels.
//!
//! Invariants: the op owns what the kernels read besides the tensors (the step's batch
//! metadata and each slot's weights, behind `Arc`s, so cloning an op is cheap and it can
//! outlive the caller's borrows); `y` is `[T, y_stride]` and `x` is `[T, in]`, both f32 and
//! contiguous; the CPU path is exactly [`super::lora_apply`]; CUDA is refused by name.
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, InplaceOp2, Layout, Tensor};

use super::{lora_apply, SiteShape, SlotWeights};
use crate::lora::batch::LoraBatch;

/// One slot's weights for one site, shared: what [`SlotWeights`] borrows.
#[derive(Clone, Debug)]
pub struct OwnedSlotWeights {
    pub rank: usize,
    pub scale: f32,
    /// `[rank, in]`
    pub a: Arc<[f32]>,
    /// `[out, rank]`
    pub b: Arc<[f32]>,
}

impl OwnedSlotWeights {
    pub fn view(&self) -> SlotWeights<'_> {
        SlotWeights {
            rank: self.rank,
            scale: self.scale,
            a: &self.a,
            b: &self.b,
        }
    }
}

/// `y += lora(x)` for one site of one step.
#[derive(Clone, Debug)]
pub struct LoraOp {
    batch: Arc<LoraBatch>,
    shape: SiteShape,
    slots: Arc<[Option<OwnedSlotWeights>]>,
}

impl LoraOp {
    /// `slots[s]` is `None` when slot s has no weights at this site.
    pub fn new(
        batch: Arc<LoraBatch>,
        shape: SiteShape,
        slots: Arc<[Option<OwnedSlotWeights>]>,
    ) -> Self {
        Self {
            batch,
            shape,
            slots,
        }
    }

    /// Adds the deltas to `y` (`[T, y_stride]`) in place, for input `x` (`[T, in]`).
    pub fn apply(&self, y: &Tensor, x: &Tensor) -> candle_core::Result<()> {
        y.inplace_op2(x, self)
    }
}

/// The contiguous f32 elements of a storage under `layout`, checked against `dims`.
fn f32_rows<'a>(
    data: &'a CpuStorage,
    layout: &Layout,
    dims: [usize; 2],
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = data else {
        candle_core::bail!("lora: {what} must be f32, got {:?}", data.dtype());
    };
    let range = checked_range(layout, dims, what)?;
    Ok(&v[range])
}

fn checked_range(
    layout: &Layout,
    dims: [usize; 2],
    what: &str,
) -> candle_core::Result<std::ops::Range<usize>> {
    if layout.dims() != dims {
        candle_core::bail!(
            "lora: {what} has shape {:?}, expected {dims:?}",
            layout.dims()
        );
    }
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => candle_core::bail!("lora: {what} must be contiguous"),
    }
}

impl InplaceOp2 for LoraOp {
    fn name(&self) -> &'static str {
        "lora-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let t = self.batch.num_tokens();
        let x = f32_rows(s2, l2, [t, self.shape.in_features], "x")?;
        let dtype = s1.dtype();
        let CpuStorage::F32(y) = s1 else {
            candle_core::bail!("lora: y must be f32, got {dtype:?}");
        };
        let range = checked_range(l1, [t, self.shape.y_stride], "y")?;
        let slots: Vec<Option<SlotWeights>> = self
            .slots
            .iter()
            .map(|s| s.as_ref().map(OwnedSlotWeights::view))
            .collect();
        lora_apply(&self.batch, x, &mut y[range], self.shape, &slots)
            .map_err(|e| candle_core::Error::msg(format!("{e:#}")))
    }

    fn cuda_fwd(
        &self,
        _: &mut CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        Err(candle_core::Error::Cuda(
            "lora-apply: the CUDA LoRA kernels are not implemented yet".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn op_matches_lora_apply() {
        let (t, inp, out, stride, off) = (7, 48, 20, 30, 6);
        let batch = Arc::new(LoraBatch::new(&[1, -1, 0, 0, 1, 1, -1]));
        let shape = SiteShape {
            in_features: inp,
            out_features: out,
            y_stride: stride,
            y_offset: off,
        };
        let slot = |rank: usize, seed| {
            Some(OwnedSlotWeights {
                rank,
                scale: 2.0,
                a: data(rank * inp, seed).into(),
                b: data(out * rank, seed + 1).into(),
            })
        };
        let slots: Arc<[Option<OwnedSlotWeights>]> = vec![slot(4, 1), slot(9, 3)].into();
        let (x, y0) = (data(t * inp, 5), data(t * stride, 6));

        let mut want = y0.clone();
        let views: Vec<_> = slots.iter().map(|s| s.as_ref().map(|w| w.view())).collect();
        lora_apply(&batch, &x, &mut want, shape, &views).unwrap();

        let op = LoraOp::new(batch, shape, slots);
        let xt = Tensor::from_vec(x, (t, inp), &Device::Cpu).unwrap();
        let yt = Tensor::from_vec(y0, (t, stride), &Device::Cpu).unwrap();
        op.apply(&yt, &xt).unwrap();
        let got: Vec<f32> = yt.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want);

        // A transposed (non-contiguous) input is refused by name.
        let bad = Tensor::zeros((inp, t), candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let err = op.apply(&yt, &bad).unwrap_err().to_string();
        assert!(err.contains("x must be contiguous"), "{err}");
    }
}
