//! Large zero-initialised buffers that cost memory only as they fill: a
//! [`ZeroedBuffer`] is fresh anonymous memory from the operating system (a private
//! mapping), whose pages are zero and become resident when first written. The paged
//! K/V pool uses it, so a server sized for a gigabyte of K/V holds only the blocks its
//! sequences have written, instead of the whole pool zeroed up front (heap memory that
//! `calloc` reuses after the model's load must be cleared, which makes it resident).
//!
//! Invariant: the mapping holds at least `len * size_of::<E>()` bytes, page-aligned, and
//! lives exactly as long as the buffer; `E` is a [`ZeroIsValid`] type, so the zero pages
//! are `len` valid values of 0.
use anyhow::{Context, Result};
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// A plain value type whose all-zero bytes are a valid value (0) and whose alignment
/// is at most a page.
///
/// # Safety
/// Implement only for types with no padding, no invalid bit patterns and no drop glue
/// (f32, bf16, integers).
pub unsafe trait ZeroIsValid: Copy + Send + Sync + 'static {}

// SAFETY: IEEE 754 +0.0 is all-zero bits; every bit pattern is a valid f32.
unsafe impl ZeroIsValid for f32 {}
// SAFETY: bf16 is a u16 wrapper; all-zero bits are +0.0 and every pattern is valid.
unsafe impl ZeroIsValid for half::bf16 {}

/// `len` values of `E`, all zero, in their own anonymous mapping.
pub struct ZeroedBuffer<E> {
    map: memmap2::MmapMut,
    len: usize,
    _values: PhantomData<E>,
}

impl<E: ZeroIsValid> ZeroedBuffer<E> {
    pub fn new(len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<E>())
            .context("buffer size overflows")?;
        // A zero-length mapping is refused by the system: map one byte instead.
        let map = memmap2::MmapMut::map_anon(bytes.max(1))
            .with_context(|| format!("mapping {bytes} bytes of anonymous memory"))?;
        Ok(Self {
            map,
            len,
            _values: PhantomData,
        })
    }
}

impl<E: ZeroIsValid> Deref for ZeroedBuffer<E> {
    type Target = [E];

    fn deref(&self) -> &[E] {
        // SAFETY: the mapping is page-aligned (at least E's alignment), holds `len`
        // values of E (module invariant), zero or written through `deref_mut` only, and
        // every such bit pattern is a valid E (`ZeroIsValid`); the slice borrows self.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<E>(), self.len) }
    }
}

impl<E: ZeroIsValid> DerefMut for ZeroedBuffer<E> {
    fn deref_mut(&mut self) -> &mut [E] {
        // SAFETY: as for `deref`, and the mutable borrow of self makes it exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().cast::<E>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_zero_and_keep_what_is_written() {
        let mut b = ZeroedBuffer::<f32>::new(5000).unwrap();
        assert!(b.iter().all(|v| *v == 0.0));
        b[4999] = 2.5;
        assert_eq!((b.len(), b[4999], b[0]), (5000, 2.5, 0.0));
        let h = ZeroedBuffer::<half::bf16>::new(3).unwrap();
        assert_eq!(h.iter().map(|v| v.to_f32()).sum::<f32>(), 0.0);
        assert!(ZeroedBuffer::<f32>::new(0).unwrap().is_empty());
    }
}
