//! Our CUDA kernels as the backend calls them: the PTX that build.rs compiled from
//! `paged_attention.cu` (beside this file) and `crate::lora::kernels`'s `sgmv.cu`, loaded
//! through candle's custom-kernel loading, and one typed launch function per kernel.
//!
//! Invariants: every pointer handed to a kernel is a device address inside a live
//! allocation on the backend's one stream (candle tensors held by the caller for the
//! call, or buffers the step or adapter cache owns); launches are asynchronous on that
//! stream, so stream order is the only synchronisation they need.
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

/// Threads per block of the row-wise kernels (rope, kv_write).
const ROW_THREADS: u32 = 256;
/// Must match `ATTN_WARPS` in paged_attention.cu.
const ATTN_WARPS: u32 = 4;
/// Must match `MAX_DIMS_PER_LANE * 32` in paged_attention.cu.
pub const MAX_HEAD_DIM: usize = 256;
/// Must match `SHRINK_WARPS` / `EXPAND_THREADS` / `SGMV_TILE` in sgmv.cu.
const SHRINK_WARPS: u32 = 4;
const EXPAND_THREADS: u32 = 256;
pub const SGMV_TILE: usize = 8;

/// The loaded kernel modules of one device, for one element type.
pub struct Kernels {
    device: CudaDevice,
    stream: std::sync::Arc<CudaStream>,
    suffix: &'static str,
    sgmv_ptx: &'static str,
    attn_ptx: &'static str,
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

fn grid(x: usize, y: usize, threads: u32, shared: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (u32::try_from(x)?, u32::try_from(y)?, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: u32::try_from(shared)?,
    })
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).context("a kernel size does not fit in i32")
}

/// The device addresses and sizes one LoRA site launch reads (see sgmv.cu).
pub struct LoraLaunch {
    pub x: u64,
    pub in_features: usize,
    pub h: u64,
    pub h_stride: usize,
    pub y: u64,
    pub y_stride: usize,
    pub y_offset: usize,
    pub out_features: usize,
    pub site: usize,
    pub max_rank: usize,
}

/// One group of segments of the step (all SGMV or all BGMV): device addresses of its
/// first entry in each per-segment array, and how many there are.
#[derive(Clone, Copy, Debug)]
pub struct SegmentGroup {
    pub count: usize,
    pub start: u64,
    pub len: u64,
    pub slot: u64,
}

