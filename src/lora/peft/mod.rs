//! PEFT LoRA adapters: the public types and [`load_peft_adapter`], the entry point.
//! It turns a folder (`adapter_config.json` + `adapter_model.safetensors`) into validated
//! f32 [`AdapterWeights`]. Invariants: module selection, `layers_to_transform`, rank/alpha
//! patterns and scaling follow PEFT exactly; a (layer, site) holds a [`LoraPair`] iff the
//! config targets it, with `a = [rank, in]`, `b = [out, rank]` and only finite values; any
//! PEFT feature not implemented is refused by name, never ignored; `.bin` pickles are never
//! opened; header and file sizes are bounded before anything is read. `config` reads
//! `adapter_config.json` and applies PEFT's matching rules; `tensors` reads and checks the
//! safetensors file and assembles the pairs.
mod config;
pub mod folder;
mod tensors;

use config::{LoraConfig, RawConfig};
use std::path::Path;

use crate::lora::values::{AdapterDType, LoraValues};
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
        format!("{KEY_PREFIX}{}.{half}.weight", self.module_path(layer))
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

/// Base-model dimensions adapters are checked against.
#[derive(Clone, Copy, Debug)]
pub struct BaseShape {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub q_out: usize,
    pub kv_out: usize,
    pub intermediate_size: usize,
}

impl BaseShape {
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
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub rank: usize,
    pub scale: f32,
    /// `[rank, in]`
    pub a: LoraValues,
    /// `[out, rank]`
    pub b: LoraValues,
}

#[derive(Clone, Debug)]
pub struct AdapterWeights {
    pub rank_max: usize,
    /// Site module names that have weights, sorted.
    pub target_modules: Vec<String>,
    /// `layers[l][site.index()]`
    pub layers: Vec<[Option<LoraPair>; 7]>,
    /// Bytes held (every pair's values in the storage type).
    pub bytes: usize,
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
/// header alone (an upper bound: tensors the loader skips are counted too). Lets a
/// caller reserve memory before reading the weights.
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
    let mut floats = 0usize;
    for (name, info) in tensors {
        if name == "__metadata__" {
            continue;
        }
        let shape = info["shape"]
            .as_array()
            .ok_or_else(|| Invalid(format!("{WEIGHTS_FILE}: {name} has no shape")))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |n, d| {
                d.as_u64().and_then(|d| n.checked_mul(d as usize))
            })
            .ok_or_else(|| Invalid(format!("{WEIGHTS_FILE}: {name} has a bad shape")))?;
        floats = floats.saturating_add(numel);
    }
    Ok(floats.saturating_mul(dtype.size()))
}

/// Loads and validates the PEFT LoRA folder `dir` against `base`, its matrices stored as
/// `dtype`.
pub fn load_peft_adapter(
    dir: &Path,
    base: &BaseShape,
    limits: &AdapterLimits,
    dtype: AdapterDType,
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
    let config = LoraConfig::parse(&raw)?;
    let plan = config.plan(base)?;
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
    let file = SafeTensors::read(&weights_path, limits)?;
    assemble(&plan, &file, base, dtype)
}
