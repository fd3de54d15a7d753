// Launchers of the GRPO loss kernels (grpo_loss.cu), as bound in ../bindings.cpp. Raw device
// addresses and a cudaStream_t as integers, no torch or CUDA types. The caller
// (kernels/grpo_loss/cuda.py) checks shapes, dtypes and devices and allocates the outputs and the
// workspace; these throw std::invalid_argument / std::runtime_error on what they can see.
//
// Tensors: logp (N,) of dtype code `dtype` (common/element.h); old, advantages (N,) fp32; ref,
// weight (N,) fp32 or 0 (unused); mask (N,) uint8 or 0 (every token valid); cu (B + 1,) int64;
// segments: fp32 workspace of grpo_math.h num_segments(N, B) x kNumPartials; row_log_ratio,
// row_via: fp32 (B,) workspace.
#pragma once

#include <stdint.h>

#include "grpo_loss/grpo_math.h"

namespace pyfastrl {
namespace grpo_loss {

// partials (B, kNumPartials) fp32: each row's sums over its valid tokens (reference.loss_forward).
void forward(int dtype, uintptr_t logp, uintptr_t old, uintptr_t ref, uintptr_t weight, uintptr_t mask,
             uintptr_t advantages, uintptr_t cu, int64_t num_tokens, int64_t num_rows, const LossParams& params,
             uintptr_t segments, uintptr_t row_log_ratio, uintptr_t partials, uintptr_t stream);

// dlogp (N,) of dtype `dtype`: row_grad[b] (fp32, (B,)) times the closed-form gradient of row b's
// summed loss (reference.loss_backward); 0 at masked tokens.
void backward(int dtype, uintptr_t row_grad, uintptr_t logp, uintptr_t old, uintptr_t ref, uintptr_t weight,
              uintptr_t mask, uintptr_t advantages, uintptr_t cu, int64_t num_tokens, int64_t num_rows,
              const LossParams& params, uintptr_t segments, uintptr_t row_log_ratio, uintptr_t row_via,
              uintptr_t dlogp, uintptr_t stream);

// advantages (B,) fp64: the group-normalised advantages of rewards (B,) fp64 (grpo_math.h
// AdvantageArgs: consecutive groups of group_size when offsets is 0, else group g =
// order[offsets[g] .. offsets[g + 1])), scale an AdvantageScale code. One block per group; for
// kScaleBatch a one-block kernel first writes the batch's RewardStats to batch_stats (4 fp64).
void advantages(uintptr_t rewards, uintptr_t order, uintptr_t offsets, int64_t group_size, int64_t num_rewards,
                int64_t num_groups, int scale, double eps, uintptr_t batch_stats, uintptr_t advantages,
                uintptr_t stream);

}  // namespace grpo_loss
}  // namespace pyfastrl
