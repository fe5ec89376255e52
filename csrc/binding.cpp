// Thin torch binding of the C launchers in qadapter_kernels.h: checks device, dtype, shape and
// contiguity with errors that name the argument, then launches on the current CUDA stream.
// Outputs are passed in (allocated by qadapter_kernels/_cuda.py), so callers control aliasing.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "qadapter_kernels.h"

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return QAK_FLOAT32;
    case at::kHalf: return QAK_FLOAT16;
    case at::kBFloat16: return QAK_BFLOAT16;
    default: return -1;
  }
}

int input_dtype(const at::Tensor& t, const char* name) {
  const int code = dtype_code(t.scalar_type());
  TORCH_CHECK(code >= 0, name, " must be float32, float16 or bfloat16; got ", t.scalar_type());
  return code;
}

// CUDA, on `device`, contiguous, of `shape`.
void check_tensor(const at::Tensor& t, const char* name, const at::Device& device, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like the other inputs; got ", t.device());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, "; got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, name, " must be ", want, "; got ", t.scalar_type());
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "qadapter_kernels._C.", op, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// z, q: [rows, vocab] logits of one dtype on one CUDA device.
int check_logits(const at::Tensor& z, const at::Tensor& q) {
  TORCH_CHECK(z.dim() == 2, "z must be 2-D [rows, vocab]; got shape ", z.sizes());
  TORCH_CHECK(z.size(1) > 0, "z must have a vocabulary of at least one column");
  const int code = input_dtype(z, "z");
  check_tensor(z, "z", z.device(), z.sizes());
  check_tensor(q, "q", z.device(), z.sizes());
  check_dtype(q, "q", z.scalar_type());
  return code;
}

// block_stats (optional): [rows, ceil(vocab / QAK_FILTER_BLOCK)] float32, each block's sum of p.
void row_step(const at::Tensor& z, const at::Tensor& q, const at::Tensor& targets, double alpha_tilde,
              double alpha_0, double softcap, const at::Tensor& q_taken, const at::Tensor& value,
              const at::Tensor& p, const std::optional<at::Tensor>& block_stats) {
  const int code = check_logits(z, q);
  const int64_t rows = z.size(0);
  check_tensor(targets, "targets", z.device(), {rows});
  check_dtype(targets, "targets", at::kLong);
  check_tensor(q_taken, "q_taken", z.device(), {rows});
  check_dtype(q_taken, "q_taken", at::kFloat);
  check_tensor(value, "value", z.device(), {rows});
  check_dtype(value, "value", at::kFloat);
  check_tensor(p, "p", z.device(), z.sizes());
  const int p_code = dtype_code(p.scalar_type());
  TORCH_CHECK(p_code == QAK_FLOAT32 || p_code == code, "p must be float32 or z's dtype ", z.scalar_type(), "; got ",
              p.scalar_type());
  if (block_stats) {
    check_tensor(*block_stats, "block_stats", z.device(),
                 {rows, (z.size(1) + QAK_FILTER_BLOCK - 1) / QAK_FILTER_BLOCK});
    check_dtype(*block_stats, "block_stats", at::kFloat);
  }
  TORCH_CHECK(alpha_tilde > 0, "alpha_tilde must be > 0; got ", alpha_tilde);
  TORCH_CHECK(softcap >= 0 && std::isfinite(static_cast<float>(softcap)),
              "softcap must be finite and >= 0 (0: no soft cap); got ", softcap);
  const c10::cuda::CUDAGuard guard(z.device());
  check_launch(qak_row_step(z.data_ptr(), q.data_ptr(), targets.data_ptr<int64_t>(), rows, z.size(1), code,
                            static_cast<float>(alpha_tilde), static_cast<float>(alpha_0), static_cast<float>(softcap),
                            q_taken.data_ptr<float>(), value.data_ptr<float>(), p.data_ptr(), p_code,
                            block_stats ? block_stats->data_ptr<float>() : nullptr,
                            c10::cuda::getCurrentCUDAStream(z.device().index()).stream()),
               "row_step");
}

