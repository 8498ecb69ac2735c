//! The decoder forward pass of every model family over a ragged batch, written once
//! against the [`Backend`] seam (what a family changes is its [`super::arch`]
//! `Architecture`: biases, norms, activation, attention options, rope, windows): the linear layers run once over every scheduled token of every
//! sequence, each with its adapter sites attached; attention is per sequence over the
//! paged K/V. Every per-token result is independent of the rest of the batch (as far as
//! the backend promises). Weights are read from a [`Checkpoint`] under the names of
//! [`super::layout`]; linear weights reach the backend as the checkpoint holds them
//! (dense or quantized blocks).
use super::arch::Activation;
use super::backend::{Backend, HeadShape, KvLayout, SitePart};
use super::batch::{virtual_row, ForwardBatch};
use super::checkpoint::{Checkpoint, HostWeight};
use super::config::ModelConfig;
use super::layout;
use super::rope::Rope;
use crate::lora::peft::{AdapterKind, AdapterWeights, BaseShape, LoraSite, ServedBase};
use anyhow::{bail, Context, Result};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a model step's time went on the host: preparing the step (on a GPU, uploading
/// its metadata), enqueueing every operation, and waiting for the logits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardPhases {
    pub upload: Duration,
    pub enqueue: Duration,
    pub sync: Duration,
}

/// A linear layer with its adapter sites: one weight stacking the projections of
/// `parts` (their output columns in order), so one pass over the input computes them
/// all, and each part gets its adapters' deltas.
struct Linear<B: Backend> {
    weight: B::Weight,
    /// The stacked parts' biases (zeros for a part without one), if any part has one.
    bias: Option<B::Vector>,
    parts: Vec<SitePart>,
    /// Host copies of the parts' own biases (DoRA's output offsets need them).
    host_biases: Vec<Option<Vec<f32>>>,
}

impl<B: Backend> Linear<B> {
    /// Loads the projections of `sites` of `layer`, stacked in that order.
    fn load(
        backend: &B,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        layer: usize,
        sites: &[LoraSite],
    ) -> Result<Self> {
        let base = cfg.base_shape();
        let mut weights = Vec::with_capacity(sites.len());
        let mut parts = Vec::with_capacity(sites.len());
        let mut bias = Vec::new();
        let mut host_biases = Vec::with_capacity(sites.len());
        let biased = sites.iter().any(|&s| layout::has_bias(cfg, s));
        let fused = layout::module_of(layout::modules(cfg), sites).filter(|m| m.sites.len() > 1);
        if let Some(module) = fused {
            // The checkpoint holds the stacked weight itself (Phi-3).
            let out = sites.iter().map(|&s| base.dims(s).1).sum();
            let name = format!("{}.weight", module.path(layer));
            let w = ckpt
                .linear((out, base.dims(sites[0]).0), &name)
                .with_context(|| format!("loading {name}"))?;
            weights.push(w);
        }
        for &site in sites {
            let (inp, out) = base.dims(site);
            if fused.is_none() {
                let name = layout::linear_weight(layer, site);
                weights.push(
                    ckpt.linear((out, inp), &name)
                        .with_context(|| format!("loading {name}"))?,
                );
            }
            if layout::has_bias(cfg, site) {
                let name = layout::linear_bias(layer, site);
                let b = ckpt
                    .tensor(&[out], &name)
                    .with_context(|| format!("loading {name}"))?;
                let b = b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
                bias.extend_from_slice(&b);
                host_biases.push(Some(b));
            } else {
                if biased {
                    bias.extend(std::iter::repeat_n(0.0, out));
                }
                host_biases.push(None);
            }
            parts.push(SitePart {
                site,
                out_features: out,
            });
        }
        let bias = if biased {
            let n = bias.len();
            Some(backend.vector(&candle_core::Tensor::from_vec(
                bias,
                n,
                &candle_core::Device::Cpu,
            )?)?)
        } else {
            None
        };
        Ok(Self {
            weight: backend.weight(&HostWeight::stack(weights)?)?,
            bias,
            parts,
            host_biases,
        })
    }

    /// `x W^T` plus the adapters' deltas at this layer's sites.
    fn forward(
        &self,
        backend: &B,
        step: &B::Step,
        layer: usize,
        x: &B::Matrix,
    ) -> Result<B::Matrix> {
        let scaled = backend.adapter_input(step, layer, &self.parts, x)?;
        let x = scaled.as_ref().unwrap_or(x);
        let mut y = self.project(backend, x)?;
        if self.parts.len() > 1 {
            self.scaled_parts(backend, step, layer, x, &mut y)?;
        }
        backend.lora(step, layer, &self.parts, x, &mut y)?;
        Ok(y)
    }

