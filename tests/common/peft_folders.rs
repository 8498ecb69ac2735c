//! Tiny PEFT adapter folders for the loader tests: a small base shape, seeded tensors,
//! configs with overrides, and the checks on what loading gives.
use candle_core::{DType, Device, Tensor};
use multilora::lora::peft::{
    load_peft_adapter, AdapterError, AdapterLimits, AdapterWeights, BaseShape, LoraSite,
    CONFIG_FILE, WEIGHTS_FILE,
};
use multilora::lora::values::AdapterDType;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

pub const SMOLLM2: BaseShape = BaseShape {
    num_layers: 30,
    hidden_size: 576,
    q_out: 576,
    kv_out: 192,
    intermediate_size: 1536,
    modules: &multilora::lora::peft::SEPARATE_MODULES,
};

pub const TINY: BaseShape = BaseShape {
    num_layers: 2,
    hidden_size: 8,
    q_out: 8,
    kv_out: 4,
    intermediate_size: 12,
    modules: &multilora::lora::peft::SEPARATE_MODULES,
};

pub fn fixture(name: &str) -> PathBuf {
    let dir = super::fixture_adapter(name);
    assert!(dir.is_dir(), "fixture folder {} is missing", dir.display());
    dir
}

pub fn key(layer: usize, site: LoraSite, half: &str) -> String {
    format!("base_model.model.{}.{half}.weight", site.module_path(layer))
}

pub fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 1.0) * 0.37 + seed).sin() * 0.1)
        .collect()
}

pub fn tensor(shape: (usize, usize), seed: f32, dtype: DType) -> Tensor {
    let t = Tensor::from_vec(values(shape.0 * shape.1, seed), shape, &Device::Cpu).unwrap();
    t.to_dtype(dtype).unwrap()
}

/// The A and B tensors of one site at `rank`.
pub fn pair(layer: usize, site: LoraSite, rank: usize, dtype: DType) -> Vec<(String, Tensor)> {
    let (inp, out) = TINY.dims(site);
    let seed = (layer * 7 + site.index()) as f32;
    vec![
        (key(layer, site, "lora_A"), tensor((rank, inp), seed, dtype)),
        (
            key(layer, site, "lora_B"),
            tensor((out, rank), seed + 0.5, dtype),
        ),
    ]
}

/// Pairs for `sites` on every layer of `layers`.
pub fn pairs(layers: &[usize], sites: &[LoraSite], rank: usize) -> Vec<(String, Tensor)> {
    let mut all = Vec::new();
    for &layer in layers {
        for &site in sites {
            all.extend(pair(layer, site, rank, DType::F32));
        }
    }
    all
}

/// `{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}`
/// with `extra` merged over it (a null value removes the field).
pub fn config(extra: Value) -> Value {
    let mut c = json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "use_dora": false,
        "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
    });
    let map = c.as_object_mut().unwrap();
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            map.remove(k);
        } else {
            map.insert(k.clone(), v.clone());
        }
    }
    c
}

pub fn folder(config: &Value, tensors: Vec<(String, Tensor)>) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = serde_json::to_string_pretty(config).unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.path().join(WEIGHTS_FILE)).unwrap();
    dir
}

/// A valid q_proj+v_proj adapter at rank 4 on both tiny layers.
pub fn qv_folder() -> TempDir {
    folder(
        &config(json!({})),
        pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4),
    )
}

pub fn load(dir: &Path) -> Result<AdapterWeights, AdapterError> {
    load_peft_adapter(dir, &TINY, &AdapterLimits::default(), AdapterDType::F32)
}

#[track_caller]
pub fn expect_invalid(result: Result<AdapterWeights, AdapterError>, needle: &str) {
    match result {
        Err(AdapterError::Invalid(m)) => {
            assert!(m.contains(needle), "{m:?} should name {needle:?}")
        }
        other => panic!("expected Invalid naming {needle:?}, got {other:?}"),
    }
}

#[track_caller]
pub fn expect_unsupported(result: Result<AdapterWeights, AdapterError>, needle: &str) {
    match result {
        Err(AdapterError::Unsupported(m)) => {
            assert!(m.contains(needle), "{m:?} should name {needle:?}")
        }
        other => panic!("expected Unsupported naming {needle:?}, got {other:?}"),
    }
}

pub fn sites_of(w: &AdapterWeights, layer: usize) -> Vec<LoraSite> {
    LoraSite::ALL
        .into_iter()
        .filter(|s| w.layers[layer][s.index()].is_some())
        .collect()
}

pub fn f32_bytes(w: &AdapterWeights) -> usize {
    let pairs = w.layers.iter().flatten().flatten();
    pairs.map(|p| (p.a.len() + p.b.len()) * 4).sum()
}
