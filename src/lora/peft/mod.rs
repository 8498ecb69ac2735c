//! PEFT adapters: the public types and [`load_peft_adapter`], the entry point. It turns
//! a folder (`adapter_config.json` + `adapter_model.safetensors`) into validated
//! [`AdapterWeights`] of one [`AdapterKind`]: LoRA (rsLoRA too), DoRA, (IA)³, AdaLoRA,
//! VeRA, prompt tuning or P-tuning.
//! Invariants: module selection, `layers_to_transform`, rank/alpha patterns and scaling
//! follow PEFT exactly; a (layer, site) holds a [`LoraPair`] iff the config targets it
//! (LoRA, DoRA), with `a = [rank, in]`, `b = [out, rank]`, and a [`SiteScale`] iff the
//! adapter multiplies that site's input or output (DoRA, (IA)³); every value is finite;
//! any PEFT feature not implemented is refused by name, never ignored; `.bin` pickles are
//! never opened; header and file sizes are bounded before anything is read. `config`
//! reads `adapter_config.json` and applies PEFT's matching rules; `tensors` reads and
//! checks the safetensors file and assembles the pairs; `dora` turns DoRA's magnitudes
//! into output scales against the served base weights; `ia3` reads (IA)³ folders;
//! `prompt` reads prompt-tuning and P-tuning folders; `adalora` and `vera` fold those
//! into LoRA pairs.
mod adalora;
mod config;
mod dora;
pub mod folder;
mod fused;
mod ia3;
mod prompt;
mod select;
mod tensors;
mod vera;

use config::{LoraConfig, RawConfig};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::lora::values::{AdapterDType, LoraValues};
pub use crate::model::layout::{ProjectionModule, SEPARATE_MODULES};
use tensors::{assemble, SafeTensors};

/// The seven Llama linear sites, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraSite {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraSite {
    pub const ALL: [LoraSite; 7] = [
        LoraSite::Q,
        LoraSite::K,
        LoraSite::V,
        LoraSite::O,
        LoraSite::Gate,
        LoraSite::Up,
        LoraSite::Down,
    ];

    /// The Hugging Face module name: `q_proj` … `down_proj`.
    pub fn module_name(self) -> &'static str {
        match self {
            LoraSite::Q => "q_proj",
            LoraSite::K => "k_proj",
            LoraSite::V => "v_proj",
            LoraSite::O => "o_proj",
            LoraSite::Gate => "gate_proj",
            LoraSite::Up => "up_proj",
            LoraSite::Down => "down_proj",
        }
    }

    /// The block holding the site: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            LoraSite::Q | LoraSite::K | LoraSite::V | LoraSite::O => "self_attn",
            LoraSite::Gate | LoraSite::Up | LoraSite::Down => "mlp",
        }
    }

    /// Position in [`LoraSite::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The safetensors key PEFT saves this site's `half` (`lora_A` or `lora_B`) of
    /// `layer` under: `base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight`.
    pub fn peft_key(self, layer: usize, half: &str) -> String {
        self.peft_name(layer, &format!("{half}.weight"))
    }

    /// The safetensors key of this site's tensor `rest` at `layer`:
    /// `base_model.model.model.layers.{layer}.mlp.down_proj.{rest}`.
    pub fn peft_name(self, layer: usize, rest: &str) -> String {
        format!("{KEY_PREFIX}{}.{rest}", self.module_path(layer))
    }

    /// The module name PEFT matches patterns against: `model.layers.{layer}.self_attn.q_proj`.
    pub fn module_path(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}",
            self.parent(),
            self.module_name()
        )
    }
}

/// Base-model dimensions adapters are checked against, and its projection modules as
/// PEFT names them (the model's table: one per site, or Phi-3's fused ones).
#[derive(Clone, Copy, Debug)]
pub struct BaseShape {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub q_out: usize,
    pub kv_out: usize,
    pub intermediate_size: usize,
    pub modules: &'static [ProjectionModule],
}

