//! PEFT adapter loading: the real PEFT-trained fixtures in `tests/fixtures/adapters`,
//! and every accepted variant and every refusal on tiny adapter folders made here.
mod common;

use candle_core::{DType, Device, Tensor};
use common::peft_folders::*;
use multilora::lora::peft::{
    estimate_adapter_bytes, load_peft_adapter, AdapterError, AdapterLimits, AdapterWeights,
    LoraSite, CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE,
};
use multilora::lora::values::{AdapterDType, LoraValues};
use serde_json::json;
use std::path::Path;

// ---------------------------------------------------------------- real PEFT fixtures

/// Checks one layer-site of a fixture against the raw safetensors contents.
fn assert_matches_file(dir: &Path, w: &AdapterWeights, layer: usize, site: LoraSite) {
    let file = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let pair = w.layers[layer][site.index()].as_ref().unwrap();
    for (half, ours) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
        let t = &file[&key(layer, site, half)];
        let theirs = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            **ours,
            LoraValues::F32(theirs),
            "{half} of layer {layer} {site:?}"
        );
    }
}

#[test]
fn alpha_fixture_r8_q_v() {
    let dir = fixture("alpha-lora-r8-qv");
    let w =
        load_peft_adapter(&dir, &SMOLLM2, &AdapterLimits::default(), AdapterDType::F32).unwrap();
    assert_eq!(w.rank_max, 8);
    assert_eq!(w.target_modules, vec!["q_proj", "v_proj"]);
    assert_eq!(w.layers.len(), 30);
    for layer in 0..30 {
        assert_eq!(sites_of(&w, layer), vec![LoraSite::Q, LoraSite::V]);
        for site in [LoraSite::Q, LoraSite::V] {
            let p = w.layers[layer][site.index()].as_ref().unwrap();
            let (inp, out) = SMOLLM2.dims(site);
            assert_eq!(
                (p.rank, p.scale, p.a.len(), p.b.len()),
                (8, 2.0, 8 * inp, out * 8)
            );
        }
    }
    assert_eq!(w.bytes, 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8) * 4);
    assert_eq!(w.bytes, f32_bytes(&w));
    assert_matches_file(&dir, &w, 7, LoraSite::V);
}

#[test]
fn beta_fixture_r16_all_sites() {
    let dir = fixture("beta-lora-r16-all");
    let w =
        load_peft_adapter(&dir, &SMOLLM2, &AdapterLimits::default(), AdapterDType::F32).unwrap();
    assert_eq!(w.rank_max, 16);
    let names = [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ];
    assert_eq!(w.target_modules, names);
    let per_layer: usize = LoraSite::ALL
        .iter()
        .map(|s| 16 * (SMOLLM2.dims(*s).0 + SMOLLM2.dims(*s).1))
        .sum();
    assert_eq!(w.bytes, 30 * per_layer * 4);
    assert_eq!(w.bytes, f32_bytes(&w));
    for layer in 0..30 {
        assert_eq!(sites_of(&w, layer), LoraSite::ALL.to_vec());
        for p in w.layers[layer].iter().flatten() {
            assert_eq!((p.rank, p.scale), (16, 2.0));
        }
    }
    assert_matches_file(&dir, &w, 29, LoraSite::Down);
    assert_matches_file(&dir, &w, 0, LoraSite::K);
}

/// Stored as bf16 (the bf16 and quantized base modes): half the bytes, each value the
/// f32 value rounded to nearest-even, and the header estimate agrees.
#[test]
fn beta_fixture_stored_as_bf16() {
    let dir = fixture("beta-lora-r16-all");
    let f32s =
        load_peft_adapter(&dir, &SMOLLM2, &AdapterLimits::default(), AdapterDType::F32).unwrap();
    let bf16s = load_peft_adapter(
        &dir,
        &SMOLLM2,
        &AdapterLimits::default(),
        AdapterDType::Bf16,
    )
    .unwrap();
    assert_eq!(bf16s.bytes * 2, f32s.bytes);
    let estimate = |dtype| estimate_adapter_bytes(&dir, &AdapterLimits::default(), dtype);
    assert_eq!(estimate(AdapterDType::Bf16).unwrap(), bf16s.bytes);
    assert_eq!(estimate(AdapterDType::F32).unwrap(), f32s.bytes);
    for (row32, row16) in f32s.layers.iter().zip(&bf16s.layers) {
        for (p32, p16) in row32.iter().flatten().zip(row16.iter().flatten()) {
            assert_eq!((p16.rank, p16.scale), (p32.rank, p32.scale));
            for (v32, v16) in [(&p32.a, &p16.a), (&p32.b, &p16.b)] {
                let LoraValues::Bf16(v16) = &**v16 else {
                    panic!("stored as {:?}", v16.dtype())
                };
                let want: Vec<half::bf16> = v32
                    .to_f32()
                    .iter()
                    .map(|&v| half::bf16::from_f32(v))
                    .collect();
                assert_eq!(v16, &want);
            }
        }
    }
}

