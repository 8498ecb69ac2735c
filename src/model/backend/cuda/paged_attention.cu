// Attention-side kernels of the CUDA backend (the CPU twin is ../cpu/attention.rs and
// ../cpu/ops.rs, the oracle for these): rotary embedding at each token's position, the
// write of a step's K/V rows into the paged cache, and paged attention over the block
// tables with grouped-query heads.
//
// Layout: one cache per layer and K/V, `[num_blocks * block_size, kv_heads * head_dim]`;
// token t of the step lives in cache row `kv_slot[t]` (computed on the host from its
// sequence's block table, once per step). Row t of the step attends to positions
// 0..=positions[t] of its own sequence (chunk `row_chunk[t]`, whose block table is row
// `row_chunk[t]` of `block_tables`, `max_blocks` wide): prefill and decode rows go
// through the same kernel (no tiling across queries of one prefill chunk yet). Softmax
// and every accumulation are f32; the reduction order per (row, head) is fixed, so a
// row's output does not depend on what else is in the step.
#include "model/backend/cuda/numeric.cuh"

// Rotate-half RoPE in place: x is [T, heads * 2 * half]; cos/sin are [max_pos, half].
template <typename T>
__device__ void rope(T* x, const T* cos, const T* sin, const int* positions, int heads,
                     int half) {
    const int t = blockIdx.x;
    const size_t p = (size_t)positions[t];
    T* row = x + (size_t)t * heads * 2 * half;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int hd = i / half, j = i % half;
        T* head = row + (size_t)hd * 2 * half;
        const float c = to_f(cos[p * half + j]), s = to_f(sin[p * half + j]);
        const float x0 = to_f(head[j]), x1 = to_f(head[j + half]);
        head[j] = from_f<T>(x0 * c - x1 * s);
        head[j + half] = from_f<T>(x1 * c + x0 * s);
    }
}

// Copies row t of k and v (`width` wide) to row kv_slot[t] of the caches.
template <typename T>
__device__ void kv_write(const T* k, const T* v, T* k_cache, T* v_cache, const int* kv_slot,
                         int width) {
    const int t = blockIdx.x;
    const size_t dst = (size_t)kv_slot[t] * width, src = (size_t)t * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
    }
}

constexpr int ATTN_WARPS = 4;
constexpr int MAX_DIMS_PER_LANE = 8;  // head_dim <= 256

// One block per (row, head); warp w takes positions w, w + ATTN_WARPS, ...; lane l holds
// dimensions l, l + 32, ... of the head. Online softmax per warp, merged across warps in
// a fixed order.
template <typename T>
__device__ void attention(T* out, const T* q, const T* k_cache, const T* v_cache,
                          const int* positions, const int* row_chunk, const int* block_tables,
                          int max_blocks, int block_size, int num_heads, int num_kv_heads,
                          int head_dim, float scale, float softcap, int window) {
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][32 * MAX_DIMS_PER_LANE];
    const int t = blockIdx.x, hd = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kvh = hd / (num_heads / num_kv_heads);
    const int kv_width = num_kv_heads * head_dim;
    const int dims = (head_dim + 31) / 32;
    const T* qrow = q + (size_t)t * num_heads * head_dim + (size_t)hd * head_dim;
    float qv[MAX_DIMS_PER_LANE], acc[MAX_DIMS_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        qv[i] = (i < dims && d < head_dim) ? to_f(qrow[d]) * scale : 0.f;
        acc[i] = 0.f;
    }
    const int* table = block_tables + (size_t)row_chunk[t] * max_blocks;
    const int last = positions[t];
    // A sliding layer attends to the last `window` positions only (window 0: all).
    const int first = window > 0 ? max(0, last + 1 - window) : 0;
    float m = -INFINITY, l = 0.f;
    for (int p = first + warp; p <= last; p += ATTN_WARPS) {
        const size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
        const T* krow = k_cache + slot * kv_width + (size_t)kvh * head_dim;
        const T* vrow = v_cache + slot * kv_width + (size_t)kvh * head_dim;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (i < dims && d < head_dim) dot = fmaf(qv[i], to_f(krow[d]), dot);
        }
        const float raw = warp_sum(dot);
        // Soft-capped scores (Gemma 2): softcap * tanh(s / softcap); 0: none.
        const float s = softcap > 0.f ? tanhf(raw / softcap) * softcap : raw;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), e = expf(s - m_new);
        l = l * corr + e;
#pragma unroll
        for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (i < dims && d < head_dim) acc[i] = acc[i] * corr + e * to_f(vrow[d]);
        }
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MAX_DIMS_PER_LANE; ++i) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float big = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; ++w) big = fmaxf(big, s_m[w]);
    float total = 0.f;
    float f[ATTN_WARPS];
    for (int w = 0; w < ATTN_WARPS; ++w) {
        f[w] = s_l[w] > 0.f ? expf(s_m[w] - big) : 0.f;
        total += s_l[w] * f[w];
    }
    T* orow = out + (size_t)t * num_heads * head_dim + (size_t)hd * head_dim;
    for (int i = 0; i < dims; ++i) {
        const int d = lane + 32 * i;
        if (d >= head_dim) break;
        float v = 0.f;
        for (int w = 0; w < ATTN_WARPS; ++w) v += s_acc[w][d] * f[w];
        orow[d] = from_f<T>(v / total);
    }
}

#define ATTENTION_KERNELS(T, SUFFIX)                                                          \
    extern "C" __global__ void rope_##SUFFIX(T* x, const T* cos, const T* sin,                \
                                             const int* positions, int heads, int half) {     \
        rope<T>(x, cos, sin, positions, heads, half);                                         \
    }                                                                                         \
    extern "C" __global__ void kv_write_##SUFFIX(const T* k, const T* v, T* k_cache,          \
                                                 T* v_cache, const int* kv_slot, int width) { \
        kv_write<T>(k, v, k_cache, v_cache, kv_slot, width);                                  \
    }                                                                                         \
    extern "C" __global__ void paged_attention_##SUFFIX(                                      \
        T* out, const T* q, const T* k_cache, const T* v_cache, const int* positions,         \
        const int* row_chunk, const int* block_tables, int max_blocks, int block_size,        \
        int num_heads, int num_kv_heads, int head_dim, float scale, float softcap,            \
        int window) {                                                                         \
        attention<T>(out, q, k_cache, v_cache, positions, row_chunk, block_tables,            \
                     max_blocks, block_size, num_heads, num_kv_heads, head_dim, scale,        \
                     softcap, window);                                                        \
    }

ATTENTION_KERNELS(float, f32)
ATTENTION_KERNELS(__half, f16)
ATTENTION_KERNELS(__nv_bfloat16, bf16)
