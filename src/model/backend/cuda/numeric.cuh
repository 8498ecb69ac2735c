// Element conversions and reductions shared by our CUDA kernels (sgmv.cu,
// paged_attention.cu, decode_attention.cu): every kernel loads T (float, __half, __nv_bfloat16), accumulates
// in f32 and rounds once on store (round-to-nearest-even).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte load.
template <typename T> struct Vec16 { static constexpr int N = 16 / sizeof(T); };

// One 16-byte load of Vec16<T>::N elements (p 16-byte aligned), widened to f32.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) out[i] = to_f(e[i]);
}

// The sum over a warp, the same on every lane (a fixed xor-shuffle tree: deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
