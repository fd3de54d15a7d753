// The local-linear-attention decode kernel (see lla_decode.h and lla_decode_math.h, which holds the
// block's whole program): one block of kThreads threads per (sequence, query head), no atomics, so
// the result does not depend on scheduling. What is CUDA-specific here is only the thread state,
// the barrier and the launch (dynamic shared memory above the 48 KiB default needs an opt-in).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/launch.h"
#include "lla_decode/lla_decode.h"
#include "lla_decode/lla_decode_math.h"

namespace pyfastrl {
namespace lla_decode {
namespace {

// decode_block's Block on the device: each thread its own state, a barrier after every step.
template <int S>
struct DeviceBlock {
  ThreadState<S> state;

  template <typename F>
  __device__ __forceinline__ void step(F&& f) {
    f(static_cast<int>(threadIdx.x), state);
    __syncthreads();
  }
};

// Two blocks an SM (the shared memory, 68 KiB at D = 128, allows 2 on sm_80, 3 on sm_90): registers
// capped at 128 a thread; the instances take 86-112 (nvcc 13.0). Under a bare
// __launch_bounds__(kThreads), ptxas squeezed one instance (fp32, S = 4, sm_90a) to 80 registers
// and a stack frame.
constexpr int kBlocksPerSm = 2;

template <typename T, int S>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) decode_kernel(DecodeArgs<T> a) {
  extern __shared__ __align__(16) unsigned char shared[];
  DeviceBlock<S> block;
  decode_block<T, S>(a, blockIdx.x, shared, block);
}

template <typename T, int S>
void launch(const DecodeArgs<T>& a, int64_t blocks, cudaStream_t stream) {
  const int bytes = static_cast<int>(shared_bytes(a.head_dim));
  // Per launch rather than once: the attribute belongs to the current device, and setting it costs
  // no device synchronisation.
  const cudaError_t status =
      cudaFuncSetAttribute(decode_kernel<T, S>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear it, so that it is not reported again by a later launch check
    throw std::runtime_error("lla_decode: " + std::to_string(bytes) + " bytes of dynamic shared memory: " +
                             cudaGetErrorString(status));
  }
  decode_kernel<T, S><<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(a);
  check_launch("lla_decode");
}

}  // namespace

void decode(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cache_seqlens, uintptr_t ridge,
            uintptr_t out, int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t max_tokens,
            int64_t head_dim, const int64_t* strides, float scale, uintptr_t stream) {
  check_sizes(num_heads, num_kv_heads, head_dim);
  const int64_t blocks = batch * num_heads;
  if (blocks == 0) return;
  if (blocks > 0x7fffffff) throw std::invalid_argument("lla_decode: more than 2^31 - 1 (sequence, head) pairs");
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const DecodeArgs<T> a = decode_args<T>(q, k, v, cache_seqlens, ridge, out, num_heads, num_kv_heads, max_tokens,
                                           head_dim, strides, scale);
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    dispatch_slots(head_dim, [&](auto slots) { launch<T, decltype(slots)::value>(a, blocks, s); });
  });
}

}  // namespace lla_decode
}  // namespace pyfastrl
