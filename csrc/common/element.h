// What every kernel family of the extension shares: the macro that makes arithmetic callable from
// both device code and the host-only check libraries (compiled with g++ by the tests), the element
// dtype codes of the Python wrappers, and fp32 conversion of each element type.
#pragma once

#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define PFRL_HD __host__ __device__ __forceinline__
#define PFRL_UNROLL _Pragma("unroll")
#else
#define PFRL_HD inline
#define PFRL_UNROLL _Pragma("GCC unroll 16")
#endif

namespace pyfastrl {

// Element dtype codes shared with the Python wrappers.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

PFRL_HD float to_float(float x) { return x; }
PFRL_HD float to_float(__half x) { return __half2float(x); }
PFRL_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
PFRL_HD T from_float(float x);
template <>
PFRL_HD float from_float<float>(float x) { return x; }
template <>
PFRL_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
PFRL_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Calls f(T{}) with the element type of a dtype code.
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    default:
      throw std::invalid_argument("unknown dtype code " + std::to_string(dtype) +
                                  " (0 float32, 1 float16, 2 bfloat16)");
  }
}

}  // namespace pyfastrl