impl BaseShape {
    /// The module computing `site`.
    pub fn module_of(&self, site: LoraSite) -> &'static ProjectionModule {
        self.modules
            .iter()
            .find(|m| m.sites.contains(&site))
            .unwrap_or(&SEPARATE_MODULES[site.index()])
    }

    /// The module name PEFT matches patterns against for `site` of `layer`:
    /// `model.layers.{layer}.self_attn.q_proj` (or Phi-3's `...qkv_proj`).
    pub fn module_path(&self, site: LoraSite, layer: usize) -> String {
        self.module_of(site).path(layer)
    }

    /// `(in_features, out_features)` of a site's base linear layer.
    pub fn dims(&self, site: LoraSite) -> (usize, usize) {
        match site {
            LoraSite::Q => (self.hidden_size, self.q_out),
            LoraSite::K | LoraSite::V => (self.hidden_size, self.kv_out),
            LoraSite::O => (self.q_out, self.hidden_size),
            LoraSite::Gate | LoraSite::Up => (self.hidden_size, self.intermediate_size),
            LoraSite::Down => (self.intermediate_size, self.hidden_size),
        }
    }
}

/// One site's low-rank pair, row-major, in the adapter storage type, ready for kernels.
/// The matrices may be shared with other adapters (VeRA's projections), which then
/// differ only in their rank and output scales.
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub rank: usize,
    pub scale: f32,
    /// `[rank, in]`
    pub a: Arc<LoraValues>,
    /// `[out, rank]`
    pub b: Arc<LoraValues>,
    /// `[rank]`: each rank's shrink output times this (VeRA's `lambda_d`).
    pub rank_scale: Option<Vec<f32>>,
    /// `[out]`: each row of `b` times this (VeRA's `lambda_b`).
    pub out_scale: Option<Vec<f32>>,
}

impl LoraPair {
    /// A plain pair (nothing shared, no rank or output scales).
    pub fn new(rank: usize, scale: f32, a: LoraValues, b: LoraValues) -> Self {
        Self {
            rank,
            scale,
            a: Arc::new(a),
            b: Arc::new(b),
            rank_scale: None,
            out_scale: None,
        }
    }
}

/// The PEFT method an adapter was trained with, as the server serves it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    /// LoRA (rsLoRA included): `y += s B A x`.
    #[default]
    Lora,
    /// DoRA: LoRA, then each output column times `m / ||W + s B A||` (per row of W).
    Dora,
    /// (IA)³: each site's output (or, for feed-forward modules, input) times a vector.
    Ia3,
    /// Prompt tuning: learned virtual-token embeddings before the request's tokens.
    PromptTuning,
    /// P-tuning: as prompt tuning, with the embeddings its prompt encoder produced.
    PTuning,
    /// AdaLoRA: folded at load into a LoRA of variable rank.
    AdaLora,
    /// VeRA: shared frozen projections scaled per adapter, folded at load into a LoRA.
    Vera,
    /// Prefix tuning: learned keys and values every layer attends to before the prompt.
    PrefixTuning,
}

impl AdapterKind {
    /// Every kind.
    pub const ALL: [AdapterKind; 8] = [
        AdapterKind::Lora,
        AdapterKind::Dora,
        AdapterKind::Ia3,
        AdapterKind::PromptTuning,
        AdapterKind::PTuning,
        AdapterKind::AdaLora,
        AdapterKind::Vera,
        AdapterKind::PrefixTuning,
    ];

    /// The kind named `name` ([`AdapterKind::name`], any case).
    pub fn from_name(name: &str) -> Option<AdapterKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// PEFT's name of the method (`peft_type`, or `DORA` for LoRA with `use_dora`).
    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::Lora => "LORA",
            AdapterKind::Dora => "DORA",
            AdapterKind::Ia3 => "IA3",
            AdapterKind::PromptTuning => "PROMPT_TUNING",
            AdapterKind::PTuning => "P_TUNING",
            AdapterKind::AdaLora => "ADALORA",
            AdapterKind::Vera => "VERA",
            AdapterKind::PrefixTuning => "PREFIX_TUNING",
        }
    }

    /// LoRA-family kinds, whose deltas add: they may be mixed in one request.
    pub fn mixes(self) -> bool {
        matches!(
            self,
            AdapterKind::Lora | AdapterKind::AdaLora | AdapterKind::Vera
        )
    }
}

/// A per-column multiplier an adapter applies at one site, per token of that adapter.
#[derive(Clone, Debug, PartialEq)]
pub enum SiteScale {
    /// `y[o] *= v[o]` after the base linear and any LoRA delta (`[out]`): DoRA's
    /// `m / ||W + s B A||`, or (IA)³ on a module that is not feed-forward.
    Output(Vec<f32>),
    /// `x[i] *= v[i]` before the base linear (`[in]`): (IA)³ on a feed-forward module.
    Input(Vec<f32>),
}

