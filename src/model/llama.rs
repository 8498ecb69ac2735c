//! Llama-family forward pass over a ragged batch on the CPU: the linear layers run once
//! over every scheduled token of every sequence (pre-packed weights); attention is per
//! sequence over the paged KV cache. Every per-token result is independent of the rest
//! of the batch. Weights are loaded through candle's `VarBuilder` (Hugging Face names).
use super::attention::{paged_attention, HeadShape, Rope};
use super::batch::ForwardBatch;
use super::config::ModelConfig;
use super::cpu_ops::{add_in_place, rms_norm, silu_mul};
use super::packed_linear::PackedWeight;
use crate::engine::kv_cache::KvCache;
use crate::lora::batch::LoraBatch;
use crate::lora::kernels::{lora_apply, SiteShape, SlotWeights};
use crate::lora::peft::{AdapterWeights, BaseShape, LoraSite};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::sync::Arc;

fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: host_vec(&vb.get(size, "weight")?)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        rms_norm(x, &self.weight, self.eps)
    }
}

fn weight(vb: &VarBuilder, name: &str, inp: usize, out: usize) -> Result<Tensor> {
    let w = vb
        .pp(name)
        .get((out, inp), "weight")
        .with_context(|| format!("loading {}.{name}", vb.prefix()))?;
    Ok(w)
}

fn pack(w: &Tensor) -> Result<PackedWeight> {
    let (out, inp) = w.dims2()?;
    Ok(PackedWeight::pack(&host_vec(w)?, out, inp))
}

/// Several projections of the same input stacked into one `[sum(out), in]` weight, so
/// one pass over the input computes them all.
struct StackedLinear {
    weight: PackedWeight,
    /// Output columns of each part, in order.
    parts: Vec<usize>,
}

impl StackedLinear {
    fn load(vb: &VarBuilder, names: &[(&str, usize)], inp: usize) -> Result<Self> {
        let ws = names
            .iter()
            .map(|(n, out)| weight(vb, n, inp, *out))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            weight: pack(&Tensor::cat(&ws, 0)?)?,
            parts: names.iter().map(|(_, o)| *o).collect(),
        })
    }

    /// `x: [t, in]` -> `[t, sum(out)]`.
    fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        self.weight.matmul(x, t)
    }
}

struct DecoderLayer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    /// q, k, v.
    qkv: StackedLinear,
    o_proj: StackedLinear,
    /// gate, up.
    gate_up: StackedLinear,
    down_proj: StackedLinear,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_heads * cfg.head_dim;
        let kv_out = cfg.num_kv_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_norm: RmsNorm::load(vb.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
            post_norm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
            qkv: StackedLinear::load(
                &attn,
                &[("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)],
                h,
            )?,
            o_proj: StackedLinear::load(&attn, &[("o_proj", h)], q_out)?,
            gate_up: StackedLinear::load(&mlp, &[("gate_proj", i), ("up_proj", i)], h)?,
            down_proj: StackedLinear::load(&mlp, &[("down_proj", h)], i)?,
        })
    }
}

/// Splits a `[T, sum(parts)]` row-major buffer into per-part `[T, part]` buffers.
fn split_columns(buf: &[f32], t: usize, parts: &[usize]) -> Vec<Vec<f32>> {
    let width: usize = parts.iter().sum();
    let mut out: Vec<Vec<f32>> = parts.iter().map(|p| Vec::with_capacity(t * p)).collect();
    for row in buf.chunks_exact(width).take(t) {
        let mut c = 0;
        for (o, &p) in out.iter_mut().zip(parts) {
            o.extend_from_slice(&row[c..c + p]);
            c += p;
        }
    }
    out
}

/// The resident base model.
pub struct Llama {
    cfg: ModelConfig,
    /// `[vocab, hidden]`, row-major.
    embed: Vec<f32>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; a packed copy of the embedding matrix when tied.
    lm_head: PackedWeight,
    rope: Rope,
}

