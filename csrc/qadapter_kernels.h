// C interface of the qadapter-kernels CUDA kernels.
//
// Every launcher takes raw device pointers, sizes, a dtype code and a stream, and returns a
// cudaError_t as int (0 = success; cudaErrorInvalidValue for bad sizes or codes). Nothing here
// needs torch: the kernels compile with plain nvcc, and csrc/binding.cpp is the only torch glue.
// All math and every statistic is float32, whatever the input dtype.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of the [rows, vocab] inputs (and of a p output that is not float32).
enum qak_dtype { QAK_FLOAT32 = 0, QAK_FLOAT16 = 1, QAK_BFLOAT16 = 2 };

// Per-sequence reward normalization, as LossConfig.reward_norm.
enum qak_reward_norm { QAK_NORM_PADDED = 0, QAK_NORM_MEAN = 1, QAK_NORM_SUM = 2 };

// Row step of the chunked pipeline (qadapter_kernels.steps.torch_row_step), for contiguous
// z, q: [rows, vocab] of dtype `dtype` and targets: [rows] int64:
//   q_taken[r] = q[r, targets[r]]                        (NaN if the target is out of range)
//   value[r]   = alpha_tilde * lse((q + alpha_0 * z) / alpha_tilde) - alpha_0 * lse(z)
//              = alpha_tilde * lse((q + alpha_0 * log_softmax(z)) / alpha_tilde)
//   p[r, :]    = softmax((q + alpha_0 * z) / alpha_tilde), of dtype p_dtype (float32 or dtype).
// softcap s > 0 (finite; 0 = none): z and q are raw logits, capped as they are read,
// s * tanh(x / s), so all of the above is of the capped z and q, and p is written times the
// cap's slope on Q, 1 - (q_capped / s)^2.
// p may alias z or q (same dtype): each element is read before it is overwritten, by one thread.
// block_stats (NULL: none), for gradient filtering: a [rows, ceil(vocab / QAK_FILTER_BLOCK)]
// float32 array that gets, for each QAK_FILTER_BLOCK columns of a row (the last block may be
// partial), the sum of p of the policy softmax(...) itself, never times a cap's slope; a NaN p
// makes the block's sum NaN.
#define QAK_FILTER_BLOCK 1024  // qadapter_kernels.steps.FILTER_BLOCK
int qak_row_step(const void* z, const void* q, const int64_t* targets, int64_t rows, int64_t vocab,
                 int dtype, float alpha_tilde, float alpha_0, float softcap, float* q_taken, float* value,
                 void* p, int p_dtype, float* block_stats, cudaStream_t stream);

// Whether the kernels have an image for the current device: 0 and the cubin's and PTX's
// versions (major * 10 + minor) the row step kernel runs with, else the CUDA error (typically
// cudaErrorNoKernelImageForDevice: built for other architectures, and no PTX the device can take).
int qak_kernel_image(int* binary_version, int* ptx_version);

// Pairwise Bradley-Terry + chi2 loss of _contract.pairwise_loss, forward and gradient in one
// launch. rewards: [n_tokens] float32 per-token rewards of the scored tokens, packed row by row
// (row b holds row_counts[b] consecutive entries; sum(row_counts) == n_tokens); batch even,
// rows 0..batch/2-1 chosen, row k + batch/2 the rejected response of pair k; padded_len = T-1.
// Writes seq_rewards[batch] (normalized per-sequence rewards), stats[5] = {loss, bt, chi2,
// accuracy, margin} and grad[n_tokens] = dloss/drewards. batch <= QAK_PAIRWISE_MAX_BATCH. If the
// row counts do not sum to n_tokens, stats are NaN and nothing else is written. The limit keeps
// the kernel's shared memory ((batch + 1) int64 row starts, batch floats, a 32-float scratch)
// under the 48 KB a launch gets without opting in to more (pairwise.cu asserts it).
#define QAK_PAIRWISE_MAX_BATCH 2048
int qak_pairwise_bt(const float* rewards, int64_t n_tokens, const int64_t* row_counts, int64_t batch,
                    int64_t padded_len, float beta, int reward_norm, float* seq_rewards, float* stats,
                    float* grad, cudaStream_t stream);

// Decode step of the combined policy for contiguous z, q: [rows, vocab] of dtype `dtype`:
//   logprobs[r, :] = log_softmax((q + alpha_0 * log_softmax(z)) / alpha_tilde)   (float32)
// and, when sampled is not NULL, one token per row drawn from softmax(logprobs / temperature)
// restricted to the top_k most likely tokens (top_k <= 0: all), then to the smallest most-likely
// set of probability mass >= top_p (top_p >= 1: all), as Hugging Face's warpers do. Sampling is
// Gumbel-max with Philox4x32-10 noise keyed by seed and counted by (row, token): reproducible.
int qak_decode_combine(const void* z, const void* q, int64_t rows, int64_t vocab, int dtype,
                       float alpha_tilde, float alpha_0, float temperature, int64_t top_k, float top_p,
                       uint64_t seed, float* logprobs, int64_t* sampled, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
