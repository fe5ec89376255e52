// Device helpers shared by the kernels: dtype conversion, 16-byte vector row traversal, and
// warp/block reductions. float32 arithmetic throughout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "qadapter_kernels.h"

namespace qak {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// exp via the ex2 unit: the error is relative to x, which callers keep <= 0 (x = value - max).
// Host-callable too, as Lse is: tests/test_cuda_ext.py runs Lse's edge cases on the CPU.
__host__ __device__ __forceinline__ float fast_exp(float x) { return exp2f(x * kLog2e); }

// Elements of T in one 16-byte load.
template <typename T>
__host__ __device__ constexpr int vec_width() { return 16 / sizeof(T); }

template <int N>
using Width = std::integral_constant<int, N>;

template <typename T>
__device__ __forceinline__ void load16(const T* ptr, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(ptr);  // plain load: row step outputs may alias inputs
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < vec_width<T>(); ++j) out[j] = to_float(v[j]);
}

// Stores n floats as P at ptr; n == vec_width<T of the inputs> calls are 16-byte aligned.
template <typename P, int N>
__device__ __forceinline__ void store_n(P* ptr, const float* v) {
  constexpr int kBytes = N * sizeof(P);
  if constexpr (kBytes % 16 == 0) {
    P packed[N];
#pragma unroll
    for (int j = 0; j < N; ++j) packed[j] = from_float<P>(v[j]);
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k)
      reinterpret_cast<uint4*>(ptr)[k] = reinterpret_cast<const uint4*>(packed)[k];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) ptr[j] = from_float<P>(v[j]);
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Visits the columns [0, vocab) of one row of z and q, spread over the block's threads: a scalar
// head up to the first 16-byte boundary, 16-byte vectors, a scalar tail. f(col, zv, qv, Width<n>)
// sees n consecutive columns. row_start = row * vocab; vec_ok: every base pointer is 16-byte
// aligned (the row's head then aligns z, q and any output alike).
template <typename T, typename F>
__device__ __forceinline__ void for_each_col(const T* z, const T* q, int64_t row_start,
                                             int64_t vocab, bool vec_ok, F&& f) {
  constexpr int N = vec_width<T>();
  const T* zr = z + row_start;
  const T* qr = q + row_start;
  const int64_t to_boundary = (N - row_start % N) % N;
  const int64_t head = !vec_ok || to_boundary > vocab ? vocab : to_boundary;
  const int64_t nvec = (vocab - head) / N;
  for (int64_t col = threadIdx.x; col < head; col += blockDim.x) {
    const float zv = to_float(zr[col]), qv = to_float(qr[col]);
    f(col, &zv, &qv, Width<1>{});
  }
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const int64_t col = head + i * N;
    float zv[N], qv[N];
    load16(zr + col, zv);
    load16(qr + col, qv);
    f(col, zv, qv, Width<N>{});
  }
  for (int64_t col = head + nvec * N + threadIdx.x; col < vocab; col += blockDim.x) {
    const float zv = to_float(zr[col]), qv = to_float(qr[col]);
    f(col, &zv, &qv, Width<1>{});
  }
}

// Running log-sum-exp state: sum of exp(x - max). Non-finite inputs give what torch.logsumexp
// with the reference's rule gives (qadapter_kernels/reference.py, _logsumexp): a NaN or a +inf
// anywhere makes the value NaN, a row of only -inf gives -inf. fmaxf skips NaN, so a NaN is
// carried in the sum instead (exp(NaN - m) is NaN, and NaN * 0 stays NaN through every rescale);
// while the max is still -inf no exp is taken, so a NaN met then is put into the sum directly.
struct Lse {
  float max = -INFINITY;
  float sum = 0.f;

  // Adds n values with one rescale: n + 1 exponentials instead of 2n.
  template <int N>
  __host__ __device__ __forceinline__ void add(const float* x) {
    float m = max;
#pragma unroll
    for (int j = 0; j < N; ++j) m = fmaxf(m, x[j]);
    if (m == -INFINITY) {  // only -inf and NaN so far: nothing to add but a NaN
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (x[j] != x[j]) sum = x[j];
      return;
    }
    float s = sum * fast_exp(max - m);
#pragma unroll
    for (int j = 0; j < N; ++j) s += fast_exp(x[j] - m);
    max = m;
    sum = s;
  }

  __host__ __device__ __forceinline__ void merge(float other_max, float other_sum) {
    const float m = fmaxf(max, other_max);
    if (m == -INFINITY) {  // both empty: each sum is 0, or NaN if it met one
      sum += other_sum;
      return;
    }
    sum = sum * fast_exp(max - m) + other_sum * fast_exp(other_max - m);
    max = m;
  }

  // -inf + log(0) = -inf for a row of -inf; NaN whenever the sum is NaN.
  __host__ __device__ __forceinline__ float value() const { return max + logf(sum); }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ Lse warp_lse(Lse a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a.merge(__shfl_xor_sync(0xffffffffu, a.max, o), __shfl_xor_sync(0xffffffffu, a.sum, o));
  return a;
}

// Block sum: blockDim.x a multiple of 32; every thread gets the result. It begins with a barrier so
// that consecutive calls can reuse the same 32-slot shared scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.f);
}

__device__ __forceinline__ Lse block_lse(Lse a, float* scratch_max, float* scratch_sum) {
  a = warp_lse(a);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch_max[warp] = a.max;
    scratch_sum[warp] = a.sum;
  }
  __syncthreads();
  Lse r;
  if (lane < (int)(blockDim.x >> 5)) {
    r.max = scratch_max[lane];
    r.sum = scratch_sum[lane];
  }
  return warp_lse(r);
}

// Calls the kernel body templated on the element type of a dtype code.
template <typename F>
inline cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case QAK_FLOAT32: return f(float{});
    case QAK_FLOAT16: return f(__half{});
    case QAK_BFLOAT16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace qak