/// A finite f32 value that rounds past bf16's largest is refused, naming the tensor.
#[test]
fn values_that_overflow_bf16_are_invalid() {
    let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    let k = key(1, LoraSite::Q, "lora_A");
    tensors.retain(|(name, _)| *name != k);
    tensors.push((k, Tensor::full(f32::MAX, (4, 8), &Device::Cpu).unwrap()));
    let dir = folder(&config(json!({})), tensors);
    assert!(load(dir.path()).is_ok(), "fine in f32");
    let got = load_peft_adapter(
        dir.path(),
        &TINY,
        &AdapterLimits::default(),
        AdapterDType::Bf16,
    );
    expect_invalid(got, "non-finite value inf");
}

// ---------------------------------------------------------------- accepted variants

#[test]
fn plain_list_loads_with_scale_alpha_over_r() {
    let dir = qv_folder();
    let w = load(dir.path()).unwrap();
    assert_eq!(
        (w.rank_max, w.target_modules.clone()),
        (4, vec!["q_proj".to_string(), "v_proj".to_string()])
    );
    let q = w.layers[1][LoraSite::Q.index()].as_ref().unwrap();
    assert_eq!((q.rank, q.scale), (4, 2.0));
    assert_eq!(*q.a, LoraValues::F32(values(4 * 8, 7.0)));
    assert_eq!(*q.b, LoraValues::F32(values(8 * 4, 7.5)));
    assert_eq!(w.bytes, 2 * (4 * 8 + 8 * 4 + 4 * 8 + 4 * 4) * 4);
}

#[test]
fn default_lora_alpha_is_8() {
    let dir = folder(
        &config(json!({"lora_alpha": null, "r": 2})),
        pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 2),
    );
    let w = load(dir.path()).unwrap();
    assert_eq!(w.layers[0][0].as_ref().unwrap().scale, 4.0);
}

#[test]
fn use_rslora_scales_by_sqrt_r() {
    let c = config(json!({"use_rslora": true, "lora_alpha": 6}));
    let dir = folder(&c, pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4));
    let w = load(dir.path()).unwrap();
    assert_eq!(
        w.layers[0][LoraSite::V.index()].as_ref().unwrap().scale,
        3.0
    );
}

#[test]
fn regex_string_target_modules() {
    let c =
        config(json!({"target_modules": r"model\.layers\.\d+\.(self_attn\.k_proj|mlp\.up_proj)"}));
    let dir = folder(&c, pairs(&[0, 1], &[LoraSite::K, LoraSite::Up], 4));
    let w = load(dir.path()).unwrap();
    assert_eq!(w.target_modules, vec!["k_proj", "up_proj"]);
    assert_eq!(sites_of(&w, 1), vec![LoraSite::K, LoraSite::Up]);
}

#[test]
fn regex_target_is_a_full_match() {
    // "k_proj" as a regex fullmatches no full module name: nothing is selected.
    let c = config(json!({"target_modules": "k_proj"}));
    expect_invalid(
        load(folder(&c, pairs(&[0, 1], &[LoraSite::K], 4)).path()),
        "target_modules",
    );
}

#[test]
fn all_linear_targets_seven_sites() {
    let c = config(json!({"target_modules": "all-linear"}));
    let dir = folder(&c, pairs(&[0, 1], &LoraSite::ALL, 4));
    let w = load(dir.path()).unwrap();
    assert_eq!(w.target_modules.len(), 7);
    assert_eq!(sites_of(&w, 0), LoraSite::ALL.to_vec());
}