impl SiteScale {
    pub fn values(&self) -> &[f32] {
        match self {
            SiteScale::Output(v) | SiteScale::Input(v) => v,
        }
    }
}

#[derive(Clone, Debug)]
pub struct AdapterWeights {
    pub kind: AdapterKind,
    pub rank_max: usize,
    /// Site module names that have weights, sorted.
    pub target_modules: Vec<String>,
    /// `layers[l][site.index()]`
    pub layers: Vec<[Option<LoraPair>; 7]>,
    /// `scales[l][site.index()]`; empty when no site scales anything (LoRA).
    pub scales: Vec<[Option<SiteScale>; 7]>,
    /// Virtual tokens put before every request's tokens (prompt tuning, P-tuning).
    pub prompt: Option<VirtualTokens>,
    /// Keys and values every layer attends to before the request's tokens (prefix
    /// tuning).
    pub prefix: Option<KvPrefix>,
    /// `offsets[l][site.index()]`: added to the site's output after its output scale;
    /// DoRA on a base projection with a bias `b` (`(1 - g) b`: PEFT scales `x W^T`, not
    /// the bias). Empty when no site has one.
    pub offsets: Vec<[Option<Vec<f32>>; 7]>,
    /// Bytes held (every pair's values in the storage type, every scale in f32).
    pub bytes: usize,
}

impl AdapterWeights {
    /// An adapter of `kind` holding nothing yet (the loaders fill it in).
    pub(crate) fn empty(kind: AdapterKind) -> Self {
        AdapterWeights {
            kind,
            rank_max: 0,
            target_modules: Vec::new(),
            layers: Vec::new(),
            scales: Vec::new(),
            offsets: Vec::new(),
            bytes: 0,
            prompt: None,
            prefix: None,
        }
    }

    /// The output offset of `site` at `layer`, if the adapter has one there.
    pub fn offset(&self, layer: usize, site: LoraSite) -> Option<&[f32]> {
        self.offsets.get(layer)?[site.index()].as_deref()
    }

    /// The scale of `site` at `layer`, if the adapter has one there.
    pub fn scale(&self, layer: usize, site: LoraSite) -> Option<&SiteScale> {
        self.scales.get(layer)?[site.index()].as_ref()
    }

    /// Virtual tokens each request of this adapter starts with (0 but for prompt
    /// learning).
    pub fn num_virtual_tokens(&self) -> usize {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.count);
        self.prompt.as_ref().map_or(prefix, |p| p.count)
    }
}

/// A prefix-tuning adapter's keys and values: for virtual token `t` and layer `l`, the
/// key is `values[t][2l]` and the value `values[t][2l + 1]`, each `[kv_heads * head_dim]`
/// (head-major), as PEFT lays out `prompt_embeddings` `[count, layers * 2 * kv_width]`.
/// Keys take no rotary embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct KvPrefix {
    pub count: usize,
    pub kv_width: usize,
    pub values: Vec<f32>,
}

impl KvPrefix {
    fn row(&self, t: usize, layer: usize, part: usize) -> Option<&[f32]> {
        let width = self.kv_width;
        let stride = self.values.len() / self.count.max(1);
        let start = t * stride + (2 * layer + part) * width;
        (t < self.count).then(|| self.values.get(start..start + width))?
    }

    /// The key of virtual token `t` at `layer`.
    pub fn key(&self, t: usize, layer: usize) -> Option<&[f32]> {
        self.row(t, layer, 0)
    }

    /// The value of virtual token `t` at `layer`.
    pub fn value(&self, t: usize, layer: usize) -> Option<&[f32]> {
        self.row(t, layer, 1)
    }
}

/// A prompt-learning adapter's virtual tokens: `count` rows of embeddings, `[count,
/// hidden]` row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct VirtualTokens {
    pub count: usize,
    pub embeddings: Vec<f32>,
}

impl VirtualTokens {
    /// Row `i` (`< count`).
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        let hidden = self.embeddings.len() / self.count.max(1);
        self.embeddings.get(i * hidden..(i + 1) * hidden)
    }
}

