//! Finds and loads base-model weights: a local Hugging Face folder (safetensors, sharded
//! or not), a local GGUF file (2-D tensors kept as their blocks with Q/K rows un-permuted
//! to the Hugging Face layout, vectors dequantized, names mapped through
//! [`super::layout`]), or a Hub repo id fetched and cached with hf-hub. Tensors are read
//! on the host into a [`Checkpoint`]; the backend takes them from there (dequantizing
//! blocks unless it computes on them).
use super::backend::cpu::CpuBackend;
use super::backend::Backend;
use super::block_rows::{unpermute_qk_order, BlockRows};
use super::checkpoint::Checkpoint;
use super::config::ModelConfig;
use super::layout;
use super::llama::Llama;
use super::runner::{BaseModel, ModelRunner};
use super::tokenizer::TextTokenizer;
use crate::hub::{HubOptions, HubRepo};
use crate::lora::peft::LoraSite;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the model comes from, after resolution.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A folder with config.json, tokenizer.json and safetensors.
    HfDir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

/// A model ready to build: its shape, its tokenizer and a builder over its tensors
/// (named in the Hugging Face layout).
pub struct LoadedWeights {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub checkpoint: Checkpoint,
    /// The dtype the checkpoint was stored in (informational).
    pub source_dtype: String,
}

/// A built model with its tokenizer: what the server needs from `--model`. `M` is the
/// model: a [`Llama`] on a known backend, or the engine's [`BaseModel`].
pub struct LoadedModel<M = Box<dyn BaseModel>> {
    pub model: M,
    pub tokenizer: TextTokenizer,
    /// How the weights were stored, for `GetModelInfo`.
    pub source_dtype: String,
}

/// Resolves, loads and builds the model named by `--model` (see [`resolve`]) on
/// `backend`.
pub fn load_llama<B: Backend>(
    model: &str,
    revision: Option<&str>,
    backend: B,
) -> Result<LoadedModel<Llama<B>>> {
    load_llama_with(model, revision, &HubOptions::default(), backend)
}

/// As [`load_llama`], a Hub repo id fetched as `hub` says.
pub fn load_llama_with<B: Backend>(
    model: &str,
    revision: Option<&str>,
    hub: &HubOptions,
    backend: B,
) -> Result<LoadedModel<Llama<B>>> {
    load_resolved(model, &resolve_with(model, revision, hub)?, backend)
}

/// Loads and builds `source`, what `--model` `model` resolved to, on `backend`.
pub fn load_resolved<B: Backend>(
    model: &str,
    source: &ModelSource,
    backend: B,
) -> Result<LoadedModel<Llama<B>>> {
    tracing::info!(?source, "loading model");
    let loaded = load(source)?;
    let built = Llama::load(backend, &loaded.checkpoint, &loaded.config)
        .with_context(|| format!("building the model from {model}"))?;
    drop(loaded.checkpoint);
    // The checkpoint's tensors and the load's intermediate copies are freed by now:
    // the server's resident memory is its model, not the peak of its load.
    crate::heap::release_freed_memory();
    Ok(LoadedModel {
        model: built,
        tokenizer: loaded.tokenizer,
        source_dtype: loaded.source_dtype,
    })
}

impl<B: Backend> LoadedModel<Llama<B>> {
    /// The same model, ready for the engine.
    pub fn into_runner(self) -> Result<LoadedModel> {
        Ok(LoadedModel {
            model: Box::new(ModelRunner::new(self.model)?),
            tokenizer: self.tokenizer,
            source_dtype: self.source_dtype,
        })
    }
}

/// The model named by `--model`, on the CPU backend, ready for the engine.
pub fn load_model(model: &str, revision: Option<&str>) -> Result<LoadedModel> {
    load_llama(model, revision, CpuBackend::default())?.into_runner()
}

/// Resolves `--model`: an existing local path, else a Hub repo id (downloaded into the
/// hf-hub cache at `revision`, endpoint and cache from the environment).
pub fn resolve(model: &str, revision: Option<&str>) -> Result<ModelSource> {
    resolve_with(model, revision, &HubOptions::default())
}