impl Llama {
    /// Builds the model from tensors named in the Hugging Face layout (CPU only for now).
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        if !vb.device().is_cpu() {
            bail!("only the CPU is supported by this build");
        }
        let model = vb.pp("model");
        let embed = model
            .get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")
            .context("loading model.embed_tokens")?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(model.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(model.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            pack(&embed)?
        } else {
            pack(&weight(&vb, "lm_head", cfg.hidden_size, cfg.vocab_size)?)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed: host_vec(&embed)?,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings),
        })
    }

    /// A model with small random weights (seeded), for tests.
    pub fn random_for_tests(cfg: &ModelConfig, seed: u64) -> Result<Self> {
        let tensors = random_weights_for_tests(cfg, seed)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Self::load(vb, cfg)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        Device::Cpu
    }

    /// Dimensions adapters are validated against.
    pub fn base_shape(&self) -> BaseShape {
        self.cfg.base_shape()
    }

    /// Runs one base-model step (no adapters); see [`Self::forward_with_adapters`].
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_with_adapters(batch, kv, &[])
    }

    /// Runs one step; writes every token's K/V into the cache and returns the logits of
    /// `batch.logit_rows` as `[rows, vocab]` (row-major f32). A token whose slot is `s`
    /// gets `adapters[s]`'s low-rank delta at every site that adapter targets.
    pub fn forward_with_adapters(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvCache,
        adapters: &[Arc<AdapterWeights>],
    ) -> Result<Vec<f32>> {
        let t = batch.tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        if let Some(&p) = batch.positions.iter().max() {
            if p >= self.rope.max_positions() {
                bail!(
                    "position {p} is beyond the context length {}",
                    self.rope.max_positions()
                );
            }
        }
        let h = self.cfg.hidden_size;
        let mut x = Vec::with_capacity(t * h);
        for &id in &batch.tokens {
            let id = id as usize;
            if id >= self.cfg.vocab_size {
                bail!("token id {id} is outside the vocabulary");
            }
            x.extend_from_slice(&self.embed[id * h..(id + 1) * h]);
        }
        if let Some(bad) = batch.slots.iter().find(|s| **s >= adapters.len() as i32) {
            bail!(
                "adapter slot {bad} is not loaded ({} slots)",
                adapters.len()
            );
        }
        let lora = Deltas {
            batch: LoraBatch::new(&batch.slots),
            adapters,
            base: self.base_shape(),
        };
        for i in 0..self.layers.len() {
            self.layer_forward(i, &mut x, batch, kv, &lora)?;
        }
        let mut last = Vec::with_capacity(batch.logit_rows.len() * h);
        for &r in &batch.logit_rows {
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        Ok(self
            .lm_head
            .matmul(&self.norm.forward(&last), batch.logit_rows.len()))
    }

    fn head_shape(&self) -> HeadShape {
        HeadShape {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    fn layer_forward(
        &self,
        index: usize,
        x: &mut [f32],
        batch: &ForwardBatch,
        kv: &mut KvCache,
        lora: &Deltas,
    ) -> Result<()> {
        let layer = &self.layers[index];
        let shape = self.head_shape();
        let t = batch.tokens.len();
        let h = layer.input_norm.forward(x);
        let mut qkv = layer.qkv.forward(&h, t);
        lora.apply(
            index,
            &[LoraSite::Q, LoraSite::K, LoraSite::V],
            &h,
            &mut qkv,
        )?;
        let mut parts = split_columns(&qkv, t, &layer.qkv.parts).into_iter();
        let (Some(mut q), Some(mut k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("qkv projection lost a part");
        };
        self.rope.apply(&mut q, &batch.positions, shape.num_heads);
        self.rope
            .apply(&mut k, &batch.positions, shape.num_kv_heads);
        let attn = paged_attention(batch, index, &q, &k, &v, kv, shape);
        let mut o = layer.o_proj.forward(&attn, t);
        lora.apply(index, &[LoraSite::O], &attn, &mut o)?;
        add_in_place(x, &o);
        let h = layer.post_norm.forward(x);
        let mut gate_up = layer.gate_up.forward(&h, t);
        lora.apply(index, &[LoraSite::Gate, LoraSite::Up], &h, &mut gate_up)?;
        let act = silu_mul(&gate_up, layer.gate_up.parts[0]);
        let mut down = layer.down_proj.forward(&act, t);
        lora.apply(index, &[LoraSite::Down], &act, &mut down)?;
        add_in_place(x, &down);
        Ok(())
    }
}

/// The adapters of one step: the token-to-slot metadata (built once, shared by every
/// layer and site) and each slot's weights.
struct Deltas<'a> {
    batch: LoraBatch,
    adapters: &'a [Arc<AdapterWeights>],
    base: BaseShape,
}

impl Deltas<'_> {
    /// Adds the deltas of `sites` (stacked in this order in `y`'s columns) for input `x`.
    fn apply(&self, layer: usize, sites: &[LoraSite], x: &[f32], y: &mut [f32]) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let y_stride: usize = sites.iter().map(|s| self.base.dims(*s).1).sum();
        let mut y_offset = 0;
        for &site in sites {
            let (in_features, out_features) = self.base.dims(site);
            let slots: Vec<Option<SlotWeights>> = self
                .adapters
                .iter()
                .map(|a| {
                    a.layers[layer][site.index()].as_ref().map(|p| SlotWeights {
                        rank: p.rank,
                        scale: p.scale,
                        a: &p.a,
                        b: &p.b,
                    })
                })
                .collect();
            if slots.iter().any(Option::is_some) {
                let shape = SiteShape {
                    in_features,
                    out_features,
                    y_stride,
                    y_offset,
                };
                lora_apply(&self.batch, x, y, shape, &slots)
                    .with_context(|| format!("LoRA at layer {layer} {}", site.module_name()))?;
            }
            y_offset += out_features;
        }
        Ok(())
    }
}

