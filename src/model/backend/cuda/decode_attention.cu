// Split decode attention (the host port of its work partition and merge order is
// ../plan/decode_attention.rs, tested against plain attention on any machine; the CPU
// backend's attention is its oracle on a GPU). Same semantics as paged_attention.cu's
// kernel: row t attends to its own sequence's positions first..=positions[t] (the last
// `window` of them on a sliding layer), with the scale and soft-cap given.
//
// Work: one block per (row, KV head, split of SPLIT_POSITIONS positions). The block
// serves all `group` query heads of its KV head, so each K and V row is read once for
// all of them, in 16-byte loads: `lanes` lanes share one position (lane l holds chunks
// l, l + lanes, ... of VEC elements of the head), a warp takes 32 / lanes positions at a
// time, DEC_WARPS warps stride over the split. Each lane group keeps an online softmax
// per query head; the block merges its lane groups in a fixed order and, with one split,
// writes the output, else an unnormalised partial (max, sum, acc) that
// `decode_attention_merge` combines over the splits in split order. The splits are fixed
// by position, not by the batch, so a row's result never depends on what else is in the
// step. Requires head_dim / VEC a power of two and group <= MAX_GROUP (the host checks).
#include "model/backend/cuda/numeric.cuh"

constexpr int DEC_WARPS = 4;
constexpr int MAX_GROUP = 8;
constexpr int SPLIT_POSITIONS = 512;
constexpr int LANE_DIMS = 8;  // head_dim <= 256: at most 8 values per lane
// Lane groups of a block times head_dim is at most DEC_WARPS * 32 * LANE_DIMS.
constexpr int MERGE_FLOATS = DEC_WARPS * 32 * LANE_DIMS;

template <typename T>
__device__ void decode_attention(T* out, float* partials, const T* q, const T* k_cache,
                                 const T* v_cache, const int* positions, const int* row_chunk,
                                 const int* block_tables, int max_blocks, int block_size,
                                 int num_heads, int num_kv_heads, int head_dim, float scale,
                                 float softcap, int window, int num_splits) {
    constexpr int VEC = Vec16<T>::N;
    __shared__ float s_m[DEC_WARPS * 32][MAX_GROUP];
    __shared__ float s_l[DEC_WARPS * 32][MAX_GROUP];
    __shared__ float s_acc[MAX_GROUP * MERGE_FLOATS];
    const int t = blockIdx.x, g = blockIdx.y, split = blockIdx.z;
    const int group = num_heads / num_kv_heads;
    const int n = head_dim / VEC;
    const int lanes = n < 32 ? n : 32;
    const int chunks = n / lanes;
    const int dims = chunks * VEC;  // values per lane
    const int per_warp = 32 / lanes;
    const int groups = DEC_WARPS * per_warp;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / lanes, sl = lane % lanes;
    const int r = warp * per_warp + sub;  // this lane group's index in the block
    const int last = positions[t];
    const int first = window > 0 ? max(0, last + 1 - window) : 0;
    const int lo = max(first, split * SPLIT_POSITIONS);
    const int hi = min(last + 1, (split + 1) * SPLIT_POSITIONS);
    const int kv_width = num_kv_heads * head_dim;
    float qv[MAX_GROUP][LANE_DIMS], acc[MAX_GROUP][LANE_DIMS], m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < LANE_DIMS; ++i) acc[h][i] = qv[h][i] = 0.f;
        if (h >= group) continue;
        const T* qrow = q + (size_t)t * num_heads * head_dim + (size_t)(g * group + h) * head_dim;
#pragma unroll
        for (int c = 0; c < LANE_DIMS / VEC; ++c) {
            if (c >= chunks) break;
            float v[VEC];
            load16(qrow + (c * lanes + sl) * VEC, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) qv[h][c * VEC + e] = v[e] * scale;
        }
    }
    const int* table = block_tables + (size_t)row_chunk[t] * max_blocks;
    // Every lane runs every iteration (uniform trip count): the shuffles need the whole
    // warp. A lane group past `hi` loads a valid row and ignores it.
    for (int base = lo + warp * per_warp; base < hi; base += DEC_WARPS * per_warp) {
        const int p = base + sub;
        const bool valid = p < hi;
        const int pc = valid ? p : hi - 1;
        const size_t slot = (size_t)table[pc / block_size] * block_size + pc % block_size;
        const T* krow = k_cache + slot * kv_width + (size_t)g * head_dim;
        const T* vrow = v_cache + slot * kv_width + (size_t)g * head_dim;
        float kf[LANE_DIMS], vf[LANE_DIMS];
#pragma unroll
        for (int c = 0; c < LANE_DIMS / VEC; ++c) {
            if (c >= chunks) break;
            load16(krow + (c * lanes + sl) * VEC, kf + c * VEC);
            load16(vrow + (c * lanes + sl) * VEC, vf + c * VEC);
        }
#pragma unroll
        for (int h = 0; h < MAX_GROUP; ++h) {
            if (h >= group) break;
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < LANE_DIMS; ++i)
                if (i < dims) dot = fmaf(qv[h][i], kf[i], dot);
            for (int off = lanes / 2; off > 0; off >>= 1)
                dot += __shfl_xor_sync(0xffffffffu, dot, off);
            if (!valid) continue;
            const float s = softcap > 0.f ? tanhf(dot / softcap) * softcap : dot;
            const float m_new = fmaxf(m[h], s);
            const float corr = expf(m[h] - m_new), e = expf(s - m_new);
            l[h] = l[h] * corr + e;
#pragma unroll
            for (int i = 0; i < LANE_DIMS; ++i)
                if (i < dims) acc[h][i] = acc[h][i] * corr + e * vf[i];
            m[h] = m_new;
        }
    }
    // Lane group r's state to shared memory: dims of lane sl at their head positions.
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        if (h >= group) break;
        if (sl == 0) {
            s_m[r][h] = m[h];
            s_l[r][h] = l[h];
        }
