//! Where the base model runs and in what precision: the `--device`, `--dtype`,
//! `--quant-type` and `--kv-dtype` flags, parsed once into a [`Placement`], and the one
//! function that builds the model on the backend they name.
//!
//! Invariants: on `cpu`, `auto` keeps what the file holds (a quantized GGUF stays
//! quantized, bf16/f16 safetensors stay 16-bit, anything else is f32), `quantized`
//! computes on GGUF blocks and quantizes a dense checkpoint to `--quant-type`; `cuda[:N]`
//! exists only in builds with the `cuda` feature, where `auto` is bf16 and `quantized` is
//! refused (not yet on the GPU); a combination a build cannot serve is refused at
//! start-up with the reason, never silently changed.
use super::backend::cpu::weight::QUANT_TYPES;
use super::backend::cpu::{CpuBackend, CpuWeightFormat, KvDType};
use super::weights::{load_resolved, resolve_with, LoadedModel, ModelSource};
use crate::hub::HubOptions;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use std::fmt;
use std::str::FromStr;

/// `--device`: `cpu`, or `cuda` / `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("{s:?}: expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--dtype`: how the base weights are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DTypeChoice {
    /// What the file holds on the CPU; bf16 on CUDA.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
    /// Quantized blocks (CPU): GGUF blocks kept, dense weights quantized at load.
    Quantized,
}

impl FromStr for DTypeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "quantized" => Ok(Self::Quantized),
            _ => Err(format!("{s:?}: expected auto, f32, bf16, f16 or quantized")),
        }
    }
}

/// `--quant-type`: what `--dtype quantized` quantizes a dense checkpoint to.
pub fn parse_quant_type(s: &str) -> Result<GgmlDType, String> {
    QUANT_TYPES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = QUANT_TYPES.iter().map(|(n, _)| *n).collect();
            format!("{s:?}: expected one of {}", names.join(", "))
        })
}

impl DTypeChoice {
    /// The CUDA dtype (`Auto` is bf16); `Quantized` is not served on CUDA yet.
    pub fn cuda_dtype(self) -> Result<candle_core::DType> {
        use candle_core::DType;
        match self {
            Self::Auto | Self::Bf16 => Ok(DType::BF16),
            Self::F32 => Ok(DType::F32),
            Self::F16 => Ok(DType::F16),
            Self::Quantized => {
                bail!("--dtype quantized is CPU-only for now; on cuda use bf16, f16 or f32")
            }
        }
    }

    /// The CPU weight format, `Auto` resolved against what `source` holds.
    pub fn cpu_format(
        self,
        source: &ModelSource,
        quant_type: GgmlDType,
    ) -> Result<CpuWeightFormat> {
        let quantized = CpuWeightFormat::Quantized {
            dense_to: quant_type,
        };
        Ok(match self {
            Self::F32 => CpuWeightFormat::F32,
            Self::Bf16 => CpuWeightFormat::Bf16,
            Self::F16 => CpuWeightFormat::F16,
            Self::Quantized => quantized,
            Self::Auto => match stored_precision(source)? {
                Stored::Quantized => quantized,
                Stored::Bf16 => CpuWeightFormat::Bf16,
                Stored::F16 => CpuWeightFormat::F16,
                Stored::F32 => CpuWeightFormat::F32,
            },
        })
    }
}

/// What a checkpoint's linear weights are stored as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stored {
    Quantized,
    Bf16,
    F16,
    F32,
}

/// Reads only headers: a GGUF's tensor types (quantized if any 2-D tensor is), or a
/// Hugging Face folder's `torch_dtype`.
fn stored_precision(source: &ModelSource) -> Result<Stored> {
    match source {
        ModelSource::Gguf(path) => {
            let mut file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let content = gguf_file::Content::read(&mut file)
                .with_context(|| format!("reading GGUF header of {}", path.display()))?;
            let types: Vec<GgmlDType> = content
                .tensor_infos
                .values()
                .filter(|i| i.shape.rank() == 2)
                .map(|i| i.ggml_dtype)
                .collect();
            Ok(if types.iter().any(|t| t.block_size() > 1) {
                Stored::Quantized
            } else if types.contains(&GgmlDType::BF16) {
                Stored::Bf16
            } else if types.contains(&GgmlDType::F16) {
                Stored::F16
            } else {
                Stored::F32
            })
        }
        ModelSource::HfDir(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            Ok(match json["torch_dtype"].as_str().unwrap_or("float32") {
                "bfloat16" => Stored::Bf16,
                "float16" => Stored::F16,
                _ => Stored::F32,
            })
        }
    }
}

/// `--kv-dtype`: how the paged K/V cache stores values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDTypeChoice {
    /// f32 on the CPU (exact); the weights' dtype on CUDA.
    #[default]
    Auto,
    F32,
    Bf16,
}

impl FromStr for KvDTypeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("{s:?}: expected auto, f32 or bf16")),
        }
    }
}

impl KvDTypeChoice {
    /// The CPU cache's value type.
    pub fn cpu(self) -> KvDType {
        match self {
            Self::Auto | Self::F32 => KvDType::F32,
            Self::Bf16 => KvDType::Bf16,
        }
    }

