//! GGUF block formats decoded into the CPU's 32-value blocks: for each block of a row,
//! its integer codes and the scales that turn them into values (`value = d * q - m`,
//! with `d` and `m` per half of 16 values). Follows ggml's reference dequantizers
//! (`dequantize_row_*`) bit for bit in the integer codes; the k-quant per-block scales
//! (`d * sc`, `dmin * m`) are products of an f16 and a 6-bit integer, kept in f32.
//!
//! Invariant: the integer codes are ggml's exactly, so a decoded block reproduces ggml's
//! dequantized values to within one f32 rounding (`d * q - m` against ggml's
//! `d * (q - offset)`); the tests check it against candle's dequantizers for every type.
use super::QuantKind;
use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use half::f16;

/// Values per CPU block.
pub const BLOCK: usize = 32;

/// One block of 32 values: `value[i] = d[i / 16] * q[i] - m[i / 16]`, where `q` is
/// unsigned (`U4`, `U8`) or the two's-complement bits of an i8 (`S8`, `m` = 0).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodedBlock {
    pub q: [u8; BLOCK],
    pub d: [f32; 2],
    pub m: [f32; 2],
}

/// The CPU kind a GGUF type is decoded into, or `None` if it is not one we compute on.
pub fn kind_of(dtype: GgmlDType) -> Option<QuantKind> {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => Some(QuantKind::U4),
        GgmlDType::Q4K => Some(QuantKind::K4),
        GgmlDType::Q8_0 => Some(QuantKind::S8),
        GgmlDType::Q5K | GgmlDType::Q6K => Some(QuantKind::U8),
        _ => None,
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn uniform(q: [u8; BLOCK], d: f32, m: f32) -> DecodedBlock {
    DecodedBlock {
        q,
        d: [d, d],
        m: [m, m],
    }
}

/// Decodes one row of `dtype` blocks (`row.len()` a whole number of them).
pub fn decode_row(dtype: GgmlDType, row: &[u8], out: &mut Vec<DecodedBlock>) -> Result<()> {
    out.clear();
    let size = dtype.type_size();
    for b in row.chunks_exact(size) {
        match dtype {
            GgmlDType::Q4_0 => {
                let d = f16_at(b, 0);
                out.push(uniform(nibbles(&b[2..18]), d, 8.0 * d));
            }
            GgmlDType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                out.push(uniform(nibbles(&b[4..20]), d, -m));
            }
            GgmlDType::Q8_0 => {
                let mut q = [0u8; BLOCK];
                q.copy_from_slice(&b[2..34]);
                out.push(uniform(q, f16_at(b, 0), 0.0));
            }
            GgmlDType::Q4K => decode_q4k(b, out),
            GgmlDType::Q5K => decode_q5k(b, out),
            GgmlDType::Q6K => decode_q6k(b, out),
            other => bail!("{other:?} blocks are not computed on directly"),
        }
    }
    Ok(())
}

/// Q4_0/Q4_1 packing: byte j holds value j (low nibble) and value j + 16 (high).
fn nibbles(qs: &[u8]) -> [u8; BLOCK] {
    let mut q = [0u8; BLOCK];
    for (j, &byte) in qs.iter().enumerate() {
        q[j] = byte & 0x0F;
        q[j + 16] = byte >> 4;
    }
    q
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The (d, m) of sub-block `j` of a Q4_K/Q5_K super-block: `d * sc`, `dmin * m`.
fn k_scale(b: &[u8], j: usize) -> (f32, f32) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = scale_min_k4(j, &b[4..16]);
    (d * sc as f32, dmin * m as f32)
}

/// The scales of one Q4_K super-block as the file holds them: block `j`'s are
/// `d * sc[j]` and `dmin * m[j]`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct K4Scales {
    pub d: f32,
    pub dmin: f32,
    pub sc: [u8; 8],
    pub m: [u8; 8],
}

/// The super-block scales of a row of Q4_K blocks.
pub fn q4k_scales(row: &[u8]) -> Vec<K4Scales> {
    row.chunks_exact(GgmlDType::Q4K.type_size())
        .map(|b| {
            let mut s = K4Scales {
                d: f16_at(b, 0),
                dmin: f16_at(b, 2),
                ..K4Scales::default()
            };
            for j in 0..8 {
                (s.sc[j], s.m[j]) = scale_min_k4(j, &b[4..16]);
            }
            s
        })
        .collect()
}

