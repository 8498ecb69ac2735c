//! Every launch of our CUDA kernels as data: the kernel, its grid, block and dynamic
//! shared memory, and its arguments in the kernel's parameter order, each named as the
//! `.cu` source names the parameter. A pointer argument is either an operand the caller
//! binds at launch (an activation, a cache, a table) or an array of the step's metadata
//! buffer at its word offset; scalars are values.
//!
//! Invariants: a launch is a function of the metadata layout and the model's shapes only
//! (see `super`); grids cover the layout's capacities, and a thread block given an unused
//! entry (an empty segment of the null adapter) returns at once. The tests parse the `.cu`
//! sources and check every planned launch against its kernel's parameter list (count,
//! kinds and names), so a launch cannot push its arguments out of order unnoticed.
use super::decode_attention::{num_splits, DecodeGeometry, DEC_WARPS};
use super::meta::{GroupLayout, MetaLayout, SGMV_TILE};
use crate::model::backend::HeadShape;
use anyhow::{ensure, Context, Result};

/// Threads per block of the row-wise kernels (rope, kv_write).
pub const ROW_THREADS: u32 = 256;
/// Must match `ATTN_WARPS` in paged_attention.cu.
pub const ATTN_WARPS: u32 = 4;
/// Must match `MAX_DIMS_PER_LANE * 32` in paged_attention.cu.
pub const MAX_HEAD_DIM: usize = 256;
/// Must match `SHRINK_WARPS` / `EXPAND_THREADS` in sgmv.cu.
pub const SHRINK_WARPS: u32 = 4;
pub const EXPAND_THREADS: u32 = 256;

/// Which compiled module a kernel is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Module {
    /// `paged_attention.cu`: rope, kv_write, paged_attention.
    Attention,
    /// `sgmv.cu`: the LoRA shrink and expand kernels.
    Lora,
    /// `decode_attention.cu`: split decode attention and its merge.
    DecodeAttention,
    /// `fused.cu`: the residual add with its RMS norm, the gated activations.
    Fused,
}

/// One kernel argument, named as the kernel's parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// A device pointer the caller binds by this name at launch.
    Bound(&'static str),
    /// The array of the step's metadata at this word offset.
    Meta {
        name: &'static str,
        offset: usize,
    },
    I32 {
        name: &'static str,
        value: i32,
    },
    /// An f32, by its bits (so launches compare exactly).
    F32 {
        name: &'static str,
        bits: u32,
    },
}

impl Arg {
    pub fn name(&self) -> &'static str {
        match *self {
            Arg::Bound(name)
            | Arg::Meta { name, .. }
            | Arg::I32 { name, .. }
            | Arg::F32 { name, .. } => name,
        }
    }

    fn int(name: &'static str, value: usize) -> Result<Self> {
        let value = i32::try_from(value).with_context(|| format!("{name} does not fit in i32"))?;
        Ok(Arg::I32 { name, value })
    }

    fn float(name: &'static str, value: f32) -> Self {
        Arg::F32 {
            name,
            bits: value.to_bits(),
        }
    }
}

/// One planned kernel launch. `kernel` lacks the element-type suffix (`_bf16`...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub module: Module,
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared: u32,
    pub args: Vec<Arg>,
}

fn dim(v: usize) -> Result<u32> {
    u32::try_from(v).context("a grid dimension does not fit in u32")
}

fn meta(name: &'static str, offset: usize) -> Arg {
    Arg::Meta { name, offset }
}

/// Rotates `x` (`[rows, heads * 2 * half]`, bound as `x`, with tables `cos` and `sin`) in
/// place at the step's positions.
pub fn rope(layout: &MetaLayout, heads: usize, half: usize) -> Result<Launch> {
    Ok(Launch {
        module: Module::Attention,
        kernel: "rope",
        grid: (dim(layout.capacity.rows)?, 1, 1),
        block: ROW_THREADS,
        shared: 0,
        args: vec![
            Arg::Bound("x"),
            Arg::Bound("cos"),
            Arg::Bound("sin"),
            meta("positions", layout.positions),
            Arg::int("heads", heads)?,
            Arg::int("half", half)?,
        ],
    })
}

/// Copies the step's `k`/`v` rows (`width` wide) into `k_cache`/`v_cache` at each
/// token's cache row.
pub fn kv_write(layout: &MetaLayout, width: usize) -> Result<Launch> {
    Ok(Launch {
        module: Module::Attention,
        kernel: "kv_write",
        grid: (dim(layout.capacity.rows)?, 1, 1),
        block: ROW_THREADS,
        shared: 0,
        args: vec![
            Arg::Bound("k"),
            Arg::Bound("v"),
            Arg::Bound("k_cache"),
            Arg::Bound("v_cache"),
            meta("kv_slot", layout.kv_slot),
            Arg::int("width", width)?,
        ],
    })
}

