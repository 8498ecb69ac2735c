//! A linear weight as quantized blocks, row by row, on the host: what a GGUF file
//! stores (or what `--quant-type` makes of a dense checkpoint), before a backend takes
//! it. Rows are independent (every row is a whole number of blocks), so the loader can
//! permute them (llama.cpp's Q/K order) and stack them (q|k|v) without touching a value.
//!
//! Invariant: `data` holds `rows * row_bytes` bytes, `row_bytes = cols / block_size *
//! type_size` of `dtype`, and `cols` is a multiple of the block size.
use anyhow::{ensure, Context, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

/// `[rows, cols]` values stored as `dtype` blocks, row-major.
#[derive(Clone, Debug)]
pub struct BlockRows {
    pub dtype: GgmlDType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

impl BlockRows {
    /// Checks the byte count against the shape.
    pub fn new(dtype: GgmlDType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        ensure!(
            cols.is_multiple_of(dtype.block_size()),
            "{dtype:?} rows of {cols} values are not whole blocks of {}",
            dtype.block_size()
        );
        let rows_bytes = rows * cols / dtype.block_size() * dtype.type_size();
        ensure!(
            data.len() == rows_bytes,
            "{} bytes for {rows}x{cols} {dtype:?} (expected {rows_bytes})",
            data.len()
        );
        Ok(Self {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// A 2-D quantized tensor's blocks (as read from a GGUF file).
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let (rows, cols) = q.shape().dims2().context("a block weight must be 2-D")?;
        Self::new(q.dtype(), rows, cols, q.data()?.into_owned())
    }

    /// Quantizes a dense `[rows, cols]` tensor to `dtype` (candle's reference
    /// quantizers, as llama.cpp's `quantize` does without an importance matrix).
    pub fn quantize(t: &Tensor, dtype: GgmlDType) -> Result<Self> {
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let q = QTensor::quantize(&t, dtype)
            .with_context(|| format!("quantizing {:?} to {dtype:?}", t.shape()))?;
        Self::from_qtensor(&q)
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// The rows in the order `order` names (row `i` of the result is row `order[i]`).
    pub fn select_rows(&self, order: &[usize]) -> Result<Self> {
        let mut data = Vec::with_capacity(order.len() * self.row_bytes());
        for &r in order {
            ensure!(r < self.rows, "row {r} of {}", self.rows);
            data.extend_from_slice(self.row(r));
        }
        Self::new(self.dtype, order.len(), self.cols, data)
    }

    /// `parts` stacked row-wise (all of one dtype and width), or `None` when they differ
    /// (the caller then stacks dense values instead).
    pub fn stack(parts: &[BlockRows]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.dtype != first.dtype || p.cols != first.cols)
        {
            return None;
        }
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        let rows = parts.iter().map(|p| p.rows).sum();
        Self::new(first.dtype, rows, first.cols, data).ok()
    }

    /// The values as an f32 `[rows, cols]` tensor (candle's dequantizers).
    pub fn dequantize(&self) -> Result<Tensor> {
        let q = qtensor_from_ggml(
            self.dtype,
            &self.data,
            vec![self.rows, self.cols],
            &Device::Cpu,
        )?;
        Ok(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
    }
}

/// llama.cpp's converter permutes each head's Q/K rows (`reshape(h, 2, d/2, in)
/// .swapaxes(1, 2)`); row `i` of the rotate-half layout is row `order[i]` of the file.
pub fn unpermute_qk_order(rows: usize, n_heads: usize) -> Vec<usize> {
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..n_heads {
        for a in 0..2 {
            for b in 0..half {
                order.push(h * head_dim + 2 * b + a);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::unpermute_qk;

    #[test]
    fn the_row_order_is_the_tensor_unpermutation() {
        let (rows, heads) = (24, 3);
        let w = Tensor::arange(0f32, rows as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, 1))
            .unwrap();
        let want: Vec<usize> = unpermute_qk(&w, heads)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| *v as usize)
            .collect();
        assert_eq!(unpermute_qk_order(rows, heads), want);
    }

    #[test]
    fn rows_select_stack_and_dequantize() {
        let t = Tensor::new(crate::rng::test_data(4 * 64, 1), &Device::Cpu)
            .unwrap()
            .reshape((4, 64))
            .unwrap();
        let q = BlockRows::quantize(&t, GgmlDType::Q8_0).unwrap();
        assert_eq!(q.row_bytes(), 2 * 34);
        let swapped = q.select_rows(&[1, 0, 3, 2]).unwrap();
        let both = BlockRows::stack(&[q.clone(), swapped]).unwrap();
        assert_eq!(both.rows, 8);
        let d = both.dequantize().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(d[0], d[5]);
        assert_eq!(d[3], d[6]);
        for (a, b) in d[0].iter().zip(&t.to_vec2::<f32>().unwrap()[0]) {
            assert!((a - b).abs() < 0.02, "{a} vs {b}");
        }
        assert!(BlockRows::new(GgmlDType::Q8_0, 1, 48, vec![0; 34]).is_err());
    }
}
