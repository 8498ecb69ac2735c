//! Loading DoRA and (IA)³ folders: the PEFT-trained fixtures, and every refusal on tiny
//! folders made here (each error naming the key, field or feature).
mod common;

use candle_core::{DType, Device, Tensor};
use common::peft_folders::*;
use multilora::lora::peft::{
    estimate_adapter_bytes, load_peft_adapter_served, AdapterError, AdapterKind, AdapterLimits,
    AdapterWeights, BaseShape, LoraSite, ServedBase, SiteScale,
};
use multilora::lora::values::AdapterDType;
use serde_json::{json, Value};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// A base whose every weight entry is 0.5 (so each row norm is known).
struct Halves(BaseShape);

impl ServedBase for Halves {
    fn weight_rows(
        &self,
        _: usize,
        site: LoraSite,
        rows: Range<usize>,
    ) -> anyhow::Result<Vec<f32>> {
        Ok(vec![0.5; rows.len() * self.0.dims(site).0])
    }
    fn serves(&self, _: AdapterKind) -> bool {
        true
    }
}

fn load_on(dir: &Path, base: BaseShape) -> Result<AdapterWeights, AdapterError> {
    let served = Halves(base);
    load_peft_adapter_served(
        dir,
        &base,
        &AdapterLimits::default(),
        AdapterDType::F32,
        Some(&served),
    )
}

fn ia3_key(layer: usize, site: LoraSite) -> String {
    format!("base_model.model.{}.ia3_l", site.module_path(layer))
}

/// `l` tensors for `sites` on both tiny layers, `[1, in]` for down_proj, else `[out, 1]`.
fn ia3_tensors(sites: &[LoraSite]) -> Vec<(String, Tensor)> {
    let mut all = Vec::new();
    for layer in 0..2 {
        for &site in sites {
            let (inp, out) = TINY.dims(site);
            let shape = if site == LoraSite::Down {
                (1, inp)
            } else {
                (out, 1)
            };
            all.push((
                ia3_key(layer, site),
                tensor(shape, layer as f32, DType::F32),
            ));
        }
    }
    all
}

