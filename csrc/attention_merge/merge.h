// Launchers of the attention-state merge kernels (merge.cu), as bound in ../bindings.cpp.
// Raw device addresses, element strides and a cudaStream_t (as integers): no torch or CUDA types,
// so the binding compiles with the host compiler alone. The caller (kernels/prefix_attention/
// merge_cuda.py) checks shapes, dtypes, devices and 16-byte alignment; these throw
// std::invalid_argument / std::runtime_error on what they can see (dtype code, sizes, launch errors).
#pragma once

#include <stdint.h>

namespace pyfastrl {
namespace attention_merge {

// dtype: a code of common/element.h. out (T, H, D) rows `rows` (N,) int64 and lse (H, T) fp32 merged in place with cross_out (N, H, D)
// and cross_lse (H, N) fp32.
void merge(int dtype, uintptr_t out, uintptr_t lse, uintptr_t cross_out, uintptr_t cross_lse, uintptr_t rows,
           int64_t num_rows, int64_t num_heads, int64_t head_dim, int64_t stride_ot, int64_t stride_oh,
           int64_t stride_lh, int64_t stride_ct, int64_t stride_ch, int64_t stride_clh, uintptr_t stream);

// dq[q_rows] += cross_dq (num_heads heads); dk[k_rows] += cross_dk, dv[k_rows] += cross_dv
// (num_kv_heads heads; dk/dv and cross_dk/cross_dv share strides). One launch.
void add_rows(int dtype, uintptr_t dq, uintptr_t cross_dq, uintptr_t q_rows, int64_t num_q_rows, int64_t num_heads,
              uintptr_t dk, uintptr_t dv, uintptr_t cross_dk, uintptr_t cross_dv, uintptr_t k_rows,
              int64_t num_k_rows, int64_t num_kv_heads, int64_t head_dim, int64_t stride_dqt, int64_t stride_dqh,
              int64_t stride_cqt, int64_t stride_cqh, int64_t stride_dkt, int64_t stride_dkh, int64_t stride_ckt,
              int64_t stride_ckh, uintptr_t stream);

}  // namespace attention_merge
}  // namespace pyfastrl
