// Decode step of the combined policy: one block per row writes the combined log-probs, then
// (optionally) filters by top-k / top-p with radix selects over the row it just wrote and draws
// one token by Gumbel-max. No sort and no [B, V] temporary beyond the log-probs themselves.
#include "common.cuh"

namespace qak {
namespace {

constexpr int kDecodeThreads = 512;

// Order-preserving map of a float to uint32: a < b  <=>  key(a) < key(b).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Philox4x32-10 (Salmon et al., SC'11), first output word: counter-based, so every (row, token)
// gets independent noise from the seed alone, whatever the launch shape.
__device__ __forceinline__ uint32_t philox(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t x0 = c0, x1 = c1, x2 = 0, x3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = 0xD2511F53u * x0, hi0 = __umulhi(0xD2511F53u, x0);
    const uint32_t lo1 = 0xCD9E8D57u * x2, hi1 = __umulhi(0xCD9E8D57u, x2);
    x0 = hi1 ^ x1 ^ k0;
    x1 = lo1;
    x2 = hi0 ^ x3 ^ k1;
    x3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return x0;
}

// Standard Gumbel noise from 24 random bits: u in (0, 1) strictly.
__device__ __forceinline__ float gumbel(uint32_t bits) {
  const float u = ((float)(bits >> 8) + 0.5f) * (1.f / 16777216.f);
  return -logf(-logf(u));
}

struct SelectScratch {
  float hist[256];
  uint32_t bin;
  float above;
};

// Largest key K such that measure({col : key(lp[col]) >= max(K, lower)}) >= target, where the
// measure counts tokens (by_mass false) or sums exp((lp - lp_max) * inv_temp). Four 8-bit radix
// passes over the row; ties at K are all kept, as in Hugging Face's warpers. If rounding leaves
// the target out of reach, the lowest candidate is taken (nothing is filtered wrongly away).
__device__ uint32_t radix_select(const float* lp, int64_t vocab, uint32_t lower, bool by_mass, float target,
                                 float lp_max, float inv_temp, SelectScratch& sh) {
  uint32_t prefix = 0, prefix_mask = 0;
  float above = 0.f;  // measure of the candidates above the current prefix
  const int lane = threadIdx.x & 31;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0.f;
    __syncthreads();
    // Consecutive tokens of a thread often share a bin: accumulate locally, flush on change.
    int cur = -1;
    float acc = 0.f;
    for (int64_t col = threadIdx.x; col < vocab; col += blockDim.x) {
      const float x = lp[col];
      const uint32_t key = order_key(x);
      if (key < lower || (key & prefix_mask) != prefix) continue;
      const int bin = (key >> shift) & 255;
      if (bin != cur) {
        if (cur >= 0) atomicAdd(&sh.hist[cur], acc);
        cur = bin;
        acc = 0.f;
      }
      acc += by_mass ? fast_exp((x - lp_max) * inv_temp) : 1.f;
    }
    if (cur >= 0) atomicAdd(&sh.hist[cur], acc);
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l walks bins 255-8l down to 248-8l; lanes scan their totals from the top bin down.
      float h[8], total = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) total += (h[j] = sh.hist[255 - 8 * lane - j]);
      float before = total;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float v = __shfl_up_sync(0xffffffffu, before, o);
        if (lane >= o) before += v;
      }
      float run = above + before - total;
      int found = -1, lowest = -1;
      float found_above = 0.f, lowest_above = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (found < 0 && h[j] > 0.f && run + h[j] >= target) {  // never an empty bin: it has no candidate below
          found = j;
          found_above = run;
        }
        if (h[j] > 0.f) {
          lowest = j;
          lowest_above = run;
        }
        run += h[j];
      }
      const unsigned hit = __ballot_sync(0xffffffffu, found >= 0);
      const unsigned nonempty = __ballot_sync(0xffffffffu, lowest >= 0);
      const int src = hit ? __ffs(hit) - 1 : 31 - __clz(nonempty);
      const int j = __shfl_sync(0xffffffffu, hit ? found : lowest, src);
      const float a = __shfl_sync(0xffffffffu, hit ? found_above : lowest_above, src);
      if (lane == 0) {
        sh.bin = 255 - 8 * src - j;
        sh.above = a;
      }
    }
    __syncthreads();
    prefix |= sh.bin << shift;
    prefix_mask |= 255u << shift;
    above = sh.above;
    __syncthreads();  // sh is reused by the next pass
  }
  return prefix;
}

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(
    const T* __restrict__ z, const T* __restrict__ q, int64_t vocab, float inv_alpha_tilde, float alpha_0,
    float inv_temp, int64_t top_k, float top_p, uint64_t seed, bool vec_ok, float* __restrict__ logprobs,
    int64_t* __restrict__ sampled) {
  __shared__ float scratch[3][32];
  __shared__ SelectScratch sel;
  const int64_t row = blockIdx.x;
  const int64_t row_start = row * vocab;

  Lse comb;
  for_each_col(z, q, row_start, vocab, vec_ok, [&](int64_t, const float* zv, const float* qv, auto w) {
    constexpr int n = decltype(w)::value;
    float c[n];
#pragma unroll
    for (int j = 0; j < n; ++j) c[j] = (qv[j] + alpha_0 * zv[j]) * inv_alpha_tilde;
    comb.add<n>(c);
  });
  comb = block_lse(comb, scratch[0], scratch[1]);
  // log_softmax is shift invariant: alpha_0 * lse(z) / alpha_tilde cancels, so lse(z) is not needed.
  const float lse = comb.value();
  float* lp = logprobs + row_start;
  for_each_col(z, q, row_start, vocab, vec_ok, [&](int64_t col, const float* zv, const float* qv, auto w) {
    constexpr int n = decltype(w)::value;
    float out[n];
#pragma unroll
    for (int j = 0; j < n; ++j) out[j] = (qv[j] + alpha_0 * zv[j]) * inv_alpha_tilde - lse;
    store_n<float, n>(lp + col, out);
  });
  if (sampled == nullptr) return;
  __syncthreads();  // the row's log-probs, written above, are the input of the selection

  const float lp_max = comb.max - lse;
  uint32_t lower = 0;
  if (top_k > 0 && top_k < vocab) lower = radix_select(lp, vocab, 0, false, (float)top_k, lp_max, inv_temp, sel);
  if (top_p < 1.f) {
    float mass = 0.f;
    for (int64_t col = threadIdx.x; col < vocab; col += blockDim.x) {
      const float x = lp[col];
      if (order_key(x) >= lower) mass += fast_exp((x - lp_max) * inv_temp);
    }
    mass = block_sum(mass, scratch[2]);
    lower = radix_select(lp, vocab, lower, true, top_p * mass, lp_max, inv_temp, sel);
  }

  // Gumbel-max over the kept tokens: argmax of lp / temperature + Gumbel noise; ties to the lower id.
  float best = -INFINITY;
  int64_t best_col = vocab;
  for (int64_t col = threadIdx.x; col < vocab; col += blockDim.x) {
    const float x = lp[col];
    if (order_key(x) < lower) continue;
    const float score = x * inv_temp + gumbel(philox(seed, (uint32_t)col, (uint32_t)row));
    if (score > best) {
      best = score;
      best_col = col;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float b = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t c = __shfl_xor_sync(0xffffffffu, best_col, o);
    if (b > best || (b == best && c < best_col)) {
      best = b;
      best_col = c;
    }
  }
  __shared__ float warp_best[32];
  __shared__ int64_t warp_col[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_col[warp] = best_col;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
      if (warp_best[w] > best || (warp_best[w] == best && warp_col[w] < best_col)) {
        best = warp_best[w];
        best_col = warp_col[w];
      }
    }
    // vocab (an invalid id) only if every kept score was NaN.
    sampled[row] = best_col;
  }
}

}  // namespace
}  // namespace qak

extern "C" int qak_decode_combine(const void* z, const void* q, int64_t rows, int64_t vocab, int dtype,
                                  float alpha_tilde, float alpha_0, float temperature, int64_t top_k, float top_p,
                                  uint64_t seed, float* logprobs, int64_t* sampled, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || vocab <= 0 || vocab > 0xffffffffLL || !(alpha_tilde > 0.f) ||
      !(temperature > 0.f) || !(top_p > 0.f) || logprobs == nullptr)
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const bool vec_ok = qak::aligned16(z) && qak::aligned16(q) && qak::aligned16(logprobs);
  return qak::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    qak::decode_kernel<T><<<(unsigned)rows, qak::kDecodeThreads, 0, stream>>>(
        static_cast<const T*>(z), static_cast<const T*>(q), vocab, 1.f / alpha_tilde, alpha_0, 1.f / temperature,
        top_k, top_p, seed, vec_ok, logprobs, sampled);
    return cudaGetLastError();
  });
}
