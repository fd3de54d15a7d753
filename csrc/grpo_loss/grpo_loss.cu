// GRPO loss kernels (see grpo_loss.h; the arithmetic and the segment scheme are in grpo_math.h).
// Memory-bound: every pass reads each token's inputs once, coalesced, and the chunked segments keep
// every SM busy whatever the row lengths. Three kernels:
//   segment_kernel<Pass>  one block per chunk of kChunk tokens: for each row the chunk meets, a
//                         block reduction of the pass's per-token quantity into segment (c + b);
//   fold_kernel<Pass>     one thread per row: the row's segments in chunk order -> its result;
//   grad_kernel           one block per chunk: each token's dL/dlogp.
// And the rewards' group-normalised advantages (fp64, B numbers): advantage_kernel, one block per
// group, after batch_stats_kernel (one block over the batch) when the std is the batch's.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/launch.h"
#include "grpo_loss/grpo_loss.h"
#include "grpo_loss/grpo_math.h"

namespace pyfastrl {
namespace grpo_loss {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFoldThreads = 128;

// What a segment sums. kLogRatio: count and summed log-ratio (sequence level); kLossTerms: the
// forward partials; kViaRatio: count and summed via_ratio (sequence-level backward).
enum Pass : int { kLogRatio = 0, kLossTerms = 1, kViaRatio = 2 };

__device__ __forceinline__ void warp_combine(Partials& s) {
PFRL_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) {
    Partials o;
PFRL_UNROLL
    for (int i = 0; i < kNumPartials; ++i) o.v[i] = __shfl_xor_sync(0xffffffffu, s.v[i], offset);
    combine(s, o);
  }
}

// The block's combined partials, in thread 0 (every thread must call it).
__device__ __forceinline__ Partials block_combine(Partials s, Partials (&scratch)[kWarps]) {
  warp_combine(s);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  Partials total = empty_partials();
  if (warp == 0) {
    total = lane < kWarps ? scratch[lane] : empty_partials();
    warp_combine(total);
  }
  __syncthreads();  // scratch is reused by the next row's reduction
  return total;
}

template <typename T, int kPass>
__global__ void __launch_bounds__(kThreads)
    segment_kernel(LossArgs<T> a, const float* __restrict__ row_log_ratio, Partials* __restrict__ segments) {
  __shared__ Partials scratch[kWarps];
  const int64_t chunk = blockIdx.x;
  const int64_t start = chunk * kChunk;
  const int64_t end = start + kChunk < a.num_tokens ? start + kChunk : a.num_tokens;
  for (int64_t b = row_of(a.cu, a.num_rows, start); b < a.num_rows && a.cu[b] < end; ++b) {
    const int64_t lo = a.cu[b] > start ? a.cu[b] : start;
    const int64_t hi = a.cu[b + 1] < end ? a.cu[b + 1] : end;
    if (lo >= hi) continue;  // an empty row: it has no segment
    const float log_ratio = (kPass != kLogRatio && a.params.sequence_level) ? row_log_ratio[b] : 0.0f;
    Partials s = empty_partials();
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      if (!token_valid(a, i)) continue;
      if (kPass == kLogRatio) {
        add_log_ratio(s, a, i);
      } else if (kPass == kLossTerms) {
        add_token(s, terms_at(a, i, log_ratio));
      } else {
        add_via_ratio(s, terms_at(a, i, log_ratio));
      }
    }
    const Partials total = block_combine(s, scratch);
    if (threadIdx.x == 0) segments[chunk + b] = total;
  }
}

// kLogRatio: out[b] = the row's mean log-ratio; kLossTerms: partials[b] = the row's partials;
// kViaRatio: out[b] = the row's summed via_ratio / count.
template <int kPass>
__global__ void __launch_bounds__(kFoldThreads)
    fold_kernel(const Partials* __restrict__ segments, const int64_t* __restrict__ cu, int64_t num_rows,
                float* __restrict__ out, Partials* __restrict__ partials) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kFoldThreads + threadIdx.x;
  if (b >= num_rows) return;
  const Partials row = fold_row(segments, cu, b);
  if (kPass == kLossTerms) {
    partials[b] = row;
  } else {
    out[b] = mean_log_ratio(row);  // slot kLoss over slot kTokens, for both passes
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(LossArgs<T> a, const float* __restrict__ row_grad, const float* __restrict__ row_log_ratio,
                const float* __restrict__ row_via, T* __restrict__ dlogp) {
  __shared__ int64_t first_row;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = start + kChunk < a.num_tokens ? start + kChunk : a.num_tokens;
  if (threadIdx.x == 0) first_row = row_of(a.cu, a.num_rows, start);
  __syncthreads();
  int64_t b = first_row;
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    while (a.cu[b + 1] <= i) ++b;  // tokens rise along the loop: walk forward from the last row
    const bool sequence = a.params.sequence_level;
    const float grad = token_grad(a, i, row_grad[b], sequence ? row_log_ratio[b] : 0.0f,
                                  sequence ? row_via[b] : 0.0f);
    dlogp[i] = from_float<T>(grad);
  }
}