/// As [`resolve`], a Hub repo id fetched as `hub` says (`--hub-endpoint`,
/// `--hub-cache`).
pub fn resolve_with(model: &str, revision: Option<&str>, hub: &HubOptions) -> Result<ModelSource> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(ModelSource::HfDir(path.to_path_buf()));
    }
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        bail!("--model {model}: a file must be a .gguf; a Hugging Face model is a folder");
    }
    if model.split('/').count() != 2 || model.starts_with('.') || model.starts_with('/') {
        bail!("--model {model}: no such file or folder, and not a Hub repo id (owner/name)");
    }
    download_from_hub(model, revision, hub)
}

/// Downloads a Hub repo's config, tokenizer and safetensors into the hf-hub cache (or
/// finds them there) and returns their folder.
pub fn download_from_hub(
    repo_id: &str,
    revision: Option<&str>,
    hub: &HubOptions,
) -> Result<ModelSource> {
    let repo = HubRepo::open_with(hub, repo_id, revision)?;
    let config = repo.fetch("config.json")?;
    repo.fetch("tokenizer.json")?;
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        repo.fetch_optional(optional)?;
    }
    match repo.fetch_optional("model.safetensors.index.json")? {
        Some(index) => {
            for shard in shard_files(&index)? {
                repo.fetch(&shard)?;
            }
        }
        None => {
            repo.fetch("model.safetensors")?;
        }
    }
    let dir = config
        .parent()
        .context("hf-hub returned a file without a folder")?
        .to_path_buf();
    Ok(ModelSource::HfDir(dir))
}

fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = json["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Reads only the model's shape (no weights).
pub fn read_config(source: &ModelSource) -> Result<ModelConfig> {
    match source {
        ModelSource::HfDir(dir) => ModelConfig::from_hf_config(&dir.join("config.json"), "model"),
        ModelSource::Gguf(path) => {
            let mut file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let content = gguf_file::Content::read(&mut file)
                .with_context(|| format!("reading GGUF header of {}", path.display()))?;
            ModelConfig::from_gguf(&content, "model")
        }
    }
}

/// Reads only the model's tokenizer (no weights).
pub fn load_tokenizer(source: &ModelSource) -> Result<TextTokenizer> {
    match source {
        ModelSource::HfDir(dir) => TextTokenizer::from_hf_dir(dir),
        ModelSource::Gguf(path) => {
            let mut file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let content = gguf_file::Content::read(&mut file)
                .with_context(|| format!("reading GGUF header of {}", path.display()))?;
            TextTokenizer::from_gguf(&content)
        }
    }
}

/// Loads weights (as f32 host tensors), config and tokenizer from a resolved source.
pub fn load(source: &ModelSource) -> Result<LoadedWeights> {
    match source {
        ModelSource::HfDir(dir) => load_hf_dir(dir),
        ModelSource::Gguf(path) => load_gguf(path),
    }
}

fn load_hf_dir(dir: &Path) -> Result<LoadedWeights> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let config = ModelConfig::from_hf_config(&dir.join("config.json"), &name)?;
    let tokenizer = TextTokenizer::from_hf_dir(dir)?;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        shard_files(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        if !f.is_file() {
            bail!("missing weights file {}", f.display());
        }
    }
    // SAFETY: the files are memory-mapped read-only and must not change while loaded,
    // which is the contract of every safetensors loader.
    let names: Vec<String> = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .with_context(|| format!("reading safetensors headers in {}", dir.display()))?
        .tensors()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    // SAFETY: as above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
        .with_context(|| format!("loading safetensors from {}", dir.display()))?;
    Ok(LoadedWeights {
        config,
        tokenizer,
        checkpoint: Checkpoint::dense(vb, names),
        source_dtype: "safetensors".into(),
    })
}

/// llama.cpp's name of the model's architecture.
fn content_arch(config: &ModelConfig) -> &'static str {
    match config.arch.family {
        crate::model::arch::Family::Mistral => "llama",
        f => f.name(),
    }
}

