//! VeRA folders (`peft_type: VERA`), folded at load into a LoRA of rank `r`.
//!
//! Semantics (PEFT's `vera.layer.Linear.forward`):
//! `y += lambda_b * (B_s (lambda_d * (A_s x)))`, where the shared frozen projections
//! `vera_A` `[r, max_in]` and `vera_B` `[max_out, r]` are sliced to the module,
//! `A_s = vera_A[:, :in]`, `B_s = vera_B[:out, :]`, and `vera_lambda_d` `[r]`,
//! `vera_lambda_b` `[out]` are the module's own. There is no other scaling.
//!
//! Here each site is a pair over the shared projections, `A = A_s`, `B = B_s`, scale 1,
//! with `lambda_d` as its rank scales and `lambda_b` as its output scales (the kernels'
//! `rank_scale`, `out_scale`). The slices are kept once per process for every adapter
//! whose folder saved the same projections (same base, `r` and `projection_prng_key`):
//! [`shared_slice`] looks them up by content, so a thousand VeRA adapters hold one `A_s`
//! per input width and one `B_s` per output width, plus their own lambdas. An adapter's
//! bytes count the slices it uses once each (what it keeps alive) and its lambdas.
//! A folder saved without its projections (`save_projection: false`) could only be
//! rebuilt with PyTorch's random generator from `projection_prng_key`: refused.
use super::config::{is_set, positive_int, refuse_unsupported, RawConfig};
use super::select::ModuleMatch;
use super::tensors::{finite, split_key, stored, SafeTensors};
use super::AdapterError::{self, Invalid, Unsupported};
use super::{AdapterKind, AdapterWeights, BaseShape, LoraPair, LoraSite, CONFIG_FILE};
use crate::lora::values::{AdapterDType, LoraValues};
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

/// Where PEFT saves the shared projections (the adapter name removed).
const PROJECTIONS: [&str; 2] = ["base_model.vera_A", "base_model.vera_B"];

/// A projection `[rows, cols]` read from the file.
struct Projection {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
}

impl Projection {
    /// A digest of the shape and every value's bits (the cache key of its slices).
    fn digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        (self.rows, self.cols).hash(&mut h);
        for v in &self.values {
            v.to_bits().hash(&mut h);
        }
        h.finish()
    }
}

/// Which slice of a projection a site reads: `vera_A[:, :in]` or `vera_B[:out, :]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slice {
    A(usize),
    B(usize),
}

/// Slices of projections held by some adapter, by (projection digest, slice, dtype).
type SliceCache = HashMap<(u64, Slice, AdapterDType), Weak<LoraValues>>;

static SHARED_SLICES: Mutex<Option<SliceCache>> = Mutex::new(None);

/// The one copy of `values` (slice `slice` of `projection`, as stored) that every
/// adapter with the same projection shares: the cached one if it is still held and
/// equal (a digest collision keeps its own), else `values`, now cached.
fn shared_slice(projection: &Projection, slice: Slice, values: LoraValues) -> Arc<LoraValues> {
    let key = (projection.digest(), slice, values.dtype());
    let mut cache = SHARED_SLICES.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(held) = cache.get(&key).and_then(Weak::upgrade) {
        if *held == values {
            return held;
        }
        return Arc::new(values);
    }
    cache.retain(|_, w| w.strong_count() > 0);
    let values = Arc::new(values);
    cache.insert(key, Arc::downgrade(&values));
    values
}

/// Reads `vera_A` and `vera_B` (rank `r`), checking they cover every targeted module.
fn projections(file: &SafeTensors, r: usize) -> Result<[Projection; 2], AdapterError> {
    let read = |name: &str, r_dim: usize| -> Result<Projection, AdapterError> {
        let t = file
            .tensors
            .iter()
            .find(|t| t.name == name || t.name == format!("{name}.default"))
            .ok_or_else(|| Invalid(format!("missing key {name}")))?;
        let [rows, cols] = t.shape[..] else {
            return Err(Invalid(format!(
                "tensor {}: shape {:?} is not 2-D",
                t.name, t.shape
            )));
        };
        if [rows, cols][r_dim] != r {
            return Err(Invalid(format!(
                "tensor {}: shape {:?} does not have r = {r}",
                t.name, t.shape
            )));
        }
        let values = finite(&t.name, t.values(file, &[rows, cols])?)?;
        Ok(Projection { rows, cols, values })
    };
    Ok([read(PROJECTIONS[0], 0)?, read(PROJECTIONS[1], 1)?])
}