constexpr int kAdvantageThreads = 64;  // groups are a few to a few dozen completions
constexpr int kAdvantageWarps = kAdvantageThreads / 32;

// `value` folded over the block, in every thread (every thread must call it).
__device__ __forceinline__ double block_fold(double value, int fold, double (&scratch)[kAdvantageWarps]) {
PFRL_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) {
    const double other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = fold == kFoldMax ? fmax(value, other) : value + other;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  value = scratch[0];
PFRL_UNROLL
  for (int w = 1; w < kAdvantageWarps; ++w) value = fold == kFoldMax ? fmax(value, scratch[w]) : value + scratch[w];
  __syncthreads();  // scratch is reused by the next fold
  return value;
}

__device__ __forceinline__ RewardStats block_reward_stats(const AdvantageArgs& a, const Members& m) {
  __shared__ double scratch[kAdvantageWarps];
  return reward_stats(a.rewards, m, threadIdx.x, kAdvantageThreads,
                      [&](double value, int fold) { return block_fold(value, fold, scratch); });
}

__global__ void __launch_bounds__(kAdvantageThreads) batch_stats_kernel(AdvantageArgs a, RewardStats* batch) {
  const RewardStats s = block_reward_stats(a, batch_members(a));
  if (threadIdx.x == 0) *batch = s;
}

__global__ void __launch_bounds__(kAdvantageThreads)
    advantage_kernel(AdvantageArgs a, const RewardStats* __restrict__ batch, double* __restrict__ out) {
  const Members m = group_members(a, blockIdx.x);
  const RewardStats group = block_reward_stats(a, m);
  const RewardStats whole = a.scale == kScaleBatch ? *batch : group;
  for (int64_t k = m.begin + threadIdx.x; k < m.end; k += kAdvantageThreads) {
    const int64_t i = member(m, k);
    out[i] = advantage(a.rewards[i], group, whole, a.scale, a.eps);
  }
}

void check_sizes(int64_t num_tokens, int64_t num_rows, const char* what) {
  if (num_tokens < 0 || num_rows < 1)
    throw std::invalid_argument(std::string(what) + ": need num_tokens >= 0 and num_rows >= 1, got " +
                                std::to_string(num_tokens) + " and " + std::to_string(num_rows));
  if (num_chunks(num_tokens) > 0x7fffffffLL)
    throw std::invalid_argument(std::string(what) + ": too many tokens for one launch");
}

template <int kPass>
void fold(const Partials* segments, const int64_t* cu, int64_t num_rows, float* out, Partials* partials,
          cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((num_rows + kFoldThreads - 1) / kFoldThreads);
  fold_kernel<kPass><<<blocks, kFoldThreads, 0, stream>>>(segments, cu, num_rows, out, partials);
  check_launch("grpo_loss fold");
}

// The rows' mean log-ratios into row_log_ratio (sequence level only).
template <typename T>
void row_log_ratios(const LossArgs<T>& a, Partials* segments, float* row_log_ratio, cudaStream_t stream) {
  const unsigned chunks = static_cast<unsigned>(num_chunks(a.num_tokens));
  if (chunks > 0) segment_kernel<T, kLogRatio><<<chunks, kThreads, 0, stream>>>(a, nullptr, segments);
  check_launch("grpo_loss log-ratio segments");
  fold<kLogRatio>(segments, a.cu, a.num_rows, row_log_ratio, nullptr, stream);
}

}  // namespace