/// Per-step arrays every LoRA launch of the step shares.
#[derive(Clone, Copy, Debug)]
pub struct LoraTables {
    pub sorted_tokens: u64,
    pub sorted_weights: u64,
    pub slot_tables: u64,
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
        let (sgmv_ptx, attn_ptx) = if major >= 9 {
            (SGMV_PTX_SM90, ATTN_PTX_SM90)
        } else {
            (SGMV_PTX_SM80, ATTN_PTX_SM80)
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
        })
    }

    pub fn stream(&self) -> &CudaStream {
        &self.stream
    }

    fn func(&self, name: &str, lora: bool) -> Result<CudaFunction> {
        let (module, ptx) = if lora {
            ("multilora_sgmv", self.sgmv_ptx)
        } else {
            ("multilora_paged_attention", self.attn_ptx)
        };
        let full = format!("{name}_{}", self.suffix);
        Ok(self
            .device
            .get_or_load_custom_func(&full, module, ptx)
            .with_context(|| format!("loading kernel {full}"))?
            .into_cuda_function())
    }

    /// Rotates `x` (`[rows, heads * 2 * half]`) in place at `positions` (i32, device).
    pub fn rope(
        &self,
        x: u64,
        rows: usize,
        tables: (u64, u64),
        positions: u64,
        heads: usize,
        half: usize,
    ) -> Result<()> {
        let f = self.func("rope", false)?;
        let (heads, half) = (int(heads)?, int(half)?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&x)
            .arg(&tables.0)
            .arg(&tables.1)
            .arg(&positions)
            .arg(&heads)
            .arg(&half);
        // SAFETY: argument types and order match `rope_<T>` in paged_attention.cu; x has
        // `rows` rows, the tables cover every position (checked by the caller).
        unsafe { b.launch(grid(rows, 1, ROW_THREADS, 0)?) }?;
        Ok(())
    }

    /// Copies `rows` rows of `k`/`v` (`width` wide) into the caches at `kv_slot`.
    pub fn kv_write(
        &self,
        kv: (u64, u64),
        caches: (u64, u64),
        kv_slot: u64,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let f = self.func("kv_write", false)?;
        let width = int(width)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&kv.0)
            .arg(&kv.1)
            .arg(&caches.0)
            .arg(&caches.1)
            .arg(&kv_slot)
            .arg(&width);
        // SAFETY: matches `kv_write_<T>`; every kv_slot is a row of the caches (the
        // engine's block tables are in range) and k/v have `rows` rows.
        unsafe { b.launch(grid(rows, 1, ROW_THREADS, 0)?) }?;
        Ok(())
    }

    /// Paged attention of `rows` query rows (see paged_attention.cu for the operands).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        out: u64,
        q: u64,
        caches: (u64, u64),
        meta: AttentionMeta,
        rows: usize,
        shape: super::super::HeadShape,
    ) -> Result<()> {
        ensure!(
            shape.head_dim <= MAX_HEAD_DIM && shape.num_heads.is_multiple_of(shape.num_kv_heads),
            "attention heads {shape:?} are not supported on CUDA (head_dim <= {MAX_HEAD_DIM})"
        );
        let f = self.func("paged_attention", false)?;
        let scale = shape.scale;
        let softcap = shape.softcap.unwrap_or(0.0);
        let window = int(shape.window.unwrap_or(0))?;
        let (mb, bs) = (int(meta.max_blocks)?, int(meta.block_size)?);
        let (nh, nkv, hd) = (
            int(shape.num_heads)?,
            int(shape.num_kv_heads)?,
            int(shape.head_dim)?,
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(&out).arg(&q).arg(&caches.0).arg(&caches.1);
        b.arg(&meta.positions)
            .arg(&meta.row_chunk)
            .arg(&meta.block_tables);
        b.arg(&mb).arg(&bs).arg(&nh).arg(&nkv).arg(&hd).arg(&scale);
        b.arg(&softcap).arg(&window);
        // SAFETY: matches `paged_attention_<T>`; the block tables cover every position
        // of their chunks and `out` has `rows * num_heads * head_dim` elements.
        unsafe { b.launch(grid(rows, shape.num_heads, 32 * ATTN_WARPS, 0)?) }?;
        Ok(())
    }

    /// LoRA shrink then expand-add of one site over one segment group.
    pub fn lora(
        &self,
        site: &LoraLaunch,
        group: SegmentGroup,
        tables: LoraTables,
        sgmv: bool,
    ) -> Result<()> {
        if group.count == 0 || site.max_rank == 0 {
            return Ok(());
        }
        let kind = if sgmv { "sgmv" } else { "bgmv" };
        let tile = if sgmv { SGMV_TILE } else { 1 };
        let elem = self.elem_bytes();
        let lanes = 16 / elem;
        let shrink_vec =
            i32::from(site.in_features.is_multiple_of(lanes) && site.x.is_multiple_of(16));
        let (inf, hs, st) = (int(site.in_features)?, int(site.h_stride)?, int(site.site)?);
        let shrink = self.func(&format!("lora_shrink_{kind}"), true)?;
        let mut b = self.stream.launch_builder(&shrink);
        b.arg(&site.x).arg(&inf).arg(&site.h).arg(&hs);
        b.arg(&group.start).arg(&group.len).arg(&group.slot);
        b.arg(&tables.sorted_tokens)
            .arg(&tables.slot_tables)
            .arg(&st)
            .arg(&shrink_vec);
        let rank_blocks = site.max_rank.div_ceil(SHRINK_WARPS as usize);
        // SAFETY: matches `lora_shrink_<kind>_<T>`; h has `h_stride >= max_rank` columns
        // for every token of the step, and every descriptor points into a live adapter.
        unsafe { b.launch(grid(group.count, rank_blocks, 32 * SHRINK_WARPS, 0)?) }?;
        let expand = self.func(&format!("lora_expand_{kind}"), true)?;
        let (ys, yo, of) = (
            int(site.y_stride)?,
            int(site.y_offset)?,
            int(site.out_features)?,
        );
        let expand_vec = 1i32; // adapter buffers align every B to 16 bytes
        let mut b = self.stream.launch_builder(&expand);
        b.arg(&site.y)
            .arg(&ys)
            .arg(&yo)
            .arg(&of)
            .arg(&site.h)
            .arg(&hs);
        b.arg(&group.start).arg(&group.len).arg(&group.slot);
        b.arg(&tables.sorted_tokens)
            .arg(&tables.sorted_weights)
            .arg(&tables.slot_tables);
        b.arg(&st).arg(&expand_vec);
        let col_blocks = site.out_features.div_ceil(EXPAND_THREADS as usize);
        let shared = tile * site.max_rank * std::mem::size_of::<f32>();
        // SAFETY: matches `lora_expand_<kind>_<T>`; y has `y_stride` columns per row and
        // the dynamic shared memory holds `tile` rows of the largest rank.
        unsafe { b.launch(grid(group.count, col_blocks, EXPAND_THREADS, shared)?) }?;
        Ok(())
    }

    pub fn elem_bytes(&self) -> usize {
        match self.suffix {
            "f32" => 4,
            _ => 2,
        }
    }
}

/// Per-step attention metadata on the device (see paged_attention.cu).
#[derive(Clone, Copy, Debug)]
pub struct AttentionMeta {
    pub positions: u64,
    pub row_chunk: u64,
    pub block_tables: u64,
    pub kv_slot: u64,
    pub max_blocks: usize,
    pub block_size: usize,
}
