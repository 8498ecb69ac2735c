//! How an adapter's low-rank matrices are stored in host memory: f32, or bf16 (half the
//! bytes) when the base itself is kept in fewer bits. Owns [`AdapterDType`] (the choice,
//! made once per server by the base model's mode), [`LoraValues`] (one matrix's owned
//! values) and [`LoraView`] (the borrowed form the kernels read).
//!
//! Invariants: bf16 values are rounded to nearest-even from the f32 values PEFT's file
//! gives (exactly as torch's `to(bfloat16)`), and widen back to f32 exactly, so a kernel
//! reading bf16 computes what it would on the widened f32 values; every stored value is
//! finite (the loader checks after rounding).
use half::bf16;
use std::borrow::Cow;

use crate::simd::Widen;

/// The storage type of adapter weights in host memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AdapterDType {
    /// Full precision: the f32 base's mode (exact parity with PEFT in f32).
    #[default]
    F32,
    /// Half the bytes, f32 accumulation: the bf16, f16 and quantized base modes.
    Bf16,
}

impl AdapterDType {
    /// Bytes of one stored value.
    pub fn size(self) -> usize {
        match self {
            AdapterDType::F32 => 4,
            AdapterDType::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AdapterDType::F32 => "f32",
            AdapterDType::Bf16 => "bf16",
        }
    }
}

/// One low-rank matrix's values, row-major, in the adapter storage type.
#[derive(Clone, Debug, PartialEq)]
pub enum LoraValues {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl LoraValues {
    /// `values` stored as `dtype` (rounded to nearest-even for bf16).
    pub fn from_f32(values: Vec<f32>, dtype: AdapterDType) -> Self {
        match dtype {
            AdapterDType::F32 => LoraValues::F32(values),
            AdapterDType::Bf16 => {
                LoraValues::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect())
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            LoraValues::F32(v) => v.len(),
            LoraValues::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> AdapterDType {
        match self {
            LoraValues::F32(_) => AdapterDType::F32,
            LoraValues::Bf16(_) => AdapterDType::Bf16,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype().size()
    }

    pub fn view(&self) -> LoraView<'_> {
        match self {
            LoraValues::F32(v) => LoraView::F32(v),
            LoraValues::Bf16(v) => LoraView::Bf16(v),
        }
    }

    /// The values widened to f32 (borrowed when already f32).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        self.view().to_f32()
    }

    /// The index and value of the first non-finite value, if any.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        self.to_f32()
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .map(|(i, v)| (i, *v))
    }
}

/// A borrowed matrix of values, as the kernels read it.
#[derive(Clone, Copy, Debug)]
pub enum LoraView<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> LoraView<'a> {
    pub fn len(&self) -> usize {
        match self {
            LoraView::F32(v) => v.len(),
            LoraView::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values widened to f32 (borrowed when already f32).
    pub fn to_f32(&self) -> Cow<'a, [f32]> {
        match *self {
            LoraView::F32(v) => Cow::Borrowed(v),
            LoraView::Bf16(v) => Cow::Owned(v.iter().map(|x| x.widen()).collect()),
        }
    }
}

impl<'a> From<&'a [f32]> for LoraView<'a> {
    fn from(v: &'a [f32]) -> Self {
        LoraView::F32(v)
    }
}

impl<'a> From<&'a [bf16]> for LoraView<'a> {
    fn from(v: &'a [bf16]) -> Self {
        LoraView::Bf16(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_widens_exactly() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        let v = LoraValues::from_f32(vec![1.0 + 2f32.powi(-8), 3.0, -0.15625], AdapterDType::Bf16);
        assert_eq!(v.to_f32().as_ref(), &[1.0, 3.0, -0.15625]);
        assert_eq!(v.bytes(), 6);
        let f = LoraValues::from_f32(vec![0.1, 0.2], AdapterDType::F32);
        assert_eq!(f.bytes(), 8);
        assert!(matches!(f.to_f32(), Cow::Borrowed(_)));
    }

    #[test]
    fn rounding_can_overflow_and_is_caught() {
        let v = LoraValues::from_f32(vec![0.0, f32::MAX], AdapterDType::Bf16);
        assert_eq!(v.first_non_finite().map(|(i, _)| i), Some(1));
    }
}