/// Paged attention of every row (`q` into `out`) over the caches.
pub fn attention(layout: &MetaLayout, block_size: usize, shape: HeadShape) -> Result<Launch> {
    ensure!(
        shape.head_dim <= MAX_HEAD_DIM
            && shape.num_kv_heads > 0
            && shape.num_heads.is_multiple_of(shape.num_kv_heads),
        "attention heads {shape:?} are not supported on CUDA (head_dim <= {MAX_HEAD_DIM})"
    );
    let c = layout.capacity;
    Ok(Launch {
        module: Module::Attention,
        kernel: "paged_attention",
        grid: (dim(c.rows)?, dim(shape.num_heads)?, 1),
        block: 32 * ATTN_WARPS,
        shared: 0,
        args: [
            vec![
                Arg::Bound("out"),
                Arg::Bound("q"),
                Arg::Bound("k_cache"),
                Arg::Bound("v_cache"),
            ],
            attention_args(layout, block_size, &shape)?,
        ]
        .concat(),
    })
}

/// The arguments both attention kernels take after their operands: the batch's
/// positions, chunks and block tables, and the heads' shape and options.
fn attention_args(layout: &MetaLayout, block_size: usize, shape: &HeadShape) -> Result<Vec<Arg>> {
    let c = layout.capacity;
    Ok(vec![
        meta("positions", layout.positions),
        meta("row_chunk", layout.row_chunk),
        meta("block_tables", layout.block_tables),
        Arg::int("max_blocks", c.max_blocks)?,
        Arg::int("block_size", block_size)?,
        Arg::int("num_heads", shape.num_heads)?,
        Arg::int("num_kv_heads", shape.num_kv_heads)?,
        Arg::int("head_dim", shape.head_dim)?,
        Arg::float("scale", shape.scale),
        Arg::float("softcap", shape.softcap.unwrap_or(0.0)),
        Arg::int("window", shape.window.unwrap_or(0))?,
    ])
}

/// The shapes of one LoRA site launch: input `x` (`[rows, in_features]`), output columns
/// `y_offset..y_offset + out_features` of `y` (`y_stride` wide), the site's index in the
/// adapters' descriptor tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraSiteShape {
    pub in_features: usize,
    pub y_stride: usize,
    pub y_offset: usize,
    pub out_features: usize,
    pub site: usize,
    /// Whether x's rows start 16-byte aligned (the shrink kernel's vector loads).
    pub x_aligned: bool,
    /// Bytes per element of the activations.
    pub elem_bytes: usize,
}

/// Shrink then expand-add of one site, for the SGMV group then the BGMV group (a group
/// of capacity zero launches nothing). Bound operands: `x`, `h` (`[rows, max_rank]` f32),
/// `y`.
pub fn lora(layout: &MetaLayout, site: &LoraSiteShape) -> Result<Vec<Launch>> {
    let mut out = Vec::with_capacity(4);
    let groups = [
        (
            &layout.sgmv,
            ["lora_shrink_sgmv", "lora_expand_sgmv"],
            SGMV_TILE,
        ),
        (&layout.bgmv, ["lora_shrink_bgmv", "lora_expand_bgmv"], 1),
    ];
    for (group, [shrink_kernel, expand_kernel], tile) in groups {
        if group.capacity == 0 || layout.capacity.max_rank == 0 {
            continue;
        }
        out.push(shrink(layout, group, shrink_kernel, site)?);
        out.push(expand(layout, group, expand_kernel, tile, site)?);
    }
    Ok(out)
}

fn segment_args(group: &GroupLayout, layout: &MetaLayout) -> [Arg; 4] {
    [
        meta("seg_start", group.start),
        meta("seg_len", group.len),
        meta("seg_slot", group.slot),
        meta("sorted_tokens", layout.sorted_tokens),
    ]
}

fn shrink(
    layout: &MetaLayout,
    group: &GroupLayout,
    kernel: &'static str,
    site: &LoraSiteShape,
) -> Result<Launch> {
    let lanes = 16 / site.elem_bytes.max(1);
    let vec = site.in_features.is_multiple_of(lanes) && site.x_aligned;
    let rank_blocks = layout.capacity.max_rank.div_ceil(SHRINK_WARPS as usize);
    let mut args = vec![
        Arg::Bound("x"),
        Arg::int("in_features", site.in_features)?,
        Arg::Bound("h"),
        Arg::int("h_stride", layout.capacity.max_rank)?,
    ];
    args.extend(segment_args(group, layout));
    args.extend([
        meta("slot_tables", layout.slot_tables),
        Arg::int("site", site.site)?,
        Arg::int("vec", usize::from(vec))?,
    ]);
    Ok(Launch {
        module: Module::Lora,
        kernel,
        grid: (dim(group.capacity)?, dim(rank_blocks)?, 1),
        block: 32 * SHRINK_WARPS,
        shared: 0,
        args,
    })
}

