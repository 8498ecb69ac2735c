//! Where the base model runs and in what precision: the `--device` and `--dtype` flags,
//! parsed once, and the one function that builds the model on the backend they name.
//!
//! Invariants: `cpu` computes in f32 (the quantized-base work adds its CPU dtypes here);
//! `cuda[:N]` exists only in builds with the `cuda` feature and defaults to bf16 there; a
//! combination a build cannot serve is refused at start-up with the reason, never
//! silently changed.
use super::backend::cpu::CpuBackend;
use super::weights::{load_llama, LoadedModel};
use anyhow::{bail, Result};
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

/// `--dtype`: how the base weights and activations are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DTypeChoice {
    /// The device's default: f32 on the CPU, bf16 on CUDA.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl FromStr for DTypeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(format!("{s:?}: expected auto, f32, bf16 or f16")),
        }
    }
}

impl DTypeChoice {
    /// The candle dtype on `device` (`Auto` resolved).
    pub fn resolve(self, device: DeviceSpec) -> candle_core::DType {
        use candle_core::DType;
        match (self, device) {
            (Self::Auto, DeviceSpec::Cpu) | (Self::F32, _) => DType::F32,
            (Self::Auto, DeviceSpec::Cuda(_)) | (Self::Bf16, _) => DType::BF16,
            (Self::F16, _) => DType::F16,
        }
    }
}

/// Loads `--model` onto `device` in `dtype`, ready for the engine. A quantized GGUF is
/// dequantized on load (to f32 on the CPU, then to the device's dtype).
pub fn load_model_on(
    model: &str,
    revision: Option<&str>,
    device: DeviceSpec,
    dtype: DTypeChoice,
) -> Result<LoadedModel> {
    let resolved = dtype.resolve(device);
    match device {
        DeviceSpec::Cpu => {
            if resolved != candle_core::DType::F32 {
                bail!(
                    "--dtype {resolved:?} on the CPU is not supported yet: the CPU computes in f32"
                );
            }
            load_llama(model, revision, CpuBackend)?.into_runner()
        }
        DeviceSpec::Cuda(ordinal) => load_cuda(model, revision, ordinal, resolved),
    }
}

#[cfg(feature = "cuda")]
fn load_cuda(
    model: &str,
    revision: Option<&str>,
    ordinal: usize,
    dtype: candle_core::DType,
) -> Result<LoadedModel> {
    let backend = super::backend::cuda::CudaBackend::new(ordinal, dtype)?;
    load_llama(model, revision, backend)?.into_runner()
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(
    _model: &str,
    _revision: Option<&str>,
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
        assert_eq!(DTypeChoice::Auto.resolve(DeviceSpec::Cpu), DType::F32);
        assert_eq!(DTypeChoice::Auto.resolve(DeviceSpec::Cuda(0)), DType::BF16);
        assert_eq!(
            "f16"
                .parse::<DTypeChoice>()
                .unwrap()
                .resolve(DeviceSpec::Cuda(1)),
            DType::F16
        );
        assert!("int4".parse::<DTypeChoice>().is_err());
    }

    #[test]
    fn refuses_what_the_build_cannot_serve() {
        let err = load_model_on("unused", None, DeviceSpec::Cpu, DTypeChoice::Bf16)
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("CPU computes in f32"),
            "{err:#}"
        );
        if !cfg!(feature = "cuda") {
            let err = load_model_on("unused", None, DeviceSpec::Cuda(0), DTypeChoice::Auto)
                .err()
                .unwrap();
            assert!(format!("{err:#}").contains("built without CUDA"), "{err:#}");
        }
    }
}
