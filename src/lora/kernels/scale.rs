//! Per-token gathered column scales on host memory: the output scales of DoRA and
//! (IA)³ (`y[t, offset + o] *= v_s[o]`) and the input scales of (IA)³ on feed-forward
//! modules (`x[t, i] * v_s[i]`), where `s` is token t's adapter slot.
//!
//! Invariants: tokens without an adapter (slot -1) and slots without a scale at the site
//! are left bit-identical, as are columns outside the site's range; a token's result
//! depends only on its own row and slot (batch invariance); lengths are checked once,
//! before anything is written, with errors naming the mismatch.
use anyhow::{ensure, Result};

use super::SiteShape;

/// Checks that every slot of `slots` (token slots, -1 for none) indexes `scales` when it
/// is not negative, and that each scale has `width` values.
fn check(slots: &[i32], scales: &[Option<&[f32]>], width: usize) -> Result<()> {
    for (s, v) in scales.iter().enumerate() {
        if let Some(v) = v {
            ensure!(
                v.len() == width,
                "adapter slot {s}: scale has {} values, expected {width}",
                v.len()
            );
        }
    }
    if let Some(&max) = slots.iter().max() {
        ensure!(
            max < scales.len() as i32,
            "adapter slot {max} is used by the batch but the scale table has {} entries",
            scales.len()
        );
    }
    Ok(())
}

/// Multiplies the site's columns of each token's row of `y` (`[T, y_stride]`) by its
/// slot's output scale (`[out_features]`).
pub fn scale_output(
    slots: &[i32],
    y: &mut [f32],
    shape: SiteShape,
    scales: &[Option<&[f32]>],
) -> Result<()> {
    per_site_row(slots, y, shape, scales, |y, g| *y *= g)
}

/// Adds to the site's columns of each token's row of `y` its slot's output offset
/// (`[out_features]`), after the output scales.
pub fn add_output_offset(
    slots: &[i32],
    y: &mut [f32],
    shape: SiteShape,
    offsets: &[Option<&[f32]>],
) -> Result<()> {
    per_site_row(slots, y, shape, offsets, |y, o| *y += o)
}

/// `op(y, v[o])` on the site's columns of each token's row of `y` whose slot has a
/// vector `v` in `vectors`.
fn per_site_row(
    slots: &[i32],
    y: &mut [f32],
    shape: SiteShape,
    vectors: &[Option<&[f32]>],
    op: impl Fn(&mut f32, f32),
) -> Result<()> {
    check(slots, vectors, shape.out_features)?;
    ensure!(
        shape.y_offset + shape.out_features <= shape.y_stride
            && slots.len() * shape.y_stride == y.len(),
        "site output has {} values for {} tokens of stride {} (site columns {}..{})",
        y.len(),
        slots.len(),
        shape.y_stride,
        shape.y_offset,
        shape.y_offset + shape.out_features
    );
    let columns = shape.y_offset..shape.y_offset + shape.out_features;
    for (row, &s) in y.chunks_exact_mut(shape.y_stride).zip(slots) {
        let Some(Some(v)) = usize::try_from(s).ok().map(|s| vectors[s]) else {
            continue;
        };
        for (y, &g) in row[columns.clone()].iter_mut().zip(v) {
            op(y, g);
        }
    }
    Ok(())
}

/// `x` (`[T, in_features]`) with each token's row multiplied by its slot's input scale
/// (`[in_features]`), or None when no token's slot has one.
pub fn scale_input(
    slots: &[i32],
    x: &[f32],
    in_features: usize,
    scales: &[Option<&[f32]>],
) -> Result<Option<Vec<f32>>> {
    let scaled = |s: i32| {
        usize::try_from(s)
            .ok()
            .and_then(|s| scales.get(s)?.as_ref())
    };
    if !slots.iter().any(|&s| scaled(s).is_some()) {
        return Ok(None);
    }
    check(slots, scales, in_features)?;
    ensure!(
        slots.len() * in_features == x.len(),
        "scaled input has {} values for {} tokens of {in_features}",
        x.len(),
        slots.len()
    );
    let mut out = x.to_vec();
    for (row, &s) in out.chunks_exact_mut(in_features).zip(slots) {
        if let Some(v) = scaled(s) {
            for (x, l) in row.iter_mut().zip(v.iter()) {
                *x *= l;
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_scales_touch_only_their_tokens_and_columns() {
        // Tokens: slot 1, base, slot 0 (no scale); 2 columns of a 3-column row from 1.
        let slots = [1, -1, 0];
        let mut y: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let g = [2.0, 10.0];
        let shape = SiteShape {
            in_features: 4,
            out_features: 2,
            y_stride: 3,
            y_offset: 1,
        };
        scale_output(&slots, &mut y, shape, &[None, Some(&g)]).unwrap();
        assert_eq!(y, vec![0.0, 2.0, 20.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn input_scales_copy_only_when_needed() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let l = [0.5, 3.0];
        assert_eq!(scale_input(&[-1, 0], &x, 2, &[None]).unwrap(), None);
        let got = scale_input(&[-1, 0], &x, 2, &[Some(&l)]).unwrap();
        assert_eq!(got, Some(vec![1.0, 2.0, 1.5, 12.0]));
    }

    #[test]
    fn bad_lengths_are_errors_naming_the_mismatch() {
        let shape = SiteShape {
            in_features: 1,
            out_features: 2,
            y_stride: 2,
            y_offset: 0,
        };
        let short = [1.0];
        let e = scale_output(&[0], &mut [0.0; 2], shape, &[Some(&short)]).unwrap_err();
        assert!(e.to_string().contains("expected 2"), "{e}");
        let e = scale_output(&[3], &mut [0.0; 2], shape, &[None]).unwrap_err();
        assert!(e.to_string().contains("adapter slot 3"), "{e}");
        let e = scale_input(&[0], &[1.0; 3], 2, &[Some(&[1.0, 1.0])]).unwrap_err();
        assert!(e.to_string().contains("3 values"), "{e}");
    }
}
