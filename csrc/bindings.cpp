// The pyfastrl._cuda module: one pybind11 binding per kernel launcher. Pointers and the stream are
// plain integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); the Python wrappers
// own allocation, checks and autograd. C++ exceptions reach Python as ValueError (bad argument)
// or RuntimeError (CUDA error).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "attention_merge/merge.h"
#include "grpo_loss/grpo_loss.h"
#include "lla_decode/lla_decode.h"

namespace py = pybind11;

namespace {
// The loss options as flat arguments (the Python side passes kernels/grpo_loss/cuda.py's codes).
pyfastrl::grpo_loss::LossParams loss_params(int loss, int kl, bool has_delta, bool kl_ratio, bool sequence_level,
                                            float eps_low, float eps_high, float delta, float beta, float tau_pos,
                                            float tau_neg) {
  return {loss, kl, has_delta, kl_ratio, sequence_level, eps_low, eps_high, delta, beta, tau_pos, tau_neg};
}
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "pyfastrl CUDA kernels (raw device pointers; see kernels/prefix_attention/merge_cuda.py, "
      "kernels/grpo_loss/cuda.py, kernels/local_linear_attention/cuda.py)";
  m.def("attention_merge", &pyfastrl::attention_merge::merge,
        "Merge cross-attention partial results into rows of out/lse in place (merge.h).");
  m.def("attention_merge_add_rows", &pyfastrl::attention_merge::add_rows,
        "dq[q_rows] += cross_dq, dk[k_rows] += cross_dk, dv[k_rows] += cross_dv in one launch (merge.h).");
  m.def(
      "grpo_loss_forward",
      [](int dtype, uintptr_t logp, uintptr_t old, uintptr_t ref, uintptr_t weight, uintptr_t mask,
         uintptr_t advantages, uintptr_t cu, int64_t num_tokens, int64_t num_rows, int loss, int kl, bool has_delta,
         bool kl_ratio, bool sequence_level, float eps_low, float eps_high, float delta, float beta, float tau_pos,
         float tau_neg, uintptr_t segments, uintptr_t row_log_ratio, uintptr_t partials, uintptr_t stream) {
        pyfastrl::grpo_loss::forward(dtype, logp, old, ref, weight, mask, advantages, cu, num_tokens, num_rows,
                                     loss_params(loss, kl, has_delta, kl_ratio, sequence_level, eps_low, eps_high,
                                                 delta, beta, tau_pos, tau_neg),
                                     segments, row_log_ratio, partials, stream);
      },
      "Per-row partial sums of the GRPO loss terms (grpo_loss/grpo_loss.h).");
  m.def(
      "grpo_loss_backward",
      [](int dtype, uintptr_t row_grad, uintptr_t logp, uintptr_t old, uintptr_t ref, uintptr_t weight,
         uintptr_t mask, uintptr_t advantages, uintptr_t cu, int64_t num_tokens, int64_t num_rows, int loss, int kl,
         bool has_delta, bool kl_ratio, bool sequence_level, float eps_low, float eps_high, float delta, float beta,
         float tau_pos, float tau_neg, uintptr_t segments, uintptr_t row_log_ratio, uintptr_t row_via,
         uintptr_t dlogp, uintptr_t stream) {
        pyfastrl::grpo_loss::backward(dtype, row_grad, logp, old, ref, weight, mask, advantages, cu, num_tokens,
                                      num_rows,
                                      loss_params(loss, kl, has_delta, kl_ratio, sequence_level, eps_low, eps_high,
                                                  delta, beta, tau_pos, tau_neg),
                                      segments, row_log_ratio, row_via, dlogp, stream);
      },
      "dL/dlogp of the GRPO loss, closed form (grpo_loss/grpo_loss.h).");
  m.def("grpo_advantages", &pyfastrl::grpo_loss::advantages,
        "Group-normalised advantages of the rewards, one block per group (grpo_loss/grpo_loss.h).");
  m.def(
      "lla_decode",
      [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cache_seqlens, uintptr_t ridge, uintptr_t out,
         int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t max_tokens, int64_t head_dim,
         const std::array<int64_t, 10>& strides, float scale, uintptr_t stream) {
        pyfastrl::lla_decode::decode(dtype, q, k, v, cache_seqlens, ridge, out, batch, num_heads, num_kv_heads,
                                     max_tokens, head_dim, strides.data(), scale, stream);
      },
      "One decode step of local linear attention over a KV cache (lla_decode/lla_decode.h).");
}
