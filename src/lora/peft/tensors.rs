//! `adapter_model.safetensors` reading and the per-tensor checks that build the weights.
//! Owns header and data parsing within [`AdapterLimits`], dtype conversion to the
//! adapter storage type,
//! tensor-key parsing, and the shape, size and finiteness checks that assemble
//! [`AdapterWeights`] from the config's plan.
use super::config::Plan;
use super::AdapterError::{self, Invalid, Unsupported};
use super::{AdapterLimits, AdapterWeights, BaseShape, LoraPair, LoraSite, CONFIG_FILE};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::KEY_PREFIX;
use crate::lora::values::{AdapterDType, LoraValues};

/// One tensor's header entry; `start..end` indexes the data section.
struct TensorInfo {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A safetensors file read whole, its header checked for bounds and consistency.
pub(super) struct SafeTensors {
    data: Vec<u8>,
    tensors: Vec<TensorInfo>,
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

/// Which half of a pair a key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    A,
    B,
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
    if name.contains("lora_magnitude_vector") {
        return Err(Unsupported(format!(
            "DoRA (lora_magnitude_vector in key {name})"
        )));
    }
    if name.ends_with(".lora_B.bias") || name.ends_with(".lora_B.default.bias") {
        return Err(Unsupported(format!("lora_bias (key {name})")));
    }
    let unexpected = || Invalid(format!("unexpected key {name}"));
    let module = name.strip_prefix(KEY_PREFIX).ok_or_else(unexpected)?;
    let suffixes = [
        (".lora_A.weight", Half::A),
        (".lora_A.default.weight", Half::A),
        (".lora_B.weight", Half::B),
        (".lora_B.default.weight", Half::B),
    ];
    let (module, half) = suffixes
        .iter()
        .find_map(|(suffix, half)| module.strip_suffix(suffix).map(|m| (m, *half)))
        .ok_or_else(unexpected)?;
    let parts: Vec<&str> = module.split('.').collect();
    let [model, layers, layer, parent, site_name] = parts.as_slice() else {
        return Err(unexpected());
    };
    let layer: usize = layer.parse().map_err(|_| unexpected())?;
    let site = LoraSite::ALL
        .into_iter()
        .find(|s| s.module_name() == *site_name && s.parent() == *parent);
    match site {
        Some(site)
            if *model == "model" && *layers == "layers" && module == site.module_path(layer) =>
        {
            if layer < num_layers {
                Ok((layer, site, half))
            } else {
                Err(unexpected())
            }
        }
        _ => Err(unexpected()),
    }
}

/// Checks every tensor against the plan and the base shape; builds the weights.
pub(super) fn assemble(
    plan: &Plan,
    file: &SafeTensors,
    base: &BaseShape,
    dtype: AdapterDType,
) -> Result<AdapterWeights, AdapterError> {
    let mut halves: HashMap<(usize, usize, bool), LoraValues> = HashMap::new();
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
        let expected = if half == Half::A {
            [sp.rank, inp]
        } else {
            [out, sp.rank]
        };
        let elem = match t.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                return Err(Invalid(format!(
                    "tensor {}: dtype {other} is not accepted (F32, F16 or BF16)",
                    t.name
                )))
            }
        };
        if t.shape != expected {
            return Err(Invalid(format!(
                "tensor {}: shape {:?}, expected {expected:?} (rank {} from r/rank_pattern)",
                t.name, t.shape, sp.rank
            )));
        }
        if t.end - t.start != expected[0] * expected[1] * elem {
            return Err(Invalid(format!(
                "tensor {}: {} data bytes do not match shape {expected:?} {}",
                t.name,
                t.end - t.start,
                t.dtype
            )));
        }
        let values = LoraValues::from_f32(to_f32(&t.dtype, &file.data[t.start..t.end]), dtype);
        if let Some((i, v)) = values.first_non_finite() {
            return Err(Invalid(format!(
                "tensor {}: non-finite value {v} at element {i} (as {})",
                t.name,
                dtype.name()
            )));
        }
        if halves
            .insert((layer, site.index(), half == Half::A), values)
            .is_some()
        {
            return Err(Invalid(format!("duplicate tensor for key {}", t.name)));
        }
    }
    let mut layers: Vec<[Option<LoraPair>; 7]> = Vec::with_capacity(base.num_layers);
    let (mut rank_max, mut bytes, mut names) = (0, 0, Vec::new());
    for (layer, sites) in plan.iter().enumerate() {
        let mut row: [Option<LoraPair>; 7] = std::array::from_fn(|_| None);
        for site in LoraSite::ALL {
            let Some(sp) = sites[site.index()] else {
                continue;
            };
            let mut take = |is_a: bool| {
                halves.remove(&(layer, site.index(), is_a)).ok_or_else(|| {
                    let half = if is_a { "lora_A" } else { "lora_B" };
                    Invalid(format!(
                        "missing key {KEY_PREFIX}{}.{half}.weight",
                        site.module_path(layer)
                    ))
                })
            };
            let (a, b) = (take(true)?, take(false)?);
            rank_max = rank_max.max(sp.rank);
            bytes += a.bytes() + b.bytes();
            names.push(site.module_name().to_string());
            row[site.index()] = Some(LoraPair {
                rank: sp.rank,
                scale: sp.scale,
                a,
                b,
            });
        }
        layers.push(row);
    }
    names.sort();
    names.dedup();
    Ok(AdapterWeights {
        rank_max,
        target_modules: names,
        layers,
        bytes,
    })
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