#[test]
fn exclude_modules_removes_matches() {
    let c = config(
        json!({"target_modules": "all-linear", "exclude_modules": ["mlp.down_proj", "o_proj"]}),
    );
    let sites = [
        LoraSite::Q,
        LoraSite::K,
        LoraSite::V,
        LoraSite::Gate,
        LoraSite::Up,
    ];
    let w = load(folder(&c, pairs(&[0, 1], &sites, 4)).path()).unwrap();
    assert_eq!(sites_of(&w, 1), sites.to_vec());
    let c = config(json!({"exclude_modules": r"model\.layers\.0\..*"}));
    let w = load(folder(&c, pairs(&[1], &[LoraSite::Q, LoraSite::V], 4)).path()).unwrap();
    assert!(sites_of(&w, 0).is_empty());
    // A tensor for an excluded module is unexpected.
    let c = config(json!({"exclude_modules": ["v_proj"]}));
    let tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    expect_invalid(
        load(folder(&c, tensors).path()),
        "unexpected key base_model.model.model.layers.0.self_attn.v_proj",
    );
}

#[test]
fn rank_and_alpha_patterns_override_per_module() {
    let c = config(json!({
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"layers.1.self_attn.v_proj": 2},
        "alpha_pattern": {"v_proj": 16},
    }));
    let mut tensors = pairs(&[0, 1], &[LoraSite::Q], 4);
    tensors.extend(pair(0, LoraSite::V, 4, DType::F32));
    tensors.extend(pair(1, LoraSite::V, 2, DType::F32));
    let w = load(folder(&c, tensors).path()).unwrap();
    let at = |l: usize, s: LoraSite| {
        let p = w.layers[l][s.index()].as_ref().unwrap();
        (p.rank, p.scale)
    };
    assert_eq!(at(0, LoraSite::Q), (4, 2.0));
    assert_eq!(at(1, LoraSite::Q), (4, 2.0));
    assert_eq!(at(0, LoraSite::V), (4, 4.0));
    assert_eq!(at(1, LoraSite::V), (2, 8.0));
    assert_eq!(w.rank_max, 4);
}

#[test]
fn pattern_rank_is_checked_against_the_tensors() {
    let c = config(json!({"rank_pattern": {"v_proj": 2}}));
    let tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    expect_invalid(
        load(folder(&c, tensors).path()),
        "self_attn.v_proj.lora_A.weight",
    );
}

#[test]
fn default_infix_keys_load() {
    let tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4)
        .into_iter()
        .map(|(k, t)| (k.replace(".weight", ".default.weight"), t))
        .collect();
    let w = load(folder(&config(json!({})), tensors).path()).unwrap();
    assert_eq!(
        *w.layers[1][LoraSite::V.index()].as_ref().unwrap().a,
        LoraValues::F32(values(4 * 8, 9.0))
    );
}

#[test]
fn layers_to_transform_subset() {
    let c = config(json!({"layers_to_transform": [1]}));
    let w = load(folder(&c, pairs(&[1], &[LoraSite::Q, LoraSite::V], 4)).path()).unwrap();
    assert!(sites_of(&w, 0).is_empty());
    assert_eq!(sites_of(&w, 1), vec![LoraSite::Q, LoraSite::V]);
    assert_eq!(w.bytes, f32_bytes(&w));
    let c = config(json!({"layers_to_transform": 0}));
    let w = load(folder(&c, pairs(&[0], &[LoraSite::Q, LoraSite::V], 4)).path()).unwrap();
    assert_eq!(sites_of(&w, 0), vec![LoraSite::Q, LoraSite::V]);
    assert!(sites_of(&w, 1).is_empty());
    let c = config(json!({"layers_to_transform": 1, "layers_pattern": "layers"}));
    let w = load(folder(&c, pairs(&[1], &[LoraSite::Q, LoraSite::V], 4)).path()).unwrap();
    assert!(sites_of(&w, 0).is_empty());
    assert_eq!(sites_of(&w, 1), vec![LoraSite::Q, LoraSite::V]);
    // As in PEFT's LoraConfig (`if layers_pattern and not layers_to_transform`), index 0 is
    // falsy there, so layers_pattern with layers_to_transform=0 is refused.
    let c = config(json!({"layers_to_transform": 0, "layers_pattern": "layers"}));
    let tensors = pairs(&[0], &[LoraSite::Q, LoraSite::V], 4);
    expect_invalid(
        load(folder(&c, tensors).path()),
        "layers_pattern requires layers_to_transform",
    );
}