fn ia3_config(extra: Value) -> Value {
    let mut c = config(json!({
        "peft_type": "IA3", "r": null, "lora_alpha": null, "bias": null, "use_dora": null,
        "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
    }));
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn ia3_fixture_scales_k_v_outputs_and_the_down_input() {
    let w = load_on(&fixture("zeta-ia3"), SMOLLM2).unwrap();
    assert_eq!(w.kind, AdapterKind::Ia3);
    assert_eq!(w.target_modules, ["down_proj", "k_proj", "v_proj"]);
    assert_eq!(w.rank_max, 0);
    assert!(w.layers.iter().flatten().all(Option::is_none));
    for layer in 0..30 {
        assert!(
            matches!(w.scale(layer, LoraSite::Down), Some(SiteScale::Input(l)) if l.len() == 1536)
        );
        assert!(
            matches!(w.scale(layer, LoraSite::K), Some(SiteScale::Output(l)) if l.len() == 192)
        );
        assert!(w.scale(layer, LoraSite::Q).is_none());
    }
    assert_eq!(w.bytes, 30 * 4 * (1536 + 2 * 192));
}

#[test]
fn dora_fixture_scales_are_magnitude_over_row_norm() {
    let dir = fixture("delta-dora-r8-attn");
    let w = load_on(&dir, SMOLLM2).unwrap();
    assert_eq!(w.kind, AdapterKind::Dora);
    assert_eq!(w.target_modules, ["k_proj", "o_proj", "q_proj", "v_proj"]);
    assert_eq!(w.rank_max, 8);
    // Row 0 of layer 3's v_proj by the definition, over the all-0.5 base.
    let file = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let get = |half: &str| {
        let name = format!("base_model.model.model.layers.3.self_attn.v_proj.{half}");
        file[&name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b, m) = (
        get("lora_A.weight"),
        get("lora_B.weight"),
        get("lora_magnitude_vector"),
    );
    let row: Vec<f32> = (0..576)
        .map(|i| 0.5 + 2.0 * (0..8).map(|r| b[r] * a[r * 576 + i]).sum::<f32>())
        .collect();
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
    let Some(SiteScale::Output(g)) = w.scale(3, LoraSite::V) else {
        panic!("no DoRA scale at v_proj");
    };
    assert!(
        (g[0] - m[0] / norm).abs() < 1e-6,
        "{} vs {}",
        g[0],
        m[0] / norm
    );
    // Per layer: q and o pairs of 2 x 8 x 576, k and v of 8 x (576 + 192), magnitudes.
    let per_layer = 2 * (2 * 8 * 576) + 2 * 8 * (576 + 192) + (2 * 576 + 2 * 192);
    assert_eq!(w.bytes, 30 * 4 * per_layer);
}

#[test]
fn dora_needs_a_magnitude_of_the_output_width_at_every_site() {
    let dora = config(json!({"use_dora": true}));
    let magnitude = |layer: usize, site: LoraSite, n: usize| {
        let name = format!(
            "base_model.model.{}.lora_magnitude_vector",
            site.module_path(layer)
        );
        (name, Tensor::ones(n, DType::F32, &Device::Cpu).unwrap())
    };
    let mut tensors = pairs(&[0, 1], &[LoraSite::Q, LoraSite::V], 4);
    tensors.extend([
        magnitude(0, LoraSite::Q, 8),
        magnitude(1, LoraSite::Q, 8),
        magnitude(0, LoraSite::V, 4),
    ]);
    expect_invalid(
        load_on(folder(&dora, tensors.clone()).path(), TINY),
        "missing key base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector",
    );
    tensors.push(magnitude(1, LoraSite::V, 3));
    expect_invalid(
        load_on(folder(&dora, tensors.clone()).path(), TINY),
        "expected [4]",
    );
    tensors.pop();
    tensors.push(magnitude(1, LoraSite::V, 4));
    let w = load_on(folder(&dora, tensors).path(), TINY).unwrap();
    assert_eq!(w.kind, AdapterKind::Dora);
    // Bytes: every pair plus every magnitude, in f32.
    assert_eq!(
        w.bytes,
        2 * 4 * (4 * 8 + 8 * 4 + 4 * 8 + 4 * 4) + 2 * 4 * (8 + 4)
    );
}

#[test]
fn ia3_tiny_folder_loads_and_follows_feedforward_matching() {
    let sites = [LoraSite::K, LoraSite::V, LoraSite::Down];
    let w = load_on(
        folder(&ia3_config(json!({})), ia3_tensors(&sites)).path(),
        TINY,
    )
    .unwrap();
    assert!(matches!(
        w.scale(1, LoraSite::Down),
        Some(SiteScale::Input(_))
    ));
    // PEFT matches feed-forward entries with a plain `endswith` (no dot boundary).
    let c = ia3_config(json!({"feedforward_modules": ["own_proj"]}));
    let w = load_on(folder(&c, ia3_tensors(&sites)).path(), TINY).unwrap();
    assert!(matches!(
        w.scale(0, LoraSite::Down),
        Some(SiteScale::Input(_))
    ));
    // A regex string is a full match.
    let c = ia3_config(json!({"feedforward_modules": ".*mlp\\.down_proj"}));
    assert!(load_on(folder(&c, ia3_tensors(&sites)).path(), TINY).is_ok());
    // Without feed-forward on down_proj its vector must be [out, 1].
    let c = ia3_config(json!({"feedforward_modules": []}));
    expect_invalid(
        load_on(folder(&c, ia3_tensors(&sites)).path(), TINY),
        "expected [8, 1]",
    );
}

#[test]
fn ia3_refusals_name_the_key_or_feature() {
    // (Feed-forward scaling of a stacked projection, q_proj or up_proj, is served:
    // tests/model_families.rs checks it against PEFT.)
    let sites = [LoraSite::K, LoraSite::V, LoraSite::Down];
    let c = ia3_config(json!({"modules_to_save": ["lm_head"]}));
    expect_unsupported(
        load_on(folder(&c, ia3_tensors(&sites)).path(), TINY),
        "modules_to_save",
    );
    let mut missing = ia3_tensors(&sites);
    missing.remove(0);
    expect_invalid(
        load_on(folder(&ia3_config(json!({})), missing).path(), TINY),
        "missing key base_model.model.model.layers.0.self_attn.k_proj.ia3_l",
    );
    let mut stray = ia3_tensors(&sites);
    stray.extend(pair(0, LoraSite::K, 2, DType::F32));
    expect_invalid(
        load_on(folder(&ia3_config(json!({})), stray).path(), TINY),
        "unexpected key",
    );
    let mut bad = ia3_tensors(&sites);
    let nan = Tensor::from_vec(vec![f32::NAN; 4], (4, 1), &Device::Cpu).unwrap();
    bad[0].1 = nan;
    expect_invalid(
        load_on(folder(&ia3_config(json!({})), bad).path(), TINY),
        "non-finite",
    );
}

fn module_key(layer: usize, site: LoraSite, part: &str) -> String {
    format!("base_model.model.{}.{part}", site.module_path(layer))
}

#[test]
fn adalora_folds_e_into_a_with_alpha_over_init_r_and_follows_the_rank_pattern() {
    // init_r 3; layer 0 q_proj keeps ranks 0 and 2, layer 1 q_proj keeps none.
    let config = json!({"peft_type": "ADALORA", "init_r": 3, "target_r": 2, "lora_alpha": 6,
        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
        "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [true, false, true],
                         "model.layers.1.self_attn.q_proj.lora_E": [false, false, false]}});
    let e = Tensor::from_vec(vec![2.0f32, -0.5], (2, 1), &Device::Cpu).unwrap();
    let empty = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let tensors = vec![
        (
            module_key(0, LoraSite::Q, "lora_A"),
            tensor((2, 8), 0.0, DType::F32),
        ),
        (
            module_key(0, LoraSite::Q, "lora_B"),
            tensor((8, 2), 1.0, DType::F32),
        ),
        (module_key(0, LoraSite::Q, "lora_E"), e),
        (module_key(1, LoraSite::Q, "lora_A"), empty((0, 8))),
        (module_key(1, LoraSite::Q, "lora_B"), empty((8, 0))),
        (module_key(1, LoraSite::Q, "lora_E"), empty((0, 1))),
    ];
    let w = load_on(folder(&config, tensors.clone()).path(), TINY).unwrap();
    assert_eq!((w.kind, w.rank_max), (AdapterKind::AdaLora, 2));
    let pair = w.layers[0][LoraSite::Q.index()].as_ref().unwrap();
    assert!(
        (pair.scale - 6.0 / (3.0 + 1e-5)).abs() < 1e-7,
        "{}",
        pair.scale
    );
    let a = tensors[0].1.to_vec2::<f32>().unwrap();
    let folded = pair.a.to_f32();
    for k in 0..8 {
        assert_eq!(folded[k], a[0][k] * 2.0);
        assert_eq!(folded[8 + k], a[1][k] * -0.5);
    }
    assert!(
        w.layers[1][LoraSite::Q.index()].is_none(),
        "rank 0 holds no pair"
    );
    assert_eq!(w.target_modules, ["q_proj"]);
    // A mask whose length is not init_r, and a tensor cut to the wrong rank, are refused.
    let bad = json!({"peft_type": "ADALORA", "init_r": 3, "target_modules": ["q_proj"],
        "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [true, true]}});
    expect_invalid(
        load_on(folder(&bad, tensors.clone()).path(), TINY),
        "init_r is 3",
    );
    let full = json!({"peft_type": "ADALORA", "init_r": 3, "target_modules": ["q_proj"]});
    expect_invalid(
        load_on(folder(&full, tensors).path(), TINY),
        "expected [3, 8]",
    );
}

#[test]
fn vera_shares_the_sliced_projections_and_keeps_its_lambdas() {
    let r = 2;
    let config = json!({"peft_type": "VERA", "r": r, "target_modules": ["q_proj", "k_proj"],
        "save_projection": true, "projection_prng_key": 0, "task_type": "CAUSAL_LM"});
    // max in 8, max out 8 (q_proj is 8 x 8, k_proj 4 x 8).
    let mut tensors = vec![
        (
            "base_model.vera_A".to_string(),
            tensor((r, 8), 0.0, DType::F32),
        ),
        (
            "base_model.vera_B".to_string(),
            tensor((8, r), 1.0, DType::F32),
        ),
    ];
    for layer in 0..2 {
        for (site, out) in [(LoraSite::Q, 8), (LoraSite::K, 4)] {
            let b = Tensor::from_vec(
                (0..out).map(|i| 1.0 + i as f32).collect::<Vec<f32>>(),
                out,
                &Device::Cpu,
            );
            tensors.push((module_key(layer, site, "vera_lambda_b"), b.unwrap()));
            let d = Tensor::from_vec(vec![0.5f32, -2.0], r, &Device::Cpu).unwrap();
            tensors.push((module_key(layer, site, "vera_lambda_d"), d));
        }
    }
    let dir = folder(&config.clone(), tensors.clone());
    let w = load_on(dir.path(), TINY).unwrap();
    assert_eq!((w.kind, w.rank_max), (AdapterKind::Vera, 2));
    let pair = w.layers[1][LoraSite::K.index()].as_ref().unwrap();
    assert_eq!(pair.scale, 1.0);
    let (a, b) = (
        tensors[0].1.to_vec2::<f32>().unwrap(),
        tensors[1].1.to_vec2::<f32>().unwrap(),
    );
    let (fa, fb) = (pair.a.to_f32(), pair.b.to_f32());
    assert_eq!(fa.len(), r * 8);
    assert_eq!(fb.len(), 4 * r);
    assert_eq!((fa[8 + 3], fb[3 * r + 1]), (a[1][3], b[3][1]));
    assert_eq!(pair.rank_scale.as_deref(), Some(&[0.5, -2.0][..]));
    assert_eq!(pair.out_scale.as_deref(), Some(&[1.0, 2.0, 3.0, 4.0][..]));
    // The slices are held once: q_proj and k_proj of every layer read one A_s, a second
    // adapter with the same projections too; each output width has one B_s.
    let again = load_on(folder(&config.clone(), tensors.clone()).path(), TINY).unwrap();
    let q0 = w.layers[0][LoraSite::Q.index()].as_ref().unwrap();
    let k0 = again.layers[0][LoraSite::K.index()].as_ref().unwrap();
    assert!(Arc::ptr_eq(&q0.a, &pair.a) && Arc::ptr_eq(&k0.a, &pair.a));
    assert!(Arc::ptr_eq(&k0.b, &pair.b) && !Arc::ptr_eq(&q0.b, &pair.b));
    // A_s [2, 8], B_s [8, 2] and [4, 2]; lambdas (2 + 8) and (2 + 4) in each of 2 layers.
    assert_eq!(w.bytes, 4 * (16 + 16 + 8) + 4 * 2 * (10 + 6));
    let estimate = estimate_adapter_bytes(dir.path(), &AdapterLimits::default(), AdapterDType::F32);
    assert_eq!(estimate.unwrap(), w.bytes);
    let mut no_projection = config.clone();
    no_projection["save_projection"] = json!(false);
    expect_unsupported(
        load_on(folder(&no_projection, tensors.clone()).path(), TINY),
        "save_projection",
    );
    tensors.remove(0);
    expect_invalid(
        load_on(folder(&config, tensors).path(), TINY),
        "missing key base_model.vera_A",
    );
}

/// The header-only estimate the registry reserves host memory by is an upper bound on
/// what every type holds once loaded, in both storage types, and not far above it.
#[test]
fn byte_estimates_bound_every_type() {
    let names = [
        "alpha-lora-r8-qv",
        "delta-dora-r8-attn",
        "zeta-ia3",
        "eta-prompt-tuning",
        "theta-p-tuning",
        "kappa-vera",
        "lambda-adalora",
    ];
    for dtype in [AdapterDType::F32, AdapterDType::Bf16] {
        for name in names {
            let dir = fixture(name);
            let served = Halves(SMOLLM2);
            let w = load_peft_adapter_served(
                &dir,
                &SMOLLM2,
                &AdapterLimits::default(),
                dtype,
                Some(&served),
            )
            .unwrap();
            let estimate = estimate_adapter_bytes(&dir, &AdapterLimits::default(), dtype).unwrap();
            assert!(
                estimate >= w.bytes,
                "{name} {dtype:?}: estimate {estimate} < {} held",
                w.bytes
            );
            assert!(
                estimate <= 2 * w.bytes + 4096,
                "{name} {dtype:?}: estimate {estimate} for {} held",
                w.bytes
            );
        }
    }
}

/// `adapters synth` makes every kind: each loads as that kind (its rank, or its virtual
/// tokens), within the header estimate; synthetic VeRA adapters share one projection.
#[test]
fn synthetic_adapters_of_every_kind_load_as_that_kind() {
    use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
    let root = tempfile::tempdir().unwrap();
    let load = |kind: AdapterKind, seed: u64| {
        let sites = match kind {
            AdapterKind::Ia3 => vec![LoraSite::K, LoraSite::V, LoraSite::Down],
            _ => vec![LoraSite::Q, LoraSite::V, LoraSite::Down],
        };
        let spec = SynthSpec {
            kind,
            rank: 3,
            alpha: 6.0,
            sites,
            seed,
        };
        let dir = root.path().join(format!("{}-{seed}", kind.name()));
        write_synthetic_adapter(&dir, &TINY, &spec).unwrap();
        let w = load_on(&dir, TINY).unwrap();
        let estimate = estimate_adapter_bytes(&dir, &AdapterLimits::default(), AdapterDType::F32);
        assert!(estimate.unwrap() >= w.bytes, "{kind:?}");
        w
    };
    for kind in AdapterKind::ALL {
        let w = load(kind, 1);
        assert_eq!(w.kind, kind);
        match kind {
            AdapterKind::Ia3 => assert_eq!(w.scales.len(), TINY.num_layers),
            k if !k.mixes() && k != AdapterKind::Dora => assert_eq!(w.num_virtual_tokens(), 3),
            _ => assert_eq!(w.rank_max, 3, "{kind:?}"),
        }
    }
    let (one, two) = (load(AdapterKind::Vera, 1), load(AdapterKind::Vera, 2));
    let (p1, p2) = [&one, &two]
        .map(|w| w.layers[0][LoraSite::Q.index()].as_ref().unwrap())
        .into();
    assert!(Arc::ptr_eq(&p1.a, &p2.a) && Arc::ptr_eq(&p1.b, &p2.b));
    assert_ne!(p1.rank_scale, p2.rank_scale);
}