    /// `x W^T + b`.
    fn project(&self, backend: &B, x: &B::Matrix) -> Result<B::Matrix> {
        let mut y = backend.linear(x, &self.weight)?;
        if let Some(bias) = &self.bias {
            backend.add_bias(&mut y, bias)?;
        }
        Ok(y)
    }

    /// The columns of each part some token scales the input of ((IA)³ feed-forward
    /// scaling of `up_proj` beside `gate_proj`), recomputed from the scaled input (rows
    /// without a scale come out bit-identical).
    fn scaled_parts(
        &self,
        backend: &B,
        step: &B::Step,
        layer: usize,
        x: &B::Matrix,
        y: &mut B::Matrix,
    ) -> Result<()> {
        let mut offset = 0;
        for part in &self.parts {
            let cols = offset..offset + part.out_features;
            offset = cols.end;
            let Some(xp) = backend.adapter_input(step, layer, std::slice::from_ref(part), x)?
            else {
                continue;
            };
            backend.copy_columns(y, &self.project(backend, &xp)?, cols)?;
        }
        Ok(())
    }

    fn widths(&self) -> Vec<usize> {
        self.parts.iter().map(|p| p.out_features).collect()
    }
}

struct DecoderLayer<B: Backend> {
    input_norm: B::Vector,
    /// Llama: the norm before the MLP; Gemma: the norm of the attention output.
    post_norm: B::Vector,
    /// Gemma's norms before the MLP and of its output.
    feedforward_norms: Option<(B::Vector, B::Vector)>,
    /// Per-head q and k norms (Qwen3, Gemma 3).
    head_norms: Option<(B::Vector, B::Vector)>,
    qkv: Linear<B>,
    o_proj: Linear<B>,
    gate_up: Linear<B>,
    down_proj: Linear<B>,
}

/// Norm weights `name` `[n]`, as the forward pass multiplies by them: Gemma's offsets
/// from one become `1 + w` (in f32, as transformers computes them).
fn load_norm<B: Backend>(
    backend: &B,
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    name: &str,
    n: usize,
) -> Result<B::Vector> {
    let w = ckpt
        .tensor(&[n], name)
        .with_context(|| format!("loading {name}"))?;
    let w = if cfg.arch.norm_offset {
        (w.to_dtype(candle_core::DType::F32)? + 1.0)?
    } else {
        w
    };
    backend.vector(&w)
}

impl<B: Backend> DecoderLayer<B> {
    fn load(backend: &B, ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        use LoraSite::*;
        let h = cfg.hidden_size;
        let linear = |sites: &[LoraSite]| Linear::load(backend, ckpt, cfg, layer, sites);
        let norm = |name: String, n: usize| load_norm(backend, ckpt, cfg, &name, n);
        let feedforward_norms = match cfg.arch.sandwich_norms {
            true => Some((
                norm(layout::pre_feedforward_norm(layer), h)?,
                norm(layout::post_feedforward_norm(layer), h)?,
            )),
            false => None,
        };
        let head_norms = match cfg.arch.qk_norm {
            true => Some((
                norm(layout::head_norm(layer, 'q'), cfg.head_dim)?,
                norm(layout::head_norm(layer, 'k'), cfg.head_dim)?,
            )),
            false => None,
        };
        Ok(Self {
            input_norm: norm(layout::input_norm(layer), h)?,
            post_norm: norm(layout::post_attention_norm(layer), h)?,
            feedforward_norms,
            head_norms,
            qkv: linear(&[Q, K, V])?,
            o_proj: linear(&[O])?,
            gate_up: linear(&[Gate, Up])?,
            down_proj: linear(&[Down])?,
        })
    }
}

/// A model's linear weights as its backend serves them, shared with adapter loads.
struct ServedLlama<B: Backend> {
    backend: Arc<B>,
    /// Some layer attends through a sliding window.
    sliding: bool,
    layers: Arc<[DecoderLayer<B>]>,
}

