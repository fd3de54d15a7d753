// Arithmetic of the GRPO loss and advantage kernels, shared by the CUDA kernels (grpo_loss.cu) and
// the host-only check library (host_check.cpp) that the tests compile with g++ and compare against
// the float64 reference (kernels/grpo_loss/reference.py): everything here is __host__ __device__ and
// free of thread indexing. The token formulas are the reference's `_token_terms`, in fp32; the
// advantages (end of file) its `group_advantages`, in fp64.
//
// Work split: the packed tokens (N,) are cut into chunks of kChunk tokens, one thread block each.
// A chunk meets one or more rows (row b = tokens cu[b]..cu[b+1]); the piece of row b in chunk c is
// "segment" c + b. That index is unique: a later row in an earlier chunk would have to start before
// an earlier row ends. So N / kChunk + B segments hold every piece, each written by one block, and
// a second kernel folds each row's segments in chunk order: deterministic, no atomics, and rows
// of any length spread over many blocks.
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/element.h"

namespace pyfastrl {
namespace grpo_loss {

constexpr int64_t kChunk = 2048;  // tokens per block of the token kernels

// Token formulas (kernels/grpo_loss/kernel.py _LOSS_CODES, _KL_CODES).
enum LossCode : int { kClipped = 0, kCispo = 1, kSapo = 2, kPolicyGradient = 3 };
enum KlCode : int { kNoKl = 0, kK1 = 1, kK2 = 2, kK3 = 3 };

struct LossParams {
  int loss;  // LossCode
  int kl;    // KlCode (kNoKl when beta == 0)
  bool has_delta, kl_ratio, sequence_level;
  float eps_low, eps_high, delta, beta, tau_pos, tau_neg;
};

// One token's contributions (reference._token_terms): the loss, dloss/dlogp through logp directly
// and through the ratio (times the ratio: d/dlog_ratio), the KL term, the clip indicators, the ratio.
struct TokenTerms {
  float loss, direct, via_ratio, kl, clip_low, clip_high, clip_delta, ratio;
};

PFRL_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

PFRL_HD TokenTerms token_terms(float logp, float log_ratio, float ref, float adv, float weight,
                               const LossParams& p) {
  TokenTerms t{};
  const float ratio = expf(log_ratio);
  t.ratio = ratio;
  if (p.loss == kCispo) {
    const float coef = fminf(ratio, p.eps_high);
    t.loss = -coef * adv * logp;
    t.direct = -coef * adv;
    t.clip_high = (ratio > p.eps_high && adv > 0.0f) ? 1.0f : 0.0f;
  } else if (p.loss == kSapo) {
    const float tau = adv > 0.0f ? p.tau_pos : p.tau_neg;
    const float soft = sigmoid(tau * (ratio - 1.0f));
    t.loss = -soft * 4.0f / tau * adv;
    t.via_ratio = -4.0f * adv * soft * (1.0f - soft) * ratio;
  } else if (p.loss == kPolicyGradient) {
    t.loss = -adv * logp;
    t.direct = -adv;
  } else {
    const float lo = 1.0f - p.eps_low;
    const float hi = 1.0f + p.eps_high;
    float unclipped = ratio;
    float unclipped_pass = 1.0f;
    if (p.has_delta) {
      unclipped = fminf(ratio, p.delta);
      unclipped_pass = ratio <= p.delta ? 1.0f : 0.0f;
      t.clip_delta = (ratio > p.delta && adv < 0.0f) ? 1.0f : 0.0f;
    }
    const float clipped = fminf(fmaxf(ratio, lo), hi);
    const float clipped_pass = (ratio >= lo && ratio <= hi) ? 1.0f : 0.0f;
    const float term1 = unclipped * adv;
    const float term2 = clipped * adv;
    // Where the two terms tie, the min's gradient is split evenly (torch.minimum's convention).
    const float share1 = term1 < term2 ? 1.0f : (term1 == term2 ? 0.5f : 0.0f);
    t.loss = -fminf(term1, term2);
    t.via_ratio = -adv * (share1 * unclipped_pass + (1.0f - share1) * clipped_pass) * ratio;
    t.clip_low = (unclipped < lo && adv < 0.0f) ? 1.0f : 0.0f;
    t.clip_high = (unclipped > hi && adv > 0.0f) ? 1.0f : 0.0f;
  }
  t.loss *= weight;
  t.direct *= weight;
  t.via_ratio *= weight;
  if (p.kl != kNoKl) {
    const float diff = ref - logp;
    float kl_direct;
    if (p.kl == kK1) {
      t.kl = -diff;
      kl_direct = 1.0f;
    } else if (p.kl == kK2) {
      t.kl = 0.5f * diff * diff;
      kl_direct = -diff;
    } else {
      const float e = expf(diff);
      t.kl = e - diff - 1.0f;
      kl_direct = 1.0f - e;
    }
    if (p.kl_ratio) {
      t.via_ratio += p.beta * t.kl * ratio;
      t.kl *= ratio;
      kl_direct *= ratio;
    }
    t.loss += p.beta * t.kl;
    t.direct += p.beta * kl_direct;
  }
  return t;
}

// Per-row partial sums, in reference.PARTIALS order.
constexpr int kNumPartials = 9;
enum Partial : int { kLoss, kTokens, kKl, kClipLow, kClipHigh, kClipDelta, kRatioSum, kRatioMin, kRatioMax };

struct Partials {
  float v[kNumPartials];
};

PFRL_HD Partials empty_partials() {
  Partials s{};
  s.v[kRatioMin] = INFINITY;
  s.v[kRatioMax] = -INFINITY;
  return s;
}

PFRL_HD void add_token(Partials& s, const TokenTerms& t) {
  s.v[kLoss] += t.loss;
  s.v[kTokens] += 1.0f;
  s.v[kKl] += t.kl;
  s.v[kClipLow] += t.clip_low;
  s.v[kClipHigh] += t.clip_high;
  s.v[kClipDelta] += t.clip_delta;
  s.v[kRatioSum] += t.ratio;
  s.v[kRatioMin] = fminf(s.v[kRatioMin], t.ratio);
  s.v[kRatioMax] = fmaxf(s.v[kRatioMax], t.ratio);
}

PFRL_HD void combine(Partials& s, const Partials& o) {
PFRL_UNROLL
  for (int i = 0; i < kRatioMin; ++i) s.v[i] += o.v[i];
  s.v[kRatioMin] = fminf(s.v[kRatioMin], o.v[kRatioMin]);
  s.v[kRatioMax] = fmaxf(s.v[kRatioMax], o.v[kRatioMax]);
}

// The tensors of one call. logp in T; old, ref, weight, advantages fp32 (N,); mask uint8 (N,) or
// null (all valid); ref / weight null when unused; cu (B + 1,) int64.
template <typename T>
struct LossArgs {
  const T* logp;
  const float* old;
  const float* ref;
  const float* weight;
  const uint8_t* mask;
  const float* advantages;
  const int64_t* cu;
  int64_t num_tokens, num_rows;
  LossParams params;
};

// The launchers' raw addresses (0 for an absent tensor) as LossArgs.
template <typename T>
LossArgs<T> loss_args(uintptr_t logp, uintptr_t old, uintptr_t ref, uintptr_t weight, uintptr_t mask,
                      uintptr_t advantages, uintptr_t cu, int64_t num_tokens, int64_t num_rows,
                      const LossParams& params) {
  return LossArgs<T>{reinterpret_cast<const T*>(logp), reinterpret_cast<const float*>(old),
                     reinterpret_cast<const float*>(ref), reinterpret_cast<const float*>(weight),
                     reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<const float*>(advantages),
                     reinterpret_cast<const int64_t*>(cu), num_tokens, num_rows, params};
}

template <typename T>
PFRL_HD bool token_valid(const LossArgs<T>& a, int64_t i) {
  return a.mask == nullptr || a.mask[i] != 0;
}

// Token i's terms; `row_log_ratio` is its row's mean log-ratio (sequence level) else unused.
template <typename T>
PFRL_HD TokenTerms terms_at(const LossArgs<T>& a, int64_t i, float row_log_ratio) {
  const float logp = to_float(a.logp[i]);
  const float log_ratio = a.params.sequence_level ? row_log_ratio : logp - a.old[i];
  const float ref = a.ref != nullptr ? a.ref[i] : logp;
  const float weight = a.weight != nullptr ? a.weight[i] : 1.0f;
  return token_terms(logp, log_ratio, ref, a.advantages[i], weight, a.params);
}

// Segments: chunk c of the tokens and row b -> segment c + b (see the top of this file).
PFRL_HD int64_t num_chunks(int64_t num_tokens) { return (num_tokens + kChunk - 1) / kChunk; }
PFRL_HD int64_t num_segments(int64_t num_tokens, int64_t num_rows) { return num_chunks(num_tokens) + num_rows; }

// The row holding token i: the last b with cu[b] <= i (rows may be empty), by binary search.
PFRL_HD int64_t row_of(const int64_t* cu, int64_t num_rows, int64_t i) {
  int64_t lo = 0, hi = num_rows - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The chunks row b's tokens fall in: [first, last] (last < first for an empty row).
PFRL_HD void row_chunks(const int64_t* cu, int64_t b, int64_t& first, int64_t& last) {
  first = cu[b] / kChunk;
  last = cu[b + 1] > cu[b] ? (cu[b + 1] - 1) / kChunk : first - 1;
}

// Row b's partials from its segments' (segment (c + b) of each chunk c it meets).
PFRL_HD Partials fold_row(const Partials* segments, const int64_t* cu, int64_t b) {
  int64_t first, last;
  row_chunks(cu, b, first, last);
  Partials s = empty_partials();
  for (int64_t c = first; c <= last; ++c) combine(s, segments[c + b]);
  return s;
}

// Sequence level: the row's valid-token count and sum of per-token log-ratios, as Partials slots
// kTokens and kLoss (one segment layout for every pass).
template <typename T>
PFRL_HD void add_log_ratio(Partials& s, const LossArgs<T>& a, int64_t i) {
  s.v[kTokens] += 1.0f;
  s.v[kLoss] += to_float(a.logp[i]) - a.old[i];
}

PFRL_HD float mean_log_ratio(const Partials& row) { return row.v[kLoss] / fmaxf(row.v[kTokens], 1.0f); }

// Backward, sequence level: the row's sum of via_ratio (slot kLoss) and its count (kTokens); each
// valid token then gets row_grad * direct + row_grad * sum / count (reference.loss_backward).
PFRL_HD void add_via_ratio(Partials& s, const TokenTerms& t) {
  s.v[kTokens] += 1.0f;
  s.v[kLoss] += t.via_ratio;
}

// dL/dlogp of token i of row b. `row_via` is row b's summed via_ratio / count at sequence level.
template <typename T>
PFRL_HD float token_grad(const LossArgs<T>& a, int64_t i, float row_grad, float row_log_ratio, float row_via) {
  if (!token_valid(a, i)) return 0.0f;
  const TokenTerms t = terms_at(a, i, row_log_ratio);
  return a.params.sequence_level ? row_grad * (t.direct + row_via) : row_grad * (t.direct + t.via_ratio);
}


// ------------------------------------------------------------------------------------ advantages
// Group-normalised advantages (reference.group_advantages, float64 like it). A reward is NaN when
// the completion could not be scored: it is left out of its group's statistics and gets 0. Each
// group's rewards are shifted by the group's maximum before the two-pass mean and variance, so a
// group of identical rewards has deviations of exactly 0 and gets exactly 0 (for eps > 0).

// reference.ADVANTAGE_SCALES order.
enum AdvantageScale : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// The rewards of one group: positions [begin, end) of `order` (reward indices sorted by group), or
// rewards [begin, end) themselves when `order` is null (consecutive groups, or the whole batch).
struct Members {
  const int64_t* order;
  int64_t begin, end;
};

PFRL_HD int64_t member(const Members& m, int64_t k) { return m.order != nullptr ? m.order[k] : k; }

// rewards (B,) fp64; groups either consecutive runs of group_size (offsets null) or group g =
// order[offsets[g] .. offsets[g + 1]) with order (B,) and offsets (G + 1,) int64.
struct AdvantageArgs {
  const double* rewards;
  const int64_t* order;
  const int64_t* offsets;
  int64_t group_size, num_rewards, num_groups;
  int scale;  // AdvantageScale
  double eps;
};

PFRL_HD Members group_members(const AdvantageArgs& a, int64_t g) {
  if (a.offsets == nullptr) return Members{nullptr, g * a.group_size, (g + 1) * a.group_size};
  return Members{a.order, a.offsets[g], a.offsets[g + 1]};
}

PFRL_HD Members batch_members(const AdvantageArgs& a) { return Members{nullptr, 0, a.num_rewards}; }

// A set of rewards' scorable count, maximum (the shift), mean of the shifted rewards and unbiased
// standard deviation (0 below two scorable rewards, as the reference's clamp of count - 1 gives).
struct RewardStats {
  double count, pivot, mean, std;
};

PFRL_HD bool scorable(double reward) { return !isnan(reward); }

PFRL_HD double centred_reward(double reward, const RewardStats& s) {
  return scorable(reward) ? (reward - s.pivot) - s.mean : 0.0;
}

enum Fold : int { kFoldSum = 0, kFoldMax = 1 };

// The statistics of `m`'s rewards in three passes (maximum and count, mean, variance). The caller
// visits members begin + lane, begin + lane + lanes, ...; `fold(value, Fold)` combines the lanes'
// values (a block reduction on the device, the identity on the host, where lanes == 1).
template <typename FoldLanes>
PFRL_HD RewardStats reward_stats(const double* rewards, const Members& m, int64_t lane, int64_t lanes,
                                 FoldLanes&& fold) {
  double count = 0.0, pivot = -INFINITY;
  for (int64_t k = m.begin + lane; k < m.end; k += lanes) {
    const double r = rewards[member(m, k)];
    if (scorable(r)) {
      count += 1.0;
      pivot = fmax(pivot, r);
    }
  }
  RewardStats s{fold(count, kFoldSum), fold(pivot, kFoldMax), 0.0, 0.0};
  double shifted = 0.0;
  for (int64_t k = m.begin + lane; k < m.end; k += lanes) {
    const double r = rewards[member(m, k)];
    if (scorable(r)) shifted += r - s.pivot;
  }
  s.mean = fold(shifted, kFoldSum) / fmax(s.count, 1.0);
  double squares = 0.0;
  for (int64_t k = m.begin + lane; k < m.end; k += lanes) {
    const double c = centred_reward(rewards[member(m, k)], s);
    squares += c * c;
  }
  s.std = sqrt(fold(squares, kFoldSum) / fmax(s.count - 1.0, 1.0));
  return s;
}

// One reward's advantage; `batch` (the whole batch's statistics) is read for kScaleBatch only.
PFRL_HD double advantage(double reward, const RewardStats& group, const RewardStats& batch, int scale, double eps) {
  double a = centred_reward(reward, group);
  bool enough = group.count > 1.0;
  if (scale == kScaleGroup) {
    a = a / (group.std + eps);
  } else if (scale == kScaleBatch) {
    a = a / (batch.std + eps);
    enough = enough && batch.count > 1.0;
  }
  return scorable(reward) && enough ? a : 0.0;
}

}  // namespace grpo_loss
}  // namespace pyfastrl
