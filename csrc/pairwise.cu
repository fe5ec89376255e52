// Pairwise Bradley-Terry + chi2 loss and its gradient with respect to every per-token reward,
// in one single-block launch (the inputs are N floats; the work is tiny next to the row step).
// Rows are reduced by one warp each, in a fixed order, so the result is deterministic.
#include "common.cuh"

namespace qak {
namespace {

constexpr int kPairThreads = 512;

// torch.nn.functional.softplus (beta=1, threshold=20) and its derivative, as torch computes them.
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float softplus_grad(float x) {
  if (x > 20.f) return 1.f;
  const float e = expf(x);
  return e / (e + 1.f);
}

// Dynamic shared memory of the largest batch, plus the static scratch, within the default 48 KB.
static_assert((QAK_PAIRWISE_MAX_BATCH + 1) * sizeof(int64_t) + QAK_PAIRWISE_MAX_BATCH * sizeof(float) +
                      32 * sizeof(float) <= 48 * 1024,
              "QAK_PAIRWISE_MAX_BATCH needs more than 48 KB of shared memory per block");

__global__ void __launch_bounds__(kPairThreads) pairwise_kernel(
    const float* __restrict__ rewards, int64_t n_tokens, const int64_t* __restrict__ row_counts, int batch,
    int64_t padded_len,
    float beta, int reward_norm, float* __restrict__ seq_rewards, float* __restrict__ stats,
    float* __restrict__ grad) {
  extern __shared__ unsigned char smem[];
  int64_t* offsets = reinterpret_cast<int64_t*>(smem);      // [batch + 1] row starts
  float* coef = reinterpret_cast<float*>(offsets + batch + 1);  // [batch] dloss/dR_b / norm_b
  __shared__ float scratch[32];

  if (threadIdx.x == 0) {
    int64_t off = 0;
    for (int b = 0; b < batch; ++b) {
      offsets[b] = off;
      off += row_counts[b];
    }
    offsets[batch] = off;
  }
  __syncthreads();
  if (offsets[batch] != n_tokens) {  // row_counts disagree with rewards: flag it, read nothing out of range
    if (threadIdx.x < 5) stats[threadIdx.x] = NAN;
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

  // Per-sequence sums, and the sum of squares over every token.
  float sq = 0.f;
  for (int b = warp; b < batch; b += warps) {
    float s = 0.f;
    for (int64_t i = offsets[b] + lane; i < offsets[b + 1]; i += 32) {
      const float r = rewards[i];
      s += r;
      sq += r * r;
    }
    s = warp_sum(s);
    if (lane == 0) {
      const int64_t count = offsets[b + 1] - offsets[b];
      const float norm = reward_norm == QAK_NORM_PADDED ? (float)padded_len
                         : reward_norm == QAK_NORM_MEAN  ? (float)(count > 0 ? count : 1)
                                                         : 1.f;
      seq_rewards[b] = s / norm;
      coef[b] = 1.f / norm;
    }
  }
  const float sum_sq = block_sum(sq, scratch);  // its barriers publish seq_rewards and coef

  // Pairs: d_k = R_rejected - R_chosen; bt = mean softplus(d); dbt/dR_rejected = -dbt/dR_chosen.
  const int half = batch / 2;
  float bt = 0.f, wins = 0.f, margin = 0.f;
  for (int k = threadIdx.x; k < half; k += blockDim.x) {
    const float chosen = seq_rewards[k], rejected = seq_rewards[k + half];
    const float d = rejected - chosen;
    bt += softplus(d);
    wins += chosen > rejected ? 1.f : 0.f;
    margin += chosen - rejected;
    const float g = softplus_grad(d) / half;
    coef[k] *= -g;
    coef[k + half] *= g;
  }
  bt = block_sum(bt, scratch) / half;
  wins = block_sum(wins, scratch);
  margin = block_sum(margin, scratch);  // its barriers publish coef
  const float chi2 = beta * sum_sq / (float)n_tokens;
  if (threadIdx.x == 0) {
    stats[0] = bt + chi2;
    stats[1] = bt;
    stats[2] = chi2;
    stats[3] = wins / half;
    stats[4] = margin / half;
  }

  // dloss/dr_t = coef[row(t)] + 2 beta r_t / n.
  const float chi2_scale = 2.f * beta / (float)n_tokens;
  for (int b = warp; b < batch; b += warps) {
    const float c = coef[b];
    for (int64_t i = offsets[b] + lane; i < offsets[b + 1]; i += 32) grad[i] = c + chi2_scale * rewards[i];
  }
}

}  // namespace
}  // namespace qak

extern "C" int qak_pairwise_bt(const float* rewards, int64_t n_tokens, const int64_t* row_counts, int64_t batch,
                               int64_t padded_len, float beta, int reward_norm, float* seq_rewards, float* stats,
                               float* grad, cudaStream_t stream) {
  if (batch <= 0 || batch % 2 || batch > QAK_PAIRWISE_MAX_BATCH || n_tokens <= 0 || padded_len <= 0)
    return cudaErrorInvalidValue;
  if (reward_norm != QAK_NORM_PADDED && reward_norm != QAK_NORM_MEAN && reward_norm != QAK_NORM_SUM)
    return cudaErrorInvalidValue;
  const size_t smem = (batch + 1) * sizeof(int64_t) + batch * sizeof(float);
  qak::pairwise_kernel<<<1, qak::kPairThreads, smem, stream>>>(rewards, n_tokens, row_counts, (int)batch, padded_len, beta,
                                                                reward_norm, seq_rewards, stats, grad);
  return cudaGetLastError();
}
