//! DoRA and (IA)³ through the model on the tiny random Llama, each against the obvious
//! reference, a model with the adapter merged into its weights:
//! - DoRA: `W' = diag(m / ||W + s B A||) (W + s B A)` (norms per output row);
//! - (IA)³: `W' = diag(l) W` on an output-scaled site, `W' = W diag(l)` on a
//!   feed-forward (input-scaled) one.
//!
//! In one batch with a LoRA adapter and base tokens, each token's logits are
//! bit-identical to its solo run; DoRA on a quantized base takes its norms over the
//! weights as served; a backend that cannot serve a kind refuses it at load, by name.
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use multilora::engine::block_allocator::{Allocation, BlockAllocator};
use multilora::lora::peft::{
    load_peft_adapter, load_peft_adapter_served, AdapterError, AdapterKind, AdapterLimits,
    AdapterWeights, LoraSite, SiteScale, WEIGHTS_FILE,
};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::lora::values::AdapterDType;
use multilora::model::backend::cpu::CpuWeightFormat;
use multilora::model::backend::Backend;
use multilora::model::{CpuBackend, ForwardBatch, Llama, ModelConfig};
use multilora::testing::{llama_from, llama_on, random_weights, tiny_config};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const VOCAB: usize = 97;
const SEED: u64 = 3;

type Model = Llama<CpuBackend>;

/// A sequence's tokens and its weighted adapter entries `(slot, weight)`.
type WeightedSeq = (Vec<u32>, Vec<(u32, f32)>);

fn spec(kind: AdapterKind, sites: &[LoraSite], seed: u64) -> SynthSpec {
    SynthSpec {
        kind,
        rank: 4,
        alpha: 8.0,
        sites: sites.to_vec(),
        seed,
    }
}

/// Writes the adapter of `spec` under `dir` and loads it for `model`.
fn load(
    dir: &Path,
    model: &Model,
    spec: &SynthSpec,
) -> (Arc<AdapterWeights>, HashMap<String, Tensor>) {
    write_synthetic_adapter(dir, &model.base_shape(), spec).unwrap();
    let served = model.served_base();
    let dtype = model.backend().adapter_dtype();
    let limits = AdapterLimits::default();
    let w = load_peft_adapter_served(dir, &model.base_shape(), &limits, dtype, Some(&*served));
    let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    (Arc::new(w.unwrap()), tensors)
}

/// The base weights with each adapted site replaced by `merge(W, site tensors)`.
fn merged(
    cfg: &ModelConfig,
    adapter: &HashMap<String, Tensor>,
    merge: impl Fn(&Tensor, &str) -> Tensor,
) -> Model {
    let mut w = random_weights(cfg, SEED).unwrap();
    let mut prefixes: Vec<&str> = adapter
        .keys()
        .filter_map(|k| k.rsplit_once('.').map(|(p, _)| p))
        .map(|p| p.trim_end_matches(".lora_A").trim_end_matches(".lora_B"))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    for prefix in prefixes {
        let name = format!("{}.weight", prefix.trim_start_matches("base_model.model."));
        let new = merge(&w[&name], prefix);
        w.insert(name, new);
    }
    llama_from(w, cfg).unwrap()
}

fn run(model: &Model, adapters: &[Arc<AdapterWeights>], seqs: &[(Vec<u32>, i32)]) -> Vec<Vec<f32>> {
    let seqs: Vec<WeightedSeq> = seqs
        .iter()
        .map(|(t, s)| {
            (
                t.clone(),
                u32::try_from(*s).map(|s| (s, 1.0)).into_iter().collect(),
            )
        })
        .collect();
    run_entries(model, adapters, &seqs)
}

/// One step over `seqs`, each with its weighted adapter entries (none: the base; one of
/// weight 1: a plain adapter chunk; else a mixture chunk).
fn run_entries(
    model: &Model,
    adapters: &[Arc<AdapterWeights>],
    seqs: &[WeightedSeq],
) -> Vec<Vec<f32>> {
    let mut alloc = BlockAllocator::new(64, 4);
    let mut kv = model.new_kv(64, 4).unwrap();
    let mut batch = ForwardBatch::default();
    let mut tables = Vec::new();
    for (tokens, entries) in seqs {
        let mut table = Vec::new();
        assert_eq!(alloc.allocate(&mut table, tokens.len()), Allocation::Ok);
        let start = batch.tokens.len();
        match entries.as_slice() {
            [] => batch.push_chunk(tokens, 0, &table),
            [(slot, w)] if *w == 1.0 => batch.push_adapter_chunk(tokens, 0, &table, *slot as i32),
            _ => batch.push_mixture_chunk(tokens, 0, &table, entries),
        };
        batch.logit_rows.extend(start..start + tokens.len());
        tables.push(table);
    }
    let logits = model
        .forward_with_adapters(&batch, &mut kv, adapters)
        .unwrap();
    logits.chunks(VOCAB).map(|r| r.to_vec()).collect()
}

