// Host-only build of the merge arithmetic (merge_math.h) for the tests: compiled with g++ by
// tests/test_cuda_extension.py and called through ctypes on CPU tensors, against a float64 torch
// reference. It walks the same (row, head, chunk) work items the kernels map to threads, so the
// addressing and the fp32 math are checked on every run; thread mapping and barriers are not.
// Returns nullptr, or the error message.
#include "common/host_guard.h"
#include "merge_math.h"

using namespace pyfastrl;
using namespace pyfastrl::attention_merge;

extern "C" const char* pyfastrl_merge_host(int dtype, uintptr_t out, uintptr_t lse, uintptr_t cross_out,
                                           uintptr_t cross_lse, uintptr_t rows, int64_t num_rows, int64_t num_heads,
                                           int64_t head_dim, int64_t stride_ot, int64_t stride_oh, int64_t stride_lh,
                                           int64_t stride_ct, int64_t stride_ch, int64_t stride_clh) {
  return guarded([&] {
    dispatch_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      const MergeArgs<T> a = merge_args<T>(out, lse, cross_out, cross_lse, rows, num_rows, num_heads, head_dim,
                                           stride_ot, stride_oh, stride_lh, stride_ct, stride_ch, stride_clh);
      for (int64_t n = 0; n < num_rows; ++n)
        for (int64_t h = 0; h < num_heads; ++h) {
          const MergeWeights w = row_weights(a, n, h);
          for (int64_t chunk = 0; chunk < a.chunks; ++chunk) merge_chunk(a, w, n, h, chunk);
          store_lse(a, w, n, h);
        }
    });
  });
}

extern "C" const char* pyfastrl_add_rows_host(int dtype, uintptr_t dst, uintptr_t src, uintptr_t rows,
                                              int64_t num_rows, int64_t num_heads, int64_t head_dim,
                                              int64_t stride_dt, int64_t stride_dh, int64_t stride_st,
                                              int64_t stride_sh) {
  return guarded([&] {
    dispatch_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      const RowAdd<T> a = row_add<T>(dst, src, rows, num_rows, num_heads, head_dim, stride_dt, stride_dh,
                                     stride_st, stride_sh);
      for (int64_t n = 0; n < num_rows; ++n)
        for (int64_t h = 0; h < num_heads; ++h)
          for (int64_t chunk = 0; chunk < a.chunks; ++chunk) add_chunk(a, n, h, chunk);
    });
  });
}
