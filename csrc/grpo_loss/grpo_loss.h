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

}  // namespace grpo_loss
}  // namespace pyfastrl