/// What loading an adapter may need from the base model as it is served, beyond its
/// shape: DoRA's norms are taken over the weights the kernels compute with.
pub trait ServedBase: Send + Sync {
    /// Rows `rows` of the `[out, in]` weight of `site` at `layer`, row-major, with the
    /// values the backend computes with (after any rounding or quantization).
    fn weight_rows(
        &self,
        layer: usize,
        site: LoraSite,
        rows: Range<usize>,
    ) -> anyhow::Result<Vec<f32>>;
    /// Whether this backend's steps apply adapters of `kind`.
    fn serves(&self, kind: AdapterKind) -> bool;
    /// The bias `[out]` of the base projection of `site` at `layer`, if it has one
    /// (Qwen2's q, k, v).
    fn bias(&self, _layer: usize, _site: LoraSite) -> Option<Vec<f32>> {
        None
    }
}

impl std::fmt::Debug for dyn ServedBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServedBase")
    }
}

/// Bounds on what a folder may make us read.
#[derive(Clone, Copy, Debug)]
pub struct AdapterLimits {
    pub max_file_bytes: u64,
    pub max_header_bytes: u64,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        AdapterLimits {
            max_file_bytes: 4 << 30,
            max_header_bytes: 100 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The folder or a file cannot be read (the path is in the message).
    #[error("{0}")]
    Io(String),
    /// A PEFT feature we refuse, named.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Malformed config or tensors, naming the key or field.
    #[error("invalid adapter: {0}")]
    Invalid(String),
}

use AdapterError::{Invalid, Unsupported};

pub use folder::{CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE};

/// What PEFT prefixes every key of a causal LM's adapter with.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The bytes the adapter in `dir` will take once loaded as `dtype`, from its safetensors
/// header alone (an upper bound: tensors the loader skips or folds are counted whole, and
/// VeRA's projections once per module, as they are held). Lets a caller reserve memory
/// before reading the weights.
pub fn estimate_adapter_bytes(
    dir: &Path,
    limits: &AdapterLimits,
    dtype: AdapterDType,
) -> Result<usize, AdapterError> {
    use std::io::Read;
    let path = dir.join(WEIGHTS_FILE);
    let io = |e: std::io::Error| AdapterError::Io(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::open(&path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > limits.max_header_bytes {
        return Err(Invalid(format!(
            "{WEIGHTS_FILE}: header of {len} bytes exceeds {}",
            limits.max_header_bytes
        )));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Invalid(format!("{WEIGHTS_FILE}: header is not JSON: {e}")))?;
    let tensors = json
        .as_object()
        .ok_or_else(|| Invalid(format!("{WEIGHTS_FILE}: header is not an object")))?;
    // Matrices are stored as `dtype`; vectors (scales, magnitudes, embeddings) in f32.
    // VeRA's projections are held as slices: `vera_A[:, :in]` once per input width (at
    // most one per class of module: hidden-sized, o_proj, down_proj), `vera_B[:out]` once
    // per output width (each module's `vera_lambda_b` has its width).
    let (mut matrices, mut vectors) = (0usize, 0usize);
    let (mut vera_a, mut vera_r) = (0usize, 0usize);
    let mut in_classes = std::collections::HashSet::new();
    let mut out_widths = std::collections::HashSet::new();
    for (name, info) in tensors {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .ok_or_else(|| Invalid(format!("{WEIGHTS_FILE}: {name} has no valid shape")))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Invalid(format!("{WEIGHTS_FILE}: {name} has a bad shape")))?;
        if name.contains("vera_A") {
            (vera_a, vera_r) = (numel, shape.first().copied().unwrap_or(0));
        } else if name.contains("vera_B") {
            continue;
        } else if name.contains("lora_A") || name.contains("lora_B") {
            matrices = matrices.saturating_add(numel);
        } else {
            vectors = vectors.saturating_add(numel);
        }
        if name.contains("vera_lambda_b") {
            out_widths.insert(numel);
        }
        if name.contains("vera_lambda_d") {
            in_classes.insert(
                ["o_proj", "down_proj"]
                    .iter()
                    .position(|m| name.contains(m)),
            );
        }
    }
    let vera = vera_a
        .saturating_mul(in_classes.len())
        .saturating_add(out_widths.iter().sum::<usize>().saturating_mul(vera_r));
    Ok(matrices
        .saturating_add(vera)
        .saturating_mul(dtype.size())
        .saturating_add(vectors.saturating_mul(4)))
}

/// Loads and validates the PEFT folder `dir` against `base`, its matrices stored as
/// `dtype`, without the served weights (so a DoRA folder is refused).
pub fn load_peft_adapter(
    dir: &Path,
    base: &BaseShape,
    limits: &AdapterLimits,
    dtype: AdapterDType,
) -> Result<AdapterWeights, AdapterError> {
    load_peft_adapter_served(dir, base, limits, dtype, None)
}

/// Loads and validates the PEFT folder `dir` against `base`, its matrices stored as
/// `dtype`; `served` (the base as its backend computes with it) is needed for DoRA, and
/// refuses any kind its backend does not apply.
pub fn load_peft_adapter_served(
    dir: &Path,
    base: &BaseShape,
    limits: &AdapterLimits,
    dtype: AdapterDType,
    served: Option<&dyn ServedBase>,
) -> Result<AdapterWeights, AdapterError> {
    if !dir.is_dir() {
        return Err(AdapterError::Io(format!(
            "adapter folder {} does not exist",
            dir.display()
        )));
    }
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| AdapterError::Io(format!("cannot read {}: {e}", config_path.display())))?;
    let raw: RawConfig =
        serde_json::from_str(&text).map_err(|e| Invalid(format!("{CONFIG_FILE}: {e}")))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        if dir.join(PICKLE_WEIGHTS_FILE).exists() {
            return Err(Unsupported(format!(
                "{}: pickle .bin weights are never loaded; convert to safetensors",
                dir.join(PICKLE_WEIGHTS_FILE).display()
            )));
        }
        return Err(AdapterError::Io(format!(
            "{} not found",
            weights_path.display()
        )));
    }
    let kind = match raw.peft_type()? {
        "LORA" => LoraConfig::kind(&raw)?,
        "IA3" => AdapterKind::Ia3,
        "PROMPT_TUNING" => AdapterKind::PromptTuning,
        "P_TUNING" => AdapterKind::PTuning,
        "ADALORA" => AdapterKind::AdaLora,
        "VERA" => AdapterKind::Vera,
        "PREFIX_TUNING" => AdapterKind::PrefixTuning,
        other => {
            return Err(Unsupported(format!(
                "peft_type \"{other}\" (LORA, DoRA, IA3, ADALORA, VERA, PROMPT_TUNING and \
                 P_TUNING adapters are served)"
            )))
        }
    };
    if served.is_some_and(|s| !s.serves(kind)) {
        return Err(Unsupported(format!(
            "{} adapters on this backend (its kernels apply LoRA only)",
            kind.name()
        )));
    }
    if kind == AdapterKind::Ia3 {
        let plan = ia3::Ia3Config::parse(&raw)?.plan(base)?;
        let file = SafeTensors::read(&weights_path, limits)?.unfused(base)?;
        return ia3::assemble(&plan, &file, base);
    }
    if matches!(
        kind,
        AdapterKind::PromptTuning | AdapterKind::PTuning | AdapterKind::PrefixTuning
    ) {
        let file = SafeTensors::read(&weights_path, limits)?.unfused(base)?;
        return prompt::load(&raw, &file, base, kind);
    }
    if kind == AdapterKind::AdaLora {
        let file = SafeTensors::read(&weights_path, limits)?.unfused(base)?;
        return adalora::load(&raw, &file, base, dtype);
    }
    if kind == AdapterKind::Vera {
        let file = SafeTensors::read(&weights_path, limits)?.unfused(base)?;
        return vera::load(&raw, &file, base, dtype);
    }
    if kind == AdapterKind::Dora && served.is_none() {
        return Err(Unsupported(
            "DoRA without the served base weights (its norms are taken over them)".into(),
        ));
    }
    let config = LoraConfig::parse(&raw)?;
    let plan = config.plan(base)?;
    let file = SafeTensors::read(&weights_path, limits)?.unfused(base)?;
    let mut weights = assemble(&plan, &file, base, dtype, kind)?;
    if let Some(served) = served.filter(|_| kind == AdapterKind::Dora) {
        dora::output_scales(&mut weights, served)?;
    }
    Ok(weights)
}
