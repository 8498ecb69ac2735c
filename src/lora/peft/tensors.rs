//! `adapter_model.safetensors` reading and the per-tensor checks that build the weights.
//! Owns header and data parsing within [`AdapterLimits`], dtype conversion to the
//! adapter storage type,
//! tensor-key parsing, and the shape, size and finiteness checks that assemble
//! [`AdapterWeights`] from the config's plan.
use super::config::Plan;
use super::AdapterError::{self, Invalid, Unsupported};
use super::{
    AdapterKind, AdapterLimits, AdapterWeights, BaseShape, LoraPair, LoraSite, SiteScale,
    CONFIG_FILE,
};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::KEY_PREFIX;
use crate::lora::values::{AdapterDType, LoraValues};

/// One tensor's header entry; `start..end` indexes the data section.
#[derive(Clone)]
pub(super) struct TensorInfo {
    pub(super) name: String,
    pub(super) dtype: String,
    pub(super) shape: Vec<usize>,
    pub(super) start: usize,
    pub(super) end: usize,
}

/// A safetensors file read whole, its header checked for bounds and consistency.
pub(super) struct SafeTensors {
    data: Vec<u8>,
    pub(super) tensors: Vec<TensorInfo>,
}

impl SafeTensors {
    pub(super) fn read(path: &Path, limits: &AdapterLimits) -> Result<SafeTensors, AdapterError> {
        let shown = path.display();
        let io = |e: std::io::Error| AdapterError::Io(format!("cannot read {shown}: {e}"));
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > limits.max_file_bytes {
            return Err(Invalid(format!(
                "{shown}: {len} bytes exceeds the limit of {} bytes",
                limits.max_file_bytes
            )));
        }
        let mut prefix = [0u8; 8];
        if len < 8 || file.read_exact(&mut prefix).is_err() {
            return Err(Invalid(format!(
                "{shown}: truncated safetensors file (no header length)"
            )));
        }
        let header_len = u64::from_le_bytes(prefix);
        if header_len > limits.max_header_bytes {
            return Err(Invalid(format!(
                "{shown}: safetensors header length {header_len} exceeds the limit of {} bytes",
                limits.max_header_bytes
            )));
        }
        if header_len > len - 8 {
            return Err(Invalid(format!(
                "{shown}: truncated safetensors file (header of {header_len} bytes, {} bytes follow)",
                len - 8
            )));
        }
        // Exact sizes, read once: no growth and re-copying of a large buffer.
        let truncated = |_| {
            Invalid(format!(
                "{shown}: truncated safetensors file (changed while read)"
            ))
        };
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(truncated)?;
        let mut data = vec![0u8; (len - 8 - header_len) as usize];
        file.read_exact(&mut data).map_err(truncated)?;
        let entries: serde_json::Map<String, Value> =
            serde_json::from_slice(&header).map_err(|e| {
                Invalid(format!(
                    "{shown}: safetensors header is not valid JSON: {e}"
                ))
            })?;
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, info) in entries {
            if name != "__metadata__" {
                tensors.push(tensor_info(name, &info, data.len())?);
            }
        }
        Ok(SafeTensors { data, tensors })
    }
}

fn tensor_info(name: String, info: &Value, data_len: usize) -> Result<TensorInfo, AdapterError> {
    let bad = |what: &str| Invalid(format!("tensor {name}: {what} in the safetensors header"));
    let dtype = info
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no dtype"))?
        .to_string();
    let shape = info
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        })
        .ok_or_else(|| bad("no valid shape"))?;
    let offsets: Option<Vec<usize>> =
        info.get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|o| {
                o.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            });
    let (start, end) = match offsets.as_deref() {
        Some([start, end]) if start <= end => (*start, *end),
        _ => return Err(bad("no valid data_offsets")),
    };
    if end > data_len {
        return Err(Invalid(format!(
            "tensor {name}: data ends at byte {end} but the file holds {data_len} data bytes (truncated safetensors file)"
        )));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

/// Little-endian F32/F16/BF16 bytes -> f32 (the dtype was checked by the caller).
fn to_f32(dtype: &str, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        "F32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
    }
}

