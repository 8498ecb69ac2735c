//! The split decode attention kernel (`cuda/decode_attention.cu`) on the host: its
//! geometry (which lanes hold which dimensions, how many positions a warp takes, how many
//! splits a capacity launches) and a port of its work partition and merge order, step for
//! step, so that the index math is tested on any machine against plain attention.
//!
//! Invariants (the kernel's): a row's result is a function of its own query, its own
//! sequence's K/V and the constants here, never of the batch or the grid's split count:
//! splits are fixed runs of [`SPLIT_POSITIONS`] positions, empty splits and lane groups
//! (sum 0) are skipped in every merge, and every merge runs in index order.
use crate::model::backend::HeadShape;

/// Must match `DEC_WARPS` in decode_attention.cu.
pub const DEC_WARPS: usize = 4;
/// Must match `MAX_GROUP` (query heads per KV head).
pub const MAX_GROUP: usize = 8;
/// Must match `SPLIT_POSITIONS`.
pub const SPLIT_POSITIONS: usize = 512;
/// Must match `LANE_DIMS` (values of a head one lane holds).
pub const LANE_DIMS: usize = 8;

/// How one block of the kernel lays a head out over its lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeGeometry {
    /// Elements per 16-byte load.
    pub vec: usize,
    /// Lanes that share one position.
    pub lanes: usize,
    /// 16-byte chunks per lane.
    pub chunks: usize,
    /// Positions a warp takes at once.
    pub per_warp: usize,
    /// Query heads per KV head.
    pub group: usize,
}

impl DecodeGeometry {
    /// The geometry for `shape` with `elem_bytes`-byte elements, or None where the kernel
    /// does not apply (head_dim / vec not a power of two, or a group over [`MAX_GROUP`]):
    /// such layers keep the per-(row, head) kernel.
    pub fn new(shape: &HeadShape, elem_bytes: usize) -> Option<Self> {
        let vec = 16 / elem_bytes.max(1);
        if shape.num_kv_heads == 0 || !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            return None;
        }
        let group = shape.num_heads / shape.num_kv_heads;
        let n = shape.head_dim / vec;
        if group > MAX_GROUP || n * vec != shape.head_dim || !n.is_power_of_two() {
            return None;
        }
        let lanes = n.min(32);
        let chunks = n / lanes;
        (chunks * vec <= LANE_DIMS).then_some(Self {
            vec,
            lanes,
            chunks,
            per_warp: 32 / lanes,
            group,
        })
    }

    /// Lane groups of a block (each with its own online softmax).
    pub fn lane_groups(&self) -> usize {
        DEC_WARPS * self.per_warp
    }

    /// The head dimension lane `sl` of a lane group holds as its value `i`.
    pub fn dim(&self, sl: usize, i: usize) -> usize {
        ((i / self.vec) * self.lanes + sl) * self.vec + i % self.vec
    }
}

/// Splits a grid over sequences of at most `max_positions` positions launches.
pub fn num_splits(max_positions: usize) -> usize {
    max_positions.div_ceil(SPLIT_POSITIONS).max(1)
}

/// One softmax state: running max, sum and unnormalised accumulator.
#[derive(Clone)]
struct State {
    m: f32,
    l: f32,
    acc: Vec<f32>,
}

/// Merges `states` in order, skipping empty ones: (max, sum, acc), as both merges do.
fn merge(states: &[State], width: usize) -> State {
    let big = states
        .iter()
        .filter(|s| s.l > 0.0)
        .fold(f32::NEG_INFINITY, |m, s| m.max(s.m));
    let mut out = State {
        m: big,
        l: 0.0,
        acc: vec![0.0; width],
    };
    for s in states.iter().filter(|s| s.l > 0.0) {
        let f = (s.m - big).exp();
        out.l += s.l * f;
        for (o, a) in out.acc.iter_mut().zip(&s.acc) {
            *o += a * f;
        }
    }
    out
}