fn expand(
    layout: &MetaLayout,
    group: &GroupLayout,
    kernel: &'static str,
    tile: usize,
    site: &LoraSiteShape,
) -> Result<Launch> {
    let max_rank = layout.capacity.max_rank;
    let mut args = vec![
        Arg::Bound("y"),
        Arg::int("y_stride", site.y_stride)?,
        Arg::int("y_offset", site.y_offset)?,
        Arg::int("out_features", site.out_features)?,
        Arg::Bound("h"),
        Arg::int("h_stride", max_rank)?,
    ];
    args.extend(segment_args(group, layout));
    args.extend([
        meta("sorted_weights", layout.sorted_weights),
        meta("slot_tables", layout.slot_tables),
        Arg::int("site", site.site)?,
        // Adapter buffers align every B to 16 bytes.
        Arg::int("vec", 1)?,
    ]);
    let col_blocks = site.out_features.div_ceil(EXPAND_THREADS as usize);
    let shared = tile * max_rank * std::mem::size_of::<f32>();
    Ok(Launch {
        module: Module::Lora,
        kernel,
        grid: (dim(group.capacity)?, dim(col_blocks)?, 1),
        block: EXPAND_THREADS,
        shared: u32::try_from(shared).context("shared memory does not fit in u32")?,
        args,
    })
}

/// The split decode attention of every row (`q` into `out`, `partials` the f32 scratch
/// of [`decode_partials_len`]) and, when the grid has several splits, its merge; None
/// where the kernel does not apply to `shape` (see [`DecodeGeometry::new`]).
pub fn decode_attention(
    layout: &MetaLayout,
    block_size: usize,
    shape: HeadShape,
    elem_bytes: usize,
) -> Result<Option<Vec<Launch>>> {
    if shape.head_dim > MAX_HEAD_DIM || DecodeGeometry::new(&shape, elem_bytes).is_none() {
        return Ok(None);
    }
    let c = layout.capacity;
    let splits = num_splits(c.max_blocks * block_size);
    let attend = Launch {
        module: Module::DecodeAttention,
        kernel: "decode_attention",
        grid: (dim(c.rows)?, dim(shape.num_kv_heads)?, dim(splits)?),
        block: 32 * DEC_WARPS as u32,
        shared: 0,
        args: [
            vec![
                Arg::Bound("out"),
                Arg::Bound("partials"),
                Arg::Bound("q"),
                Arg::Bound("k_cache"),
                Arg::Bound("v_cache"),
            ],
            attention_args(layout, block_size, &shape)?,
            vec![Arg::int("num_splits", splits)?],
        ]
        .concat(),
    };
    let mut out = vec![attend];
    if splits > 1 {
        out.push(Launch {
            module: Module::DecodeAttention,
            kernel: "decode_attention_merge",
            grid: (dim(c.rows)?, dim(shape.num_heads)?, 1),
            block: 128,
            shared: 0,
            args: vec![
                Arg::Bound("out"),
                Arg::Bound("partials"),
                Arg::int("num_heads", shape.num_heads)?,
                Arg::int("head_dim", shape.head_dim)?,
                Arg::int("num_splits", splits)?,
            ],
        });
    }
    Ok(Some(out))
}

/// f32 values of the split attention's partials: (max, sum, acc) per row, head and
/// split (at least one, so the buffer can be allocated when there is one split).
pub fn decode_partials_len(layout: &MetaLayout, block_size: usize, shape: &HeadShape) -> usize {
    let c = layout.capacity;
    let splits = num_splits(c.max_blocks * block_size);
    if splits == 1 {
        return 1;
    }
    c.rows * shape.num_heads * splits * (shape.head_dim + 2)
}

/// Must match `FUSED_THREADS` in fused.cu.
pub const FUSED_THREADS: u32 = 256;

/// `x += y` then `out` = RMS norm of `x` with `w`, for `rows` rows of `cols`.
pub fn add_rms_norm(rows: usize, cols: usize, eps: f32) -> Result<Launch> {
    Ok(Launch {
        module: Module::Fused,
        kernel: "add_rms_norm",
        grid: (dim(rows)?, 1, 1),
        block: FUSED_THREADS,
        shared: 0,
        args: vec![
            Arg::Bound("x"),
            Arg::Bound("y"),
            Arg::Bound("w"),
            Arg::Bound("out"),
            Arg::int("cols", cols)?,
            Arg::float("eps", eps),
        ],
    })
}

/// The gated activation of the MLP, `act(gate) * up` from `[gate | up]` rows (`inter`
/// wide each): `gelu` picks GELU's tanh approximation over SiLU.
pub fn gated(rows: usize, inter: usize, gelu: bool) -> Result<Launch> {
    Ok(Launch {
        module: Module::Fused,
        kernel: "gated",
        grid: (dim(rows)?, 1, 1),
        block: FUSED_THREADS,
        shared: 0,
        args: vec![
            Arg::Bound("gate_up"),
            Arg::Bound("out"),
            Arg::int("inter", inter)?,
            Arg::int("act", usize::from(gelu))?,
        ],
    })
}
