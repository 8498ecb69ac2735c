// Batched LoRA kernels for the CUDA backend (the CPU twins are cpu.rs / cpu/avx2.rs;
// the oracle for both is reference.rs). Semantics, per site, for every adapter entry
// (slot s, weight w) of token t:
//   shrink: h[t, r]            = sum_i A_s[r, i] * x[t, i]            (f32 accumulation)
//   expand: y[t, y_off + o]   += w * scale_s * sum_r B_s[o, r] * h[t, r]
// The work is described by the step's segments (runs of `sorted_tokens` sharing a slot,
// built once per step on the host from `LoraBatch`): SGMV kernels take a tile of a
// segment's tokens per block and reuse each weight row across the tile (prefill, or
// many decode rows of one adapter); BGMV kernels take one token per block (decode rows
// of distinct adapters). Both read the same per-slot descriptor tables, so a token's
// result does not depend on which kernel ran it (the reduction order per output element
// is fixed: lane-strided partial sums, then a fixed shuffle tree).
//
// Adapter weights are addressed through `slot_tables[slot][site]` (a SiteDesc per layer
// and site, uploaded once per adapter version); `a == 0` means the slot has no weights
// at the site and its tokens are skipped. Ranks are never padded: blocks past a slot's
// rank return at once. Tokens of slot -1 never appear in a segment.
#include "model/backend/cuda/numeric.cuh"

struct SiteDesc {
    unsigned long long a;  // [rank, in] row-major, element type T
    unsigned long long b;  // [out, rank] row-major, element type T
    int rank;
    float scale;
};

// Elements of T in one 16-byte load.
constexpr int SHRINK_WARPS = 4;  // rank rows per block
constexpr int EXPAND_THREADS = 256;  // output columns per block

// The descriptor of `slot` at `site` (layer * 7 + site index).
__device__ __forceinline__ SiteDesc site_desc(const unsigned long long* slot_tables, int slot,
                                              int site) {
    const SiteDesc* table = reinterpret_cast<const SiteDesc*>(slot_tables[slot]);
    return table[site];
}