impl<B: Backend> ServedLlama<B> {
    /// The stacked linear layer holding `site` of `layer`.
    fn linear(&self, layer: usize, site: LoraSite) -> Result<&Linear<B>> {
        use LoraSite::*;
        let l = self
            .layers
            .get(layer)
            .with_context(|| format!("layer {layer} of {}", self.layers.len()))?;
        Ok(match site {
            Q | K | V => &l.qkv,
            O => &l.o_proj,
            Gate | Up => &l.gate_up,
            Down => &l.down_proj,
        })
    }
}

impl<B: Backend> ServedBase for ServedLlama<B> {
    fn weight_rows(&self, layer: usize, site: LoraSite, rows: Range<usize>) -> Result<Vec<f32>> {
        let linear = self.linear(layer, site)?;
        let mut offset = 0;
        for part in &linear.parts {
            if part.site == site {
                if rows.end > part.out_features || rows.start > rows.end {
                    bail!(
                        "rows {rows:?} of {} ({} rows)",
                        site.module_name(),
                        part.out_features
                    );
                }
                let stacked = offset + rows.start..offset + rows.end;
                return self.backend.weight_rows(&linear.weight, stacked);
            }
            offset += part.out_features;
        }
        bail!("layer {layer} has no {}", site.module_name())
    }

    fn serves(&self, kind: AdapterKind) -> bool {
        // Prefix tuning's virtual keys on a sliding layer: whether they stay in every
        // query's window is not settled against PEFT, so not served there yet.
        let prefix_on_window = kind == AdapterKind::PrefixTuning && self.sliding;
        self.backend.serves(kind) && !prefix_on_window
    }

    fn bias(&self, layer: usize, site: LoraSite) -> Option<Vec<f32>> {
        let linear = self.linear(layer, site).ok()?;
        let part = linear.parts.iter().position(|p| p.site == site)?;
        linear.host_biases[part].clone()
    }
}

/// The resident base model on backend `B`.
pub struct Llama<B: Backend> {
    /// Shared with [`ServedLlama`] (adapter loads read the weights back from it).
    backend: Arc<B>,
    cfg: ModelConfig,
    /// `[vocab, hidden]`.
    embedding: B::Embedding,
    layers: Arc<[DecoderLayer<B>]>,
    norm: B::Vector,
    /// `[vocab, hidden]`; the embedding matrix again when tied.
    lm_head: B::Weight,
    /// `[max_positions, head_dim / 2]` cos and sin tables of the global rope, and of
    /// the sliding layers' rope where it differs (Gemma 3).
    rope: RopeTables<B>,
    local_rope: Option<RopeTables<B>>,
}

/// One rope's cos and sin tables on the backend.
struct RopeTables<B: Backend> {
    cos: B::Matrix,
    sin: B::Matrix,
}

impl<B: Backend> RopeTables<B> {
    fn new(backend: &B, rope: &Rope, cfg: &ModelConfig) -> Result<Self> {
        let max = cfg.max_position_embeddings;
        let (cos, sin) = rope.tables(cfg.head_dim, max);
        let half = cfg.head_dim / 2;
        Ok(Self {
            cos: backend.upload(cos, max, half)?,
            sin: backend.upload(sin, max, half)?,
        })
    }
}