#[test]
fn f16_and_bf16_tensors_are_converted() {
    for dtype in [DType::F16, DType::BF16] {
        let mut tensors = Vec::new();
        for layer in [0, 1] {
            for site in [LoraSite::Q, LoraSite::V] {
                tensors.extend(pair(layer, site, 4, dtype));
            }
        }
        let expected = tensors[0]
            .1
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let first = tensors[0].0.clone();
        let w = load(folder(&config(json!({})), tensors).path()).unwrap();
        let q = w.layers[0][LoraSite::Q.index()].as_ref().unwrap();
        assert!(first.ends_with("lora_A.weight"));
        assert_eq!(*q.a, LoraValues::F32(expected), "{dtype:?}");
        assert_ne!(
            *q.a,
            LoraValues::F32(values(32, 0.0)),
            "{dtype:?} must round"
        );
    }
}

// ---------------------------------------------------------------- refusals

#[test]
fn wrong_shape_is_invalid() {
    let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    let k = key(1, LoraSite::V, "lora_B");
    tensors.retain(|(name, _)| *name != k);
    tensors.push((k.clone(), tensor((8, 4), 0.0, DType::F32))); // v_proj out is 4, not 8
    expect_invalid(load(folder(&config(json!({})), tensors).path()), &k);
}

#[test]
fn nan_and_inf_are_invalid() {
    for bad in [f32::NAN, f32::INFINITY] {
        let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
        let k = key(0, LoraSite::Q, "lora_A");
        let mut v = values(32, 0.0);
        v[5] = bad;
        tensors.retain(|(name, _)| *name != k);
        tensors.push((
            k.clone(),
            Tensor::from_vec(v, (4, 8), &Device::Cpu).unwrap(),
        ));
        expect_invalid(load(folder(&config(json!({})), tensors).path()), &k);
    }
}

#[test]
fn a_without_b_is_a_missing_key() {
    let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    let k = key(1, LoraSite::Q, "lora_B");
    tensors.retain(|(name, _)| *name != k);
    expect_invalid(
        load(folder(&config(json!({})), tensors).path()),
        &format!("missing key {k}"),
    );
}

#[test]
fn targeted_site_absent_from_the_file_is_a_missing_key() {
    let tensors = pairs(&[0, 1], &[LoraSite::Q], 4);
    expect_invalid(
        load(folder(&config(json!({})), tensors).path()),
        "missing key base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
    );
}

#[test]
fn layer_outside_layers_to_transform_is_an_unexpected_key() {
    let c = config(json!({"layers_to_transform": [1]}));
    let tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    expect_invalid(
        load(folder(&c, tensors).path()),
        &format!("unexpected key {}", key(0, LoraSite::Q, "lora_A")),
    );
}

#[test]
fn stray_keys_are_unexpected() {
    for stray in [
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_A.weight",
    ] {
        let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
        tensors.push((stray.to_string(), tensor((4, 8), 0.0, DType::F32)));
        expect_invalid(
            load(folder(&config(json!({})), tensors).path()),
            &format!("unexpected key {stray}"),
        );
    }
}

#[test]
fn unknown_target_modules_are_refused() {
    let tensors = || pairs(&[0, 1], &[LoraSite::Q], 4);
    let c = config(json!({"target_modules": ["q_proj", "c_attn"]}));
    expect_invalid(
        load(folder(&c, tensors()).path()),
        "unknown target module c_attn",
    );
    for emb in ["embed_tokens", "lm_head"] {
        let c = config(json!({"target_modules": ["q_proj", emb]}));
        expect_unsupported(load(folder(&c, tensors()).path()), "embedding/lm_head LoRA");
        expect_unsupported(load(folder(&c, tensors()).path()), emb);
    }
}

#[test]
fn refused_features_are_named() {
    let cases = [
        (
            json!({"use_dora": true}),
            "DoRA without the served base weights",
        ),
        (json!({"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (json!({"lora_bias": true}), "lora_bias"),
        (json!({"bias": "lora_only"}), "bias"),
        (json!({"fan_in_fan_out": true}), "fan_in_fan_out"),
        (
            json!({"layer_replication": [[0, 1], [0, 2]]}),
            "layer_replication",
        ),
        (json!({"use_qalora": true}), "use_qalora"),
        (
            json!({"target_parameters": ["mlp.experts.down_proj"]}),
            "target_parameters",
        ),
        (
            json!({"alora_invocation_tokens": [1, 2]}),
            "alora_invocation_tokens",
        ),
        (
            json!({"trainable_token_indices": [5]}),
            "trainable_token_indices",
        ),
        (json!({"init_lora_weights": "pissa"}), "init_lora_weights"),
        (json!({"peft_type": "LOHA"}), "peft_type"),
    ];
    for (extra, field) in cases {
        let dir = folder(
            &config(extra),
            pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4),
        );
        expect_unsupported(load(dir.path()), field);
    }
}

#[test]
fn a_magnitude_without_use_dora_is_an_unexpected_key() {
    let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    let stray = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    tensors.push((stray.to_string(), tensor((1, 8), 0.0, DType::F32)));
    expect_invalid(
        load(folder(&config(json!({})), tensors).path()),
        "use_dora is not set",
    );
}

#[test]
fn embedding_and_bias_tensors_are_refused() {
    for (stray, needle) in [
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "lora_embedding_A",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            "lora_bias",
        ),
    ] {
        let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
        tensors.push((stray.to_string(), tensor((1, 8), 0.0, DType::F32)));
        expect_unsupported(load(folder(&config(json!({})), tensors).path()), needle);
    }
}

#[test]
fn pickle_bin_only_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), config(json!({})).to_string()).unwrap();
    std::fs::write(
        dir.path().join(PICKLE_WEIGHTS_FILE),
        b"\x80\x02not really a pickle",
    )
    .unwrap();
    expect_unsupported(
        load(dir.path()),
        "pickle .bin weights are never loaded; convert to safetensors",
    );
}