/// Q4_K: 256 values; per 64, 32 bytes whose low nibbles are sub-block 2c and high
/// nibbles sub-block 2c + 1.
fn decode_q4k(b: &[u8], out: &mut Vec<DecodedBlock>) {
    let qs = &b[16..144];
    for c in 0..4 {
        let bytes = &qs[32 * c..32 * (c + 1)];
        for (half, shift) in [(0, 0), (1, 4)] {
            let mut q = [0u8; BLOCK];
            for (l, &byte) in bytes.iter().enumerate() {
                q[l] = (byte >> shift) & 0x0F;
            }
            let (d, m) = k_scale(b, 2 * c + half);
            out.push(uniform(q, d, m));
        }
    }
}

/// Q5_K: as Q4_K plus a fifth bit per value from `qh` (bit 2c for the low sub-block,
/// 2c + 1 for the high one).
fn decode_q5k(b: &[u8], out: &mut Vec<DecodedBlock>) {
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let bytes = &qs[32 * c..32 * (c + 1)];
        for (half, shift) in [(0usize, 0u8), (1, 4)] {
            let bit = 1u8 << (2 * c + half);
            let mut q = [0u8; BLOCK];
            for (l, &byte) in bytes.iter().enumerate() {
                let high = if qh[l] & bit != 0 { 16 } else { 0 };
                q[l] = ((byte >> shift) & 0x0F) + high;
            }
            let (d, m) = k_scale(b, 2 * c + half);
            out.push(uniform(q, d, m));
        }
    }
}

/// Q6_K: 256 values of 6 bits (`ql` low 4, `qh` high 2), offset by 32, one i8 scale per
/// 16 values; per 128 values, four groups of 32 as ggml's `dequantize_row_q6_K` lays
/// them out.
fn decode_q6k(b: &[u8], out: &mut Vec<DecodedBlock>) {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..64 * (n + 1)], &qh[32 * n..32 * (n + 1)]);
        let sc = &scales[8 * n..8 * (n + 1)];
        // Group g of 32: low nibbles of ql[0..32] / ql[32..64], then high nibbles; the
        // two qh bits at 2g.
        for g in 0..4 {
            let mut q = [0u8; BLOCK];
            for l in 0..32 {
                let byte = ql[l + 32 * (g % 2)];
                let low = if g < 2 { byte & 0x0F } else { byte >> 4 };
                let high = (qh[l] >> (2 * g)) & 3;
                q[l] = low | (high << 4);
            }
            let s = [sc[2 * g] as i8 as f32 * d, sc[2 * g + 1] as i8 as f32 * d];
            out.push(DecodedBlock {
                q,
                d: s,
                m: [32.0 * s[0], 32.0 * s[1]],
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::block_rows::BlockRows;
    use candle_core::{Device, Tensor};

    /// Decoding every supported type reproduces candle's dequantized values exactly.
    #[test]
    fn decoded_blocks_match_candles_dequantizers() {
        let (rows, cols) = (3, 512);
        let data = crate::rng::test_data(rows * cols, 7);
        let t = Tensor::new(data, &Device::Cpu)
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        for (_, dtype) in crate::model::backend::cpu::weight::QUANT_TYPES {
            let q = BlockRows::quantize(&t, dtype).unwrap();
            let want = q.dequantize().unwrap().to_vec2::<f32>().unwrap();
            let kind = kind_of(dtype).unwrap();
            let mut blocks = Vec::new();
            for (r, want_row) in want.iter().enumerate() {
                decode_row(dtype, q.row(r), &mut blocks).unwrap();
                assert_eq!(blocks.len(), cols / BLOCK);
                for (i, w) in want_row.iter().enumerate() {
                    let b = &blocks[i / BLOCK];
                    let k = i % BLOCK;
                    let code = match kind {
                        QuantKind::S8 => b.q[k] as i8 as f32,
                        _ => b.q[k] as f32,
                    };
                    let got = b.d[k / 16] * code - b.m[k / 16];
                    assert!(
                        (got - w).abs() <= 1e-6,
                        "{dtype:?} row {r} value {i}: {got} vs {w}"
                    );
                }
            }
        }
    }
}