impl<B: Backend> Llama<B> {
    /// Builds the model on `backend` from tensors named as in [`layout`].
    pub fn load(backend: B, ckpt: &Checkpoint, cfg: &ModelConfig) -> Result<Self> {
        let vocab_by_hidden = (cfg.vocab_size, cfg.hidden_size);
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(&backend, ckpt, cfg, i))
            .collect::<Result<Arc<[_]>>>()?;
        let norm = load_norm(&backend, ckpt, cfg, layout::FINAL_NORM, cfg.hidden_size)?;
        let head_name = if cfg.tie_word_embeddings {
            layout::EMBEDDING
        } else {
            layout::LM_HEAD
        };
        let lm_head = backend.weight(
            &ckpt
                .linear(vocab_by_hidden, head_name)
                .context("loading the LM head")?,
        )?;
        let embedding = backend.embedding(
            &ckpt
                .linear(vocab_by_hidden, layout::EMBEDDING)
                .context("loading the token embedding")?,
            cfg.tie_word_embeddings.then_some(&lm_head),
        )?;
        if cfg.tie_word_embeddings {
            // A tied model's LM head is the embedding, whatever else the file holds
            // (transformers ties the two the same way).
            ckpt.skip(layout::LM_HEAD);
        }
        ckpt.refuse_unused(cfg.arch.family.name())?;
        let rope = RopeTables::new(&backend, &cfg.global_rope(), cfg)?;
        let local_rope = match cfg.arch.local_rope() {
            Some(rope) => Some(RopeTables::new(&backend, &rope, cfg)?),
            None => None,
        };
        Ok(Self {
            rope,
            local_rope,
            backend: Arc::new(backend),
            cfg: cfg.clone(),
            embedding,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Dimensions adapters are validated against.
    pub fn base_shape(&self) -> BaseShape {
        self.cfg.base_shape()
    }

    /// The weights as served, for adapter loads on other threads (DoRA's norms).
    pub fn served_base(&self) -> Arc<dyn ServedBase> {
        Arc::new(ServedLlama {
            backend: self.backend.clone(),
            sliding: (0..self.cfg.num_layers).any(|l| self.cfg.arch.window(l).is_some()),
            layers: self.layers.clone(),
        })
    }

    /// The paged K/V layout of this model with `num_blocks` blocks of `block_size`.
    pub fn kv_layout(&self, num_blocks: usize, block_size: usize) -> KvLayout {
        KvLayout {
            num_layers: self.cfg.num_layers,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            block_size,
            num_blocks,
        }
    }

    /// Empty paged K/V storage of `num_blocks` blocks of `block_size` tokens.
    pub fn new_kv(&self, num_blocks: usize, block_size: usize) -> Result<B::KvStore> {
        self.backend
            .kv_store(self.kv_layout(num_blocks, block_size))
    }

    /// Bytes of every linear layer's weights and the LM head: what one decode step reads
    /// (the memory roofline's numerator).
    pub fn linear_weight_bytes(&self) -> usize {
        let b = &self.backend;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.qkv, &l.o_proj, &l.gate_up, &l.down_proj]
                    .iter()
                    .map(|lin| b.weight_bytes(&lin.weight))
                    .sum::<usize>()
            })
            .sum();
        layers + b.weight_bytes(&self.lm_head)
    }

    /// Bytes of K/V one token takes in this backend's storage.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.backend.kv_bytes_per_token(&self.kv_layout(0, 1))
    }

    /// Runs one base-model step (no adapters); see [`Self::forward_with_adapters`].
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut B::KvStore) -> Result<Vec<f32>> {
        self.forward_with_adapters(batch, kv, &[])
    }

    /// Runs one step; writes every token's K/V into `kv` and returns the logits of
    /// `batch.logit_rows` as `[rows, vocab]` (row-major f32). A token whose slot is `s`
    /// gets `adapters[s]`'s low-rank delta at every site that adapter targets.
    pub fn forward_with_adapters(
        &self,
        batch: &ForwardBatch,
        kv: &mut B::KvStore,
        adapters: &[Arc<AdapterWeights>],
    ) -> Result<Vec<f32>> {
        Ok(self.forward_timed(batch, kv, adapters)?.0)
    }

    /// [`Self::forward_with_adapters`], with where its time went.
    pub fn forward_timed(
        &self,
        batch: &ForwardBatch,
        kv: &mut B::KvStore,
        adapters: &[Arc<AdapterWeights>],
    ) -> Result<(Vec<f32>, ForwardPhases)> {
        if batch.tokens.is_empty() {
            return Ok((Vec::new(), ForwardPhases::default()));
        }
        self.check(batch, adapters)?;
        let be = &self.backend;
        let start = Instant::now();
        let step = be.begin_step(batch, adapters)?;
        let uploaded = Instant::now();
        let mut x = be.embed(&step, batch, &self.embedding)?;
        if self.cfg.arch.embed_scale {
            be.scale_embeddings(batch, &mut x, (self.cfg.hidden_size as f32).sqrt())?;
        }
        // Each layer's last residual add is done with the next layer's input norm.
        let eps = self.cfg.rms_norm_eps as f32;
        let mut pending: Option<B::Matrix> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = match pending.take() {
                Some(down) => be.add_rms_norm(&mut x, &down, &layer.input_norm, eps)?,
                None => be.rms_norm(&x, &layer.input_norm, eps)?,
            };
            pending = Some(self.layer_forward(i, layer, &mut x, &h, batch, kv, &step)?);
        }
        if let Some(down) = pending {
            be.add_assign(&mut x, &down)?;
        }
        let last = be.gather_logit_rows(&step, batch, &x)?;
        let normed = be.rms_norm(&last, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let head = be.linear(&normed, &self.lm_head)?;
        let enqueued = Instant::now();
        let mut logits = be.to_host(head)?;
        let phases = ForwardPhases {
            upload: uploaded - start,
            enqueue: enqueued - uploaded,
            sync: enqueued.elapsed(),
        };
        if let Some(cap) = self.cfg.arch.final_softcap {
            logits.iter_mut().for_each(|l| *l = (*l / cap).tanh() * cap);
        }
        Ok((logits, phases))
    }

    /// Token ids, positions and adapter slots are in range.
    fn check(&self, batch: &ForwardBatch, adapters: &[Arc<AdapterWeights>]) -> Result<()> {
        let max_positions = self.cfg.max_position_embeddings;
        if let Some(&p) = batch.positions.iter().max() {
            if p >= max_positions {
                bail!("position {p} is beyond the context length {max_positions}");
            }
        }
        let mixed = batch.mixtures.iter().flatten().map(|&(s, _)| s as i32);
        if let Some(bad) = batch
            .slots
            .iter()
            .copied()
            .chain(mixed)
            .find(|s| *s >= adapters.len() as i32)
        {
            bail!(
                "adapter slot {bad} is not loaded ({} slots)",
                adapters.len()
            );
        }
        for (&id, &slot) in batch.tokens.iter().zip(&batch.slots) {
            if (id as usize) < self.cfg.vocab_size {
                continue;
            }
            // Only prompt tuning's virtual tokens run through the model; a prefix's K/V
            // are written to the cache once per adapter (`Backend::write_kv_prefix`).
            let virtual_tokens = usize::try_from(slot)
                .ok()
                .and_then(|s| adapters[s].prompt.as_ref())
                .map_or(0, |p| p.count);
            match virtual_row(id) {
                Some(row) if row < virtual_tokens => {}
                _ => bail!("token id {id} is outside the vocabulary"),
            }
        }
        Ok(())
    }

    /// The attention of layer `layer`: heads, scale, soft-cap and window.
    fn head_shape(&self, layer: usize) -> HeadShape {
        HeadShape {
            scale: self.cfg.attention_scale(),
            softcap: self.cfg.arch.attention_softcap,
            window: self.cfg.arch.window(layer),
            ..HeadShape::causal(self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim)
        }
    }

    /// One decoder layer over the residual stream `x`, whose input norm is `h`; returns
    /// the MLP's output, which the caller adds to `x` (with the next layer's norm).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        index: usize,
        layer: &DecoderLayer<B>,
        x: &mut B::Matrix,
        h: &B::Matrix,
        batch: &ForwardBatch,
        kv: &mut B::KvStore,
        step: &B::Step,
    ) -> Result<B::Matrix> {
        let be = &self.backend;
        let shape = self.head_shape(index);
        let eps = self.cfg.rms_norm_eps as f32;
        let qkv = layer.qkv.forward(be, step, index, h)?;
        let mut parts = be.split_columns(&qkv, &layer.qkv.widths())?.into_iter();
        let (Some(mut q), Some(mut k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("qkv projection lost a part");
        };
        if let Some((q_norm, k_norm)) = &layer.head_norms {
            q = be.rms_norm_heads(&q, q_norm, eps)?;
            k = be.rms_norm_heads(&k, k_norm, eps)?;
        }
        let rope = match (&self.local_rope, shape.window) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        };
        let tables = (&rope.cos, &rope.sin);
        be.rope(step, batch, &mut q, tables, shape.num_heads)?;
        be.rope(step, batch, &mut k, tables, shape.num_kv_heads)?;
        let attn = be.paged_attention(step, batch, kv, index, &q, &k, &v, shape)?;
        let mut o = layer.o_proj.forward(be, step, index, &attn)?;
        let pre_mlp = match &layer.feedforward_norms {
            Some((pre, _)) => {
                o = be.rms_norm(&o, &layer.post_norm, eps)?;
                pre
            }
            None => &layer.post_norm,
        };
        let h = be.add_rms_norm(x, &o, pre_mlp, eps)?;
        let gate_up = layer.gate_up.forward(be, step, index, &h)?;
        let act = match self.cfg.arch.activation {
            Activation::Silu => be.silu_mul(&gate_up)?,
            Activation::GeluTanh => be.gelu_tanh_mul(&gate_up)?,
        };
        let mut down = layer.down_proj.forward(be, step, index, &act)?;
        if let Some((_, post)) = &layer.feedforward_norms {
            down = be.rms_norm(&down, post, eps)?;
        }
        Ok(down)
    }
}