/// One row's attention output (`[num_heads * head_dim]`) as the kernel computes it, for
/// a query row `q` and `key(p)` / `value(p)` the KV-head-major rows of position `p`
/// (`[num_kv_heads * head_dim]`), over a grid of `splits` splits.
pub fn attend_row<'a>(
    geo: &DecodeGeometry,
    shape: &HeadShape,
    q: &[f32],
    last: usize,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    splits: usize,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let first = shape.first_position(last);
    let mut out = vec![0.0; shape.num_heads * hd];
    for g in 0..shape.num_kv_heads {
        let parts: Vec<Vec<State>> = (0..splits)
            .map(|split| {
                let lo = first.max(split * SPLIT_POSITIONS);
                let hi = (last + 1).min((split + 1) * SPLIT_POSITIONS);
                block(geo, shape, q, g, lo, hi, &key, &value)
            })
            .collect();
        for h in 0..geo.group {
            let head = g * geo.group + h;
            let per_split: Vec<State> = parts.iter().map(|p| p[h].clone()).collect();
            let merged = if splits == 1 {
                per_split[0].clone()
            } else {
                merge(&per_split, hd)
            };
            for d in 0..hd {
                out[head * hd + d] = if merged.l > 0.0 {
                    merged.acc[d] / merged.l
                } else {
                    0.0
                };
            }
        }
    }
    out
}

/// One block (KV head `g`, positions `lo..hi`): every lane group's online softmax, then
/// their merge in order; per query head of the group.
#[allow(clippy::too_many_arguments)]
fn block<'a>(
    geo: &DecodeGeometry,
    shape: &HeadShape,
    q: &[f32],
    g: usize,
    lo: usize,
    hi: usize,
    key: &impl Fn(usize) -> &'a [f32],
    value: &impl Fn(usize) -> &'a [f32],
) -> Vec<State> {
    let hd = shape.head_dim;
    let dims = geo.chunks * geo.vec;
    let qh = |h: usize| &q[(g * geo.group + h) * hd..][..hd];
    let empty = State {
        m: f32::NEG_INFINITY,
        l: 0.0,
        acc: vec![0.0; hd],
    };
    // states[r][h]: lane group r's state for head h, acc laid out by head dimension.
    let mut states = vec![vec![empty; geo.group]; geo.lane_groups()];
    let stride = DEC_WARPS * geo.per_warp;
    for warp in 0..DEC_WARPS {
        for sub in 0..geo.per_warp {
            let r = warp * geo.per_warp + sub;
            let mut p = lo + warp * geo.per_warp + sub;
            while p < hi {
                let (k, v) = (&key(p)[g * hd..][..hd], &value(p)[g * hd..][..hd]);
                for (h, state) in states[r].iter_mut().enumerate() {
                    // Each lane's partial dot over its values in order, then the xor tree.
                    let partial: Vec<f32> = (0..geo.lanes)
                        .map(|sl| {
                            (0..dims).fold(0.0f32, |acc, i| {
                                let d = geo.dim(sl, i);
                                (qh(h)[d] * shape.scale).mul_add(k[d], acc)
                            })
                        })
                        .collect();
                    let dot = xor_tree(partial);
                    let s = match shape.softcap {
                        Some(c) if c > 0.0 => (dot / c).tanh() * c,
                        _ => dot,
                    };
                    let m_new = state.m.max(s);
                    let (corr, e) = ((state.m - m_new).exp(), (s - m_new).exp());
                    state.l = state.l * corr + e;
                    for (a, &vd) in state.acc.iter_mut().zip(v) {
                        *a = *a * corr + e * vd;
                    }
                    state.m = m_new;
                }
                p += stride;
            }
        }
    }
    (0..geo.group)
        .map(|h| {
            let per_group: Vec<State> = states.iter().map(|s| s[h].clone()).collect();
            merge(&per_group, hd)
        })
        .collect()
}

/// The kernel's shuffle reduction over `lanes` lanes (offsets lanes/2, ..., 1): every
/// lane ends with the same value; lane 0's is returned.
fn xor_tree(mut v: Vec<f32>) -> f32 {
    let mut off = v.len() / 2;
    while off > 0 {
        v = (0..v.len()).map(|l| v[l] + v[l ^ off]).collect();
        off /= 2;
    }
    v[0]
}

#[cfg(test)]
#[path = "decode_attention_tests.rs"]
mod tests;