/// Seeded random weights in the Hugging Face layout (normal-ish), for tests.
pub fn random_weights_for_tests(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let mut next = move || {
        // xorshift64*; the sum of four uniforms approximates a normal.
        let mut u = 0f32;
        for _ in 0..4 {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            u += (r >> 40) as f32 / (1u64 << 24) as f32;
        }
        (u - 2.0) * 1.732
    };
    let mut make = |shape: &[usize], std: f32, offset: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + std * next()).collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    };
    let h = cfg.hidden_size;
    let q_out = cfg.num_heads * cfg.head_dim;
    let kv_out = cfg.num_kv_heads * cfg.head_dim;
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        make(&[cfg.vocab_size, h], 0.5, 0.0)?,
    );
    t.insert("model.norm.weight".into(), make(&[h], 0.05, 1.0)?);
    if !cfg.tie_word_embeddings {
        t.insert(
            "lm_head.weight".into(),
            make(&[cfg.vocab_size, h], 0.1, 0.0)?,
        );
    }
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let shapes: [(&str, [usize; 2]); 7] = [
            ("self_attn.q_proj", [q_out, h]),
            ("self_attn.k_proj", [kv_out, h]),
            ("self_attn.v_proj", [kv_out, h]),
            ("self_attn.o_proj", [h, q_out]),
            ("mlp.gate_proj", [cfg.intermediate_size, h]),
            ("mlp.up_proj", [cfg.intermediate_size, h]),
            ("mlp.down_proj", [h, cfg.intermediate_size]),
        ];
        for (name, shape) in shapes {
            let std = 1.0 / (shape[1] as f32).sqrt();
            t.insert(format!("{p}.{name}.weight"), make(&shape, std, 0.0)?);
        }
        t.insert(
            format!("{p}.input_layernorm.weight"),
            make(&[h], 0.05, 1.0)?,
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            make(&[h], 0.05, 1.0)?,
        );
    }
    Ok(t)
}