fn tokens(n: usize, step: usize) -> Vec<u32> {
    (0..n).map(|i| (i * step % VOCAB) as u32).collect()
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        let m = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = x.iter().zip(y).fold(0f32, |d, (p, q)| d.max((p - q).abs()));
        assert!(
            d <= 1e-4 * (1.0 + m),
            "{what} position {i}: max diff {d} (scale {m})"
        );
    }
}

/// The largest logit change an adapter makes (so a test is not vacuous).
fn moved(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |d, (p, q)| d.max((p - q).abs()))
}

fn dora_merge(
    adapter: &HashMap<String, Tensor>,
    scale: f64,
) -> impl Fn(&Tensor, &str) -> Tensor + '_ {
    move |w: &Tensor, prefix: &str| {
        let a = &adapter[&format!("{prefix}.lora_A.weight")];
        let b = &adapter[&format!("{prefix}.lora_B.weight")];
        let m = &adapter[&format!("{prefix}.lora_magnitude_vector")];
        let full = (w + (b.matmul(a).unwrap() * scale).unwrap()).unwrap();
        let norm = full.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        let g = m.unsqueeze(1).unwrap().div(&norm).unwrap();
        full.broadcast_mul(&g).unwrap()
    }
}

#[test]
fn dora_tokens_match_the_merged_dora_weights() {
    let cfg = tiny_config(VOCAB);
    let base = llama_from(random_weights(&cfg, SEED).unwrap(), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sites = [LoraSite::Q, LoraSite::V, LoraSite::O, LoraSite::Down];
    let (dora, tensors) = load(dir.path(), &base, &spec(AdapterKind::Dora, &sites, 1));
    assert_eq!(dora.kind, AdapterKind::Dora);
    let want = run(
        &merged(&cfg, &tensors, dora_merge(&tensors, 2.0)),
        &[],
        &[(tokens(9, 7), -1)],
    );
    let got = run(&base, &[dora], &[(tokens(9, 7), 0)]);
    assert_close(&got, &want, "DoRA");
    let plain = run(&base, &[], &[(tokens(9, 7), -1)]);
    assert!(moved(&got, &plain) > 1e-2, "DoRA barely changes logits");
}

#[test]
fn ia3_tokens_match_the_merged_scaled_weights() {
    let cfg = tiny_config(VOCAB);
    let base = llama_from(random_weights(&cfg, SEED).unwrap(), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sites = [LoraSite::K, LoraSite::V, LoraSite::Down];
    let (ia3, tensors) = load(dir.path(), &base, &spec(AdapterKind::Ia3, &sites, 2));
    assert!(matches!(
        ia3.scale(0, LoraSite::Down),
        Some(SiteScale::Input(_))
    ));
    assert!(matches!(
        ia3.scale(1, LoraSite::K),
        Some(SiteScale::Output(_))
    ));
    let merge = |w: &Tensor, prefix: &str| {
        let l = &tensors[&format!("{prefix}.ia3_l")];
        // `[out, 1]` scales rows, `[1, in]` scales columns: one broadcast does both.
        w.broadcast_mul(l).unwrap()
    };
    let want = run(&merged(&cfg, &tensors, merge), &[], &[(tokens(7, 5), -1)]);
    let got = run(&base, &[ia3], &[(tokens(7, 5), 0)]);
    assert_close(&got, &want, "(IA)³");
    let plain = run(&base, &[], &[(tokens(7, 5), -1)]);
    assert!(moved(&got, &plain) > 1e-2, "(IA)³ barely changes logits");
}

#[test]
fn every_kind_in_one_batch_is_bit_identical_to_its_solo_run() {
    let cfg = tiny_config(VOCAB);
    let base = llama_from(random_weights(&cfg, SEED).unwrap(), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let all = LoraSite::ALL;
    let adapters: Vec<Arc<AdapterWeights>> = [
        (AdapterKind::Dora, &all[..4]),
        (
            AdapterKind::Ia3,
            &[LoraSite::K, LoraSite::V, LoraSite::Down][..],
        ),
        (AdapterKind::Lora, &all[..]),
    ]
    .iter()
    .enumerate()
    .map(|(i, (kind, sites))| {
        load(
            &dir.path().join(i.to_string()),
            &base,
            &spec(*kind, sites, i as u64),
        )
        .0
    })
    .collect();
    let seqs: Vec<(Vec<u32>, i32)> = (0..6)
        .map(|i| (tokens(3 + i, 3 + 2 * i), i as i32 % 4 - 1))
        .collect();
    let together = run(&base, &adapters, &seqs);
    let mut row = 0;
    for seq in &seqs {
        let alone = run(&base, &adapters, std::slice::from_ref(seq));
        for logits in alone {
            assert_eq!(together[row], logits, "slot {} row {row}", seq.1);
            row += 1;
        }
    }
}

/// On a quantized base DoRA's norms are over the dequantized blocks the kernels use:
/// the adapter then matches a merge into those dequantized weights (the f32 model of
/// the same blocks) far more closely than a merge into the unquantized ones would.
#[test]
fn dora_on_a_quantized_base_takes_norms_over_the_served_weights() {
    let cfg = tiny_config(VOCAB);
    let quantized = CpuBackend::new(CpuWeightFormat::Quantized {
        dense_to: GgmlDType::Q8_0,
    });
    let base = llama_on(quantized, random_weights(&cfg, SEED).unwrap(), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sites = [LoraSite::Q, LoraSite::Down];
    let (dora, _) = load(dir.path(), &base, &spec(AdapterKind::Dora, &sites, 4));
    let served = base.served_base();
    // Row 0 of layer 0's q_proj: the scale against the definition over served rows.
    let pair = dora.layers[0][LoraSite::Q.index()].as_ref().unwrap();
    let (a, b) = (pair.a.to_f32(), pair.b.to_f32());
    let inp = a.len() / pair.rank;
    let w = served.weight_rows(0, LoraSite::Q, 0..1).unwrap();
    let row: Vec<f32> = (0..inp)
        .map(|i| w[i] + pair.scale * (0..pair.rank).map(|r| b[r] * a[r * inp + i]).sum::<f32>())
        .collect();
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
    let Some(SiteScale::Output(g)) = dora.scale(0, LoraSite::Q) else {
        panic!("no DoRA scale at q_proj");
    };
    let file = candle_core::safetensors::load(dir.path().join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mag = file["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        (g[0] - mag[0] / norm).abs() < 1e-5,
        "{} vs {}",
        g[0],
        mag[0] / norm
    );
    // The served row is the Q8_0 one, not the f32 original.
    let original = random_weights(&cfg, SEED).unwrap()["model.layers.0.self_attn.q_proj.weight"]
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(w, original);
    assert!(w.iter().zip(&original).all(|(s, o)| (s - o).abs() < 0.05));
}

#[test]
fn dora_without_served_weights_and_kinds_a_backend_lacks_are_refused_by_name() {
    let cfg = tiny_config(VOCAB);
    let base = llama_from(random_weights(&cfg, SEED).unwrap(), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_adapter(
        dir.path(),
        &base.base_shape(),
        &spec(AdapterKind::Dora, &[LoraSite::Q], 5),
    )
    .unwrap();
    let limits = AdapterLimits::default();
    match load_peft_adapter(dir.path(), &base.base_shape(), &limits, AdapterDType::F32) {
        Err(AdapterError::Unsupported(m)) => assert!(m.contains("DoRA"), "{m}"),
        other => panic!("{other:?}"),
    }
    /// A backend that applies LoRA alone.
    struct LoraOnly;
    impl multilora::lora::peft::ServedBase for LoraOnly {
        fn weight_rows(
            &self,
            _: usize,
            _: LoraSite,
            _: std::ops::Range<usize>,
        ) -> anyhow::Result<Vec<f32>> {
            anyhow::bail!("not readable")
        }
        fn serves(&self, kind: AdapterKind) -> bool {
            kind == AdapterKind::Lora
        }
    }
    let ia3 = tempfile::tempdir().unwrap();
    write_synthetic_adapter(
        ia3.path(),
        &base.base_shape(),
        &spec(AdapterKind::Ia3, &[LoraSite::K], 6),
    )
    .unwrap();
    for d in [dir.path(), ia3.path()] {
        let got = load_peft_adapter_served(
            d,
            &base.base_shape(),
            &limits,
            AdapterDType::F32,
            Some(&LoraOnly),
        );
        match got {
            Err(AdapterError::Unsupported(m)) => assert!(m.contains("on this backend"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}

/// A mixture token gets `W + sum_i w_i s_i B_i A_i` (the weighted merge), with negative
/// weights too; in one batch with single-adapter and base tokens every token's logits
/// are bit-identical to its solo run.
#[test]
fn a_mixture_matches_the_weighted_merge_and_is_batch_invariant() {
    let cfg = tiny_config(VOCAB);
    let base = llama_from(random_weights(&cfg, SEED).unwrap(), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, ta) = load(
        &dir.path().join("a"),
        &base,
        &spec(AdapterKind::Lora, &LoraSite::ALL, 7),
    );
    let qv = [LoraSite::Q, LoraSite::V];
    let (b, tb) = load(
        &dir.path().join("b"),
        &base,
        &spec(AdapterKind::Lora, &qv, 8),
    );
    let (wa, wb) = (0.7, -0.4);
    let lora_merge = |t: &HashMap<String, Tensor>, w: &Tensor, prefix: &str, weight: f64| {
        let (a, b) = (
            &t[&format!("{prefix}.lora_A.weight")],
            &t[&format!("{prefix}.lora_B.weight")],
        );
        (w + (b.matmul(a).unwrap() * (2.0 * weight)).unwrap()).unwrap()
    };
    let mut both = ta.clone();
    both.extend(tb.clone());
    let merge = |w: &Tensor, prefix: &str| {
        let mut w = w.clone();
        if ta.contains_key(&format!("{prefix}.lora_A.weight")) {
            w = lora_merge(&ta, &w, prefix, wa);
        }
        if tb.contains_key(&format!("{prefix}.lora_A.weight")) {
            w = lora_merge(&tb, &w, prefix, wb);
        }
        w
    };
    let adapters = [a, b];
    let mix = vec![(0, wa as f32), (1, wb as f32)];
    let want = run(&merged(&cfg, &both, merge), &[], &[(tokens(8, 3), -1)]);
    let got = run_entries(&base, &adapters, &[(tokens(8, 3), mix.clone())]);
    assert_close(&got, &want, "mixture");
    let seqs = vec![
        (tokens(5, 7), vec![(1, 1.0)]),
        (tokens(8, 3), mix),
        (tokens(4, 5), vec![]),
        (tokens(6, 2), vec![(0, 1.0)]),
    ];
    let together = run_entries(&base, &adapters, &seqs);
    let mut row = 0;
    for seq in &seqs {
        for logits in run_entries(&base, &adapters, std::slice::from_ref(seq)) {
            assert_eq!(together[row], logits, "{:?} row {row}", seq.1);
            row += 1;
        }
    }
}

/// Prompt tuning: virtual tokens whose embeddings are rows of the embedding table give
/// exactly what the base model gives on those real tokens before the same prompt
/// (positions 0..n for them, n.. for the prompt), alone and beside other tokens.
#[test]
fn virtual_tokens_act_as_the_prompt_they_embed() {
    let cfg = tiny_config(VOCAB);
    let weights = random_weights(&cfg, SEED).unwrap();
    let ids = [5u32, 17, 3];
    let table = weights["model.embed_tokens.weight"].clone();
    let rows = Tensor::new(&ids[..], &Device::Cpu).unwrap();
    let prompt = table.index_select(&rows, 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t: HashMap<String, Tensor> = [("prompt_embeddings".to_string(), prompt)].into();
    candle_core::safetensors::save(&t, dir.path().join(WEIGHTS_FILE)).unwrap();
    let config = serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3,
        "token_dim": cfg.hidden_size, "num_transformer_submodules": 1, "task_type": "CAUSAL_LM"});
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let base = llama_from(weights, &cfg).unwrap();
    let limits = AdapterLimits::default();
    let w = load_peft_adapter(dir.path(), &base.base_shape(), &limits, AdapterDType::F32).unwrap();
    assert_eq!(
        (w.kind, w.num_virtual_tokens(), w.bytes),
        (AdapterKind::PromptTuning, 3, 3 * 4 * cfg.hidden_size)
    );
    let real = tokens(6, 7);
    let virt: Vec<u32> = (0..3)
        .map(|i| multilora::model::batch::VIRTUAL_TOKEN_BASE + i)
        .collect();
    let want = run(&base, &[], &[([&ids[..], &real].concat(), -1)]);
    let got = run(&base, &[Arc::new(w)], &[([&virt[..], &real].concat(), 0)]);
    assert_eq!(got, want);
    let other = (tokens(4, 3), -1);
    let together = run(
        &base,
        &[Arc::new(
            load_peft_adapter(dir.path(), &base.base_shape(), &limits, AdapterDType::F32).unwrap(),
        )],
        &[other.clone(), ([&virt[..], &real].concat(), 0)],
    );
    assert_eq!(&together[4..], &want[..]);
    // A virtual id beyond the adapter's rows is refused, not read out of bounds.
    let mut kv = base.new_kv(8, 4).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push_adapter_chunk(
        &[multilora::model::batch::VIRTUAL_TOKEN_BASE + 3],
        0,
        &[0],
        0,
    );
    batch.logit_rows.push(0);
    let w = load_peft_adapter(dir.path(), &base.base_shape(), &limits, AdapterDType::F32).unwrap();
    let e = base
        .forward_with_adapters(&batch, &mut kv, &[Arc::new(w)])
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}