    /// Checks the choice against the CUDA weights' dtype: the CUDA cache holds K/V in
    /// that dtype, so only `auto` or that same dtype are served.
    pub fn check_cuda(self, weights: candle_core::DType) -> Result<()> {
        use candle_core::DType;
        let wanted = match self {
            Self::Auto => return Ok(()),
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        };
        if wanted != weights {
            bail!(
                "--kv-dtype {}: on cuda the K/V cache holds the weights' dtype ({weights:?}); \
                 use --kv-dtype auto or match --dtype",
                wanted.as_str()
            );
        }
        Ok(())
    }
}

/// Where and in what precision the base model runs: the `--device`, `--dtype`,
/// `--quant-type` and `--kv-dtype` flags together.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub device: DeviceSpec,
    pub dtype: DTypeChoice,
    /// What `--dtype quantized` makes of a dense checkpoint.
    pub quant_type: GgmlDType,
    pub kv_dtype: KvDTypeChoice,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            dtype: DTypeChoice::Auto,
            quant_type: GgmlDType::Q8_0,
            kv_dtype: KvDTypeChoice::Auto,
        }
    }
}

/// Loads `--model` as `placement` says (a Hub repo id fetched as `hub` says), ready
/// for the engine.
pub fn load_model_on(
    model: &str,
    revision: Option<&str>,
    hub: &HubOptions,
    placement: &Placement,
) -> Result<LoadedModel> {
    match placement.device {
        DeviceSpec::Cpu => {
            let source = resolve_with(model, revision, hub)?;
            let format = placement.dtype.cpu_format(&source, placement.quant_type)?;
            let kv = placement.kv_dtype.cpu();
            tracing::info!(format = %format.name(), kv = kv.name(), "CPU weight and K/V formats");
            let backend = CpuBackend::new(format).with_kv_dtype(kv);
            load_resolved(model, &source, backend)?.into_runner()
        }
        DeviceSpec::Cuda(ordinal) => {
            let resolved = placement.dtype.cuda_dtype()?;
            placement.kv_dtype.check_cuda(resolved)?;
            load_cuda(model, revision, hub, ordinal, resolved)
        }
    }
}

#[cfg(feature = "cuda")]
fn load_cuda(
    model: &str,
    revision: Option<&str>,
    hub: &HubOptions,
    ordinal: usize,
    dtype: candle_core::DType,
) -> Result<LoadedModel> {
    let backend = super::backend::cuda::CudaBackend::new(ordinal, dtype)?;
    super::weights::load_llama_with(model, revision, hub, backend)?.into_runner()
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(
    _model: &str,
    _revision: Option<&str>,
    _hub: &HubOptions,
    ordinal: usize,
    _dtype: candle_core::DType,
) -> Result<LoadedModel> {
    bail!(
        "--device cuda:{ordinal}: this binary was built without CUDA (cargo build --features cuda)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!(DTypeChoice::Auto.cuda_dtype().unwrap(), DType::BF16);
        assert_eq!(
            "f16".parse::<DTypeChoice>().unwrap().cuda_dtype().unwrap(),
            DType::F16
        );
        assert!(DTypeChoice::Quantized.cuda_dtype().is_err());
        assert!("int4".parse::<DTypeChoice>().is_err());
        assert_eq!(parse_quant_type("Q4_K"), Ok(GgmlDType::Q4K));
        assert!(parse_quant_type("q3_k").unwrap_err().contains("q8_0"));
    }

    #[test]
    fn auto_keeps_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let source = ModelSource::HfDir(dir.path().to_path_buf());
        let q8 = GgmlDType::Q8_0;
        for (torch, want) in [
            ("bfloat16", CpuWeightFormat::Bf16),
            ("float16", CpuWeightFormat::F16),
            ("float32", CpuWeightFormat::F32),
        ] {
            let config = format!(r#"{{"torch_dtype": "{torch}"}}"#);
            std::fs::write(dir.path().join("config.json"), config).unwrap();
            assert_eq!(DTypeChoice::Auto.cpu_format(&source, q8).unwrap(), want);
        }
        assert_eq!(
            DTypeChoice::Quantized.cpu_format(&source, q8).unwrap(),
            CpuWeightFormat::Quantized { dense_to: q8 }
        );
    }

    #[test]
    fn refuses_what_the_build_cannot_serve() {
        let on_cuda = |dtype, kv_dtype| Placement {
            device: DeviceSpec::Cuda(0),
            dtype,
            kv_dtype,
            ..Placement::default()
        };
        let load = |p: Placement| {
            format!(
                "{:#}",
                load_model_on("x", None, &HubOptions::default(), &p)
                    .err()
                    .unwrap()
            )
        };
        let auto = KvDTypeChoice::Auto;
        let err = load(on_cuda(DTypeChoice::Quantized, auto));
        assert!(err.contains("CPU-only"), "{err}");
        let err = load(on_cuda(DTypeChoice::Bf16, KvDTypeChoice::F32));
        assert!(err.contains("--kv-dtype f32"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = load(on_cuda(DTypeChoice::Auto, KvDTypeChoice::Bf16));
            assert!(err.contains("built without CUDA"), "{err}");
        }
    }

    #[test]
    fn parses_kv_dtypes() {
        assert_eq!("bf16".parse(), Ok(KvDTypeChoice::Bf16));
        assert_eq!(KvDTypeChoice::Auto.cpu(), KvDType::F32);
        assert_eq!(KvDTypeChoice::Bf16.cpu(), KvDType::Bf16);
        assert!("fp8".parse::<KvDTypeChoice>().unwrap_err().contains("bf16"));
    }
}
