// Fused row-wise kernels of the CUDA backend (the CPU backend's composition of the same
// operations is their oracle): the residual add with the RMS norm that follows it, and
// the gated activations of the MLP read straight from the [gate | up] rows (no column
// copies). One block per row; every value is computed in f32 and rounded once on store,
// except the residual sum, which is stored in T before it is normed (as the unfused
// add then norm does). The norm's reduction order is fixed (thread-strided partial sums,
// a warp shuffle tree, then the warps in order), so a row's result never depends on the
// batch.
#include "model/backend/cuda/numeric.cuh"

constexpr int FUSED_THREADS = 256;

// x[t] += y[t], then out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w.
template <typename T>
__device__ void add_rms_norm(T* x, const T* y, const T* w, T* out, int cols, float eps) {
    __shared__ float s_sum[FUSED_THREADS / 32];
    const int t = blockIdx.x;
    T* xr = x + (size_t)t * cols;
    const T* yr = y + (size_t)t * cols;
    float sq = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const T sum = from_f<T>(to_f(xr[j]) + to_f(yr[j]));
        xr[j] = sum;
        const float v = to_f(sum);
        sq = fmaf(v, v, sq);
    }
    sq = warp_sum(sq);
    if (threadIdx.x % 32 == 0) s_sum[threadIdx.x / 32] = sq;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < FUSED_THREADS / 32; ++i) total += s_sum[i];
    const float inv = rsqrtf(total / cols + eps);
    T* orow = out + (size_t)t * cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        orow[j] = from_f<T>(to_f(xr[j]) * inv * to_f(w[j]));
}

// out[t, j] = act(gate_up[t, j]) * gate_up[t, inter + j]; act 0: SiLU, 1: GELU (tanh).
template <typename T>
__device__ void gated(const T* gate_up, T* out, int inter, int act) {
    const int t = blockIdx.x;
    const T* row = gate_up + (size_t)t * 2 * inter;
    for (int j = threadIdx.x; j < inter; j += blockDim.x) {
        const float g = to_f(row[j]), u = to_f(row[inter + j]);
        float a;
        if (act == 0) {
            a = g / (1.f + expf(-g));
        } else {
            const float c = 0.7978845608028654f;  // sqrt(2 / pi)
            a = 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
        }
        out[(size_t)t * inter + j] = from_f<T>(a * u);
    }
}

#define FUSED_KERNELS(T, SUFFIX)                                                          \
    extern "C" __global__ void add_rms_norm_##SUFFIX(T* x, const T* y, const T* w,        \
                                                     T* out, int cols, float eps) {       \
        add_rms_norm<T>(x, y, w, out, cols, eps);                                         \
    }                                                                                     \
    extern "C" __global__ void gated_##SUFFIX(const T* gate_up, T* out, int inter,        \
                                              int act) {                                  \
        gated<T>(gate_up, out, inter, act);                                               \
    }

FUSED_KERNELS(float, f32)
FUSED_KERNELS(__half, f16)
FUSED_KERNELS(__nv_bfloat16, bf16)