/// llama.cpp's per-frequency rope divisors (Llama 3.1+ rope scaling).
const ROPE_FREQS: &str = "rope_freqs.weight";

fn load_gguf(path: &Path) -> Result<LoadedWeights> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .with_context(|| format!("reading GGUF header of {}", path.display()))?;
    let name = path
        .file_stem()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let mut config = ModelConfig::from_gguf(&content, &name)?;
    let tokenizer = TextTokenizer::from_gguf(&content)?;
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        let factors = content
            .tensor(&mut file, ROPE_FREQS, &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
            .with_context(|| format!("reading GGUF tensor {ROPE_FREQS}"))?;
        config.set_rope_factors(factors)?;
    }
    let mut vectors = HashMap::new();
    let mut blocks = HashMap::new();
    let mut dtypes = Vec::new();
    let specs = layout::gguf_specs(&config);
    let permuted = crate::model::arch::gguf::permuted_qk(config.arch.family);
    for (gguf_name, info) in content.tensor_infos.iter() {
        if gguf_name == ROPE_FREQS {
            continue;
        }
        let Some(spec) = specs.get(gguf_name) else {
            bail!(
                "GGUF tensor {gguf_name} is not one a {} model uses; refusing to serve the file without it",
                content_arch(&config)
            );
        };
        dtypes.push(format!("{:?}", info.ggml_dtype));
        let qt = content
            .tensor(&mut file, gguf_name, &Device::Cpu)
            .with_context(|| format!("reading GGUF tensor {gguf_name}"))?;
        // llama.cpp's `llama` files hold Q/K rows (and biases) permuted for its rope.
        let heads = match spec.kind {
            layout::TensorKind::Linear(LoraSite::Q) | layout::TensorKind::Bias(LoraSite::Q) => {
                Some(config.num_heads)
            }
            layout::TensorKind::Linear(LoraSite::K) | layout::TensorKind::Bias(LoraSite::K) => {
                Some(config.num_kv_heads)
            }
            _ => None,
        }
        .filter(|_| permuted);
        if qt.rank() != 2 {
            let t = qt
                .dequantize(&Device::Cpu)
                .with_context(|| format!("dequantizing {gguf_name}"))?
                .to_dtype(DType::F32)?;
            let t = match heads {
                Some(h) => {
                    let order: Vec<u32> = unpermute_qk_order(t.dim(0)?, h)
                        .into_iter()
                        .map(|i| i as u32)
                        .collect();
                    t.index_select(&Tensor::new(order, &Device::Cpu)?, 0)?
                }
                None => t,
            };
            vectors.insert(spec.name.clone(), t);
            continue;
        }
        let mut rows = BlockRows::from_qtensor(&qt).with_context(|| gguf_name.to_string())?;
        drop(qt);
        if let Some(h) = heads {
            rows = rows.select_rows(&unpermute_qk_order(rows.rows, h))?;
        }
        blocks.insert(spec.name.clone(), rows);
    }
    dtypes.sort();
    dtypes.dedup();
    let names: Vec<String> = vectors.keys().cloned().collect();
    let vb = VarBuilder::from_tensors(vectors, DType::F32, &Device::Cpu);
    Ok(LoadedWeights {
        config,
        tokenizer,
        checkpoint: Checkpoint::with_blocks(vb, names, blocks),
        source_dtype: format!("gguf {}", dtypes.join("/")),
    })
}

/// Undoes llama.cpp's converter permutation of Q/K rows
/// (`w.reshape(h, 2, d/2, in).swapaxes(1, 2)`), restoring the rotate-half layout.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let head_dim = out / n_heads;
    Ok(w.reshape((n_heads, head_dim / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// The inverse of [`unpermute_qk`]: what llama.cpp's converter does.
pub fn permute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let head_dim = out / n_heads;
    Ok(w.reshape((n_heads, 2, head_dim / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // Head 0 rows 0..4: permuted order interleaves the two halves.
        let rows: Vec<f32> = p
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| r[0] / 3.0)
            .collect();
        assert_eq!(rows, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }
}