// h[t, r] for the tokens of one segment (grid.x) and rank rows blockIdx.y * WARPS + warp.
// `vec` is nonzero when `in_features` is a multiple of 16 bytes of T and the rows of x
// and A are 16-byte aligned (checked on the host).
template <typename T, int TILE>
__device__ void shrink(const T* __restrict__ x, int in_features, float* __restrict__ h,
                       int h_stride, const int* __restrict__ seg_start,
                       const int* __restrict__ seg_len, const int* __restrict__ seg_slot,
                       const unsigned int* __restrict__ sorted_tokens,
                       const unsigned long long* __restrict__ slot_tables, int site, int vec) {
    const int seg = blockIdx.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = blockIdx.y * SHRINK_WARPS + warp;
    const SiteDesc d = site_desc(slot_tables, seg_slot[seg], site);
    if (d.a == 0 || r >= d.rank) return;
    const T* a_row = reinterpret_cast<const T*>(d.a) + (size_t)r * in_features;
    const int start = seg_start[seg], len = seg_len[seg];
    constexpr int N = Vec16<T>::N;
    for (int t0 = 0; t0 < len; t0 += TILE) {
        const int tile = min(TILE, len - t0);
        const T* xs[TILE];
        float acc[TILE];
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            acc[j] = 0.f;
            xs[j] = x + (size_t)sorted_tokens[start + t0 + min(j, tile - 1)] * in_features;
        }
        if (vec) {
            // Unrolled so each lane keeps several 16-byte loads of A in flight.
#pragma unroll 4
            for (int k = lane * N; k < in_features; k += 32 * N) {
                float a[N];
                load16(a_row + k, a);
#pragma unroll
                for (int j = 0; j < TILE; ++j) {
                    if (j >= tile) break;
                    float xv[N];
                    load16(xs[j] + k, xv);
#pragma unroll
                    for (int i = 0; i < N; ++i) acc[j] = fmaf(a[i], xv[i], acc[j]);
                }
            }
        } else {
            for (int k = lane; k < in_features; k += 32) {
                const float a = to_f(a_row[k]);
#pragma unroll
                for (int j = 0; j < TILE; ++j) {
                    if (j >= tile) break;
                    acc[j] = fmaf(a, to_f(xs[j][k]), acc[j]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            if (j >= tile) break;
            const float s = warp_sum(acc[j]);
            if (lane == 0) h[(size_t)sorted_tokens[start + t0 + j] * h_stride + r] = s;
        }
    }
}

// y[t, y_offset + o] += w * scale * sum_r B[o, r] h[t, r] for one segment (grid.x) and
// columns blockIdx.y * EXPAND_THREADS + thread. Dynamic shared memory: TILE * h_stride
// floats (the tile's h rows). `vec` is nonzero when every B starts 16-byte aligned; rows
// are then aligned for the ranks that are a multiple of 16 bytes of T.
template <typename T, int TILE>
__device__ void expand(T* __restrict__ y, int y_stride, int y_offset, int out_features,
                       const float* __restrict__ h, int h_stride,
                       const int* __restrict__ seg_start, const int* __restrict__ seg_len,
                       const int* __restrict__ seg_slot,
                       const unsigned int* __restrict__ sorted_tokens,
                       const float* __restrict__ sorted_weights,
                       const unsigned long long* __restrict__ slot_tables, int site, int vec) {
    extern __shared__ float hs[];
    const int seg = blockIdx.x;
    const SiteDesc d = site_desc(slot_tables, seg_slot[seg], site);
    if (d.a == 0) return;  // uniform across the block: no barrier is skipped by some threads
    const int rank = d.rank;
    const bool vec_rows = vec && rank % Vec16<T>::N == 0;  // B rows 16-byte aligned
    const int o = blockIdx.y * EXPAND_THREADS + threadIdx.x;
    const T* b_row = reinterpret_cast<const T*>(d.b) + (size_t)min(o, out_features - 1) * rank;
    const int start = seg_start[seg], len = seg_len[seg];
    constexpr int N = Vec16<T>::N;
    for (int t0 = 0; t0 < len; t0 += TILE) {
        const int tile = min(TILE, len - t0);
        for (int i = threadIdx.x; i < tile * rank; i += blockDim.x) {
            const int j = i / rank, r = i % rank;
            hs[j * rank + r] = h[(size_t)sorted_tokens[start + t0 + j] * h_stride + r];
        }
        __syncthreads();
        if (o < out_features) {
            float acc[TILE];
#pragma unroll
            for (int j = 0; j < TILE; ++j) acc[j] = 0.f;
            if (vec_rows) {
#pragma unroll 4
                for (int r = 0; r < rank; r += N) {
                    float bv[N];
                    load16(b_row + r, bv);
#pragma unroll
                    for (int j = 0; j < TILE; ++j) {
                        if (j >= tile) break;
#pragma unroll
                        for (int i = 0; i < N; ++i) acc[j] = fmaf(bv[i], hs[j * rank + r + i], acc[j]);
                    }
                }
            } else {
                for (int r = 0; r < rank; ++r) {
                    const float bv = to_f(b_row[r]);
#pragma unroll
                    for (int j = 0; j < TILE; ++j) {
                        if (j >= tile) break;
                        acc[j] = fmaf(bv, hs[j * rank + r], acc[j]);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < TILE; ++j) {
                if (j >= tile) break;
                const int e = start + t0 + j;
                T* dst = y + (size_t)sorted_tokens[e] * y_stride + y_offset + o;
                *dst = from_f<T>(to_f(*dst) + sorted_weights[e] * d.scale * acc[j]);
            }
        }
        __syncthreads();
    }
}

constexpr int SGMV_TILE = 8;

#define LORA_KERNELS(T, SUFFIX)                                                                 \
    extern "C" __global__ void lora_shrink_sgmv_##SUFFIX(                                       \
        const T* x, int in_features, float* h, int h_stride, const int* seg_start,              \
        const int* seg_len, const int* seg_slot, const unsigned int* sorted_tokens,             \
        const unsigned long long* slot_tables, int site, int vec) {                             \
        shrink<T, SGMV_TILE>(x, in_features, h, h_stride, seg_start, seg_len, seg_slot,         \
                             sorted_tokens, slot_tables, site, vec);                            \
    }                                                                                           \
    extern "C" __global__ void lora_shrink_bgmv_##SUFFIX(                                       \
        const T* x, int in_features, float* h, int h_stride, const int* seg_start,              \
        const int* seg_len, const int* seg_slot, const unsigned int* sorted_tokens,             \
        const unsigned long long* slot_tables, int site, int vec) {                             \
        shrink<T, 1>(x, in_features, h, h_stride, seg_start, seg_len, seg_slot, sorted_tokens,  \
                     slot_tables, site, vec);                                                   \
    }                                                                                           \
    extern "C" __global__ void lora_expand_sgmv_##SUFFIX(                                       \
        T* y, int y_stride, int y_offset, int out_features, const float* h, int h_stride,       \
        const int* seg_start, const int* seg_len, const int* seg_slot,                          \
        const unsigned int* sorted_tokens, const float* sorted_weights,                         \
        const unsigned long long* slot_tables, int site, int vec) {                             \
        expand<T, SGMV_TILE>(y, y_stride, y_offset, out_features, h, h_stride, seg_start,       \
                             seg_len, seg_slot, sorted_tokens, sorted_weights, slot_tables,     \
                             site, vec);                                                        \
    }                                                                                           \
    extern "C" __global__ void lora_expand_bgmv_##SUFFIX(                                       \
        T* y, int y_stride, int y_offset, int out_features, const float* h, int h_stride,       \
        const int* seg_start, const int* seg_len, const int* seg_slot,                          \
        const unsigned int* sorted_tokens, const float* sorted_weights,                         \
        const unsigned long long* slot_tables, int site, int vec) {                             \
        expand<T, 1>(y, y_stride, y_offset, out_features, h, h_stride, seg_start, seg_len,      \
                     seg_slot, sorted_tokens, sorted_weights, slot_tables, site, vec);          \
    }

LORA_KERNELS(float, f32)
LORA_KERNELS(__half, f16)
LORA_KERNELS(__nv_bfloat16, bf16)