#pragma unroll
        for (int i = 0; i < LANE_DIMS; ++i) {
            if (i >= dims) break;
            const int d = ((i / VEC) * lanes + sl) * VEC + i % VEC;
            s_acc[(r * MAX_GROUP + h) * head_dim + d] = acc[h][i];
        }
    }
    __syncthreads();
    // Merge the lane groups in order 0..groups, one (head, dim) per thread.
    for (int idx = threadIdx.x; idx < group * head_dim; idx += blockDim.x) {
        const int h = idx / head_dim, d = idx % head_dim;
        float big = -INFINITY;
        for (int j = 0; j < groups; ++j)
            if (s_l[j][h] > 0.f) big = fmaxf(big, s_m[j][h]);
        float total = 0.f, v = 0.f;
        for (int j = 0; j < groups; ++j) {
            if (!(s_l[j][h] > 0.f)) continue;
            const float f = expf(s_m[j][h] - big);
            total += s_l[j][h] * f;
            v += s_acc[(j * MAX_GROUP + h) * head_dim + d] * f;
        }
        const int head = g * group + h;
        if (num_splits == 1) {
            out[(size_t)t * num_heads * head_dim + (size_t)head * head_dim + d] =
                from_f<T>(total > 0.f ? v / total : 0.f);
        } else {
            float* part = partials + ((size_t)(t * num_heads + head) * num_splits + split) *
                                         (head_dim + 2);
            if (d == 0) {
                part[0] = big;
                part[1] = total;
            }
            part[2 + d] = v;
        }
    }
}

// Combines the splits of row blockIdx.x, head blockIdx.y in split order (empty splits,
// whose sum is 0, are skipped).
template <typename T>
__device__ void decode_attention_merge(T* out, const float* partials, int num_heads,
                                       int head_dim, int num_splits) {
    const int t = blockIdx.x, head = blockIdx.y;
    const float* parts = partials + (size_t)(t * num_heads + head) * num_splits * (head_dim + 2);
    float big = -INFINITY;
    for (int s = 0; s < num_splits; ++s) {
        const float* p = parts + (size_t)s * (head_dim + 2);
        if (p[1] > 0.f) big = fmaxf(big, p[0]);
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float total = 0.f, v = 0.f;
        for (int s = 0; s < num_splits; ++s) {
            const float* p = parts + (size_t)s * (head_dim + 2);
            if (!(p[1] > 0.f)) continue;
            const float f = expf(p[0] - big);
            total += p[1] * f;
            v += p[2 + d] * f;
        }
        out[(size_t)t * num_heads * head_dim + (size_t)head * head_dim + d] =
            from_f<T>(total > 0.f ? v / total : 0.f);
    }
}

#define DECODE_ATTENTION_KERNELS(T, SUFFIX)                                                    \
    extern "C" __global__ void decode_attention_##SUFFIX(                                      \
        T* out, float* partials, const T* q, const T* k_cache, const T* v_cache,               \
        const int* positions, const int* row_chunk, const int* block_tables, int max_blocks,   \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale,            \
        float softcap, int window, int num_splits) {                                           \
        decode_attention<T>(out, partials, q, k_cache, v_cache, positions, row_chunk,          \
                            block_tables, max_blocks, block_size, num_heads, num_kv_heads,     \
                            head_dim, scale, softcap, window, num_splits);                     \
    }                                                                                          \
    extern "C" __global__ void decode_attention_merge_##SUFFIX(                                \
        T* out, const float* partials, int num_heads, int head_dim, int num_splits) {          \
        decode_attention_merge<T>(out, partials, num_heads, head_dim, num_splits);             \
    }

DECODE_ATTENTION_KERNELS(float, f32)
DECODE_ATTENTION_KERNELS(__half, f16)
DECODE_ATTENTION_KERNELS(__nv_bfloat16, bf16)