void pairwise_bt(const at::Tensor& rewards, const at::Tensor& row_counts, int64_t padded_len, double beta,
                 int64_t reward_norm, const at::Tensor& seq_rewards, const at::Tensor& stats, const at::Tensor& grad) {
  TORCH_CHECK(rewards.dim() == 1 && rewards.size(0) > 0, "rewards must be 1-D [n_tokens] with n_tokens > 0; got shape ",
              rewards.sizes());
  const at::Device device = rewards.device();
  check_tensor(rewards, "rewards", device, rewards.sizes());
  check_dtype(rewards, "rewards", at::kFloat);
  TORCH_CHECK(row_counts.dim() == 1, "row_counts must be 1-D [B]; got shape ", row_counts.sizes());
  const int64_t batch = row_counts.size(0);
  TORCH_CHECK(batch > 0 && batch % 2 == 0 && batch <= QAK_PAIRWISE_MAX_BATCH,
              "the batch size B (len(row_counts)) must be even, > 0 and <= ", QAK_PAIRWISE_MAX_BATCH, "; got ", batch);
  check_tensor(row_counts, "row_counts", device, {batch});
  check_dtype(row_counts, "row_counts", at::kLong);
  check_tensor(seq_rewards, "seq_rewards", device, {batch});
  check_dtype(seq_rewards, "seq_rewards", at::kFloat);
  check_tensor(stats, "stats", device, {5});
  check_dtype(stats, "stats", at::kFloat);
  check_tensor(grad, "grad", device, rewards.sizes());
  check_dtype(grad, "grad", at::kFloat);
  TORCH_CHECK(padded_len > 0, "padded_len (T-1) must be > 0; got ", padded_len);
  TORCH_CHECK(reward_norm >= QAK_NORM_PADDED && reward_norm <= QAK_NORM_SUM,
              "reward_norm must be 0 (padded), 1 (mean) or 2 (sum); got ", reward_norm);
  const c10::cuda::CUDAGuard guard(device);
  check_launch(qak_pairwise_bt(rewards.data_ptr<float>(), rewards.size(0), row_counts.data_ptr<int64_t>(), batch,
                               padded_len, static_cast<float>(beta), static_cast<int>(reward_norm),
                               seq_rewards.data_ptr<float>(), stats.data_ptr<float>(), grad.data_ptr<float>(),
                               c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "pairwise_bt");
}

void decode_combine(const at::Tensor& z, const at::Tensor& q, double alpha_tilde, double alpha_0, double temperature,
                    int64_t top_k, double top_p, int64_t seed, const at::Tensor& logprobs,
                    const std::optional<at::Tensor>& sampled) {
  const int code = check_logits(z, q);
  check_tensor(logprobs, "logprobs", z.device(), z.sizes());
  check_dtype(logprobs, "logprobs", at::kFloat);
  if (sampled) {
    check_tensor(*sampled, "sampled", z.device(), {z.size(0)});
    check_dtype(*sampled, "sampled", at::kLong);
  }
  TORCH_CHECK(alpha_tilde > 0, "alpha_tilde must be > 0; got ", alpha_tilde);
  TORCH_CHECK(temperature > 0, "temperature must be > 0; got ", temperature);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1]; got ", top_p);
  TORCH_CHECK(top_k >= 0, "top_k must be >= 0 (0: no top-k filter); got ", top_k);
  const c10::cuda::CUDAGuard guard(z.device());
  check_launch(qak_decode_combine(z.data_ptr(), q.data_ptr(), z.size(0), z.size(1), code,
                                  static_cast<float>(alpha_tilde), static_cast<float>(alpha_0),
                                  static_cast<float>(temperature), top_k, static_cast<float>(top_p),
                                  static_cast<uint64_t>(seed), logprobs.data_ptr<float>(),
                                  sampled ? sampled->data_ptr<int64_t>() : nullptr,
                                  c10::cuda::getCurrentCUDAStream(z.device().index()).stream()),
               "decode_combine");
}

// (binary version, PTX version) of the row step kernel on the current device; raises with the CUDA
// error when the extension has no image this device runs.
std::tuple<int64_t, int64_t> kernel_image() {
  int binary = 0, ptx = 0;
  check_launch(qak_kernel_image(&binary, &ptx), "kernel_image");
  return {binary, ptx};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qadapter-kernels CUDA kernels (see csrc/qadapter_kernels.h); use them through qadapter_kernels._cuda";
  m.def("row_step", &row_step,
        "Fused row step into preallocated outputs (softcap 0: none; block_stats None: no per-block statistics)",
        py::arg("z"), py::arg("q"), py::arg("targets"), py::arg("alpha_tilde"), py::arg("alpha_0"),
        py::arg("softcap"), py::arg("q_taken"), py::arg("value"), py::arg("p"), py::arg("block_stats") = py::none());
  m.def("pairwise_bt", &pairwise_bt, "Pairwise BT + chi2 loss, its stats and per-token gradient", py::arg("rewards"),
        py::arg("row_counts"), py::arg("padded_len"), py::arg("beta"), py::arg("reward_norm"),
        py::arg("seq_rewards"), py::arg("stats"), py::arg("grad"));
  m.def("decode_combine", &decode_combine, "Combined-policy log-probs and optional filtered sampling", py::arg("z"),
        py::arg("q"), py::arg("alpha_tilde"), py::arg("alpha_0"), py::arg("temperature"), py::arg("top_k"),
        py::arg("top_p"), py::arg("seed"), py::arg("logprobs"), py::arg("sampled") = py::none());
  m.def("kernel_image", &kernel_image,
        "(cubin, PTX) versions the kernels run with on the current device; raises when there is no image for it");
}