/// Loads a VeRA folder as LoRA pairs stored as `dtype`.
pub(super) fn load(
    raw: &RawConfig,
    file: &SafeTensors,
    base: &BaseShape,
    dtype: AdapterDType,
) -> Result<AdapterWeights, AdapterError> {
    refuse_unsupported(raw)?;
    if raw.get("save_projection").is_some_and(|v| !is_set(v)) {
        return Err(Unsupported(
            "VeRA saved without its projections (save_projection: false): they can only be \
             rebuilt with PyTorch's random generator"
                .into(),
        ));
    }
    let r = raw.get("r").map_or(Ok(256), |v| positive_int("r", v))?;
    let selected = ModuleMatch::parse(raw, &["q_proj", "v_proj"], true)?.selected(base)?;
    let [a, b] = projections(file, r)?;
    let mut lambdas: HashMap<(usize, usize, bool), Vec<f32>> = HashMap::new();
    for t in &file.tensors {
        if PROJECTIONS
            .iter()
            .any(|p| t.name == *p || t.name == format!("{p}.default"))
        {
            continue;
        }
        let unexpected = |why: &str| Invalid(format!("unexpected key {}{why}", t.name));
        let (layer, site, rest) =
            split_key(&t.name, base.num_layers).ok_or_else(|| unexpected(""))?;
        let is_b = match rest.strip_suffix(".default").unwrap_or(rest) {
            "vera_lambda_b" => true,
            "vera_lambda_d" => false,
            _ => return Err(unexpected("")),
        };
        if !selected[layer][site.index()] {
            return Err(unexpected(&format!(
                " (layer {layer} {} is not targeted by {CONFIG_FILE})",
                site.module_name()
            )));
        }
        let n = if is_b { base.dims(site).1 } else { r };
        let values = finite(&t.name, t.values(file, &[n])?)?;
        if lambdas
            .insert((layer, site.index(), is_b), values)
            .is_some()
        {
            return Err(Invalid(format!("duplicate tensor for key {}", t.name)));
        }
    }
    let mut weights = AdapterWeights::empty(AdapterKind::Vera);
    weights.rank_max = r;
    // Shared slices this adapter holds (counted once each).
    let mut held = HashSet::new();
    for (layer, sites) in selected.iter().enumerate() {
        let mut row: [Option<LoraPair>; 7] = std::array::from_fn(|_| None);
        for site in LoraSite::ALL.into_iter().filter(|s| sites[s.index()]) {
            let (inp, out) = base.dims(site);
            if a.cols < inp || b.rows < out {
                return Err(Invalid(format!(
                    "vera_A [{r}, {}] / vera_B [{}, {r}] do not cover layer {layer} {} ({out} x {inp})",
                    a.cols,
                    b.rows,
                    site.module_name()
                )));
            }
            let mut take = |is_b: bool| {
                let name = if is_b {
                    "vera_lambda_b"
                } else {
                    "vera_lambda_d"
                };
                lambdas
                    .remove(&(layer, site.index(), is_b))
                    .ok_or_else(|| Invalid(format!("missing key {}", site.peft_name(layer, name))))
            };
            let (lambda_b, lambda_d) = (take(true)?, take(false)?);
            let at = format!("layer {layer} {}", site.module_name());
            let a_s: Vec<f32> = (0..r)
                .flat_map(|k| &a.values[k * a.cols..k * a.cols + inp])
                .copied()
                .collect();
            let a_s = shared_slice(&a, Slice::A(inp), stored(&at, a_s, dtype)?);
            let b_s = stored(&at, b.values[..out * r].to_vec(), dtype)?;
            let b_s = shared_slice(&b, Slice::B(out), b_s);
            for m in [&a_s, &b_s] {
                if held.insert(Arc::as_ptr(m) as usize) {
                    weights.bytes += m.bytes();
                }
            }
            weights.bytes += (lambda_d.len() + lambda_b.len()) * std::mem::size_of::<f32>();
            let pair = LoraPair {
                rank: r,
                scale: 1.0,
                a: a_s,
                b: b_s,
                rank_scale: Some(lambda_d),
                out_scale: Some(lambda_b),
            };
            weights.target_modules.push(site.module_name().to_string());
            row[site.index()] = Some(pair);
        }
        weights.layers.push(row);
    }
    weights.target_modules.sort();
    weights.target_modules.dedup();
    Ok(weights)
}
