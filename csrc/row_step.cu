// Fused row step of the chunked pipeline: one block per row, one read pass for both
// log-sum-exps (combined logits and base logits) and Q[t, a_t], then one pass writing P.
// Traffic: z and q read twice, P written once; no [C, V] temporary. Under a soft cap (kCap) z
// and q are capped in registers as they are read, in both passes.
#include "common.cuh"

namespace qak {
namespace {

constexpr int kRowThreads = 512;

// Soft cap s * tanh(x / s) (inv_cap = 1 / s); tanh(+-inf) = +-1, NaN stays NaN.
__device__ __forceinline__ float soft_cap(float x, float cap, float inv_cap) { return cap * tanhf(x * inv_cap); }

// kCap: z and q are raw logits, capped as they are read (softcap s, inv_softcap 1 / s), and p is
// written times the cap's slope on Q, 1 - tanh^2 (steps.RowStep). Without it both are unused.
template <typename T, typename P, bool kCap>
__global__ void __launch_bounds__(kRowThreads) row_step_kernel(
    const T* z, const T* q, const int64_t* __restrict__ targets, int64_t vocab,
    float inv_alpha_tilde, float alpha_0, float alpha_tilde, float softcap, float inv_softcap, bool vec_ok,
    float* __restrict__ q_taken, float* __restrict__ value, P* p) {
  // z, q and p are not __restrict__: p may alias z or q.
  __shared__ float scratch[4][32];
  const int64_t row = blockIdx.x;
  const int64_t row_start = row * vocab;

  float taken = NAN;
  if (threadIdx.x == 0) {
    const int64_t t = targets[row];
    if (t >= 0 && t < vocab) taken = to_float(q[row_start + t]);
    if constexpr (kCap) taken = soft_cap(taken, softcap, inv_softcap);
  }

  Lse comb, base;
  for_each_col(z, q, row_start, vocab, vec_ok, [&](int64_t, const float* zv, const float* qv, auto w) {
    constexpr int n = decltype(w)::value;
    float zc[n], c[n];
#pragma unroll
    for (int j = 0; j < n; ++j) {
      float qj = qv[j];
      zc[j] = zv[j];
      if constexpr (kCap) {
        zc[j] = soft_cap(zc[j], softcap, inv_softcap);
        qj = soft_cap(qj, softcap, inv_softcap);
      }
      c[j] = (qj + alpha_0 * zc[j]) * inv_alpha_tilde;
    }
    comb.add<n>(c);
    base.add<n>(zc);
  });
  comb = block_lse(comb, scratch[0], scratch[1]);
  base = block_lse(base, scratch[2], scratch[3]);  // its barriers also order every read above before the writes below

  if (threadIdx.x == 0) {
    q_taken[row] = taken;
    value[row] = alpha_tilde * comb.value() - alpha_0 * base.value();
  }

  const float cmax = comb.max, inv_sum = 1.f / comb.sum;
  P* pr = p + row_start;
  for_each_col(z, q, row_start, vocab, vec_ok, [&](int64_t col, const float* zv, const float* qv, auto w) {
    constexpr int n = decltype(w)::value;
    float out[n];
#pragma unroll
    for (int j = 0; j < n; ++j) {
      if constexpr (kCap) {
        const float tq = tanhf(qv[j] * inv_softcap);  // capped q = softcap * tq, its slope 1 - tq^2
        const float qc = softcap * tq, zc = soft_cap(zv[j], softcap, inv_softcap);
        out[j] = fast_exp((qc + alpha_0 * zc) * inv_alpha_tilde - cmax) * inv_sum * (1.f - tq * tq);
      } else {
        out[j] = fast_exp((qv[j] + alpha_0 * zv[j]) * inv_alpha_tilde - cmax) * inv_sum;
      }
    }
    store_n<P, n>(pr + col, out);
  });
}

template <typename T, typename P>
cudaError_t launch(const void* z, const void* q, const int64_t* targets, int64_t rows, int64_t vocab,
                   float alpha_tilde, float alpha_0, float softcap, float* q_taken, float* value, void* p,
                   cudaStream_t stream) {
  const bool vec_ok = aligned16(z) && aligned16(q) && aligned16(p);
  const auto kernel = softcap > 0.f ? row_step_kernel<T, P, true> : row_step_kernel<T, P, false>;
  kernel<<<(unsigned)rows, kRowThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<const T*>(q), targets, vocab, 1.f / alpha_tilde, alpha_0, alpha_tilde,
      softcap, softcap > 0.f ? 1.f / softcap : 0.f, vec_ok, q_taken, value, static_cast<P*>(p));
  return cudaGetLastError();
}

}  // namespace
}  // namespace qak

extern "C" int qak_row_step(const void* z, const void* q, const int64_t* targets, int64_t rows, int64_t vocab,
                            int dtype, float alpha_tilde, float alpha_0, float softcap, float* q_taken, float* value,
                            void* p, int p_dtype, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || vocab <= 0 || !(alpha_tilde > 0.f)) return cudaErrorInvalidValue;
  if (!(softcap >= 0.f && softcap < INFINITY)) return cudaErrorInvalidValue;  // 0: no cap
  if (p_dtype != QAK_FLOAT32 && p_dtype != dtype) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return qak::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p_dtype == QAK_FLOAT32)
      return qak::launch<T, float>(z, q, targets, rows, vocab, alpha_tilde, alpha_0, softcap, q_taken, value, p,
                                   stream);
    return qak::launch<T, T>(z, q, targets, rows, vocab, alpha_tilde, alpha_0, softcap, q_taken, value, p, stream);
  });
}

extern "C" int qak_kernel_image(int* binary_version, int* ptx_version) {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, qak::row_step_kernel<float, float, false>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // reset it: a later launch check must not see this error as its own
    return err;
  }
  *binary_version = attr.binaryVersion;
  *ptx_version = attr.ptxVersion;
  return 0;
}