/// IEEE half -> single, exact (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        0 => {
            let magnitude = mant as f32 / 16_777_216.0; // mant * 2^-24
            if sign == 0 {
                magnitude
            } else {
                -magnitude
            }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (mant << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13)),
    }
}

// ---------------------------------------------------------------- assembly

/// What a LoRA-family key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    A,
    B,
    /// DoRA's `lora_magnitude_vector` (`[out]`).
    Magnitude,
}

/// Splits `base_model.model.model.layers.{layer}.{parent}.{site}.{rest}` into its layer,
/// site and `rest`; None for any other name (or a layer beyond `num_layers`).
pub(super) fn split_key(name: &str, num_layers: usize) -> Option<(usize, LoraSite, &str)> {
    let module = name
        .strip_prefix(KEY_PREFIX)?
        .strip_prefix("model.layers.")?;
    let (layer, module) = module.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (parent, module) = module.split_once('.')?;
    let (site_name, rest) = module.split_once('.')?;
    let site = LoraSite::ALL
        .into_iter()
        .find(|s| s.module_name() == site_name && s.parent() == parent)?;
    (layer < num_layers && name == site.peft_name(layer, rest)).then_some((layer, site, rest))
}

/// Maps a tensor name to its (layer, site, half), refusing non-LoRA tensors by name.
fn parse_key(name: &str, num_layers: usize) -> Result<(usize, LoraSite, Half), AdapterError> {
    for marker in ["lora_embedding_A", "lora_embedding_B"] {
        if name.contains(marker) {
            return Err(Unsupported(format!(
                "embedding LoRA ({marker} in key {name})"
            )));
        }
    }
    if name.ends_with(".lora_B.bias") || name.ends_with(".lora_B.default.bias") {
        return Err(Unsupported(format!("lora_bias (key {name})")));
    }
    let unexpected = || Invalid(format!("unexpected key {name}"));
    let (layer, site, rest) = split_key(name, num_layers).ok_or_else(unexpected)?;
    let half = match rest {
        "lora_A.weight" | "lora_A.default.weight" => Half::A,
        "lora_B.weight" | "lora_B.default.weight" => Half::B,
        "lora_magnitude_vector"
        | "lora_magnitude_vector.weight"
        | "lora_magnitude_vector.default.weight" => Half::Magnitude,
        _ => return Err(unexpected()),
    };
    Ok((layer, site, half))
}

impl TensorInfo {
    /// The tensor's values in f32, after checking its dtype (F32, F16 or BF16), that its
    /// shape is `expected` and its byte length matches. Finiteness is the caller's check.
    pub(super) fn values(
        &self,
        file: &SafeTensors,
        expected: &[usize],
    ) -> Result<Vec<f32>, AdapterError> {
        let elem = match self.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                return Err(Invalid(format!(
                    "tensor {}: dtype {other} is not accepted (F32, F16 or BF16)",
                    self.name
                )))
            }
        };
        if self.shape != expected {
            return Err(Invalid(format!(
                "tensor {}: shape {:?}, expected {expected:?}",
                self.name, self.shape
            )));
        }
        if self.end - self.start != expected.iter().product::<usize>() * elem {
            return Err(Invalid(format!(
                "tensor {}: {} data bytes do not match shape {expected:?} {}",
                self.name,
                self.end - self.start,
                self.dtype
            )));
        }
        Ok(to_f32(&self.dtype, &file.data[self.start..self.end]))
    }
}

/// `values` stored as `dtype`, when every stored value is finite (rounding to bf16 can
/// overflow), else an error naming `what` and the element.
pub(super) fn stored(
    what: &str,
    values: Vec<f32>,
    dtype: AdapterDType,
) -> Result<LoraValues, AdapterError> {
    let values = LoraValues::from_f32(values, dtype);
    match values.first_non_finite() {
        Some((i, v)) => Err(Invalid(format!(
            "{what}: non-finite value {v} at element {i} (as {})",
            dtype.name()
        ))),
        None => Ok(values),
    }
}

