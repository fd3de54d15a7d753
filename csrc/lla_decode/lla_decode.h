// Launcher of the local-linear-attention decode kernel (lla_decode.cu), as bound in
// ../bindings.cpp. Raw device addresses, element strides and a cudaStream_t as integers, no torch
// or CUDA types. The caller (kernels/local_linear_attention/cuda.py) checks shapes, dtypes and
// devices and allocates the output; this throws std::invalid_argument / std::runtime_error on what
// it can see (dtype code, sizes, launch errors).
#pragma once

#include <stdint.h>

namespace pyfastrl {
namespace lla_decode {

// out (B, Hq, D) of dtype code `dtype` (common/element.h), like q (B, Hq, D) and k, v
// (B, T_max, Hkv, D); cache_seqlens (B,) int32, ridge (Hq,) fp32. strides (10, elements): q (b, h),
// k (b, t, h), v (b, t, h), out (b, h); the head dim has unit stride. 1 <= D <= 128, Hkv divides Hq.
void decode(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cache_seqlens, uintptr_t ridge,
            uintptr_t out, int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t max_tokens,
            int64_t head_dim, const int64_t* strides, float scale, uintptr_t stream);

}  // namespace lla_decode
}  // namespace pyfastrl
