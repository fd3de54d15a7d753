// Host-only build of the GRPO loss arithmetic (grpo_math.h) for the tests: compiled with g++ by
// tests/test_grpo_loss_cuda.py and called through ctypes on CPU tensors, against the float64
// reference (kernels/grpo_loss/reference.py). It walks the same chunks, segments and folds as the
// kernels (grpo_loss.cu), one token at a time where a kernel's threads share a chunk, so the token
// formulas, the segment indexing and the fold are checked on every run; thread mapping and the
// block reductions are not. The same for the advantages. Returns nullptr, or the error message.
#include "common/host_guard.h"
#include "grpo_loss/grpo_math.h"

using namespace pyfastrl;
using namespace pyfastrl::grpo_loss;

namespace {

// segment_kernel's walk: `add(s, b, i)` over the valid tokens of each (chunk, row) piece.
template <typename T, typename Add>
void segments_of(const LossArgs<T>& a, Partials* segments, Add&& add) {
  for (int64_t chunk = 0; chunk < num_chunks(a.num_tokens); ++chunk) {
    const int64_t start = chunk * kChunk;
    const int64_t end = start + kChunk < a.num_tokens ? start + kChunk : a.num_tokens;
    for (int64_t b = row_of(a.cu, a.num_rows, start); b < a.num_rows && a.cu[b] < end; ++b) {
      const int64_t lo = a.cu[b] > start ? a.cu[b] : start;
      const int64_t hi = a.cu[b + 1] < end ? a.cu[b + 1] : end;
      if (lo >= hi) continue;
      Partials s = empty_partials();
      for (int64_t i = lo; i < hi; ++i)
        if (token_valid(a, i)) add(s, b, i);
      segments[chunk + b] = s;
    }
  }
}

template <typename T>
void row_log_ratios(const LossArgs<T>& a, Partials* segments, float* row_log_ratio) {
  segments_of(a, segments, [&](Partials& s, int64_t, int64_t i) { add_log_ratio(s, a, i); });
  for (int64_t b = 0; b < a.num_rows; ++b) row_log_ratio[b] = mean_log_ratio(fold_row(segments, a.cu, b));
}
}  // namespace

extern "C" const char* pyfastrl_grpo_forward_host(int dtype, uintptr_t logp, uintptr_t old, uintptr_t ref,
                                                  uintptr_t weight, uintptr_t mask, uintptr_t advantages,
                                                  uintptr_t cu, int64_t num_tokens, int64_t num_rows,
                                                  const LossParams* params, uintptr_t segments,
                                                  uintptr_t row_log_ratio, uintptr_t partials) {
  return guarded([&] {
    dispatch_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      const LossArgs<T> a = loss_args<T>(logp, old, ref, weight, mask, advantages, cu, num_tokens, num_rows, *params);
      auto* seg = reinterpret_cast<Partials*>(segments);
      auto* log_ratio = reinterpret_cast<float*>(row_log_ratio);
      if (a.params.sequence_level) row_log_ratios(a, seg, log_ratio);
      segments_of(a, seg, [&](Partials& s, int64_t b, int64_t i) {
        add_token(s, terms_at(a, i, a.params.sequence_level ? log_ratio[b] : 0.0f));
      });
      auto* out = reinterpret_cast<Partials*>(partials);
      for (int64_t b = 0; b < num_rows; ++b) out[b] = fold_row(seg, a.cu, b);
    });
  });
}

extern "C" const char* pyfastrl_grpo_backward_host(int dtype, uintptr_t row_grad, uintptr_t logp, uintptr_t old,
                                                   uintptr_t ref, uintptr_t weight, uintptr_t mask,
                                                   uintptr_t advantages, uintptr_t cu, int64_t num_tokens,
                                                   int64_t num_rows, const LossParams* params, uintptr_t segments,
                                                   uintptr_t row_log_ratio, uintptr_t row_via, uintptr_t dlogp) {
  return guarded([&] {
    dispatch_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      const LossArgs<T> a = loss_args<T>(logp, old, ref, weight, mask, advantages, cu, num_tokens, num_rows, *params);
      auto* seg = reinterpret_cast<Partials*>(segments);
      auto* log_ratio = reinterpret_cast<float*>(row_log_ratio);
      auto* via = reinterpret_cast<float*>(row_via);
      const auto* grads = reinterpret_cast<const float*>(row_grad);
      if (a.params.sequence_level) {
        row_log_ratios(a, seg, log_ratio);
        segments_of(a, seg, [&](Partials& s, int64_t b, int64_t i) { add_via_ratio(s, terms_at(a, i, log_ratio[b])); });
        for (int64_t b = 0; b < num_rows; ++b) via[b] = mean_log_ratio(fold_row(seg, a.cu, b));
      }
      auto* out = reinterpret_cast<T*>(dlogp);
      for (int64_t i = 0, b = 0; i < num_tokens; ++i) {
        while (a.cu[b + 1] <= i) ++b;
        const bool sequence = a.params.sequence_level;
        out[i] = from_float<T>(token_grad(a, i, grads[b], sequence ? log_ratio[b] : 0.0f, sequence ? via[b] : 0.0f));
      }
    });
  });
}

// advantage_kernel's walk (after batch_stats_kernel's for kScaleBatch), one reward at a time.
extern "C" const char* pyfastrl_grpo_advantages_host(uintptr_t rewards, uintptr_t order, uintptr_t offsets,
                                                     int64_t group_size, int64_t num_rewards, int64_t num_groups,
                                                     int scale, double eps, uintptr_t advantages) {
  return guarded([&] {
    const AdvantageArgs a{reinterpret_cast<const double*>(rewards), reinterpret_cast<const int64_t*>(order),
                          reinterpret_cast<const int64_t*>(offsets), group_size, num_rewards, num_groups, scale, eps};
    auto one_lane = [](double value, int) { return value; };
    const RewardStats batch = reward_stats(a.rewards, batch_members(a), 0, 1, one_lane);
    auto* out = reinterpret_cast<double*>(advantages);
    for (int64_t g = 0; g < num_groups; ++g) {
      const Members m = group_members(a, g);
      const RewardStats group = reward_stats(a.rewards, m, 0, 1, one_lane);
      for (int64_t k = m.begin; k < m.end; ++k) {
        const int64_t i = member(m, k);
        out[i] = advantage(a.rewards[i], group, batch, scale, eps);
      }
    }
  });
}