#[test]
fn missing_files_are_io_errors_naming_them() {
    let dir = qv_folder();
    std::fs::remove_file(dir.path().join(CONFIG_FILE)).unwrap();
    match load(dir.path()) {
        Err(AdapterError::Io(m)) => assert!(m.contains(CONFIG_FILE), "{m}"),
        other => panic!("{other:?}"),
    }
    let dir = qv_folder();
    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
    match load(dir.path()) {
        Err(AdapterError::Io(m)) => assert!(m.contains(WEIGHTS_FILE), "{m}"),
        other => panic!("{other:?}"),
    }
    match load(&dir.path().join("nope")) {
        Err(AdapterError::Io(m)) => assert!(m.contains("nope"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_safetensors_is_invalid() {
    let dir = qv_folder();
    let path = dir.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    expect_invalid(load(dir.path()), "truncated");
    std::fs::write(&path, &bytes[..5]).unwrap();
    expect_invalid(load(dir.path()), "truncated");
    std::fs::write(&path, &bytes[..100]).unwrap();
    expect_invalid(load(dir.path()), "truncated");
}

#[test]
fn header_length_over_the_limit_is_refused_before_reading() {
    let dir = qv_folder();
    let path = dir.path().join(WEIGHTS_FILE);
    let limits = AdapterLimits {
        max_header_bytes: 64,
        ..AdapterLimits::default()
    };
    expect_invalid(
        load_peft_adapter(dir.path(), &TINY, &limits, AdapterDType::F32),
        "header length",
    );
    // A header claiming 1 TiB in a tiny file is refused by the default limit.
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    expect_invalid(load(dir.path()), "exceeds the limit");
}

#[test]
fn file_size_over_the_limit_is_refused() {
    let dir = qv_folder();
    let limits = AdapterLimits {
        max_file_bytes: 100,
        ..AdapterLimits::default()
    };
    expect_invalid(
        load_peft_adapter(dir.path(), &TINY, &limits, AdapterDType::F32),
        WEIGHTS_FILE,
    );
}

#[test]
fn other_dtypes_are_invalid() {
    let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    let k = key(0, LoraSite::V, "lora_B");
    tensors.retain(|(name, _)| *name != k);
    tensors.push((k.clone(), tensor((4, 4), 0.0, DType::F64)));
    expect_invalid(load(folder(&config(json!({})), tensors).path()), "F64");
}

#[test]
fn config_errors_name_the_field() {
    let tensors = || pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    expect_invalid(
        load(folder(&config(json!({"r": null})), tensors()).path()),
        "config: missing r",
    );
    expect_invalid(
        load(folder(&config(json!({"r": 0})), tensors()).path()),
        "r must be a positive integer",
    );
    expect_invalid(
        load(folder(&config(json!({"peft_type": null})), tensors()).path()),
        "peft_type",
    );
    let c = config(json!({"target_modules": "all-linear", "layers_to_transform": [0]}));
    expect_invalid(load(folder(&c, tensors()).path()), "layers_to_transform");
    let c = config(json!({"rank_pattern": ["v_proj"]}));
    expect_invalid(load(folder(&c, tensors()).path()), "rank_pattern");
    let dir = qv_folder();
    std::fs::write(dir.path().join(CONFIG_FILE), "{not json").unwrap();
    expect_invalid(load(dir.path()), CONFIG_FILE);
}