/// `values` when all are finite, else an error naming the tensor and element.
pub(super) fn finite(name: &str, values: Vec<f32>) -> Result<Vec<f32>, AdapterError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Invalid(format!(
            "tensor {name}: non-finite value {} at element {i}",
            values[i]
        ))),
        None => Ok(values),
    }
}

/// Checks every tensor against the plan and the base shape; builds the weights. A DoRA
/// adapter's magnitudes `m` are kept as its output scales, to be divided by the norms
/// of the served weights (`super::dora`).
pub(super) fn assemble(
    plan: &Plan,
    file: &SafeTensors,
    base: &BaseShape,
    dtype: AdapterDType,
    kind: AdapterKind,
) -> Result<AdapterWeights, AdapterError> {
    let mut halves: HashMap<(usize, usize, bool), LoraValues> = HashMap::new();
    let mut magnitudes: HashMap<(usize, usize), Vec<f32>> = HashMap::new();
    for t in &file.tensors {
        let (layer, site, half) = parse_key(&t.name, base.num_layers)?;
        let Some(sp) = plan[layer][site.index()] else {
            return Err(Invalid(format!(
                "unexpected key {} (layer {layer} {} is not targeted by {CONFIG_FILE})",
                t.name,
                site.module_name()
            )));
        };
        let (inp, out) = base.dims(site);
        let expected = match half {
            Half::A => vec![sp.rank, inp],
            Half::B => vec![out, sp.rank],
            Half::Magnitude if kind == AdapterKind::Dora => vec![out],
            Half::Magnitude => {
                return Err(Invalid(format!(
                    "unexpected key {} (a DoRA magnitude, but use_dora is not set)",
                    t.name
                )))
            }
        };
        if half != Half::Magnitude && t.shape != expected {
            return Err(Invalid(format!(
                "tensor {}: shape {:?}, expected {expected:?} (rank {} from r/rank_pattern)",
                t.name, t.shape, sp.rank
            )));
        }
        let f32s = t.values(file, &expected)?;
        let duplicate = if half == Half::Magnitude {
            let m = finite(&t.name, f32s)?;
            magnitudes.insert((layer, site.index()), m).is_some()
        } else {
            let values = stored(&format!("tensor {}", t.name), f32s, dtype)?;
            halves
                .insert((layer, site.index(), half == Half::A), values)
                .is_some()
        };
        if duplicate {
            return Err(Invalid(format!("duplicate tensor for key {}", t.name)));
        }
    }
    let mut weights = AdapterWeights::empty(kind);
    for (layer, sites) in plan.iter().enumerate() {
        let mut row: [Option<LoraPair>; 7] = std::array::from_fn(|_| None);
        let mut scales: [Option<SiteScale>; 7] = std::array::from_fn(|_| None);
        for site in LoraSite::ALL {
            let Some(sp) = sites[site.index()] else {
                continue;
            };
            let missing =
                |what: &str| Invalid(format!("missing key {}", site.peft_name(layer, what)));
            let mut take = |is_a: bool| {
                let half = if is_a { "lora_A" } else { "lora_B" };
                let found = halves.remove(&(layer, site.index(), is_a));
                found.ok_or_else(|| missing(&format!("{half}.weight")))
            };
            let (a, b) = (take(true)?, take(false)?);
            if kind == AdapterKind::Dora {
                let m = magnitudes.remove(&(layer, site.index()));
                let m = m.ok_or_else(|| missing("lora_magnitude_vector"))?;
                weights.bytes += 4 * m.len();
                scales[site.index()] = Some(SiteScale::Output(m));
            }
            weights.rank_max = weights.rank_max.max(sp.rank);
            weights.bytes += a.bytes() + b.bytes();
            weights.target_modules.push(site.module_name().to_string());
            row[site.index()] = Some(LoraPair::new(sp.rank, sp.scale, a, b));
        }
        weights.layers.push(row);
        if kind == AdapterKind::Dora {
            weights.scales.push(scales);
        }
    }
    weights.target_modules.sort();
    weights.target_modules.dedup();
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
