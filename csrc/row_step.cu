// Fused row step of the chunked pipeline: one block per row, one read pass for both
// log-sum-exps (combined logits and base logits) and Q[t, a_t], then one pass writing P.
// Traffic: z and q read twice, P written once; no [C, V] temporary. Under a soft cap (kCap) z
// and q are capped in registers as they are read, in both passes. With block statistics (kStats,
// gradient filtering) the write pass goes QAK_FILTER_BLOCK columns at a time and reduces each
// block's sum of p across the thread block.
#include "common.cuh"

namespace qak {
namespace {

constexpr int kRowThreads = 512;

// Soft cap s * tanh(x / s) (inv_cap = 1 / s); tanh(+-inf) = +-1, NaN stays NaN.
__device__ __forceinline__ float soft_cap(float x, float cap, float inv_cap) { return cap * tanhf(x * inv_cap); }

// kCap: z and q are raw logits, capped as they are read (softcap s, inv_softcap 1 / s), and p is
// written times the cap's slope on Q, 1 - tanh^2 (steps.RowStep). Without it both are unused.
// kStats: stats ([rows, ceil(vocab / QAK_FILTER_BLOCK)]) gets each block's sum of the policy itself
// (not times the slope); without it stats is unused.
template <typename T, typename P, bool kCap, bool kStats>
__global__ void __launch_bounds__(kRowThreads) row_step_kernel(
    const T* z, const T* q, const int64_t* __restrict__ targets, int64_t vocab,
    float inv_alpha_tilde, float alpha_0, float alpha_tilde, float softcap, float inv_softcap, bool vec_ok,
    float* __restrict__ q_taken, float* __restrict__ value, P* p, float* __restrict__ stats) {
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
  // n columns of the policy: pol[j] = softmax(c) itself, out[j] what is written (pol[j] times the
  // cap's slope on Q under kCap, else pol[j]).
  const auto policy = [&](const float* zv, const float* qv, float* pol, float* out, auto w) {
    constexpr int n = decltype(w)::value;
#pragma unroll
    for (int j = 0; j < n; ++j) {
      if constexpr (kCap) {
        const float tq = tanhf(qv[j] * inv_softcap);  // capped q = softcap * tq, its slope 1 - tq^2
        const float qc = softcap * tq, zc = soft_cap(zv[j], softcap, inv_softcap);
        pol[j] = fast_exp((qc + alpha_0 * zc) * inv_alpha_tilde - cmax) * inv_sum;
        out[j] = pol[j] * (1.f - tq * tq);
      } else {
        pol[j] = fast_exp((qv[j] + alpha_0 * zv[j]) * inv_alpha_tilde - cmax) * inv_sum;
        out[j] = pol[j];
      }
    }
  };

  if constexpr (!kStats) {
    P* pr = p + row_start;
    for_each_col(z, q, row_start, vocab, vec_ok, [&](int64_t col, const float* zv, const float* qv, auto w) {
      constexpr int n = decltype(w)::value;
      float pol[n], out[n];
      policy(zv, qv, pol, out, w);
      store_n<P, n>(pr + col, out);
    });
  } else {
    // One filter block at a time, each a for_each_col of its own (head, vectors, tail): a block
    // starts a multiple of QAK_FILTER_BLOCK past the row start, so the same 16-byte boundaries apply.
    // The loop bounds are the same for every thread: all reach the reductions' barriers.
    const int64_t n_blocks = (vocab + QAK_FILTER_BLOCK - 1) / QAK_FILTER_BLOCK;
    float* row_stats = stats + row * n_blocks;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t start = b * QAK_FILTER_BLOCK;
      const int64_t width = vocab - start < QAK_FILTER_BLOCK ? vocab - start : QAK_FILTER_BLOCK;
      P* pb = p + row_start + start;
      float b_sum = 0.f;
      for_each_col(z, q, row_start + start, width, vec_ok,
                   [&](int64_t col, const float* zv, const float* qv, auto w) {
                     constexpr int n = decltype(w)::value;
                     float pol[n], out[n];
                     policy(zv, qv, pol, out, w);
#pragma unroll
                     for (int j = 0; j < n; ++j) b_sum += pol[j];  // a NaN stays in: the filter then keeps the block
                     store_n<P, n>(pb + col, out);
                   });
      b_sum = block_sum(b_sum, scratch[0]);
      if (threadIdx.x == 0) row_stats[b] = b_sum;
    }
  }
}

template <typename T, typename P>
cudaError_t launch(const void* z, const void* q, const int64_t* targets, int64_t rows, int64_t vocab,
                   float alpha_tilde, float alpha_0, float softcap, float* q_taken, float* value, void* p,
                   float* block_stats, cudaStream_t stream) {
  const bool vec_ok = aligned16(z) && aligned16(q) && aligned16(p);
  const bool cap = softcap > 0.f;
  const auto kernel = block_stats ? (cap ? row_step_kernel<T, P, true, true> : row_step_kernel<T, P, false, true>)
                                  : (cap ? row_step_kernel<T, P, true, false> : row_step_kernel<T, P, false, false>);
  kernel<<<(unsigned)rows, kRowThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<const T*>(q), targets, vocab, 1.f / alpha_tilde, alpha_0, alpha_tilde,
      softcap, cap ? 1.f / softcap : 0.f, vec_ok, q_taken, value, static_cast<P*>(p), block_stats);
  return cudaGetLastError();
}

}  // namespace
}  // namespace qak

extern "C" int qak_row_step(const void* z, const void* q, const int64_t* targets, int64_t rows, int64_t vocab,
                            int dtype, float alpha_tilde, float alpha_0, float softcap, float* q_taken, float* value,
                            void* p, int p_dtype, float* block_stats, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || vocab <= 0 || !(alpha_tilde > 0.f)) return cudaErrorInvalidValue;
  if (!(softcap >= 0.f && softcap < INFINITY)) return cudaErrorInvalidValue;  // 0: no cap
  if (p_dtype != QAK_FLOAT32 && p_dtype != dtype) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return qak::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p_dtype == QAK_FLOAT32)
      return qak::launch<T, float>(z, q, targets, rows, vocab, alpha_tilde, alpha_0, softcap, q_taken, value, p,
                                   block_stats, stream);
    return qak::launch<T, T>(z, q, targets, rows, vocab, alpha_tilde, alpha_0, softcap, q_taken, value, p,
                             block_stats, stream);
  });
}

extern "C" int qak_kernel_image(int* binary_version, int* ptx_version) {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, qak::row_step_kernel<float, float, false, false>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // reset it: a later launch check must not see this error as its own
    return err;
  }
  *binary_version = attr.binaryVersion;
  *ptx_version = attr.ptxVersion;
  return 0;
}
