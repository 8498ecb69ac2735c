//! Our CUDA kernels as the backend calls them: the PTX that build.rs compiled from
//! `paged_attention.cu` (beside this file) and `crate::lora::kernels`'s `sgmv.cu`, loaded
//! through candle's custom-kernel loading, and one launcher that runs a planned launch
//! (`plan::launch`: kernel, grid, arguments) with the operands the caller binds.
//!
//! Invariants: every pointer handed to a kernel is a device address inside a live
//! allocation on the backend's one stream (candle tensors held by the caller for the
//! call, or buffers the step or adapter cache owns); launches are asynchronous on that
//! stream, so stream order is the only synchronisation they need.
use crate::model::backend::plan::launch::{Arg, Launch, Module};
use anyhow::{bail, ensure, Context, Result};
use candle_core::cuda::cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::CudaDevice;
use candle_core::{DType, Storage, Tensor};

const SGMV_PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/sgmv.sm80.ptx"));
const SGMV_PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/sgmv.sm90.ptx"));
const ATTN_PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.sm80.ptx"));
const ATTN_PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.sm90.ptx"));
const DECODE_PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.sm80.ptx"));
const DECODE_PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.sm90.ptx"));
const FUSED_PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.sm80.ptx"));
const FUSED_PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.sm90.ptx"));

/// The loaded kernel modules of one device, for one element type.
pub struct Kernels {
    device: CudaDevice,
    stream: std::sync::Arc<CudaStream>,
    suffix: &'static str,
    sgmv_ptx: &'static str,
    attn_ptx: &'static str,
    decode_ptx: &'static str,
    fused_ptx: &'static str,
}

/// The device address of a contiguous CUDA tensor's first element.
pub fn device_ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    ensure!(t.is_contiguous(), "a kernel operand must be contiguous");
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("a kernel operand is not on a CUDA device");
    };
    let base = match t.dtype() {
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(stream).0,
        DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(stream).0,
        other => bail!("no kernel takes {other:?} operands"),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

impl Kernels {
    /// The kernels for `dtype` on `device` (compute capability 8.0 or newer).
    pub fn new(device: &CudaDevice, dtype: DType) -> Result<Self> {
        let stream = device.cuda_stream();
        let (major, minor) = stream.context().compute_capability()?;
        ensure!(
            major >= 8,
            "compute capability {major}.{minor}: the CUDA backend needs 8.0 or newer"
        );
        let (sgmv_ptx, attn_ptx, decode_ptx, fused_ptx) = if major >= 9 {
            (
                SGMV_PTX_SM90,
                ATTN_PTX_SM90,
                DECODE_PTX_SM90,
                FUSED_PTX_SM90,
            )
        } else {
            (
                SGMV_PTX_SM80,
                ATTN_PTX_SM80,
                DECODE_PTX_SM80,
                FUSED_PTX_SM80,
            )
        };
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => bail!("the CUDA kernels take f32, f16 or bf16, not {other:?}"),
        };
        Ok(Self {
            device: device.clone(),
            stream,
            suffix,
            sgmv_ptx,
            attn_ptx,
            decode_ptx,
            fused_ptx,
        })
    }

    pub fn stream(&self) -> &std::sync::Arc<CudaStream> {
        &self.stream
    }

    fn func(&self, name: &str, module: Module) -> Result<CudaFunction> {
        let (module, ptx) = match module {
            Module::Lora => ("multilora_sgmv", self.sgmv_ptx),
            Module::Attention => ("multilora_paged_attention", self.attn_ptx),
            Module::DecodeAttention => ("multilora_decode_attention", self.decode_ptx),
            Module::Fused => ("multilora_fused", self.fused_ptx),
        };
        let full = format!("{name}_{}", self.suffix);
        Ok(self
            .device
            .get_or_load_custom_func(&full, module, ptx)
            .with_context(|| format!("loading kernel {full}"))?
            .into_cuda_function())
    }

    /// Runs `plan` on the stream: metadata arguments at `meta_base` plus their offset,
    /// `bound` operands by name.
    ///
    /// # Safety
    /// `plan` must come from `plan::launch` (whose argument lists the tests check against
    /// the kernels' parameters), `meta_base` must be the address of a live metadata
    /// buffer of the layout the plan was made for, and every bound operand a live device
    /// buffer of the shape the plan's grid covers (rows, columns, caches holding every
    /// slot the metadata names).
    pub unsafe fn launch(
        &self,
        plan: &Launch,
        meta_base: u64,
        bound: &[(&str, u64)],
    ) -> Result<()> {
        if plan.grid.0 == 0 || plan.grid.1 == 0 || plan.grid.2 == 0 {
            return Ok(());
        }
        enum Value {
            Ptr(u64),
            I32(i32),
            F32(f32),
        }
        let values = plan
            .args
            .iter()
            .map(|arg| {
                Ok(match *arg {
                    Arg::Bound(name) => Value::Ptr(
                        bound
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map(|(_, p)| *p)
                            .with_context(|| format!("{}: no operand `{name}`", plan.kernel))?,
                    ),
                    Arg::Meta { offset, .. } => Value::Ptr(meta_base + 4 * offset as u64),
                    Arg::I32 { value, .. } => Value::I32(value),
                    Arg::F32 { bits, .. } => Value::F32(f32::from_bits(bits)),
                })
            })
            .collect::<Result<Vec<Value>>>()?;
        let f = self.func(plan.kernel, plan.module)?;
        let mut b = self.stream.launch_builder(&f);
        for v in &values {
            match v {
                Value::Ptr(p) => b.arg(p),
                Value::I32(i) => b.arg(i),
                Value::F32(x) => b.arg(x),
            };
        }
        let config = LaunchConfig {
            grid_dim: plan.grid,
            block_dim: (plan.block, 1, 1),
            shared_mem_bytes: plan.shared,
        };
        // SAFETY: the caller's contract: the arguments are the kernel's parameters in
        // order and every address is live and large enough.
        unsafe { b.launch(config) }.with_context(|| format!("launching {}", plan.kernel))?;
        Ok(())
    }
}
