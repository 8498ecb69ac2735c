//! DoRA's output scales: PEFT computes `m / ||W + s B A||` (the norm per output row,
//! detached, so a constant at inference) and multiplies the base-plus-LoRA output by it.
//! This module turns each site's magnitude `m` (as `tensors::assemble` left it in the
//! adapter's output scales) into that quotient, once at load, over the weights `W` as the
//! backend serves them (rounded or quantized as it computes with them).
//!
//! Invariants: the sum `s B A` is formed as PEFT forms it (`B @ A` in f32, then times
//! `s`, then added to `W` in f32); each row's squared norm is accumulated in f64; every
//! resulting scale is finite, else the load fails naming the site.
use super::AdapterError::{self, Invalid};
use super::{AdapterWeights, LoraSite, ServedBase, SiteScale};

/// Rows of the base weight read from the backend at a time (bounds the copy).
const ROWS_PER_READ: usize = 64;

/// Replaces every DoRA site's magnitude `m` by `m / ||W + s B A||`.
pub(super) fn output_scales(
    weights: &mut AdapterWeights,
    served: &dyn ServedBase,
) -> Result<(), AdapterError> {
    let AdapterWeights {
        layers,
        scales,
        offsets,
        bytes,
        ..
    } = weights;
    for (layer, (pairs, sites)) in layers.iter().zip(scales.iter_mut()).enumerate() {
        for site in LoraSite::ALL {
            let (Some(pair), Some(SiteScale::Output(m))) =
                (&pairs[site.index()], &mut sites[site.index()])
            else {
                continue;
            };
            let norms = row_norms(served, layer, site, pair)?;
            for (o, (g, norm)) in m.iter_mut().zip(norms).enumerate() {
                *g /= norm;
                if !g.is_finite() {
                    return Err(Invalid(format!(
                        "DoRA at layer {layer} {}: row {o} of W + s B A has norm {norm}, \
                         so its scale is not finite",
                        site.module_name()
                    )));
                }
            }
            if let Some(bias) = served.bias(layer, site) {
                // PEFT computes `g (x W^T + s B A x) + b`; the step scales the output with
                // the bias in it, so it adds `(1 - g) b` after.
                if offsets.is_empty() {
                    *offsets = vec![Default::default(); layers.len()];
                }
                let offset: Vec<f32> = m.iter().zip(&bias).map(|(g, b)| (1.0 - g) * b).collect();
                *bytes += 4 * offset.len();
                offsets[layer][site.index()] = Some(offset);
            }
        }
    }
    Ok(())
}

/// `||W[o] + s (B A)[o]||` for every output row `o` of the site.
fn row_norms(
    served: &dyn ServedBase,
    layer: usize,
    site: LoraSite,
    pair: &super::LoraPair,
) -> Result<Vec<f32>, AdapterError> {
    let (a, b) = (pair.a.to_f32(), pair.b.to_f32());
    let rank = pair.rank;
    let inp = a.len() / rank;
    let out = b.len() / rank;
    let mut norms = Vec::with_capacity(out);
    let mut delta = vec![0f32; inp];
    for start in (0..out).step_by(ROWS_PER_READ) {
        let rows = start..(start + ROWS_PER_READ).min(out);
        let w = served.weight_rows(layer, site, rows.clone()).map_err(|e| {
            AdapterError::Io(format!(
                "DoRA needs the served weights of layer {layer} {}: {e:#}",
                site.module_name()
            ))
        })?;
        if w.len() != rows.len() * inp {
            return Err(AdapterError::Io(format!(
                "the served weight of layer {layer} {} has {} values for {} rows of {inp}",
                site.module_name(),
                w.len(),
                rows.len()
            )));
        }
        for (o, w_row) in rows.zip(w.chunks_exact(inp)) {
            delta.fill(0.0);
            for (r, a_row) in a.chunks_exact(inp).enumerate() {
                let b_or = b[o * rank + r];
                for (d, &a_ri) in delta.iter_mut().zip(a_row) {
                    *d += b_or * a_ri;
                }
            }
            let sum: f64 = w_row
                .iter()
                .zip(&delta)
                .map(|(&w, &d)| f64::from(w + pair.scale * d).powi(2))
                .sum();
            norms.push(sum.sqrt() as f32);
        }
    }
    Ok(norms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::peft::{AdapterKind, LoraPair};
    use crate::lora::values::LoraValues;
    use std::ops::Range;

    /// A 2x3 base weight at every site.
    struct Fixed;
    const W: [f32; 6] = [1.0, 2.0, 2.0, 0.0, 3.0, 4.0];

    impl ServedBase for Fixed {
        fn weight_rows(
            &self,
            _: usize,
            _: LoraSite,
            rows: Range<usize>,
        ) -> anyhow::Result<Vec<f32>> {
            Ok(W[rows.start * 3..rows.end * 3].to_vec())
        }
        fn serves(&self, _: AdapterKind) -> bool {
            true
        }
    }

    fn adapter(m: Vec<f32>, b: Vec<f32>) -> AdapterWeights {
        let mut layer: [Option<LoraPair>; 7] = Default::default();
        layer[0] = Some(LoraPair::new(
            1,
            2.0,
            LoraValues::F32(vec![1.0, 0.0, 0.0]),
            LoraValues::F32(b),
        ));
        let mut scales: [Option<SiteScale>; 7] = Default::default();
        scales[0] = Some(SiteScale::Output(m));
        AdapterWeights {
            kind: AdapterKind::Dora,
            rank_max: 1,
            target_modules: vec!["q_proj".into()],
            layers: vec![layer],
            scales: vec![scales],
            offsets: Vec::new(),
            bytes: 0,
            prompt: None,
            prefix: None,
        }
    }

    #[test]
    fn scales_are_the_magnitude_over_the_row_norm_of_w_plus_s_ba() {
        // W + 2 B A: row 0 is [1 + 2, 2, 2] (norm sqrt(17)), row 1 [0 - 1, 3, 4] (sqrt(26)).
        let mut w = adapter(vec![3.0, 10.0], vec![1.0, -0.5]);
        output_scales(&mut w, &Fixed).unwrap();
        let Some(SiteScale::Output(g)) = &w.scales[0][0] else {
            panic!("no scale")
        };
        assert!((g[0] - 3.0 / 17f32.sqrt()).abs() < 1e-6, "{g:?}");
        assert!((g[1] - 10.0 / 26f32.sqrt()).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn a_zero_row_norm_is_refused_by_site() {
        // A zero base row with a zero B: the norm is 0.
        struct Zero;
        impl ServedBase for Zero {
            fn weight_rows(
                &self,
                _: usize,
                _: LoraSite,
                r: Range<usize>,
            ) -> anyhow::Result<Vec<f32>> {
                Ok(vec![0.0; r.len() * 3])
            }
            fn serves(&self, _: AdapterKind) -> bool {
                true
            }
        }
        let mut w = adapter(vec![1.0, 1.0], vec![0.0, 0.0]);
        let e = output_scales(&mut w, &Zero).unwrap_err().to_string();
        assert!(
            e.contains("layer 0 q_proj") && e.contains("not finite"),
            "{e}"
        );
    }
}
