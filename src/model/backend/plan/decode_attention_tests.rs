use super::*;
use crate::rng::Xoshiro256;

fn shape(heads: usize, kv_heads: usize, head_dim: usize) -> HeadShape {
    HeadShape::causal(heads, kv_heads, head_dim)
}

#[test]
fn geometry_lays_every_dimension_on_one_lane_value() {
    let bf16_64 = DecodeGeometry::new(&shape(32, 8, 64), 2).unwrap();
    assert_eq!((bf16_64.lanes, bf16_64.chunks, bf16_64.per_warp), (8, 1, 4));
    let f32_256 = DecodeGeometry::new(&shape(8, 8, 256), 4).unwrap();
    assert_eq!(
        (f32_256.lanes, f32_256.chunks, f32_256.per_warp),
        (32, 2, 1)
    );
    for (s, elem) in [
        (shape(32, 8, 64), 2),
        (shape(28, 4, 128), 2),
        (shape(8, 8, 256), 4),
    ] {
        let geo = DecodeGeometry::new(&s, elem).unwrap();
        let mut seen = vec![0; s.head_dim];
        for sl in 0..geo.lanes {
            for i in 0..geo.chunks * geo.vec {
                seen[geo.dim(sl, i)] += 1;
            }
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "{s:?}: each dimension on exactly one lane"
        );
        // Whole 16-byte chunks per lane: value i's chunk starts at a multiple of vec.
        assert_eq!(geo.dim(1, 0) % geo.vec, 0);
    }
    // Phi-3's head_dim 96 (12 chunks) and groups over 8 keep the per-head kernel.
    assert!(DecodeGeometry::new(&shape(32, 32, 96), 2).is_none());
    assert!(DecodeGeometry::new(&shape(32, 2, 64), 2).is_none());
}

/// Plain causal attention in f64 for row `last` of one sequence.
fn plain(shape: &HeadShape, q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], last: usize) -> Vec<f32> {
    let hd = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let mut out = vec![0.0; shape.num_heads * hd];
    for h in 0..shape.num_heads {
        let g = h / group;
        let qh = &q[h * hd..][..hd];
        let scores: Vec<f64> = (shape.first_position(last)..=last)
            .map(|p| {
                let kh = &k[p][g * hd..][..hd];
                let s = qh.iter().zip(kh).map(|(a, b)| (a * b) as f64).sum::<f64>()
                    * shape.scale as f64;
                shape
                    .softcap
                    .map_or(s, |c| (s / c as f64).tanh() * c as f64)
            })
            .collect();
        let big = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - big).exp()).collect();
        let total: f64 = weights.iter().sum();
        for d in 0..hd {
            let value: f64 = (shape.first_position(last)..=last)
                .zip(&weights)
                .map(|(p, w)| w * v[p][g * hd + d] as f64)
                .sum();
            out[h * hd + d] = (value / total) as f32;
        }
    }
    out
}

/// The port equals plain attention for every geometry, across split boundaries, with
/// sliding windows and soft-capping; and a row's result is bit-identical whatever the
/// grid's split count beyond the splits it needs (the batch's longest sequence).
#[test]
fn split_decode_attention_is_attention_and_ignores_the_grid() {
    let mut cases = vec![
        (shape(32, 8, 64), 2),
        (shape(28, 4, 128), 2),
        (shape(8, 8, 256), 4),
        (shape(4, 2, 64), 4),
    ];
    let mut gemma = shape(16, 8, 256);
    gemma.softcap = Some(50.0);
    gemma.window = Some(700);
    cases.push((gemma, 2));
    let mut rng = Xoshiro256::from_seed(9);
    for (s, elem) in cases {
        let geo = DecodeGeometry::new(&s, elem).unwrap();
        let width = s.num_kv_heads * s.head_dim;
        let positions = 1300;
        let k: Vec<Vec<f32>> = (0..positions)
            .map(|_| rng.symmetric_vec(width, 1.0))
            .collect();
        let v: Vec<Vec<f32>> = (0..positions)
            .map(|_| rng.symmetric_vec(width, 1.0))
            .collect();
        for last in [0, 5, 511, 512, 1299] {
            let q = rng.symmetric_vec(s.num_heads * s.head_dim, 2.0);
            let needed = num_splits(last + 1);
            let run = |splits| attend_row(&geo, &s, &q, last, |p| &k[p][..], |p| &v[p][..], splits);
            let ours = run(needed);
            let want = plain(&s, &q, &k, &v, last);
            let err = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 2e-5, "{s:?} at {last}: {err}");
            for wider in [needed + 1, needed + 3] {
                assert!(run(wider) == ours, "{s:?} at {last}: {wider} splits differ");
            }
        }
    }
}
