// Arithmetic of the attention-state merge, shared by the CUDA kernels (merge.cu) and the host-only
// check library (host_check.cpp) that the tests compile with g++ and compare against float64 torch:
// everything here is __host__ __device__ and free of thread indexing.
//
// Layouts (element strides; the head dim has unit stride):
//   out (T, H, D), lse (H, T) fp32, cross_out (N, H, D), cross_lse (H, N) fp32, rows (N,) int64.
// One "chunk" is 16 bytes of a head-dim row: kPack<T> elements moved by one 128-bit load/store.
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/element.h"
#include "merge.h"

namespace pyfastrl {
namespace attention_merge {

template <typename T>
constexpr int kPack = 16 / sizeof(T);

// 16 bytes, 16-byte aligned: a copy of one compiles to a single 128-bit load or store.
template <typename T>
struct alignas(16) Pack {
  T v[kPack<T>];
};

struct MergeWeights {
  float lse;  // log(e^l1 + e^l2)
  float w1;   // e^(l1 - lse)
  float w2;   // e^(l2 - lse)
};

// Shift by the larger LSE so neither exponential overflows. Two empty parts (both -inf) give
// lse = -inf and zero weights instead of NaN.
PFRL_HD MergeWeights merge_weights(float l1, float l2) {
  const float top = l1 > l2 ? l1 : l2;
  if (top == -INFINITY) return MergeWeights{-INFINITY, 0.0f, 0.0f};
  const float e1 = expf(l1 - top);
  const float e2 = expf(l2 - top);
  const float sum = e1 + e2;
  return MergeWeights{top + logf(sum), e1 / sum, e2 / sum};
}

// merge_: cross rows n < num_rows are merged into rows rows[n] of out/lse, every head.
template <typename T>
struct MergeArgs {
  T* out;
  float* lse;
  const T* cross_out;
  const float* cross_lse;
  const int64_t* rows;
  int64_t num_rows, num_heads, chunks;  // chunks = head_dim / kPack<T>
  int64_t stride_ot, stride_oh, stride_lh, stride_ct, stride_ch, stride_clh;
};

template <typename T>
PFRL_HD MergeWeights row_weights(const MergeArgs<T>& a, int64_t n, int64_t h) {
  return merge_weights(a.lse[h * a.stride_lh + a.rows[n]], a.cross_lse[h * a.stride_clh + n]);
}

// out[rows[n], h, chunk] = w1 * out[rows[n], h, chunk] + w2 * cross_out[n, h, chunk] (fp32 math,
// one rounding to T).
template <typename T>
PFRL_HD void merge_chunk(const MergeArgs<T>& a, MergeWeights w, int64_t n, int64_t h, int64_t chunk) {
  const int64_t d = chunk * kPack<T>;
  Pack<T>* dst = reinterpret_cast<Pack<T>*>(a.out + a.rows[n] * a.stride_ot + h * a.stride_oh + d);
  const Pack<T> o1 = *dst;
  const Pack<T> o2 = *reinterpret_cast<const Pack<T>*>(a.cross_out + n * a.stride_ct + h * a.stride_ch + d);
  Pack<T> merged;
PFRL_UNROLL
  for (int i = 0; i < kPack<T>; ++i) merged.v[i] = from_float<T>(w.w1 * to_float(o1.v[i]) + w.w2 * to_float(o2.v[i]));
  *dst = merged;
}

// The LSE of the merged row; written once all chunks of the row have read the old value.
template <typename T>
PFRL_HD void store_lse(const MergeArgs<T>& a, MergeWeights w, int64_t n, int64_t h) {
  a.lse[h * a.stride_lh + a.rows[n]] = w.lse;
}

// add_rows_ (the backward): dst[rows[n], h] += src[n, h] for n < num_rows, h < num_heads; rows
// distinct, so chunks are independent.
template <typename T>
struct RowAdd {
  T* dst;
  const T* src;
  const int64_t* rows;
  int64_t num_rows, num_heads, chunks;
  int64_t stride_dt, stride_dh, stride_st, stride_sh;
};

template <typename T>
PFRL_HD void add_chunk(const RowAdd<T>& a, int64_t n, int64_t h, int64_t chunk) {
  const int64_t d = chunk * kPack<T>;
  Pack<T>* dst = reinterpret_cast<Pack<T>*>(a.dst + a.rows[n] * a.stride_dt + h * a.stride_dh + d);
  const Pack<T> x = *dst;
  const Pack<T> y = *reinterpret_cast<const Pack<T>*>(a.src + n * a.stride_st + h * a.stride_sh + d);
  Pack<T> sum;
PFRL_UNROLL
  for (int i = 0; i < kPack<T>; ++i) sum.v[i] = from_float<T>(to_float(x.v[i]) + to_float(y.v[i]));
  *dst = sum;
}


template <typename T>
MergeArgs<T> merge_args(uintptr_t out, uintptr_t lse, uintptr_t cross_out, uintptr_t cross_lse, uintptr_t rows,
                        int64_t num_rows, int64_t num_heads, int64_t head_dim, int64_t stride_ot, int64_t stride_oh,
                        int64_t stride_lh, int64_t stride_ct, int64_t stride_ch, int64_t stride_clh) {
  return MergeArgs<T>{reinterpret_cast<T*>(out), reinterpret_cast<float*>(lse),
                      reinterpret_cast<const T*>(cross_out), reinterpret_cast<const float*>(cross_lse),
                      reinterpret_cast<const int64_t*>(rows), num_rows, num_heads, head_dim / kPack<T>,
                      stride_ot, stride_oh, stride_lh, stride_ct, stride_ch, stride_clh};
}

template <typename T>
RowAdd<T> row_add(uintptr_t dst, uintptr_t src, uintptr_t rows, int64_t num_rows, int64_t num_heads,
                  int64_t head_dim, int64_t stride_dt, int64_t stride_dh, int64_t stride_st, int64_t stride_sh) {
  return RowAdd<T>{reinterpret_cast<T*>(dst), reinterpret_cast<const T*>(src), reinterpret_cast<const int64_t*>(rows),
                   num_rows, num_heads, head_dim / kPack<T>, stride_dt, stride_dh, stride_st, stride_sh};
}

}  // namespace attention_merge
}  // namespace pyfastrl