void forward(int dtype, uintptr_t logp, uintptr_t old, uintptr_t ref, uintptr_t weight, uintptr_t mask,
             uintptr_t advantages, uintptr_t cu, int64_t num_tokens, int64_t num_rows, const LossParams& params,
             uintptr_t segments, uintptr_t row_log_ratio, uintptr_t partials, uintptr_t stream_handle) {
  check_sizes(num_tokens, num_rows, "grpo_loss forward");
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const LossArgs<T> a = loss_args<T>(logp, old, ref, weight, mask, advantages, cu, num_tokens, num_rows, params);
    auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    auto* seg = reinterpret_cast<Partials*>(segments);
    auto* log_ratio = reinterpret_cast<float*>(row_log_ratio);
    if (params.sequence_level) row_log_ratios(a, seg, log_ratio, stream);
    const unsigned chunks = static_cast<unsigned>(num_chunks(num_tokens));
    if (chunks > 0) segment_kernel<T, kLossTerms><<<chunks, kThreads, 0, stream>>>(a, log_ratio, seg);
    check_launch("grpo_loss forward segments");
    fold<kLossTerms>(seg, a.cu, num_rows, nullptr, reinterpret_cast<Partials*>(partials), stream);
  });
}

void backward(int dtype, uintptr_t row_grad, uintptr_t logp, uintptr_t old, uintptr_t ref, uintptr_t weight,
              uintptr_t mask, uintptr_t advantages, uintptr_t cu, int64_t num_tokens, int64_t num_rows,
              const LossParams& params, uintptr_t segments, uintptr_t row_log_ratio, uintptr_t row_via,
              uintptr_t dlogp, uintptr_t stream_handle) {
  check_sizes(num_tokens, num_rows, "grpo_loss backward");
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const LossArgs<T> a = loss_args<T>(logp, old, ref, weight, mask, advantages, cu, num_tokens, num_rows, params);
    auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    auto* seg = reinterpret_cast<Partials*>(segments);
    auto* log_ratio = reinterpret_cast<float*>(row_log_ratio);
    auto* via = reinterpret_cast<float*>(row_via);
    const unsigned chunks = static_cast<unsigned>(num_chunks(num_tokens));
    if (params.sequence_level) {
      row_log_ratios(a, seg, log_ratio, stream);
      if (chunks > 0) segment_kernel<T, kViaRatio><<<chunks, kThreads, 0, stream>>>(a, log_ratio, seg);
      check_launch("grpo_loss via-ratio segments");
      fold<kViaRatio>(seg, a.cu, num_rows, via, nullptr, stream);
    }
    if (chunks > 0)
      grad_kernel<T><<<chunks, kThreads, 0, stream>>>(a, reinterpret_cast<const float*>(row_grad), log_ratio, via,
                                                      reinterpret_cast<T*>(dlogp));
    check_launch("grpo_loss backward");
  });
}

void advantages(uintptr_t rewards, uintptr_t order, uintptr_t offsets, int64_t group_size, int64_t num_rewards,
                int64_t num_groups, int scale, double eps, uintptr_t batch_stats, uintptr_t advantages,
                uintptr_t stream_handle) {
  if (num_groups < 0 || num_groups > 0x7fffffffLL || num_rewards < 0 || scale < kScaleGroup || scale > kScaleNone ||
      (offsets == 0 && group_size * num_groups != num_rewards))
    throw std::invalid_argument("grpo advantages: need 0 <= num_groups < 2^31, a scale code 0..2 and, without "
                                "offsets, group_size * num_groups == num_rewards; got " +
                                std::to_string(num_groups) + " groups, scale " + std::to_string(scale));
  if (num_groups == 0) return;
  const AdvantageArgs a{reinterpret_cast<const double*>(rewards), reinterpret_cast<const int64_t*>(order),
                        reinterpret_cast<const int64_t*>(offsets), group_size, num_rewards, num_groups, scale, eps};
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  auto* batch = reinterpret_cast<RewardStats*>(batch_stats);
  if (scale == kScaleBatch) {
    batch_stats_kernel<<<1, kAdvantageThreads, 0, stream>>>(a, batch);
    check_launch("grpo advantages batch statistics");
  }
  advantage_kernel<<<static_cast<unsigned>(num_groups), kAdvantageThreads, 0, stream>>>(
      a, batch, reinterpret_cast<double*>(advantages));
  check_launch("grpo advantages");
}

}  // namespace grpo_loss
}  // namespace pyfastrl
