//! Adapters of a base whose projection modules fuse several sites (Phi-3's `qkv_proj`
//! and `gate_up_proj`, [`BaseShape::modules`]): each tensor of a fused module becomes
//! one per site before the method loaders read the file. This is exact: a LoRA on a
//! fused module is one A and one B over the fused output, so each site keeps the whole
//! of what is indexed by the input or the rank (`lora_A`, AdaLoRA's `lora_E`, a
//! feed-forward (IA)³ vector `[1, in]`) and its own rows of what is indexed by the output
//! (`lora_B`, DoRA's magnitude, an (IA)³ output vector `[out, 1]`); no bytes are copied.
//!
//! Invariant: afterwards the keys name the sites' own modules (`q_proj` ...), as on an
//! unfused base; a key naming a site's own module on a fused base is refused (PEFT
//! cannot have written it), and so is VeRA on a fused module (its shared projections
//! would need the site's row offset).
use super::tensors::{SafeTensors, TensorInfo};
use super::AdapterError::{self, Invalid, Unsupported};
use super::{BaseShape, LoraSite, KEY_PREFIX, SEPARATE_MODULES};

/// How one tensor of a fused module divides among its sites.
enum Division {
    /// Every site gets the whole tensor.
    Whole,
    /// Each site gets its rows (the first dimension).
    Rows,
}

impl SafeTensors {
    /// The file with every fused module's tensors divided among its sites.
    pub(super) fn unfused(mut self, base: &BaseShape) -> Result<SafeTensors, AdapterError> {
        if base.modules.iter().all(|m| m.sites.len() == 1) {
            return Ok(self);
        }
        let mut out = Vec::with_capacity(self.tensors.len());
        for t in std::mem::take(&mut self.tensors) {
            out.extend(divide(t, base)?);
        }
        self.tensors = out;
        Ok(self)
    }
}

/// `layer`, the module's `parent.name` and the rest of a PEFT layer key.
fn split(name: &str) -> Option<(usize, &str, &str, &str)> {
    let rest = name
        .strip_prefix(KEY_PREFIX)?
        .strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (parent, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    Some((layer.parse().ok()?, parent, module, rest))
}

/// One tensor as the sites' tensors (itself when its module is not fused).
fn divide(t: TensorInfo, base: &BaseShape) -> Result<Vec<TensorInfo>, AdapterError> {
    let Some((layer, parent, name, rest)) = split(&t.name) else {
        return Ok(vec![t]);
    };
    let fused = base
        .modules
        .iter()
        .find(|m| m.sites.len() > 1 && m.parent == parent && m.name == name);
    let Some(module) = fused else {
        let own = SEPARATE_MODULES
            .iter()
            .find(|m| m.parent == parent && m.name == name);
        if let Some(own) = own.filter(|m| base.module_of(m.sites[0]).sites.len() > 1) {
            let fused = base.module_of(own.sites[0]).name;
            return Err(Invalid(format!(
                "unexpected key {} (this base model fuses {} into {fused})",
                t.name, own.name
            )));
        }
        return Ok(vec![t]);
    };
    let rows: usize = module.sites.iter().map(|&s| base.dims(s).1).sum();
    let part = rest.split('.').next().unwrap_or(rest);
    let division = match part {
        "lora_A" | "lora_E" => Division::Whole,
        "lora_B" if !rest.ends_with(".bias") => Division::Rows,
        "lora_magnitude_vector" => Division::Rows,
        "ia3_l" if t.shape.first() == Some(&1) && t.shape.get(1) != Some(&1) => Division::Whole,
        "ia3_l" => Division::Rows,
        p if p.starts_with("vera_") => {
            return Err(Unsupported(format!(
                "VeRA on the fused module {} (key {})",
                module.name, t.name
            )))
        }
        // Left whole under its own name: the method's loader refuses it by name.
        _ => return Ok(vec![t]),
    };
    if matches!(division, Division::Rows) && t.shape.first() != Some(&rows) {
        return Err(Invalid(format!(
            "tensor {}: shape {:?}, but {} has {rows} output rows",
            t.name, t.shape, module.name
        )));
    }
    let row_bytes = (t.end - t.start) / rows.max(1);
    let mut first_row = 0;
    let mut out = Vec::with_capacity(module.sites.len());
    for &site in module.sites {
        let site_rows = base.dims(site).1;
        let mut piece = t.clone();
        piece.name = LoraSite::peft_name(site, layer, rest);
        if matches!(division, Division::Rows) {
            piece.shape[0] = site_rows;
            piece.start = t.start + first_row * row_bytes;
            piece.end = piece.start + site_rows * row_bytes;
        }
        first_row += site_rows;
        out.push(piece);
    }
    Ok(out)
}
