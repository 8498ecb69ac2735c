use super::*;
use candle_core::{Device, Tensor};

/// Every type the kernels compute on (`--quant-type`'s list).
const TYPES: [GgmlDType; 6] = {
    let t = crate::model::backend::cpu::weight::QUANT_TYPES;
    [t[0].1, t[1].1, t[2].1, t[3].1, t[4].1, t[5].1]
};

fn block_rows(out: usize, inp: usize, dtype: GgmlDType, seed: u64) -> BlockRows {
    let t = Tensor::new(crate::rng::test_data(out * inp, seed), &Device::Cpu)
        .unwrap()
        .reshape((out, inp))
        .unwrap();
    BlockRows::quantize(&t, dtype).unwrap()
}

/// `sum_i w[o][i] * scale * q[i]` in f64 from the repacked weights and the quantized
/// activations: what the kernels compute, without their rounding.
fn oracle(w: &QuantWeight, x: &[f32], t: usize) -> Vec<f64> {
    let acts = QuantizedActivations::quantize(x, w.inp);
    let mut row = vec![0f32; w.inp];
    let mut y = vec![0f64; t * w.out];
    for o in 0..w.out {
        w.dequantize_row(o, &mut row);
        for tok in 0..t {
            let a = acts.row(tok);
            y[tok * w.out + o] = row
                .iter()
                .enumerate()
                .map(|(i, v)| *v as f64 * a.scales[i / BLOCK] as f64 * a.qs[i] as f64)
                .sum();
        }
    }
    y
}

#[test]
fn every_type_matches_the_oracle_on_every_path() {
    let (out, inp, t) = (21, 512, 5);
    let x = crate::rng::test_data(t * inp, 9);
    for dtype in TYPES {
        let w = QuantWeight::from_block_rows(&block_rows(out, inp, dtype, 2))
            .unwrap()
            .unwrap();
        let want = oracle(&w, &x, t);
        let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
        let portable = w.matmul_on(&x, t, Isa::Portable);
        for (i, (a, b)) in portable.iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 1e-5 * scale,
                "{dtype:?} element {i}: {a} vs {b}"
            );
        }
        for isa in Isa::supported() {
            assert_eq!(w.matmul_on(&x, t, isa), portable, "{dtype:?} on {isa:?}");
        }
    }
}

#[test]
fn the_result_is_close_to_the_dense_product() {
    let (out, inp) = (16, 256);
    let x = crate::rng::test_data(inp, 4);
    for dtype in TYPES {
        let rows = block_rows(out, inp, dtype, 3);
        let dense = rows.dequantize().unwrap().to_vec2::<f32>().unwrap();
        let w = QuantWeight::from_block_rows(&rows).unwrap().unwrap();
        let y = w.matmul(&x, 1);
        for (o, d) in dense.iter().enumerate() {
            let want: f32 = d.iter().zip(&x).map(|(a, b)| a * b).sum();
            let norm: f32 = d.iter().map(|v| v.abs()).sum::<f32>() / 127.0;
            assert!(
                (y[o] - want).abs() <= norm,
                "{dtype:?} row {o}: {} vs {want}",
                y[o]
            );
        }
    }
}

#[test]
fn rows_are_bit_identical_whatever_the_batch() {
    let (out, inp, t) = (19, 256, 9);
    let x = crate::rng::test_data(t * inp, 5);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q6K, GgmlDType::Q8_0] {
        let w = QuantWeight::from_block_rows(&block_rows(out, inp, dtype, 6))
            .unwrap()
            .unwrap();
        let together = w.matmul(&x, t);
        for r in 0..t {
            let alone = w.matmul(&x[r * inp..(r + 1) * inp], 1);
            assert_eq!(
                &together[r * out..(r + 1) * out],
                &alone[..],
                "{dtype:?} {r}"
            );
        }
    }
}

#[test]
fn repacked_rows_read_back_as_the_file_holds_them() {
    let (out, inp) = (9, 256);
    for dtype in TYPES {
        let rows = block_rows(out, inp, dtype, 8);
        let dense = rows.dequantize().unwrap().to_vec2::<f32>().unwrap();
        let w = QuantWeight::from_block_rows(&rows).unwrap().unwrap();
        let mut row = vec![0f32; inp];
        let exact = !matches!(dtype, GgmlDType::Q5K | GgmlDType::Q6K);
        for (o, d) in dense.iter().enumerate() {
            w.dequantize_row(o, &mut row);
            // Exact (one f32 rounding) but for the f16 rounding of Q5_K's and Q6_K's
            // block scale and min: 2^-11 of each of d * q and m, each at most twice the row max.
            let max = d.iter().fold(0f32, |a, v| a.max(v.abs()));
            let tol = if exact { 1e-6 } else { max / 512.0 };
            for (a, b) in row.iter().zip(d) {
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn unsupported_types_are_left_to_the_caller() {
    let rows = block_rows(4, 256, GgmlDType::Q5_0, 1);
    assert!(QuantWeight::from_block_rows(&rows).unwrap().is_none());
}
