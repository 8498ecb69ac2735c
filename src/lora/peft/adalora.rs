//! AdaLoRA folders (`peft_type: ADALORA`), folded at load into a LoRA of variable rank.
//!
//! Semantics (PEFT's `adalora.layer.SVDLinear.forward`):
//! `y += (x (A * E)^T B^T) * scaling / (ranknum + 1e-5)`, with `scaling = lora_alpha`
//! (or the module's rank when `lora_alpha <= 0`). `rank_pattern` maps
//! `model.layers.{l}.{parent}.{site}.lora_E` to the boolean mask of the `init_r` ranks
//! kept; the saved `lora_A` `[rank, in]`, `lora_E` `[rank, 1]` and `lora_B` `[out, rank]`
//! are already cut to the kept ranks. PEFT's `resize_modules_by_rank_pattern` copies the
//! module's `ranknum` from before the resize, so `ranknum` is `init_r` for every module
//! that keeps a rank, whatever its new rank.
//!
//! Here `A * E` (each row of A times its singular value) becomes the pair's A and
//! `scaling / (init_r + 1e-5)` its scale; a module that keeps no rank holds no pair.
//! Module selection is LoRA's; anything refused for LoRA is refused here too.
use super::config::{number, positive_int, refuse_unsupported, RawConfig};
use super::select::ModuleMatch;
use super::tensors::{finite, split_key, stored, SafeTensors};
use super::AdapterError::{self, Invalid};
use super::{AdapterKind, AdapterWeights, BaseShape, LoraPair, LoraSite, CONFIG_FILE};
use crate::lora::values::AdapterDType;
use std::collections::HashMap;

/// Kept ranks of each targeted site: `[layer][site.index()]`.
type RankPlan = Vec<[Option<usize>; 7]>;

/// The AdaLoRA config's parts that decide the folded pairs.
struct AdaLoraConfig {
    init_r: usize,
    alpha: f64,
    modules: ModuleMatch,
    /// `(module path, kept-rank mask)` from `rank_pattern`.
    masks: Vec<(String, Vec<bool>)>,
}

impl AdaLoraConfig {
    fn parse(raw: &RawConfig) -> Result<Self, AdapterError> {
        refuse_unsupported(raw)?;
        let init_r = raw
            .get("init_r")
            .map_or(Ok(12), |v| positive_int("init_r", v))?;
        let alpha = raw
            .get("lora_alpha")
            .map_or(Ok(8.0), |v| number("lora_alpha", v))?;
        let modules = ModuleMatch::parse(raw, &["q_proj", "v_proj"], true)?;
        let mut masks = Vec::new();
        for (key, value) in raw.rank_pattern_entries() {
            let bad = || {
                Invalid(format!(
                    "config: rank_pattern[\"{key}\"] must be a list of booleans"
                ))
            };
            let mask: Vec<bool> = value
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|b| b.as_bool().ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            if mask.len() != init_r {
                return Err(Invalid(format!(
                    "config: rank_pattern[\"{key}\"] has {} entries, init_r is {init_r}",
                    mask.len()
                )));
            }
            let module = key.strip_suffix(".lora_E").unwrap_or(key);
            masks.push((module.to_string(), mask));
        }
        Ok(AdaLoraConfig {
            init_r,
            alpha,
            modules,
            masks,
        })
    }

    /// The kept rank of every targeted site.
    fn plan(&self, base: &BaseShape) -> Result<RankPlan, AdapterError> {
        let selected = self.modules.selected(base)?;
        Ok(selected
            .iter()
            .enumerate()
            .map(|(layer, sites)| {
                std::array::from_fn(|i| {
                    let path = base.module_path(LoraSite::ALL[i], layer);
                    let mask = self.masks.iter().find(|(m, _)| *m == path);
                    sites[i].then(|| {
                        mask.map_or(self.init_r, |(_, m)| m.iter().filter(|&&b| b).count())
                    })
                })
            })
            .collect())
    }
}

/// Loads an AdaLoRA folder as LoRA pairs stored as `dtype`.
pub(super) fn load(
    raw: &RawConfig,
    file: &SafeTensors,
    base: &BaseShape,
    dtype: AdapterDType,
) -> Result<AdapterWeights, AdapterError> {
    let config = AdaLoraConfig::parse(raw)?;
    let plan = config.plan(base)?;
    let mut parts: HashMap<(usize, usize, &str), Vec<f32>> = HashMap::new();
    for t in &file.tensors {
        let unexpected = |why: &str| Invalid(format!("unexpected key {}{why}", t.name));
        let (layer, site, rest) =
            split_key(&t.name, base.num_layers).ok_or_else(|| unexpected(""))?;
        let part = match rest.strip_suffix(".default").unwrap_or(rest) {
            p @ ("lora_A" | "lora_B" | "lora_E") => p,
            _ => return Err(unexpected("")),
        };
        let Some(rank) = plan[layer][site.index()] else {
            return Err(unexpected(&format!(
                " (layer {layer} {} is not targeted by {CONFIG_FILE})",
                site.module_name()
            )));
        };
        let (inp, out) = base.dims(site);
        let shape = match part {
            "lora_A" => [rank, inp],
            "lora_B" => [out, rank],
            _ => [rank, 1],
        };
        let values = finite(&t.name, t.values(file, &shape)?)?;
        if parts.insert((layer, site.index(), part), values).is_some() {
            return Err(Invalid(format!("duplicate tensor for key {}", t.name)));
        }
    }
    let mut weights = AdapterWeights::empty(AdapterKind::AdaLora);
    for (layer, ranks) in plan.iter().enumerate() {
        let mut row: [Option<LoraPair>; 7] = std::array::from_fn(|_| None);
        for site in LoraSite::ALL {
            let Some(rank) = ranks[site.index()] else {
                continue;
            };
            let mut take = |part: &'static str| {
                parts
                    .remove(&(layer, site.index(), part))
                    .ok_or_else(|| Invalid(format!("missing key {}", site.peft_name(layer, part))))
            };
            let (a, b, e) = (take("lora_A")?, take("lora_B")?, take("lora_E")?);
            weights.target_modules.push(site.module_name().to_string());
            if rank == 0 {
                continue;
            }
            let inp = a.len() / rank;
            let folded: Vec<f32> = a
                .chunks_exact(inp)
                .zip(&e)
                .flat_map(|(row, &s)| row.iter().map(move |v| v * s))
                .collect();
            let scaling = if config.alpha > 0.0 {
                config.alpha as f32
            } else {
                rank as f32
            };
            let at = format!("layer {layer} {}", site.module_name());
            let pair = LoraPair::new(
                rank,
                scaling / (config.init_r as f32 + 1e-5),
                stored(&at, folded, dtype)?,
                stored(&at, b, dtype)?,
            );
            weights.rank_max = weights.rank_max.max(rank);
            weights.bytes += pair.a.bytes() + pair.b.bytes();
            row[site.index()] = Some(pair);
        }
        weights.layers.push(row);
    }
    weights.target_modules.sort();
    weights.target_modules.dedup();
    Ok(weights)
}
